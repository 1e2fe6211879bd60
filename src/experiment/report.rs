//! The matrix's results and their three renderings: a terminal table, a
//! markdown document and JSON. Markdown and JSON carry exactly the same
//! fields, so either can be read back into the other.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Bumped whenever a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema_version: u32,
    /// UTC date of the run, `YYYY-MM-DD`.
    pub date: String,
    pub generated_unix_ms: u64,
    /// `uname -r` of the machine that ran the matrix.
    pub kernel: String,
    pub criu_version: String,
    #[serde(default)]
    pub criu_patched_version: Option<String>,
    pub rows: Vec<Row>,
}

/// Whether a scenario ran at all.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It ran; the other fields say what happened.
    Ran,
    /// It could not run here (no Go toolchain, no static libc); `evidence` says why.
    Skipped,
    /// The harness itself failed (not a stop, dump or restore outcome); `evidence` has the error.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Skipped => "skipped",
            Status::Error => "error",
        }
    }
}

/// A syscall's result as the payload logged it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SyscallResult {
    pub ret: i64,
    pub errno: i32,
}

impl SyscallResult {
    pub fn render(&self) -> String {
        let name = if self.errno == 0 {
            String::new()
        } else {
            format!(" ({})", errno_name(self.errno))
        };
        format!("ret={} errno={}{name}", self.ret, self.errno)
    }
}

fn errno_name(e: i32) -> String {
    let errno = nix::errno::Errno::from_raw(e);
    if errno == nix::errno::Errno::UnknownErrno {
        format!("errno {e}")
    } else {
        format!("{errno:?}")
    }
}

/// One run of one scenario.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub id: String,
    /// 1-based, for `--repeat`.
    pub attempt: u32,
    pub technique: String,
    /// The payload binary, e.g. `simple_server`.
    pub payload: String,
    /// `trace` or `notify`.
    pub backend: String,
    /// `stock` or `patched`.
    pub criu: String,
    pub status: Status,
    /// Did the target stop before `listen` (null: it never got that far).
    pub stopped: Option<bool>,
    /// Did `criu dump` succeed (null: not attempted).
    pub dumped: Option<bool>,
    /// Did `criu restore` bring the tree back under runmh (null: not attempted).
    pub restored: Option<bool>,
    /// What `listen` returned to the application after the restore.
    pub after_restore: Option<SyscallResult>,
    /// Did the restored server answer an HTTP request (null: not tried).
    pub served_http: Option<bool>,
    pub time_to_stop_ms: Option<u64>,
    pub dump_ms: Option<u64>,
    pub restore_ms: Option<u64>,
    /// The decisive line: CRIU's error, the payload's or the preload's log line.
    pub evidence: String,
}

impl Row {
    pub fn new(
        id: &str,
        attempt: u32,
        technique: &str,
        payload: &str,
        backend: &str,
        criu: &str,
    ) -> Row {
        Row {
            id: id.to_string(),
            attempt,
            technique: technique.to_string(),
            payload: payload.to_string(),
            backend: backend.to_string(),
            criu: criu.to_string(),
            status: Status::Ran,
            stopped: None,
            dumped: None,
            restored: None,
            after_restore: None,
            served_http: None,
            time_to_stop_ms: None,
            dump_ms: None,
            restore_ms: None,
            evidence: String::new(),
        }
    }
}

/// The dash used for "not applicable" in text renderings.
pub const NONE: &str = "—";

pub fn yes_no(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => NONE.into(),
    }
}

pub fn ms(v: Option<u64>) -> String {
    v.map(|m| m.to_string()).unwrap_or_else(|| NONE.into())
}

pub fn after(v: Option<SyscallResult>) -> String {
    v.map(|r| r.render()).unwrap_or_else(|| NONE.into())
}

/// The markdown table's columns, in order (the test reads them back).
pub const MARKDOWN_COLUMNS: &[&str] = &[
    "id",
    "attempt",
    "technique",
    "payload",
    "backend",
    "criu",
    "status",
    "stopped",
    "dumped",
    "restored",
    "listen after restore",
    "http",
    "stop ms",
    "dump ms",
    "restore ms",
    "evidence",
];

fn md_cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

impl Report {
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# miehisto research matrix\n");
        let _ = writeln!(s, "- schema_version: {}", self.schema_version);
        let _ = writeln!(s, "- date: {}", self.date);
        let _ = writeln!(s, "- generated_unix_ms: {}", self.generated_unix_ms);
        let _ = writeln!(s, "- kernel: {}", self.kernel);
        let _ = writeln!(s, "- criu_version: {}", self.criu_version);
        let _ = writeln!(
            s,
            "- criu_patched_version: {}",
            self.criu_patched_version.as_deref().unwrap_or(NONE)
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "| {} |", MARKDOWN_COLUMNS.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(MARKDOWN_COLUMNS.len()));
        for r in &self.rows {
            let cells = [
                r.id.clone(),
                r.attempt.to_string(),
                r.technique.clone(),
                r.payload.clone(),
                r.backend.clone(),
                r.criu.clone(),
                r.status.as_str().to_string(),
                yes_no(r.stopped),
                yes_no(r.dumped),
                yes_no(r.restored),
                after(r.after_restore),
                yes_no(r.served_http),
                ms(r.time_to_stop_ms),
                ms(r.dump_ms),
                ms(r.restore_ms),
                r.evidence.clone(),
            ];
            let cells: Vec<String> = cells.iter().map(|c| md_cell(c)).collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        s
    }

    /// The terminal table: the short columns aligned, the evidence last.
    pub fn to_table(&self) -> String {
        let head = [
            "id",
            "technique",
            "payload",
            "stop",
            "dump",
            "restore",
            "listen after restore",
            "http",
            "stop ms",
            "dump ms",
            "rest. ms",
        ];
        let mut rows: Vec<[String; 11]> = Vec::new();
        for r in &self.rows {
            let id = if self.rows.iter().any(|o| o.attempt > 1) {
                format!("{}#{}", r.id, r.attempt)
            } else {
                r.id.clone()
            };
            let (stop, dump, rest) = match r.status {
                Status::Ran => (yes_no(r.stopped), yes_no(r.dumped), yes_no(r.restored)),
                Status::Skipped => ("skipped".into(), NONE.into(), NONE.into()),
                Status::Error => ("ERROR".into(), NONE.into(), NONE.into()),
            };
            let technique: String = if r.technique.chars().count() > 44 {
                r.technique.chars().take(43).collect::<String>() + "…"
            } else {
                r.technique.clone()
            };
            rows.push([
                id,
                technique,
                r.payload.clone(),
                stop,
                dump,
                rest,
                after(r.after_restore),
                yes_no(r.served_http),
                ms(r.time_to_stop_ms),
                ms(r.dump_ms),
                ms(r.restore_ms),
            ]);
        }
        let mut width = head.map(|h| h.chars().count());
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r.iter()) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let mut l = String::new();
            for (i, (c, w)) in cells.iter().zip(width.iter()).enumerate() {
                let pad = w - c.chars().count();
                if i > 0 {
                    l.push_str("  ");
                }
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            }
            l.trim_end().to_string()
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "miehisto research matrix — {} — kernel {} — CRIU {}{}",
            self.date,
            self.kernel,
            self.criu_version,
            self.criu_patched_version
                .as_ref()
                .map(|v| format!(" (patched: {v})"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "{}", line(&head.map(String::from)));
        for r in &rows {
            let _ = writeln!(s, "{}", line(r));
        }
        let _ = writeln!(s, "\nevidence:");
        for (r, cells) in self.rows.iter().zip(rows.iter()) {
            let _ = writeln!(s, "  {:<w$}  {}", cells[0], r.evidence, w = width[0]);
        }
        s
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time in milliseconds.
pub fn utc_date(unix_ms: u64) -> String {
    // Howard Hinnant's civil_from_days.
    // u64::MAX ms is under 2^38 days: the day count always fits an i64.
    #[allow(clippy::cast_possible_wrap)]
    let z = (unix_ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_cells() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(1_700_000_000_000), "2023-11-14");
        assert_eq!(md_cell("a|b\nc"), "a\\|b c");
        assert_eq!(
            SyscallResult { ret: -1, errno: 38 }.render(),
            "ret=-1 errno=38 (ENOSYS)"
        );
        assert_eq!(SyscallResult { ret: 0, errno: 0 }.render(), "ret=0 errno=0");
    }
}

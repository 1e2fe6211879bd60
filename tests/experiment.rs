//! The research matrix, run for real once: rows 1–6 against what the talk
//! reported, section 7 against what NOTES.md explains, the markdown and
//! JSON reports against each other; and the demo's story.

mod common;

use miehisto::experiment::report::{Report, Row, Status, SCHEMA_VERSION};
use miehisto::experiment::{self, ExperimentArgs, ExperimentError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ENOSYS: i32 = 38;

fn args(state: &Path) -> ExperimentArgs {
    ExperimentArgs {
        only: Vec::new(),
        repeat: 1,
        json: Some(state.join("matrix.json")),
        markdown: Some(state.join("matrix.md")),
        criu_patched: None,
        // The rows that never stop wait this long; the others stop in milliseconds.
        stop_timeout: 3,
        payloads: None,
        examples: None,
        keep: false,
    }
}

/// Processes of this test: a runmh or CRIU working in the state directory,
/// a payload built there, or a payload logging there (stdout is its log),
/// still there after a grace period for those being killed right now.
/// Payloads of other tests running on the machine do not count.
fn leftovers(state: &Path) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let found = leftovers_now(state);
        if found.is_empty() || std::time::Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn leftovers_now(state: &Path) -> Vec<String> {
    let state = state.to_string_lossy().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let exe = std::fs::read_link(e.path().join("exe"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let cmdline = common::read(&e.path().join("cmdline")).replace('\0', " ");
        let stdout = std::fs::read_link(e.path().join("fd/1"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        if exe.starts_with(&state) || cmdline.contains(&state) || stdout.starts_with(&state) {
            let stat = common::read(&e.path().join("stat"));
            found.push(format!(
                "{pid} [{}] ppid {:?} {exe} {cmdline}",
                stat.rsplit_once(')')
                    .map(|(_, r)| r.trim().chars().next().unwrap_or('?'))
                    .unwrap_or('?'),
                common::ppid_of(pid)
            ));
        }
    }
    found
}

fn row<'a>(report: &'a Report, id: &str) -> &'a Row {
    report
        .rows
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no row {id} in the report"))
}

fn ran(r: &Row) {
    assert_eq!(
        r.status,
        Status::Ran,
        "row {} did not run: {}",
        r.id,
        r.evidence
    );
}

/// Stopped, dumped and restored; what the payload's listen then returned.
fn restored_listen(r: &Row) -> (i64, i32) {
    ran(r);
    assert_eq!(
        (r.stopped, r.dumped, r.restored),
        (Some(true), Some(true), Some(true)),
        "row {}: {}",
        r.id,
        r.evidence
    );
    let l = r
        .after_restore
        .unwrap_or_else(|| panic!("row {}: no listen line: {}", r.id, r.evidence));
    (l.ret, l.errno)
}

/// Stopped, dumped, restored, listen succeeded and the server answered.
fn works(r: &Row) {
    assert_eq!(restored_listen(r), (0, 0), "row {}: {}", r.id, r.evidence);
    assert_eq!(r.served_http, Some(true), "row {}: {}", r.id, r.evidence);
    assert!(
        r.time_to_stop_ms.is_some() && r.dump_ms.is_some() && r.restore_ms.is_some(),
        "row {}: timings",
        r.id
    );
}

/// Dumped and restored, and the application's listen failed with ENOSYS.
fn enosys(r: &Row) {
    assert_eq!(
        restored_listen(r),
        (-1, ENOSYS),
        "row {}: {}",
        r.id,
        r.evidence
    );
    assert!(
        r.evidence.contains("listen ret=-1 errno=38"),
        "row {}: the payload's own line: {}",
        r.id,
        r.evidence
    );
}

/// The target went past listen without stopping: nothing dumped.
fn no_stop(r: &Row) {
    ran(r);
    assert_eq!(r.stopped, Some(false), "row {}: {}", r.id, r.evidence);
    assert_eq!(
        (r.dumped, r.restored, r.after_restore),
        (None, None, None),
        "row {}",
        r.id
    );
    assert!(
        r.evidence.contains("listen ret=0 errno=0"),
        "row {}: the payload says it listened: {}",
        r.id,
        r.evidence
    );
}

/// Splits a markdown table row on unescaped `|` and undoes the escapes.
fn md_cells(line: &str) -> Vec<String> {
    let inner = line
        .trim()
        .strip_prefix('|')
        .and_then(|l| l.strip_suffix('|'))
        .expect("a table row");
    let mut cells = vec![String::new()];
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cells.last_mut().unwrap().push(n);
                }
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

fn md_bool(cell: &str) -> Option<bool> {
    match cell {
        "yes" => Some(true),
        "no" => Some(false),
        "—" => None,
        other => panic!("not yes/no/—: {other:?}"),
    }
}

fn md_num(cell: &str) -> Option<u64> {
    if cell == "—" {
        None
    } else {
        Some(
            cell.parse()
                .unwrap_or_else(|_| panic!("not a number: {cell:?}")),
        )
    }
}

/// `ret=R errno=E` (optionally followed by the errno's name) or `—`.
fn md_listen(cell: &str) -> Option<(i64, i32)> {
    if cell == "—" {
        return None;
    }
    let mut it = cell.split_whitespace();
    let ret = it.next()?.strip_prefix("ret=")?.parse().ok()?;
    let errno = it.next()?.strip_prefix("errno=")?.parse().ok()?;
    Some((ret, errno))
}

/// Reads the markdown report back and checks it against the JSON one.
fn markdown_matches_json(md: &str, report: &Report) {
    let header: BTreeMap<String, String> = md
        .lines()
        .filter_map(|l| {
            l.strip_prefix("- ")?
                .split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(header["schema_version"], report.schema_version.to_string());
    assert_eq!(header["date"], report.date);
    assert_eq!(
        header["generated_unix_ms"],
        report.generated_unix_ms.to_string()
    );
    assert_eq!(header["kernel"], report.kernel);
    assert_eq!(header["criu_version"], report.criu_version);
    assert_eq!(
        header["criu_patched_version"],
        report
            .criu_patched_version
            .clone()
            .unwrap_or_else(|| "—".into())
    );
    let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert!(table.len() >= 2, "a table with a header and a separator");
    let columns = md_cells(table[0]);
    assert_eq!(columns.len(), 16, "{columns:?}");
    let rows: Vec<Vec<String>> = table[2..].iter().map(|l| md_cells(l)).collect();
    assert_eq!(rows.len(), report.rows.len(), "same number of rows");
    for (cells, r) in rows.iter().zip(&report.rows) {
        assert_eq!(cells.len(), columns.len(), "row {}: {cells:?}", r.id);
        let status = match r.status {
            Status::Ran => "ran",
            Status::Skipped => "skipped",
            Status::Error => "error",
        };
        assert_eq!(cells[0], r.id);
        assert_eq!(cells[1], r.attempt.to_string());
        assert_eq!(cells[2], r.technique);
        assert_eq!(cells[3], r.payload);
        assert_eq!(cells[4], r.backend);
        assert_eq!(cells[5], r.criu);
        assert_eq!(cells[6], status);
        assert_eq!(md_bool(&cells[7]), r.stopped, "row {} stopped", r.id);
        assert_eq!(md_bool(&cells[8]), r.dumped, "row {} dumped", r.id);
        assert_eq!(md_bool(&cells[9]), r.restored, "row {} restored", r.id);
        assert_eq!(
            md_listen(&cells[10]),
            r.after_restore.map(|l| (l.ret, l.errno)),
            "row {} listen",
            r.id
        );
        assert_eq!(md_bool(&cells[11]), r.served_http, "row {} http", r.id);
        assert_eq!(
            md_num(&cells[12]),
            r.time_to_stop_ms,
            "row {} stop ms",
            r.id
        );
        assert_eq!(md_num(&cells[13]), r.dump_ms, "row {} dump ms", r.id);
        assert_eq!(md_num(&cells[14]), r.restore_ms, "row {} restore ms", r.id);
        assert_eq!(cells[15], r.evidence, "row {} evidence", r.id);
    }
}

#[test]
fn matrix_matches_the_talk_and_the_notes() {
    let Some(_g) = common::privileged("matrix_matches_the_talk_and_the_notes") else {
        return;
    };
    let state = common::temp_dir("experiment");
    let a = args(&state);
    let code =
        experiment::cli(&a, common::criu_path().as_deref(), &state).expect("the matrix runs");

    let json = std::fs::read_to_string(state.join("matrix.json")).expect("JSON report written");
    let report: Report = serde_json::from_str(&json).expect("JSON report parses");
    let value: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(value["schema_version"], serde_json::json!(SCHEMA_VERSION));
    for r in &report.rows {
        assert_ne!(
            r.status,
            Status::Error,
            "row {}: the harness failed: {}",
            r.id,
            r.evidence
        );
    }
    assert_eq!(code, 0, "exit code with no harness errors");

    // The talk's results.
    let r1 = row(&report, "1");
    ran(r1);
    assert_eq!(
        (r1.stopped, r1.dumped, r1.restored),
        (Some(true), Some(false), None),
        "row 1: {}",
        r1.evidence
    );
    assert!(
        r1.evidence.contains("Error ("),
        "row 1's evidence is CRIU's log line: {}",
        r1.evidence
    );
    enosys(row(&report, "2"));
    works(row(&report, "3"));
    enosys(row(&report, "4"));
    let r5 = row(&report, "5");
    works(r5);
    assert!(
        r5.evidence.contains("marker") && r5.evidence.contains("ret=-1 errno=38"),
        "row 5: the marker's ENOSYS, ignored: {}",
        r5.evidence
    );
    let r6 = row(&report, "6");
    no_stop(r6);
    assert!(
        r6.evidence.contains("sigstop sig=19"),
        "row 6: the wrapper did send SIGSTOP: {}",
        r6.evidence
    );

    // The open questions, as NOTES.md answers them.
    for id in [
        "7-threaded-trace",
        "7-threaded-notify",
        "7-direct-trace",
        "7-static-trace",
    ] {
        works(row(&report, id));
    }
    for id in ["7-direct-notify", "7-static-notify"] {
        no_stop(row(&report, id));
    }
    let (go_trace, go_notify) = (row(&report, "7-go-trace"), row(&report, "7-go-notify"));
    if go_trace.status == Status::Skipped {
        assert_eq!(go_notify.status, Status::Skipped);
        assert!(
            go_trace.evidence.contains("go"),
            "the skip says why: {}",
            go_trace.evidence
        );
        eprintln!("note: Go rows skipped: {}", go_trace.evidence);
    } else {
        works(go_trace);
        no_stop(go_notify);
    }

    let md = std::fs::read_to_string(state.join("matrix.md")).expect("markdown report written");
    markdown_matches_json(&md, &report);

    // Nothing left behind: no process, no mount, no instance, no scratch.
    let left = leftovers(&state);
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(
        common::mounts_under(&state).is_empty(),
        "mounts left: {:?}",
        common::mounts_under(&state)
    );
    let instances: Vec<PathBuf> = std::fs::read_dir(state.join("instances"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(instances.is_empty(), "instances left: {instances:?}");
    assert!(
        !state.join("experiments").exists(),
        "the matrix's scratch directory was removed"
    );
    std::fs::remove_dir_all(&state).expect("remove the state dir");
}

#[test]
fn unknown_scenario_ids_and_bad_counts_are_refused() {
    let Some(_g) = common::privileged("unknown_scenario_ids_and_bad_counts_are_refused") else {
        return;
    };
    let state = common::temp_dir("experiment-bad");
    let mut a = args(&state);
    a.only = vec!["3".into(), "8-nothing".into()];
    let e = experiment::cli(&a, common::criu_path().as_deref(), &state).expect_err("unknown id");
    assert!(
        matches!(&e, ExperimentError::UnknownId { id, .. } if id == "8-nothing"),
        "{e}"
    );
    assert!(
        e.to_string().contains("7-threaded-trace"),
        "the message lists the ids: {e}"
    );
    a.only = vec!["3".into()];
    a.repeat = 0;
    let e = experiment::cli(&a, common::criu_path().as_deref(), &state).expect_err("repeat 0");
    assert!(matches!(e, ExperimentError::BadRepeat), "{e}");
    a.repeat = 1;
    a.json = Some(state.join("missing-dir").join("matrix.json"));
    let e = experiment::cli(&a, common::criu_path().as_deref(), &state)
        .expect_err("report directory missing");
    assert!(matches!(e, ExperimentError::ReportDir { .. }), "{e}");
    assert!(
        !state.join("matrix.json").exists() && !state.join("matrix.md").exists(),
        "no report on bad input"
    );
    std::fs::remove_dir_all(&state).expect("remove the state dir");
}

#[test]
fn demo_tells_the_story_with_both_backends() {
    let Some(_g) = common::privileged("demo_tells_the_story_with_both_backends") else {
        return;
    };
    for backend in [
        miehisto::demo::DemoBackend::Trace,
        miehisto::demo::DemoBackend::Notify,
    ] {
        let state = common::temp_dir("demo");
        let a = miehisto::demo::DemoArgs {
            backend,
            python: Some(common::python()),
            script: Some(common::python_payload()),
            port: Some(common::free_port()),
        };
        let s = miehisto::demo::run_story(&a, common::criu_path().as_deref(), &state, false)
            .expect("the demo runs");
        let f = s
            .without_fix
            .expect("the failure step reports the payload's listen");
        assert_eq!(
            (f.ret, f.errno),
            (-1, ENOSYS),
            "{backend:?}: the talk's ENOSYS"
        );
        assert!(
            s.restore_to_answer_ms.iter().all(|&ms| ms > 0),
            "{backend:?}: both restores answered HTTP: {s:?}"
        );
        assert!(s.cold_boot_ms > 0, "{backend:?}: the cold boot answered");
        let left = leftovers(&state);
        assert!(left.is_empty(), "{backend:?}: processes left: {left:?}");
        assert!(common::mounts_under(&state).is_empty());
        let left: Vec<PathBuf> = std::fs::read_dir(&state)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("demo-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "the demo's scratch was removed: {left:?}");
        std::fs::remove_dir_all(&state).expect("remove the state dir");
    }
}

/// The patched CRIU of seize-patch/ (built by `seize-patch/build.sh`;
/// `.deps/criu-patched/env.sh` exports the path). Required in CI.
fn patched_criu() -> Option<PathBuf> {
    std::env::var_os("MIEHISTO_CRIU_PATCHED")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/criu-patched/sbin/criu");
            p.is_file().then_some(p)
        })
}

#[test]
fn patched_criu_rows_show_the_handoff_and_the_neutralized_restore() {
    let Some(_g) = common::privileged("patched_criu_rows") else {
        return;
    };
    let Some(patched) = patched_criu() else {
        common::require(
            "patched_criu_rows",
            Some("the patched CRIU (bash seize-patch/build.sh)".into()),
        );
        return;
    };
    let state = common::temp_dir("experiment-patched");
    let mut a = args(&state);
    a.criu_patched = Some(patched);
    // Row 1 and its patched twin (the patched binary without the new
    // options behaves like stock CRIU), and the rows that use the options.
    a.only = vec!["1".into(), "8".into()];
    let code =
        experiment::cli(&a, common::criu_path().as_deref(), &state).expect("the matrix runs");
    let report: Report = serde_json::from_str(
        &std::fs::read_to_string(state.join("matrix.json")).expect("JSON report"),
    )
    .expect("JSON parses");
    for r in &report.rows {
        assert_ne!(
            r.status,
            Status::Error,
            "row {}: the harness failed: {}",
            r.id,
            r.evidence
        );
    }
    assert_eq!(code, 0);
    // Without the hand-off the 2018 flow still cannot dump, stock or patched.
    for id in ["1", "1-patched"] {
        let r = row(&report, id);
        ran(r);
        assert_eq!(r.dumped, Some(false), "row {id}: {}", r.evidence);
    }
    // With the hand-off it dumps, and the image restores into a serving process.
    let h = row(&report, "8-handoff");
    ran(h);
    assert_eq!(
        (h.stopped, h.dumped, h.restored),
        (Some(true), Some(true), Some(true)),
        "8-handoff: {}",
        h.evidence
    );
    assert_eq!(h.served_http, Some(true), "8-handoff: {}", h.evidence);
    // Trap actions neutralized on restore: no tracer, no marker, no ENOSYS.
    for id in ["8-neutralize-trace", "8-neutralize-notify"] {
        let r = row(&report, id);
        works(r);
        assert!(
            r.evidence.contains("TracerPid 0"),
            "row {id} runs without a supervisor: {}",
            r.evidence
        );
        assert!(
            r.evidence.contains("neutralized"),
            "row {id}: {}",
            r.evidence
        );
    }
    assert!(
        leftovers(&state).is_empty(),
        "leftovers: {:?}",
        leftovers(&state)
    );
    let _ = std::fs::remove_dir_all(&state);
}

//! Reading CRIU's logs: the decisive error line of a failed run.

use std::path::Path;

/// Error lines CRIU prints on this machine that do not mean failure
/// (platform.md: the RLIMIT_NOFILE one appears on every run).
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

/// The first error line that matters, without CRIU's timestamp prefix.
/// CRIU's log lines look like `(00.012345) Error (criu/files-reg.c:12): msg`.
pub fn decisive_line(text: &str) -> Option<String> {
    let is_err = |l: &str| l.contains("Error (") || l.starts_with("Error") || l.contains("] Error");
    let strip = |l: &str| -> String {
        let l = l.trim();
        let l = if l.starts_with('(') { l.split_once(')').map(|(_, r)| r.trim()).unwrap_or(l) } else { l };
        l.to_string()
    };
    let errors: Vec<String> =
        text.lines().filter(|l| is_err(l) && !HARMLESS.iter().any(|h| l.contains(h))).map(strip).collect();
    // The first error is usually the cause; later ones ("Dumping FAILED")
    // only summarise it.
    errors.into_iter().next().or_else(|| {
        text.lines().rev().find(|l| l.contains("FAILED") || l.contains("failed")).map(strip)
    })
}

/// Reads a CRIU log file and finds its decisive line.
pub fn decisive_line_of(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => decisive_line(&String::from_utf8_lossy(&bytes))
            .unwrap_or_else(|| "no error line in the log".to_string()),
        Err(e) => format!("no log ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_real_error() {
        let log = "\
(00.000011) Version: 4.2.1
(00.000100) Error (criu/cr-dump.c:10): rlimit: Can't setup RLIMIT_NOFILE for self
(00.010000) Warn  (compel/src/lib/infect.c:123): Unable to interrupt task: 7 (Operation not permitted)
(00.010100) Error (criu/seize.c:45): Can't seize 7
(00.020000) Error (criu/cr-dump.c:2000): Dumping FAILED.
";
        assert_eq!(decisive_line(log).unwrap(), "Error (criu/seize.c:45): Can't seize 7");
        assert_eq!(decisive_line("(00.1) Dumping finished successfully"), None);
    }
}

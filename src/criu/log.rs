//! Reading CRIU's logs: the decisive error line of a failed run.

use std::path::Path;

/// Error lines CRIU prints that do not mean failure: on some hosts it
/// cannot raise its own open-file limit and logs "Can't setup
/// RLIMIT_NOFILE for self" as an Error on every run, then carries on.
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

/// The first error line that matters, without CRIU's timestamp prefix,
/// preceded by the warning that explains it when one comes just before:
/// compel reports a refused `PTRACE_SEIZE` as a warning ("Unable to
/// interrupt task ... Operation not permitted"), and the error that follows
/// ("Unable to detach") is only its consequence.
/// CRIU's log lines look like `(00.012345) Error (criu/files-reg.c:12): msg`.
pub fn decisive_line(text: &str) -> Option<String> {
    let is_err = |l: &str| l.contains("Error (") || l.starts_with("Error") || l.contains("] Error");
    let strip = |l: &str| -> String {
        let l = l.trim();
        let l = if l.starts_with('(') {
            l.split_once(')').map(|(_, r)| r.trim()).unwrap_or(l)
        } else {
            l
        };
        l.to_string()
    };
    let lines: Vec<&str> = text.lines().collect();
    // The first error is usually the cause; later ones ("Dumping FAILED")
    // only summarise it.
    let first = lines
        .iter()
        .position(|l| is_err(l) && !HARMLESS.iter().any(|h| l.contains(h)));
    match first {
        Some(at) => {
            let error = strip(lines[at]);
            let warn = lines[at.saturating_sub(5)..at]
                .iter()
                .rev()
                .map(|l| strip(l))
                .find(|l| l.starts_with("Warn"));
            Some(match warn {
                Some(w) => format!("{w} → {error}"),
                None => error,
            })
        }
        None => lines
            .iter()
            .rev()
            .find(|l| l.contains("FAILED") || l.contains("failed"))
            .map(|l| strip(l)),
    }
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
        assert_eq!(
            decisive_line(log).unwrap(),
            "Warn  (compel/src/lib/infect.c:123): Unable to interrupt task: 7 (Operation not permitted) → Error (criu/seize.c:45): Can't seize 7"
        );
        assert_eq!(
            decisive_line("(00.1) Error (a.c:1): alone\n").unwrap(),
            "Error (a.c:1): alone"
        );
        assert_eq!(decisive_line("(00.1) Dumping finished successfully"), None);
    }
}

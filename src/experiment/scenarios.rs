//! The matrix's scenarios: the talk's experiments (rows 1–6) and its open
//! questions (section 7), each a recipe of payload, backend and research
//! switches. A scenario says what to do, never what should happen: the
//! outcome is whatever the kernel and CRIU do when it runs.

use crate::prebake::Research;
use crate::stop::BackendChoice;

/// Which program a scenario stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// `examples/simple_server.c`: single thread, libc `listen`.
    Simple,
    /// `examples/threaded_server.c`: 4 threads before `listen`.
    Threaded,
    /// `examples/direct_syscall_server.c`: `syscall(SYS_listen, ...)`.
    DirectSyscall,
    /// `simple_server` linked `-static`: LD_PRELOAD has no effect.
    Static,
    /// `examples/go`: Go's runtime issues raw syscalls, several threads.
    Go,
}

impl Payload {
    pub fn name(self) -> &'static str {
        match self {
            Payload::Simple => "simple_server",
            Payload::Threaded => "threaded_server",
            Payload::DirectSyscall => "direct_syscall_server",
            Payload::Static => "simple_server_static",
            Payload::Go => "go/server",
        }
    }
}

/// Which CRIU runs a scenario's dump and restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CriuChoice {
    /// The CRIU found by `--criu`, `MIEHISTO_CRIU`, the set-up step or PATH.
    Stock,
    /// `--criu-patched` (seize-patch/).
    Patched,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub id: String,
    /// One line for the table: how the process is stopped and resumed.
    pub technique: String,
    /// For `--explain`: what the scenario exercises, at kernel level.
    pub story: &'static str,
    pub payload: Payload,
    pub backend: BackendChoice,
    pub research: Research,
    /// TRACE images: re-seize after the restore.
    pub reseize: bool,
    pub criu: CriuChoice,
}

fn base(id: &str, technique: &str, story: &'static str, backend: BackendChoice) -> Scenario {
    Scenario {
        id: id.to_string(),
        technique: technique.to_string(),
        story,
        payload: Payload::Simple,
        backend,
        research: Research::default(),
        reseize: true,
        criu: CriuChoice::Stock,
    }
}

/// Every scenario, in table order. `patched` adds a twin of rows 1–6 run
/// with the patched CRIU, so that the two can be read side by side.
pub fn all(patched: bool) -> Vec<Scenario> {
    use BackendChoice::{Notify, Trace};
    let mut v = vec![
        Scenario {
            research: Research { legacy_attached: true, ..Research::default() },
            ..base(
                "1",
                "TRACE, tracer PTRACE_ATTACHed and holding the task while CRIU dumps (2018)",
                "the 2018 tracer: PTRACE_ATTACH, SECCOMP_RET_TRACE on listen, and the task kept in its seccomp ptrace-stop while CRIU tries its own PTRACE_SEIZE",
                Trace,
            )
        },
        Scenario {
            reseize: false,
            ..base(
                "2",
                "TRACE seize + rewind + detach; restored, resumed with plain SIGCONT",
                "PTRACE_SEIZE, rewind the trapped listen, group-stop, detach, dump; after the restore nobody is attached and the restored filter still says SECCOMP_RET_TRACE for listen",
                Trace,
            )
        },
        base(
            "3",
            "TRACE seize + rewind + detach; re-seized after restore",
            "as 2, but the restored tasks are PTRACE_SEIZEd with PTRACE_O_TRACESECCOMP before SIGCONT, so the replayed listen finds a tracer that lets it run",
            Trace,
        ),
        Scenario {
            research: Research { notify_direct: true, ..Research::default() },
            ..base(
                "4",
                "NOTIFY (SECCOMP_RET_USER_NOTIF) directly on listen",
                "the filter hands listen itself to a user-space listener; the task blocks inside the kernel (seccomp_do_user_notification); CRIU restores the filter but never a listener",
                Notify,
            )
        },
        base(
            "5",
            "NOTIFY on the marker kill(self, SIGRTMAX) from the LD_PRELOAD wrapper",
            "only kill(*, SIGRTMAX) is trapped; the LD_PRELOAD wrapper of listen ignores SIGRTMAX and sends it to itself right before the real listen",
            Notify,
        ),
        Scenario {
            research: Research { preload_sigstop: true, ..Research::default() },
            ..base(
                "6",
                "LD_PRELOAD wrapper raises SIGSTOP on itself (PID 1 of its namespace)",
                "the wrapper sends SIGSTOP to its own pid; the target is PID 1 of a fresh PID namespace, and the kernel drops signals a namespace init has no handler for unless they come from an ancestor namespace",
                Notify,
            )
        },
    ];
    if patched {
        let twins: Vec<Scenario> = v
            .iter()
            .map(|s| Scenario {
                id: format!("{}-patched", s.id),
                technique: format!("{} [patched CRIU]", s.technique),
                criu: CriuChoice::Patched,
                ..s.clone()
            })
            .collect();
        v.extend(twins);
    }
    let questions: [(&str, Payload, &str, &'static str); 4] = [
        (
            "threaded",
            Payload::Threaded,
            "multi-threaded target (4 threads before listen)",
            "a multi-threaded target: the stop must hold every thread, not just the one that calls listen",
        ),
        (
            "direct",
            Payload::DirectSyscall,
            "target calls syscall(SYS_listen) directly, bypassing libc",
            "a direct syscall(2): no libc listen symbol is called, so an LD_PRELOAD wrapper never runs",
        ),
        (
            "static",
            Payload::Static,
            "statically linked target (LD_PRELOAD has no effect)",
            "a static binary: the dynamic loader never runs, so LD_PRELOAD is never honoured",
        ),
        (
            "go",
            Payload::Go,
            "Go program (raw syscalls, no libc listen, runtime threads)",
            "a Go program: the Go runtime issues its own raw syscalls and runs several threads before main",
        ),
    ];
    for (tag, payload, what, story) in questions {
        for (backend, how) in [(Trace, "TRACE (re-seize)"), (Notify, "NOTIFY (marker)")] {
            v.push(Scenario {
                payload,
                ..base(
                    &format!("7-{tag}-{}", backend.as_str()),
                    &format!("{how}: {what}"),
                    story,
                    backend,
                )
            });
        }
    }
    v
}

/// Does `wanted` (an `--only` value) select scenario `id`? An id selects
/// itself and the rows below it: `7` selects every `7-...`, `7-go` both
/// Go rows, `1` also `1-patched`.
pub fn selects(wanted: &str, id: &str) -> bool {
    id == wanted
        || id
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.starts_with('-'))
}

/// The scenarios `only` selects (all when empty), in table order; the
/// first value that selects nothing is returned as the error.
pub fn select(all: Vec<Scenario>, only: &[String]) -> Result<Vec<Scenario>, String> {
    for w in only {
        if !all.iter().any(|s| selects(w, &s.id)) {
            return Err(w.clone());
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|w| selects(w, &s.id)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_selection_follows_the_prefix_rule() {
        let v = all(true);
        let mut ids: Vec<&str> = v.iter().map(|s| s.id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), v.len());
        let pick = |only: &[&str]| -> Vec<String> {
            select(
                all(true),
                &only.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect()
        };
        assert_eq!(pick(&["1"]), vec!["1", "1-patched"]);
        assert_eq!(pick(&["7-go"]), vec!["7-go-trace", "7-go-notify"]);
        assert_eq!(
            pick(&["7-threaded-trace", "2"]),
            vec!["2", "2-patched", "7-threaded-trace"]
        );
        assert_eq!(pick(&["7"]).len(), 8);
        assert!(!selects("1", "10"));
        assert_eq!(select(all(false), &["9".to_string()]).unwrap_err(), "9");
        assert_eq!(all(false).len(), 14);
    }
}

//! Signal numbers as people write them.

use crossbeam_channel::Receiver;
use nix::libc;
use std::time::Duration;

/// `SIGTERM`, `SIGRTMAX-4`, `SIGRTMIN+1`, or `signal N` for a number
/// that is none of them. Real-time signals are named from the end they are
/// nearer to, as `--marker-signal` accepts them.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| {
            let (min, max) = (super::sigrtmin(), super::sigrtmax());
            if sig >= min && sig <= max {
                match max - sig {
                    0 => "SIGRTMAX".to_string(),
                    d if d <= 8 => format!("SIGRTMAX-{d}"),
                    _ => format!("SIGRTMIN+{}", sig - min),
                }
            } else {
                format!("signal {sig}")
            }
        })
}

/// The signals whose default action is to stop the process (signal(7)):
/// a ptrace group-stop reports one of them.
pub fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// Gives SIGPIPE its default action back. Rust starts every program with
/// SIGPIPE ignored, so a write to a closed pipe returns EPIPE and
/// `println!` panics (`mhctl image list | head`); a command-line tool that
/// prints should end quietly instead, as every Unix filter does.
pub fn default_sigpipe() {
    // SAFETY: installing SIG_DFL for SIGPIPE touches no memory of ours and
    // is done once at start-up, before any thread that writes to a pipe.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

static SIGNALS: std::sync::OnceLock<Receiver<i32>> = std::sync::OnceLock::new();

/// The signals a supervisor reacts to (SIGTERM, SIGINT, SIGHUP, SIGQUIT),
/// as a channel fed by one process-wide thread. They must be blocked in
/// every thread (the tracer module blocks them in `block_supervisor_signals`).
pub fn signals() -> Receiver<i32> {
    SIGNALS
        .get_or_init(|| {
            let (tx, rx) = crossbeam_channel::unbounded();
            // If the thread cannot start, no signal is ever forwarded; the
            // blocked signals then stay pending, which is the safe failure.
            let _ = spawn_signal_thread(tx);
            rx
        })
        .clone()
}

fn spawn_signal_thread(tx: crossbeam_channel::Sender<i32>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match super::sigtimedwait(
                &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT],
                Duration::from_secs(1),
            ) {
                Ok(Some(sig)) => {
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_read_as_people_write_them() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(super::super::sigrtmax()), "SIGRTMAX");
        assert_eq!(signal_name(super::super::sigrtmax() - 4), "SIGRTMAX-4");
        assert_eq!(signal_name(super::super::sigrtmin() + 1), "SIGRTMIN+1");
        assert_eq!(signal_name(200), "signal 200");
        assert!(is_stop_signal(libc::SIGTSTP));
        assert!(!is_stop_signal(libc::SIGCONT));
    }
}

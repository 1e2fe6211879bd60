//! Signal numbers as people write them.

use nix::libc;

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

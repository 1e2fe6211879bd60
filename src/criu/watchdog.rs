//! Bounds on a CRIU run. CRIU trusts its images and its peers: a damaged
//! image once made its restorer retry a zero-length `preadv` forever,
//! logging every try (39 GB of log in ten minutes, one core busy). A
//! watchdog thread beside every CRIU run ends it when it takes too long,
//! when its log grows past a limit, or when the caller is asked to stop
//! (SIGTERM and friends, when the caller has blocked them for
//! [`crate::sys::signal::signals`]); ending means SIGKILL for CRIU and every
//! process below it (the tasks it is dumping or restoring), stopped first
//! so that none forks away meanwhile. A restored root is the caller's
//! child (`--restore-sibling`), not CRIU's: the caller ends it by the
//! instance's cgroup.

use crossbeam_channel::{Receiver, Sender};
use nix::libc;
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variables that override [`Limits::default`].
pub const TIMEOUT_ENV: &str = "MIEHISTO_CRIU_TIMEOUT_SECS";
pub const LOG_LIMIT_ENV: &str = "MIEHISTO_CRIU_LOG_MAX_BYTES";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest a CRIU run may take.
    pub time: Duration,
    /// The largest its log may grow (a `-v4` restore log is ~1 MiB).
    pub log_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            time: Duration::from_secs(300),
            log_bytes: 256 << 20,
        }
    }
}

impl Limits {
    /// The defaults, overridden by [`TIMEOUT_ENV`] and [`LOG_LIMIT_ENV`];
    /// a value that does not parse is an error naming the variable.
    pub fn from_env() -> Result<Limits, String> {
        let mut l = Limits::default();
        let num = |name: &str| -> Result<Option<u64>, String> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name}={v:?} is not a whole number")),
                Err(_) => Ok(None),
            }
        };
        if let Some(s) = num(TIMEOUT_ENV)? {
            l.time = Duration::from_secs(s);
        }
        if let Some(b) = num(LOG_LIMIT_ENV)? {
            l.log_bytes = b;
        }
        Ok(l)
    }
}

/// Why the watchdog ended a CRIU run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    TimedOut(Duration),
    LogTooLarge {
        log: PathBuf,
        bytes: u64,
        limit: u64,
    },
    Signal(i32),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::TimedOut(t) => write!(
                f,
                "it ran longer than {}s (raise {TIMEOUT_ENV} if that is too short)",
                t.as_secs()
            ),
            Ending::LogTooLarge { log, bytes, limit } => write!(
                f,
                "its log {} grew to {bytes} bytes, over the {limit}-byte limit (raise {LOG_LIMIT_ENV} if that is too small)",
                log.display()
            ),
            Ending::Signal(s) => write!(f, "{} was received", crate::sys::signal::signal_name(*s)),
        }
    }
}

/// A running watchdog; [`Watchdog::finish`] stops it.
pub struct Watchdog {
    done: Option<Sender<()>>,
    handle: Option<std::thread::JoinHandle<Option<Ending>>>,
}

const TICK: Duration = Duration::from_millis(50);

/// Whether this thread has SIGTERM blocked, i.e. the process routes its
/// termination signals to [`crate::sys::signal::signals`].
fn routes_signals() -> bool {
    nix::sys::signal::SigSet::thread_get_mask()
        .map(|m| m.contains(nix::sys::signal::Signal::SIGTERM))
        .unwrap_or(false)
}

/// Watches the CRIU process `pid` (and its log at `log`).
pub fn watch(pid: Pid, log: &Path, limits: Limits) -> Watchdog {
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    let signals: Receiver<i32> = if routes_signals() {
        crate::sys::signal::signals()
    } else {
        crossbeam_channel::never()
    };
    let log = log.to_path_buf();
    let t0 = Instant::now();
    let handle = std::thread::Builder::new()
        .name("criu-watchdog".into())
        .spawn(move || loop {
            let ending = crossbeam_channel::select! {
                recv(done_rx) -> _ => return None,
                recv(signals) -> s => match s {
                    Ok(s) => Some(Ending::Signal(s)),
                    Err(_) => None,
                },
                default(TICK) => {
                    let bytes = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
                    if bytes > limits.log_bytes {
                        Some(Ending::LogTooLarge { log: log.clone(), bytes, limit: limits.log_bytes })
                    } else if t0.elapsed() > limits.time {
                        Some(Ending::TimedOut(limits.time))
                    } else {
                        None
                    }
                },
            };
            if let Some(e) = ending {
                log::warn!("ending CRIU (pid {pid}) and everything below it: {e}");
                kill_tree(pid.as_raw());
                return Some(e);
            }
        });
    match handle {
        Ok(h) => Watchdog {
            done: Some(done_tx),
            handle: Some(h),
        },
        Err(e) => {
            // Without the thread the run is unbounded, as before: say so.
            log::warn!("cannot start the CRIU watchdog: {e}; this CRIU run is not bounded");
            Watchdog {
                done: None,
                handle: None,
            }
        }
    }
}

impl Watchdog {
    /// Stops watching; says why the run was ended, if the watchdog ended it.
    pub fn finish(mut self) -> Option<Ending> {
        drop(self.done.take());
        self.handle.take().and_then(|h| h.join().ok().flatten())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The children of `pid` (every thread's), from /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in rd.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// `pid` and all its descendants.
pub fn tree_of(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        for c in children_of(all[i]) {
            if !all.contains(&c) {
                all.push(c);
            }
        }
        i += 1;
    }
    all
}

/// SIGKILL for `pid` and every descendant: all are stopped first (a
/// stopped task cannot fork), until a pass finds no new one.
pub fn kill_tree(pid: i32) {
    let mut seen: Vec<i32> = Vec::new();
    for _ in 0..50 {
        let now = tree_of(pid);
        let new: Vec<i32> = now.iter().copied().filter(|p| !seen.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        for p in &new {
            let _ = crate::sys::kill(Pid::from_raw(*p), libc::SIGSTOP);
        }
        seen.extend(new);
    }
    for p in &seen {
        let _ = crate::sys::kill(Pid::from_raw(*p), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_generous() {
        assert_eq!(Limits::default().time, Duration::from_secs(300));
        assert!(Limits::default().log_bytes >= 64 << 20);
    }

    #[test]
    fn a_log_over_its_limit_ends_the_whole_tree() {
        let dir = std::env::temp_dir().join(format!("mh-wd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("restore.log");
        // A shell that forks a sleeper, then writes its log without end.
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "sleep 1000 & while :; do echo 'Preadv returned 0' >> {}; done",
                log.display()
            ))
            .spawn()
            .unwrap();
        let pid = crate::sys::child_pid(&child);
        let t0 = Instant::now();
        // Wait for the sleeper so that the tree has two levels.
        while tree_of(pid.as_raw()).len() < 2 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let tree = tree_of(pid.as_raw());
        let wd = watch(
            pid,
            &log,
            Limits {
                time: Duration::from_secs(30),
                log_bytes: 10_000,
            },
        );
        let st = child.wait().unwrap();
        let ending = wd.finish();
        assert!(
            matches!(ending, Some(Ending::LogTooLarge { .. })),
            "{ending:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
        // The sleeper is gone too (reaped by init, or a zombie at most).
        // SIGKILL takes effect when the task next runs: allow a moment.
        for p in &tree[1..] {
            let gone = || {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("");
                state.is_empty() || state == "Z" || state == "X"
            };
            let t1 = Instant::now();
            while !gone() && t1.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(gone(), "{p} survived");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Phase stamps of one restore, for `mhctl bench`'s breakdown: the
//! `runmh restore` process (and its threads) appends `name nanoseconds`
//! lines to one file, on CLOCK_MONOTONIC, which every process on the
//! machine shares, so its stamps and the benchmark's own compare directly.
//!
//! CRIU writes nothing of the kind; its log carries times relative to the
//! moment it opened the log (`log_init()` calls gettimeofday() right before
//! open(O_CREAT)). An inotify watch on the log's directory turns that open
//! into an absolute stamp, [`CRIU_LOG`], which anchors the log's own
//! timestamps. Stamping is off unless asked for: nothing here runs on a
//! normal restore.

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::time::{clock_gettime, ClockId};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The front process is about to fork the child that execs CRIU.
pub const CRIU_EXEC: &str = "criu_exec";
/// CRIU created its log file (its log's time zero).
pub const CRIU_LOG: &str = "criu_log";
/// The front process reaped CRIU (which exits once the tree is restored).
pub const CRIU_EXITED: &str = "criu_exited";
/// The tracer thread watches the restored root.
pub const TRACER_READY: &str = "tracer_ready";
/// The restored tree runs again (TRACE: re-seized and continued).
pub const RESUMED: &str = "resumed";
/// The front process has the tree running under its supervision.
pub const READY: &str = "ready";
/// TRACE: the tracer let the restored tree's replayed trapped syscall run
/// (its PTRACE_CONT); splits "ready -> port accepts" into the tracer's
/// share (the seize, SIGCONT and trap stops) and the service's.
pub const TRAP_PASSED: &str = "trap_passed";

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail for a valid clock id; 0 would only make
    // every phase of this run show as missing.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| u64::try_from(std::time::Duration::from(t).as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum TimingsError {
    #[error("cannot read the restore's timings from {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed timing line {line:?} in {path}: expected `name nanoseconds`")]
    Malformed { path: PathBuf, line: String },
}

/// Where a process appends its stamps (or nowhere).
#[derive(Debug, Clone, Default)]
pub struct Stamps {
    path: Option<PathBuf>,
}

impl Stamps {
    pub fn new(path: Option<&Path>) -> Stamps {
        Stamps {
            path: path.map(Path::to_path_buf),
        }
    }

    pub fn enabled(&self) -> bool {
        self.path.is_some()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Stamps `name` now.
    pub fn mark(&self, name: &str) {
        self.mark_at(name, now_ns());
    }

    /// Appends one line. Best effort: a lost stamp shows as a missing phase
    /// in the breakdown, and must never fail the restore itself.
    pub fn mark_at(&self, name: &str, ns: u64) {
        let Some(path) = &self.path else { return };
        let line = format!("{name} {ns}\n");
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            log::debug!("cannot write timing {name} to {}: {e}", path.display());
        }
    }

    /// Stamps [`CRIU_LOG`] when `file` is created in `dir`, from a thread
    /// of its own; call before starting CRIU. Gives up silently after
    /// `limit` (CRIU may fail before it opens its log).
    pub fn watch_creation(&self, dir: &Path, file: &str, limit: std::time::Duration) {
        if !self.enabled() {
            return;
        }
        let me = self.clone();
        if let Err(e) = watch_creation(dir, file, limit, move |ns| me.mark_at(CRIU_LOG, ns)) {
            log::debug!("no inotify watch on {}: {e}", dir.display());
        }
    }
}

/// Watches `dir` for the creation of `file`, from one thread of its own
/// (it starts on the measured restore's path); `created` gets the
/// CLOCK_MONOTONIC time the event was read, once. The watch is set up
/// before this returns, so a file created afterwards is never missed.
pub fn watch_creation(
    dir: &Path,
    file: &str,
    limit: std::time::Duration,
    created: impl FnOnce(u64) + Send + 'static,
) -> nix::Result<()> {
    let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
    ino.add_watch(dir, AddWatchFlags::IN_CREATE)?;
    let file = std::ffi::OsString::from(file);
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds = [nix::poll::PollFd::new(
                ino.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(_) => return,
            }
            let t = now_ns();
            match ino.read_events() {
                Ok(events) => {
                    if events
                        .iter()
                        .any(|e| e.name.as_deref() == Some(file.as_os_str()))
                    {
                        created(t);
                        return;
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => return,
            }
        }
    });
    Ok(())
}

/// Reads a stamps file: (name, nanoseconds) in file order.
pub fn read(path: &Path) -> Result<Vec<(String, u64)>, TimingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| TimingsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next().and_then(|n| n.parse().ok()), it.next()) {
                (Some(name), Some(ns), None) => Ok((name.to_string(), ns)),
                _ => Err(TimingsError::Malformed {
                    path: path.to_path_buf(),
                    line: l.to_string(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_creation_is_seen() {
        let dir = std::env::temp_dir().join(format!("mh-timings-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t");
        let s = Stamps::new(Some(&file));
        s.mark_at("a", 5);
        let (tx, rx) = crossbeam_channel::bounded(1);
        watch_creation(&dir, "log", std::time::Duration::from_secs(5), move |ns| {
            let _ = tx.send(ns);
        })
        .unwrap();
        let before = now_ns();
        std::fs::write(dir.join("other"), "").unwrap();
        std::fs::write(dir.join("log"), "").unwrap();
        let seen = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert!(seen >= before, "{seen} < {before}");
        s.mark("b");
        let v = read(&file).unwrap();
        assert_eq!(v[0], ("a".to_string(), 5));
        assert_eq!(v[1].0, "b");
        std::fs::write(&file, "x y z\n").unwrap();
        assert!(matches!(read(&file), Err(TimingsError::Malformed { .. })));
        Stamps::new(None).mark("ignored");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

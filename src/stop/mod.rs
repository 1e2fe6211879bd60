//! Stop backends: the two historical ways to hold a process right before a
//! chosen syscall, behind one trait. Both feed the same sandbox builder
//! (a filter and extra environment for the child) and the same CRIU
//! executor; they differ in how the stop arrives and what a restored
//! process needs to get past it.
//!
//! * [`trace::TraceBackend`] — `SECCOMP_RET_TRACE` + `PTRACE_SEIZE`: rewind,
//!   group-stop, detach before CRIU seizes; re-seize after restore.
//! * [`notify::NotifyBackend`] — `SECCOMP_RET_USER_NOTIF` on a harmless
//!   marker (`kill(self, SIGRTMAX)` from an LD_PRELOAD wrapper).

pub mod hit;
pub mod notify;
pub mod preload;
pub mod ptrace;
pub mod trace;
pub mod tracer;

use crate::filter::{FilterError, StopSyscall};
use crate::sandbox::{Released, Variant};
use crossbeam_channel::Receiver;
use hit::StopHit;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracer::{Tracer, TracerError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Trace,
    Notify,
    /// No stop backend: a service started cold, dumped at any moment.
    None,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Trace => "trace",
            BackendKind::Notify => "notify",
            BackendKind::None => "none",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for with `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Trace,
    Notify,
    Auto,
}

impl BackendChoice {
    /// The `--backend` word.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Trace => "trace",
            BackendChoice::Notify => "notify",
            BackendChoice::Auto => "auto",
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trace" => Ok(BackendChoice::Trace),
            "notify" => Ok(BackendChoice::Notify),
            "auto" => Ok(BackendChoice::Auto),
            _ => Err(format!("unknown backend {s:?}: use trace, notify or auto")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error("the notify backend got no seccomp listener from the sandbox")]
    NoListener,
    #[error("the notify backend cannot wrap {0:?}: its preload library wraps listen, bind, accept, accept4 and connect; use --backend trace for other syscalls")]
    NotWrappable(String),
    #[error("the NOTIFY backend's preload library {lib} is out of reach of the service's user {uid}: {dir} is not searchable by it; use --backend trace, or a state directory (--state-dir) under directories others may pass through")]
    PreloadUnreachable {
        lib: std::path::PathBuf,
        uid: u32,
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the preload library at {path}")]
    Preload {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resume process {pid}")]
    Resume {
        pid: Pid,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(
        "task {tid} stopped at the marker and vanished before its process could be read from /proc"
    )]
    Vanished { tid: Pid },
    #[error("cannot list the tasks of process {pid}")]
    ListTasks {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    #[error("the notify thread failed: {0}")]
    Notify(String),
}

/// What a backend reports when the target reached its stop point.
#[derive(Debug)]
pub enum Arrival {
    Stopped(StopHit),
    Failed(StopError),
}

/// One way of stopping a process right before a syscall.
pub trait StopBackend: Send {
    fn kind(&self) -> BackendKind;
    fn stop_at(&self) -> StopSyscall;
    /// The filter and environment the sandbox child finishes with.
    fn variant(&self) -> Result<Variant, StopError>;
    /// Called after the clone, before the child loads its filter.
    fn attach(&mut self, child: Pid, tracer: &Tracer) -> Result<(), StopError>;
    /// Called once the child has exec'd: the stop arrives on the channel.
    fn arm(
        &mut self,
        released: &mut Released,
        tracer: &Tracer,
    ) -> Result<Receiver<Arrival>, StopError>;
    /// The dump left the tree running: let it go on past the stop point.
    fn resume_after_dump(&mut self, root: Pid, tracer: &Tracer) -> Result<(), StopError>;
    /// A few words for teaching: how this backend stops a process.
    fn describe(&self) -> String;
}

/// Resumes every stopped process of a restored (or dumped-and-left) tree
/// that needs no tracer: the NOTIFY and plain cases, and TRACE with the
/// re-seize switched off (which reproduces the talk's ENOSYS).
pub fn continue_tree(root: Pid) -> Result<Vec<Pid>, StopError> {
    let tree = crate::sys::procfs::tree_tasks(root)
        .map_err(|source| StopError::ListTasks { pid: root, source })?;
    let mut pids = Vec::new();
    for (pid, _) in tree {
        match crate::sys::kill(pid, nix::libc::SIGCONT) {
            // Exited meanwhile: its end is reported by the exit watch.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(source) => return Err(StopError::Resume { pid, source }),
        }
        pids.push(pid);
    }
    Ok(pids)
}

/// After CRIU restored an image made with `kind`, get the tree past its
/// stop point. For TRACE the filter is still in the process and traps the
/// replayed syscall: without a tracer it would fail with ENOSYS.
pub fn resume_restored(
    kind: BackendKind,
    root: Pid,
    tracer: &Tracer,
    reseize: bool,
) -> Result<Vec<Pid>, StopError> {
    match kind {
        BackendKind::Trace if reseize => Ok(tracer.seize_tree_and_resume(root)?),
        BackendKind::Trace => {
            crate::explain::say("resume", "re-seize switched off: plain SIGCONT, no tracer — the replayed syscall meets SECCOMP_RET_TRACE with nobody attached and fails with ENOSYS");
            continue_tree(root)
        }
        BackendKind::Notify | BackendKind::None => continue_tree(root),
    }
}

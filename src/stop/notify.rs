//! The NOTIFY backend: `SECCOMP_RET_USER_NOTIF` on a harmless marker.
//!
//! Trapping the stop syscall itself with NOTIFY works until the restore:
//! CRIU restores the filter but not its listener, and the kernel fails a
//! notify-trapped call without a listener with ENOSYS. So, as in the talk,
//! only `kill(*, SIG)` with a real-time signal is trapped; an LD_PRELOAD
//! wrapper of libc's function ignores SIG and sends it to itself right
//! before the real call. Before the dump the marker blocks in the kernel
//! (`seccomp_do_user_notification`); after a restore it returns ENOSYS,
//! which the wrapper ignores, and the real call proceeds.

use super::hit::StopHit;
use super::tracer::Tracer;
use super::{preload, Arrival, BackendKind, StopBackend, StopError};
use crate::explain;
use crate::filter::{check_marker_signal, compile, FilterRule, StopSyscall};
use crate::sandbox::{Released, Variant};
use crossbeam_channel::{Receiver, Sender};
use libseccomp::{ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub struct NotifyBackend {
    stop_at: StopSyscall,
    marker_signal: i32,
    preload: PathBuf,
    /// Research switch: trap the stop syscall itself (no marker).
    direct: bool,
    /// Research switch: the wrapper raises SIGSTOP instead of the marker.
    sigstop_mode: bool,
    release: Option<Sender<()>>,
    _listener: Option<std::sync::Arc<OwnedFd>>,
}

impl NotifyBackend {
    pub fn new(
        stop_at: StopSyscall,
        marker_signal: i32,
        preload_dir: &Path,
    ) -> Result<Self, StopError> {
        let name = stop_at.name();
        if !preload::WRAPPED.contains(&name.as_str()) {
            return Err(StopError::NotWrappable(name));
        }
        check_marker_signal(marker_signal)?;
        let preload = preload::install(preload_dir).map_err(|source| StopError::Preload {
            path: preload_dir.to_path_buf(),
            source,
        })?;
        Ok(NotifyBackend {
            stop_at,
            marker_signal,
            preload,
            direct: false,
            sigstop_mode: false,
            release: None,
            _listener: None,
        })
    }

    /// The installed preload library.
    pub fn preload_path(&self) -> &Path {
        &self.preload
    }

    /// Research row: NOTIFY directly on the stop syscall.
    pub fn direct(mut self) -> Self {
        self.direct = true;
        self
    }

    /// Research row: the wrapper raises SIGSTOP (ignored by a PID 1).
    pub fn sigstop(mut self) -> Self {
        self.sigstop_mode = true;
        self
    }
}

fn to_hit(req: &ScmpNotifReq) -> Result<StopHit, StopError> {
    let tid = crate::sys::pid_from_u32(req.pid);
    // The task is blocked in the kernel until we answer: its /proc entry
    // is there, unless it was killed meanwhile.
    let tgid = crate::sys::procfs::tgid(tid).ok_or(StopError::Vanished { tid })?;
    let nr = i64::from(i32::from(req.data.syscall));
    Ok(StopHit {
        tid: tid.as_raw(),
        tgid: tgid.as_raw(),
        syscall: usize::try_from(nr)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map(|s| s.name().to_string())
            .unwrap_or_default(),
        nr,
        args: req.data.args,
        at_unix_ms: crate::sys::time::unix_ms(),
        frozen: Vec::new(),
        held: false,
    })
}

fn respond_continue(fd: i32, id: u64) {
    let resp = ScmpNotifResp::new_continue(id, ScmpNotifRespFlags::CONTINUE);
    // ENOENT means the call was interrupted (CRIU's seize does that) and
    // will arrive again as a new notification: nothing to do.
    let _ = resp.respond(fd);
}

impl StopBackend for NotifyBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Notify
    }

    fn stop_at(&self) -> StopSyscall {
        self.stop_at
    }

    fn variant(&self) -> Result<Variant, StopError> {
        let rule = if self.direct {
            FilterRule::NotifyDirect {
                syscall: self.stop_at,
            }
        } else {
            FilterRule::NotifyMarker {
                sig: self.marker_signal,
            }
        };
        let filter = compile(rule)?;
        let mut extra_env = vec![
            ("LD_PRELOAD".to_string(), self.preload.display().to_string()),
            ("MIEHISTO_STOP_AT".to_string(), self.stop_at.name()),
            (
                "MIEHISTO_MARKER_SIG".to_string(),
                self.marker_signal.to_string(),
            ),
        ];
        if self.sigstop_mode {
            extra_env.push(("MIEHISTO_PRELOAD_MODE".to_string(), "sigstop".to_string()));
        }
        if self.direct {
            // No marker: the filter traps the real call.
            extra_env.retain(|(k, _)| k != "LD_PRELOAD");
        }
        Ok(Variant {
            filter: Some(filter),
            extra_env,
        })
    }

    fn attach(&mut self, _child: Pid, _tracer: &Tracer) -> Result<(), StopError> {
        Ok(())
    }

    fn arm(
        &mut self,
        released: &mut Released,
        _tracer: &Tracer,
    ) -> Result<Receiver<Arrival>, StopError> {
        let listener = std::sync::Arc::new(released.listener.take().ok_or(StopError::NoListener)?);
        explain::say("notify", &format!("the sandbox handed over its seccomp listener (fd {} here) over a UNIX socket with SCM_RIGHTS and closed its own copy", listener.as_raw_fd()));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
        self.release = Some(release_tx);
        self._listener = Some(listener.clone());
        let direct = self.direct;
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let fd = listener.as_raw_fd();
                let first = match ScmpNotifReq::receive(fd) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Arrival::Failed(StopError::Notify(e.to_string())));
                        return;
                    }
                };
                let hit = match to_hit(&first) {
                    Ok(hit) => hit,
                    Err(e) => {
                        let _ = tx.send(Arrival::Failed(e));
                        return;
                    }
                };
                let what = if direct { "called" } else { "called the marker" };
                explain::say("notify", &format!("task {} {what} {}({}, {}): it is blocked inside the kernel (seccomp_do_user_notification), neither stopped by a signal nor traced", first.pid, hit.syscall, crate::sys::signed_arg(first.data.args[0]), first.data.args[1]));
                let _ = tx.send(Arrival::Stopped(hit));
                // Hold it until the dump is over (or forever, if the dump
                // kills the tree); then let every marker through.
                if release_rx.recv().is_err() {
                    return;
                }
                respond_continue(fd, first.id);
                while let Ok(req) = ScmpNotifReq::receive(fd) {
                    respond_continue(fd, req.id);
                }
            })
            .map_err(|e| StopError::Notify(e.to_string()))?;
        Ok(rx)
    }

    fn resume_after_dump(&mut self, _root: Pid, _tracer: &Tracer) -> Result<(), StopError> {
        if let Some(r) = self.release.take() {
            let _ = r.send(());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        if self.direct {
            format!(
                "NOTIFY (direct): SECCOMP_RET_USER_NOTIF on {}(2) itself",
                self.stop_at.name()
            )
        } else {
            format!(
                "NOTIFY: SECCOMP_RET_USER_NOTIF on kill(*, {}) only; an LD_PRELOAD wrapper of {}() sends that harmless marker to itself first",
                crate::sys::signal::signal_name(self.marker_signal),
                self.stop_at.name()
            )
        }
    }
}

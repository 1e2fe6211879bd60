//! The supervisor: what runmh does while a service runs, cold-started or
//! restored. It is the parent of the sandbox's PID 1, forwards SIGTERM and
//! friends (escalating to SIGKILL: a PID 1 drops signals it has no handler
//! for), answers the control socket (freeze before a dump, thaw after), and
//! ends with the service's exit status.

use crate::control::{self, Incoming, Request, Response};
use crate::explain;
use crate::instance::{Instance, InstanceRecord, InstanceState};
use crate::stop::tracer::Tracer;
use crate::stop::{self, BackendKind};
use crate::sys;
use crate::sys::exit::ExitStatus;
use crossbeam_channel::{select, Receiver};
use nix::libc;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot start the signal thread")]
    SignalThread(#[source] std::io::Error),
    #[error("the tracer thread stopped reporting the service's exit")]
    LostChild,
}

/// A running sandboxed tree under this process's supervision.
pub struct Running {
    pub tracer: Tracer,
    pub instance: Instance,
    pub record: InstanceRecord,
    pub root: Pid,
    pub exit: Receiver<ExitStatus>,
    /// Whether the tracer currently holds the tree (TRACE after restore).
    pub traced: bool,
    /// A restored tree held at its stop point (a standby instance), until a
    /// resume request.
    pub held: Option<Held>,
}

/// How a held tree is to be resumed.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// TRACE images: re-seize before resuming (see [`stop::resume_restored`]).
    pub reseize: bool,
}

/// How the supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The tree died while a dump was in progress (CRIU kills it after a
    /// successful dump): a normal end.
    pub dumped: bool,
}

impl Outcome {
    pub fn exit_code(&self) -> i32 {
        if self.dumped {
            0
        } else {
            self.status.code()
        }
    }
}

pub use crate::sys::signal::signals;

/// How often a frozen tree's dumper is checked.
const DUMPER_POLL: Duration = Duration::from_millis(100);

/// The process that froze the tree for a dump, by pidfd (a pid could be
/// reused; a pidfd names the one process).
struct Dumper {
    pid: i32,
    pidfd: std::os::fd::OwnedFd,
}

impl Dumper {
    fn watch(pid: i32) -> Option<Dumper> {
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Some(Dumper { pid, pidfd }),
            Err(e) => {
                log::warn!("cannot watch the dump's process {pid}: {e}");
                None
            }
        }
    }

    /// A pidfd polls readable once its process has exited.
    fn gone(&self) -> bool {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            self.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
    }
}

impl Running {
    fn set_state(&mut self, state: InstanceState) {
        self.record.state = state;
        let _ = self.instance.write_record(&self.record);
    }

    fn on_control(&mut self, inc: Incoming, dumped: &mut bool, dumper: &mut Option<Dumper>) {
        let freeze = inc.req == Request::Freeze;
        if matches!(inc.req, Request::Thaw { .. } | Request::KeepFrozen) {
            *dumper = None;
        }
        let resp = match inc.req {
            Request::KeepFrozen => Response::ok(),
            Request::Status => Response {
                ok: true,
                state: Some(self.record.state),
                pids: vec![self.root.as_raw()],
                ..Default::default()
            },
            Request::Freeze => {
                if self.traced {
                    match self.tracer.freeze() {
                        Ok(pids) => {
                            self.traced = false;
                            self.set_state(InstanceState::Frozen);
                            *dumped = true;
                            Response {
                                ok: true,
                                pids: pids.iter().map(|p| p.as_raw()).collect(),
                                ..Default::default()
                            }
                        }
                        Err(e) => Response::err(e),
                    }
                } else {
                    self.set_state(InstanceState::Dumping);
                    *dumped = true;
                    Response {
                        ok: true,
                        pids: vec![self.root.as_raw()],
                        ..Default::default()
                    }
                }
            }
            Request::Resume => match self.held.take() {
                None => Response::err(
                    "the service is not held at its stop point: there is nothing to resume",
                ),
                Some(h) => {
                    let kind = self.record.backend.kind;
                    match stop::resume_restored(kind, self.root, &self.tracer, h.reseize) {
                        Ok(_) => {
                            self.traced = kind == BackendKind::Trace && h.reseize;
                            // Before the reply: whoever asked reads the
                            // record next and must not see `standby`.
                            self.set_state(InstanceState::Running);
                            explain::say(
                                "resume",
                                &format!(
                                    "the held tree (pid {}) goes on past its stop point",
                                    self.root
                                ),
                            );
                            Response::ok()
                        }
                        // Half resumed, or not: nobody can tell what the
                        // tree does next. The caller stops it.
                        Err(e) => Response::err(format!("cannot resume the held tree: {e}")),
                    }
                }
            },
            Request::Thaw { alive: false } => {
                *dumped = true;
                self.set_state(InstanceState::Dumped);
                Response::ok()
            }
            Request::Thaw { alive: true } => {
                *dumped = false;
                let r = if self.record.backend.kind == BackendKind::Trace && !self.traced {
                    self.tracer
                        .seize_tree_and_resume(self.root)
                        .map(|_| self.traced = true)
                        .map_err(|e| e.to_string())
                } else {
                    stop::continue_tree(self.root)
                        .map(drop)
                        .map_err(|e| e.to_string())
                };
                self.set_state(InstanceState::Running);
                match r {
                    Ok(()) => Response::ok(),
                    Err(e) => Response::err(e),
                }
            }
        };
        // Watched until it thaws the tree: if it dies first (SIGKILL of
        // `runmh dump` and its CRIU), the tree would stay frozen, or
        // half-dumped, forever.
        if freeze && resp.ok {
            *dumper = inc.peer.and_then(Dumper::watch);
        }
        let _ = inc.reply.send(resp);
    }

    /// Gives up a tree that can no longer be supervised: kills it and
    /// removes its instance (cgroup first), as its owner would on exit.
    fn abandon(&self) {
        let _ = sys::kill(self.root, libc::SIGKILL);
        let _ = std::fs::remove_file(self.instance.control_socket());
        self.instance.remove();
    }

    /// Ends the tree at once (SIGKILL) and waits up to `grace` for the
    /// tracer thread to reap it (None if it did not); removes the instance.
    /// For callers that only look at a restored service (the research
    /// matrix, the demo) and supervise nothing after.
    pub fn end_now(self, grace: Duration) -> Option<ExitStatus> {
        let _ = sys::kill(self.root, libc::SIGKILL);
        let status = self.exit.recv_timeout(grace).ok();
        let _ = std::fs::remove_file(self.instance.control_socket());
        self.instance.remove();
        status
    }

    /// Supervises until the service ends.
    pub fn supervise(self, stop_timeout: Duration) -> Result<(Outcome, Instance), SupervisorError> {
        self.supervise_then(stop_timeout, |_| {})
    }

    /// Supervises until the service ends; `running` is told once the
    /// service runs and its control socket answers.
    pub fn supervise_then(
        mut self,
        stop_timeout: Duration,
        running: impl FnOnce(&InstanceRecord),
    ) -> Result<(Outcome, Instance), SupervisorError> {
        let signals = signals();
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        if let Err(e) = control::serve(&self.instance.control_socket(), ctl_tx) {
            // Without its control socket nobody could dump, resume or
            // stop the tree through us: end it with its instance rather
            // than leave an unmanaged tree and its directory behind.
            self.abandon();
            return Err(e.into());
        }
        self.set_state(if self.held.is_some() {
            InstanceState::Standby
        } else {
            InstanceState::Running
        });
        running(&self.record);
        let mut dumped = false;
        let mut kill_at: Option<Instant> = None;
        let mut dumper: Option<Dumper> = None;
        loop {
            if dumper.as_ref().is_some_and(Dumper::gone) {
                if let Some(d) = dumper.take() {
                    log::warn!(
                        "the dump's process (pid {}) ended before it gave the service back: killing the service (pid {}), which it left {}",
                        d.pid,
                        self.root,
                        self.record.state
                    );
                }
                dumped = false;
                let _ = sys::kill(self.root, libc::SIGKILL);
            }
            let mut wait = kill_at
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            if dumper.is_some() {
                wait = wait.min(DUMPER_POLL);
            }
            select! {
                recv(self.exit) -> st => {
                    let Ok(status) = st else {
                        self.abandon();
                        return Err(SupervisorError::LostChild);
                    };
                    explain::say("exit", &format!("the service (pid {}) ended: {status}", self.root));
                    let _ = std::fs::remove_file(self.instance.control_socket());
                    return Ok((Outcome { status, dumped }, self.instance));
                }
                recv(signals) -> sig => {
                    let Ok(sig) = sig else { continue };
                    if self.held.is_some() {
                        // Held before its first instruction since the
                        // restore: nothing of its own to wind down, and a
                        // stopped PID 1 would not see the signal anyway.
                        log::info!("{}: ending the held standby tree (pid {})", crate::sys::signal::signal_name(sig), self.root);
                        let _ = sys::kill(self.root, libc::SIGKILL);
                        continue;
                    }
                    log::info!("forwarding {} to the service (pid {})", crate::sys::signal::signal_name(sig), self.root);
                    let _ = sys::kill(self.root, sig);
                    if kill_at.is_none() {
                        kill_at = Some(Instant::now() + stop_timeout);
                    }
                }
                recv(ctl_rx) -> inc => {
                    if let Ok(inc) = inc {
                        self.on_control(inc, &mut dumped, &mut dumper);
                    }
                }
                default(wait) => {
                    if kill_at.is_some_and(|t| Instant::now() >= t) {
                        log::warn!("the service ignored the signal for {}s (as PID 1 it only gets signals it handles): sending SIGKILL", stop_timeout.as_secs());
                        let _ = sys::kill(self.root, libc::SIGKILL);
                        kill_at = Some(Instant::now() + Duration::from_secs(3600));
                    }
                }
            }
        }
    }
}

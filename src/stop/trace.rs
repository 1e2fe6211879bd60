//! The TRACE backend: `SECCOMP_RET_TRACE` on the stop syscall, with the
//! supervisor as a `PTRACE_SEIZE` tracer (never `PTRACE_ATTACH`, whose
//! SIGSTOP and attach semantics collide with CRIU's own seize).
//!
//! Stop: at the first trap the tracer thread rewinds the syscall, puts the
//! tree in group-stop and detaches from every task; CRIU then seizes a
//! quiet, untraced tree. Restore: the tasks come back stopped, about to
//! re-execute the syscall; the supervisor re-seizes them with
//! `PTRACE_O_TRACESECCOMP` before sending SIGCONT, so the replayed trap finds
//! a tracer, which lets it run.

use super::tracer::{AttachHow, Event, Policy, Tracer};
use super::{Arrival, BackendKind, StopBackend, StopError};
use crate::filter::{compile, FilterRule, StopSyscall};
use crate::sandbox::{Released, Variant};
use crossbeam_channel::Receiver;
use nix::unistd::Pid;

pub struct TraceBackend {
    stop_at: StopSyscall,
    /// Research switch: stay attached at the stop (the talk's 2018 tracer).
    hold: bool,
    how: AttachHow,
    /// Research switch: fail to attach with EPERM as if ptrace were
    /// forbidden (a seccomp'd container, Yama scope 3), to exercise
    /// `--backend auto`'s fallback where ptrace works.
    deny_ptrace: bool,
    /// The heap trim's library and its settings (see
    /// [`super::preload::trace_trim_env`]); empty: none.
    extra_env: Vec<(String, String)>,
}

impl TraceBackend {
    pub fn new(stop_at: StopSyscall) -> Self {
        TraceBackend {
            stop_at,
            hold: false,
            how: AttachHow::Seize,
            deny_ptrace: false,
            extra_env: Vec::new(),
        }
    }

    /// The 2018 flow: `PTRACE_ATTACH`, and the tracer keeps the task at the
    /// stop while CRIU dumps. Only the research matrix uses it.
    pub fn legacy_attached(stop_at: StopSyscall) -> Self {
        TraceBackend {
            stop_at,
            hold: true,
            how: AttachHow::LegacyAttach,
            deny_ptrace: false,
            extra_env: Vec::new(),
        }
    }

    /// Loads the trim-only preload library with this environment.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        self.extra_env = env;
        self
    }

    /// See the `deny_ptrace` field.
    pub fn deny_ptrace(mut self, deny: bool) -> Self {
        self.deny_ptrace = deny;
        self
    }
}

impl StopBackend for TraceBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Trace
    }

    fn stop_at(&self) -> StopSyscall {
        self.stop_at
    }

    fn variant(&self) -> Result<Variant, StopError> {
        let filter = compile(FilterRule::Trace {
            syscall: self.stop_at,
        })?;
        Ok(Variant {
            filter: Some(filter),
            extra_env: self.extra_env.clone(),
        })
    }

    fn attach(&mut self, child: Pid, tracer: &Tracer) -> Result<(), StopError> {
        if self.deny_ptrace {
            return Err(super::tracer::TracerError::Seize {
                pid: child,
                source: nix::errno::Errno::EPERM,
            }
            .into());
        }
        let policy = if self.hold {
            Policy::Hold(self.stop_at)
        } else {
            Policy::Armed(self.stop_at)
        };
        tracer.seize(child, self.how, policy)?;
        Ok(())
    }

    fn arm(
        &mut self,
        _released: &mut Released,
        tracer: &Tracer,
    ) -> Result<Receiver<Arrival>, StopError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let events = tracer.events().clone();
        std::thread::Builder::new()
            .name("trace-stop".into())
            .spawn(move || {
                if let Ok(ev) = events.recv() {
                    let _ = tx.send(match ev {
                        Event::StopReached(hit) => Arrival::Stopped(hit),
                        Event::Failed(e) => Arrival::Failed(e.into()),
                    });
                }
            })
            .map_err(|e| StopError::Notify(e.to_string()))?;
        Ok(rx)
    }

    fn resume_after_dump(&mut self, root: Pid, tracer: &Tracer) -> Result<(), StopError> {
        tracer.seize_tree_and_resume(root)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "TRACE: seccomp returns SECCOMP_RET_TRACE for {}(2); the supervisor, attached with PTRACE_SEIZE, gets PTRACE_EVENT_SECCOMP before the kernel runs the call",
            self.stop_at.name()
        )
    }
}

//! The tracer thread. ptrace is per-thread: the thread that seizes a task is
//! its tracer, and only it may issue ptrace requests for it. So one thread
//! owns every ptrace call — and, to keep wait semantics simple, every
//! `waitpid` of the process. Other threads talk to it over crossbeam
//! channels and wake it with a thread-directed SIGUSR2.

use super::hit::StopHit;
use super::ptrace::linux::Linux;
use super::ptrace::{arch, Ptrace, Stop, SyscallEntry, UnsupportedArch};
use crate::explain;
use crate::filter::{StopSyscall, TRACE_TAG};
use crate::sys::exit::ExitStatus;
use crate::sys::procfs::TaskState;
use crate::sys::{self, Wait};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error("cannot ptrace-seize task {pid}")]
    Seize {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("cannot ptrace-attach task {pid}")]
    Attach {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("cannot read or write the registers of task {pid}")]
    Regs {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error("tasks {pending:?} did not reach a ptrace-stop within {secs}s while the tree was being frozen")]
    FreezeTimeout { pending: Vec<Pid>, secs: u64 },
    #[error("task {pid} is in state {state:?}, not stopped, after the tree was frozen")]
    NotStopped { pid: Pid, state: TaskState },
    #[error("cannot list the tasks of process {pid}")]
    ListTasks {
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    UnsupportedArch(#[from] UnsupportedArch),
    #[error("the tracer thread is gone")]
    Gone,
    #[error("cannot start the tracer thread")]
    Spawn(#[source] std::io::Error),
}

/// What the tracer does at a seccomp trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// First trap of the syscall: rewind it, freeze the tree, detach all.
    Armed(StopSyscall),
    /// First trap of the syscall: report it and keep the task stopped and
    /// attached (the talk's 2018 tracer; CRIU's seize then collides).
    Hold(StopSyscall),
    /// Let every trapped call run (after a restore).
    Passthrough,
}

/// How the tracer attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachHow {
    Seize,
    /// `PTRACE_ATTACH`, as the talk's first attempt did; research only.
    LegacyAttach,
}

pub enum Event {
    StopReached(StopHit),
    /// Something the tracer could not handle (a failed freeze).
    Failed(TracerError),
}

enum Cmd {
    Seize {
        pid: Pid,
        how: AttachHow,
        policy: Policy,
        reply: Sender<Result<(), TracerError>>,
    },
    SeizeTree {
        root: Pid,
        reply: Sender<Result<Vec<Pid>, TracerError>>,
    },
    Freeze {
        reply: Sender<Result<Vec<Pid>, TracerError>>,
    },
    Watch {
        pid: Pid,
        reply: Sender<ExitStatus>,
    },
    StampPassed(crate::timings::Stamps),
    Shutdown,
}

pub struct Tracer {
    tx: Sender<Cmd>,
    events: Receiver<Event>,
    /// The tracer thread's tid, for the SIGUSR2 wake-up, once it has sent
    /// it (see [`Tracer::send`]).
    tid: std::sync::OnceLock<Pid>,
    tid_rx: Receiver<Pid>,
    handle: Option<std::thread::JoinHandle<()>>,
}

const PTRACE_OPTIONS: libc::c_int = libc::PTRACE_O_TRACESECCOMP
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_EXITKILL;

/// Signals the supervisor process keeps blocked in every thread: SIGCHLD and
/// SIGUSR2 are consumed by the tracer thread with sigtimedwait, the others by
/// the main thread. Must be called before any thread is spawned.
pub fn block_supervisor_signals() -> Result<(), Errno> {
    sys::block_signals(&[
        libc::SIGCHLD,
        libc::SIGUSR2,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGQUIT,
    ])
}

impl Tracer {
    pub fn start() -> Result<Tracer, TracerError> {
        let (tx, rx) = unbounded();
        let (ev_tx, events) = unbounded();
        let (tid_tx, tid_rx) = bounded(1);
        let handle = std::thread::Builder::new()
            .name("tracer".into())
            .spawn(move || {
                let _ = tid_tx.send(sys::gettid());
                State::new(Linux, ev_tx).run(rx);
            })
            .map_err(TracerError::Spawn)?;
        // Not waiting for the thread to run: on a restore's critical path
        // that rendezvous cost 0.2-2 ms (the new thread has to
        // be scheduled first); nothing needs the tid before the first wake.
        Ok(Tracer {
            tx,
            events,
            tid: std::sync::OnceLock::new(),
            tid_rx,
            handle: Some(handle),
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), TracerError> {
        self.tx.send(cmd).map_err(|_| TracerError::Gone)?;
        let tid = match self.tid.get() {
            Some(t) => Some(*t),
            None => match self.tid_rx.try_recv() {
                Ok(t) => Some(*self.tid.get_or_init(|| t)),
                // The thread has not sent its tid yet, so it has not begun
                // its loop either: it reads the command queued above before
                // it first sleeps, and needs no wake-up.
                Err(crossbeam_channel::TryRecvError::Empty) => None,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Err(TracerError::Gone)
                }
            },
        };
        if let Some(tid) = tid {
            let _ = sys::tgkill(nix::unistd::getpid(), tid, libc::SIGUSR2);
        }
        Ok(())
    }

    pub fn seize(&self, pid: Pid, how: AttachHow, policy: Policy) -> Result<(), TracerError> {
        let (reply, r) = bounded(1);
        self.send(Cmd::Seize {
            pid,
            how,
            policy,
            reply,
        })?;
        r.recv().map_err(|_| TracerError::Gone)?
    }

    /// Seizes every task under `root` (a restored tree, normally stopped)
    /// with passthrough policy, then resumes them.
    pub fn seize_tree_and_resume(&self, root: Pid) -> Result<Vec<Pid>, TracerError> {
        let (reply, r) = bounded(1);
        self.send(Cmd::SeizeTree { root, reply })?;
        r.recv().map_err(|_| TracerError::Gone)?
    }

    /// Puts every traced process in group-stop and detaches from all tasks.
    pub fn freeze(&self) -> Result<Vec<Pid>, TracerError> {
        let (reply, r) = bounded(1);
        self.send(Cmd::Freeze { reply })?;
        r.recv().map_err(|_| TracerError::Gone)?
    }

    /// Stamps [`crate::timings::TRAP_PASSED`] at the next trap let through
    /// by the passthrough policy: after a restore, the replayed syscall.
    pub fn stamp_passed(&self, stamps: &crate::timings::Stamps) -> Result<(), TracerError> {
        if stamps.enabled() {
            self.send(Cmd::StampPassed(stamps.clone()))?;
        }
        Ok(())
    }

    /// A channel that receives `pid`'s exit status once it is reaped.
    pub fn watch(&self, pid: Pid) -> Result<Receiver<ExitStatus>, TracerError> {
        let (reply, r) = bounded(1);
        self.send(Cmd::Watch { pid, reply })?;
        Ok(r)
    }

    /// Runs a command to completion; its exit is reaped by the tracer thread.
    pub fn run(&self, cmd: &mut std::process::Command) -> std::io::Result<ExitStatus> {
        let child = cmd.spawn()?;
        let pid = sys::child_pid(&child);
        // Dropping a std Child neither waits nor kills; we reap through the tracer.
        drop(child);
        let r = self.watch(pid).map_err(std::io::Error::other)?;
        r.recv()
            .map_err(|_| std::io::Error::other("tracer thread gone"))
    }

    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.send(Cmd::Shutdown);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Task {
    tgid: Pid,
    /// Seized while in group-stop: resume it at its first EVENT_STOP.
    resume_on_stop: bool,
}

/// The tracer's state machine, over the kernel it is given ([`Linux`] in
/// the tracer thread, a scripted one in the unit tests).
struct State<K: Ptrace> {
    sys: K,
    tasks: HashMap<Pid, Task>,
    policy: Policy,
    watches: HashMap<Pid, Sender<ExitStatus>>,
    /// Exits reaped before anyone asked for them.
    unclaimed: HashMap<Pid, ExitStatus>,
    events: Sender<Event>,
    shutdown: bool,
    /// Where to stamp the next passthrough trap (see [`Tracer::stamp_passed`]).
    passed: Option<crate::timings::Stamps>,
}

impl<K: Ptrace> State<K> {
    fn new(sys: K, events: Sender<Event>) -> Self {
        State {
            sys,
            tasks: HashMap::new(),
            policy: Policy::Passthrough,
            watches: HashMap::new(),
            unclaimed: HashMap::new(),
            events,
            shutdown: false,
            passed: None,
        }
    }

    fn run(mut self, rx: Receiver<Cmd>) {
        loop {
            while let Ok(cmd) = rx.try_recv() {
                self.command(cmd);
            }
            self.drain_waits();
            if self.shutdown {
                // EXITKILL takes care of any task still traced.
                return;
            }
            let _ = sys::sigtimedwait(&[libc::SIGCHLD, libc::SIGUSR2], Duration::from_millis(200));
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Seize {
                pid,
                how,
                policy,
                reply,
            } => {
                let r = self.arm(policy).and_then(|()| self.attach(pid, how));
                let _ = reply.send(r);
            }
            Cmd::SeizeTree { root, reply } => {
                self.policy = Policy::Passthrough;
                let _ = reply.send(self.seize_tree(root));
            }
            Cmd::Freeze { reply } => {
                let _ = reply.send(self.freeze(None));
            }
            Cmd::Watch { pid, reply } => {
                if let Some(st) = self.unclaimed.remove(&pid) {
                    let _ = reply.send(st);
                } else {
                    self.watches.insert(pid, reply);
                }
            }
            Cmd::StampPassed(s) => self.passed = Some(s),
            Cmd::Shutdown => self.shutdown = true,
        }
    }

    /// A policy that stops at a syscall reads and rewinds its registers:
    /// refused up front where the register code does not exist.
    fn arm(&mut self, policy: Policy) -> Result<(), TracerError> {
        if !matches!(policy, Policy::Passthrough) {
            arch::supported()?;
        }
        self.policy = policy;
        Ok(())
    }

    fn attach(&mut self, pid: Pid, how: AttachHow) -> Result<(), TracerError> {
        match how {
            AttachHow::Seize => {
                self.sys
                    .seize(pid, PTRACE_OPTIONS)
                    .map_err(|source| TracerError::Seize { pid, source })?;
                explain::say("ptrace", &format!("PTRACE_SEIZE {pid} with TRACESECCOMP|TRACECLONE|TRACEFORK|TRACEVFORK: the task keeps running, and unlike PTRACE_ATTACH no SIGSTOP is sent"));
            }
            AttachHow::LegacyAttach => {
                let attach = |source| TracerError::Attach { pid, source };
                self.sys.attach(pid).map_err(attach)?;
                // PTRACE_ATTACH sends SIGSTOP; swallow that stop, then set options.
                loop {
                    match self.sys.wait(pid.as_raw(), 0) {
                        Ok(Some(Wait::Stopped { .. })) => break,
                        Ok(Some(_)) => return Err(attach(Errno::ESRCH)),
                        Ok(None) => continue,
                        Err(source) => return Err(attach(source)),
                    }
                }
                self.sys
                    .set_options(pid, PTRACE_OPTIONS & !libc::PTRACE_O_EXITKILL)
                    .map_err(attach)?;
                self.sys.cont(pid, 0).map_err(attach)?;
                explain::say("ptrace", &format!("PTRACE_ATTACH {pid} (the 2018 way): the task got a SIGSTOP that the tracer swallowed"));
            }
        }
        // Callers attach to a process (a sandbox child): its own thread group.
        self.tasks.insert(
            pid,
            Task {
                tgid: pid,
                resume_on_stop: false,
            },
        );
        Ok(())
    }

    fn seize_tree(&mut self, root: Pid) -> Result<Vec<Pid>, TracerError> {
        let tree = self
            .sys
            .tree_tasks(root)
            .map_err(|source| TracerError::ListTasks { pid: root, source })?;
        for (pid, tids) in &tree {
            for tid in tids {
                let stopped = self.sys.task_state(*pid, *tid) == Some(TaskState::Stopped);
                if let Err(source) = self.sys.seize(*tid, PTRACE_OPTIONS) {
                    // A task that is exiting (or a zombie) cannot be seized
                    // and needs no tracer any more; its exit is reaped as usual.
                    if self
                        .sys
                        .task_state(*pid, *tid)
                        .map_or(true, TaskState::has_ended)
                    {
                        continue;
                    }
                    return Err(TracerError::Seize { pid: *tid, source });
                }
                self.tasks.insert(
                    *tid,
                    Task {
                        tgid: *pid,
                        resume_on_stop: stopped,
                    },
                );
            }
        }
        explain::say("ptrace", &format!("re-seized {} task(s) of the restored tree with PTRACE_O_TRACESECCOMP before they run: the replayed trapped syscall will find a tracer and no ENOSYS", self.tasks.len()));
        let pids: Vec<Pid> = tree.iter().map(|(p, _)| *p).collect();
        for p in &pids {
            // Clears the process-wide stopped state CRIU restored; each
            // thread's own trap is resumed by the EVENT_STOP handling.
            let _ = self.sys.kill(*p, libc::SIGCONT);
        }
        Ok(pids)
    }

    fn drain_waits(&mut self) {
        loop {
            match self.sys.wait(-1, libc::WNOHANG) {
                Ok(Some(w)) => self.on_wait(w),
                Ok(None) | Err(_) => return,
            }
        }
    }

    fn exited(&mut self, pid: Pid, st: ExitStatus) {
        self.tasks.remove(&pid);
        if let Some(w) = self.watches.remove(&pid) {
            let _ = w.send(st);
        } else {
            self.unclaimed.insert(pid, st);
        }
    }

    fn on_wait(&mut self, w: Wait) {
        match w {
            Wait::Exited(pid, c) => self.exited(pid, ExitStatus::Exited(c)),
            Wait::Signaled(pid, s) => self.exited(pid, ExitStatus::Signaled(s)),
            Wait::Continued(_) => {}
            Wait::Stopped { pid, sig, event } => self.on_stop(pid, sig, event),
        }
    }

    /// The thread group of a stopped task, registering a task we did not
    /// know yet: one auto-attached through TRACECLONE/TRACEFORK can report
    /// its first stop before its parent's event names it. `None`: reaped
    /// since it stopped, nothing left to resume.
    fn known(&mut self, pid: Pid) -> Option<(Pid, bool)> {
        if let Some(t) = self.tasks.get(&pid) {
            return Some((t.tgid, false));
        }
        let tgid = self.sys.tgid(pid)?;
        self.tasks.insert(
            pid,
            Task {
                tgid,
                resume_on_stop: false,
            },
        );
        Some((tgid, true))
    }

    fn on_stop(&mut self, pid: Pid, sig: i32, event: i32) {
        let Some((tgid, _)) = self.known(pid) else {
            return;
        };
        let Ok(stop) = Stop::decode(&mut self.sys, pid, sig, event) else {
            // The event message is gone with the task (SIGKILL meanwhile).
            self.tasks.remove(&pid);
            return;
        };
        let r = match stop {
            Stop::Signal(sig) => self.sys.cont(pid, sig), // deliver it
            Stop::Seccomp { data } => return self.on_seccomp(pid, tgid, data),
            Stop::Clone { new } => {
                self.adopt(new, tgid);
                self.sys.cont(pid, 0)
            }
            Stop::Fork { new } => {
                self.adopt(new, new);
                self.sys.cont(pid, 0)
            }
            Stop::Group(_) => {
                let resume = self
                    .tasks
                    .get_mut(&pid)
                    .is_some_and(|t| std::mem::take(&mut t.resume_on_stop));
                if resume {
                    self.sys.cont(pid, 0)
                } else {
                    // A real group-stop: stay stopped but keep reporting
                    // (ptrace(2), "PTRACE_LISTEN"), as an untraced task would.
                    self.sys.listen(pid)
                }
            }
            Stop::Interrupt | Stop::Event(_) => self.sys.cont(pid, 0),
        };
        if r.is_err() {
            // ESRCH: the task died (e.g. SIGKILL) between the stop and now.
            self.tasks.remove(&pid);
        }
    }

    /// A task a clone or fork event named (it may have reported already).
    /// Under load the event can come after the new task's whole life: its
    /// first stop, its run and its exit, reaped here (a pyenv shim's
    /// short-lived subshells): a task no longer in /proc is not adopted,
    /// or a freeze would wait for it until it timed out.
    fn adopt(&mut self, new: Pid, tgid: Pid) {
        if self.tasks.contains_key(&new) || self.sys.tgid(new).is_none() {
            return;
        }
        self.tasks.insert(
            new,
            Task {
                tgid,
                resume_on_stop: false,
            },
        );
    }

    /// The syscall `tid` is trapped at, when it is the one `policy` waits
    /// for and the trap is our filter's (its SECCOMP_RET_DATA tag; the
    /// target may install filters of its own).
    fn wanted(
        &mut self,
        tid: Pid,
        data: libc::c_ulong,
    ) -> Result<Option<(StopSyscall, SyscallEntry)>, TracerError> {
        let target = match self.policy {
            Policy::Armed(s) | Policy::Hold(s) => s,
            Policy::Passthrough => return Ok(None),
        };
        if data != libc::c_ulong::from(TRACE_TAG) {
            return Ok(None);
        }
        let Ok(regs) = self.sys.regs(tid) else {
            return Ok(None);
        };
        let entry = arch::entry(&regs)?;
        Ok((entry.nr == i64::from(target.nr)).then_some((target, entry)))
    }

    fn on_seccomp(&mut self, tid: Pid, tgid: Pid, data: libc::c_ulong) {
        let (syscall, entry) = match self.wanted(tid, data) {
            Ok(Some(hit)) => hit,
            Ok(None) => {
                if matches!(self.policy, Policy::Passthrough) {
                    explain::say("ptrace", &format!("task {tid} trapped at its traced syscall again; the tracer lets it run (PTRACE_CONT)"));
                }
                if self.sys.cont(tid, 0).is_err() {
                    self.tasks.remove(&tid);
                }
                if matches!(self.policy, Policy::Passthrough) {
                    if let Some(s) = self.passed.take() {
                        s.mark(crate::timings::TRAP_PASSED);
                    }
                }
                return;
            }
            Err(e) => {
                self.policy = Policy::Passthrough;
                let _ = self.events.send(Event::Failed(e));
                if self.sys.cont(tid, 0).is_err() {
                    self.tasks.remove(&tid);
                }
                return;
            }
        };
        let a = entry.args;
        let mut hit = StopHit {
            tid: tid.as_raw(),
            tgid: tgid.as_raw(),
            syscall: syscall.name(),
            nr: i64::from(syscall.nr),
            args: a,
            at_unix_ms: crate::sys::time::unix_ms(),
            frozen: Vec::new(),
            held: false,
        };
        explain::say(
            "seccomp",
            &format!("task {tid} called {}({}, {}, ...): SECCOMP_RET_TRACE stopped it before the kernel ran the call (PTRACE_EVENT_SECCOMP)", hit.syscall, sys::signed_arg(a[0]), sys::signed_arg(a[1])),
        );
        if matches!(self.policy, Policy::Hold(_)) {
            hit.held = true;
            self.policy = Policy::Passthrough;
            let _ = self.events.send(Event::StopReached(hit));
            return;
        }
        self.policy = Policy::Passthrough;
        match self.freeze(Some((tid, tgid))) {
            Ok(frozen) => {
                hit.frozen = frozen.iter().map(|p| p.as_raw()).collect();
                let _ = self.events.send(Event::StopReached(hit));
            }
            Err(e) => {
                let _ = self.events.send(Event::Failed(e));
            }
        }
    }

    /// Rewinds a task stopped at syscall entry so that, once resumed, it
    /// executes the same syscall again ([`arch::rewind`]).
    fn rewind(&mut self, tid: Pid) -> Result<(), TracerError> {
        let regs = |source| TracerError::Regs { pid: tid, source };
        let mut r = self.sys.regs(tid).map_err(regs)?;
        arch::rewind(&mut r)?;
        self.sys.set_regs(tid, &r).map_err(regs)?;
        explain::say("rewind", &format!("task {tid}: orig_rax=-1 skips the call now, rax=nr and rip-=2 make it run again when resumed — after the restore"));
        Ok(())
    }

    /// Group-stops every traced process and detaches from every task, so
    /// that CRIU's own PTRACE_SEIZE finds no other tracer. Stopped, detached
    /// tasks stay stopped (kernel `__ptrace_unlink` re-instates the group
    /// stop) and CRIU restores them stopped. `hit`: the trapped task and
    /// its process.
    fn freeze(&mut self, hit: Option<(Pid, Pid)>) -> Result<Vec<Pid>, TracerError> {
        if let Some((t, _)) = hit {
            self.rewind(t)?;
        }
        let tgids: BTreeSet<Pid> = self.tasks.values().map(|t| t.tgid).collect();
        for g in &tgids {
            let _ = self.sys.kill(*g, libc::SIGSTOP);
        }
        if explain::enabled() {
            let list: Vec<String> = tgids.iter().map(|p| p.to_string()).collect();
            explain::say("freeze", &format!("SIGSTOP to process(es) {}: group-stop, so that nothing runs between our detach and CRIU's seize", list.join(", ")));
        }
        if let Some((t, tgid)) = hit {
            // It dequeues the pending SIGSTOP on its way back to user space,
            // before re-executing the rewound syscall. Thread-directed too:
            // in a multi-threaded process another (traced) thread may take
            // the process-directed one into its signal-delivery-stop, and
            // this one would re-execute the syscall untraced: ENOSYS before
            // the dump (threaded_server, about one run in six).
            let _ = self.sys.tgkill(tgid, t, libc::SIGSTOP);
            let _ = self.sys.detach(t, 0);
            self.tasks.remove(&t);
        }
        let others: Vec<Pid> = self.tasks.keys().copied().collect();
        for t in others {
            let _ = self.sys.interrupt(t);
        }
        // Tasks already detached in this freeze, the trapped one included:
        // a new thread can report its first stops (and be detached) before
        // its parent's CLONE event names it, which must not bring it back
        // as one to wait for.
        let mut released: HashSet<Pid> = hit.into_iter().map(|(t, _)| t).collect();
        let deadline = self.sys.now() + FREEZE_TIMEOUT;
        while !self.tasks.is_empty() {
            match self.sys.wait(-1, libc::WNOHANG) {
                Ok(Some(w)) => self.freeze_step(w, &mut released),
                Ok(None) | Err(_) => {
                    // Nothing to report: a task gone from /proc will never
                    // reach a ptrace-stop (its exit was reaped already).
                    let sys = &mut self.sys;
                    self.tasks.retain(|tid, _| sys.tgid(*tid).is_some());
                    if self.tasks.is_empty() {
                        break;
                    }
                    if self.sys.now() > deadline {
                        return Err(TracerError::FreezeTimeout {
                            pending: self.tasks.keys().copied().collect(),
                            secs: FREEZE_TIMEOUT.as_secs(),
                        });
                    }
                    self.sys.sleep(Duration::from_micros(200));
                }
            }
        }
        explain::say("detach", "PTRACE_DETACH from every task: they stay in group-stop, untraced — CRIU can seize them now");
        // Wait until every thread is really in group-stop.
        let deadline = self.sys.now() + Duration::from_secs(2);
        for g in &tgids {
            let Ok(tree) = self.sys.tree_tasks(*g) else {
                continue;
            };
            for (pid, tids) in tree.iter().filter(|(p, _)| p == g) {
                for tid in tids {
                    loop {
                        match self.sys.task_state(*pid, *tid) {
                            None | Some(TaskState::Stopped) => break,
                            Some(s) if s.has_ended() => break,
                            Some(state) if self.sys.now() > deadline => {
                                return Err(TracerError::NotStopped { pid: *tid, state })
                            }
                            Some(_) => self.sys.sleep(Duration::from_micros(200)),
                        }
                    }
                }
            }
        }
        Ok(tgids.into_iter().collect())
    }

    fn freeze_step(&mut self, w: Wait, released: &mut HashSet<Pid>) {
        let (pid, sig, event) = match w {
            Wait::Stopped { pid, sig, event } => (pid, sig, event),
            Wait::Exited(..) | Wait::Signaled(..) | Wait::Continued(_) => return self.on_wait(w),
        };
        let Some((tgid, new)) = self.known(pid) else {
            return;
        };
        if new && tgid == pid {
            // A new process reporting before its parent's FORK event.
            let _ = self.sys.kill(pid, libc::SIGSTOP);
        }
        let inject = match Stop::decode(&mut self.sys, pid, sig, event) {
            Ok(Stop::Signal(sig)) => sig, // deliver it; a SIGSTOP joins the group stop
            Ok(Stop::Seccomp { .. }) => {
                let _ = self.rewind(pid);
                0
            }
            Ok(Stop::Clone { new }) => {
                self.hold(new, tgid, released);
                0
            }
            Ok(Stop::Fork { new }) => {
                self.hold(new, new, released);
                0
            }
            Ok(Stop::Group(_) | Stop::Interrupt | Stop::Event(_)) | Err(_) => 0,
        };
        let _ = self.sys.detach(pid, inject);
        self.tasks.remove(&pid);
        released.insert(pid);
    }

    /// During a freeze: a task a clone or fork event named is one more to
    /// detach — unless it already reported and was let go.
    fn hold(&mut self, new: Pid, tgid: Pid, released: &HashSet<Pid>) {
        if released.contains(&new) {
            return;
        }
        if tgid == new {
            let _ = self.sys.kill(new, libc::SIGSTOP);
        }
        self.adopt(new, tgid);
    }
}

/// How long a freeze waits for every traced task to reach a ptrace-stop.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// The tracer's event handling through the seam, without root: each test
/// scripts what the kernel reports and checks what the tracer asks of it.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::stop::ptrace::scripted::{Call, Scripted};

    fn p(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn listen() -> StopSyscall {
        StopSyscall::parse("listen").expect("listen is a syscall")
    }

    /// Task `tid` stopped at the entry of listen(3, 128), our filter's trap.
    fn trapped_at_listen(k: &mut Scripted, tid: Pid) {
        k.regs_of(
            tid,
            arch::at_syscall(i64::from(listen().nr), [3, 128, 0, 0, 0, 0], 0x40_1002),
        )
        .event_msg_for(tid, libc::c_ulong::from(TRACE_TAG))
        .then_stop(tid, libc::SIGTRAP, libc::PTRACE_EVENT_SECCOMP);
    }

    fn tracer(k: Scripted) -> (State<Scripted>, Receiver<Event>) {
        let (tx, rx) = unbounded();
        (State::new(k, tx), rx)
    }

    fn seize(st: &mut State<Scripted>, pid: Pid, policy: Policy) {
        let (reply, r) = bounded(1);
        st.command(Cmd::Seize {
            pid,
            how: AttachHow::Seize,
            policy,
            reply,
        });
        r.recv().expect("a reply").expect("the seize succeeds");
    }

    fn stop_reached(events: &Receiver<Event>) -> StopHit {
        match events.try_recv() {
            Ok(Event::StopReached(hit)) => hit,
            Ok(Event::Failed(e)) => panic!("the freeze failed: {e}"),
            Err(_) => panic!("no stop was reported"),
        }
    }

    /// Position of a call in the log, to check the order of requests.
    fn at(k: &Scripted, call: Call) -> usize {
        k.calls
            .iter()
            .position(|c| *c == call)
            .unwrap_or_else(|| panic!("{call:?} was never made: {:?}", k.calls))
    }

    fn assert_clean(st: &State<Scripted>) {
        assert!(
            st.sys.violations.is_empty(),
            "the kernel would have answered otherwise: {:?}",
            st.sys.violations
        );
    }

    #[test]
    fn a_trace_stop_is_rewound_frozen_and_let_go() {
        let mut k = Scripted::new();
        k.task(p(100), p(100));
        trapped_at_listen(&mut k, p(100));
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.drain_waits();

        let hit = stop_reached(&events);
        assert_eq!((hit.tid, hit.tgid), (100, 100));
        assert_eq!(hit.syscall, "listen");
        assert_eq!(hit.args, [3, 128, 0, 0, 0, 0]);
        assert_eq!(hit.frozen, vec![100]);
        assert!(!hit.held);
        let r = st.sys.regs_now(p(100)).expect("registers");
        assert_eq!(
            (r.rip, r.rax, r.orig_rax),
            (0x40_1000, u64::from(listen().nr.unsigned_abs()), u64::MAX),
            "rewound: listen runs again once resumed"
        );
        let k = &st.sys;
        assert!(at(k, Call::SetRegs(p(100))) < at(k, Call::Kill(p(100), libc::SIGSTOP)));
        assert!(
            at(k, Call::Tgkill(p(100), p(100), libc::SIGSTOP)) < at(k, Call::Detach(p(100), 0)),
            "a SIGSTOP of its own is pending before the trapped task is let go"
        );
        assert!(!k.is_traced(p(100)), "detached before CRIU seizes");
        assert_eq!(
            st.sys.task_state(p(100), p(100)),
            Some(TaskState::Stopped),
            "in group-stop, as CRIU wants it"
        );
        assert!(st.tasks.is_empty());
        assert_eq!(st.policy, Policy::Passthrough);
        assert_clean(&st);
    }

    #[test]
    fn traps_of_other_filters_and_other_syscalls_run_on() {
        let mut k = Scripted::new();
        k.task(p(100), p(100));
        // A filter of the target's own (another SECCOMP_RET_DATA)...
        k.event_msg_for(p(100), 0x1234).then_stop(
            p(100),
            libc::SIGTRAP,
            libc::PTRACE_EVENT_SECCOMP,
        );
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.drain_waits();
        assert_eq!(st.sys.calls.last(), Some(&Call::Cont(p(100), 0)));
        // ... and our tag on a syscall that is not the stop point.
        let bind = StopSyscall::parse("bind").expect("bind");
        st.sys
            .regs_of(
                p(100),
                arch::at_syscall(i64::from(bind.nr), [3, 0, 16, 0, 0, 0], 0x1002),
            )
            .event_msg_for(p(100), libc::c_ulong::from(TRACE_TAG))
            .then_stop(p(100), libc::SIGTRAP, libc::PTRACE_EVENT_SECCOMP);
        st.drain_waits();
        assert_eq!(st.sys.calls.last(), Some(&Call::Cont(p(100), 0)));
        assert!(events.try_recv().is_err(), "no stop reported");
        assert_eq!(st.policy, Policy::Armed(listen()), "still armed");
        assert_clean(&st);
    }

    #[test]
    fn a_held_stop_stays_traced_and_unrewound() {
        let mut k = Scripted::new();
        k.task(p(100), p(100));
        trapped_at_listen(&mut k, p(100));
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Hold(listen()));
        st.drain_waits();
        let hit = stop_reached(&events);
        assert!(hit.held);
        assert!(hit.frozen.is_empty());
        assert!(st.sys.is_traced(p(100)), "the tracer keeps holding it");
        assert!(!st.sys.calls.contains(&Call::SetRegs(p(100))));
        assert_clean(&st);
    }

    /// The first race the matrix found: a new thread's first stop arrives
    /// before its parent's PTRACE_EVENT_CLONE names it.
    #[test]
    fn a_new_thread_reporting_before_its_clone_event_is_adopted_once() {
        let mut k = Scripted::new();
        k.task(p(100), p(100)).task(p(101), p(100));
        k.then_stop(p(101), libc::SIGTRAP, libc::PTRACE_EVENT_STOP)
            .event_msg_for(p(100), 101)
            .then_stop(p(100), libc::SIGTRAP, libc::PTRACE_EVENT_CLONE);
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.drain_waits();
        assert_eq!(
            st.tasks.get(&p(101)).map(|t| t.tgid),
            Some(p(100)),
            "the early thread belongs to its process"
        );
        assert!(st.sys.calls.contains(&Call::Cont(p(101), 0)));
        assert!(st.sys.calls.contains(&Call::Cont(p(100), 0)));
        // The new thread is the one that reaches the stop point.
        trapped_at_listen(&mut st.sys, p(101));
        st.drain_waits();
        let hit = stop_reached(&events);
        assert_eq!((hit.tid, hit.tgid), (101, 100));
        assert_eq!(hit.frozen, vec![100]);
        assert!(!st.sys.is_traced(p(100)) && !st.sys.is_traced(p(101)));
        assert_clean(&st);
    }

    /// Under load a FORK event can come after the child's whole life: its
    /// first stop, its run and its reaped exit (a pyenv shim's subshells
    /// did that under `runmh prebake` on a busy machine: the freeze then
    /// waited 5 s for the dead child and failed). Not adopted, not waited for.
    #[test]
    fn a_child_reaped_before_its_fork_event_is_not_waited_for() {
        let mut k = Scripted::new();
        k.task(p(100), p(100)).task(p(200), p(200));
        k.then_stop(p(200), libc::SIGSTOP, 0)
            .then_wait(Wait::Exited(p(200), 0))
            .event_msg_for(p(100), 200)
            .then_stop(p(100), libc::SIGTRAP, libc::PTRACE_EVENT_FORK);
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.drain_waits();
        assert!(
            !st.tasks.contains_key(&p(200)),
            "a reaped child is not a task: {:?}",
            st.tasks.keys().collect::<Vec<_>>()
        );
        trapped_at_listen(&mut st.sys, p(100));
        st.drain_waits();
        let hit = stop_reached(&events);
        assert_eq!(hit.frozen, vec![100]);
        assert_clean(&st);
    }

    /// The same race inside the freeze (Go runtimes create threads then,
    /// and it hung the freeze one run in ten): the new thread reports and
    /// is let go before the CLONE event names it, which must not make it a
    /// task to wait for again.
    #[test]
    fn a_thread_created_during_the_freeze_is_not_waited_for_twice() {
        let mut k = Scripted::new();
        k.task(p(100), p(100))
            .task(p(101), p(100))
            .task(p(102), p(100));
        trapped_at_listen(&mut k, p(101));
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.tasks.insert(
            p(101),
            Task {
                tgid: p(100),
                resume_on_stop: false,
            },
        );
        st.sys.traced(p(101), p(100));
        // Thread 100 was inside clone(2) when the freeze began.
        st.sys
            .then_stop(p(102), libc::SIGTRAP, libc::PTRACE_EVENT_STOP)
            .event_msg_for(p(100), 102)
            .then_stop(p(100), libc::SIGTRAP, libc::PTRACE_EVENT_CLONE);
        st.drain_waits();

        let hit = stop_reached(&events);
        assert_eq!(hit.tid, 101);
        assert_eq!(hit.frozen, vec![100]);
        let detaches_of_102 = st
            .sys
            .calls
            .iter()
            .filter(|c| matches!(c, Call::Detach(t, _) if *t == p(102)))
            .count();
        assert_eq!(detaches_of_102, 1, "let go once: {:?}", st.sys.calls);
        for t in [100, 101, 102] {
            assert!(!st.sys.is_traced(p(t)), "task {t} detached");
            assert_eq!(st.sys.task_state(p(100), p(t)), Some(TaskState::Stopped));
        }
        assert!(st.tasks.is_empty());
        assert_clean(&st);
    }

    /// The second race: another traced thread dequeues the process-directed
    /// SIGSTOP into its signal-delivery-stop, so no group-stop starts before
    /// the trapped thread is let go. Its own, thread-directed, SIGSTOP keeps
    /// it from re-executing the rewound syscall untraced (ENOSYS before the
    /// dump, threaded_server about one run in six).
    #[test]
    fn a_sigstop_taken_by_another_thread_still_freezes_the_trapped_one() {
        let mut k = Scripted::new();
        k.task(p(100), p(100)).task(p(101), p(100));
        k.sigstop_taken_by(p(100), p(100));
        trapped_at_listen(&mut k, p(101));
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.tasks.insert(
            p(101),
            Task {
                tgid: p(100),
                resume_on_stop: false,
            },
        );
        st.sys.traced(p(101), p(100));
        st.drain_waits();

        let hit = stop_reached(&events);
        assert_eq!((hit.tid, hit.frozen.clone()), (101, vec![100]));
        let k = &st.sys;
        assert!(
            at(k, Call::Tgkill(p(100), p(101), libc::SIGSTOP)) < at(k, Call::Detach(p(101), 0)),
            "the trapped thread gets its own SIGSTOP before it is let go"
        );
        assert!(
            k.calls.contains(&Call::Detach(p(100), libc::SIGSTOP)),
            "the thread that took the SIGSTOP is let go with it, so the group-stop starts"
        );
        for t in [100, 101] {
            assert_eq!(st.sys.task_state(p(100), p(t)), Some(TaskState::Stopped));
        }
        assert_clean(&st);
    }

    #[test]
    fn the_scripted_kernel_flags_a_rewound_task_let_go_without_sigstop() {
        // What the tests above rely on: without the thread-directed SIGSTOP
        // the scripted kernel reports the ENOSYS replay.
        let mut k = Scripted::new();
        k.traced(p(101), p(100));
        let r = arch::at_syscall(50, [0; 6], 2);
        k.set_regs(p(101), &r).expect("set regs");
        k.detach(p(101), 0).expect("detach");
        assert_eq!(k.violations.len(), 1, "{:?}", k.violations);
        assert_eq!(k.task_state(p(100), p(101)), Some(TaskState::Running));
    }

    /// After a restore: the stopped tree is re-seized, resumed at its
    /// seize stops, and the replayed trap runs on; a later real group-stop
    /// stays stopped (PTRACE_LISTEN); exits reach their watchers.
    #[test]
    fn a_restored_tree_is_reseized_and_its_replayed_trap_passes() {
        let mut k = Scripted::new();
        k.task(p(100), p(100)).task(p(101), p(100));
        k.state(p(100), TaskState::Stopped)
            .state(p(101), TaskState::Stopped);
        let (mut st, events) = tracer(k);
        st.policy = Policy::Armed(listen());
        let (reply, r) = bounded(1);
        st.command(Cmd::SeizeTree {
            root: p(100),
            reply,
        });
        let pids = r.recv().expect("a reply").expect("the tree is seized");
        assert_eq!(pids, vec![p(100)]);
        assert_eq!(st.policy, Policy::Passthrough);
        let k = &st.sys;
        assert!(at(k, Call::Seize(p(101))) < at(k, Call::Kill(p(100), libc::SIGCONT)));

        st.sys
            .then_stop(p(100), libc::SIGSTOP, libc::PTRACE_EVENT_STOP)
            .then_stop(p(101), libc::SIGSTOP, libc::PTRACE_EVENT_STOP);
        trapped_at_listen(&mut st.sys, p(101));
        st.drain_waits();
        assert!(st.sys.calls.contains(&Call::Cont(p(100), 0)));
        assert_eq!(st.sys.calls.last(), Some(&Call::Cont(p(101), 0)));
        assert!(
            !st.sys.calls.contains(&Call::SetRegs(p(101))),
            "passthrough: the replayed listen runs as it is"
        );
        assert!(events.try_recv().is_err(), "no second stop");

        // Someone sends the service SIGSTOP now: a real group-stop.
        st.sys
            .then_stop(p(100), libc::SIGSTOP, libc::PTRACE_EVENT_STOP);
        st.drain_waits();
        assert_eq!(st.sys.calls.last(), Some(&Call::Listen(p(100))));

        let (reply, exit) = bounded(1);
        st.command(Cmd::Watch { pid: p(100), reply });
        st.sys.then_wait(Wait::Exited(p(101), 0));
        st.sys.then_wait(Wait::Exited(p(100), 3));
        st.drain_waits();
        assert_eq!(exit.try_recv(), Ok(ExitStatus::Exited(3)));
        assert!(st.tasks.is_empty());
        assert_clean(&st);
    }

    #[test]
    fn a_task_that_never_stops_times_the_freeze_out() {
        let mut k = Scripted::new();
        k.task(p(100), p(100)).traced(p(101), p(100));
        k.silent(p(101));
        trapped_at_listen(&mut k, p(100));
        let (mut st, events) = tracer(k);
        seize(&mut st, p(100), Policy::Armed(listen()));
        st.tasks.insert(
            p(101),
            Task {
                tgid: p(100),
                resume_on_stop: false,
            },
        );
        st.drain_waits();
        match events.try_recv() {
            Ok(Event::Failed(TracerError::FreezeTimeout { pending, secs })) => {
                assert_eq!(pending, vec![p(101)]);
                assert_eq!(secs, 5);
            }
            Ok(Event::Failed(e)) => panic!("another failure: {e}"),
            Ok(Event::StopReached(_)) => panic!("frozen with a task that never stopped"),
            Err(_) => panic!("nothing reported"),
        }
    }
}

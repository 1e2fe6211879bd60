//! The tracer thread. ptrace is per-thread: the thread that seizes a task is
//! its tracer, and only it may issue ptrace requests for it. So one thread
//! owns every ptrace call — and, to keep wait semantics simple, every
//! `waitpid` of the process. Other threads talk to it over crossbeam
//! channels and wake it with a thread-directed SIGUSR2.

use super::hit::StopHit;
use crate::explain;
use crate::filter::{StopSyscall, TRACE_TAG};
use crate::sys::exit::ExitStatus;
use crate::sys::procfs::{self, TaskState};
use crate::sys::signal::is_stop_signal;
use crate::sys::{self, Wait};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

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
    Shutdown,
}

pub struct Tracer {
    tx: Sender<Cmd>,
    events: Receiver<Event>,
    tid: Pid,
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
                State::new(ev_tx).run(rx);
            })
            .map_err(TracerError::Spawn)?;
        let tid = tid_rx.recv().map_err(|_| TracerError::Gone)?;
        Ok(Tracer {
            tx,
            events,
            tid,
            handle: Some(handle),
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), TracerError> {
        self.tx.send(cmd).map_err(|_| TracerError::Gone)?;
        let _ = sys::tgkill(nix::unistd::getpid(), self.tid, libc::SIGUSR2);
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

struct State {
    tasks: HashMap<Pid, Task>,
    policy: Policy,
    watches: HashMap<Pid, Sender<ExitStatus>>,
    /// Exits reaped before anyone asked for them.
    unclaimed: HashMap<Pid, ExitStatus>,
    events: Sender<Event>,
    shutdown: bool,
}

impl State {
    fn new(events: Sender<Event>) -> Self {
        State {
            tasks: HashMap::new(),
            policy: Policy::Passthrough,
            watches: HashMap::new(),
            unclaimed: HashMap::new(),
            events,
            shutdown: false,
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
                self.policy = policy;
                let _ = reply.send(self.attach(pid, how));
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
            Cmd::Shutdown => self.shutdown = true,
        }
    }

    fn attach(&mut self, pid: Pid, how: AttachHow) -> Result<(), TracerError> {
        match how {
            AttachHow::Seize => {
                sys::ptrace_seize(pid, PTRACE_OPTIONS)
                    .map_err(|source| TracerError::Seize { pid, source })?;
                explain::say("ptrace", &format!("PTRACE_SEIZE {pid} with TRACESECCOMP|TRACECLONE|TRACEFORK|TRACEVFORK: the task keeps running, and unlike PTRACE_ATTACH no SIGSTOP is sent"));
            }
            AttachHow::LegacyAttach => {
                sys::ptrace_attach(pid).map_err(|source| TracerError::Attach { pid, source })?;
                // PTRACE_ATTACH sends SIGSTOP; swallow that stop, then set options.
                loop {
                    match sys::waitpid(pid.as_raw(), 0) {
                        Ok(Some(Wait::Stopped { .. })) => break,
                        Ok(Some(_)) => {
                            return Err(TracerError::Attach {
                                pid,
                                source: Errno::ESRCH,
                            })
                        }
                        Ok(None) => continue,
                        Err(source) => return Err(TracerError::Attach { pid, source }),
                    }
                }
                sys::ptrace_setoptions(pid, PTRACE_OPTIONS & !libc::PTRACE_O_EXITKILL)
                    .map_err(|source| TracerError::Attach { pid, source })?;
                sys::ptrace_cont(pid, 0).map_err(|source| TracerError::Attach { pid, source })?;
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
        let tree = procfs::tree_tasks(root)
            .map_err(|source| TracerError::ListTasks { pid: root, source })?;
        for (pid, tids) in &tree {
            for tid in tids {
                let stopped = procfs::task_state(*pid, *tid) == Some(TaskState::Stopped);
                if let Err(source) = sys::ptrace_seize(*tid, PTRACE_OPTIONS) {
                    // A task that is exiting (or a zombie) cannot be seized
                    // and needs no tracer any more; its exit is reaped as usual.
                    if procfs::task_state(*pid, *tid).map_or(true, TaskState::has_ended) {
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
            let _ = sys::kill(*p, libc::SIGCONT);
        }
        Ok(pids)
    }

    fn drain_waits(&mut self) {
        loop {
            match sys::waitpid(-1, libc::WNOHANG) {
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

    fn on_stop(&mut self, pid: Pid, sig: i32, event: i32) {
        let tgid = match self.tasks.get(&pid) {
            Some(t) => t.tgid,
            // A task auto-attached through TRACECLONE/TRACEFORK can report
            // its first stop before its parent's event does.
            None => {
                let Some(tgid) = procfs::tgid(pid) else {
                    // Reaped since it stopped: nothing left to resume.
                    return;
                };
                self.tasks.insert(
                    pid,
                    Task {
                        tgid,
                        resume_on_stop: false,
                    },
                );
                tgid
            }
        };
        let r = match event {
            0 => sys::ptrace_cont(pid, sig), // signal-delivery-stop: deliver it
            libc::PTRACE_EVENT_SECCOMP => return self.on_seccomp(pid, tgid),
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                if let Some((new, tgid)) = created_by(pid, tgid, event) {
                    self.tasks.entry(new).or_insert(Task {
                        tgid,
                        resume_on_stop: false,
                    });
                }
                sys::ptrace_cont(pid, 0)
            }
            libc::PTRACE_EVENT_STOP if is_stop_signal(sig) => {
                let t = self
                    .tasks
                    .get_mut(&pid)
                    .map(|t| std::mem::take(&mut t.resume_on_stop));
                if t == Some(true) {
                    sys::ptrace_cont(pid, 0)
                } else {
                    // A real group-stop: stay stopped but keep reporting
                    // (ptrace(2), "PTRACE_LISTEN"), as an untraced task would.
                    sys::ptrace_listen(pid)
                }
            }
            _ => sys::ptrace_cont(pid, 0),
        };
        if r.is_err() {
            // ESRCH: the task died (e.g. SIGKILL) between the stop and now.
            self.tasks.remove(&pid);
        }
    }

    fn on_seccomp(&mut self, tid: Pid, tgid: Pid) {
        let target = match self.policy {
            Policy::Armed(s) | Policy::Hold(s) => Some(s),
            Policy::Passthrough => None,
        };
        let ours = sys::ptrace_geteventmsg(tid)
            .map(|m| m == TRACE_TAG as libc::c_ulong)
            .unwrap_or(false);
        let regs = sys::ptrace_getregs(tid);
        let hit = match (target, &regs) {
            (Some(s), Ok(r)) if ours && i32::try_from(r.orig_rax) == Ok(s.nr) => Some((s, *r)),
            _ => None,
        };
        let Some((syscall, r)) = hit else {
            if target.is_none() {
                explain::say("ptrace", &format!("task {tid} trapped at its traced syscall again; the tracer lets it run (PTRACE_CONT)"));
            }
            if sys::ptrace_cont(tid, 0).is_err() {
                self.tasks.remove(&tid);
            }
            return;
        };
        let mut hit = StopHit {
            tid: tid.as_raw(),
            tgid: tgid.as_raw(),
            syscall: syscall.name(),
            nr: i64::from(syscall.nr),
            args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
            at_unix_ms: crate::sys::time::unix_ms(),
            frozen: Vec::new(),
            held: false,
        };
        explain::say(
            "seccomp",
            &format!("task {tid} called {}({}, {}, ...): SECCOMP_RET_TRACE stopped it before the kernel ran the call (PTRACE_EVENT_SECCOMP)", hit.syscall, sys::signed_arg(r.rdi), sys::signed_arg(r.rsi)),
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
    /// executes the same syscall again: skip this one (orig_rax = -1), put
    /// its number back in rax, and step rip back over the 2-byte `syscall`
    /// instruction (x86_64).
    fn rewind(&self, tid: Pid) -> Result<(), TracerError> {
        let mut r =
            sys::ptrace_getregs(tid).map_err(|source| TracerError::Regs { pid: tid, source })?;
        r.rax = r.orig_rax;
        r.orig_rax = u64::MAX;
        r.rip -= 2;
        sys::ptrace_setregs(tid, &r).map_err(|source| TracerError::Regs { pid: tid, source })?;
        explain::say("rewind", &format!("task {tid}: orig_rax=-1 skips the call now, rax=nr and rip-=2 make it run again when resumed — after the restore"));
        Ok(())
    }

    /// Group-stops every traced process and detaches from every task, so
    /// that CRIU's own PTRACE_SEIZE finds no other tracer. Stopped, detached
    /// tasks stay stopped (kernel `__ptrace_unlink` re-instates the group
    /// stop) and CRIU restores them stopped.
    fn freeze(&mut self, hit: Option<(Pid, Pid)>) -> Result<Vec<Pid>, TracerError> {
        if let Some((t, _)) = hit {
            self.rewind(t)?;
        }
        let tgids: BTreeSet<Pid> = self.tasks.values().map(|t| t.tgid).collect();
        for g in &tgids {
            let _ = sys::kill(*g, libc::SIGSTOP);
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
            let _ = sys::tgkill(tgid, t, libc::SIGSTOP);
            let _ = sys::ptrace_detach(t, 0);
            self.tasks.remove(&t);
        }
        for t in self.tasks.keys() {
            let _ = sys::ptrace_interrupt(*t);
        }
        // Tasks already detached in this freeze, the trapped one included:
        // a new thread can report its first stops (and be detached) before
        // its parent's CLONE event names it, which must not bring it back
        // as one to wait for.
        let mut released: std::collections::HashSet<Pid> =
            hit.into_iter().map(|(t, _)| t).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tasks.is_empty() {
            match sys::waitpid(-1, libc::WNOHANG) {
                Ok(Some(w)) => self.freeze_step(w, &mut released),
                Ok(None) | Err(_) => {
                    if Instant::now() > deadline {
                        return Err(TracerError::FreezeTimeout {
                            pending: self.tasks.keys().copied().collect(),
                            secs: 5,
                        });
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        explain::say("detach", "PTRACE_DETACH from every task: they stay in group-stop, untraced — CRIU can seize them now");
        // Wait until every thread is really in group-stop.
        let deadline = Instant::now() + Duration::from_secs(2);
        for g in &tgids {
            let Ok(tree) = procfs::tree_tasks(*g) else {
                continue;
            };
            for (pid, tids) in tree.iter().filter(|(p, _)| p == g) {
                for tid in tids {
                    loop {
                        match procfs::task_state(*pid, *tid) {
                            None | Some(TaskState::Stopped) => break,
                            Some(s) if s.has_ended() => break,
                            Some(state) if Instant::now() > deadline => {
                                return Err(TracerError::NotStopped { pid: *tid, state })
                            }
                            Some(_) => std::thread::sleep(Duration::from_micros(200)),
                        }
                    }
                }
            }
        }
        Ok(tgids.into_iter().collect())
    }

    fn freeze_step(&mut self, w: Wait, released: &mut std::collections::HashSet<Pid>) {
        let (pid, sig, event) = match w {
            Wait::Stopped { pid, sig, event } => (pid, sig, event),
            Wait::Exited(..) | Wait::Signaled(..) | Wait::Continued(_) => return self.on_wait(w),
        };
        let tgid = match self.tasks.get(&pid) {
            Some(t) => t.tgid,
            None => {
                let Some(tgid) = procfs::tgid(pid) else {
                    // Reaped since it stopped: nothing left to detach.
                    return;
                };
                if tgid == pid {
                    let _ = sys::kill(pid, libc::SIGSTOP);
                }
                self.tasks.insert(
                    pid,
                    Task {
                        tgid,
                        resume_on_stop: false,
                    },
                );
                tgid
            }
        };
        let inject = match event {
            0 => sig, // deliver it; a SIGSTOP joins the group stop
            libc::PTRACE_EVENT_SECCOMP => {
                let _ = self.rewind(pid);
                0
            }
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                if let Some((new, tgid)) = created_by(pid, tgid, event) {
                    if !released.contains(&new) {
                        if tgid == new {
                            let _ = sys::kill(new, libc::SIGSTOP);
                        }
                        self.tasks.entry(new).or_insert(Task {
                            tgid,
                            resume_on_stop: false,
                        });
                    }
                }
                0
            }
            _ => 0,
        };
        let _ = sys::ptrace_detach(pid, inject);
        self.tasks.remove(&pid);
        released.insert(pid);
    }
}

/// The task a `PTRACE_EVENT_CLONE`/`FORK`/`VFORK` of `pid` (of thread
/// group `tgid`) created, and the new task's thread group: the parent's
/// for a thread, its own otherwise.
fn created_by(pid: Pid, tgid: Pid, event: i32) -> Option<(Pid, Pid)> {
    let new = Pid::from_raw(i32::try_from(sys::ptrace_geteventmsg(pid).ok()?).ok()?);
    Some((
        new,
        if event == libc::PTRACE_EVENT_CLONE {
            tgid
        } else {
            new
        },
    ))
}

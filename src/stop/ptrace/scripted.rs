//! A scripted kernel for the tracer's unit tests: the waits it reports come
//! from a script, every request is recorded, and a small model of what
//! matters here — which tasks are traced, which `SIGSTOP`s are pending for a
//! thread or its process, which processes are in group-stop — checks the
//! tracer's requests the way the kernel would answer them:
//!
//! * a ptrace request for a task that is not traced fails `ESRCH`, and is
//!   noted as a violation (the tracer lost track of its tasks);
//! * a task detached right before its rewound syscall with no `SIGSTOP`
//!   pending for it runs on untraced and re-executes the syscall, which the
//!   filter then fails with ENOSYS: noted as a violation;
//! * a detached task is in state `T` only if a `SIGSTOP` stops it.
//!
//! One race is played on request: [`Scripted::sigstop_taken_by`] makes a
//! process-directed `SIGSTOP` be dequeued at once by another, traced,
//! thread, which reports it as a signal-delivery-stop (no group-stop starts
//! until the tracer resumes that thread with the signal).

use super::{Ptrace, Regs};
use crate::sys::procfs::TaskState;
use crate::sys::{SysResult, Wait};
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// One request the tracer made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Seize(Pid),
    Attach(Pid),
    SetOptions(Pid),
    Interrupt(Pid),
    Cont(Pid, i32),
    Listen(Pid),
    Detach(Pid, i32),
    SetRegs(Pid),
    Kill(Pid, i32),
    Tgkill(Pid, Pid, i32),
}

#[derive(Default)]
pub struct Scripted {
    waits: VecDeque<Wait>,
    pub calls: Vec<Call>,
    pub violations: Vec<String>,
    event_msgs: HashMap<Pid, VecDeque<libc::c_ulong>>,
    regs: HashMap<Pid, Regs>,
    tgids: HashMap<Pid, Pid>,
    traced: HashSet<Pid>,
    /// Processes with a process-directed SIGSTOP pending.
    shared_stop: HashSet<Pid>,
    /// Threads with a thread-directed SIGSTOP pending.
    thread_stop: HashSet<Pid>,
    group_stopped: HashSet<Pid>,
    rewound: HashSet<Pid>,
    /// Per process: the thread that dequeues a process-directed SIGSTOP.
    taker: HashMap<Pid, Pid>,
    states: HashMap<Pid, TaskState>,
    /// Traced tasks that never reach a ptrace-stop (stuck in the kernel).
    silent: HashSet<Pid>,
    tree: Vec<(Pid, Vec<Pid>)>,
    elapsed: Duration,
    start: Option<Instant>,
}

fn stop(pid: Pid, sig: i32, event: i32) -> Wait {
    Wait::Stopped { pid, sig, event }
}

impl Scripted {
    pub fn new() -> Scripted {
        Scripted {
            start: Some(Instant::now()),
            ..Scripted::default()
        }
    }

    /// A task of process `tgid` that the kernel knows (listed in /proc).
    pub fn task(&mut self, tid: Pid, tgid: Pid) -> &mut Self {
        self.tgids.insert(tid, tgid);
        match self.tree.iter_mut().find(|(p, _)| *p == tgid) {
            Some((_, tids)) => {
                tids.push(tid);
                tids.sort();
            }
            None => self.tree.push((tgid, vec![tid])),
        }
        self
    }

    /// A task already traced by us (seized earlier).
    pub fn traced(&mut self, tid: Pid, tgid: Pid) -> &mut Self {
        self.task(tid, tgid);
        self.traced.insert(tid);
        self
    }

    pub fn state(&mut self, tid: Pid, s: TaskState) -> &mut Self {
        self.states.insert(tid, s);
        self
    }

    pub fn event_msg_for(&mut self, tid: Pid, msg: libc::c_ulong) -> &mut Self {
        self.event_msgs.entry(tid).or_default().push_back(msg);
        self
    }

    pub fn regs_of(&mut self, tid: Pid, r: Regs) -> &mut Self {
        self.regs.insert(tid, r);
        self
    }

    /// The kernel reports this stop next (after those already scripted).
    pub fn then_stop(&mut self, tid: Pid, sig: i32, event: i32) -> &mut Self {
        self.waits.push_back(stop(tid, sig, event));
        self
    }

    pub fn then_wait(&mut self, w: Wait) -> &mut Self {
        self.waits.push_back(w);
        self
    }

    /// `tid` never answers PTRACE_INTERRUPT.
    pub fn silent(&mut self, tid: Pid) -> &mut Self {
        self.silent.insert(tid);
        self
    }

    /// The race: a SIGSTOP sent to `tgid` is dequeued at once by `thread`.
    pub fn sigstop_taken_by(&mut self, tgid: Pid, thread: Pid) -> &mut Self {
        self.taker.insert(tgid, thread);
        self
    }

    pub fn regs_now(&self, tid: Pid) -> Option<Regs> {
        self.regs.get(&tid).copied()
    }

    pub fn is_traced(&self, tid: Pid) -> bool {
        self.traced.contains(&tid)
    }

    pub fn pending_waits(&self) -> usize {
        self.waits.len()
    }

    fn tgid_of(&self, tid: Pid) -> Option<Pid> {
        self.tgids.get(&tid).copied()
    }

    fn require_traced(&mut self, what: &str, tid: Pid) -> SysResult<()> {
        if self.traced.contains(&tid) {
            Ok(())
        } else {
            self.violations
                .push(format!("{what} on task {tid}, which is not traced"));
            Err(Errno::ESRCH)
        }
    }

    fn stopped_by_sigstop(&self, tid: Pid) -> bool {
        self.thread_stop.contains(&tid)
            || self
                .tgid_of(tid)
                .is_some_and(|g| self.shared_stop.contains(&g) || self.group_stopped.contains(&g))
    }
}

impl Ptrace for Scripted {
    fn seize(&mut self, tid: Pid, _options: libc::c_int) -> SysResult<()> {
        self.calls.push(Call::Seize(tid));
        if !self.tgids.contains_key(&tid) {
            return Err(Errno::ESRCH);
        }
        if !self.traced.insert(tid) {
            return Err(Errno::EPERM);
        }
        Ok(())
    }
    fn attach(&mut self, tid: Pid) -> SysResult<()> {
        self.calls.push(Call::Attach(tid));
        self.traced.insert(tid);
        // PTRACE_ATTACH sends SIGSTOP: reported first.
        self.waits.push_front(stop(tid, libc::SIGSTOP, 0));
        Ok(())
    }
    fn set_options(&mut self, tid: Pid, _options: libc::c_int) -> SysResult<()> {
        self.calls.push(Call::SetOptions(tid));
        self.require_traced("PTRACE_SETOPTIONS", tid)
    }
    fn interrupt(&mut self, tid: Pid) -> SysResult<()> {
        self.calls.push(Call::Interrupt(tid));
        self.require_traced("PTRACE_INTERRUPT", tid)?;
        // A task with a stop already scripted reports that one; any other
        // reports a PTRACE_EVENT_STOP (a group-stop if one is pending).
        if !self.silent.contains(&tid)
            && !self
                .waits
                .iter()
                .any(|w| matches!(w, Wait::Stopped { pid, .. } if *pid == tid))
        {
            let sig = if self.stopped_by_sigstop(tid) {
                libc::SIGSTOP
            } else {
                libc::SIGTRAP
            };
            self.waits
                .push_back(stop(tid, sig, libc::PTRACE_EVENT_STOP));
        }
        Ok(())
    }
    fn cont(&mut self, tid: Pid, sig: i32) -> SysResult<()> {
        self.calls.push(Call::Cont(tid, sig));
        self.require_traced("PTRACE_CONT", tid)
    }
    fn listen(&mut self, tid: Pid) -> SysResult<()> {
        self.calls.push(Call::Listen(tid));
        self.require_traced("PTRACE_LISTEN", tid)
    }
    fn detach(&mut self, tid: Pid, sig: i32) -> SysResult<()> {
        self.calls.push(Call::Detach(tid, sig));
        self.require_traced("PTRACE_DETACH", tid)?;
        self.traced.remove(&tid);
        if let (libc::SIGSTOP, Some(g)) = (sig, self.tgid_of(tid)) {
            // Resumed with the SIGSTOP it dequeued: the group-stop starts.
            self.group_stopped.insert(g);
            self.shared_stop.remove(&g);
        }
        if self.stopped_by_sigstop(tid) {
            self.states.insert(tid, TaskState::Stopped);
        } else {
            self.states.insert(tid, TaskState::Running);
            if self.rewound.contains(&tid) {
                self.violations.push(format!(
                    "task {tid} was detached right before its rewound syscall with no SIGSTOP pending: it re-executes the syscall untraced (ENOSYS)"
                ));
            }
        }
        Ok(())
    }
    fn event_msg(&mut self, tid: Pid) -> SysResult<libc::c_ulong> {
        self.require_traced("PTRACE_GETEVENTMSG", tid)?;
        self.event_msgs
            .get_mut(&tid)
            .and_then(VecDeque::pop_front)
            .ok_or(Errno::ESRCH)
    }
    fn regs(&mut self, tid: Pid) -> SysResult<Regs> {
        self.require_traced("PTRACE_GETREGS", tid)?;
        self.regs.get(&tid).copied().ok_or(Errno::ESRCH)
    }
    fn set_regs(&mut self, tid: Pid, regs: &Regs) -> SysResult<()> {
        self.calls.push(Call::SetRegs(tid));
        self.require_traced("PTRACE_SETREGS", tid)?;
        self.regs.insert(tid, *regs);
        self.rewound.insert(tid);
        Ok(())
    }
    fn wait(&mut self, pid: libc::pid_t, _options: libc::c_int) -> SysResult<Option<Wait>> {
        let at = if pid == -1 {
            (!self.waits.is_empty()).then_some(0)
        } else {
            self.waits.iter().position(|w| {
                matches!(w, Wait::Stopped { pid: p, .. } | Wait::Exited(p, _) | Wait::Signaled(p, _) | Wait::Continued(p) if p.as_raw() == pid)
            })
        };
        let Some(w) = at.and_then(|i| self.waits.remove(i)) else {
            return Ok(None);
        };
        match w {
            Wait::Stopped { pid, sig, event } => {
                // A task the kernel auto-attached (clone, fork) is traced
                // from its first stop on.
                self.traced.insert(pid);
                if event == 0 && sig == libc::SIGSTOP && !self.thread_stop.remove(&pid) {
                    if let Some(g) = self.tgid_of(pid) {
                        self.shared_stop.remove(&g);
                    }
                }
            }
            Wait::Exited(pid, _) | Wait::Signaled(pid, _) => {
                // Reaped: gone from /proc too.
                self.traced.remove(&pid);
                self.tgids.remove(&pid);
                for (_, tids) in &mut self.tree {
                    tids.retain(|t| *t != pid);
                }
                self.tree.retain(|(g, tids)| *g != pid && !tids.is_empty());
            }
            Wait::Continued(_) => {}
        }
        Ok(Some(w))
    }
    fn kill(&mut self, pid: Pid, sig: i32) -> SysResult<()> {
        self.calls.push(Call::Kill(pid, sig));
        // kill(2) signals the process: the tracer always names its leader.
        let g = pid;
        match sig {
            libc::SIGSTOP => match self.taker.get(&g).copied() {
                Some(t) if self.traced.contains(&t) => {
                    self.waits.push_front(stop(t, libc::SIGSTOP, 0));
                }
                _ => {
                    self.shared_stop.insert(g);
                }
            },
            libc::SIGCONT => {
                self.shared_stop.remove(&g);
                self.group_stopped.remove(&g);
            }
            _ => {}
        }
        Ok(())
    }
    fn tgkill(&mut self, tgid: Pid, tid: Pid, sig: i32) -> SysResult<()> {
        self.calls.push(Call::Tgkill(tgid, tid, sig));
        if sig == libc::SIGSTOP {
            self.thread_stop.insert(tid);
        }
        Ok(())
    }
    fn tgid(&mut self, tid: Pid) -> Option<Pid> {
        self.tgids.get(&tid).copied()
    }
    fn task_state(&mut self, _pid: Pid, tid: Pid) -> Option<TaskState> {
        let g = self.tgid_of(tid)?;
        match self.states.get(&tid).copied() {
            _ if !self.traced.contains(&tid) && self.group_stopped.contains(&g) => {
                Some(TaskState::Stopped)
            }
            Some(s) => Some(s),
            None if self.traced.contains(&tid) => Some(TaskState::TracingStop),
            None => Some(TaskState::Sleeping),
        }
    }
    fn tree_tasks(&mut self, root: Pid) -> std::io::Result<Vec<(Pid, Vec<Pid>)>> {
        match self.tree.iter().position(|(p, _)| *p == root) {
            Some(0) => Ok(self.tree.clone()),
            Some(i) => Ok(vec![self.tree[i].clone()]),
            None => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }
    fn now(&mut self) -> Instant {
        self.start.unwrap_or_else(Instant::now) + self.elapsed
    }
    fn sleep(&mut self, d: Duration) {
        self.elapsed += d;
    }
}

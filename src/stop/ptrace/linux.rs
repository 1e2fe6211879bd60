//! The real kernel: the system-call wrappers of `crate::sys` and `/proc`.

use super::{Ptrace, Regs};
use crate::sys::procfs::{self, TaskState};
use crate::sys::{self, SysResult, Wait};
use nix::libc;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

pub struct Linux;

impl Ptrace for Linux {
    fn seize(&mut self, tid: Pid, options: libc::c_int) -> SysResult<()> {
        sys::ptrace_seize(tid, options)
    }
    fn attach(&mut self, tid: Pid) -> SysResult<()> {
        sys::ptrace_attach(tid)
    }
    fn set_options(&mut self, tid: Pid, options: libc::c_int) -> SysResult<()> {
        sys::ptrace_setoptions(tid, options)
    }
    fn interrupt(&mut self, tid: Pid) -> SysResult<()> {
        sys::ptrace_interrupt(tid)
    }
    fn cont(&mut self, tid: Pid, sig: i32) -> SysResult<()> {
        sys::ptrace_cont(tid, sig)
    }
    fn listen(&mut self, tid: Pid) -> SysResult<()> {
        sys::ptrace_listen(tid)
    }
    fn detach(&mut self, tid: Pid, sig: i32) -> SysResult<()> {
        sys::ptrace_detach(tid, sig)
    }
    fn event_msg(&mut self, tid: Pid) -> SysResult<libc::c_ulong> {
        sys::ptrace_geteventmsg(tid)
    }
    #[cfg(target_arch = "x86_64")]
    fn regs(&mut self, tid: Pid) -> SysResult<Regs> {
        sys::ptrace_getregs(tid)
    }
    #[cfg(target_arch = "x86_64")]
    fn set_regs(&mut self, tid: Pid, regs: &Regs) -> SysResult<()> {
        sys::ptrace_setregs(tid, regs)
    }
    // The tracer refuses to arm on other architectures before it would
    // touch registers (`arch::supported`).
    #[cfg(not(target_arch = "x86_64"))]
    fn regs(&mut self, _tid: Pid) -> SysResult<Regs> {
        Err(nix::errno::Errno::ENOSYS)
    }
    #[cfg(not(target_arch = "x86_64"))]
    fn set_regs(&mut self, _tid: Pid, _regs: &Regs) -> SysResult<()> {
        Err(nix::errno::Errno::ENOSYS)
    }
    fn wait(&mut self, pid: libc::pid_t, options: libc::c_int) -> SysResult<Option<Wait>> {
        sys::waitpid(pid, options)
    }
    fn kill(&mut self, pid: Pid, sig: i32) -> SysResult<()> {
        sys::kill(pid, sig)
    }
    fn tgkill(&mut self, tgid: Pid, tid: Pid, sig: i32) -> SysResult<()> {
        sys::tgkill(tgid, tid, sig)
    }
    fn tgid(&mut self, tid: Pid) -> Option<Pid> {
        procfs::tgid(tid)
    }
    fn task_state(&mut self, pid: Pid, tid: Pid) -> Option<TaskState> {
        procfs::task_state(pid, tid)
    }
    fn tree_tasks(&mut self, root: Pid) -> std::io::Result<Vec<(Pid, Vec<Pid>)>> {
        procfs::tree_tasks(root)
    }
    fn now(&mut self) -> Instant {
        Instant::now()
    }
    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d)
    }
}

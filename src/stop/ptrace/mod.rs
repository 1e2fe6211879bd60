//! The tracer's seam: everything the tracer thread asks of the kernel —
//! ptrace requests, waits, signals, the few `/proc` reads, and the clock of
//! its deadlines — behind one small trait, [`Ptrace`]. [`linux::Linux`] is
//! the real one; `scripted::Scripted` (tests only) plays the kernel's side
//! from a script, so the tracer's event handling is unit-tested without
//! root, races included.
//!
//! A stop is decoded once, from the wait status and (for events) the
//! ptrace event message, into a [`Stop`]; the tracer matches on that.

pub mod linux;
#[cfg(test)]
pub mod scripted;

use crate::sys::procfs::TaskState;
use crate::sys::{SysResult, Wait};
use nix::libc;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

pub use arch::Regs;

/// The kernel, as the tracer thread sees it.
pub trait Ptrace {
    fn seize(&mut self, tid: Pid, options: libc::c_int) -> SysResult<()>;
    fn attach(&mut self, tid: Pid) -> SysResult<()>;
    fn set_options(&mut self, tid: Pid, options: libc::c_int) -> SysResult<()>;
    fn interrupt(&mut self, tid: Pid) -> SysResult<()>;
    fn cont(&mut self, tid: Pid, sig: i32) -> SysResult<()>;
    fn listen(&mut self, tid: Pid) -> SysResult<()>;
    fn detach(&mut self, tid: Pid, sig: i32) -> SysResult<()>;
    fn event_msg(&mut self, tid: Pid) -> SysResult<libc::c_ulong>;
    fn regs(&mut self, tid: Pid) -> SysResult<Regs>;
    fn set_regs(&mut self, tid: Pid, regs: &Regs) -> SysResult<()>;
    /// `waitpid(pid, options | __WALL)`; `Ok(None)` when WNOHANG found nothing.
    fn wait(&mut self, pid: libc::pid_t, options: libc::c_int) -> SysResult<Option<Wait>>;
    fn kill(&mut self, pid: Pid, sig: i32) -> SysResult<()>;
    fn tgkill(&mut self, tgid: Pid, tid: Pid, sig: i32) -> SysResult<()>;
    /// The process of `tid`; `None` once it is reaped.
    fn tgid(&mut self, tid: Pid) -> Option<Pid>;
    /// The state of thread `tid` of process `pid`; `None` once it is reaped.
    fn task_state(&mut self, pid: Pid, tid: Pid) -> Option<TaskState>;
    /// Every thread of every process under `root`, parents first.
    fn tree_tasks(&mut self, root: Pid) -> std::io::Result<Vec<(Pid, Vec<Pid>)>>;
    fn now(&mut self) -> Instant;
    fn sleep(&mut self, d: Duration);
}

/// A ptrace-stop, decoded once (ptrace(2), "Stopped states").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Signal-delivery-stop: `sig` is delivered if the tracee is resumed
    /// with it.
    Signal(i32),
    /// `PTRACE_EVENT_STOP` with a stopping signal: a group-stop (also how a
    /// task seized while stopped first reports).
    Group(i32),
    /// `PTRACE_EVENT_STOP` with another signal: a `PTRACE_INTERRUPT`, or
    /// the first stop of a task auto-attached at clone or fork.
    Interrupt,
    /// `PTRACE_EVENT_CLONE`: `new` is a new thread of the same process.
    Clone { new: Pid },
    /// `PTRACE_EVENT_FORK` or `VFORK`: `new` is a new process.
    Fork { new: Pid },
    /// `PTRACE_EVENT_SECCOMP`: `data` is the filter's `SECCOMP_RET_DATA`.
    Seccomp { data: libc::c_ulong },
    /// Any other event (`EXEC`, `EXIT`, `VFORK_DONE`): resumed as it is.
    Event(i32),
}

impl Stop {
    /// Decodes the stop `waitpid` reported for `tid` (`sig` = `WSTOPSIG`,
    /// `event` = `status >> 16`). Fails only if the event message cannot
    /// be read, which means the tracee is gone (`ESRCH`).
    pub fn decode(sys: &mut impl Ptrace, tid: Pid, sig: i32, event: i32) -> SysResult<Stop> {
        Ok(match event {
            0 => Stop::Signal(sig),
            libc::PTRACE_EVENT_STOP if crate::sys::signal::is_stop_signal(sig) => Stop::Group(sig),
            libc::PTRACE_EVENT_STOP => Stop::Interrupt,
            libc::PTRACE_EVENT_CLONE => Stop::Clone {
                new: new_task(sys, tid)?,
            },
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => Stop::Fork {
                new: new_task(sys, tid)?,
            },
            libc::PTRACE_EVENT_SECCOMP => Stop::Seccomp {
                data: sys.event_msg(tid)?,
            },
            e => Stop::Event(e),
        })
    }
}

/// The task a clone or fork event names (its message is the new pid_t).
fn new_task(sys: &mut impl Ptrace, tid: Pid) -> SysResult<Pid> {
    let msg = sys.event_msg(tid)?;
    i32::try_from(msg)
        .map(Pid::from_raw)
        .map_err(|_| nix::errno::Errno::EINVAL)
}

/// The syscall a task is stopped at the entry of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallEntry {
    pub nr: i64,
    pub args: [u64; 6],
}

/// The register code knows this architecture only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the tracer reads and rewinds syscall registers on x86_64 only, not on {arch}: use --backend notify")]
pub struct UnsupportedArch {
    pub arch: &'static str,
}

/// The registers of a syscall-entry stop, per architecture.
#[cfg(target_arch = "x86_64")]
pub mod arch {
    use super::{SyscallEntry, UnsupportedArch};

    pub type Regs = nix::libc::user_regs_struct;

    pub fn supported() -> Result<(), UnsupportedArch> {
        Ok(())
    }

    /// At a seccomp stop the syscall number is in `orig_rax` (`rax` holds
    /// `-ENOSYS`), the arguments in rdi, rsi, rdx, r10, r8, r9.
    pub fn entry(r: &Regs) -> Result<SyscallEntry, UnsupportedArch> {
        Ok(SyscallEntry {
            nr: crate::sys::signed_arg(r.orig_rax),
            args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
        })
    }

    /// Makes a task stopped at syscall entry execute the same syscall again
    /// once resumed: `orig_rax = -1` skips this one, `rax` gets the number
    /// back, and `rip` steps back over the 2-byte `syscall` instruction.
    pub fn rewind(r: &mut Regs) -> Result<(), UnsupportedArch> {
        r.rax = r.orig_rax;
        r.orig_rax = u64::MAX;
        r.rip -= 2;
        Ok(())
    }

    /// A register holding the signed value `v` (two's complement).
    #[cfg(test)]
    fn unsigned(v: i64) -> u64 {
        u64::from_ne_bytes(v.to_ne_bytes())
    }

    /// Registers of a task stopped at the entry of syscall `nr` (tests).
    #[cfg(test)]
    pub fn at_syscall(nr: i64, args: [u64; 6], rip: u64) -> Regs {
        Regs {
            r15: 0,
            r14: 0,
            r13: 0,
            r12: 0,
            rbp: 0,
            rbx: 0,
            r11: 0,
            r10: args[3],
            r9: args[5],
            r8: args[4],
            rax: unsigned(-i64::from(nix::libc::ENOSYS)),
            rcx: 0,
            rdx: args[2],
            rsi: args[1],
            rdi: args[0],
            orig_rax: unsigned(nr),
            rip,
            cs: 0x33,
            eflags: 0x246,
            rsp: 0x7ffc_0000_0000,
            ss: 0x2b,
            fs_base: 0,
            gs_base: 0,
            ds: 0,
            es: 0,
            fs: 0,
            gs: 0,
        }
    }
}

/// Elsewhere the crate still builds; the TRACE backend refuses to arm.
#[cfg(not(target_arch = "x86_64"))]
pub mod arch {
    use super::{SyscallEntry, UnsupportedArch};

    /// No register access on this architecture.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Regs;

    fn unsupported() -> UnsupportedArch {
        UnsupportedArch {
            arch: std::env::consts::ARCH,
        }
    }

    pub fn supported() -> Result<(), UnsupportedArch> {
        Err(unsupported())
    }

    pub fn entry(_: &Regs) -> Result<SyscallEntry, UnsupportedArch> {
        Err(unsupported())
    }

    pub fn rewind(_: &mut Regs) -> Result<(), UnsupportedArch> {
        Err(unsupported())
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn rewind_replays_the_syscall_instruction() {
        let mut r = arch::at_syscall(50, [3, 128, 0, 0, 0, 0], 0x40_1002);
        assert_eq!(
            arch::entry(&r),
            Ok(SyscallEntry {
                nr: 50,
                args: [3, 128, 0, 0, 0, 0]
            })
        );
        arch::rewind(&mut r).unwrap();
        assert_eq!(r.rax, 50, "the number is back where `syscall` reads it");
        assert_eq!(r.orig_rax, u64::MAX, "-1: the kernel skips the call now");
        assert_eq!(r.rip, 0x40_1000, "back over the 2-byte syscall instruction");
        assert_eq!((r.rdi, r.rsi), (3, 128), "arguments untouched");
    }

    #[test]
    fn stops_decode_from_the_wait_status_and_event_message() {
        let mut k = scripted::Scripted::new();
        let t = Pid::from_raw(10);
        k.traced(t, t);
        k.event_msg_for(t, 11);
        k.event_msg_for(t, 12);
        k.event_msg_for(t, 0x6d68);
        let mut d = |sig, event| Stop::decode(&mut k, t, sig, event);
        assert_eq!(d(libc::SIGUSR1, 0), Ok(Stop::Signal(libc::SIGUSR1)));
        assert_eq!(
            d(libc::SIGSTOP, libc::PTRACE_EVENT_STOP),
            Ok(Stop::Group(libc::SIGSTOP))
        );
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_STOP),
            Ok(Stop::Interrupt)
        );
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE),
            Ok(Stop::Clone {
                new: Pid::from_raw(11)
            })
        );
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_VFORK),
            Ok(Stop::Fork {
                new: Pid::from_raw(12)
            })
        );
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_SECCOMP),
            Ok(Stop::Seccomp { data: 0x6d68 })
        );
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC),
            Ok(Stop::Event(libc::PTRACE_EVENT_EXEC))
        );
        // No message left: as for a tracee that vanished.
        assert_eq!(
            d(libc::SIGTRAP, libc::PTRACE_EVENT_CLONE),
            Err(nix::errno::Errno::ESRCH)
        );
    }
}

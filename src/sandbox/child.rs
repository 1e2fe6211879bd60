//! The sandbox child: everything between `clone(2)` and `execve(2)`.
//!
//! It runs in a copy of a possibly multi-threaded supervisor, so it only
//! issues system calls on data the parent prepared ([`ChildPlan`]): no
//! allocation, no locks, no panics. A failing step writes `(step, errno)` to
//! the CLOEXEC error pipe and ends with `_exit(127)`; a successful `execve`
//! closes that pipe, which is how the parent learns the exec happened.

use super::Step;
use crate::sys;
use nix::libc;
use std::ffi::{CStr, CString};
use std::os::fd::RawFd;

/// One way the child may finish: which filter to load and which environment
/// to exec with. The parent picks one after the clone (for `--backend auto`
/// only then is it known whether ptrace works).
pub struct ChildVariant {
    pub filter: Option<(Vec<libc::sock_filter>, libc::c_ulong)>,
    pub envp: Vec<*const libc::c_char>,
}

/// The child's side of a user namespace (see `userns`): it waits on
/// `ready` for its id maps, then attaches the detached mount copies instead
/// of binding (which the namespace's locked mounts refuse).
pub struct ChildUserns {
    pub ready: RawFd,
    pub root_tree: RawFd,
    /// One per `binds` entry, in the same order.
    pub trees: Vec<RawFd>,
}

/// How the child comes to be in the instance cgroup, known only once the
/// clone returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildCgroup {
    /// The system gave the instance no cgroup.
    NoCgroup,
    /// clone3 started it there (CLONE_INTO_CGROUP).
    Born,
    /// The kernel refused that: it moves itself in through this
    /// `cgroup.procs`, first, so nothing of the tree runs outside it.
    Join(RawFd),
}

/// Everything the child needs, prepared before the clone.
pub struct ChildPlan {
    pub root: CString,
    /// (host path, path under the new root) pairs, in bind order.
    pub binds: Vec<(CString, CString)>,
    pub proc_dir: CString,
    pub dev_null: CString,
    pub stdout_log: CString,
    pub stderr_log: CString,
    pub cwd: CString,
    pub program: CString,
    pub argv: Vec<*const libc::c_char>,
    pub variants: Vec<ChildVariant>,
    pub ids: Option<(libc::uid_t, libc::gid_t)>,
    pub userns: Option<ChildUserns>,
    /// The caller's umask, given back to the service (ours is 077).
    pub umask: libc::mode_t,
    pub sync_read: RawFd,
    pub error_write: RawFd,
    pub listener_sock: RawFd,
    /// Whether to take SIGKILL when the supervisor thread that cloned us
    /// ends (see `sys::set_parent_death_signal`).
    pub parent_death: bool,
    /// A pidfd of the cloning runmh: a parent that died before the
    /// parent-death signal was set is seen through it (prctl(2) does not
    /// fire for a death that came first, and getppid() is 0 across the
    /// PID namespace, so the usual getppid() check cannot tell).
    pub parent_pidfd: Option<RawFd>,
    /// Where the child says "my parent-death signal is set" (one byte):
    /// the supervisor writes the sync byte only after reading it, so a
    /// supervisor that dies before that leaves the sync pipe empty (EOF
    /// below), and one that dies after it kills us.
    pub armed_write: Option<RawFd>,
}

fn fail(plan: &ChildPlan, step: Step, errno: nix::errno::Errno) -> ! {
    let mut msg = [0u8; 8];
    msg[0] = step as u8;
    msg[4..8].copy_from_slice(&(errno as i32).to_ne_bytes());
    let _ = sys::write_all(plan.error_write, &msg);
    sys::exit_now(127)
}

macro_rules! step {
    ($plan:expr, $step:expr, $call:expr) => {
        if let Err(e) = $call {
            fail($plan, $step, e)
        }
    };
}

const DOT: &CStr = c".";
const SLASH: &CStr = c"/";
const PROC: &CStr = c"proc";

/// The child's whole life. Never returns.
pub fn run(plan: &ChildPlan, cgroup: ChildCgroup) -> ! {
    sys::unblock_all_signals();
    // "0" moves the writer (cgroups(7)); close_fds_except closes the fd.
    if let ChildCgroup::Join(fd) = cgroup {
        step!(plan, Step::JoinCgroup, sys::write_all(fd, b"0"));
    }
    if let Some(u) = &plan.userns {
        // Until the parent wrote our maps we are the overflow uid, unable
        // to open what we must.
        let mut b = [0u8; 1];
        match sys::read(u.ready, &mut b) {
            Ok(1) => {}
            Ok(_) => sys::exit_now(126),
            Err(e) => fail(plan, Step::WaitIdMap, e),
        }
        sys::close(u.ready);
    }
    // Nothing we do may propagate back to the host's mount namespace
    // (mount_namespaces(7): a new namespace copies the propagation type).
    step!(
        plan,
        Step::MakePrivate,
        sys::mount(None, SLASH, None, libc::MS_REC | libc::MS_PRIVATE)
    );
    if let Some(u) = &plan.userns {
        // The same tree from the parent's lone copies (OPEN_TREE_CLONE
        // without AT_RECURSIVE): here a bind of `/` is refused, since it
        // would separate it from its locked submounts.
        step!(
            plan,
            Step::BindRoot,
            sys::move_mount_fd(u.root_tree, &plan.root)
        );
        for ((_, dst), tree) in plan.binds.iter().zip(&u.trees) {
            step!(plan, Step::BindSpecial, sys::move_mount_fd(*tree, dst));
        }
    } else {
        // Non-recursive on purpose: the talk's "separate but almost the same" root.
        step!(
            plan,
            Step::BindRoot,
            sys::mount(Some(SLASH), &plan.root, None, libc::MS_BIND)
        );
        for (src, dst) in &plan.binds {
            step!(
                plan,
                Step::BindSpecial,
                sys::mount(Some(src), dst, None, libc::MS_BIND)
            );
        }
    }
    // pivot_root(".", ".") stacks the old root on the new one; detaching it
    // then leaves only the new root, with no put_old directory needed
    // (pivot_root(2), NOTES section; chroot would not change the namespace's root).
    step!(plan, Step::Chdir, sys::chdir(&plan.root));
    step!(plan, Step::PivotRoot, sys::pivot_root(DOT, DOT));
    // A fresh proc: PIDs as the new PID namespace sees them. In a user
    // namespace the kernel mounts a proc only while another one is fully
    // visible (mount_too_revealing in fs/namespace.c): the old root's, so
    // before it is detached.
    let mount_proc = || {
        sys::mount(
            Some(PROC),
            &plan.proc_dir,
            Some(PROC),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )
    };
    if plan.userns.is_some() {
        step!(plan, Step::MountProc, mount_proc());
    }
    step!(
        plan,
        Step::UnmountOldRoot,
        sys::umount2(DOT, libc::MNT_DETACH)
    );
    step!(plan, Step::Chdir, sys::chdir(SLASH));
    if plan.userns.is_none() {
        step!(plan, Step::MountProc, mount_proc());
    }
    // CRIU needs the dumped tree's root to lead its own session.
    step!(plan, Step::Setsid, sys::setsid());
    // No tty and nothing outside the root: stdin from /dev/null, output
    // appended to log files (O_APPEND, so a restored writer keeps appending).
    let null = match sys::open(&plan.dev_null, libc::O_RDWR | libc::O_CLOEXEC, 0) {
        Ok(fd) => fd,
        Err(e) => fail(plan, Step::OpenDevNull, e),
    };
    step!(plan, Step::Stdio, sys::dup2(null, 0));
    sys::close(null);
    let log_flags = libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC;
    for (log, target) in [(&plan.stdout_log, 1), (&plan.stderr_log, 2)] {
        // Opened as root before the id switch: the service writes through
        // the inherited fd, nobody else may read what it prints.
        let fd = match sys::open(log, log_flags, 0o600) {
            Ok(fd) => fd,
            Err(e) => fail(plan, Step::OpenLog, e),
        };
        step!(plan, Step::Stdio, sys::dup2(fd, target));
        sys::close(fd);
    }
    step!(plan, Step::Cwd, sys::chdir(&plan.cwd));
    if let Some((uid, gid)) = plan.ids {
        step!(plan, Step::SetIds, sys::set_ids(uid, gid));
    }
    // After the id switch, which clears it (prctl(2)); it survives execve.
    // CRIU dumps the setting and restores it, so a restored root dies with
    // the `runmh restore` that supervises it too (its parent: --restore-sibling).
    if plan.parent_death {
        step!(
            plan,
            Step::ParentDeath,
            sys::set_parent_death_signal(libc::SIGKILL)
        );
        // The supervisor may have died before the line above: nothing
        // would kill us then, and nobody is there to report to.
        if let Some(fd) = plan.parent_pidfd {
            if matches!(sys::pidfd_exited(fd), Ok(true)) {
                sys::exit_now(126)
            }
        }
        // The pidfd alone leaves a window: it turns readable only once the
        // supervisor's last thread is released, after that thread's exit
        // re-parented us (forget_original_parent in kernel/exit.c reads
        // pdeath_signal then). A prctl landing in between is never fired,
        // and the sync byte may be in the pipe already. So the supervisor
        // waits for this byte before it writes the sync byte.
        if let Some(fd) = plan.armed_write {
            step!(plan, Step::ParentDeath, sys::write_all(fd, &[1]));
            sys::close(fd);
        }
    }
    // Every inherited fd but our three pipes goes: a stray fd (say, one on
    // the host's /dev) makes criu dump fail with "Can't lookup mount".
    let mut keep = [plan.sync_read, plan.error_write, plan.listener_sock];
    step!(plan, Step::CloseFds, sys::close_fds_except(&mut keep));

    // Wait for the supervisor: for TRACE it must PTRACE_SEIZE us before the
    // filter exists, or the first trapped call would find no tracer (ENOSYS).
    let mut choice = [0u8; 1];
    match sys::read(plan.sync_read, &mut choice) {
        Ok(1) => {}
        Ok(_) => sys::exit_now(126), // supervisor gone: nothing to report to
        Err(e) => fail(plan, Step::Sync, e),
    }
    sys::close(plan.sync_read);
    if choice[0] == super::SYNC_ABORT {
        sys::exit_now(126)
    }
    let Some(variant) = plan.variants.get(usize::from(choice[0])) else {
        fail(plan, Step::Sync, nix::errno::Errno::EINVAL)
    };

    if let Some((bpf, flags)) = &variant.filter {
        if plan.ids.is_some_and(|(uid, _)| uid != 0) {
            // Without CAP_SYS_ADMIN, seccomp(2) demands no_new_privs.
            step!(plan, Step::NoNewPrivs, sys::set_no_new_privs());
        }
        // The last step before exec: nothing of ours runs under the filter.
        let listener = match sys::seccomp_load(bpf, *flags) {
            Ok(fd) => fd,
            Err(e) => fail(plan, Step::Seccomp, e),
        };
        if *flags & libc::SECCOMP_FILTER_FLAG_NEW_LISTENER != 0 {
            step!(
                plan,
                Step::SendListener,
                sys::send_fd(plan.listener_sock, listener)
            );
            // CRIU cannot dump an "anon_inode:seccomp notify" fd (an
            // unsupported fd type, its dump fails): the target must not
            // keep its own copy once the supervisor has one.
            sys::close(listener);
        }
    }
    if plan.listener_sock >= 0 {
        sys::close(plan.listener_sock);
    }
    sys::set_umask(plan.umask);
    let errno = sys::execve(&plan.program, &plan.argv, &variant.envp);
    fail(plan, Step::Exec, errno)
}

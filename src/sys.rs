//! Thin wrappers around the raw system calls that nix does not cover the way
//! this project needs them. Every `unsafe` block of the crate that talks to
//! the kernel directly lives here, each with the invariant that makes it sound.
//!
//! Functions marked "async-signal-safe" are the only ones the sandbox child
//! may call between `clone(2)` and `execve(2)`: they neither allocate nor take
//! locks, they only issue system calls on memory prepared before the clone.
//!
//! Beside them, in safe code, what the system reports and every layer
//! reads: [`procfs`] (the one reader of `/proc/<pid>`), [`signal`] names,
//! [`exit`] statuses and [`time`].

pub mod exit;
pub mod procfs;
pub mod signal;
pub mod time;

use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::CStr;
use std::os::fd::RawFd;

/// Result of a raw system call: the value, or the errno it failed with.
pub type SysResult<T> = Result<T, Errno>;

fn check(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

/// [`check`] for calls whose result is a C `int` (a pid or an fd) that the
/// raw syscall interface widens to a `long`.
fn check_int(ret: libc::c_long) -> SysResult<libc::c_int> {
    check(ret).and_then(|v| libc::c_int::try_from(v).map_err(|_| Errno::EOVERFLOW))
}

/// [`check`] for calls whose result is a byte count.
fn check_len(ret: libc::c_long) -> SysResult<usize> {
    check(ret).and_then(|v| usize::try_from(v).map_err(|_| Errno::EOVERFLOW))
}

/// A pid the kernel handed out as an unsigned number (`std::process::Child::id`,
/// `seccomp_notif.pid`).
pub fn pid_from_u32(id: u32) -> Pid {
    // A kernel pid is at most PID_MAX_LIMIT (2^22, include/linux/threads.h),
    // so it always fits the kernel's own `pid_t`, an `int`.
    #[allow(clippy::cast_possible_wrap)]
    Pid::from_raw(id as libc::pid_t)
}

/// The pid of a child started with `std::process::Command`.
pub fn child_pid(child: &std::process::Child) -> Pid {
    pid_from_u32(child.id())
}

/// A syscall argument register shown as the signed C `int`/`long` the callee
/// reads it as (a pid of -1 for "every process", say).
pub fn signed_arg(reg: u64) -> i64 {
    i64::from_ne_bytes(reg.to_ne_bytes())
}

/// `clone(2)` with fork semantics (no new stack: the child continues on a
/// copy of the caller's stack, exactly like `fork`). Returns 0 in the child.
///
/// # Safety
/// The caller must treat the child like the child of `fork()` in a possibly
/// multi-threaded program: only async-signal-safe calls until `execve` or
/// `_exit`, no allocation, no locks, no return into code that would run
/// destructors twice.
pub unsafe fn clone_fork(flags: libc::c_int) -> SysResult<libc::pid_t> {
    // The flags are a bit set: CLONE_IO is the sign bit of the `int`, and
    // the kernel reads only the low 32 bits (lower_32_bits in kernel/fork.c).
    #[allow(clippy::cast_sign_loss)]
    let flags = (flags | libc::SIGCHLD) as libc::c_uint;
    // SAFETY: SYS_clone with a NULL stack behaves like fork(2); the x86_64
    // argument order is (flags, stack, parent_tid, child_tid, tls) and the
    // tid pointers are unused because no CLONE_*_SETTID flag is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::from(flags),
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    check_int(ret)
}

/// `struct clone_args` of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2,
/// Linux 5.7): every field is a u64, so the layout has no padding.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's CLONE_INTO_CGROUP (include/uapi/linux/sched.h); the libc crate
/// declares it as a C `int`, too narrow for bit 33.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// [`fork_raw`], but the child starts in the cgroup v2 directory open as
/// `cgroup_dir` (clone3 with CLONE_INTO_CGROUP). Moving a process by
/// writing `cgroup.procs` takes the kernel's global threadgroup rwsem for
/// writing, which waits for an RCU grace period (5-30 ms here under load);
/// a fork into the cgroup only takes it for reading. Errors (ENOSYS before
/// Linux 5.7, EOPNOTSUPP for a cgroup that cannot hold processes, ...)
/// leave no child: the caller can fall back to a fork and a write.
///
/// # Safety
/// Same contract as [`clone_fork`].
pub unsafe fn fork_into_cgroup(cgroup_dir: std::os::fd::BorrowedFd<'_>) -> SysResult<libc::pid_t> {
    // SAFETY: forwarded contract: the caller keeps to async-signal-safe calls in the child.
    unsafe { clone_into_cgroup(0, cgroup_dir) }
}

/// [`clone_fork`] with the same `flags` (CLONE_NEWPID, CLONE_NEWNS, ...),
/// the child started in the cgroup v2 directory open as `cgroup_dir`
/// through clone3's CLONE_INTO_CGROUP, as [`fork_into_cgroup`] explains:
/// the child is in the cgroup from its first instruction, with no
/// `cgroup.procs` write. Whether the kernel refused the call itself (and
/// a clone plus a write may still work) is [`clone3_refused`]; an error
/// leaves no child.
///
/// # Safety
/// Same contract as [`clone_fork`].
pub unsafe fn clone_into_cgroup(
    flags: libc::c_int,
    cgroup_dir: std::os::fd::BorrowedFd<'_>,
) -> SysResult<libc::pid_t> {
    use std::os::fd::AsRawFd;
    let fd = u64::try_from(cgroup_dir.as_raw_fd()).map_err(|_| Errno::EBADF)?;
    // The same bit set as clone(2)'s (CLONE_IO is the `int`'s sign bit);
    // clone3 wants the exit signal in its own field, not in the low byte
    // of the flags (EINVAL).
    #[allow(clippy::cast_sign_loss)]
    let clone_flags = u64::from(flags as libc::c_uint);
    let args = CloneArgs {
        flags: clone_flags | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: fd,
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed, alive for
    // the call; with stack 0 and stack_size 0 the child runs on a copy of
    // the caller's stack, exactly like fork(2); no *_SETTID flag is set, so
    // the kernel writes no tid anywhere.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_ref(&args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    check_int(ret)
}

/// Whether a [`clone_into_cgroup`] failed because this kernel (or a
/// seccomp policy around us) does not offer it, rather than for a reason
/// a clone and a `cgroup.procs` write would meet too: ENOSYS (no clone3,
/// before Linux 5.3, or a container's filter), E2BIG (clone3 without
/// CLONE_ARGS_SIZE_VER2, Linux 5.3-5.6), EINVAL (an unknown flag) and
/// EOPNOTSUPP (a cgroup the kernel will not fork into).
pub fn clone3_refused(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOSYS | Errno::E2BIG | Errno::EINVAL | Errno::EOPNOTSUPP
    )
}

/// `fork(2)` through the raw syscall, so that no atfork handler runs in the
/// child (they may take locks held by other threads of the parent).
///
/// # Safety
/// Same contract as [`clone_fork`].
pub unsafe fn fork_raw() -> SysResult<libc::pid_t> {
    // SAFETY: forwarded contract: the caller keeps to async-signal-safe calls in the child.
    unsafe { clone_fork(0) }
}

/// Async-signal-safe `mount(2)`.
pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> SysResult<()> {
    let p = |c: Option<&CStr>| c.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either NULL or a NUL-terminated string that
    // outlives the call; `data` is NULL, which mount(2) accepts for all types used here.
    let ret = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, std::ptr::null()) };
    check(ret as libc::c_long).map(drop)
}

/// `open_tree(dirfd=AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)`:
/// a detached copy of the one mount at `path`, without the mounts under it.
pub fn open_tree_clone(path: &CStr) -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // OPEN_TREE_CLONE (1) and OPEN_TREE_CLOEXEC (O_CLOEXEC): linux/mount.h.
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    #[allow(clippy::cast_sign_loss)]
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of
    // the call; the other arguments are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::c_ulong::from(flags),
        )
    };
    let fd = check_int(ret)?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Async-signal-safe `move_mount(tree, "", AT_FDCWD, target,
/// MOVE_MOUNT_F_EMPTY_PATH)`: attaches a tree from [`open_tree_clone`].
pub fn move_mount_fd(tree: RawFd, target: &CStr) -> SysResult<()> {
    // MOVE_MOUNT_F_EMPTY_PATH: linux/mount.h.
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_ulong = 0x4;
    // SAFETY: the empty string and `target` are valid NUL-terminated
    // strings for the duration of the call; `tree` is a plain integer (a
    // stale fd only makes the call fail).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    check(ret).map(drop)
}

/// Async-signal-safe `umount2(2)`.
pub fn umount2(target: &CStr, flags: libc::c_int) -> SysResult<()> {
    // SAFETY: target is a valid NUL-terminated string.
    let ret = unsafe { libc::umount2(target.as_ptr(), flags) };
    check(ret as libc::c_long).map(drop)
}

/// Async-signal-safe `pivot_root(2)` (glibc has no wrapper).
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult<()> {
    // SAFETY: both arguments are valid NUL-terminated strings.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret).map(drop)
}

/// Async-signal-safe `chdir(2)`.
pub fn chdir(path: &CStr) -> SysResult<()> {
    // SAFETY: path is a valid NUL-terminated string.
    check(unsafe { libc::chdir(path.as_ptr()) } as libc::c_long).map(drop)
}

/// Async-signal-safe `open(2)`.
pub fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> SysResult<RawFd> {
    // SAFETY: path is a valid NUL-terminated string; mode is passed by value.
    check_int(unsafe { libc::open(path.as_ptr(), flags, mode as libc::c_uint) } as libc::c_long)
}

/// Async-signal-safe `dup2(2)`.
pub fn dup2(old: RawFd, new: RawFd) -> SysResult<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    check(unsafe { libc::dup2(old, new) } as libc::c_long).map(drop)
}

/// Async-signal-safe: clears FD_CLOEXEC so `fd` survives `execve`.
pub fn clear_cloexec(fd: RawFd) -> SysResult<()> {
    // SAFETY: fcntl(F_SETFD) only changes the descriptor's flags.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } as libc::c_long).map(drop)
}

/// Async-signal-safe `close(2)`; errors are irrelevant to the callers.
pub fn close(fd: RawFd) {
    // SAFETY: closing a descriptor number has no memory-safety impact; the
    // callers own the descriptors they close.
    unsafe { libc::close(fd) };
}

/// Async-signal-safe `close_range(2)` over `[first, last]`.
fn close_range(first: libc::c_uint, last: libc::c_uint) -> SysResult<()> {
    if first > last {
        return Ok(());
    }
    // SAFETY: close_range only manipulates the descriptor table.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    check(ret).map(drop)
}

/// Async-signal-safe: closes every fd above 2 except those in `keep`
/// (sorted in place; negative entries, "no such fd", are skipped).
pub fn close_fds_except(keep: &mut [RawFd]) -> SysResult<()> {
    keep.sort_unstable();
    let mut next: libc::c_uint = 3;
    for &fd in keep.iter() {
        let Ok(fd) = libc::c_uint::try_from(fd) else {
            continue;
        };
        if fd >= next {
            close_range(next, fd - 1)?;
            next = fd + 1;
        }
    }
    close_range(next, libc::c_uint::MAX)
}

/// Async-signal-safe `setsid(2)`.
pub fn setsid() -> SysResult<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() } as libc::c_long).map(drop)
}

/// Async-signal-safe identity change: supplementary groups, gid, then uid
/// (setgid must come first: after setuid to non-root it would be refused).
pub fn set_ids(uid: libc::uid_t, gid: libc::gid_t) -> SysResult<()> {
    let groups = [gid];
    // SAFETY: `groups` is a valid array of one gid for the duration of the call.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) } as libc::c_long)?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) } as libc::c_long)?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) } as libc::c_long).map(drop)
}

/// Async-signal-safe `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long).map(drop)
}

/// Async-signal-safe `prctl(PR_SET_PDEATHSIG, sig)`: `sig` is sent to this
/// process when the thread that created it exits (prctl(2): the parent
/// *thread*, not the process). The kernel forces SIGKILL onto a PID
/// namespace's init when it comes from an ancestor namespace.
pub fn set_parent_death_signal(sig: libc::c_int) -> SysResult<()> {
    let sig = libc::c_ulong::try_from(sig).map_err(|_| Errno::EINVAL)?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) } as libc::c_long).map(drop)
}

/// `flock(fd, LOCK_SH or LOCK_EX | LOCK_NB)`: whether the lock was taken
/// (false when another open file description holds a conflicting one). A
/// lock lives as long as its open file description, and goes away with its
/// last descriptor however the holder ends.
pub fn try_flock(fd: RawFd, exclusive: bool) -> SysResult<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock only changes the lock state of the descriptor's file.
        let r = unsafe { libc::flock(fd, op | libc::LOCK_NB) };
        match check(r as libc::c_long) {
            Ok(_) => return Ok(true),
            Err(Errno::EWOULDBLOCK) => return Ok(false),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Async-signal-safe `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)`.
/// Returns the listener fd when `flags` has `SECCOMP_FILTER_FLAG_NEW_LISTENER`.
pub fn seccomp_load(filter: &[libc::sock_filter], flags: libc::c_ulong) -> SysResult<RawFd> {
    // The kernel refuses programs over BPF_MAXINSNS (4096) the same way.
    let len = libc::c_ushort::try_from(filter.len()).map_err(|_| Errno::EINVAL)?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`, which stays borrowed (and so alive
    // and unmoved) for the duration of the call; the kernel copies it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    check_int(ret)
}

/// Async-signal-safe `read(2)` of exactly one buffer; returns bytes read.
pub fn read(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        // SAFETY: buf is a valid writable slice of buf.len() bytes.
        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match check_len(r as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Async-signal-safe `write(2)` of a whole small buffer (pipe writes up to
/// PIPE_BUF are atomic, which is all the callers need).
pub fn write_all(fd: RawFd, buf: &[u8]) -> SysResult<()> {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the slice bounds guarantee the pointer and length are valid.
        let r = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        match check_len(r as libc::c_long) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(n) => off += n,
        }
    }
    Ok(())
}

/// Async-signal-safe `execve(2)`; only returns on failure.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    debug_assert!(argv.last().is_some_and(|p| p.is_null()));
    debug_assert!(envp.last().is_some_and(|p| p.is_null()));
    // SAFETY: argv and envp are NULL-terminated arrays of pointers to
    // NUL-terminated strings that the caller keeps alive (they were built
    // before the fork and are never freed in the child).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

/// Async-signal-safe `getppid(2)`.
pub fn getppid() -> libc::pid_t {
    // SAFETY: no arguments; getppid cannot fail.
    unsafe { libc::getppid() }
}

/// Async-signal-safe `_exit(2)`: no atexit handlers, no stdio flush.
pub fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit never returns and touches no user-space state.
    unsafe { libc::_exit(code) }
}

/// The size of one fd in an SCM_RIGHTS message, as the CMSG macros take it.
// Four bytes: fits every integer type.
#[allow(clippy::cast_possible_truncation)]
const RAW_FD_SIZE: libc::c_uint = std::mem::size_of::<RawFd>() as libc::c_uint;

/// The control buffer of an SCM_RIGHTS message with one fd: a stack
/// array; CMSG_SPACE of an int is 24 on x86_64, and 64 leaves room on
/// every ABI.
type FdControl = [u64; 8];

/// A message header for one data byte (`iov`) and the control buffer
/// `cbuf`; the pointers it holds are valid while both are.
fn one_fd_msghdr(iov: &mut libc::iovec, cbuf: &mut FdControl) -> libc::msghdr {
    // SAFETY: msghdr is plain data; zeroed is a valid initial state.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(cbuf);
    msg
}

/// Async-signal-safe `sendmsg(2)` of one fd with SCM_RIGHTS over a socket.
pub fn send_fd(sock: RawFd, fd: RawFd) -> SysResult<()> {
    let mut cbuf: FdControl = [0; 8];
    let mut byte = [b'F'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut msg = one_fd_msghdr(&mut iov, &mut cbuf);
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(RAW_FD_SIZE) } as usize;
    // SAFETY: msg_control points at cbuf, which is large enough for one
    // cmsghdr carrying one int (checked by CMSG_SPACE above being <= 64);
    // CMSG_FIRSTHDR therefore returns a pointer inside cbuf.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(RAW_FD_SIZE) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    loop {
        // SAFETY: msg and everything it points to live on this stack frame.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match check(r as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop),
        }
    }
}

/// Receives one fd sent with [`send_fd`]; `Ok(None)` on orderly EOF.
pub fn recv_fd(sock: RawFd) -> SysResult<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let mut cbuf: FdControl = [0; 8];
    let mut byte = [0u8];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut msg = one_fd_msghdr(&mut iov, &mut cbuf);
    let n = loop {
        // SAFETY: msg points at stack buffers that outlive the call.
        let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match check(r as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR/CMSG_DATA stay
    // within msg_controllen, and an SCM_RIGHTS message carries an fd we now own.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(Errno::EBADMSG);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(Some(std::os::fd::OwnedFd::from_raw_fd(fd)))
    }
}

/// `kill(2)` with a raw signal number (nix's `Signal` cannot express
/// real-time signals, which the NOTIFY marker uses).
pub fn kill(pid: Pid, sig: libc::c_int) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::kill(pid.as_raw(), sig) } as libc::c_long).map(drop)
}

/// `tgkill(2)`: a signal to one thread of this process.
pub fn tgkill(tgid: Pid, tid: Pid, sig: libc::c_int) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), sig) }).map(drop)
}

/// The calling thread's kernel thread id.
pub fn gettid() -> Pid {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // The kernel's gettid returns a pid_t (an int), widened to a long by
    // the syscall interface.
    #[allow(clippy::cast_possible_truncation)]
    Pid::from_raw(tid as libc::pid_t)
}

/// `SIGRTMAX` as this libc defines it (a function in glibc).
pub fn sigrtmax() -> libc::c_int {
    libc::SIGRTMAX()
}

/// `SIGRTMIN` as this libc defines it.
pub fn sigrtmin() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Blocks `signals` in the calling thread (and so in threads it spawns later).
pub fn block_signals(signals: &[libc::c_int]) -> SysResult<()> {
    let set = sigset(signals);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Errno::from_raw(r));
    }
    Ok(())
}

/// Unblocks every signal in the calling thread (used in a forked child
/// before exec, so the target does not inherit the supervisor's mask).
pub fn unblock_all_signals() {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it; the call
    // is async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Waits up to `timeout` for one of `signals` (which must be blocked);
/// `Ok(None)` on timeout.
pub fn sigtimedwait(
    signals: &[libc::c_int],
    timeout: std::time::Duration,
) -> SysResult<Option<libc::c_int>> {
    let set = sigset(signals);
    let ts = libc::timespec {
        // Longer than time_t can say is as good as forever.
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: set and ts are initialised and live for the call; siginfo is not requested.
    let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    if r < 0 {
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => Ok(None),
            e => Err(e),
        }
    } else {
        Ok(Some(r))
    }
}

/// A decoded `waitpid` status with raw signal numbers (nix's decoder
/// rejects real-time signals, which would lose events of traced programs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Exited(Pid, i32),
    Signaled(Pid, i32),
    /// A stop: `sig` is the stop signal, `event` the ptrace event (0 for a
    /// plain signal-delivery-stop).
    Stopped {
        pid: Pid,
        sig: i32,
        event: i32,
    },
    Continued(Pid),
}

/// `waitpid(pid, options | __WALL)`; `Ok(None)` when WNOHANG found nothing.
pub fn waitpid(pid: libc::pid_t, options: libc::c_int) -> SysResult<Option<Wait>> {
    let mut status: libc::c_int = 0;
    let r = loop {
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, options | libc::__WALL) };
        if r < 0 && Errno::last() == Errno::EINTR {
            continue;
        }
        break r;
    };
    if r < 0 {
        return Err(Errno::last());
    }
    if r == 0 {
        return Ok(None);
    }
    let p = Pid::from_raw(r);
    let w = if libc::WIFEXITED(status) {
        Wait::Exited(p, libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Wait::Signaled(p, libc::WTERMSIG(status))
    } else if libc::WIFSTOPPED(status) {
        Wait::Stopped {
            pid: p,
            sig: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }
    } else {
        Wait::Continued(p)
    };
    Ok(Some(w))
}

/// Raw `ptrace(2)` request with integer data (signals, options).
fn ptrace_raw(req: libc::c_uint, pid: Pid, addr: usize, data: usize) -> SysResult<libc::c_long> {
    Errno::clear();
    // SAFETY: the requests issued through this helper take integer `addr`
    // and `data` (options, signal numbers), never pointers.
    let r = unsafe { libc::ptrace(req, pid.as_raw(), addr, data) };
    if r == -1 && Errno::last_raw() != 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// An option mask or signal number as ptrace's `data` word; neither is
/// ever negative, and the kernel would refuse one that is.
fn ptrace_data(v: libc::c_int) -> SysResult<usize> {
    usize::try_from(v).map_err(|_| Errno::EINVAL)
}

pub fn ptrace_seize(pid: Pid, options: libc::c_int) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_SEIZE, pid, 0, ptrace_data(options)?).map(drop)
}
pub fn ptrace_interrupt(pid: Pid) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_INTERRUPT, pid, 0, 0).map(drop)
}
pub fn ptrace_cont(pid: Pid, sig: i32) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_CONT, pid, 0, ptrace_data(sig)?).map(drop)
}
pub fn ptrace_listen(pid: Pid) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_LISTEN, pid, 0, 0).map(drop)
}
pub fn ptrace_detach(pid: Pid, sig: i32) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_DETACH, pid, 0, ptrace_data(sig)?).map(drop)
}
/// `PTRACE_ATTACH` — only for the research scenario that reproduces the
/// talk's 2018 collision; everything else uses `PTRACE_SEIZE`.
pub fn ptrace_attach(pid: Pid) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_ATTACH, pid, 0, 0).map(drop)
}
pub fn ptrace_setoptions(pid: Pid, options: libc::c_int) -> SysResult<()> {
    ptrace_raw(libc::PTRACE_SETOPTIONS, pid, 0, ptrace_data(options)?).map(drop)
}
pub fn ptrace_geteventmsg(pid: Pid) -> SysResult<libc::c_ulong> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long to `data`, which
    // points at `msg` on this frame.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETEVENTMSG,
            pid.as_raw(),
            0usize,
            &mut msg as *mut libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(msg)
}
/// x86_64 only: other architectures read registers with PTRACE_GETREGSET.
#[cfg(target_arch = "x86_64")]
pub fn ptrace_getregs(pid: Pid) -> SysResult<libc::user_regs_struct> {
    // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills all of it.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: `data` points at a user_regs_struct, as PTRACE_GETREGS requires.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGS,
            pid.as_raw(),
            0usize,
            &mut regs as *mut _,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(regs)
}
#[cfg(target_arch = "x86_64")]
pub fn ptrace_setregs(pid: Pid, regs: &libc::user_regs_struct) -> SysResult<()> {
    // SAFETY: `data` points at a fully initialised user_regs_struct.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid.as_raw(), 0usize, regs as *const _) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// `memfd_create(2)` — an anonymous file to receive libseccomp's BPF export.
pub fn memfd(name: &CStr) -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: name is NUL-terminated; the returned fd is new and owned by us.
    let r = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    check(r as libc::c_long)?;
    // SAFETY: r is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// `unshare(2)`.
pub fn unshare(flags: libc::c_int) -> SysResult<()> {
    // SAFETY: plain integer argument.
    check(unsafe { libc::unshare(flags) } as libc::c_long).map(drop)
}

/// Makes this process a child subreaper: orphaned descendants (such as a
/// restored tree whose CRIU front process exited) are re-parented to it.
pub fn set_child_subreaper() -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } as libc::c_long)
        .map(drop)
}

/// Async-signal-safe: `umask(2)`.
pub fn set_umask(mask: libc::mode_t) {
    // SAFETY: umask only sets a process attribute and cannot fail.
    unsafe { libc::umask(mask) };
}

/// Is the effective user root?
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Anonymous private memory mapped fresh from the kernel: no page of it is
/// present until touched (unlike an allocator's, which may hand back
/// memory it already faulted in). Unmapped on drop.
pub struct FreshMap {
    ptr: *mut u8,
    len: usize,
}

impl FreshMap {
    pub fn new(len: usize) -> SysResult<FreshMap> {
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks overlaps nothing Rust owns; failure is MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(FreshMap { ptr: p.cast(), len })
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe a live read-write mapping owned by self
        // (unmapped only in drop), and &mut self makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for FreshMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in new(); no slice
        // borrowed from it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The size of a memory page (CRIU's pages images hold whole pages).
pub fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n > 0 => n.unsigned_abs(),
        // sysconf(_SC_PAGESIZE) cannot fail on Linux; 4 KiB is x86_64's.
        _ => 4096,
    }
}

/// `pidfd_open(2)`: a descriptor that names process `pid` for good (no pid
/// reuse race while it is held).
pub fn pidfd_open(pid: libc::pid_t) -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain integer arguments; the result is a new descriptor.
    let r = check_int(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: r is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// Async-signal-safe: whether the process behind `pidfd` has ended
/// (poll(2) reports a pidfd readable once it exits), without waiting.
pub fn pidfd_exited(pidfd: RawFd) -> SysResult<bool> {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on our stack, valid for the call; timeout 0.
    let n = check_int(unsafe { libc::poll(&mut p, 1, 0) } as libc::c_long)?;
    Ok(n > 0 && p.revents & libc::POLLIN != 0)
}

/// `pidfd_getfd(2)`: a copy, in this process, of descriptor `fd` of the
/// process behind `pidfd` (the same open file: the same socket). Needs
/// ptrace-attach rights on it; the copy is close-on-exec.
pub fn pidfd_getfd(pidfd: RawFd, fd: RawFd) -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain integer arguments; the result is a new descriptor.
    let r = check_int(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) })?;
    // SAFETY: r is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// `BPF_PROG_TYPE_SK_REUSEPORT` (linux/bpf.h).
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE` (linux/bpf.h).
const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
/// `BPF_PROG_LOAD` (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// `BPF_MAP_CREATE`, `BPF_MAP_UPDATE_ELEM` (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` (linux/bpf.h).
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_FUNC_sk_select_reuseport` (linux/bpf.h).
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
/// `BPF_PSEUDO_MAP_FD` (linux/bpf.h): a 64-bit immediate load whose
/// immediate is a map fd the verifier replaces with the map.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// Size of `union bpf_attr` passed to every command: its tail must be zero.
const BPF_ATTR_SIZE: usize = 144;
const BPF_ATTR_SIZE_C: libc::c_uint = 144;

/// One eBPF instruction (`struct bpf_insn`, x86-64 layout): opcode, dst
/// register in the low nibble and src in the high one, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [
        code,
        (dst & 0xf) | (src << 4),
        o[0],
        o[1],
        i[0],
        i[1],
        i[2],
        i[3],
    ]
}

/// `bpf(cmd, attr)` with `head` copied into a zeroed 144-byte attr.
fn bpf(cmd: libc::c_long, head: &[u8]) -> SysResult<libc::c_int> {
    #[repr(C, align(8))]
    struct Attr([u8; BPF_ATTR_SIZE]);
    let mut attr = Attr([0; BPF_ATTR_SIZE]);
    attr.0[..head.len()].copy_from_slice(head);
    // SAFETY: attr is an initialised, 8-byte aligned bpf_attr of the size
    // passed; the pointers it carries (instructions, license, key, value)
    // point into buffers the caller keeps alive across the call.
    check_int(unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_ptr(), BPF_ATTR_SIZE_C) })
}

/// Creates a one-slot `REUSEPORT_SOCKARRAY`: the listener the steering
/// program sends new connections to. Needs CAP_BPF.
pub fn bpf_reuseport_sockarray() -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut head = Vec::with_capacity(20);
    for v in [BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 1, 0] {
        // map_type, key_size, value_size (a u64 socket fd), max_entries, map_flags
        head.extend_from_slice(&v.to_ne_bytes());
    }
    let r = bpf(BPF_MAP_CREATE, &head)?;
    // SAFETY: r is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// Puts the listening socket `sock` in slot 0 of the sockarray `map`. The
/// kernel clears the slot by itself when the socket closes (its
/// `bpf_sk_reuseport_detach`), before its queue migrates.
pub fn bpf_sockarray_set(map: RawFd, sock: RawFd) -> SysResult<()> {
    let key: u32 = 0;
    let value = u64::try_from(sock).map_err(|_| Errno::EBADF)?;
    let map = u32::try_from(map).map_err(|_| Errno::EBADF)?;
    let mut head = Vec::with_capacity(32);
    head.extend_from_slice(&map.to_ne_bytes());
    head.extend_from_slice(&0u32.to_ne_bytes());
    head.extend_from_slice(&(std::ptr::from_ref(&key) as u64).to_ne_bytes());
    head.extend_from_slice(&(std::ptr::from_ref(&value) as u64).to_ne_bytes());
    head.extend_from_slice(&0u64.to_ne_bytes()); // BPF_ANY
    bpf(BPF_MAP_UPDATE_ELEM, &head).map(drop)
}

/// Loads the daemon's `SK_REUSEPORT` program over the sockarray `map`:
/// every new connection of the group, and every connection migrating from
/// a closing listener, goes to the socket in slot 0 if there is one;
/// with the slot empty (the daemon's listener closed) it selects nothing
/// and the kernel picks a listener by hash, as without a program. Its
/// attach type, `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, is what turns on
/// migration for this one group instead of resetting a closing listener's
/// queue — `net.ipv4.tcp_migrate_req` for the group only, the host's
/// sysctl untouched (net/core/sock_reuseport.c, `reuseport_migrate_sock`).
/// Needs CAP_BPF.
pub fn bpf_load_reuseport_steer(map: RawFd) -> SysResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let insns: [[u8; 8]; 9] = [
        // *(u32 *)(r10 - 4) = 0: the key, on the stack.
        insn(0x62, 10, 0, -4, 0),
        // r2 = map (ld_imm64, two slots).
        insn(0x18, 2, BPF_PSEUDO_MAP_FD, 0, map),
        [0; 8],
        // r3 = r10 - 4.
        insn(0xbf, 3, 10, 0, 0),
        insn(0x07, 3, 0, 0, -4),
        // r4 = 0 (flags); r1 is still the context.
        insn(0xb7, 4, 0, 0, 0),
        // bpf_sk_select_reuseport(ctx, map, &key, 0); an empty slot is
        // -ENOENT and leaves the choice to the kernel.
        insn(0x85, 0, 0, 0, BPF_FUNC_SK_SELECT_REUSEPORT),
        // return SK_PASS.
        insn(0xb7, 0, 0, 0, 1),
        insn(0x95, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..8].copy_from_slice(b"mh_steer");
    let mut head = Vec::with_capacity(72);
    head.extend_from_slice(&BPF_PROG_TYPE_SK_REUSEPORT.to_ne_bytes());
    head.extend_from_slice(&9u32.to_ne_bytes()); // insn_cnt
    head.extend_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    head.extend_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // log_level, log_size, log_buf, kern_version, prog_flags
    head.extend_from_slice(&[0u8; 4 + 4 + 8 + 4 + 4]);
    head.extend_from_slice(&name);
    head.extend_from_slice(&0u32.to_ne_bytes()); // prog_ifindex
    head.extend_from_slice(&BPF_SK_REUSEPORT_SELECT_OR_MIGRATE.to_ne_bytes());
    debug_assert_eq!(head.len(), 72);
    let r = bpf(BPF_PROG_LOAD, &head)?;
    // SAFETY: r is a fresh descriptor nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// `setsockopt(SO_ATTACH_REUSEPORT_EBPF)`: attaches `prog` to the reuseport
/// group of socket `sock` (creating the group for a bound socket).
pub fn attach_reuseport_prog(sock: RawFd, prog: RawFd) -> SysResult<()> {
    let v: libc::c_int = prog;
    // SAFETY: the option value is one c_int read through a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            std::ptr::from_ref(&v).cast::<libc::c_void>(),
            4,
        )
    };
    check(libc::c_long::from(r)).map(drop)
}

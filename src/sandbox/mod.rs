//! The sandbox builder of the talk: a new PID and mount namespace, the host
//! `/` bound (non-recursively) onto a per-instance root with /dev, /dev/pts,
//! /dev/shm and /sys bound one by one, `pivot_root`, a fresh `/proc`,
//! `setsid`, stdin from /dev/null and output appended to log files, then
//! `execve`. A process started this way can be dumped and restored by CRIU.

pub mod cgroup;
pub mod child;
pub mod mounts;
pub mod userns;

use crate::filter::CompiledFilter;
use crate::spec::SandboxSpec;
use crate::sys;
use child::{ChildCgroup, ChildPlan, ChildUserns, ChildVariant};
pub use mounts::ExternalMount;
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Declares [`Step`] with its descriptions: one list, so the decoding of
/// a reported step and the descriptions can never miss a step.
macro_rules! steps {
    ($first:ident => $first_text:literal, $($name:ident => $text:literal,)*) => {
        /// The steps of the child, reported back over the error pipe (as
        /// the step's number: 0 is never one).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Step {
            $first = 1,
            $($name,)*
        }

        impl Step {
            fn from_u8(v: u8) -> Option<Step> {
                [Step::$first, $(Step::$name,)*]
                    .into_iter()
                    .find(|s| *s as u8 == v)
            }

            pub fn describe(self) -> &'static str {
                match self {
                    Step::$first => $first_text,
                    $(Step::$name => $text,)*
                }
            }
        }
    };
}

steps! {
    WaitIdMap => "wait for its user namespace's id maps",
    MakePrivate => "make the mounts private",
    BindRoot => "bind the host / onto the sandbox root",
    BindSpecial => "bind a special mount (/dev, /dev/pts, /dev/shm, /sys)",
    Chdir => "enter the sandbox root",
    PivotRoot => "pivot_root into the sandbox root",
    UnmountOldRoot => "detach the old root",
    MountProc => "mount a fresh /proc",
    Setsid => "start a new session (setsid)",
    OpenDevNull => "open /dev/null for stdin",
    OpenLog => "open the log files",
    Stdio => "set up stdin/stdout/stderr",
    Cwd => "change to the working directory",
    SetIds => "switch user and group",
    CloseFds => "close inherited file descriptors",
    Sync => "wait for the supervisor",
    NoNewPrivs => "set no_new_privs",
    Seccomp => "load the seccomp filter",
    SendListener => "hand the seccomp listener to the supervisor",
    Exec => "execute the command",
    JoinCgroup => "enter the instance cgroup",
    ParentDeath => "set the parent-death signal",
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{what} {path} is not visible inside the sandbox: it lives on a mount other than / ({mount}); move it onto the root filesystem")]
    NotVisible {
        what: &'static str,
        path: PathBuf,
        mount: String,
    },
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox child {pid} sent {received:?} on its error pipe, expected a step number from 1 to {} and an errno", Step::ParentDeath as u8)]
    ChildMessage { pid: Pid, received: [u8; 8] },
    #[error("a sandbox child can finish in at most {max} ways")]
    TooManyVariants { max: usize },
    #[error("cannot read the host's mount table")]
    MountTable(#[source] std::io::Error),
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("cannot create a {what}")]
    Pipe {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("clone(CLONE_NEWPID|CLONE_NEWNS) failed (are you root?)")]
    Clone(#[source] Errno),
    #[error("clone3(CLONE_NEWPID|CLONE_NEWNS|CLONE_INTO_CGROUP) into {path} failed")]
    CloneIntoCgroup {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// Running the service as another user.
    #[error(transparent)]
    Ids(#[from] userns::UsernsError),
    #[error("cannot take a detached copy of the mount {path} for the sandbox's user namespace")]
    OpenTree {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("the sandbox failed to {} for {program}", .step.describe())]
    ChildStep {
        step: Step,
        program: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("the sandbox child {pid} vanished before it could run {program}")]
    ChildVanished { pid: Pid, program: PathBuf },
    #[error("cannot release the sandbox child {pid}")]
    Release {
        pid: Pid,
        #[source]
        source: Errno,
    },
    #[error(transparent)]
    Cgroup(cgroup::CgroupError),
    #[error("cannot receive the seccomp listener from the sandbox child {pid}")]
    Listener {
        pid: Pid,
        #[source]
        source: Errno,
    },
}

/// One way to finish the child: a filter (or none) and extra environment.
pub struct Variant {
    pub filter: Option<CompiledFilter>,
    pub extra_env: Vec<(String, String)>,
}

impl Variant {
    /// No filter, no extra environment: a cold start.
    pub fn plain() -> Variant {
        Variant {
            filter: None,
            extra_env: Vec::new(),
        }
    }
}

/// The sync pipe's byte that tells the waiting child to give up.
const SYNC_ABORT: u8 = u8::MAX;

/// One of the [`Variants`] a child may finish with, as [`Variants::add`]
/// handed it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantId(u8);

/// The ways a sandbox child may finish, all prepared before the clone
/// (the child allocates nothing); the parent picks one after it.
#[derive(Default)]
pub struct Variants {
    list: Vec<Variant>,
}

impl Variants {
    pub fn add(&mut self, v: Variant) -> Result<VariantId, SandboxError> {
        // Every byte but SYNC_ABORT names a variant on the sync pipe.
        let id = u8::try_from(self.list.len())
            .ok()
            .filter(|&i| i != SYNC_ABORT)
            .ok_or(SandboxError::TooManyVariants {
                max: usize::from(SYNC_ABORT),
            })?;
        self.list.push(v);
        Ok(VariantId(id))
    }
    pub fn get(&self, id: VariantId) -> &Variant {
        &self.list[usize::from(id.0)]
    }
    pub fn iter(&self) -> impl Iterator<Item = &Variant> {
        self.list.iter()
    }
}

/// A cloned child, set up and waiting for [`Spawned::release`].
pub struct Spawned {
    pub pid: Pid,
    pub started: Instant,
    program: PathBuf,
    sync_write: OwnedFd,
    error_read: OwnedFd,
    listener_read: OwnedFd,
    /// The child's "parent-death signal set" byte (see `ChildPlan::armed_write`).
    armed_read: Option<OwnedFd>,
    wants_listener: Vec<bool>,
}

/// A child that has exec'd its command.
pub struct Released {
    pub pid: Pid,
    pub started: Instant,
    /// The seccomp listener fd, for variants with a NOTIFY filter.
    pub listener: Option<OwnedFd>,
}

fn cstr(what: &'static str, p: impl AsRef<std::ffi::OsStr>) -> Result<CString, SandboxError> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| SandboxError::Nul { what })
}

fn pipe_cloexec(what: &'static str) -> Result<(OwnedFd, OwnedFd), SandboxError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|source| SandboxError::Pipe { what, source })
}

fn check_visible(
    what: &'static str,
    p: &Path,
    mounts: &[PathBuf],
    ext: &[ExternalMount],
) -> Result<(), SandboxError> {
    if mounts::visible_in_sandbox(p, mounts, ext) {
        return Ok(());
    }
    let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let mount = mounts::mount_of(&real, mounts)
        .map(|m| m.display().to_string())
        .unwrap_or_else(|| "?".into());
    Err(SandboxError::NotVisible {
        what,
        path: p.to_path_buf(),
        mount,
    })
}

/// The special mounts this host has, which every sandbox binds and every
/// dump names as external.
pub fn host_externals() -> Result<Vec<ExternalMount>, SandboxError> {
    let mounts = mounts::mount_points().map_err(SandboxError::MountTable)?;
    Ok(mounts::externals_for(&mounts))
}

/// Clones the sandbox child for `spec` with `root` (an empty directory) as
/// its root mount point. The child sets everything up and then waits.
pub fn spawn(
    spec: &SandboxSpec,
    root: &Path,
    variants: &Variants,
    cgroup: Option<&cgroup::InstanceCgroup>,
) -> Result<Spawned, SandboxError> {
    // Before anything is created: a service this host could not dump is
    // refused up front.
    let switch = userns::switch_for(spec.uid, spec.gid)?;
    let mounts = mounts::mount_points().map_err(SandboxError::MountTable)?;
    let externals = mounts::externals_for(&mounts);
    crate::files::private_dir(&spec.log_dir).map_err(|source| SandboxError::CreateDir {
        path: spec.log_dir.clone(),
        source,
    })?;
    check_visible("the log directory", &spec.log_dir, &mounts, &externals)?;
    check_visible("the program", &spec.program, &mounts, &externals)?;
    check_visible("the working directory", &spec.cwd, &mounts, &externals)?;
    std::fs::create_dir_all(root).map_err(|source| SandboxError::CreateDir {
        path: root.to_path_buf(),
        source,
    })?;
    let root_abs = std::fs::canonicalize(root).map_err(|source| SandboxError::CreateDir {
        path: root.to_path_buf(),
        source,
    })?;

    // Everything the child touches is built here, before the clone.
    let binds = externals
        .iter()
        .map(|e| {
            let inner = root_abs.join(e.path.strip_prefix("/").unwrap_or(&e.path));
            Ok((cstr("mount path", &e.path)?, cstr("mount path", inner)?))
        })
        .collect::<Result<Vec<_>, SandboxError>>()?;
    let argv_c = spec
        .argv
        .iter()
        .map(|a| cstr("argument", a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut env_store: Vec<Vec<CString>> = Vec::new();
    let mut child_variants = Vec::new();
    for v in variants.iter() {
        let mut env: Vec<(String, String)> = spec.env.clone();
        for (k, val) in &v.extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), val.clone()));
        }
        let cs = env
            .iter()
            .map(|(k, v)| cstr("environment", format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut envp: Vec<*const libc::c_char> = cs.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        env_store.push(cs);
        child_variants.push(ChildVariant {
            filter: v.filter.as_ref().map(|f| (f.bpf.clone(), f.load_flags())),
            envp,
        });
    }
    let (sync_read, sync_write) = pipe_cloexec("sync pipe")?;
    let (error_read, error_write) = pipe_cloexec("error pipe")?;
    let (listener_read, listener_sock) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| SandboxError::Pipe {
        what: "listener socket",
        source,
    })?;
    // The child starts in the instance cgroup (clone3's CLONE_INTO_CGROUP)
    // instead of writing its cgroup.procs: that write waits for an RCU
    // grace period, ~10 ms of every boot (see sys::fork_into_cgroup).
    let cgroup_dir = cgroup
        .map(|cg| cg.dir_for_clone().map(|dir| (cg, dir)))
        .transpose()
        .map_err(SandboxError::Cgroup)?;
    // The parent-death signal follows the cloning thread: only the main
    // thread lives as long as the process (a library caller's worker
    // thread may end while its service should go on).
    let parent_death = sys::gettid() == nix::unistd::getpid();
    if !parent_death {
        log::debug!("cloning from a worker thread: no parent-death signal for the sandbox");
    }
    let parent_pidfd = if parent_death {
        match sys::pidfd_open(nix::unistd::getpid().as_raw()) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::debug!("no pidfd of this runmh ({e}): the sandbox relies on the sync pipe's EOF if runmh dies before its parent-death signal is set");
                None
            }
        }
    } else {
        None
    };
    let armed = if parent_death {
        Some(pipe_cloexec("parent-death pipe")?)
    } else {
        None
    };
    let ids = (switch != userns::IdSwitch::Keep).then_some((spec.uid, spec.gid));
    // The user namespace's mounts: detached copies of `/` and each special
    // mount, taken here (their mounts are not locked in our namespace), and
    // the pipe on which the child waits for its id maps.
    let mut trees: Vec<OwnedFd> = Vec::new();
    let mut id_map_pipe = None;
    if switch == userns::IdSwitch::UserNs {
        for path in
            std::iter::once(Path::new("/")).chain(externals.iter().map(|e| e.path.as_path()))
        {
            let c = cstr("mount path", path)?;
            trees.push(
                sys::open_tree_clone(&c).map_err(|source| SandboxError::OpenTree {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        }
        id_map_pipe = Some(pipe_cloexec("id map pipe")?);
    }
    let child_userns = id_map_pipe.as_ref().map(|(r, _)| ChildUserns {
        ready: r.as_raw_fd(),
        root_tree: trees[0].as_raw_fd(),
        trees: trees[1..].iter().map(|t| t.as_raw_fd()).collect(),
    });
    let plan = ChildPlan {
        root: cstr("root path", &root_abs)?,
        binds,
        proc_dir: c"/proc".into(),
        dev_null: c"/dev/null".into(),
        stdout_log: cstr("log path", spec.stdout_log())?,
        stderr_log: cstr("log path", spec.stderr_log())?,
        cwd: cstr("working directory", &spec.cwd)?,
        program: cstr("program path", &spec.program)?,
        argv,
        variants: child_variants,
        ids,
        userns: child_userns,
        umask: crate::files::service_umask(),
        sync_read: sync_read.as_raw_fd(),
        error_write: error_write.as_raw_fd(),
        listener_sock: listener_sock.as_raw_fd(),
        parent_death,
        parent_pidfd: parent_pidfd.as_ref().map(|fd| fd.as_raw_fd()),
        armed_write: armed.as_ref().map(|(_, w)| w.as_raw_fd()),
    };
    crate::explain::say(
        "clone",
        "clone(CLONE_NEWPID | CLONE_NEWNS): the child becomes PID 1 of a new PID namespace, so a restore never collides with a host PID, and gets its own mount table",
    );
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS;
    if id_map_pipe.is_some() {
        crate::explain::say(
            "clone",
            &format!("and CLONE_NEWUSER: the service runs as {}:{} in a user namespace we own (every id mapped to itself), where CRIU holds every capability it needs, CAP_SYS_RESOURCE included", spec.uid, spec.gid),
        );
        flags |= libc::CLONE_NEWUSER;
    }
    if cgroup_dir.is_some() {
        crate::explain::say(
            "clone",
            "through clone3 with CLONE_INTO_CGROUP: the child starts in the instance cgroup, so the whole tree can be killed at once, without the cgroup.procs write that waits for an RCU grace period",
        );
    }
    // Only opened when clone3 is refused: the fallback's fd.
    let mut cgroup_procs: Option<OwnedFd> = None;
    // The child of each clone below only runs `child::run`, which keeps to
    // async-signal-safe system calls on `plan` (built above, never freed
    // in the child) and ends in execve or _exit; between the clone and
    // `child::run` it only moves integers.
    let forked = match &cgroup_dir {
        // SAFETY: the child keeps to the contract, as said above.
        Some((cg, dir)) => match unsafe { sys::clone_into_cgroup(flags, dir.as_fd()) } {
            Ok(pid) => Ok((pid, ChildCgroup::Born)),
            // Not a refusal of clone3 itself (say, the cgroup was removed):
            // a cgroup.procs write would meet it too.
            Err(source) if !sys::clone3_refused(source) => {
                return Err(SandboxError::CloneIntoCgroup {
                    path: cg.path.clone(),
                    source,
                })
            }
            Err(e) => {
                log::debug!(
                    "clone3 into the instance cgroup: {e}; cloning and joining by cgroup.procs"
                );
                let procs = cg.procs_for_child().map_err(SandboxError::Cgroup)?;
                let fd = procs.as_raw_fd();
                cgroup_procs = Some(procs);
                // SAFETY: as above.
                unsafe { sys::clone_fork(flags) }.map(|pid| (pid, ChildCgroup::Join(fd)))
            }
        },
        // SAFETY: as above.
        None => unsafe { sys::clone_fork(flags) }.map(|pid| (pid, ChildCgroup::NoCgroup)),
    };
    let pid = match forked {
        Ok((0, entry)) => child::run(&plan, entry),
        Ok((pid, _)) => Pid::from_raw(pid),
        Err(e) => return Err(SandboxError::Clone(e)),
    };
    let started = Instant::now();
    drop(trees);
    let armed_read = armed.map(|(r, w)| {
        drop(w);
        r
    });
    if let Some((map_read, map_write)) = id_map_pipe {
        drop(map_read);
        let mapped = userns::write_maps(pid).and_then(|()| {
            sys::write_all(map_write.as_raw_fd(), &[1]).map_err(|e| userns::UsernsError::Map {
                path: "the id map pipe".into(),
                pid,
                source: std::io::Error::from_raw_os_error(e as i32),
            })
        });
        if let Err(e) = mapped {
            // Without its byte the child exits 126 before doing anything.
            drop(map_write);
            let _ = sys::waitpid(pid.as_raw(), 0);
            return Err(e.into());
        }
    }
    drop((
        sync_read,
        error_write,
        listener_sock,
        plan,
        parent_pidfd,
        cgroup_dir,
        cgroup_procs,
        env_store,
        argv_c,
    ));
    for e in &externals {
        crate::explain::say(
            "mount",
            &format!(
                "bind {} into the new root (CRIU will call it {:?})",
                e.path.display(),
                e.key
            ),
        );
    }
    Ok(Spawned {
        pid,
        started,
        program: spec.program.clone(),
        sync_write,
        error_read,
        listener_read,
        armed_read,
        wants_listener: variants
            .list
            .iter()
            .map(|v| v.filter.as_ref().is_some_and(|f| f.wants_listener()))
            .collect(),
    })
}

/// Reads the child's `(step, errno)` report; `None` at EOF (exec happened).
fn read_child_error(
    fd: RawFd,
    program: &Path,
    pid: Pid,
) -> Result<Option<SandboxError>, SandboxError> {
    let mut msg = [0u8; 8];
    let mut got = 0;
    while got < msg.len() {
        match sys::read(fd, &mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(source) => return Err(SandboxError::Release { pid, source }),
        }
    }
    if got == msg.len() {
        let step =
            Step::from_u8(msg[0]).ok_or(SandboxError::ChildMessage { pid, received: msg })?;
        let errno = Errno::from_raw(i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]));
        return Ok(Some(SandboxError::ChildStep {
            step,
            program: program.to_path_buf(),
            source: errno,
        }));
    }
    if got != 0 {
        return Ok(Some(SandboxError::ChildVanished {
            pid,
            program: program.to_path_buf(),
        }));
    }
    Ok(None)
}

impl Spawned {
    /// Lets the child load variant `index`'s filter and exec; returns once
    /// the exec happened (or the child reported which step failed).
    pub fn release(self, variant: VariantId) -> Result<Released, SandboxError> {
        let pid = self.pid;
        let index = usize::from(variant.0);
        if let Some(armed) = &self.armed_read {
            let mut b = [0u8; 1];
            match sys::read(armed.as_raw_fd(), &mut b) {
                Ok(1) => {}
                // EOF: the child ended before its parent-death signal was
                // set; its report (if any) waits in the error pipe.
                Ok(_) => {
                    drop(self.sync_write);
                    return Err(
                        read_child_error(self.error_read.as_raw_fd(), &self.program, pid)?
                            .unwrap_or(SandboxError::ChildVanished {
                                pid,
                                program: self.program.clone(),
                            }),
                    );
                }
                Err(source) => return Err(SandboxError::Release { pid, source }),
            }
        }
        // A child that already failed has closed its end: the write fails
        // (EPIPE), and its report is waiting in the error pipe below.
        let wrote = sys::write_all(self.sync_write.as_raw_fd(), &[variant.0]);
        drop(self.sync_write);
        if let Some(e) = read_child_error(self.error_read.as_raw_fd(), &self.program, pid)? {
            return Err(e);
        }
        wrote.map_err(|source| SandboxError::Release { pid, source })?;
        let listener = if self.wants_listener.get(index).copied().unwrap_or(false) {
            match sys::recv_fd(self.listener_read.as_raw_fd()) {
                Ok(Some(fd)) => Some(fd),
                Ok(None) => {
                    return Err(SandboxError::Listener {
                        pid,
                        source: Errno::ENODATA,
                    })
                }
                Err(source) => return Err(SandboxError::Listener { pid, source }),
            }
        } else {
            None
        };
        Ok(Released {
            pid,
            started: self.started,
            listener,
        })
    }

    /// The child's own report, if it already failed a setup step (used when
    /// attaching to it failed: the real cause is usually the child's).
    pub fn early_failure(&self) -> Option<SandboxError> {
        let fd = self.error_read.as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)) {
            Ok(n) if n > 0 => {
                read_child_error(self.error_read.as_raw_fd(), &self.program, self.pid)
                    .ok()
                    .flatten()
            }
            _ => None,
        }
    }

    /// Tells the child to give up (it exits 126 without running anything).
    pub fn abort(self) {
        let _ = sys::write_all(self.sync_write.as_raw_fd(), &[SYNC_ABORT]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_decodes_from_its_number_and_zero_is_none() {
        assert_eq!(Step::from_u8(0), None);
        let decoded: Vec<Step> = (1..=u8::MAX).map_while(Step::from_u8).collect();
        assert_eq!(decoded.first(), Some(&Step::WaitIdMap));
        assert_eq!(decoded.last(), Some(&Step::ParentDeath));
        for (i, s) in decoded.iter().enumerate() {
            assert_eq!(*s as usize, i + 1);
        }
    }

    #[test]
    fn variants_hand_out_distinct_ids_and_keep_the_abort_byte_free() {
        let mut v = Variants::default();
        let a = v.add(Variant::plain()).unwrap();
        let b = v
            .add(Variant {
                filter: None,
                extra_env: vec![("K".into(), "V".into())],
            })
            .unwrap();
        assert_ne!(a, b);
        assert!(v.get(a).extra_env.is_empty());
        assert_eq!(v.get(b).extra_env, vec![("K".to_string(), "V".to_string())]);
        for _ in 2..usize::from(SYNC_ABORT) {
            v.add(Variant::plain()).unwrap();
        }
        // The next id would be the abort byte.
        let e = v.add(Variant::plain()).unwrap_err();
        assert!(
            matches!(e, SandboxError::TooManyVariants { max: 255 }),
            "{e}"
        );
    }

    #[test]
    fn the_child_error_pipe_is_read_strictly() {
        let pid = Pid::from_raw(4242);
        let prog = Path::new("/bin/true");
        let report = |bytes: &[u8]| {
            let (r, w) = pipe_cloexec("test pipe").unwrap();
            sys::write_all(w.as_raw_fd(), bytes).unwrap();
            drop(w);
            read_child_error(r.as_raw_fd(), prog, pid)
        };
        // A closed pipe and nothing in it: the exec happened.
        assert!(report(&[]).unwrap().is_none());
        let mut msg = [0u8; 8];
        msg[0] = Step::Seccomp as u8;
        msg[4..].copy_from_slice(&libc::EPERM.to_ne_bytes());
        match report(&msg).unwrap() {
            Some(SandboxError::ChildStep { step, source, .. }) => {
                assert_eq!(step, Step::Seccomp);
                assert_eq!(source, Errno::EPERM);
            }
            other => panic!("{other:?}"),
        }
        // A step the child never sends is an error, not a guess.
        msg[0] = 0;
        let e = report(&msg).unwrap_err();
        assert!(matches!(e, SandboxError::ChildMessage { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("expected a step number from 1 to 22"),
            "{e}"
        );
        // Half a message: the child died mid-write.
        assert!(matches!(
            report(&msg[..3]).unwrap(),
            Some(SandboxError::ChildVanished { .. })
        ));
    }
}

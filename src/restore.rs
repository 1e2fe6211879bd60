//! `runmh restore`: CRIU brings an image back as this process's child, and
//! this process supervises it.
//!
//! The front process (what the user or the daemon started) forks a child
//! that enters a private mount namespace, binds the host `/` onto a fresh
//! root and execs `criu restore --root ... --restore-detached
//! --restore-sibling`. CRIU forks the tree's root with `CLONE_PARENT`, so
//! the root is the front's own child; it restores the tree, lets go of it
//! (stopped where it was dumped) and exits. The front then re-seizes it
//! (TRACE) or continues it, and supervises it: nothing is exec'd after
//! CRIU, and the supervisor is already running when CRIU ends. A failed
//! restore leaves the image untouched: CRIU only reads it, and logs go
//! elsewhere.
//!
//! (The talk's tools made CRIU `--exec-cmd` into the supervisor instead:
//! a second exec of runmh on every restore's critical path, ~2.5 ms
//! measured here; NOTES.md §6.)

use crate::channel::{self, ChannelError, RestoreChildMsg};
use crate::criu::kdat::{self, KdatCache};
use crate::criu::private_root;
use crate::criu::{watchdog, Criu, CriuError, RestoreArgs};
use crate::explain;
use crate::images::compat::{self, CompatError, CpuCheck};
use crate::images::{Metadata, MetadataError};
use crate::instance::{self, Instance, InstanceError, InstanceRecord, InstanceState};
use crate::stop::tracer::{Tracer, TracerError};
use crate::stop::{self, BackendKind, StopError};
use crate::supervisor::{Held, Outcome, Running};
use crate::sys;
use crate::sys::exit::ExitStatus;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::CString;
use std::io::BufReader;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Compat(#[from] CompatError),
    #[error(transparent)]
    Damaged(#[from] crate::images::VerifyError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("cannot prepare {path} for the restored service")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the restore: {step}")]
    Fork {
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("the restore child failed to {step}")]
    Child {
        step: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("the image's log file {path} is not an absolute path; the image is damaged: prebake it again")]
    RelativeLog { path: PathBuf },
    #[error("cannot read the pid CRIU wrote to {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct RestoreOpts {
    pub images: PathBuf,
    pub state_dir: PathBuf,
    /// TRACE images: re-seize before resuming (off only to reproduce the
    /// talk's ENOSYS).
    pub reseize: bool,
    pub stop_timeout: Duration,
    /// Append phase stamps here (`mhctl bench`'s breakdown; see
    /// [`crate::timings`]). None on a normal restore.
    pub timings: Option<PathBuf>,
    /// Bounds on CRIU's run (and the supervisor's setup after it).
    pub limits: watchdog::Limits,
    /// The caller returns once the service runs: CRIU and the supervisor
    /// get /dev/null and a log file in the instance directory instead of
    /// the caller's stdio, so `x=$(runmh restore --detach ...)` returns.
    pub detach: bool,
    /// Where the restored service's stdout.log and stderr.log go. None, or
    /// the image's own log directory: where they were. Another directory
    /// (an image pulled or migrated from another host, whose paths are that
    /// host's): CRIU is handed the new files open, with `--inherit-fd`,
    /// instead of reopening the old paths.
    pub log_dir: Option<PathBuf>,
    /// Hold the restored tree at its stop point (instance state
    /// `standby`) until a `resume` request on its control socket: an
    /// on-demand service's `--standby` instance.
    pub hold: bool,
}

/// A restore that succeeded.
pub struct Restored {
    /// The instance's id.
    pub id: String,
    /// The restored root's host pid (this process's child).
    pub root: Pid,
    pub supervision: Supervision,
    pub metadata: Metadata,
    /// From the start of the restore to "ready".
    pub took: Duration,
}

/// What a successful restore hands its caller.
pub enum Supervision {
    /// The tree runs (or is held); the caller supervises it with
    /// [`Running::supervise`] and removes the instance after.
    Running(Box<Running>),
    /// Restored, but the service ended at once (the talk's ENOSYS, say);
    /// its instance is already removed.
    Ended(ExitStatus),
}

fn cstring(what: &'static str, p: impl AsRef<std::ffi::OsStr>) -> Result<CString, RestoreError> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| RestoreError::Nul { what })
}

/// The image directory as an absolute path (CRIU runs elsewhere).
fn absolute_images(opts: &RestoreOpts) -> Result<PathBuf, RestoreError> {
    std::path::absolute(&opts.images).map_err(|source| RestoreError::Prepare {
        path: opts.images.clone(),
        source,
    })
}

/// A log file the restored service gets open from us instead of by path.
struct LogRedirect {
    file: std::fs::File,
    /// The image's path of the file, as CRIU keys it: without the leading
    /// `/` (a regular file's name relative to the restored root).
    key: PathBuf,
}

fn prep(path: &Path, e: std::io::Error) -> RestoreError {
    RestoreError::Prepare {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Makes sure the log files the restored process reopens by path exist
/// (O_APPEND, so CRIU does not check their size). Logs that go to another
/// directory than the image's are opened here, to be inherited. Only once
/// the image passed its checks: a refused restore creates nothing.
fn prepare_logs(md: &Metadata, log_dir: Option<&Path>) -> Result<Vec<LogRedirect>, RestoreError> {
    let mut redirects = Vec::new();
    match log_dir.filter(|d| *d != md.spec.log_dir) {
        None => {
            crate::files::private_dir(&md.spec.log_dir).map_err(|e| prep(&md.spec.log_dir, e))?;
            for log in [md.spec.stdout_log(), md.spec.stderr_log()] {
                crate::files::append_private(&log).map_err(|e| prep(&log, e))?;
            }
        }
        Some(dir) => {
            crate::files::private_dir(dir).map_err(|e| prep(dir, e))?;
            for (old, name) in [
                (md.spec.stdout_log(), "stdout.log"),
                (md.spec.stderr_log(), "stderr.log"),
            ] {
                let new = dir.join(name);
                let file = crate::files::append_private(&new).map_err(|e| prep(&new, e))?;
                let key = old
                    .strip_prefix("/")
                    .map_err(|_| RestoreError::RelativeLog { path: old.clone() })?
                    .to_path_buf();
                redirects.push(LogRedirect { file, key });
            }
        }
    }
    Ok(redirects)
}

/// For NOTIFY images, makes sure the preload library the process had
/// mapped exists: before the compatibility check, which compares it.
fn prepare_preload(md: &Metadata) -> Result<(), RestoreError> {
    if let Some((_, so)) = md.spec.env.iter().find(|(k, _)| k == "LD_PRELOAD") {
        let so = Path::new(so);
        if !so.exists() {
            if let Some(dir) = so.parent() {
                let installed = crate::stop::preload::install(dir).map_err(|e| prep(so, e))?;
                if installed != so {
                    log::warn!("the image's preload library {} is gone and this runmh's differs; the restore may fail", so.display());
                }
            }
        }
    }
    Ok(())
}

/// Restores the image; returns once the tree runs (or is held, with
/// `hold`) as this process's child, under this process's supervision.
/// The restored root's parent is the calling *thread* (CRIU's
/// `CLONE_PARENT` of the child it forks): a runmh image's parent-death
/// signal fires when that thread ends, so call this from one that outlives
/// the service (runmh's main thread).
pub fn restore(criu: &Criu, opts: &RestoreOpts) -> Result<Restored, RestoreError> {
    let t0 = Instant::now();
    let md = Metadata::read(&opts.images)?;
    prepare_preload(&md)?;
    // Before CRIU runs: a mismatch is one error naming every difference,
    // not a restore failing half-way or a SIGILL after it. First, since
    // another host's difference explains more than a changed file does.
    compat::check(&md, &opts.images, criu, CpuCheck::UnlessSameBoot)?;
    // CRIU's restorer trusts the image: a short pages file makes it spin.
    crate::images::verify::verify(&opts.images, &md.files)?;
    let images = absolute_images(opts)?;
    let redirects = prepare_logs(&md, opts.log_dir.as_deref())?;
    let inst = Instance::create(&opts.state_dir)?;
    let mut spec = md.spec.clone();
    if let Some(dir) = opts.log_dir.as_ref().filter(|_| !redirects.is_empty()) {
        spec.log_dir.clone_from(dir);
    }
    let rec = InstanceRecord {
        id: inst.id.clone(),
        spec,
        externals: md.externals.clone(),
        backend: md.backend.clone(),
        image: Some(images),
        // This process starts CRIU and supervises what it restores.
        supervisor_pid: nix::unistd::getpid().as_raw(),
        front_pid: None,
        root_pid: 0,
        format_version: instance::RECORD_VERSION,
        state: InstanceState::Restoring,
        started_unix_ms: crate::sys::time::unix_ms(),
    };
    if let Err(e) = inst.write_record(&rec) {
        inst.remove();
        return Err(e.into());
    }
    let stamps = crate::timings::Stamps::new(opts.timings.as_deref());
    let root = match spawn_criu(criu, opts, &inst, &md, &redirects, &stamps) {
        Ok(root) => root,
        Err(e) => {
            inst.remove();
            return Err(e);
        }
    };
    let id = inst.id.clone();
    let supervision = match adopt(inst, rec, root, opts, &stamps)? {
        Setup::Running(r) => {
            stamps.mark(crate::timings::READY);
            Supervision::Running(r)
        }
        Setup::Ended { status, inst } => {
            // Restored, but it ended at once (e.g. the talk's ENOSYS): the
            // restore worked; the service's own status tells the rest.
            log::warn!("the restored service (pid {root}) ended right away: {status}");
            inst.remove();
            Supervision::Ended(status)
        }
    };
    Ok(Restored {
        id,
        root,
        supervision,
        metadata: md,
        took: t0.elapsed(),
    })
}

/// Runs CRIU in a child and waits for it to end; returns the restored
/// root's host pid. CRIU forks the root with `CLONE_PARENT`
/// (`--restore-sibling`), so the root is this process's child.
fn spawn_criu(
    criu: &Criu,
    opts: &RestoreOpts,
    inst: &Instance,
    md: &Metadata,
    redirects: &[LogRedirect],
    stamps: &crate::timings::Stamps,
) -> Result<Pid, RestoreError> {
    // Close-on-exec at both ends: CRIU's exec closes the child's end, so
    // the pipe carries one message only when a step before it failed.
    let (fail_r, fail_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| RestoreError::Fork {
            step: "pipe",
            source,
        })?;
    let cgroup_procs = match &inst.cgroup {
        Some(cg) => match cg.procs_for_child() {
            Ok(fd) => Some(fd),
            Err(e) => {
                crate::sandbox::cgroup::warn_unavailable(&e);
                None
            }
        },
        None => None,
    };
    // Preferred over the child's write to cgroup.procs, which stays the
    // fallback (see sys::fork_into_cgroup for the ~10 ms it saves). CRIU
    // runs in the instance cgroup, so the tree it forks does too; CRIU
    // leaves it when it exits, before the tree runs a user instruction.
    let cgroup_dir = match (&inst.cgroup, &cgroup_procs) {
        (Some(cg), Some(_)) => match cg.dir_for_clone() {
            Ok(dir) => Some(dir),
            Err(e) => {
                log::debug!(
                    "{}; the restore child joins by cgroup.procs",
                    crate::error_chain(&e)
                );
                None
            }
        },
        _ => None,
    };
    let staged = private_root::stage_externals(&inst.dir, &md.externals)?;
    let args = RestoreArgs {
        images_dir: absolute_images(opts)?,
        work_dir: inst.dir.clone(),
        log_name: "restore.log".into(),
        root: inst.root(),
        externals: staged.externals.clone(),
        pidfile: inst.restored_pidfile(),
        inherit_fds: redirects
            .iter()
            .map(|r| (r.file.as_raw_fd(), r.key.clone()))
            .collect(),
        leave_stopped: opts.hold,
    };
    let inherited: Vec<RawFd> = redirects.iter().map(|r| r.file.as_raw_fd()).collect();
    let argv_os = args.argv();
    explain::say("criu", "restore in a private mount namespace, with the host / bound onto a fresh --root; --restore-sibling makes the restored root runmh's own child, and CRIU exits once the tree is back:");
    explain::block(&crate::criu::argv::shell_words(&criu.path, &argv_os));
    // Everything the child needs, built before the fork.
    let prog = cstring("the CRIU path", &criu.path)?;
    let argv_c: Vec<CString> = std::iter::once(cstring("the CRIU path", &criu.path))
        .chain(argv_os.iter().map(|a| cstring("a CRIU argument", a)))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_c: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).map_err(|_| RestoreError::Nul {
                what: "an environment variable",
            })
        })
        .collect::<Result<_, _>>()?;
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let root = cstring("the instance root", inst.root())?;
    let kdat = kdat_plan(criu, opts, md);
    let kdat_child = kdat.as_ref().map(|(_, data)| data.as_deref());
    let stdio = if opts.detach {
        let null = crate::files::dev_null().map_err(|e| RestoreError::Prepare {
            path: "/dev/null".into(),
            source: e,
        })?;
        let log_path = inst.dir.join("supervisor.log");
        let log = crate::files::append_private(&log_path).map_err(|e| RestoreError::Prepare {
            path: log_path,
            source: e,
        })?;
        Some((null, log))
    } else {
        None
    };
    let stdio_fds = stdio.as_ref().map(|(n, l)| (n.as_raw_fd(), l.as_raw_fd()));
    let parent = nix::unistd::getpid().as_raw();
    stamps.watch_creation(&inst.dir, "restore.log", Duration::from_secs(60));
    stamps.mark(crate::timings::CRIU_EXEC);
    let (forked, joined) = match cgroup_dir.as_ref() {
        // SAFETY: the child only calls async-signal-safe wrappers on the
        // data prepared above and ends in execve or _exit.
        Some(dir) => match unsafe { sys::fork_into_cgroup(dir.as_fd()) } {
            Ok(pid) => (Ok(pid), true),
            // Not a refusal of clone3 itself (say, the cgroup was removed):
            // a cgroup.procs write would meet it too (as the sandbox does).
            Err(source) if !sys::clone3_refused(source) => {
                return Err(RestoreError::Fork {
                    step: "clone3 into the instance cgroup",
                    source,
                })
            }
            Err(e) => {
                log::debug!(
                    "clone3 into the instance cgroup: {e}; forking and joining by cgroup.procs"
                );
                // SAFETY: as above.
                (unsafe { sys::fork_raw() }, false)
            }
        },
        // SAFETY: as above.
        None => (unsafe { sys::fork_raw() }, false),
    };
    let child = match forked {
        Ok(0) => restore_child(
            &ChildFds {
                fail: fail_w.as_raw_fd(),
                parent,
                stdio: stdio_fds,
                inherited: &inherited,
                cgroup_procs: cgroup_procs
                    .as_ref()
                    .filter(|_| !joined)
                    .map(|fd| fd.as_raw_fd()),
            },
            &root,
            &staged.binds,
            kdat_child,
            &prog,
            &argv,
            &envp,
        ),
        Ok(pid) => Pid::from_raw(pid),
        Err(source) => {
            return Err(RestoreError::Fork {
                step: "fork",
                source,
            })
        }
    };
    drop(fail_w);
    drop(cgroup_procs);
    drop(cgroup_dir);
    // Bounded from here: too slow, a runaway log, or SIGTERM for us.
    let dog = watchdog::watch(child, &inst.dir.join("restore.log"), opts.limits);
    let failed = channel::read_line::<RestoreChildMsg>(
        BufReader::new(std::fs::File::from(fail_r)),
        RestoreChildMsg::CHANNEL,
        RestoreChildMsg::EXPECTED,
    );
    // CRIU runs (the pipe closed at its exec) in its private mount
    // namespace, whose tmpfs /run holds the kdat cache it may write. The
    // namespace goes with CRIU: a descriptor of that /run keeps the mount
    // for the read after CRIU exits.
    let kdat_dir = match (&failed, &kdat) {
        (Ok(None), Some((_, None))) => kdat::open_run_of(child.as_raw())
            .map_err(|e| log::debug!("{e}; CRIU's kdat cache will not be saved"))
            .ok(),
        _ => None,
    };
    let status = sys::waitpid(child.as_raw(), 0);
    stamps.mark(crate::timings::CRIU_EXITED);
    if let Some(ending) = dog.finish() {
        return Err(CriuError::Ended {
            action: "restore",
            ending,
        }
        .into());
    }
    match failed {
        Ok(None) => {}
        Ok(Some(RestoreChildMsg::ChildFailed { step, errno })) => {
            return Err(RestoreError::Child {
                step,
                source: nix::errno::Errno::from_raw(errno),
            })
        }
        // Whatever wrote it is not our child speaking our protocol.
        Err(e) => return Err(e.into()),
    }
    if !matches!(status, Ok(Some(sys::Wait::Exited(_, 0)))) {
        log::debug!("criu restore exited: {status:?}");
        return Err(restore_failed(opts, inst));
    }
    let root = read_pidfile(&inst.restored_pidfile())?;
    if let (Some((cache, None)), Some(dir)) = (&kdat, kdat_dir) {
        match cache.save_from(&dir) {
            Ok(true) => log::debug!("saved CRIU's kdat cache to {}", cache.file.display()),
            Ok(false) => log::debug!("CRIU wrote no kdat cache"),
            Err(e) => log::warn!("{e}; CRIU will probe the kernel again next time"),
        }
    }
    Ok(root)
}

/// The error for a CRIU that exited unsuccessfully, with its decisive log
/// line; the log is kept beside the state directory's logs, since the
/// caller removes the instance directory it was written in.
fn restore_failed(opts: &RestoreOpts, inst: &Instance) -> RestoreError {
    let log = inst.dir.join("restore.log");
    let line = crate::criu::log::decisive_line_of(&log);
    let kept = opts
        .state_dir
        .join("logs")
        .join(format!("restore-failed-{}.log", inst.id));
    if let Some(dir) = kept.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let log = if std::fs::copy(&log, &kept).is_ok() {
        kept
    } else {
        log
    };
    CriuError::RestoreFailed {
        images: opts.images.clone(),
        line,
        log,
    }
    .into()
}

/// The restored root's pid, from the pidfile CRIU wrote.
fn read_pidfile(pidfile: &Path) -> Result<Pid, RestoreError> {
    let bad = |source| RestoreError::Pidfile {
        path: pidfile.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(pidfile).map_err(bad)?;
    text.trim()
        .parse::<i32>()
        .ok()
        // 0 or a negative number would make a later kill(2) signal a group.
        .filter(|&p| p > 0)
        .map(Pid::from_raw)
        .ok_or_else(|| bad(std::io::ErrorKind::InvalidData.into()))
}

fn child_fail(fd: RawFd, step: &str, e: nix::errno::Errno) -> ! {
    // Assembled on the stack: no allocation after fork.
    let mut buf = [0u8; 160];
    let n = RestoreChildMsg::encode_child_failed(&mut buf, step, e as i32);
    let _ = sys::write_all(fd, &buf[..n]);
    sys::exit_now(127)
}

/// The kdat cache for this restore (the cache and its saved bytes, if
/// usable), or None when CRIU keeps its own or a tmpfs over `/run` would
/// hide something the restore needs (the instance, with its staging
/// directories, is under the state directory).
fn kdat_plan(
    criu: &Criu,
    opts: &RestoreOpts,
    md: &Metadata,
) -> Option<(KdatCache, Option<Vec<u8>>)> {
    let paths = [
        opts.state_dir.as_path(),
        opts.images.as_path(),
        criu.path.as_path(),
        md.spec.log_dir.as_path(),
    ];
    if kdat::would_hide(&paths) {
        log::debug!(
            "a path of this restore is under {}: no kdat cache",
            kdat::RUN_DIR
        );
        return None;
    }
    let cache = KdatCache::for_state_dir(&opts.state_dir, &criu.path)?;
    let data = cache.load().unwrap_or_else(|e| {
        log::debug!("{e}");
        None
    });
    Some((cache, data))
}

/// The descriptors the restore child arranges before it execs CRIU.
struct ChildFds<'a> {
    /// The failure pipe's write end (close-on-exec).
    fail: RawFd,
    /// This process: the child's parent, whose death must end CRIU.
    parent: libc::pid_t,
    /// /dev/null and a log for stdio (`--detach`), else the caller's.
    stdio: Option<(RawFd, RawFd)>,
    /// Files CRIU gets by `--inherit-fd`.
    inherited: &'a [RawFd],
    /// The instance cgroup's `cgroup.procs`: CRIU, and so the tree it
    /// forks, runs in the instance's cgroup.
    cgroup_procs: Option<RawFd>,
}

fn restore_child(
    fds: &ChildFds<'_>,
    root: &CString,
    stage: &[(CString, CString)],
    kdat: Option<Option<&[u8]>>,
    prog: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    sys::unblock_all_signals();
    let fail = fds.fail;
    // The restored root's parent is ours (--restore-sibling): if we die,
    // nobody would supervise what CRIU restores, so CRIU dies with us and
    // the next runmh ends the half-restored instance by its cgroup. The
    // getppid() check catches a death before the prctl.
    if let Err(e) = sys::set_parent_death_signal(libc::SIGKILL) {
        child_fail(fail, "set the parent-death signal", e);
    }
    if sys::getppid() != fds.parent {
        sys::exit_now(127);
    }
    // First: whatever this child becomes is in the instance cgroup.
    if let Some(fd) = fds.cgroup_procs {
        if let Err(e) = sys::write_all(fd, b"0") {
            child_fail(fail, "enter the instance cgroup", e);
        }
        sys::close(fd);
    }
    if let Some((null, log)) = fds.stdio {
        for (from, to) in [(null, 0), (null, 1), (log, 2)] {
            if let Err(e) = sys::dup2(from, to) {
                child_fail(fail, "redirect_stdio", e);
            }
        }
    }
    if let Err((step, e)) = private_root::enter(root, stage, kdat) {
        child_fail(fail, step.name(), e);
    }
    for &fd in fds.inherited {
        if let Err(e) = sys::clear_cloexec(fd) {
            child_fail(fail, "keep an inherited log open", e);
        }
    }
    let e = sys::execve(prog, argv, envp);
    child_fail(fail, "execute criu", e)
}

enum Setup {
    // Boxed: a Running (tracer, channels, record) dwarfs the Ended variant.
    Running(Box<Running>),
    Ended { status: ExitStatus, inst: Instance },
}

/// Takes the restored tree (our child, stopped where it was dumped) over:
/// the tracer thread watches it, TRACE re-seizes it, and it goes on past
/// its stop point — or stays held there (`hold`). A failure kills the tree
/// and removes the instance.
fn adopt(
    inst: Instance,
    mut rec: InstanceRecord,
    root: Pid,
    opts: &RestoreOpts,
    stamps: &crate::timings::Stamps,
) -> Result<Setup, RestoreError> {
    let abandon = |inst: &Instance| {
        let _ = sys::kill(root, libc::SIGKILL);
        inst.remove();
    };
    let kind = rec.backend.kind;
    let traced = kind == BackendKind::Trace && opts.reseize;
    // A NOTIFY tree needs no tracer to go on: SIGCONT first takes the
    // tracer thread's start off the critical path (its exit, if it comes
    // first, waits as our zombie for the tracer's watch).
    let continued = (matches!(kind, BackendKind::Notify | BackendKind::None) && !opts.hold)
        .then(|| stop::continue_tree(root).map(drop));
    let (tracer, exit) = match Tracer::start().and_then(|t| t.watch(root).map(|x| (t, x))) {
        Ok(te) => te,
        Err(e) => {
            abandon(&inst);
            return Err(e.into());
        }
    };
    stamps.mark(crate::timings::TRACER_READY);
    rec.root_pid = root.as_raw();
    // With --leave-stopped (hold) CRIU left every task in group-stop before
    // its first user instruction, untraced: the resume request does later
    // what the branch below does now.
    let held = opts.hold.then_some(Held {
        reseize: opts.reseize,
    });
    if held.is_none() {
        let resumed = match continued {
            Some(r) => r,
            None => {
                // TRACE: the replayed trap is stamped as the re-seize lets
                // it through.
                let stamped = if traced {
                    tracer.stamp_passed(stamps).map_err(StopError::from)
                } else {
                    Ok(())
                };
                stamped.and_then(|()| {
                    stop::resume_restored(kind, root, &tracer, opts.reseize).map(drop)
                })
            }
        };
        if let Err(e) = resumed {
            // A service that fails at once may already have been reaped by
            // our tracer thread.
            if let Ok(status) = exit.recv_timeout(Duration::from_millis(200)) {
                return Ok(Setup::Ended { status, inst });
            }
            abandon(&inst);
            return Err(e.into());
        }
        stamps.mark(crate::timings::RESUMED);
    }
    rec.state = if held.is_some() {
        InstanceState::Standby
    } else {
        InstanceState::Running
    };
    if let Err(e) = inst.write_record(&rec) {
        abandon(&inst);
        return Err(e.into());
    }
    if held.is_some() {
        explain::say(
            "standby",
            &format!("restored tree root is host pid {root}, held at its stop point until a resume request"),
        );
    } else {
        explain::say(
            "ready",
            &format!(
                "restored tree root is host pid {root}; its parent is this runmh (pid {})",
                std::process::id()
            ),
        );
    }
    Ok(Setup::Running(Box::new(Running {
        tracer,
        instance: inst,
        record: rec,
        root,
        exit,
        traced: traced && held.is_none(),
        held,
    })))
}

/// Exit status of a service for display.
pub fn describe_exit(o: &Outcome) -> String {
    if o.dumped {
        "dumped".to_string()
    } else {
        match o.status {
            ExitStatus::Exited(c) => format!("exited with status {c}"),
            s => s.to_string(),
        }
    }
}

//! `runmh restore`: CRIU brings an image back and execs into runmh, which
//! becomes the parent of the restored tree (the talk's `--exec-cmd` trick).
//!
//! The front process (what the user or the daemon started) forks a child
//! that enters a private mount namespace, binds the host `/` onto a fresh
//! root and execs `criu restore --root ... --exec-cmd -- runmh __supervise`.
//! CRIU restores the tree as its own children, then execs the supervisor in
//! its place; the supervisor gets the tree past its stop point, reports
//! "ready" over an inherited pipe, and supervises it. A failed restore
//! leaves the image untouched: CRIU only reads it, and logs go elsewhere.

use crate::channel::{self, ChannelError, ReadyMsg};
use crate::criu::kdat::{self, KdatCache};
use crate::criu::{leave_cgroup, private_root};
use crate::criu::{watchdog, Criu, CriuError, RestoreArgs};
use crate::explain;
use crate::images::compat::{self, CompatError, CpuCheck};
use crate::images::{Metadata, MetadataError};
use crate::instance::{self, Instance, InstanceError, InstanceRecord, InstanceState};
use crate::stop::tracer::{Tracer, TracerError};
use crate::stop::{self, BackendKind, StopError};
use crate::supervisor::{Held, Outcome, Running, SupervisorError};
use crate::sys;
use crate::sys::exit::ExitStatus;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::CString;
use std::io::{BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
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
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
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
    #[error("the restored supervisor failed: {0}")]
    Supervise(String),
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

/// A restore that succeeded: the supervisor runs the tree.
#[derive(Debug)]
pub struct Restored {
    pub supervisor: Pid,
    pub root: Pid,
    pub instance: Instance,
    pub metadata: Metadata,
    /// From the start of the restore to "ready".
    pub took: Duration,
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

/// Starts the restore; returns once the supervisor reports the tree ready.
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
        supervisor_pid: 0,
        front_pid: Some(nix::unistd::getpid().as_raw()),
        root_pid: 0,
        format_version: instance::RECORD_VERSION,
        state: InstanceState::Restoring,
        started_unix_ms: crate::sys::time::unix_ms(),
    };
    if let Err(e) = inst.write_record(&rec) {
        inst.remove();
        return Err(e.into());
    }
    match spawn_criu(criu, opts, &inst, &md, &redirects) {
        Ok((supervisor, root)) => Ok(Restored {
            supervisor,
            root,
            instance: inst,
            metadata: md,
            took: t0.elapsed(),
        }),
        Err(e) => {
            inst.remove();
            Err(e)
        }
    }
}

static SUPERVISOR_EXE: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// Sets the program CRIU execs into after a restore. It runs as
/// `<program> __supervise ...`, so it must be runmh: callers that are not
/// runmh themselves (mhctl's research matrix, tests) set it.
pub fn set_supervisor_exe(path: &Path) {
    *SUPERVISOR_EXE.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
}

/// The set program, else `runmh` beside the current executable (mhctl and
/// runmh are installed together), else the current executable.
fn supervisor_exe() -> std::io::Result<PathBuf> {
    if let Some(p) = SUPERVISOR_EXE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n != "runmh") {
        if let Some(sibling) = me.parent().map(|d| d.join("runmh")).filter(|p| p.is_file()) {
            return Ok(sibling);
        }
    }
    Ok(me)
}

fn spawn_criu(
    criu: &Criu,
    opts: &RestoreOpts,
    inst: &Instance,
    md: &Metadata,
    redirects: &[LogRedirect],
) -> Result<(Pid, Pid), RestoreError> {
    let exe = supervisor_exe().map_err(|e| RestoreError::Prepare {
        path: "/proc/self/exe".into(),
        source: e,
    })?;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| RestoreError::Fork {
            step: "pipe",
            source,
        })?;
    let mut exec_cmd: Vec<std::ffi::OsString> = vec![
        exe.clone().into_os_string(),
        "__supervise".into(),
        "--instance".into(),
        inst.dir.clone().into_os_string(),
        "--ready-fd".into(),
        ready_w.as_raw_fd().to_string().into(),
        "--stop-timeout".into(),
        opts.stop_timeout.as_secs().to_string().into(),
    ];
    if !opts.reseize {
        exec_cmd.push("--no-reseize".into());
    }
    // CRIU's process leaves the instance cgroup it runs in for ours (see
    // criu::leave_cgroup; the supervisor it becomes checks): only the
    // restored tree stays in it.
    let mut origin = None;
    let cgroup_procs = match &inst.cgroup {
        Some(cg) => match cg.procs_for_child() {
            Ok(fd) => {
                origin = crate::sandbox::cgroup::cgroup_of(None);
                if let Some(o) = &origin {
                    exec_cmd.push("--cgroup-origin".into());
                    exec_cmd.push(o.into());
                }
                Some(fd)
            }
            Err(e) => {
                crate::sandbox::cgroup::warn_unavailable(&e);
                None
            }
        },
        None => None,
    };
    // Preferred over the child's write to cgroup.procs, which stays the
    // fallback (see sys::fork_into_cgroup for the ~10 ms it saves).
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
    if opts.hold {
        exec_cmd.push("--hold".into());
    }
    if explain::enabled() {
        exec_cmd.push("--explain".into());
    }
    if let Some(t) = &opts.timings {
        exec_cmd.push("--timings".into());
        exec_cmd.push(t.clone().into_os_string());
    }
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
        exec_cmd,
        leave_stopped: opts.hold,
    };
    let inherited: Vec<RawFd> = redirects.iter().map(|r| r.file.as_raw_fd()).collect();
    let argv_os = args.argv();
    explain::say("criu", "restore in a private mount namespace, with the host / bound onto a fresh --root; CRIU then execs runmh, which becomes the restored tree's parent:");
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
    let write_fd = ready_w.as_raw_fd();
    let kdat = kdat_plan(
        criu,
        opts,
        md,
        &[
            exe.as_path(),
            inst.control_socket().as_path(),
            inst.dir.join("ext").as_path(),
        ],
    );
    let kdat_child = kdat.as_ref().map(|(_, data)| data.as_deref());
    let stamps = crate::timings::Stamps::new(opts.timings.as_deref());
    stamps.watch_creation(&inst.dir, "restore.log", Duration::from_secs(60));
    stamps.mark(crate::timings::CRIU_EXEC);
    let stdio = if opts.detach {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| RestoreError::Prepare {
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
    let (forked, joined) = match cgroup_dir.as_ref() {
        // SAFETY: the child only calls async-signal-safe wrappers on the
        // data prepared above and ends in execve or _exit.
        Some(dir) => match unsafe { sys::fork_into_cgroup(dir.as_fd()) } {
            Ok(pid) => (Ok(pid), true),
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
                ready: write_fd,
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
    drop(ready_w);
    drop(cgroup_procs);
    drop(cgroup_dir);
    let leaver = match (&inst.cgroup, origin) {
        (Some(cg), Some(origin)) => Some(leave_cgroup::Leaver::start(cg.clone(), origin, child)),
        _ => None,
    };
    // CRIU, then the supervisor it execs, holds the pipe's write end: the
    // read ends with the ready line, or at EOF when the watchdog has ended
    // them (too slow, a runaway log, or SIGTERM for us).
    // The supervisor moves the record on from Restoring once it runs the
    // tree; a SIGTERM after that is the service's to handle.
    let record_of = Instance::open(&inst.dir);
    let dog = watchdog::watch_until_handoff(
        child,
        &inst.dir.join("restore.log"),
        opts.limits,
        move || {
            record_of
                .as_ref()
                .ok()
                .and_then(|i| i.read_record().ok())
                .is_some_and(|r| r.state != InstanceState::Restoring)
        },
    );
    let reply = channel::read_line::<ReadyMsg>(
        BufReader::new(std::fs::File::from(ready_r)),
        ReadyMsg::CHANNEL,
        ReadyMsg::EXPECTED,
    );
    if let Some(l) = leaver {
        log::debug!("criu's process and the instance cgroup: {:?}", l.finish());
    }
    if let Some(ending) = dog.finish() {
        let _ = sys::waitpid(child.as_raw(), 0);
        return Err(CriuError::Ended {
            action: "restore",
            ending,
        }
        .into());
    }
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            // Whoever wrote it is not speaking our protocol: stop the
            // restore's process (CRIU or the supervisor) rather than leave
            // a tree nobody knows how to manage.
            let _ = sys::kill(child, libc::SIGKILL);
            let _ = sys::waitpid(child.as_raw(), 0);
            return Err(e.into());
        }
    };
    if let Some(ReadyMsg::Ready { root }) = reply {
        let root = root.pid();
        if let Some((cache, None)) = &kdat {
            // CRIU probed the kernel and wrote its cache into our tmpfs; the
            // supervisor it exec'd still lives in that mount namespace.
            match cache.save_from(child.as_raw()) {
                Ok(true) => log::debug!("saved CRIU's kdat cache to {}", cache.file.display()),
                Ok(false) => log::debug!("CRIU wrote no kdat cache"),
                Err(e) => log::warn!("{e}; CRIU will probe the kernel again next time"),
            }
        }
        return Ok((child, root));
    }
    // Failure: reap the child (CRIU, or the supervisor that failed).
    let status = sys::waitpid(child.as_raw(), 0).ok().flatten();
    match reply {
        Some(ReadyMsg::SupervisorFailed { error }) => return Err(RestoreError::Supervise(error)),
        Some(ReadyMsg::ChildFailed { step, errno }) => {
            return Err(RestoreError::Child {
                step,
                source: nix::errno::Errno::from_raw(errno),
            })
        }
        // Handled above.
        Some(ReadyMsg::Ready { .. }) => {}
        // The pipe closed without a word: CRIU failed before its exec.
        None => {}
    }
    let log = inst.dir.join("restore.log");
    let line = crate::criu::log::decisive_line_of(&log);
    // The instance directory (with the log) is removed by the caller; keep the log.
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
    log::debug!("criu restore exited: {status:?}");
    Err(CriuError::RestoreFailed {
        images: opts.images.clone(),
        line,
        log,
    }
    .into())
}

fn child_fail(fd: RawFd, step: &str, e: nix::errno::Errno) -> ! {
    // Assembled on the stack: no allocation after fork.
    let mut buf = [0u8; 160];
    let n = ReadyMsg::encode_child_failed(&mut buf, step, e as i32);
    let _ = sys::write_all(fd, &buf[..n]);
    sys::exit_now(127)
}

/// The kdat cache for this restore (the cache and its saved bytes, if
/// usable), or None when CRIU keeps its own or a tmpfs over `/run` would
/// hide something the restore or the supervisor needs (`more`: the
/// supervisor's program and its control socket, which may live under /run).
fn kdat_plan(
    criu: &Criu,
    opts: &RestoreOpts,
    md: &Metadata,
    more: &[&Path],
) -> Option<(KdatCache, Option<Vec<u8>>)> {
    let mut paths = vec![
        opts.state_dir.as_path(),
        opts.images.as_path(),
        criu.path.as_path(),
        md.spec.log_dir.as_path(),
    ];
    paths.extend_from_slice(more);
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
    /// The ready pipe's write end, kept open into the supervisor.
    ready: RawFd,
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
    let ready = fds.ready;
    // First: whatever this child becomes is in the instance cgroup.
    if let Some(fd) = fds.cgroup_procs {
        if let Err(e) = sys::write_all(fd, b"0") {
            child_fail(ready, "enter the instance cgroup", e);
        }
        sys::close(fd);
    }
    if let Some((null, log)) = fds.stdio {
        for (from, to) in [(null, 0), (null, 1), (log, 2)] {
            if let Err(e) = sys::dup2(from, to) {
                child_fail(ready, "redirect_stdio", e);
            }
        }
    }
    if let Err((step, e)) = private_root::enter(root, stage, kdat) {
        child_fail(ready, step.name(), e);
    }
    // The ready pipe must survive into CRIU and, through --exec-cmd, into
    // the supervisor: clear its close-on-exec flag.
    if let Err(e) = sys::clear_cloexec(ready) {
        child_fail(ready, "keep the ready pipe open", e);
    }
    for &fd in fds.inherited {
        if let Err(e) = sys::clear_cloexec(fd) {
            child_fail(ready, "keep an inherited log open", e);
        }
    }
    let e = sys::execve(prog, argv, envp);
    child_fail(ready, "execute criu", e)
}

/// Waits for a restored supervisor (our child) while forwarding signals to
/// it; returns its exit code.
pub fn wait_supervisor(supervisor: Pid) -> i32 {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let code = match sys::waitpid(supervisor.as_raw(), 0) {
            Ok(Some(sys::Wait::Exited(_, c))) => c,
            Ok(Some(sys::Wait::Signaled(_, s))) => 128 + s,
            _ => 1,
        };
        let _ = tx.send(code);
    });
    let signals = crate::supervisor::signals();
    loop {
        crossbeam_channel::select! {
            recv(rx) -> c => return c.unwrap_or(1),
            recv(signals) -> s => { if let Ok(s) = s { let _ = sys::kill(supervisor, s); } }
        }
    }
}

/// How the front process hands a restore over to its supervisor.
pub struct Handover<'a> {
    pub dir: &'a Path,
    pub ready_fd: RawFd,
    /// The cgroup to move to out of the instance's (the front's own).
    pub cgroup_origin: Option<&'a str>,
}

/// `runmh __supervise`: runs in the process CRIU exec'd into. With `hold`
/// the tree stays at its stop point until a `resume` control request.
pub fn supervise_restored(
    h: Handover<'_>,
    reseize: bool,
    hold: bool,
    stop_timeout: Duration,
    timings: Option<&Path>,
) -> Result<Outcome, RestoreError> {
    let stamps = crate::timings::Stamps::new(timings);
    stamps.mark(crate::timings::SUPERVISOR_START);
    // Out of the instance cgroup before anything else: it is the restored
    // tree's, and killing it must not kill its supervisor. The front
    // process has usually moved us during CRIU's page read
    // (criu::leave_cgroup); the move is what is left when it had not.
    if let Some(origin) = h.cgroup_origin {
        if crate::sandbox::cgroup::cgroup_of(None).as_deref() != Some(origin) {
            if let Err(e) = crate::sandbox::cgroup::move_self_to(origin) {
                log::warn!("{}", crate::error_chain(&e));
            }
        }
    }
    let ready_fd = h.ready_fd;
    // CRIU leaves every signal but SIGCHLD blocked and its own fds open
    // across --exec-cmd (crtools.c, criu_signals_setup): start clean.
    sys::unblock_all_signals();
    let _ = crate::stop::tracer::block_supervisor_signals();
    let _ = sys::close_fds_except(&mut [ready_fd]);
    // SAFETY: the fd number was passed to us by our own front process,
    // which created it for this purpose; nothing else in this fresh process owns it.
    let mut ready = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ready_fd) });
    let result = supervise_setup(h.dir, reseize, hold, &stamps);
    let running = match result {
        Ok(Setup::Running(r)) => *r,
        Ok(Setup::Ended { root, status, inst }) => {
            // Restored, but it ended at once (e.g. the talk's ENOSYS): the
            // restore worked; the service's own status tells the rest.
            send_ready(&mut ready, &ReadyMsg::Ready { root: root.into() });
            log::warn!("the restored service (pid {root}) ended right away: {status}");
            inst.remove();
            return Ok(Outcome {
                status,
                dumped: false,
            });
        }
        Err(e) => {
            send_ready(
                &mut ready,
                &ReadyMsg::SupervisorFailed {
                    error: e.to_string(),
                },
            );
            return Err(e);
        }
    };
    stamps.mark(crate::timings::READY);
    send_ready(
        &mut ready,
        &ReadyMsg::Ready {
            root: running.root.into(),
        },
    );
    drop(ready);
    let (outcome, inst) = running.supervise(stop_timeout)?;
    inst.remove();
    Ok(outcome)
}

/// One message on the ready pipe. A failed write leaves the front process
/// with a closed pipe and no message, which it reports as a failed restore.
fn send_ready(ready: &mut std::fs::File, msg: &ReadyMsg) {
    match serde_json::to_vec(msg) {
        Ok(mut line) => {
            line.push(b'\n');
            if let Err(e) = ready.write_all(&line) {
                log::warn!("cannot report to the restore's front process: {e}");
            }
        }
        Err(e) => log::warn!("cannot encode {msg:?}: {e}"),
    }
}

enum Setup {
    // Boxed: a Running (tracer, channels, record) dwarfs the Ended variant.
    Running(Box<Running>),
    Ended {
        root: Pid,
        status: ExitStatus,
        inst: Instance,
    },
}

fn supervise_setup(
    dir: &Path,
    reseize: bool,
    hold: bool,
    stamps: &crate::timings::Stamps,
) -> Result<Setup, RestoreError> {
    let mut inst = Instance::open(dir)?;
    // Beside the front process, which holds it until it ends; if both were
    // gone, a cleaner may be ending the instance: then fail, it kills the tree.
    inst.take_ownership()?;
    let mut rec = inst.read_record()?;
    let pidfile = inst.restored_pidfile();
    let root: i32 = std::fs::read_to_string(&pidfile)
        .map_err(|source| RestoreError::Pidfile {
            path: pidfile.clone(),
            source,
        })?
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| RestoreError::Pidfile {
            path: pidfile.clone(),
            source: std::io::ErrorKind::InvalidData.into(),
        })?;
    let root = Pid::from_raw(root);
    let tracer = Tracer::start()?;
    let exit = tracer.watch(root)?;
    stamps.mark(crate::timings::TRACER_READY);
    let kind = rec.backend.kind;
    if hold {
        // CRIU restored it with --leave-stopped: every task is in
        // group-stop before its first user instruction, untraced. The
        // resume request does what the branch below does now.
        rec.supervisor_pid = nix::unistd::getpid().as_raw();
        rec.root_pid = root.as_raw();
        rec.state = InstanceState::Standby;
        inst.write_record(&rec)?;
        explain::say(
            "standby",
            &format!("restored tree root is host pid {root}, held at its stop point until a resume request"),
        );
        return Ok(Setup::Running(Box::new(Running {
            tracer,
            instance: inst,
            record: rec,
            root,
            exit,
            traced: false,
            held: Some(Held { reseize }),
        })));
    }
    if kind == BackendKind::Trace && reseize {
        tracer.stamp_passed(stamps)?;
    }
    if let Err(e) = stop::resume_restored(kind, root, &tracer, reseize) {
        // CRIU resumes the tree before it execs us: a service that fails
        // at once may already have been reaped by our tracer thread.
        if let Ok(status) = exit.recv_timeout(Duration::from_millis(200)) {
            return Ok(Setup::Ended { root, status, inst });
        }
        let _ = sys::kill(root, libc::SIGKILL);
        return Err(e.into());
    }
    stamps.mark(crate::timings::RESUMED);
    rec.supervisor_pid = nix::unistd::getpid().as_raw();
    rec.root_pid = root.as_raw();
    rec.state = InstanceState::Running;
    inst.write_record(&rec)?;
    explain::say(
        "ready",
        &format!(
            "restored tree root is host pid {root}; its parent is this runmh (pid {})",
            std::process::id()
        ),
    );
    let traced = kind == BackendKind::Trace && reseize;
    Ok(Setup::Running(Box::new(Running {
        tracer,
        instance: inst,
        record: rec,
        root,
        exit,
        traced,
        held: None,
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

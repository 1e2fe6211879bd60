//! Running one scenario for real: a fresh sandbox, the library's prebake
//! (stop, dump, publish), the library's restore, and what the payload
//! itself logged. Also the restore-and-watch step that the demo and the
//! patched-CRIU rows share.

use super::payloads::Resolver;
use super::report::{Row, Status, SyscallResult};
use super::scenarios::{CriuChoice, Scenario};
use crate::criu::{private_root, Criu, CriuError};
use crate::explain;
use crate::filter::StopSyscall;
use crate::instance::Instance;
use crate::prebake::{self, BootError, PrebakeOpts};
use crate::restore::{self, RestoreError, RestoreOpts, Supervision};
use crate::sandbox::ExternalMount;
use crate::spec::{SandboxSpec, SpecInput};
use crate::supervisor::Running;
use crate::sys;
use nix::libc;
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What every scenario of one matrix run shares.
pub struct Ctx<'a> {
    pub criu: &'a Criu,
    pub criu_patched: Option<&'a Criu>,
    pub state_dir: &'a Path,
    /// Per-run scratch space (logs, images, builds), on the root filesystem.
    pub work_dir: &'a Path,
    /// How long a target may take to reach listen before "no stop".
    pub stop_timeout: Duration,
    pub resolver: &'a mut Resolver,
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One HTTP/1.0 GET to 127.0.0.1; the status code.
pub fn http_get(port: u16) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// The bytes of a log file from `offset` on (lossy UTF-8).
pub fn read_from(path: &Path, offset: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = usize::try_from(offset).map_or(bytes.len(), |o| o.min(bytes.len()));
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What a restored payload did once it ran: its listen line, and whether
/// (and when) it answered HTTP.
pub struct Knock {
    pub listen: Option<(SyscallResult, String)>,
    pub served: Option<bool>,
    pub answered_at: Option<Instant>,
}

/// Watches the payload's log (from `out_at`) for its listen line and
/// knocks on `port` until it answers, its listen failed, or `wait` passed.
pub fn knock(out: &Path, out_at: u64, port: u16, wait: Duration) -> Knock {
    let mut k = Knock {
        listen: None,
        served: None,
        answered_at: None,
    };
    let deadline = Instant::now() + wait;
    loop {
        if k.listen.is_none() {
            k.listen = parse_listen(&read_from(out, out_at));
        }
        if k.listen.as_ref().is_some_and(|(l, _)| l.ret != 0) {
            break;
        }
        if matches!(http_get(port), Ok(200)) {
            k.answered_at = Some(Instant::now());
            k.served = Some(true);
            break;
        }
        if Instant::now() > deadline {
            if k.listen.is_some() {
                k.served = Some(false);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The server can answer before the last look at its log caught the
    // listen line it wrote just before: look once more.
    if k.listen.is_none() {
        k.listen = parse_listen(&read_from(out, out_at));
    }
    k
}

/// The payload's own report of its listen: `MHLOG <name> listen ret=R errno=E`.
pub fn parse_listen(text: &str) -> Option<(SyscallResult, String)> {
    text.lines().rev().find_map(|l| {
        let l = l.trim();
        let rest = l.strip_prefix("MHLOG ")?;
        let (_, rest) = rest.split_once(' ')?;
        let rest = rest.strip_prefix("listen ")?;
        let mut ret = None;
        let mut errno = None;
        for kv in rest.split_whitespace() {
            match kv.split_once('=') {
                Some(("ret", v)) => ret = v.parse().ok(),
                Some(("errno", v)) => errno = v.parse().ok(),
                _ => {}
            }
        }
        Some((
            SyscallResult {
                ret: ret?,
                errno: errno?,
            },
            l.to_string(),
        ))
    })
}

/// The preload library's line (`miehisto-preload: ...`), if any.
pub fn preload_line(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find(|l| l.starts_with("miehisto-preload:"))
        .map(|l| l.trim().to_string())
}

fn last_mhlog(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find(|l| l.starts_with("MHLOG "))
        .map(|l| l.trim().to_string())
}

/// What a restored service did, as seen from outside and from its logs.
#[derive(Debug)]
pub struct Watched {
    /// The restore's own failure, if it reported one.
    pub error: Option<RestoreError>,
    /// CRIU brought the tree back: the restore succeeded, or the payload
    /// wrote to its log after the restore started (a service that fails at
    /// once can end before its supervisor has taken it over).
    pub restored: bool,
    /// From the start of the restore to the supervisor's report ("ready",
    /// or its error when the service got going and ended first).
    pub restore_ms: Option<u64>,
    /// From the start of the restore to the first HTTP 200.
    pub first_response_ms: Option<u64>,
    pub listen: Option<(SyscallResult, String)>,
    pub preload: Option<String>,
    /// None: not tried (listen failed, or never reported).
    pub served: Option<bool>,
    /// The restored root's `TracerPid` while it ran (0: nobody).
    pub tracer_pid: Option<String>,
}

/// How [`restore_and_watch`] brings an image back.
pub enum Via<'a> {
    /// runmh's restore, in this process: the restored tree is its child,
    /// which it gets past its stop point (re-seizing a TRACE image's tasks
    /// when `reseize`).
    Runmh { state_dir: &'a Path, reseize: bool },
    /// Bare `criu restore --restore-detached` with `extra` options, in a
    /// private root under `work_dir` (which gets CRIU's log), `externals`
    /// mapped back; then only SIGCONT: no runmh, no tracer.
    Bare {
        work_dir: &'a Path,
        externals: &'a [ExternalMount],
        extra: &'a [&'a str],
    },
}

/// The restored tree while it runs: how to stop it afterwards.
enum Restored {
    /// runmh's restore: the tree is this process's child, under its
    /// tracer thread (None: it ended at once, its instance is gone).
    Supervised {
        root: Pid,
        running: Option<Box<Running>>,
    },
    Detached(Pid),
}

/// Restores `images`, watches the service get past its stop point (its
/// own `listen` line in `stdout`, then HTTP on `port`), stops it and
/// cleans up. A failed restore is reported in [`Watched::error`], with
/// whatever the payload logged.
pub fn restore_and_watch(
    criu: &Criu,
    images: &Path,
    via: Via<'_>,
    stdout: &Path,
    stderr: &Path,
    port: u16,
    wait: Duration,
) -> Watched {
    let (out_at, err_at) = (file_len(stdout), file_len(stderr));
    let t0 = Instant::now();
    let mut w = Watched {
        error: None,
        restored: false,
        restore_ms: None,
        first_response_ms: None,
        listen: None,
        preload: None,
        served: None,
        tracer_pid: None,
    };
    let restored = match via {
        Via::Runmh { state_dir, reseize } => {
            let opts = RestoreOpts {
                images: images.to_path_buf(),
                state_dir: state_dir.to_path_buf(),
                reseize,
                stop_timeout: Duration::from_secs(2),
                timings: None,
                limits: crate::criu::watchdog::Limits::default(),
                detach: false,
                log_dir: None,
                hold: false,
            };
            restore::restore(criu, &opts).map(|r| {
                w.restore_ms = Some(crate::sys::time::millis(r.took));
                Restored::Supervised {
                    root: r.root,
                    running: match r.supervision {
                        Supervision::Running(running) => Some(running),
                        Supervision::Ended(_) => None,
                    },
                }
            })
        }
        Via::Bare {
            work_dir,
            externals,
            extra,
        } => bare_restore(criu, images, work_dir, externals, extra).map(|root| {
            w.restore_ms = Some(crate::sys::time::millis(t0.elapsed()));
            Restored::Detached(root)
        }),
    };
    match restored {
        Ok(r) => {
            w.restored = true;
            let root = match &r {
                Restored::Supervised { root, .. } | Restored::Detached(root) => *root,
            };
            explain::say("watch", &format!("restored in {} ms; now watching the payload's own log for its listen line, and knocking on port {port}", w.restore_ms.unwrap_or(0)));
            let k = knock(stdout, out_at, port, wait);
            w.listen = k.listen;
            w.served = k.served;
            w.first_response_ms = k
                .answered_at
                .map(|t| crate::sys::time::millis(t.duration_since(t0)));
            w.tracer_pid = tracer_pid(root);
            match r {
                Restored::Supervised { running, .. } => {
                    if let Some(r) = running {
                        if r.end_now(Duration::from_secs(10)).is_none() {
                            log::warn!("the restored service did not end within 10 s of SIGKILL");
                        }
                    }
                }
                Restored::Detached(root) => stop_detached(root),
            }
        }
        Err(e) => {
            // Give a service that got going a moment to finish its line.
            std::thread::sleep(Duration::from_millis(100));
            w.restored = !matches!(e, RestoreError::Criu(CriuError::RestoreFailed { .. }))
                && file_len(stdout) > out_at;
            if w.restored {
                // CRIU did its part; the time is up to runmh's report.
                w.restore_ms = Some(crate::sys::time::millis(
                    t0.elapsed().saturating_sub(Duration::from_millis(100)),
                ));
            }
            explain::say(
                "restore",
                &format!("the restore reported: {}", crate::error_chain(&e)),
            );
            w.error = Some(e);
        }
    }
    if w.listen.is_none() {
        w.listen = parse_listen(&read_from(stdout, out_at));
    }
    w.preload = preload_line(&read_from(stderr, err_at));
    w
}

/// [`Via::Bare`]: runmh's own restore command line, without runmh: the
/// restored tree is resumed with a plain SIGCONT.
fn bare_restore(
    criu: &Criu,
    images: &Path,
    work_dir: &Path,
    externals: &[ExternalMount],
    extra: &[&str],
) -> Result<Pid, RestoreError> {
    let rr = work_dir.join("restore-root");
    std::fs::create_dir_all(&rr).map_err(|source| RestoreError::Prepare {
        path: rr.clone(),
        source,
    })?;
    let args = crate::criu::RestoreArgs {
        images_dir: images.to_path_buf(),
        work_dir: work_dir.to_path_buf(),
        log_name: "restore.log".into(),
        root: rr.clone(),
        externals: externals.to_vec(),
        pidfile: work_dir.join("restored.pid"),
        inherit_fds: Vec::new(),
        leave_stopped: false,
    };
    explain::say(
        "criu",
        "bare restore, in a private mount namespace with the host / bound onto --root:",
    );
    explain::block(&crate::criu::argv::shell_words(
        &criu.path,
        &private_root::detached_argv(&args, extra),
    ));
    let restored = private_root::restore_detached(criu, &args, extra, None);
    let _ = std::fs::remove_dir(&rr);
    let root = restored?;
    explain::say(
        "resume",
        &format!("restored as pid {root}; SIGCONT, and nobody else touches it"),
    );
    // Dumped in group-stop, restored stopped: resume it, with no tracer.
    let _ = crate::stop::continue_tree(root);
    Ok(root)
}

/// The `TracerPid` of a running task, as /proc shows it.
fn tracer_pid(pid: Pid) -> Option<String> {
    sys::procfs::status(pid)
        .ok()
        .and_then(|s| s.tracer_pid)
        .map(|t| t.to_string())
}

/// Every process of the tree rooted at `root` (just `root` once it is gone).
fn tree_pids(root: Pid) -> Vec<Pid> {
    sys::procfs::tree_tasks(root)
        .map(|tree| tree.into_iter().map(|(pid, _)| pid).collect())
        .unwrap_or_else(|_| vec![root])
}

/// Is `pid` gone (or a zombie nobody reaped yet)?
fn gone(pid: Pid) -> bool {
    !sys::procfs::alive(pid)
}

/// SIGTERM, then SIGKILL, to a restored tree we are not the parent of
/// (`--restore-detached`); reaped here when this process is a subreaper,
/// else by init.
fn stop_detached(root: Pid) {
    let pids = tree_pids(root);
    for p in &pids {
        let _ = sys::kill(*p, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !pids.iter().all(|p| gone(*p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in &pids {
        if !gone(*p) {
            let _ = sys::kill(*p, libc::SIGKILL);
        }
    }
    for p in &pids {
        // ECHILD when init is the parent: nothing to do then.
        let _ = sys::waitpid(p.as_raw(), 0);
    }
}

/// A sandbox spec for a payload listening on `port`, logging into `log_dir`.
pub fn payload_spec(
    program: &Path,
    args: &[String],
    log_dir: &Path,
) -> Result<SandboxSpec, crate::spec::SpecError> {
    let mut argv = vec![program.display().to_string()];
    argv.extend(args.iter().cloned());
    SandboxSpec::build(SpecInput {
        argv,
        env: Vec::new(),
        cwd: None,
        user: None,
        log_dir: log_dir.to_path_buf(),
        inherit_basic_env: true,
    })
}

fn error_row(mut row: Row, what: &str) -> Row {
    row.status = Status::Error;
    row.evidence = what.to_string();
    row
}

/// Runs one scenario once, in a fresh sandbox, and reports what happened.
pub fn run_scenario(sc: &Scenario, attempt: u32, ctx: &mut Ctx<'_>) -> Row {
    let criu_word = match sc.criu {
        CriuChoice::Stock => "stock",
        CriuChoice::Patched => "patched",
    };
    let mut row = Row::new(
        &sc.id,
        attempt,
        &sc.technique,
        sc.payload.name(),
        sc.backend.as_str(),
        criu_word,
    );
    explain::say("scenario", &format!("{} — {}", sc.id, sc.technique));
    explain::say("why", sc.story);
    let criu = match (sc.criu, ctx.criu_patched) {
        (CriuChoice::Stock, _) => ctx.criu,
        (CriuChoice::Patched, Some(c)) => c,
        (CriuChoice::Patched, None) => {
            row.status = Status::Skipped;
            row.evidence = "no patched CRIU given (--criu-patched)".into();
            return row;
        }
    };
    let program = match ctx.resolver.resolve(sc.payload) {
        Ok(p) => p,
        Err(why) => {
            explain::say("skip", &why);
            row.status = Status::Skipped;
            row.evidence = why;
            return row;
        }
    };
    let dir = scenario_dir(ctx.work_dir, &sc.id, attempt);
    let log_dir = dir.join("logs");
    let images = dir.join("image");
    if let Err(e) = std::fs::create_dir_all(&log_dir) {
        return error_row(row, &format!("cannot create {}: {e}", log_dir.display()));
    }
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return error_row(row, &format!("no free TCP port: {e}")),
    };
    let spec = match payload_spec(&program, &["--port".into(), port.to_string()], &log_dir) {
        Ok(s) => s,
        Err(e) => return error_row(row, &crate::error_chain(&e)),
    };
    let stop_at = match StopSyscall::parse("listen") {
        Ok(s) => s,
        Err(e) => return error_row(row, &crate::error_chain(&e)),
    };
    let inst = match Instance::create(ctx.state_dir) {
        Ok(i) => i,
        Err(e) => return error_row(row, &crate::error_chain(&e)),
    };
    let opts = PrebakeOpts {
        images: images.clone(),
        backend: sc.backend,
        stop_at,
        marker_signal: sys::sigrtmax(),
        timeout: ctx.stop_timeout,
        leave_running: false,
        reuseport: false,
        research: sc.research,
    };
    let result = prebake::prebake(&spec, ctx.state_dir, inst, criu, &opts);
    let cold_out = read_from(&spec.stdout_log(), 0);
    let cold_err = read_from(&spec.stderr_log(), 0);
    let went_on = || {
        let mut parts = Vec::new();
        if let Some((_, l)) = parse_listen(&cold_out) {
            parts.push(l);
        } else if let Some(l) = last_mhlog(&cold_out) {
            parts.push(format!("last payload line: {l}"));
        }
        if let Some(l) = preload_line(&cold_err) {
            parts.push(l);
        }
        parts.join("; ")
    };
    let baked = match result {
        Ok(p) => p,
        Err(BootError::Timeout { secs, .. }) => {
            row.stopped = Some(false);
            let seen = went_on();
            row.evidence = if seen.is_empty() {
                format!("no stop within {secs} s, and the payload logged nothing")
            } else {
                format!("no stop within {secs} s; {seen}")
            };
            explain::say("result", &row.evidence);
            return row;
        }
        Err(BootError::TargetExited { status, .. }) => {
            row.stopped = Some(false);
            row.evidence = format!(
                "the target ended ({status}) without stopping; {}",
                went_on()
            );
            explain::say("result", &row.evidence);
            return row;
        }
        Err(BootError::Criu(CriuError::DumpFailed { line, .. })) => {
            // The dump is only attempted once the target stopped.
            row.stopped = Some(true);
            row.dumped = Some(false);
            row.evidence = line;
            explain::say("result", &format!("the dump failed: {}", row.evidence));
            return row;
        }
        Err(e) => return error_row(row, &crate::error_chain(&e)),
    };
    row.stopped = Some(true);
    row.dumped = Some(true);
    row.time_to_stop_ms = Some(crate::sys::time::millis(baked.time_to_stop));
    row.dump_ms = Some(baked.dumped.metadata.dump_ms);
    let resume = match (sc.backend, sc.reseize) {
        (crate::stop::BackendChoice::Trace, true) => {
            "runmh re-seizes the restored tasks before they run"
        }
        (crate::stop::BackendChoice::Trace, false) => {
            "runmh resumes the restored tasks with a plain SIGCONT, no tracer"
        }
        _ => "runmh resumes the restored tasks; nothing listens on the restored filter",
    };
    explain::say(
        "restore",
        &format!("restoring with {}; {resume}", criu.path.display()),
    );
    let w = restore_and_watch(
        criu,
        &images,
        Via::Runmh {
            state_dir: ctx.state_dir,
            reseize: sc.reseize,
        },
        &spec.stdout_log(),
        &spec.stderr_log(),
        port,
        Duration::from_secs(5),
    );
    let _ = std::fs::remove_dir_all(&images);
    row.restored = Some(w.restored);
    row.restore_ms = w.restore_ms;
    row.after_restore = w.listen.as_ref().map(|(r, _)| *r);
    row.served_http = w.served;
    let mut parts = Vec::new();
    match (&w.error, &w.listen) {
        (Some(RestoreError::Criu(CriuError::RestoreFailed { line, .. })), _) => {
            parts.push(line.clone())
        }
        (_, Some((_, l))) => parts.push(l.clone()),
        (_, None) => parts.push("the payload logged no listen line after the restore".to_string()),
    }
    if let Some(p) = w.preload {
        parts.push(p);
    }
    if let Some(e) = &w.error {
        if !matches!(e, RestoreError::Criu(CriuError::RestoreFailed { .. })) {
            parts.push(format!("then runmh: {}", crate::error_chain(e)));
        }
    }
    row.evidence = parts.join("; ");
    if row.after_restore.is_some_and(|r| r.errno == libc::ENOSYS) {
        explain::say(
            "enosys",
            if sc.backend == crate::stop::BackendChoice::Trace {
                "why ENOSYS: CRIU restored the seccomp filter (plain BPF) but no tracer; the kernel fails a SECCOMP_RET_TRACE'd call that no tracer is attached to with ENOSYS"
            } else {
                "why ENOSYS: CRIU restored the seccomp filter but not its listener; the kernel fails a SECCOMP_RET_USER_NOTIF'd call that has no listener with ENOSYS"
            },
        );
    }
    explain::say("result", &row.evidence);
    row
}

/// A scenario run's scratch directory: its logs, its image.
pub fn scenario_dir(work_dir: &Path, id: &str, attempt: u32) -> PathBuf {
    work_dir.join(format!("{id}-{attempt}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_just_before_the_error_is_its_cause() {
        let log = "(00.05) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
(00.057028) Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 7 (Operation not permitted)\n\
(00.057049) \tUnseizing 7 into 1\n\
(00.057052) Error (compel/src/lib/infect.c:417): Unable to detach from 7: No such process\n";
        let line = crate::criu::log::decisive_line(log).unwrap();
        assert_eq!(
            line,
            "Warn  (compel/src/lib/infect.c:132): Unable to interrupt task: 7 (Operation not permitted) → Error (compel/src/lib/infect.c:417): Unable to detach from 7: No such process"
        );
    }

    #[test]
    fn reads_the_payload_and_preload_lines() {
        let out = "MHLOG simple start pid=1 ppid=0\nMHLOG simple bound port=1 fd=3\nMHLOG simple listen ret=-1 errno=38\nMHLOG simple fatal listen failed\n";
        let (r, line) = parse_listen(out).unwrap();
        assert_eq!((r.ret, r.errno), (-1, 38));
        assert_eq!(line, "MHLOG simple listen ret=-1 errno=38");
        assert!(parse_listen("MHLOG simple bound port=1 fd=3\n").is_none());
        assert_eq!(
            preload_line("x\nmiehisto-preload: marker sig=64 before listen ret=-1 errno=38\n")
                .unwrap(),
            "miehisto-preload: marker sig=64 before listen ret=-1 errno=38"
        );
    }
}

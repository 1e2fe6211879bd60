//! Rows for the patched CRIU (seize-patch/): the CRIU-side alternatives to
//! the user-space backends, run on the same payload so the table can be
//! read side by side.
//!
//! * `8-handoff` — the talk's 2018 flow (a tracer PTRACE_ATTACHed and
//!   holding the task in its seccomp ptrace-stop at listen) dumped by
//!   `criu dump --seize-handoff`: CRIU asks seize-patch's
//!   handoff-supervisor to park and release the task right before its own
//!   PTRACE_SEIZE. The image is restored with `--seccomp-neutralize-traps`.
//! * `8-neutralize-trace`, `8-neutralize-notify` — an image made by the
//!   library's prebake (TRACE, or NOTIFY directly on listen), restored by a
//!   bare `criu restore --seccomp-neutralize-traps -d`: no runmh, no
//!   tracer, no listener, no marker; the harness only sends SIGCONT.
//!
//! As in the other rows, nothing here says what should happen: the row
//! reports what CRIU did and what the payload logged.

use super::report::{Row, Status};
use super::run::{self, Ctx, Via};
use super::scenarios::Payload;
use crate::criu::argv::{shell_words, DumpArgs};
use crate::criu::{log as criu_log, Criu, CriuError};
use crate::explain;
use crate::filter::StopSyscall;
use crate::images::Metadata;
use crate::instance::Instance;
use crate::prebake::{self, BootError, PrebakeOpts, Research};
use crate::restore::RestoreError;
use crate::sandbox::ExternalMount;
use crate::stop::BackendChoice;
use crate::sys;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use nix::libc;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a patched row does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The 2018 tracer holds the task; `criu dump --seize-handoff` takes it.
    Handoff2018,
    /// A runmh-style TRACE image, restored with neutralized traps.
    NeutralizeTrace,
    /// A NOTIFY-on-listen image, restored with neutralized traps.
    NeutralizeNotifyDirect,
}

#[derive(Debug, Clone)]
pub struct PatchedScenario {
    pub id: &'static str,
    pub technique: &'static str,
    pub story: &'static str,
    pub kind: Kind,
}

/// The patched rows, in table order. Their ids share the prefix `8`, so
/// `--only 8` selects all of them.
pub fn all() -> Vec<PatchedScenario> {
    vec![
        PatchedScenario {
            id: "8-handoff",
            technique: "2018 tracer holds the task; criu dump --seize-handoff; restore --seccomp-neutralize-traps",
            story: "the 2018 tracer (PTRACE_ATTACH, SECCOMP_RET_TRACE on listen) keeps the task in its seccomp ptrace-stop; the patched CRIU asks it over a UNIX socket to park the call (skip, rewind, SIGSTOP) and detach right before its own PTRACE_SEIZE, checks the parked registers, dumps, and tells it when it let go",
            kind: Kind::Handoff2018,
        },
        PatchedScenario {
            id: "8-neutralize-trace",
            technique: "TRACE image; bare criu restore --seccomp-neutralize-traps, no supervisor",
            story: "the restored filter's SECCOMP_RET_TRACE return is rewritten to SECCOMP_RET_ALLOW before the restorer loads it; nobody traces the restored task, which is only sent SIGCONT",
            kind: Kind::NeutralizeTrace,
        },
        PatchedScenario {
            id: "8-neutralize-notify",
            technique: "NOTIFY-on-listen image; bare criu restore --seccomp-neutralize-traps, no supervisor",
            story: "the restored filter's SECCOMP_RET_USER_NOTIF return is rewritten to SECCOMP_RET_ALLOW; the restored filter has no listener, and none is needed",
            kind: Kind::NeutralizeNotifyDirect,
        },
    ]
}

/// The patched rows `only` selects (all when empty), by the matrix's
/// prefix rule.
pub fn selected(only: &[String]) -> Vec<PatchedScenario> {
    all()
        .into_iter()
        .filter(|s| only.is_empty() || only.iter().any(|w| super::scenarios::selects(w, s.id)))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum PatchedError {
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free TCP port")]
    Port(#[source] std::io::Error),
    #[error("cannot build the payload's sandbox spec")]
    Spec(#[source] crate::spec::SpecError),
    #[error("cannot start {prog}")]
    Spawn {
        prog: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for {prog}")]
    Wait {
        prog: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handoff-supervisor printed no usable 'started' line (got {line:?})")]
    SupervisorStart { line: String },
    #[error("the bare restore could not run")]
    Restore(#[source] RestoreError),
    #[error("cannot read the image metadata in {dir}")]
    Metadata {
        dir: PathBuf,
        #[source]
        source: crate::images::MetadataError,
    },
    #[error("cannot create the prebake's instance")]
    Instance(#[source] crate::instance::InstanceError),
    #[error("prebake failed")]
    Prebake(#[source] BootError),
}

/// Runs one patched scenario once and reports what happened.
pub fn run_patched(sc: &PatchedScenario, attempt: u32, ctx: &mut Ctx<'_>) -> Row {
    let backend = match sc.kind {
        Kind::Handoff2018 | Kind::NeutralizeTrace => "trace",
        Kind::NeutralizeNotifyDirect => "notify",
    };
    let mut row = Row::new(
        sc.id,
        attempt,
        sc.technique,
        Payload::Simple.name(),
        backend,
        "patched",
    );
    explain::say("scenario", &format!("{} — {}", sc.id, sc.technique));
    explain::say("why", sc.story);
    let Some(criu) = ctx.criu_patched else {
        return skipped(
            row,
            "no patched CRIU given (--criu-patched); build one with seize-patch/build.sh",
        );
    };
    if let Some(missing) = missing_option(criu) {
        return skipped(
            row,
            &format!(
                "{} has no {missing}: it is not seize-patch's CRIU; build it with seize-patch/build.sh",
                criu.path.display()
            ),
        );
    }
    let program = match ctx.resolver.resolve(Payload::Simple) {
        Ok(p) => p,
        Err(why) => return skipped(row, &why),
    };
    let dir = run::scenario_dir(ctx.work_dir, sc.id, attempt);
    let result = match sc.kind {
        Kind::Handoff2018 => handoff_row(&mut row, criu, &program, &dir, ctx),
        Kind::NeutralizeTrace => neutralize_row(&mut row, criu, &program, &dir, ctx, false),
        Kind::NeutralizeNotifyDirect => neutralize_row(&mut row, criu, &program, &dir, ctx, true),
    };
    if let Err(e) = result {
        row.status = Status::Error;
        row.evidence = crate::error_chain(&e);
    }
    explain::say("result", &row.evidence);
    row
}

fn skipped(mut row: Row, why: &str) -> Row {
    explain::say("skip", why);
    row.status = Status::Skipped;
    row.evidence = why.to_string();
    row
}

/// The first seize-patch option `criu --help` does not mention.
fn missing_option(criu: &Criu) -> Option<&'static str> {
    let help = criu.command().arg("--help").output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    ["--seize-handoff", "--seccomp-neutralize-traps"]
        .into_iter()
        .find(|o| !text.contains(o))
}

/// handoff-supervisor: `$MIEHISTO_HANDOFF_SUPERVISOR`, else where
/// seize-patch/build.sh installs it beside the patched CRIU
/// (`PREFIX/sbin/criu` → `PREFIX/bin/handoff-supervisor`).
fn find_supervisor(criu: &Criu) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MIEHISTO_HANDOFF_SUPERVISOR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let prefix = criu.path.parent()?.parent()?;
    Some(prefix.join("bin/handoff-supervisor")).filter(|p| p.is_file())
}

fn mkdir(path: &Path) -> Result<(), PatchedError> {
    std::fs::create_dir_all(path).map_err(|source| PatchedError::Dir {
        path: path.to_path_buf(),
        source,
    })
}

/// A UNIX socket path short enough for `sun_path` (108 bytes), whatever
/// the state directory.
fn socket_path(attempt: u32) -> PathBuf {
    std::env::temp_dir().join(format!("mh-handoff-{}-{attempt}.sock", std::process::id()))
}

/// One `MHSUP` line's `key=value` field.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `externals=/dev:dev,/dev/pts:devpts` → the mounts handoff-supervisor bound.
fn parse_externals(v: &str) -> Vec<ExternalMount> {
    v.split(',')
        .filter_map(|e| e.rsplit_once(':'))
        .map(|(path, key)| ExternalMount {
            path: PathBuf::from(path),
            key: key.to_string(),
        })
        .collect()
}

/// The supervisor's stdout, one `MHSUP` line at a time.
fn status_lines(child: &mut Child) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// The next status line whose event word is one of `events`, or None at
/// the deadline or when the supervisor's stdout closed.
fn wait_line(rx: &Receiver<String>, events: &[&str], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l)
                if events.iter().any(|e| {
                    l.strip_prefix("MHSUP ")
                        .is_some_and(|r| r.split_whitespace().next() == Some(e))
                }) =>
            {
                return Some(l)
            }
            Ok(_) => continue,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Kills and reaps a child we started (a no-op once it is gone).
fn finish_child(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn handoff_row(
    row: &mut Row,
    criu: &Criu,
    program: &Path,
    dir: &Path,
    ctx: &mut Ctx<'_>,
) -> Result<(), PatchedError> {
    let Some(sup) = find_supervisor(criu) else {
        row.status = Status::Skipped;
        row.evidence = format!(
            "no handoff-supervisor beside {} (nor $MIEHISTO_HANDOFF_SUPERVISOR): run seize-patch/build.sh",
            criu.path.display()
        );
        return Ok(());
    };
    let (logs, root, images) = (dir.join("logs"), dir.join("root"), dir.join("image"));
    for d in [&logs, &root, &images] {
        mkdir(d)?;
    }
    let port = run::free_port().map_err(PatchedError::Port)?;
    let sock = socket_path(row.attempt);
    let _ = std::fs::remove_file(&sock);
    let sup_err = dir.join("handoff-supervisor.err");
    let err_file = std::fs::File::create(&sup_err).map_err(|source| PatchedError::Dir {
        path: sup_err.clone(),
        source,
    })?;
    explain::say("2018", "handoff-supervisor forks the payload into a sandbox, PTRACE_ATTACHes it and loads SECCOMP_RET_TRACE on listen; at the trap it holds the task in its seccomp ptrace-stop");
    let mut child = Command::new(&sup)
        .arg("--socket")
        .arg(&sock)
        .arg("--root")
        .arg(&root)
        .arg("--log-dir")
        .arg(&logs)
        .arg("--")
        .arg(program)
        .args(["--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err_file)
        .spawn()
        .map_err(|source| PatchedError::Spawn {
            prog: sup.clone(),
            source,
        })?;
    let rx = status_lines(&mut child);
    let result = handoff_steps(row, criu, &rx, dir, &images, &logs, &sock, port, ctx);
    // The dump normally kills the held task, and the supervisor exits with
    // it; on any other path it is told to stop here (it kills its task).
    let _ = sys::kill(sys::child_pid(&child), libc::SIGTERM);
    finish_child(&mut child, Duration::from_secs(5));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir_all(&images);
    let _ = std::fs::remove_dir(&root);
    // The supervisor's own error, when it had one, says why it did not hold.
    if row.evidence.is_empty() || row.stopped == Some(false) {
        let text = std::fs::read_to_string(&sup_err).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(": error: ")) {
            row.evidence = if row.evidence.is_empty() {
                l.to_string()
            } else {
                format!("{}; {l}", row.evidence)
            };
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn handoff_steps(
    row: &mut Row,
    criu: &Criu,
    rx: &Receiver<String>,
    dir: &Path,
    images: &Path,
    logs: &Path,
    sock: &Path,
    port: u16,
    ctx: &mut Ctx<'_>,
) -> Result<(), PatchedError> {
    let started = wait_line(rx, &["started"], Duration::from_secs(10)).unwrap_or_default();
    let (Some(pid), Some(ext)) = (
        field(&started, "pid").and_then(|p| p.parse::<i32>().ok()),
        field(&started, "externals"),
    ) else {
        return Err(PatchedError::SupervisorStart { line: started });
    };
    let externals = parse_externals(ext);
    let restore_externals = externals.clone();
    let Some(held) = wait_line(rx, &["held", "exit"], ctx.stop_timeout) else {
        row.stopped = Some(false);
        row.evidence = format!("no stop within {} s", ctx.stop_timeout.as_secs());
        return Ok(());
    };
    if held.starts_with("MHSUP exit") {
        row.stopped = Some(false);
        row.evidence = format!("the target ended without stopping ({held})");
        return Ok(());
    }
    row.stopped = Some(true);
    row.time_to_stop_ms = field(&held, "ms").and_then(|v| v.parse().ok());
    explain::say(
        "held",
        &format!("{held} — a stock `criu dump` of it would now fail: its PTRACE_SEIZE gets EPERM"),
    );

    let mut argv = DumpArgs {
        pid,
        images_dir: images.to_path_buf(),
        work_dir: dir.to_path_buf(),
        log_name: "dump.log".into(),
        externals,
        leave_running: false,
    }
    .argv();
    argv.push("--seize-handoff".into());
    argv.push(sock.as_os_str().to_owned());
    explain::say(
        "criu",
        "dump with the hand-off: CRIU connects to the supervisor's socket right before its seize",
    );
    explain::block(&shell_words(&criu.path, &argv));
    let t0 = Instant::now();
    let status = criu
        .command()
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| PatchedError::Spawn {
            prog: criu.path.clone(),
            source,
        })?;
    let dump_log = run::read_from(&dir.join("dump.log"), 0);
    let done = wait_line(rx, &["done"], Duration::from_secs(10))
        .unwrap_or_else(|| "no 'done' from the supervisor".into());
    if !status.success() {
        row.dumped = Some(false);
        let line = criu_log::decisive_line(&dump_log)
            .unwrap_or_else(|| format!("criu dump exited with {status}"));
        row.evidence = format!("{line}; supervisor: {done}");
        return Ok(());
    }
    row.dumped = Some(true);
    row.dump_ms = Some(crate::sys::time::millis(t0.elapsed()));
    let parked = dump_log
        .lines()
        .find(|l| l.contains("seize-handoff: tid") && l.contains("parked"))
        .and_then(|l| l.split_once("seize-handoff: "))
        .map(|(_, r)| r.trim().to_string())
        .unwrap_or_else(|| "CRIU logged no parked thread".into());
    // The held task was killed by the dump; its supervisor reports the exit.
    let _ = wait_line(rx, &["exit"], Duration::from_secs(10));
    let after = restore_neutralized(row, criu, images, dir, logs, port, &restore_externals)?;
    row.evidence = format!("hand-off: {parked}; {done}; after restore: {after}");
    Ok(())
}

fn neutralize_row(
    row: &mut Row,
    criu: &Criu,
    program: &Path,
    dir: &Path,
    ctx: &mut Ctx<'_>,
    notify_direct: bool,
) -> Result<(), PatchedError> {
    let (logs, images) = (dir.join("logs"), dir.join("image"));
    mkdir(&logs)?;
    let port = run::free_port().map_err(PatchedError::Port)?;
    let spec = run::payload_spec(program, &["--port".into(), port.to_string()], &logs)
        .map_err(PatchedError::Spec)?;
    let stop_at = StopSyscall::parse("listen")
        .map_err(|e| PatchedError::Prebake(BootError::Stop(e.into())))?;
    let inst = Instance::create(ctx.state_dir).map_err(PatchedError::Instance)?;
    let opts = PrebakeOpts {
        images: images.clone(),
        backend: if notify_direct {
            BackendChoice::Notify
        } else {
            BackendChoice::Trace
        },
        stop_at,
        marker_signal: sys::sigrtmax(),
        timeout: ctx.stop_timeout,
        leave_running: false,
        reuseport: false,
        research: Research {
            notify_direct,
            ..Research::default()
        },
    };
    explain::say(
        "prebake",
        "the library's own prebake, with the patched CRIU as a drop-in for the dump",
    );
    let baked = match prebake::prebake(&spec, ctx.state_dir, inst, criu, &opts) {
        Ok(b) => b,
        Err(BootError::Timeout { secs, .. }) => {
            row.stopped = Some(false);
            row.evidence = format!("no stop within {secs} s");
            return Ok(());
        }
        Err(BootError::TargetExited { status, .. }) => {
            row.stopped = Some(false);
            row.evidence = format!("the target ended ({status}) without stopping");
            return Ok(());
        }
        Err(BootError::Criu(crate::criu::CriuError::DumpFailed { line, .. })) => {
            row.stopped = Some(true);
            row.dumped = Some(false);
            row.evidence = line;
            return Ok(());
        }
        Err(e) => return Err(PatchedError::Prebake(e)),
    };
    row.stopped = Some(true);
    row.dumped = Some(true);
    row.time_to_stop_ms = Some(crate::sys::time::millis(baked.time_to_stop));
    row.dump_ms = Some(baked.dumped.metadata.dump_ms);
    let md = Metadata::read(&images).map_err(|source| PatchedError::Metadata {
        dir: images.clone(),
        source,
    })?;
    let after = restore_neutralized(row, criu, &images, dir, &logs, port, &md.externals);
    let _ = std::fs::remove_dir_all(&images);
    row.evidence = after?;
    Ok(())
}

/// The bare restore of `images` with the patched CRIU's
/// `--seccomp-neutralize-traps`, watched (run::restore_and_watch with
/// [`Via::Bare`]): fills the row's restore columns, returns the evidence.
fn restore_neutralized(
    row: &mut Row,
    criu: &Criu,
    images: &Path,
    dir: &Path,
    logs: &Path,
    port: u16,
    externals: &[ExternalMount],
) -> Result<String, PatchedError> {
    let w = run::restore_and_watch(
        criu,
        images,
        Via::Bare {
            work_dir: dir,
            externals,
            extra: &["--seccomp-neutralize-traps"],
        },
        &logs.join("stdout.log"),
        &logs.join("stderr.log"),
        port,
        Duration::from_secs(5),
    );
    row.restored = Some(w.restored);
    row.restore_ms = w.restore_ms;
    row.after_restore = w.listen.as_ref().map(|(r, _)| *r);
    row.served_http = w.served;
    match w.error {
        Some(RestoreError::Criu(CriuError::RestoreFailed { line, .. })) => return Ok(line),
        Some(e) => return Err(PatchedError::Restore(e)),
        None => {}
    }
    let rewritten = run::read_from(&dir.join("restore.log"), 0)
        .lines()
        .filter(|l| l.contains("seccomp: Neutralizing"))
        .count();
    explain::say(
        "neutralize",
        &format!("CRIU rewrote {rewritten} trap return(s) to SECCOMP_RET_ALLOW"),
    );
    let listen_line = w
        .listen
        .map(|(_, l)| l)
        .unwrap_or_else(|| "the payload logged no listen line after the restore".into());
    Ok(format!(
        "{rewritten} trap return(s) neutralized; {listen_line}; TracerPid {}",
        w.tracer_pid.as_deref().unwrap_or("?")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_supervisor_status_lines() {
        let l = "MHSUP started pid=4242 externals=/dev:dev,/dev/pts:devpts,/sys:sys";
        assert_eq!(field(l, "pid"), Some("4242"));
        let e = parse_externals(field(l, "externals").unwrap_or(""));
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[1].path.as_path(), e[1].key.as_str()),
            (Path::new("/dev/pts"), "devpts")
        );
        assert!(parse_externals("").is_empty());
        assert_eq!(field("MHSUP held pid=1 tid=1 nr=50 ms=3", "ms"), Some("3"));
        assert_eq!(field("MHSUP held pid=1", "nr"), None);
    }

    #[test]
    fn patched_rows_share_the_prefix_8() {
        assert_eq!(selected(&["8".to_string()]).len(), all().len());
        assert_eq!(selected(&["8-neutralize".to_string()]).len(), 2);
        assert!(selected(&["1".to_string()]).is_empty());
        assert_eq!(selected(&[]).len(), 3);
    }
}

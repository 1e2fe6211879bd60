//! `runmh demo`: the talk's whole story, live, in a few minutes, narrated
//! for an audience (teaching mode on, with pauses unless `--no-pause`).
//!
//! A slow-booting Python server (the payload with `--boot-imports`) is
//! booted cold and timed; prebaked right before its first `listen(2)` with
//! the chosen backend; restored and timed; then the talk's ENOSYS failure
//! is reproduced (TRACE without the re-seize, or NOTIFY trapping `listen`
//! itself), and the fix is shown working on the same image once more.

use crate::criu::{Criu, CriuError};
use crate::experiment::report::SyscallResult;
use crate::experiment::run::{self as xrun, Watched};
use crate::explain;
use crate::filter::{FilterError, StopSyscall};
use crate::instance::{Instance, InstanceError};
use crate::prebake::{self, BootError, PrebakeOpts, Research};
use crate::restore::RestoreError;
use crate::spec::{SandboxSpec, SpecError};
use crate::stop::BackendChoice;
use crate::sys;
use nix::libc;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The backends the demo can show (no `auto`: the audience should know which).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoBackend {
    Trace,
    Notify,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The stop backend to demonstrate.
    #[arg(long, value_enum, default_value = "notify")]
    pub backend: DemoBackend,
    /// Python 3 interpreter for the demo server (default: $MIEHISTO_PYTHON, else /usr/bin/python3).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// The demo server script (default: examples/http_server.py of this build).
    #[arg(long, value_name = "PATH")]
    pub script: Option<PathBuf>,
    /// TCP port for the demo server (default: a free one).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo must run as root (namespaces, ptrace and CRIU need it); try sudo")]
    NotRoot,
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("no Python 3 at {path}: install python3 or pass --python PATH")]
    NoPython { path: PathBuf },
    #[error("the demo server script {path} does not exist: pass --script PATH (examples/http_server.py)")]
    NoScript { path: PathBuf },
    #[error("cannot find a free TCP port")]
    Port(#[source] std::io::Error),
    #[error("cannot make the state directory {path} an absolute path (empty, or the current directory is gone); pass an absolute --state-dir")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the demo's work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot block the supervisor's signals")]
    Signals(#[source] nix::errno::Errno),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("step {step}: {source}")]
    Boot {
        step: &'static str,
        #[source]
        source: BootError,
    },
    #[error("step {step}: {source}")]
    Restore {
        step: &'static str,
        #[source]
        source: RestoreError,
    },
    #[error("the cold-booted server did not answer HTTP on port {port} within {secs}s; see {log}")]
    ColdTimeout { port: u16, secs: u64, log: PathBuf },
    #[error("the restored server did not answer HTTP on port {port} ({what}); see {log}")]
    NotServing {
        port: u16,
        what: String,
        log: PathBuf,
    },
}

fn headline(n: u32, of: u32, text: &str) {
    println!("\n=== {n}/{of} {text} ===");
}

fn line(text: &str) {
    println!("    {text}");
}

fn default_python() -> PathBuf {
    std::env::var_os("MIEHISTO_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/python3"))
}

/// A cold boot: the sandbox, no stop; timed to the first HTTP 200.
fn cold_boot(spec: &SandboxSpec, state_dir: &Path, port: u16) -> Result<u64, DemoError> {
    let inst = Instance::create(state_dir)?;
    let t0 = Instant::now();
    let running = prebake::run_cold(spec, inst).map_err(|source| DemoError::Boot {
        step: "cold boot",
        source,
    })?;
    let deadline = t0 + Duration::from_secs(60);
    let mut answered = None;
    while Instant::now() < deadline {
        if matches!(xrun::http_get(port), Ok(200)) {
            answered = Some(crate::sys::time::millis(t0.elapsed()));
            break;
        }
        if running.exit.try_recv().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The payload handles SIGTERM itself (as PID 1 it must); SIGKILL if not.
    let _ = sys::kill(running.root, libc::SIGTERM);
    if running.exit.recv_timeout(Duration::from_secs(5)).is_err() {
        let _ = sys::kill(running.root, libc::SIGKILL);
        let _ = running.exit.recv_timeout(Duration::from_secs(5));
    }
    running.instance.remove();
    drop(running);
    answered.ok_or(DemoError::ColdTimeout {
        port,
        secs: 60,
        log: spec.stdout_log(),
    })
}

fn prebake_opts(
    images: &Path,
    backend: BackendChoice,
    research: Research,
) -> Result<PrebakeOpts, DemoError> {
    Ok(PrebakeOpts {
        images: images.to_path_buf(),
        backend,
        stop_at: StopSyscall::parse("listen")?,
        marker_signal: sys::sigrtmax(),
        timeout: Duration::from_secs(60),
        leave_running: false,
        reuseport: false,
        research,
    })
}

/// Restores through runmh (re-seizing a TRACE image's tasks when
/// `reseize`) and watches the service `spec` describes.
fn watch_restore(
    criu: &Criu,
    images: &Path,
    state_dir: &Path,
    spec: &SandboxSpec,
    reseize: bool,
    port: u16,
    wait: Duration,
) -> Watched {
    xrun::restore_and_watch(
        criu,
        images,
        xrun::Via::Runmh { state_dir, reseize },
        &spec.stdout_log(),
        &spec.stderr_log(),
        port,
        wait,
    )
}

fn listen_words(w: &Watched) -> String {
    match &w.listen {
        Some((r, l)) => format!("{} — the payload's own line: {l}", r.render()),
        None => "the payload logged no listen line".to_string(),
    }
}

fn must_serve(
    w: Watched,
    port: u16,
    spec: &SandboxSpec,
    step: &'static str,
) -> Result<Watched, DemoError> {
    if let Some(e) = w.error {
        return Err(DemoError::Restore { step, source: e });
    }
    if w.served != Some(true) {
        return Err(DemoError::NotServing {
            port,
            what: listen_words(&w),
            log: spec.stdout_log(),
        });
    }
    Ok(w)
}

/// What the audience saw, for scripts and tests.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub cold_boot_ms: u64,
    pub time_to_stop_ms: u64,
    pub dump_ms: u64,
    /// Restore start to first HTTP answer, first and second restore.
    pub restore_to_answer_ms: [u64; 2],
    /// What listen returned in the failure step, in the payload's words.
    pub without_fix: Option<SyscallResult>,
}

/// Runs the demo. `pause` adds the pauses an audience can follow (off with
/// `--no-pause`). Returns the exit code.
pub fn run(
    args: &DemoArgs,
    criu: Option<&Path>,
    state_dir: &Path,
    pause: bool,
) -> Result<i32, DemoError> {
    run_story(args, criu, state_dir, pause).map(|_| 0)
}

/// [`run`], returning what happened.
pub fn run_story(
    args: &DemoArgs,
    criu: Option<&Path>,
    state_dir: &Path,
    pause: bool,
) -> Result<DemoSummary, DemoError> {
    if !sys::is_root() {
        return Err(DemoError::NotRoot);
    }
    let criu = Criu::discover(criu)?;
    let python = args.python.clone().unwrap_or_else(default_python);
    if !python.is_file() {
        return Err(DemoError::NoPython { path: python });
    }
    let script = args
        .script
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/http_server.py"));
    if !script.is_file() {
        return Err(DemoError::NoScript { path: script });
    }
    let port = match args.port {
        Some(p) => p,
        None => xrun::free_port().map_err(DemoError::Port)?,
    };
    crate::stop::tracer::block_supervisor_signals().map_err(DemoError::Signals)?;
    explain::enable(pause);
    // The sandbox and CRIU run with other working directories: a relative
    // state dir would name another place there.
    let state_dir = std::path::absolute(state_dir).map_err(|source| DemoError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let work = state_dir.join(format!(
        "demo-{}-{}",
        crate::sys::time::unix_ms(),
        std::process::id()
    ));
    std::fs::create_dir_all(&work).map_err(|source| DemoError::WorkDir {
        path: work.clone(),
        source,
    })?;
    let result = story(
        args.backend,
        &criu,
        &state_dir,
        &work,
        &python,
        &script,
        port,
    );
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn story(
    backend: DemoBackend,
    criu: &Criu,
    state_dir: &Path,
    work: &Path,
    python: &Path,
    script: &Path,
    port: u16,
) -> Result<DemoSummary, DemoError> {
    const STEPS: u32 = 5;
    let argv = [
        script.display().to_string(),
        "--boot-imports".into(),
        "--port".into(),
        port.to_string(),
    ];
    let spec_in = |name: &str| xrun::payload_spec(python, &argv, &work.join(name).join("logs"));
    let (choice, bname) = match backend {
        DemoBackend::Trace => (BackendChoice::Trace, "TRACE"),
        DemoBackend::Notify => (BackendChoice::Notify, "NOTIFY"),
    };
    println!("miehisto demo: stop a server right before its first listen(2), dump it, restore it");
    line(&format!(
        "kernel {}, CRIU {} ({}), backend {bname}",
        crate::images::metadata::kernel_release(),
        criu.version,
        criu.path.display()
    ));
    line(&format!(
        "the server: {} {}",
        python.display(),
        argv.join(" ")
    ));
    line("it imports a pile of stdlib modules first: a slow, open()/stat()-heavy boot, like a framework's");
    explain::pause(4);

    headline(1, STEPS, "boot it cold, the usual way");
    explain::say("plan", "start the server in the CRIU-ready sandbox with no stop, and time it until it answers HTTP");
    let cold = spec_in("cold")?;
    let cold_ms = cold_boot(&cold, state_dir, port)?;
    line(&format!("cold boot to the first HTTP answer: {cold_ms} ms"));
    if let Some(l) = xrun::read_from(&cold.stdout_log(), 0)
        .lines()
        .find(|l| l.contains("boot-imports"))
    {
        line(&format!("(the payload says: {l})"));
    }
    explain::pause(4);

    headline(
        2,
        STEPS,
        &format!("prebake: boot to just before listen(2), stop there ({bname}), dump"),
    );
    explain::say("plan", "boot again, but this time stop right before the first listen(2) — the moment with the least state: everything imported, nothing connected — and dump it with CRIU");
    let baked_spec = spec_in("prebake")?;
    let images = work.join("image");
    let inst = Instance::create(state_dir)?;
    let baked = prebake::prebake(
        &baked_spec,
        state_dir,
        inst,
        criu,
        &prebake_opts(&images, choice, Research::default())?,
    )
    .map_err(|source| DemoError::Boot {
        step: "prebake",
        source,
    })?;
    let md = &baked.dumped.metadata;
    line(&format!(
        "stopped before listen after {} ms; criu dump took {} ms; image {:.1} MB at {}",
        baked.time_to_stop.as_millis(),
        md.dump_ms,
        md.image_bytes as f64 / 1e6,
        baked.dumped.image.display()
    ));
    explain::pause(4);

    headline(3, STEPS, "restore it, and time it");
    explain::say("plan", "bring the image back with criu restore; runmh becomes the restored server's parent, gets it past its stop point, and we time it until it answers HTTP");
    let w = watch_restore(
        criu,
        &images,
        state_dir,
        &baked_spec,
        true,
        port,
        Duration::from_secs(30),
    );
    let w = must_serve(w, port, &baked_spec, "restore")?;
    let first = w.first_response_ms.unwrap_or(0);
    line(&format!(
        "restored in {} ms; first HTTP answer {first} ms after the restore started",
        w.restore_ms.unwrap_or(0)
    ));
    line(&format!("listen after the restore: {}", listen_words(&w)));
    if let Some(p) = &w.preload {
        line(&format!("the preload wrapper says: {p}"));
    }
    if first > 0 {
        line(&format!(
            "cold boot {cold_ms} ms → restore {first} ms ({:.1}× faster)",
            cold_ms as f64 / first as f64
        ));
    }
    explain::pause(4);

    headline(4, STEPS, "the talk's failure: ENOSYS after the restore");
    let failed = match backend {
        DemoBackend::Trace => {
            explain::say(
                "plan",
                "the same image, restored the way the 2018 attempt ended up: resumed with a plain SIGCONT and no tracer attached",
            );
            watch_restore(
                criu,
                &images,
                state_dir,
                &baked_spec,
                false,
                port,
                Duration::from_secs(10),
            )
        }
        DemoBackend::Notify => {
            explain::say("plan", "a second image, made the way the talk first tried NOTIFY: the filter traps listen(2) itself instead of a harmless marker");
            let direct_spec = spec_in("direct")?;
            let direct_images = work.join("image-direct");
            let inst = Instance::create(state_dir)?;
            let research = Research {
                notify_direct: true,
                ..Research::default()
            };
            prebake::prebake(
                &direct_spec,
                state_dir,
                inst,
                criu,
                &prebake_opts(&direct_images, choice, research)?,
            )
            .map_err(|source| DemoError::Boot {
                step: "prebake with NOTIFY on listen",
                source,
            })?;
            line("dumped fine, as in the talk; now the restore:");
            let w = watch_restore(
                criu,
                &direct_images,
                state_dir,
                &direct_spec,
                true,
                port,
                Duration::from_secs(10),
            );
            let _ = std::fs::remove_dir_all(&direct_images);
            w
        }
    };
    line(&format!(
        "listen after the restore: {}",
        listen_words(&failed)
    ));
    if let Some(e) = &failed.error {
        line(&format!("(runmh: {})", crate::error_chain(e)));
    }
    let why = match backend {
        DemoBackend::Trace => "CRIU restores the seccomp filter (it is plain BPF) but never a tracer: the replayed listen hits SECCOMP_RET_TRACE with nobody attached, and the kernel fails it with ENOSYS",
        DemoBackend::Notify => "CRIU restores the seccomp filter but never its listener: a SECCOMP_RET_USER_NOTIF filter with no listener makes the kernel fail the call with ENOSYS — and listen can only be failed, never resumed",
    };
    line(why);
    explain::pause(4);

    headline(5, STEPS, "the fix, on the first image once more");
    let fix = match backend {
        DemoBackend::Trace => "TRACE: the stop rewinds the syscall and detaches before CRIU seizes; after the restore runmh re-seizes every task with PTRACE_O_TRACESECCOMP before SIGCONT, so the replayed listen finds a tracer that lets it run",
        DemoBackend::Notify => "NOTIFY: trap only a harmless marker, kill(self, SIGRTMAX) with SIGRTMAX ignored, sent by an LD_PRELOAD wrapper of listen; after the restore the marker gets ENOSYS, the wrapper ignores it, and the real listen runs",
    };
    line(fix);
    let w = watch_restore(
        criu,
        &images,
        state_dir,
        &baked_spec,
        true,
        port,
        Duration::from_secs(30),
    );
    let w = must_serve(w, port, &baked_spec, "second restore")?;
    line(&format!(
        "restored again (an image can be restored many times): {}",
        listen_words(&w)
    ));
    if let Some(p) = &w.preload {
        line(&format!("the preload wrapper says: {p}"));
    }
    let _ = std::fs::remove_dir_all(&images);

    println!("\n=== summary ===");
    line(&format!("cold boot to first answer   {cold_ms:>6} ms"));
    line(&format!(
        "stop before listen          {:>6} ms",
        baked.time_to_stop.as_millis()
    ));
    line(&format!("criu dump                   {:>6} ms", md.dump_ms));
    line(&format!(
        "restore to first answer     {:>6} ms (then {} ms)",
        first,
        w.first_response_ms.unwrap_or(0)
    ));
    line(&format!(
        "without the fix             {}",
        failed
            .listen
            .as_ref()
            .map(|(r, _)| r.render())
            .unwrap_or_else(|| "no listen line".into())
    ));
    Ok(DemoSummary {
        cold_boot_ms: cold_ms,
        time_to_stop_ms: crate::sys::time::millis(baked.time_to_stop),
        dump_ms: md.dump_ms,
        restore_to_answer_ms: [first, w.first_response_ms.unwrap_or(0)],
        without_fix: failed.listen.map(|(r, _)| r),
    })
}

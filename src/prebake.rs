//! Booting a service in the sandbox: cold (`runmh run`), or to its stop
//! point, dumped and published as an image (`runmh prebake`).

use crate::criu::{Criu, CriuError};
use crate::dump::{self, DumpFacts, Dumped};
use crate::explain;
use crate::filter::StopSyscall;
use crate::images::{BackendRecord, Staged, StopRecord, StoreError};
use crate::instance::{self, Instance, InstanceError, InstanceRecord, InstanceState};
use crate::sandbox::{self, SandboxError, Variant};
use crate::spec::SandboxSpec;
use crate::stop::hit::StopHit;
use crate::stop::tracer::{Tracer, TracerError};
use crate::stop::{self, Arrival, BackendChoice, BackendKind, StopBackend, StopError};
use crate::supervisor::Running;
use crate::sys::exit::ExitStatus;
use crossbeam_channel::{select, Receiver};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(
        "the target exited ({status}) before it reached {stop_at}(2); see its log in {log_dir}"
    )]
    TargetExited {
        status: ExitStatus,
        stop_at: String,
        log_dir: PathBuf,
    },
    #[error("the target did not reach {stop_at}(2) within {secs}s{hint}; raise --timeout if it is just slow")]
    Timeout {
        stop_at: String,
        secs: u64,
        hint: String,
    },
    #[error("cannot stop {program}: ptrace is unavailable ({why}) and the program is statically linked, so the NOTIFY backend's LD_PRELOAD wrapper cannot reach it")]
    Unstoppable { program: PathBuf, why: String },
    #[error("interrupted by {0} before the stop point; nothing was published")]
    Interrupted(String),
}

/// Research switches of the stop backends (the matrix's rows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Research {
    /// TRACE: `PTRACE_ATTACH` and stay attached while CRIU dumps (2018).
    pub legacy_attached: bool,
    /// NOTIFY: trap the stop syscall itself instead of the marker.
    pub notify_direct: bool,
    /// NOTIFY: the wrapper raises SIGSTOP instead of the marker.
    pub preload_sigstop: bool,
}

#[derive(Debug, Clone)]
pub struct PrebakeOpts {
    pub images: PathBuf,
    pub backend: BackendChoice,
    pub stop_at: StopSyscall,
    pub marker_signal: i32,
    pub timeout: Duration,
    pub leave_running: bool,
    pub research: Research,
}

/// What a prebake produced.
pub struct Prebaked {
    pub dumped: Dumped,
    pub hit: StopHit,
    pub time_to_stop: Duration,
    /// The tree, when the dump left it running.
    pub running: Option<Running>,
}

/// Is `path` an ELF executable without a program interpreter (static)?
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16at = |o: usize| usize::from(u16::from_le_bytes([data[o], data[o + 1]]));
    // An offset past the address space cannot point into the file we read.
    let u64at = |o: usize| {
        usize::try_from(u64::from_le_bytes(
            data[o..o + 8].try_into().unwrap_or([0; 8]),
        ))
        .unwrap_or(usize::MAX)
    };
    let (phoff, phentsize, phnum) = (u64at(0x20), u16at(0x36), u16at(0x38));
    !(0..phnum).any(|i| {
        // Checked: a corrupt header's offsets must not overflow.
        let Some(o) = phoff.checked_add(i * phentsize) else {
            return false;
        };
        o.checked_add(4).is_some_and(|end| end <= data.len())
            && u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]) == 3
        // PT_INTERP
    })
}

fn preload_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("lib")
}

fn backend_record(kind: BackendKind, reason: String, marker: Option<i32>) -> BackendRecord {
    BackendRecord {
        kind,
        reason,
        marker_signal: marker,
    }
}

struct Started {
    running: Running,
    arrival: Option<Receiver<Arrival>>,
    backend: Option<Box<dyn StopBackend>>,
    t0: Instant,
}

/// Clones the sandbox, attaches the stop backend (deciding `auto`), and
/// lets the child exec.
fn start(
    spec: &SandboxSpec,
    state_dir: &Path,
    inst: Instance,
    stop: Option<&PrebakeOpts>,
) -> Result<Started, BootError> {
    let tracer = Tracer::start()?;
    let externals = sandbox::host_externals()?;
    let mut candidates: Vec<Box<dyn StopBackend>> = Vec::new();
    if let Some(o) = stop {
        let trace = || -> Box<dyn StopBackend> {
            if o.research.legacy_attached {
                Box::new(stop::trace::TraceBackend::legacy_attached(o.stop_at))
            } else {
                Box::new(stop::trace::TraceBackend::new(o.stop_at))
            }
        };
        let notify = || -> Result<Box<dyn StopBackend>, BootError> {
            let mut n = stop::notify::NotifyBackend::new(
                o.stop_at,
                o.marker_signal,
                &preload_dir(state_dir),
            )?;
            if o.research.notify_direct {
                n = n.direct();
            }
            if o.research.preload_sigstop {
                n = n.sigstop();
            }
            Ok(Box::new(n))
        };
        match o.backend {
            BackendChoice::Trace => candidates.push(trace()),
            BackendChoice::Notify => candidates.push(notify()?),
            BackendChoice::Auto => {
                candidates.push(trace());
                candidates.push(notify()?);
            }
        }
    }
    let mut variants: Vec<Variant> = candidates
        .iter()
        .map(|b| b.variant())
        .collect::<Result<_, _>>()?;
    if variants.is_empty() {
        variants.push(Variant {
            filter: None,
            extra_env: Vec::new(),
        });
    }
    for v in &variants {
        if let Some(f) = &v.filter {
            explain::say("filter", &format!("seccomp filter the child loads as its last step before exec ({}), as libseccomp renders it:", f.rule));
            explain::block(f.pfc.trim());
            explain::say("filter", "and as the kernel gets it, classic BPF:");
            explain::block(f.bpf_listing().trim_end());
        }
    }
    let spawned = sandbox::spawn(spec, &inst.root(), &variants)?;
    let pid = spawned.pid;
    let exit = tracer.watch(pid)?;
    let t0 = spawned.started;

    // Pick the backend: the first candidate that attaches.
    let mut chosen: Option<(usize, String)> = None;
    let mut why_not = String::new();
    for (i, b) in candidates.iter_mut().enumerate() {
        match b.attach(pid, &tracer) {
            Ok(()) => {
                let reason = match (stop.map(|o| o.backend), b.kind()) {
                    (Some(BackendChoice::Auto), BackendKind::Trace) => {
                        "auto: the supervisor can ptrace the target".to_string()
                    }
                    (Some(BackendChoice::Auto), _) => {
                        format!("auto: ptrace is unavailable ({why_not}), fell back to NOTIFY")
                    }
                    _ => "requested".to_string(),
                };
                chosen = Some((i, reason));
                break;
            }
            Err(e) if has_fallback_after(stop, i) => {
                // With its cause: "cannot ptrace-seize task N" alone does not
                // say why ptrace is unavailable, and the reason is recorded.
                why_not = crate::error_chain(&e);
                log::warn!("{}: {e}; trying the next backend", b.kind().as_str());
            }
            Err(e) => {
                let early = spawned.early_failure();
                give_up(spawned, &exit, &inst);
                return Err(match early {
                    Some(child) => child.into(),
                    None => e.into(),
                });
            }
        }
    }
    let (index, reason, backend) = match chosen {
        Some((i, reason)) => {
            let b = candidates.swap_remove(i);
            explain::say(
                "backend",
                &format!("{} — chosen because: {reason}", b.describe()),
            );
            (i, reason, Some(b))
        }
        None => (0, "no stop backend: cold start".to_string(), None),
    };
    if let (Some(b), Some(o)) = (&backend, stop) {
        if b.kind() == BackendKind::Notify
            && o.backend == BackendChoice::Auto
            && is_static_elf(&spec.program)
        {
            give_up(spawned, &exit, &inst);
            return Err(BootError::Unstoppable {
                program: spec.program.clone(),
                why: why_not,
            });
        }
    }
    let marker = backend
        .as_ref()
        .filter(|b| b.kind() == BackendKind::Notify)
        .and(stop.map(|o| o.marker_signal));
    let kind = backend
        .as_ref()
        .map(|b| b.kind())
        .unwrap_or(BackendKind::None);
    // Record the environment the service really got (LD_PRELOAD and the
    // marker settings for NOTIFY): a restore needs the preload library back.
    let mut effective = spec.clone();
    for (k, v) in &variants[index].extra_env {
        effective.env.retain(|(ek, _)| ek != k);
        effective.env.push((k.clone(), v.clone()));
    }
    let record = InstanceRecord {
        id: inst.id.clone(),
        spec: effective,
        externals,
        backend: backend_record(kind, reason, marker),
        image: None,
        supervisor_pid: nix::unistd::getpid().as_raw(),
        front_pid: None,
        root_pid: pid.as_raw(),
        format_version: instance::RECORD_VERSION,
        state: InstanceState::Starting,
        started_unix_ms: crate::sys::time::unix_ms(),
    };
    inst.write_record(&record)?;
    let mut released = match spawned.release(index) {
        Ok(r) => r,
        Err(e) => {
            let _ = exit.recv_timeout(Duration::from_secs(5));
            inst.remove();
            return Err(e.into());
        }
    };
    explain::say(
        "exec",
        &format!(
            "the sandbox's PID 1 (host pid {pid}) exec'd {}",
            spec.program.display()
        ),
    );
    let mut backend = backend;
    let arrival = match backend.as_mut() {
        Some(b) => Some(b.arm(&mut released, &tracer)?),
        None => None,
    };
    let running = Running {
        tracer,
        instance: inst,
        record,
        root: pid,
        exit,
        traced: false,
    };
    Ok(Started {
        running,
        arrival,
        backend,
        t0,
    })
}

/// Lets a child that never ran its command go (it exits 126), reaps it and
/// removes the instance.
fn give_up(spawned: sandbox::Spawned, exit: &Receiver<ExitStatus>, inst: &Instance) {
    spawned.abort();
    let _ = exit.recv_timeout(Duration::from_secs(5));
    inst.remove();
}

fn has_fallback_after(stop: Option<&PrebakeOpts>, i: usize) -> bool {
    // Only `auto` has a second candidate to fall back to.
    stop.is_some_and(|o| o.backend == BackendChoice::Auto) && i == 0
}

/// `runmh run`: boots the command in the sandbox, under supervision.
pub fn run_cold(
    spec: &SandboxSpec,
    state_dir: &Path,
    inst: Instance,
) -> Result<Running, BootError> {
    let s = start(spec, state_dir, inst, None)?;
    Ok(s.running)
}

fn timeout_hint(kind: Option<BackendKind>, program: &Path, stop_at: &str) -> String {
    match kind {
        Some(BackendKind::Notify) => {
            let why = if is_static_elf(program) {
                format!(
                    "{} is statically linked, so the wrapper is never loaded and never sends it",
                    program.display()
                )
            } else {
                "a static binary, a direct syscall(2) or a program without libc (Go) never sends it"
                    .to_string()
            };
            format!(
                ": the NOTIFY backend only sees {stop_at}() calls that go through libc's dynamic symbol (its LD_PRELOAD wrapper sends the marker); {why} — use --backend trace, which traps the syscall itself"
            )
        }
        _ => String::new(),
    }
}

/// `runmh prebake`: boots to the stop point, dumps, publishes.
pub fn prebake(
    spec: &SandboxSpec,
    state_dir: &Path,
    inst: Instance,
    criu: &Criu,
    opts: &PrebakeOpts,
) -> Result<Prebaked, BootError> {
    let staged = Staged::new(&opts.images)?;
    let s = start(spec, state_dir, inst, Some(opts))?;
    let Started {
        mut running,
        arrival,
        mut backend,
        t0,
    } = s;
    let arrival = arrival.ok_or(StopError::NoListener)?;
    let kind = backend.as_ref().map(|b| b.kind());
    let stop_name = opts.stop_at.name();
    let signals = crate::supervisor::signals();
    let abort = |running: Running, err: BootError| -> BootError {
        let _ = crate::sys::kill(running.root, nix::libc::SIGKILL);
        let _ = running.exit.recv_timeout(Duration::from_secs(10));
        running.instance.remove();
        err
    };
    let hit = select! {
        recv(arrival) -> a => match a {
            Ok(Arrival::Stopped(hit)) => hit,
            Ok(Arrival::Failed(e)) => {
                // A NOTIFY listener fails as soon as the last task holding
                // its filter exits, often before the tracer has reaped the
                // target: the exit status is then the real story.
                if let Ok(status) = running.exit.recv_timeout(Duration::from_secs(1)) {
                    running.instance.remove();
                    return Err(BootError::TargetExited { status, stop_at: stop_name, log_dir: spec.log_dir.clone() });
                }
                return Err(abort(running, e.into()));
            }
            Err(_) => return Err(abort(running, StopError::Notify("the stop channel closed".into()).into())),
        },
        recv(running.exit) -> st => {
            let status = st.unwrap_or(ExitStatus::Signaled(9));
            running.instance.remove();
            return Err(BootError::TargetExited { status, stop_at: stop_name, log_dir: spec.log_dir.clone() });
        },
        recv(signals) -> sig => {
            let name = crate::sys::signal::signal_name(sig.unwrap_or(0));
            return Err(abort(running, BootError::Interrupted(name)));
        },
        default(opts.timeout) => {
            let hint = timeout_hint(kind, &spec.program, &stop_name);
            return Err(abort(running, BootError::Timeout { stop_at: stop_name, secs: opts.timeout.as_secs(), hint }));
        },
    };
    let since_start = t0.elapsed();
    explain::say(
        "stopped",
        &format!(
            "held before {stop_name}() after {} ms",
            since_start.as_millis()
        ),
    );
    explain::pause(2);
    if hit.held {
        // The 2018 flow: the tracer still holds the task, CRIU will collide.
        explain::say("collide", "the tracer is still attached (PTRACE_ATTACH) — CRIU's PTRACE_SEIZE of the same task will get EPERM");
    }
    running.record.state = InstanceState::HeldAtStop;
    let _ = running.instance.write_record(&running.record);
    let dump = dump::criu_dump(
        criu,
        running.root.as_raw(),
        &staged,
        &running.record.externals,
        opts.leave_running,
        Some(&running.tracer),
    );
    let took = match dump {
        Ok(t) => t,
        Err(e) => return Err(abort(running, e.into())),
    };
    let stop = StopRecord {
        syscall: stop_name.clone(),
        since_start_ms: crate::sys::time::millis(since_start),
        hit: hit.clone(),
    };
    let facts = DumpFacts {
        criu,
        spec: &running.record.spec,
        externals: &running.record.externals,
        backend: running.record.backend.clone(),
        stop: Some(stop),
        pid: running.root.as_raw(),
        dump_time: took,
        leave_running: opts.leave_running,
    };
    let dumped = match dump::publish(staged, facts) {
        Ok(d) => d,
        Err(e) => return Err(abort(running, e.into())),
    };
    explain::say(
        "publish",
        &format!(
            "image published atomically (rename) at {}",
            dumped.image.display()
        ),
    );
    if opts.leave_running {
        if let Some(b) = backend.as_mut() {
            b.resume_after_dump(running.root, &running.tracer)?;
        }
        running.traced = kind == Some(BackendKind::Trace);
        return Ok(Prebaked {
            dumped,
            hit,
            time_to_stop: since_start,
            running: Some(running),
        });
    }
    // CRIU killed the tree; reap it and clean up.
    let _ = running.exit.recv_timeout(Duration::from_secs(10));
    running.instance.remove();
    drop(backend);
    Ok(Prebaked {
        dumped,
        hit,
        time_to_stop: since_start,
        running: None,
    })
}

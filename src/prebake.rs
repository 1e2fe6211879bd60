//! Booting a service in the sandbox: cold (`runmh run`), or to its stop
//! point, dumped and published as an image (`runmh prebake`).

use crate::criu::{Criu, CriuError};
use crate::dump::{self, DumpFacts, Dumped};
use crate::explain;
use crate::filter::StopSyscall;
use crate::images::{BackendRecord, Staged, StopRecord, StoreError};
use crate::instance::{self, Instance, InstanceError, InstanceRecord, InstanceState};
use crate::sandbox::{
    self, ExternalMount, Released, SandboxError, Spawned, Variant, VariantId, Variants,
};
use crate::spec::SandboxSpec;
use crate::stop::hit::StopHit;
use crate::stop::tracer::{Tracer, TracerError};
use crate::stop::{self, Arrival, BackendChoice, BackendKind, StopBackend, StopError};
use crate::supervisor::Running;
use crate::sys::exit::ExitStatus;
use crossbeam_channel::{select, Receiver};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One variant per step of a boot (see [`prebake`]), carrying its cause.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Staging the image beside its destination.
    #[error(transparent)]
    Stage(StoreError),
    /// Preparing a stop backend (its filter, the preload library).
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("cannot start the tracer thread")]
    StartTracer(#[source] TracerError),
    /// Cloning the sandbox child.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("cannot watch the sandbox's PID 1 (host pid {pid})")]
    Watch {
        pid: Pid,
        #[source]
        source: TracerError,
    },
    #[error("the {kind} backend cannot attach to pid {pid}")]
    Attach {
        kind: BackendKind,
        pid: Pid,
        #[source]
        source: StopError,
    },
    #[error("cannot stop {program}: ptrace is unavailable ({why}) and the program is statically linked, so the NOTIFY backend's LD_PRELOAD wrapper cannot reach it")]
    Unstoppable { program: PathBuf, why: String },
    #[error(transparent)]
    Record(InstanceError),
    /// The child failed a setup step or its exec.
    #[error(transparent)]
    Release(SandboxError),
    #[error("cannot arm the {kind} backend")]
    Arm {
        kind: BackendKind,
        #[source]
        source: StopError,
    },
    #[error(transparent)]
    Sockets(#[from] crate::sockets::SocketsError),
    #[error(
        "the target exited ({status}) before it reached {stop_at}(2); see its log in {log_dir}"
    )]
    TargetExited {
        status: ExitStatus,
        stop_at: String,
        log_dir: PathBuf,
    },
    #[error("the {kind} backend failed before the stop point")]
    StopFailed {
        kind: BackendKind,
        #[source]
        source: StopError,
    },
    #[error("the {kind} backend's stop channel closed before the stop point")]
    StopChannelClosed { kind: BackendKind },
    #[error("lost track of the sandbox's PID 1 (host pid {pid}): the tracer thread ended")]
    LostTarget { pid: Pid },
    #[error("the signal watch ended before the stop point")]
    LostSignals,
    #[error("the target did not reach {stop_at}(2) within {secs}s{hint}; raise --timeout if it is just slow")]
    Timeout {
        stop_at: String,
        secs: u64,
        hint: String,
    },
    #[error("interrupted by {0} before the stop point; nothing was published")]
    Interrupted(String),
    /// The dump.
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Publish(StoreError),
    #[error("cannot let pid {pid} go on after the dump")]
    Resume {
        pid: Pid,
        #[source]
        source: StopError,
    },
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
    /// TRACE: fail to attach as if ptrace were forbidden, so `auto` falls
    /// back to NOTIFY on a machine where ptrace works (the tests' switch).
    pub deny_ptrace: bool,
}

#[derive(Debug, Clone)]
pub struct PrebakeOpts {
    pub images: PathBuf,
    pub backend: BackendChoice,
    pub stop_at: StopSyscall,
    pub marker_signal: i32,
    pub timeout: Duration,
    pub leave_running: bool,
    /// Set SO_REUSEPORT on the sockets bound at the stop point (see
    /// [`crate::sockets`]).
    pub reuseport: bool,
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

/// The TRACE backend's heap trim before the stop (the NOTIFY preload's
/// `malloc_trim(0)`, from the same library in its trim-only mode), where it
/// is safe; else nothing, and the service runs exactly as without it.
fn trace_trim(opts: &PrebakeOpts, spec: &SandboxSpec, state_dir: &Path) -> Vec<(String, String)> {
    let name = opts.stop_at.name();
    let glibc = stop::preload::is_glibc_dynamic(&spec.program);
    let dir = preload_dir(state_dir);
    let installed = stop::preload::install(&dir)
        .map_err(|e| format!("cannot install the library in {}: {e}", dir.display()))
        .and_then(|lib| {
            stop::preload::open_to(&lib, state_dir, spec.uid, spec.gid)
                .map(|()| lib)
                .map_err(|(d, e)| {
                    format!(
                        "uid {} cannot reach the library ({}: {e})",
                        spec.uid,
                        d.display()
                    )
                })
        });
    let lib = match installed {
        Ok(lib) => lib,
        Err(why) => {
            log::info!("TRACE: no heap trim before the stop: {why}");
            return Vec::new();
        }
    };
    match stop::preload::trace_trim_env(&spec.env, &name, glibc, &spec.program, &lib) {
        Ok(env) => {
            log::debug!("TRACE: the preload library in trim-only mode calls malloc_trim(0) in {name}() before the traced syscall");
            env
        }
        Err(why) => {
            log::info!("TRACE: no heap trim before the stop: {why}");
            Vec::new()
        }
    }
}

fn preload_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("lib")
}

/// A stop backend with the child variant (its filter and environment).
struct Candidate {
    backend: Box<dyn StopBackend>,
    variant: VariantId,
}

/// The stop backends a prebake tries, in order, each kept with its filter:
/// the one requested, or for `auto` TRACE and then NOTIFY (ptrace may be
/// forbidden: a seccomp'd container, Yama scope 3). Never empty.
struct Fallback {
    auto: bool,
    first: Candidate,
    then: Option<Candidate>,
}

/// The backend that attached, and why it was the one.
struct Chosen {
    backend: Box<dyn StopBackend>,
    variant: VariantId,
    reason: String,
    /// Why TRACE was passed over, when `auto` fell back.
    why_not_trace: Option<String>,
}

impl Fallback {
    fn new(
        opts: &PrebakeOpts,
        spec: &SandboxSpec,
        state_dir: &Path,
        variants: &mut Variants,
    ) -> Result<Fallback, BootError> {
        let trace = || -> Box<dyn StopBackend> {
            let b = if opts.research.legacy_attached {
                stop::trace::TraceBackend::legacy_attached(opts.stop_at)
            } else {
                stop::trace::TraceBackend::new(opts.stop_at)
            };
            Box::new(
                b.deny_ptrace(opts.research.deny_ptrace)
                    .with_env(trace_trim(opts, spec, state_dir)),
            )
        };
        let notify = || -> Result<Box<dyn StopBackend>, BootError> {
            let mut n = stop::notify::NotifyBackend::new(
                opts.stop_at,
                opts.marker_signal,
                &preload_dir(state_dir),
            )?;
            if opts.research.notify_direct {
                n = n.direct();
            }
            if opts.research.preload_sigstop {
                n = n.sigstop();
            }
            // Our state is private; the service's user must still load it.
            let lib = n.preload_path();
            stop::preload::open_to(lib, state_dir, spec.uid, spec.gid).map_err(
                |(dir, source)| StopError::PreloadUnreachable {
                    lib: lib.to_path_buf(),
                    uid: spec.uid,
                    dir,
                    source,
                },
            )?;
            Ok(Box::new(n))
        };
        let mut candidate = |backend: Box<dyn StopBackend>| -> Result<Candidate, BootError> {
            let variant = variants.add(backend.variant()?)?;
            Ok(Candidate { backend, variant })
        };
        let (first, then) = match opts.backend {
            BackendChoice::Trace => (candidate(trace())?, None),
            BackendChoice::Notify => (candidate(notify()?)?, None),
            BackendChoice::Auto => {
                let first = candidate(trace())?;
                let then = match notify() {
                    Ok(n) => Some(candidate(n)?),
                    // TRACE does not need the library: auto only loses
                    // its fallback (said if TRACE cannot attach).
                    Err(BootError::Stop(e @ StopError::PreloadUnreachable { .. })) => {
                        log::info!("no NOTIFY fallback: {e}");
                        None
                    }
                    Err(e) => return Err(e),
                };
                (first, then)
            }
        };
        Ok(Fallback {
            auto: opts.backend == BackendChoice::Auto,
            first,
            then,
        })
    }

    /// Attaches the first backend that can to the waiting child.
    fn attach(self, pid: Pid, tracer: &Tracer) -> Result<Chosen, BootError> {
        let Fallback { auto, first, then } = self;
        let Candidate {
            mut backend,
            variant,
        } = first;
        let source = match backend.attach(pid, tracer) {
            Ok(()) => {
                let reason = if auto {
                    format!("auto: {}", first_reason(backend.kind()))
                } else {
                    "requested".to_string()
                };
                return Ok(Chosen {
                    backend,
                    variant,
                    reason,
                    why_not_trace: None,
                });
            }
            Err(source) => source,
        };
        let Some(Candidate {
            backend: mut next,
            variant,
        }) = then
        else {
            return Err(BootError::Attach {
                kind: backend.kind(),
                pid,
                source,
            });
        };
        // With its cause: "cannot ptrace-seize task N" alone does not say
        // why ptrace is unavailable, and the reason is recorded.
        let why = crate::error_chain(&source);
        log::warn!("{}: {source}; trying the next backend", backend.kind());
        next.attach(pid, tracer)
            .map_err(|source| BootError::Attach {
                kind: next.kind(),
                pid,
                source,
            })?;
        Ok(Chosen {
            reason: format!(
                "auto: ptrace is unavailable ({why}), fell back to {}",
                next.kind().as_str().to_uppercase()
            ),
            backend: next,
            variant,
            why_not_trace: Some(why),
        })
    }
}

/// Why `auto` kept its first choice.
fn first_reason(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Trace => "the supervisor can ptrace the target",
        BackendKind::Notify | BackendKind::None => "the first backend attached",
    }
}

/// The sandbox child, cloned and waiting, its exit watched by the tracer.
struct Cloned {
    tracer: Tracer,
    spawned: Spawned,
    exit: Receiver<ExitStatus>,
    externals: Vec<ExternalMount>,
}

/// Starts the tracer thread and clones the sandbox child, which waits to
/// be released with one of `variants`.
fn clone_sandbox(
    spec: &SandboxSpec,
    inst: &Instance,
    variants: &Variants,
) -> Result<Cloned, BootError> {
    let tracer = Tracer::start().map_err(BootError::StartTracer)?;
    let externals = sandbox::host_externals()?;
    for v in variants.iter() {
        if let Some(f) = &v.filter {
            explain::say("filter", &format!("seccomp filter the child loads as its last step before exec ({}), as libseccomp renders it:", f.rule));
            explain::block(f.pfc.trim());
            explain::say("filter", "and as the kernel gets it, classic BPF:");
            explain::block(f.bpf_listing().trim_end());
        }
    }
    let spawned = sandbox::spawn(spec, &inst.root(), variants, inst.cgroup.as_ref())?;
    let exit = match tracer.watch(spawned.pid) {
        Ok(exit) => exit,
        Err(source) => {
            let pid = spawned.pid;
            spawned.abort();
            // Not watched: reap it here.
            let _ = crate::sys::waitpid(pid.as_raw(), 0);
            return Err(BootError::Watch { pid, source });
        }
    };
    Ok(Cloned {
        tracer,
        spawned,
        exit,
        externals,
    })
}

/// Lets a child that never ran its command go (it exits 126) and reaps it.
fn give_up(spawned: Spawned, exit: &Receiver<ExitStatus>) {
    spawned.abort();
    let _ = exit.recv_timeout(Duration::from_secs(5));
}

/// Kills a tree that ran and reaps it.
fn kill_tree(running: &Running) {
    let _ = crate::sys::kill(running.root, nix::libc::SIGKILL);
    let _ = running.exit.recv_timeout(Duration::from_secs(10));
}

/// Writes the instance's first record, lets the child exec with `variant`
/// and hands back the supervised tree.
fn release(
    cloned: Cloned,
    spec: &SandboxSpec,
    inst: Instance,
    variant: VariantId,
    variants: &Variants,
    backend: BackendRecord,
) -> Result<(Running, Released), BootError> {
    let Cloned {
        tracer,
        spawned,
        exit,
        externals,
    } = cloned;
    let pid = spawned.pid;
    // Record the environment the service really got (LD_PRELOAD and the
    // marker settings for NOTIFY): a restore needs the preload library back.
    let mut effective = spec.clone();
    for (k, v) in &variants.get(variant).extra_env {
        effective.env.retain(|(ek, _)| ek != k);
        effective.env.push((k.clone(), v.clone()));
    }
    let record = InstanceRecord {
        format_version: instance::RECORD_VERSION,
        id: inst.id.clone(),
        spec: effective,
        externals,
        backend,
        image: None,
        supervisor_pid: nix::unistd::getpid().as_raw(),
        front_pid: None,
        root_pid: pid.as_raw(),
        state: InstanceState::Starting,
        started_unix_ms: crate::sys::time::unix_ms(),
    };
    if let Err(e) = inst.write_record(&record) {
        give_up(spawned, &exit);
        return Err(BootError::Record(e));
    }
    let released = match spawned.release(variant) {
        Ok(r) => r,
        Err(e) => {
            let _ = exit.recv_timeout(Duration::from_secs(5));
            return Err(BootError::Release(e));
        }
    };
    explain::say(
        "exec",
        &format!(
            "the sandbox's PID 1 (host pid {pid}) exec'd {}",
            spec.program.display()
        ),
    );
    let running = Running {
        tracer,
        instance: inst,
        record,
        root: pid,
        exit,
        traced: false,
        held: None,
    };
    Ok((running, released))
}

/// `runmh run`: boots the command in the sandbox, under supervision.
pub fn run_cold(spec: &SandboxSpec, inst: Instance) -> Result<Running, BootError> {
    let dir = inst.clone();
    let run = || {
        let mut variants = Variants::default();
        let plain = variants.add(Variant::plain())?;
        let cloned = clone_sandbox(spec, &inst, &variants)?;
        let backend = BackendRecord {
            kind: BackendKind::None,
            reason: "no stop backend: cold start".into(),
            marker_signal: None,
        };
        let (running, _) = release(cloned, spec, inst, plain, &variants, backend)?;
        Ok(running)
    };
    run().inspect_err(|_| dir.remove())
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

/// `runmh prebake`: boots to the stop point, dumps, publishes. Every step
/// that fails cleans up what the steps before it made: the service is
/// killed and reaped, the staging directory and the instance removed.
pub fn prebake(
    spec: &SandboxSpec,
    state_dir: &Path,
    inst: Instance,
    criu: &Criu,
    opts: &PrebakeOpts,
) -> Result<Prebaked, BootError> {
    let dir = inst.clone();
    let baked = prebake_steps(spec, state_dir, inst, criu, opts);
    match &baked {
        // The instance lives on with the service it left running.
        Ok(Prebaked {
            running: Some(_), ..
        }) => {}
        _ => dir.remove(),
    }
    baked
}

fn prebake_steps(
    spec: &SandboxSpec,
    state_dir: &Path,
    inst: Instance,
    criu: &Criu,
    opts: &PrebakeOpts,
) -> Result<Prebaked, BootError> {
    // 1. Stage the image beside its destination (dropped unpublished, it
    //    removes itself).
    let staged = Staged::new(&opts.images).map_err(BootError::Stage)?;

    // 2. The backends to try, each with its filter, and clone the child.
    let mut variants = Variants::default();
    let fallback = Fallback::new(opts, spec, state_dir, &mut variants)?;
    let cloned = clone_sandbox(spec, &inst, &variants)?;
    let pid = cloned.spawned.pid;

    // 3. Attach the first backend that can.
    let chosen = match fallback.attach(pid, &cloned.tracer) {
        Ok(c) => c,
        Err(e) => {
            // The child's own report, if it failed first, is the real cause.
            let early = cloned.spawned.early_failure();
            give_up(cloned.spawned, &cloned.exit);
            return Err(early.map(BootError::Release).unwrap_or(e));
        }
    };
    let Chosen {
        mut backend,
        variant,
        reason,
        why_not_trace,
    } = chosen;
    explain::say(
        "backend",
        &format!("{} — chosen because: {reason}", backend.describe()),
    );
    let kind = backend.kind();

    // 4. A static program never loads the NOTIFY wrapper: `auto` falling
    //    back to it would only time out.
    if let (BackendKind::Notify, Some(why)) = (kind, &why_not_trace) {
        if is_static_elf(&spec.program) {
            give_up(cloned.spawned, &cloned.exit);
            return Err(BootError::Unstoppable {
                program: spec.program.clone(),
                why: why.clone(),
            });
        }
    }

    // 5. Record the instance and let the child exec under its filter.
    let record = BackendRecord {
        kind,
        reason,
        marker_signal: (kind == BackendKind::Notify).then_some(opts.marker_signal),
    };
    let t0 = cloned.spawned.started;
    let (mut running, mut released) = release(cloned, spec, inst, variant, &variants, record)?;

    // 6. Arm the backend: the stop arrives on its channel.
    let arrival = match backend.arm(&mut released, &running.tracer) {
        Ok(a) => a,
        Err(source) => {
            kill_tree(&running);
            return Err(BootError::Arm { kind, source });
        }
    };

    // 7. Wait for the stop point.
    let hit = match wait_for_stop(&running, &arrival, kind, spec, opts) {
        Ok(hit) => hit,
        // Reaped already: its pid may be another process's by now.
        Err(e @ BootError::TargetExited { .. }) => return Err(e),
        Err(e) => {
            kill_tree(&running);
            return Err(e);
        }
    };
    let stop_name = opts.stop_at.name();
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
    // The tree is held: its bound sockets are what an on-demand daemon
    // will listen on while the service is at zero.
    let mut tree: Vec<i32> = vec![running.root.as_raw(), hit.tgid];
    tree.extend(&hit.frozen);
    tree.sort();
    tree.dedup();
    let bound = match crate::sockets::scan_bound(&tree, opts.reuseport) {
        Ok(b) => b,
        Err(e) => {
            kill_tree(&running);
            return Err(e.into());
        }
    };
    for b in &bound {
        explain::say(
            "socket",
            &format!(
                "pid {} fd {} is bound to {}{}{}",
                b.pid,
                b.fd,
                b.addr,
                if b.listening { " (listening)" } else { "" },
                if b.reuseport {
                    ", SO_REUSEPORT set"
                } else {
                    ""
                }
            ),
        );
    }
    running.record.state = InstanceState::HeldAtStop;
    let _ = running.instance.write_record(&running.record);

    // 8. Dump.
    let dump = dump::criu_dump(
        criu,
        running.root.as_raw(),
        &staged,
        &running.record.externals,
        opts.leave_running,
        Some(&running.tracer),
        &[running.record.spec.log_dir.as_path()],
    );
    let mut run = match dump {
        Ok(r) => r,
        Err(e) => {
            kill_tree(&running);
            return Err(BootError::Criu(e));
        }
    };
    run.host.cpuinfo = dump::record_cpuinfo(criu, &staged, Some(&running.tracer));

    // 9. Publish.
    let facts = DumpFacts {
        criu,
        spec: &running.record.spec,
        externals: &running.record.externals,
        backend: running.record.backend.clone(),
        stop: Some(StopRecord {
            syscall: stop_name.clone(),
            since_start_ms: crate::sys::time::millis(since_start),
            hit: hit.clone(),
            bound,
        }),
        pid: running.root.as_raw(),
        dump_time: run.took,
        leave_running: opts.leave_running,
        host: Some(run.host),
    };
    let dumped = match dump::publish(staged, facts) {
        Ok(d) => d,
        Err(e) => {
            kill_tree(&running);
            return Err(BootError::Publish(e));
        }
    };
    explain::say(
        "publish",
        &format!(
            "image published atomically (rename) at {}",
            dumped.image.display()
        ),
    );

    // 10. Let the service go on past its stop point, or reap what CRIU
    //     killed.
    if opts.leave_running {
        if let Err(source) = backend.resume_after_dump(running.root, &running.tracer) {
            kill_tree(&running);
            return Err(BootError::Resume {
                pid: running.root,
                source,
            });
        }
        running.traced = kind == BackendKind::Trace;
        return Ok(Prebaked {
            dumped,
            hit,
            time_to_stop: since_start,
            running: Some(running),
        });
    }
    let _ = running.exit.recv_timeout(Duration::from_secs(10));
    drop(backend);
    Ok(Prebaked {
        dumped,
        hit,
        time_to_stop: since_start,
        running: None,
    })
}

/// Waits until the armed backend reports the stop, the target ends, a
/// signal interrupts, or the timeout passes.
fn wait_for_stop(
    running: &Running,
    arrival: &Receiver<Arrival>,
    kind: BackendKind,
    spec: &SandboxSpec,
    opts: &PrebakeOpts,
) -> Result<StopHit, BootError> {
    let stop_name = opts.stop_at.name();
    let exited = |status| BootError::TargetExited {
        status,
        stop_at: stop_name.clone(),
        log_dir: spec.log_dir.clone(),
    };
    let signals = crate::supervisor::signals();
    select! {
        recv(arrival) -> a => match a {
            Ok(Arrival::Stopped(hit)) => Ok(hit),
            Ok(Arrival::Failed(e)) => {
                // A NOTIFY listener fails as soon as the last task holding
                // its filter exits, often before the tracer has reaped the
                // target: the exit status is then the real story.
                match running.exit.recv_timeout(Duration::from_secs(1)) {
                    Ok(status) => Err(exited(status)),
                    Err(_) => Err(BootError::StopFailed { kind, source: e }),
                }
            }
            Err(_) => Err(BootError::StopChannelClosed { kind }),
        },
        recv(running.exit) -> st => match st {
            Ok(status) => Err(exited(status)),
            Err(_) => Err(BootError::LostTarget { pid: running.root }),
        },
        recv(signals) -> sig => match sig {
            Ok(sig) => Err(BootError::Interrupted(crate::sys::signal::signal_name(sig))),
            Err(_) => Err(BootError::LostSignals),
        },
        default(opts.timeout) => Err(BootError::Timeout {
            stop_at: stop_name.clone(),
            secs: opts.timeout.as_secs(),
            hint: timeout_hint(Some(kind), &spec.program, &stop_name),
        }),
    }
}

//! Dumping a sandboxed tree with CRIU into a staged image, and `runmh dump`
//! of a service that some supervisor (this or another runmh) is running.

use crate::control::{self, Request};
use crate::criu::{watchdog, Criu, CriuError, DumpArgs};
use crate::explain;
use crate::images::compat::{self, HostRecord};
use crate::images::{self, BackendRecord, Metadata, Staged, StopRecord, StoreError};
use crate::instance::{Instance, InstanceError};
use crate::migrate::DumpExtra;
use crate::sandbox::ExternalMount;
use crate::spec::SandboxSpec;
use crate::stop::tracer::Tracer;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("the supervisor of pid {pid} could not prepare the dump")]
    Control {
        pid: i32,
        #[source]
        source: control::ControlError,
    },
}

/// What a finished dump produced.
#[derive(Debug, Clone)]
pub struct Dumped {
    pub image: PathBuf,
    pub metadata: Metadata,
}

/// What one `criu dump` run gave besides the images.
#[derive(Debug, Clone)]
pub struct DumpRun {
    pub took: Duration,
    /// The host and the files the tree used, for the compatibility check.
    pub host: HostRecord,
}

/// Runs `criu dump` of the tree rooted at `pid` into `staged`. CRIU is reaped by `tracer` when this
/// process has one (it owns every wait). The files the stopped tree maps
/// or holds open (outside `skip`, its log directory) are recorded first:
/// a dump that does not leave it running kills it.
pub fn criu_dump(
    criu: &Criu,
    pid: i32,
    staged: &Staged,
    externals: &[ExternalMount],
    leave_running: bool,
    tracer: Option<&Tracer>,
    skip: &[&Path],
) -> Result<DumpRun, CriuError> {
    criu_dump_with(
        criu,
        pid,
        staged,
        externals,
        leave_running,
        tracer,
        skip,
        &DumpExtra::default(),
    )
}

/// [`criu_dump`] with a migration's options (page server, leave stopped).
#[allow(clippy::too_many_arguments)]
pub fn criu_dump_with(
    criu: &Criu,
    pid: i32,
    staged: &Staged,
    externals: &[ExternalMount],
    leave_running: bool,
    tracer: Option<&Tracer>,
    skip: &[&Path],
    extra: &DumpExtra,
) -> Result<DumpRun, CriuError> {
    let host = compat::record(pid, skip);
    let args = DumpArgs {
        pid,
        images_dir: staged.dir.clone(),
        work_dir: staged.dir.clone(),
        log_name: "dump.log".into(),
        externals: externals.to_vec(),
        leave_running,
    };
    let mut argv = args.argv();
    argv.extend(extra.argv());
    explain::say("criu", "the dump command line; CRIU seizes every task with PTRACE_SEIZE + PTRACE_INTERRUPT, so no other tracer may hold them:");
    explain::block(&crate::criu::argv::shell_words(&criu.path, &argv));
    let mut cmd = criu.command();
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let limits = watchdog::Limits::from_env().map_err(CriuError::Limits)?;
    let t0 = Instant::now();
    let spawn_err = |source| CriuError::Spawn {
        path: criu.path.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid_criu = crate::sys::child_pid(&child);
    let dog = watchdog::watch(pid_criu, &staged.dir.join("dump.log"), limits);
    let ok = match tracer {
        // The tracer thread owns every wait of this process.
        Some(t) => t
            .watch(pid_criu)
            .map_err(std::io::Error::other)
            .and_then(|r| {
                r.recv()
                    .map_err(|_| std::io::Error::other("tracer thread gone"))
            })
            .map(|st| st.code() == 0),
        None => child.wait().map(|st| st.success()),
    };
    if let Some(ending) = dog.finish() {
        return Err(CriuError::Ended {
            action: "dump",
            ending,
        });
    }
    let ok = ok.map_err(spawn_err)?;
    let took = t0.elapsed();
    if ok {
        explain::say("criu", &format!("dump finished in {} ms", took.as_millis()));
        return Ok(DumpRun { took, host });
    }
    // Keep CRIU's log where the user can read it: the staging directory
    // is about to be removed.
    let log = staged.dir.join("dump.log");
    let kept = PathBuf::from(format!("{}.dump-failed.log", staged.dest().display()));
    let line = crate::criu::log::decisive_line_of(&log);
    let log = if std::fs::rename(&log, &kept).is_ok() {
        kept
    } else {
        log
    };
    Err(CriuError::DumpFailed { pid, line, log })
}

/// Runs `criu cpuinfo dump` into the staged image: the CPU's features, for
/// `criu cpuinfo check` before a restore on another host (a CPU without
/// them would end the restored tree in SIGILL). It costs one CRIU start
/// (100-200 ms here, most of it CRIU probing the kernel), so callers run it
/// outside a serving tree's freeze (`runmh dump` before it; a prebake while
/// the tree still waits at its stop point). Whether `cpuinfo.img` is there.
pub fn record_cpuinfo(criu: &Criu, staged: &Staged, tracer: Option<&Tracer>) -> bool {
    let mut c = compat::cpuinfo_dump_command(criu, &staged.dir);
    let ran = match tracer {
        Some(t) => t.run(&mut c).map(|st| st.code() == 0),
        None => c.status().map(|st| st.success()),
    };
    let ok = matches!(ran, Ok(true)) && staged.dir.join(compat::CPUINFO_IMG).is_file();
    if !ok {
        log::warn!("`criu cpuinfo dump` failed ({ran:?}); the image's CPU features cannot be checked before a restore elsewhere");
    }
    ok
}

/// Everything the metadata records about a dump.
pub struct DumpFacts<'a> {
    pub criu: &'a Criu,
    pub spec: &'a SandboxSpec,
    pub externals: &'a [ExternalMount],
    pub backend: BackendRecord,
    pub stop: Option<StopRecord>,
    pub pid: i32,
    pub dump_time: Duration,
    pub leave_running: bool,
    pub host: Option<HostRecord>,
}

/// Writes the metadata and publishes the staged image.
pub fn publish(staged: Staged, facts: DumpFacts<'_>) -> Result<Dumped, StoreError> {
    let (bytes, files) = images::dir_usage(&staged.dir);
    let metadata = Metadata {
        format_version: images::metadata::FORMAT_VERSION,
        miehisto_version: env!("CARGO_PKG_VERSION").to_string(),
        criu_version: facts.criu.version.to_string(),
        kernel: images::metadata::kernel_release(),
        created_unix_ms: crate::sys::time::unix_ms(),
        spec: facts.spec.clone(),
        externals: facts.externals.to_vec(),
        backend: facts.backend,
        stop: facts.stop,
        dumped_pid: facts.pid,
        dump_ms: crate::sys::time::millis(facts.dump_time),
        image_bytes: bytes,
        image_files: files + 1,
        leave_running: facts.leave_running,
        host: facts.host,
        // Filled in by the publish, over the files as they are then.
        files: Vec::new(),
    };
    let image = staged.publish(&metadata)?;
    Ok(Dumped { image, metadata })
}

/// `runmh dump`: dumps the service of a runmh instance at any moment.
/// `pid` is the service's host pid or its supervisor's.
pub fn dump_instance(
    criu: &Criu,
    state_dir: &Path,
    pid: i32,
    images: &Path,
    leave_running: bool,
) -> Result<Dumped, DumpError> {
    dump_instance_with(
        criu,
        state_dir,
        pid,
        images,
        leave_running,
        &DumpExtra::default(),
    )
}

/// [`dump_instance`] for a migration. With `extra.leave_stopped` the tree
/// stays stopped and let go by its supervisor after a successful dump;
/// whoever migrates it then sends the supervisor `Thaw` (alive to resume
/// it, not alive before killing it).
pub fn dump_instance_with(
    criu: &Criu,
    state_dir: &Path,
    pid: i32,
    images: &Path,
    leave_running: bool,
    extra: &DumpExtra,
) -> Result<Dumped, DumpError> {
    let (inst, rec) = Instance::find_by_pid(state_dir, pid)?;
    let staged = Staged::new(images)?;
    let sock = inst.control_socket();
    let timeout = Duration::from_secs(30);
    // Before the freeze: it does not touch the tree, and costs a CRIU start.
    let cpuinfo = record_cpuinfo(criu, &staged, None);
    control::call(&sock, &Request::Freeze, timeout)
        .map_err(|source| DumpError::Control { pid, source })?;
    let result = criu_dump_with(
        criu,
        rec.root_pid,
        &staged,
        &rec.externals,
        leave_running,
        None,
        &[rec.spec.log_dir.as_path()],
        extra,
    );
    // CRIU leaves the tree running when a dump fails.
    let alive = leave_running || result.is_err();
    if result.is_err() || !extra.leave_stopped {
        let thaw = control::call(&sock, &Request::Thaw { alive }, timeout);
        match thaw {
            Err(e) if alive => {
                log::warn!("the supervisor did not take the tree back after the dump: {e}")
            }
            // After a killing dump the supervisor may already be gone.
            _ => {}
        }
    }
    if result.is_ok() && extra.leave_stopped {
        // Or the supervisor, seeing us end without a thaw, kills the tree.
        control::call(&sock, &Request::KeepFrozen, timeout)
            .map_err(|source| DumpError::Control { pid, source })?;
    }
    let mut run = result?;
    run.host.cpuinfo = cpuinfo;
    Ok(publish(
        staged,
        DumpFacts {
            criu,
            spec: &rec.spec,
            externals: &rec.externals,
            backend: rec.backend.clone(),
            stop: None,
            pid: rec.root_pid,
            dump_time: run.took,
            leave_running,
            host: Some(run.host),
        },
    )?)
}

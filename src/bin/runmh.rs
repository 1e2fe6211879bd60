//! runmh — the sandbox runtime and supervisor.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use miehisto::channel::{HostPid, StepReport};
use miehisto::criu::Criu;
use miehisto::filter::StopSyscall;
use miehisto::instance::{self, Instance};
use miehisto::prebake::{self, PrebakeOpts, Research};
use miehisto::restore::{self, RestoreOpts, Supervision};
use miehisto::spec::{SandboxSpec, SpecInput};
use miehisto::stop::BackendChoice;
use miehisto::{doctor, dump, explain};
use nix::unistd::{getpid, Pid};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "runmh",
    version,
    about = "Run a process CRIU-ready, stop it before a chosen syscall, dump and restore it"
)]
struct Cli {
    /// State directory (instances, logs, the preload library).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// CRIU binary (default: $MIEHISTO_CRIU, the setup step's, then PATH).
    #[arg(long, global = true)]
    criu: Option<PathBuf>,
    /// Narrate each step for an audience.
    #[arg(long, global = true)]
    explain: bool,
    /// With --explain: do not pause between steps.
    #[arg(long, global = true)]
    no_pause: bool,
    /// Write the step's outcome to FILE as one JSON line (for miehistod):
    /// the service running, an image published, or the error.
    #[arg(long, global = true, value_name = "FILE")]
    report_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct SandboxArgs {
    /// Environment variable for the service (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Working directory of the service.
    #[arg(short = 'C', long = "cwd", value_name = "DIR")]
    cwd: Option<PathBuf>,
    /// Run the service as this user.
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Where stdout.log and stderr.log go (default: STATE/logs/<instance>).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Seconds between forwarding SIGTERM and sending SIGKILL.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    stop_timeout: u64,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Subcommand)]
// Built only for the subcommand given: the whole tree cost ~0.3 ms of every
// start (`runmh restore` is on a restore's critical path).
#[command(defer = true)]
enum Cmd {
    /// Check that this machine can run miehisto.
    Doctor,
    /// The whole story for an audience: cold boot, prebake, restore, the ENOSYS and its fix.
    Demo(miehisto::demo::DemoArgs),
    /// Start a command in the CRIU-ready sandbox and supervise it.
    Run(SandboxArgs),
    /// Boot a command to just before its first stop syscall, dump it, publish the image.
    Prebake {
        /// Directory to publish the image at (must not hold one).
        #[arg(long, value_name = "DIR")]
        images: PathBuf,
        #[arg(long, default_value = "auto", value_name = "trace|notify|auto")]
        backend: BackendChoice,
        /// The syscall to stop before.
        #[arg(long, default_value = "listen", value_name = "SYSCALL")]
        stop_at: String,
        /// NOTIFY marker signal: a number, SIGRTMAX or SIGRTMAX-N.
        #[arg(long, value_name = "N")]
        marker_signal: Option<String>,
        /// Give up when the stop point is not reached in time.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
        /// Keep the service running after the dump.
        #[arg(long)]
        leave_running: bool,
        /// Research and tests only: make TRACE fail to attach as if ptrace
        /// were forbidden, so `auto` falls back to NOTIFY.
        #[arg(long, hide = true)]
        research_deny_ptrace: bool,
        /// Set SO_REUSEPORT on the TCP sockets the service holds bound at
        /// the stop point, so a daemon can listen beside the restored
        /// service and hand it its waiting clients (on-demand start).
        #[arg(long)]
        reuseport: bool,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Dump a running sandboxed service.
    Dump {
        /// Host pid of the service or of its runmh.
        #[arg(long)]
        pid: i32,
        /// Directory to publish the image at (must not hold one).
        #[arg(long, value_name = "DIR")]
        images: PathBuf,
        /// Keep the service running after the dump (CRIU ends it otherwise).
        #[arg(long)]
        leave_running: bool,
        /// Send the pages to `criu page-server` at ADDR:PORT (live migration).
        #[arg(long, value_name = "ADDR:PORT")]
        page_server: Option<String>,
        /// Leave the tree stopped (and let go) after the dump, for whoever
        /// migrates it to kill or resume through its supervisor.
        #[arg(long, conflicts_with = "leave_running")]
        leave_stopped: bool,
        /// With --page-server: CRIU's TLS files (ca.pem, cert.pem, key.pem)
        /// in DIR, as the destination made them for this migration.
        #[arg(long, value_name = "DIR", requires = "page_server")]
        page_server_tls: Option<PathBuf>,
    },
    /// Restore an image; runmh becomes the restored tree's parent.
    Restore {
        /// The image to restore: a directory `runmh prebake` or `runmh dump` published.
        #[arg(long, value_name = "DIR")]
        images: PathBuf,
        /// Return once the service runs (its supervisor carries on).
        #[arg(long)]
        detach: bool,
        /// Research only: do not re-seize a TRACE image (reproduces ENOSYS).
        #[arg(long, hide = true)]
        no_reseize: bool,
        /// Hold the restored tree at its stop point (instance state
        /// `standby`) until a resume request on its control socket (the
        /// daemon's on-demand `--standby`).
        #[arg(long)]
        hold: bool,
        #[arg(long, default_value_t = 5, value_name = "SECS")]
        stop_timeout: u64,
        /// Benchmarks: append phase stamps (CLOCK_MONOTONIC ns) to FILE.
        #[arg(long, hide = true, value_name = "FILE")]
        timings: Option<PathBuf>,
        /// Where the service's stdout.log and stderr.log go (default: where
        /// the image had them; an image from another host had that host's).
        #[arg(long, value_name = "DIR")]
        log_dir: Option<PathBuf>,
    },
}

fn parse_marker(s: Option<&str>) -> Result<i32> {
    let max = miehisto::sys::sigrtmax();
    let Some(s) = s else { return Ok(max) };
    let t = s.trim().trim_start_matches("SIG");
    if let Some(rest) = t.strip_prefix("RTMAX") {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.trim_start_matches('-').parse().context("bad offset")?
        };
        return Ok(max - off);
    }
    if let Some(rest) = t.strip_prefix("RTMIN") {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.trim_start_matches('+').parse().context("bad offset")?
        };
        return Ok(miehisto::sys::sigrtmin() + off);
    }
    t.parse()
        .with_context(|| format!("--marker-signal {s:?} is not a number, SIGRTMAX or SIGRTMAX-N"))
}

fn build_spec(
    a: &SandboxArgs,
    state_dir: &std::path::Path,
    inst: &Instance,
) -> Result<SandboxSpec> {
    let log_dir = match &a.log_dir {
        Some(d) => std::path::absolute(d)?,
        None => Instance::default_log_dir(state_dir, &inst.id),
    };
    Ok(SandboxSpec::build(SpecInput {
        argv: a.command.clone(),
        env: a.env.clone(),
        cwd: a.cwd.clone(),
        user: a.user.clone(),
        log_dir,
        inherit_basic_env: true,
    })?)
}

fn require_root() -> Result<()> {
    if !miehisto::sys::is_root() {
        bail!("runmh must run as root (namespaces, ptrace and CRIU need it); try sudo");
    }
    Ok(())
}

/// `--report-file`, until the step's one report is written.
static REPORT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Reports the step's outcome, once: a `run` that reported its service
/// running says nothing more when the service later fails.
fn report(r: StepReport) {
    let Some(path) = REPORT.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    if let Err(e) = r.write(&path) {
        eprintln!(
            "runmh: warning: cannot write the report {}: {e}",
            path.display()
        );
    }
}

fn report_running(instance: &str, supervisor: Pid, root: Pid) {
    match (
        HostPid::new(supervisor.as_raw()),
        HostPid::new(root.as_raw()),
    ) {
        (Ok(supervisor_pid), Ok(root_pid)) => report(StepReport::Running {
            instance: instance.to_string(),
            supervisor_pid,
            root_pid,
        }),
        (Err(e), _) | (_, Err(e)) => report(StepReport::Failed {
            reason: format!("the service started, but its pids are unusable: {e}"),
        }),
    }
}

fn main() {
    // Images hold the service's memory, records its environment: whatever
    // this process and CRIU create is private (the service gets the
    // caller's umask back).
    miehisto::files::private_umask();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    if cli.explain {
        explain::enable(!cli.no_pause);
    }
    *REPORT.lock().unwrap_or_else(|p| p.into_inner()) = cli.report_file.clone();
    finish(real_main(cli))
}

fn finish(r: Result<i32>) -> ! {
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            report(StepReport::Failed {
                reason: format!("{e:#}"),
            });
            eprintln!("runmh: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `restore --detach`: the caller gets its answer once the service runs,
/// while runmh goes on supervising it. The supervisor must be the process
/// that starts CRIU (the restored root is its child: `--restore-sibling`),
/// so runmh forks first; the parent only waits for the child's word.
struct Detached {
    done: std::os::fd::OwnedFd,
}

impl Detached {
    /// In the parent, never returns: exits 0 once the child says the
    /// service runs, else with the child's own exit status (the child has
    /// printed its error on the stderr they share).
    fn fork() -> Result<Detached> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("cannot create the pipe to detach the supervisor")?;
        let parent = getpid().as_raw();
        // SAFETY: called first thing in real_main, when runmh has started
        // no thread (nothing before it spawns one), so the child is a
        // whole copy of a single-threaded process and may run any code.
        let pid =
            unsafe { miehisto::sys::fork_raw() }.context("cannot fork the detached supervisor")?;
        if pid == 0 {
            drop(r);
            // Until it detaches, a caller that ends (a daemon's timeout
            // kills its runmh) ends the restore: SIGTERM is routed to the
            // CRIU watchdog, which stops CRIU, and the instance goes.
            miehisto::sys::set_parent_death_signal(nix::libc::SIGTERM)
                .context("cannot set the detached supervisor's parent-death signal")?;
            if miehisto::sys::getppid() != parent {
                bail!("the restore's caller ended before it started");
            }
            return Ok(Detached { done: w });
        }
        drop(w);
        let mut word = [0u8; 1];
        let said = loop {
            match nix::unistd::read(&r, &mut word) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break matches!(r, Ok(1)),
            }
        };
        if said {
            std::process::exit(0);
        }
        let code = match miehisto::sys::waitpid(pid, 0) {
            Ok(Some(miehisto::sys::Wait::Exited(_, c))) => c,
            Ok(Some(miehisto::sys::Wait::Signaled(_, s))) => 128 + s,
            other => {
                eprintln!("runmh: error: the detached supervisor (pid {pid}) vanished: {other:?}");
                1
            }
        };
        std::process::exit(code)
    }

    /// In the child: stdio to /dev/null and `log` (stderr), then word to
    /// the parent, whose caller reads its output to the end.
    fn done(self, log: Option<&std::path::Path>) -> Result<()> {
        let null = miehisto::files::dev_null().context("cannot open /dev/null")?;
        let err = match log {
            Some(p) => miehisto::files::append_private(p)
                .with_context(|| format!("cannot open the supervisor's log {}", p.display()))?,
            None => null.try_clone().context("cannot duplicate /dev/null")?,
        };
        use std::os::fd::AsRawFd;
        for (from, to) in [
            (null.as_raw_fd(), 0),
            (null.as_raw_fd(), 1),
            (err.as_raw_fd(), 2),
        ] {
            miehisto::sys::dup2(from, to).context("cannot redirect the supervisor's stdio")?;
        }
        // The caller is done with us: its end must not end the service.
        miehisto::sys::set_parent_death_signal(0)
            .context("cannot clear the supervisor's parent-death signal")?;
        nix::unistd::write(&self.done, b"1").context("cannot tell the caller the service runs")?;
        Ok(())
    }
}

fn real_main(cli: Cli) -> Result<i32> {
    let state_dir = instance::state_dir(cli.state_dir.as_deref());
    let mut detached = match &cli.cmd {
        Cmd::Restore { detach: true, .. } => Some(Detached::fork()?),
        _ => None,
    };
    if !matches!(cli.cmd, Cmd::Doctor) && miehisto::sys::is_root() {
        miehisto::files::tighten_state(&state_dir).with_context(|| {
            format!("cannot prepare the state directory {}", state_dir.display())
        })?;
        // What runmh processes killed before us left (each is logged).
        instance::clean_dead(&state_dir);
    }
    match cli.cmd {
        Cmd::Doctor => {
            let checks = doctor::run(cli.criu.as_deref());
            let mut failed = false;
            for c in &checks {
                let tag = match c.level {
                    doctor::Level::Ok => "ok  ",
                    doctor::Level::Warn => "warn",
                    doctor::Level::Fail => {
                        failed = true;
                        "FAIL"
                    }
                };
                match &c.hint {
                    Some(h) => println!("{tag} {:<15} {} — {}", c.name, c.detail, h),
                    None => println!("{tag} {:<15} {}", c.name, c.detail),
                }
            }
            Ok(if failed { 1 } else { 0 })
        }
        Cmd::Demo(a) => {
            require_root()?;
            miehisto::stop::tracer::block_supervisor_signals().context("cannot block signals")?;
            // The demo narrates whether or not --explain was given.
            explain::enable(!cli.no_pause);
            Ok(miehisto::demo::run(
                &a,
                cli.criu.as_deref(),
                &state_dir,
                !cli.no_pause,
            )?)
        }
        Cmd::Run(a) => {
            require_root()?;
            miehisto::stop::tracer::block_supervisor_signals().context("cannot block signals")?;
            let inst = Instance::create(&state_dir)?;
            let spec = match build_spec(&a, &state_dir, &inst) {
                Ok(s) => s,
                Err(e) => {
                    inst.remove();
                    return Err(e);
                }
            };
            let running = prebake::run_cold(&spec, inst)?;
            eprintln!(
                "runmh: started {} as pid {} (logs in {})",
                miehisto::printable(&spec.argv.join(" ")),
                running.root,
                spec.log_dir.display()
            );
            let (outcome, inst) = running
                .supervise_then(Duration::from_secs(a.stop_timeout), |rec| {
                    report_running(&rec.id, getpid(), Pid::from_raw(rec.root_pid))
                })?;
            inst.remove();
            Ok(outcome.exit_code())
        }
        Cmd::Prebake {
            images,
            backend,
            stop_at,
            marker_signal,
            timeout,
            leave_running,
            research_deny_ptrace,
            reuseport,
            sandbox,
        } => {
            require_root()?;
            let stop_at = StopSyscall::parse(&stop_at)?;
            let marker_signal = parse_marker(marker_signal.as_deref())?;
            let criu = Criu::discover(cli.criu.as_deref())?;
            miehisto::stop::tracer::block_supervisor_signals().context("cannot block signals")?;
            let inst = Instance::create(&state_dir)?;
            let spec = match build_spec(&sandbox, &state_dir, &inst) {
                Ok(s) => s,
                Err(e) => {
                    inst.remove();
                    return Err(e);
                }
            };
            let opts = PrebakeOpts {
                images,
                backend,
                stop_at,
                marker_signal,
                timeout: Duration::from_secs(timeout),
                leave_running,
                reuseport,
                research: Research {
                    deny_ptrace: research_deny_ptrace,
                    ..Research::default()
                },
            };
            let p = prebake::prebake(&spec, &state_dir, inst, &criu, &opts)?;
            let md = &p.dumped.metadata;
            eprintln!(
                "runmh: image published at {} (backend {}: {}; stopped before {} after {} ms; dump {} ms; {:.1} MB)",
                p.dumped.image.display(),
                md.backend.kind,
                md.backend.reason,
                opts.stop_at.name(),
                p.time_to_stop.as_millis(),
                md.dump_ms,
                md.image_bytes as f64 / 1e6
            );
            report(StepReport::Published {
                image: p.dumped.image.clone(),
            });
            match p.running {
                Some(r) => {
                    let (outcome, inst) = r.supervise(Duration::from_secs(sandbox.stop_timeout))?;
                    inst.remove();
                    Ok(outcome.exit_code())
                }
                None => Ok(0),
            }
        }
        Cmd::Dump {
            pid,
            images,
            leave_running,
            page_server,
            leave_stopped,
            page_server_tls,
        } => {
            require_root()?;
            let criu = Criu::discover(cli.criu.as_deref())?;
            let page_server = match page_server {
                None => None,
                Some(s) => {
                    let (address, port) = s
                        .rsplit_once(':')
                        .and_then(|(a, p)| Some((a.to_string(), p.parse::<u16>().ok()?)))
                        .filter(|(a, p)| !a.is_empty() && *p > 0)
                        .with_context(|| {
                            format!("--page-server {s:?}: write ADDR:PORT, e.g. 192.0.2.2:4000")
                        })?;
                    Some(miehisto::migrate::PageServerTarget {
                        address,
                        port,
                        tls: page_server_tls
                            .as_deref()
                            .map(miehisto::migrate::TlsFiles::in_dir),
                    })
                }
            };
            let extra = miehisto::migrate::DumpExtra {
                page_server,
                leave_stopped,
            };
            let d =
                dump::dump_instance_with(&criu, &state_dir, pid, &images, leave_running, &extra)?;
            report(StepReport::Published {
                image: d.image.clone(),
            });
            eprintln!(
                "runmh: image published at {} ({} ms, {:.1} MB{})",
                d.image.display(),
                d.metadata.dump_ms,
                d.metadata.image_bytes as f64 / 1e6,
                if leave_running {
                    ", service left running"
                } else {
                    ""
                }
            );
            Ok(0)
        }
        Cmd::Restore {
            images,
            detach,
            no_reseize,
            hold,
            stop_timeout,
            timings,
            log_dir,
        } => {
            require_root()?;
            // Cached version: `criu --version` would delay every restore by ~10 ms.
            let criu = Criu::discover_cached(cli.criu.as_deref(), &state_dir)?;
            miehisto::stop::tracer::block_supervisor_signals().context("cannot block signals")?;
            let opts = RestoreOpts {
                images,
                state_dir,
                reseize: !no_reseize,
                stop_timeout: Duration::from_secs(stop_timeout),
                timings,
                limits: miehisto::criu::watchdog::Limits::from_env().map_err(anyhow::Error::msg)?,
                detach,
                log_dir,
                hold,
            };
            let r = restore::restore(&criu, &opts)?;
            report_running(&r.id, getpid(), r.root);
            eprintln!(
                "runmh: restored {} as pid {} under runmh pid {} in {} ms",
                miehisto::printable(&r.metadata.spec.argv.join(" ")),
                r.root,
                getpid(),
                r.took.as_millis()
            );
            match r.supervision {
                Supervision::Ended(status) => {
                    if let Some(d) = detached.take() {
                        d.done(None)?;
                    }
                    Ok(status.code())
                }
                Supervision::Running(running) => {
                    if let Some(d) = detached.take() {
                        d.done(Some(&running.instance.dir.join("supervisor.log")))?;
                    }
                    let (outcome, inst) = running.supervise(Duration::from_secs(stop_timeout))?;
                    inst.remove();
                    Ok(outcome.exit_code())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    // The subcommands are deferred (built when given): clap's own checks
    // of the whole tree run here, and the tree still parses.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
        for sub in ["doctor", "demo", "run", "prebake", "dump", "restore"] {
            let mut cmd = Cli::command();
            let help = cmd
                .try_get_matches_from_mut(["runmh", sub, "--help"])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(help.contains("Usage: runmh"), "{sub}: {help}");
        }
        assert!(Cli::try_parse_from(["runmh", "restore", "--images", "/x"]).is_ok());
        assert!(Cli::try_parse_from(["runmh", "restore", "--imges", "/x"]).is_err());
    }
}

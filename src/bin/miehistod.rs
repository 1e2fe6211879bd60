//! miehistod — the daemon that manages services and their images.

use anyhow::{bail, Context, Result};
use clap::Parser;
use miehisto::daemon::api::DEFAULT_STATE_DIR;
use miehisto::daemon::children::Children;
use miehisto::daemon::server::{self, Access, Limits, Server};
use miehisto::daemon::service::{Services, ServicesConfig};
use nix::fcntl::{Flock, FlockArg};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "miehistod",
    version,
    about = "Manage CRIU-ready services and their images (the mhctl daemon)"
)]
struct Cli {
    /// The API socket.
    #[arg(long, value_name = "PATH", default_value_os_t = server::default_socket())]
    socket: PathBuf,
    /// File mode of the socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Let this uid use the daemon besides root (repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Let this group use the daemon (repeatable; supplementary groups count).
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gid: Vec<u32>,
    /// Registry, images, logs and runmh state.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The runmh binary (default: the one beside miehistod).
    #[arg(long, value_name = "PATH")]
    runmh: Option<PathBuf>,
    /// CRIU binary, passed to runmh.
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when a service is stopped.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    stop_timeout: u64,
    /// Serve Prometheus metrics (on-demand activations, latency, failures,
    /// restores per service) on GET http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Close a client connection that sends no request for this long.
    #[arg(long, default_value_t = 300, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    client_idle_timeout: u64,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal file mode such as 0600"))?;
    if m > 0o777 {
        return Err(format!("{s:?} is not a file mode (at most 0777)"));
    }
    Ok(m)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("miehistod: error: {e:#}");
        std::process::exit(1);
    }
}

fn find_runmh(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let p = match explicit {
        Some(p) => {
            std::path::absolute(&p).with_context(|| format!("bad --runmh {}", p.display()))?
        }
        None => {
            let exe = std::env::current_exe().context("cannot find miehistod's own path")?;
            exe.with_file_name("runmh")
        }
    };
    let ok = std::fs::metadata(&p)
        .map(|m| {
            m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
        })
        .unwrap_or(false);
    if !ok {
        bail!(
            "{} is not an executable runmh; install runmh beside miehistod or pass --runmh PATH",
            p.display()
        );
    }
    Ok(p)
}

fn real_main(cli: Cli) -> Result<()> {
    if !miehisto::sys::is_root() {
        bail!("miehistod must run as root (runmh needs namespaces, ptrace and CRIU); try sudo");
    }
    // Before any thread exists, so that every thread inherits the mask and
    // the signals arrive only through the supervisor's signal channel.
    miehisto::stop::tracer::block_supervisor_signals().context("cannot block signals")?;
    let runmh = find_runmh(cli.runmh)?;
    let state_dir = std::path::absolute(&cli.state_dir)
        .with_context(|| format!("bad --state-dir {}", cli.state_dir.display()))?;
    miehisto::files::private_umask();
    miehisto::files::private_dir(&state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    // Older versions left images, records and logs readable by everyone.
    // The NOTIFY preload library is no secret and must stay loadable by a
    // service run as another user (-u).
    let preload_dir = state_dir.join("runmh").join("lib");
    match miehisto::files::tighten_tree(&state_dir, &[&preload_dir]) {
        Ok(0) => {}
        Ok(n) => log::warn!(
            "made {n} entries under {} private (0700 directories, 0600 files)",
            state_dir.display()
        ),
        Err(e) => bail!(
            "cannot make the state directory {} private: {e}",
            state_dir.display()
        ),
    }
    // Others may pass through (never list) down to it; everything else in
    // these directories stays 0700/0600.
    std::fs::create_dir_all(&preload_dir)
        .with_context(|| format!("cannot create {}", preload_dir.display()))?;
    for d in [&state_dir, &state_dir.join("runmh"), &preload_dir] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .with_context(|| format!("cannot let services reach {}", preload_dir.display()))?;
    }
    let lock_path = state_dir.join("miehistod.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    let mut lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, e)) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            bail!(
                "another miehistod (pid {}) is using the state directory {} ({e}); stop it or give this one another --state-dir",
                holder.trim(),
                state_dir.display()
            );
        }
    };
    lock.set_len(0).ok();
    let _ = writeln!(&mut *lock, "{}", std::process::id());
    let criu = match cli.criu {
        Some(c) => {
            Some(std::path::absolute(&c).with_context(|| format!("bad --criu {}", c.display()))?)
        }
        None => None,
    };
    let socket = std::path::absolute(&cli.socket)
        .with_context(|| format!("bad --socket {}", cli.socket.display()))?;
    // runmh's cache of CRIU's version, written now: once the reaper below
    // runs, a `criu --version` of the daemon's own would lose its child to
    // it (runmh, the daemon's child, is unaffected).
    if let Err(e) = miehisto::criu::Criu::discover_cached(criu.as_deref(), &state_dir.join("runmh"))
    {
        log::warn!("{e}; prebakes and restores will fail until CRIU is there");
    }
    let children = Children::start()?;
    let services = Services::open(
        ServicesConfig {
            state_dir: state_dir.clone(),
            runmh,
            criu,
            stop_timeout: cli.stop_timeout,
        },
        children,
    )?;
    let listener = server::bind(&socket, cli.socket_mode)?;
    let access = Access {
        allow_uids: cli.allow_uid,
        allow_gids: cli.allow_gid,
    };
    let services = Arc::new(services);
    if let Some(addr) = cli.metrics {
        let bound = miehisto::daemon::metrics::serve(addr, Arc::clone(&services))?;
        log::info!("metrics on http://{bound}/metrics");
    }
    // On-demand services wait on their ports again (running ones were
    // taken back above and go on counting their idle time).
    services.arm_all();
    let limits = Limits {
        idle: std::time::Duration::from_secs(cli.client_idle_timeout),
    };
    let server = Server::new(services, access, limits);
    server.serve(listener)?;
    log::info!(
        "miehistod {} (pid {}) listening on {}, state in {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        socket.display(),
        state_dir.display()
    );
    let signals = miehisto::supervisor::signals();
    loop {
        match signals.recv() {
            Ok(sig) if sig == nix::libc::SIGHUP => log::info!("SIGHUP ignored (nothing to reload)"),
            Ok(sig) => {
                log::info!(
                    "{}: exiting; the services keep running",
                    miehisto::sys::signal::signal_name(sig)
                );
                break;
            }
            Err(_) => bail!("the signal thread stopped"),
        }
    }
    let _ = std::fs::remove_file(&socket);
    drop(lock);
    Ok(())
}

//! mhctl — the client of miehistod, and the front door to the research
//! matrix and the benchmarks (which need no daemon).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use miehisto::daemon::api::{self, ImageInfo, Reply, Request, ServiceInfo, ServiceState};
use miehisto::daemon::client::Client;
use miehisto::daemon::migrate;
use miehisto::daemon::remote::{self, DaemonAddr, SshOptions};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "mhctl",
    version,
    about = "Control miehistod: services, their images, experiments and benchmarks"
)]
struct Cli {
    /// miehistod's socket [default: /run/miehisto/miehistod.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A daemon elsewhere: ssh://[USER@]HOST[:PORT][/SOCKET] (through the
    /// system's ssh; MIEHISTO_SSH_CONFIG=FILE passes `-F FILE`,
    /// MIEHISTO_REMOTE_MHCTL names the remote mhctl), or unix:///PATH.
    /// [env: MIEHISTO_HOST; --socket wins over the variable]
    #[arg(long, short = 'H', value_name = "URL")]
    host: Option<String>,
    /// CRIU binary for `experiment` and `bench`.
    #[arg(long, value_name = "PATH")]
    criu: Option<PathBuf>,
    /// Working directory of `experiment` and `bench` (default
    /// /var/lib/miehisto/mhctl-runs as root, else a temporary directory).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Narrate each step for an audience (`experiment`, `bench`).
    #[arg(long)]
    explain: bool,
    /// With --explain: do not pause between steps.
    #[arg(long)]
    no_pause: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create, prebake, start, dump, stop and delete services.
    Service(ServiceArgs),
    /// List, inspect and remove image generations.
    Image(ImageArgs),
    /// Check that miehistod answers.
    Ping {
        #[arg(long)]
        json: bool,
        /// miehistod's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Run the research matrix (no daemon needed).
    Experiment(miehisto::experiment::ExperimentArgs),
    /// Run the benchmarks (no daemon needed).
    Bench(miehisto::bench::BenchArgs),
    /// Plumbing for remote use.
    System {
        #[command(subcommand)]
        cmd: SystemCmd,
    },
}

#[derive(Subcommand)]
enum SystemCmd {
    /// Copy stdin to the local daemon's socket and its replies to stdout
    /// (what `mhctl --host ssh://...` runs on the remote host).
    DialStdio {
        /// The daemon's socket.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServiceArgs {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// miehistod's socket (here or before the command group).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: ServiceCmd,
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Declare a service: a name and the command that runs it.
    Create {
        name: String,
        /// How a prebake stops the service.
        #[arg(long, default_value = "auto", value_name = "trace|notify|auto")]
        backend: String,
        /// The syscall a prebake stops before.
        #[arg(long, default_value = "listen", value_name = "SYSCALL")]
        stop_at: String,
        /// Environment variable for the service (repeatable).
        #[arg(short = 'e', long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory of the service (default: the current one).
        #[arg(short = 'C', long = "cwd", value_name = "DIR")]
        cwd: Option<PathBuf>,
        /// Replace a service whose record is broken, with its images and logs.
        #[arg(long)]
        force: bool,
        /// Run the service as this user (names or ids). Only root chooses:
        /// anyone else's services run as themselves.
        #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
        user: Option<String>,
        #[command(flatten)]
        on_demand: OnDemandArgs,
        /// The command and its arguments (never run through a shell).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Change how a service starts: on demand, or by hand only (--manual).
    Set {
        name: String,
        #[command(flatten)]
        on_demand: OnDemandArgs,
        /// Start it by hand only (turns --on-demand off).
        #[arg(long, conflicts_with = "on_demand")]
        manual: bool,
    },
    /// Show an on-demand service's activations and their latency.
    Stats { name: String },
    /// Boot the service to its stop point, dump it, publish a new image generation.
    Prebake { name: String },
    /// Restore the newest image (or boot cold when there is none, or with --cold).
    Start {
        name: String,
        #[arg(long)]
        cold: bool,
    },
    /// Dump the running service into a new image generation.
    Dump {
        name: String,
        /// Keep the service running after the dump.
        #[arg(long)]
        leave_running: bool,
    },
    /// Move the running service to another host's daemon (live migration:
    /// pages streamed by CRIU's page server; this copy stops only once the
    /// other answers, and is resumed if it does not).
    Migrate {
        name: String,
        /// The destination daemon: ssh://[USER@]HOST[:PORT][/SOCKET].
        #[arg(long, value_name = "URL")]
        to: String,
        /// The destination's address as this host reaches it (default: the
        /// ssh host of --to); its page server listens there.
        #[arg(long, value_name = "ADDR")]
        address: Option<String>,
        /// Count downtime to the first HTTP answer on ADDR:PORT (else to
        /// the restore), and resume here if none comes.
        #[arg(long, value_name = "PORT")]
        probe_port: Option<u16>,
        #[arg(long, value_name = "PATH", default_value = "/")]
        probe_path: String,
        /// CRIU pre-dump iterations with memory tracking first.
        #[arg(long, value_name = "N", default_value_t = 0)]
        pre_dump: u32,
    },
    /// Stop the running service.
    Stop { name: String },
    /// Delete a stopped service with its images and logs.
    Delete { name: String },
    /// Show the services: state, pid, image generation, uptime.
    List,
    /// Show the service's stdout and stderr.
    Logs {
        name: String,
        /// Keep printing what is appended.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Bytes from the end of each log to show first.
        #[arg(long, value_name = "BYTES")]
        tail: Option<u64>,
    },
}

#[derive(Args)]
struct OnDemandArgs {
    /// Start on the first connection (restore the newest image), go back
    /// to zero after --idle-timeout without an open client connection.
    #[arg(long)]
    on_demand: bool,
    /// Seconds without an open client connection before stopping.
    #[arg(long, value_name = "SECS", requires = "on_demand")]
    idle_timeout: Option<u64>,
    /// Wait only on ADDR:PORT while at zero (repeatable): one of the
    /// sockets the image holds (a server with several, when only some
    /// should wake it). By default all the image holds at its stop point.
    #[arg(long, value_name = "ADDR:PORT", requires = "on_demand")]
    listen: Vec<std::net::SocketAddr>,
    /// Keep one restored instance held at its stop point, ready: the first
    /// connection only resumes it (costs its memory; `service list` shows it).
    #[arg(long, requires = "on_demand")]
    standby: bool,
}

impl OnDemandArgs {
    fn config(&self) -> Option<api::OnDemandConfig> {
        self.on_demand.then(|| api::OnDemandConfig {
            idle_timeout_secs: self.idle_timeout.unwrap_or_else(api::default_idle_timeout),
            standby: self.standby,
            listen: self.listen.clone(),
        })
    }
}

#[derive(Args)]
struct ImageArgs {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// miehistod's socket (here or before the command group).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List image generations (of one service, or all).
    List { name: Option<String> },
    /// Show an image's metadata (the newest generation without @GEN).
    Inspect {
        #[arg(value_name = "NAME[@GEN]")]
        image: String,
    },
    /// Remove one image generation.
    Rm {
        #[arg(value_name = "NAME@GEN")]
        image: String,
    },
    /// Push a generation (the newest without @GEN) to an OCI registry.
    Push {
        #[arg(value_name = "NAME[@GEN]")]
        image: String,
        /// Where to: HOST[:PORT]/REPOSITORY[:TAG].
        #[arg(value_name = "REF")]
        reference: String,
        /// Reach this registry (HOST[:PORT]) over plain HTTP (loopback ones always are).
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure: Vec<String>,
    },
    /// Pull an image from an OCI registry into a new generation.
    Pull {
        #[arg(value_name = "REF")]
        reference: String,
        /// The service to add it to (default: the one it was pushed from;
        /// created from the image's command when missing).
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure: Vec<String>,
    },
    /// Check whether an image (local NAME[@GEN], or a registry REF) can be restored on the daemon's host.
    Check {
        #[arg(value_name = "REF|NAME[@GEN]")]
        image: String,
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure: Vec<String>,
    },
}

fn main() {
    // What mhctl's experiments write (images, logs) is private.
    miehisto::files::private_umask();
    miehisto::sys::signal::default_sigpipe();
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    if cli.explain {
        miehisto::explain::enable(!cli.no_pause);
    }
    match real_main(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("mhctl: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn runs_dir(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d,
        None if miehisto::sys::is_root() => {
            PathBuf::from(api::DEFAULT_STATE_DIR).join("mhctl-runs")
        }
        None => std::env::temp_dir().join(format!("mhctl-runs-{}", nix::unistd::getuid())),
    };
    let dir =
        std::path::absolute(&dir).with_context(|| format!("bad --state-dir {}", dir.display()))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn real_main(cli: Cli) -> Result<i32> {
    // Not a global option: `experiment` and `bench` have their own flags,
    // and a clash would break every invocation.
    let top = cli.socket;
    let explicit_host = cli.host.is_some();
    let host = match cli.host.or_else(|| {
        std::env::var("MIEHISTO_HOST")
            .ok()
            .filter(|h| !h.is_empty())
    }) {
        Some(h) => Some(DaemonAddr::parse(&h).context("--host or MIEHISTO_HOST")?),
        None => None,
    };
    let client = |here: Option<PathBuf>| -> Result<Client> {
        match (here.or(top.clone()), &host) {
            (Some(_), Some(_)) if explicit_host => bail!("give --socket or --host, not both"),
            (Some(p), _) => Ok(Client::new(&p)),
            (None, Some(h)) => Ok(Client::at(h.clone(), SshOptions::from_env())),
            (None, None) => Ok(Client::new(&PathBuf::from(api::DEFAULT_SOCKET))),
        }
    };
    match cli.cmd {
        Cmd::Service(a) => service(&client(a.socket)?, a.cmd, a.json),
        Cmd::Image(a) => image(&client(a.socket)?, a.cmd, a.json),
        Cmd::System {
            cmd: SystemCmd::DialStdio { socket },
        } => {
            let path = socket
                .or(top.clone())
                .unwrap_or_else(|| PathBuf::from(api::DEFAULT_SOCKET));
            remote::dial_stdio(&path)?;
            Ok(0)
        }
        Cmd::Ping { json, socket } => {
            let client = client(socket)?;
            let r = client.call(&Request::Ping)?;
            if json {
                print_json(&r)?;
            } else if let Reply::Pong {
                daemon_version,
                api_version,
                pid,
                state_dir,
            } = r
            {
                println!(
                    "miehistod {daemon_version} (API v{api_version}), pid {pid}, state in {}",
                    state_dir.display()
                );
            }
            Ok(0)
        }
        Cmd::Experiment(args) => {
            let dir = runs_dir(cli.state_dir)?;
            Ok(miehisto::experiment::cli(&args, cli.criu.as_deref(), &dir)?)
        }
        Cmd::Bench(args) => {
            let dir = runs_dir(cli.state_dir)?;
            Ok(miehisto::bench::cli(&args, cli.criu.as_deref(), &dir)?)
        }
    }
}

/// Shows elapsed seconds on stderr while `f` runs, when stderr is a terminal.
fn with_progress<T>(label: &str, f: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let label = label.to_string();
    let spinner = std::thread::spawn(move || {
        let t0 = Instant::now();
        let frames = ['|', '/', '-', '\\'];
        let mut i = 0;
        while !flag.load(Ordering::Relaxed) {
            eprint!(
                "\r{} {label} {:.1}s ",
                frames[i % frames.len()],
                t0.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        eprint!("\r\x1b[2K");
        let _ = std::io::stderr().flush();
    });
    let r = f();
    done.store(true, Ordering::Relaxed);
    let _ = spinner.join();
    r
}

/// The interesting part of a reply as JSON: the list itself for lists.
fn print_json(r: &Reply) -> Result<()> {
    let out = match r {
        Reply::Services { services } => serde_json::to_value(services)?,
        Reply::Images { images } => serde_json::to_value(images)?,
        other => {
            let mut v = serde_json::to_value(other)?;
            if let Some(o) = v.as_object_mut() {
                o.remove("kind");
            }
            v
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn cwd_for(cwd: Option<PathBuf>) -> Result<PathBuf> {
    match cwd {
        Some(c) => std::path::absolute(&c).with_context(|| format!("bad -C {}", c.display())),
        None => std::env::current_dir().context("cannot tell the current directory; give -C DIR"),
    }
}

fn service(client: &Client, cmd: ServiceCmd, json: bool) -> Result<i32> {
    let reply = match cmd {
        ServiceCmd::Create {
            name,
            backend,
            stop_at,
            env,
            cwd,
            force,
            user,
            on_demand,
            command,
        } => {
            let cwd = cwd_for(cwd)?;
            client.call(&Request::ServiceCreate(api::CreateService {
                name,
                command,
                env,
                cwd,
                backend,
                stop_at,
                force,
                on_demand: on_demand.config(),
                user,
            }))?
        }
        ServiceCmd::Set {
            name,
            on_demand,
            manual,
        } => {
            if !manual && !on_demand.on_demand {
                bail!("say how {name} should start: `--on-demand [--idle-timeout SECS] [--listen ADDR:PORT]...` or `--manual`");
            }
            client.call(&Request::ServiceSet(api::SetService {
                name,
                on_demand: on_demand.config(),
            }))?
        }
        ServiceCmd::Stats { name } => client.call(&Request::ServiceStats(api::Named { name }))?,
        ServiceCmd::Prebake { name } => {
            let req = Request::ServicePrebake(api::Named { name: name.clone() });
            with_progress(&format!("prebaking {name}"), || client.call(&req))?
        }
        ServiceCmd::Start { name, cold } => {
            let req = Request::ServiceStart(api::StartService {
                name: name.clone(),
                cold,
            });
            with_progress(&format!("starting {name}"), || client.call(&req))?
        }
        ServiceCmd::Dump {
            name,
            leave_running,
        } => {
            let req = Request::ServiceDump(api::DumpService {
                name: name.clone(),
                leave_running,
            });
            with_progress(&format!("dumping {name}"), || client.call(&req))?
        }
        ServiceCmd::Stop { name } => {
            let req = Request::ServiceStop(api::Named { name: name.clone() });
            with_progress(&format!("stopping {name}"), || client.call(&req))?
        }
        ServiceCmd::Delete { name } => client.call(&Request::ServiceDelete(api::Named { name }))?,
        ServiceCmd::Migrate {
            name,
            to,
            address,
            probe_port,
            probe_path,
            pre_dump,
        } => {
            return migrate_cmd(
                client, name, &to, address, probe_port, probe_path, pre_dump, json,
            )
        }
        ServiceCmd::List => client.call(&Request::ServiceList)?,
        ServiceCmd::Logs { name, follow, tail } => return logs(client, name, follow, tail, json),
    };
    if json {
        print_json(&reply)?;
        return Ok(0);
    }
    match reply {
        Reply::Service(s) => println!("{}", miehisto::printable(&describe_service(&s))),
        Reply::Services { services } => print_services(&services),
        Reply::Image(i) => println!("{}", miehisto::printable(&describe_image(&i))),
        Reply::Done { message } => println!("{}", miehisto::printable(&message)),
        Reply::Stats(st) => print_stats(&st),
        other => print_json(&other)?,
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn migrate_cmd(
    client: &Client,
    name: String,
    to: &str,
    address: Option<String>,
    probe_port: Option<u16>,
    probe_path: String,
    pre_dump: u32,
    json: bool,
) -> Result<i32> {
    let dst_addr = DaemonAddr::parse(to).context("--to")?;
    let address = match (&address, &dst_addr) {
        (Some(a), _) => a.clone(),
        (None, DaemonAddr::Ssh(t)) => t.host().to_string(),
        (None, DaemonAddr::Unix(_)) => {
            bail!("--to {to} is a local socket: give --address, the destination's address as this host reaches it")
        }
    };
    let dst = Client::at(dst_addr, SshOptions::from_env());
    let req = migrate::MigrateRequest {
        name: name.clone(),
        pre_dump,
        address,
        probe: probe_port.map(|p| (p, probe_path)),
        probe_timeout: Duration::from_secs(15),
    };
    let r = with_progress(&format!("migrating {name}"), || {
        migrate::migrate(client, &dst, &req)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    let answered = match r.answered_ms {
        Some(ms) => format!(", first answer at {ms} ms"),
        None => String::new(),
    };
    println!("migrated {name} to {to}: {}", describe_service(&r.service));
    println!(
        "downtime {} ms (dump with pages streamed {} ms, {} files / {} copied, restored at {} ms{answered})",
        r.downtime_ms(),
        r.dump_ms,
        r.files,
        human_bytes(r.bytes),
        r.restored_ms
    );
    Ok(0)
}

fn print_stats(st: &api::OnDemandStats) {
    let i = &st.info;
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} ms"))
            .unwrap_or_else(|| "-".into())
    };
    let kv = |k: &str, v: String| println!("{k:<18} {v}");
    kv("service", st.name.clone());
    kv("state", i.state.as_str().to_string());
    kv(
        "listen",
        i.listen
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    kv("idle timeout", format!("{} s", i.idle_timeout_secs));
    kv(
        "standby",
        match (i.standby, i.standby_rss_kib) {
            (false, _) => "off".into(),
            (true, Some(kib)) => format!("held, RSS {:.1} MiB", kib as f64 / 1024.0),
            (true, None) => "on, none held now".into(),
        },
    );
    kv("activations", i.activations.to_string());
    kv("failures", i.failures.to_string());
    kv("refused clients", i.refused_connections.to_string());
    kv("latency median", ms(st.median_ms));
    kv("latency p95", ms(st.p95_ms));
    kv("latency max", ms(st.max_ms));
    kv("latency last", ms(i.last_activation_ms));
    if let Some(f) = &i.last_failure {
        kv("last failure", f.clone());
    }
}

fn logs(client: &Client, name: String, follow: bool, tail: Option<u64>, json: bool) -> Result<i32> {
    let mut ex = client.send(&Request::ServiceLogs(api::LogsRequest {
        name,
        follow,
        tail_bytes: tail,
    }))?;
    loop {
        match ex.read_reply()? {
            Reply::Log { stream, text } => {
                if json {
                    println!("{}", serde_json::json!({ "stream": stream, "text": text }));
                } else if stream == "stderr" {
                    eprint!("{text}");
                } else {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
            }
            Reply::LogEnd => return Ok(0),
            other => bail!("unexpected reply to service logs: {other:?}"),
        }
    }
}

fn parse_ref(s: &str, need_gen: bool) -> Result<(String, Option<u64>)> {
    match s.split_once('@') {
        Some((n, g)) => {
            let g: u64 = g.parse().with_context(|| format!("{s:?}: the generation after @ must be a number, e.g. {n}@1"))?;
            Ok((n.to_string(), Some(g)))
        }
        None if need_gen => bail!("{s:?} names no generation: write NAME@GEN, e.g. {s}@1 (`mhctl image list {s}` shows them)"),
        None => Ok((s.to_string(), None)),
    }
}

/// Runs a streaming image transfer, drawing its `progress` replies as a
/// bar on stderr when it is a terminal; returns the final reply.
fn transfer(client: &Client, req: &Request, label: &str) -> Result<Reply> {
    let mut ex = client.send(req)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    loop {
        match ex.read_reply() {
            Ok(Reply::Progress { phase, done, total }) => {
                if let Some(b) = &bar {
                    b.set_message(format!("{label}: {phase}"));
                    b.set_length(total);
                    b.set_position(done);
                }
            }
            other => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(other?);
            }
        }
    }
}

/// A registry reference has a `/`; a local image is NAME[@GEN].
fn is_reference(s: &str) -> bool {
    s.contains('/')
}

fn image(client: &Client, cmd: ImageCmd, json: bool) -> Result<i32> {
    let reply = match cmd {
        ImageCmd::Push {
            image,
            reference,
            insecure,
        } => {
            let (name, generation) = parse_ref(&image, false)?;
            let req = Request::ImagePush(api::PushImage {
                name,
                generation,
                reference,
                insecure_registries: insecure,
            });
            transfer(client, &req, "push")?
        }
        ImageCmd::Pull {
            reference,
            as_name,
            insecure,
        } => {
            let req = Request::ImagePull(api::PullImage {
                reference,
                as_name,
                insecure_registries: insecure,
            });
            transfer(client, &req, "pull")?
        }
        ImageCmd::Check { image, insecure } => {
            let req = if is_reference(&image) {
                api::CheckImage {
                    name: None,
                    generation: None,
                    reference: Some(image),
                    insecure_registries: insecure,
                }
            } else {
                let (name, generation) = parse_ref(&image, false)?;
                api::CheckImage {
                    name: Some(name),
                    generation,
                    reference: None,
                    insecure_registries: insecure,
                }
            };
            let reply = transfer(client, &Request::ImageCheck(req), "check")?;
            if json {
                print_json(&reply)?;
            }
            return match reply {
                Reply::ImageCheck {
                    compatible: true,
                    message,
                    ..
                } => {
                    if !json {
                        println!("{message}");
                    }
                    Ok(0)
                }
                Reply::ImageCheck { message, .. } => bail!("{message}"),
                other => bail!("unexpected reply to image check: {other:?}"),
            };
        }
        ImageCmd::List { name } => client.call(&Request::ImageList(api::MaybeNamed { name }))?,
        ImageCmd::Inspect { image } => {
            let (name, generation) = parse_ref(&image, false)?;
            client.call(&Request::ImageInspect(api::ImageRef { name, generation }))?
        }
        ImageCmd::Rm { image } => {
            let (name, generation) = parse_ref(&image, true)?;
            client.call(&Request::ImageRm(api::ImageRm {
                name,
                generation: generation.unwrap_or_default(),
            }))?
        }
    };
    if json {
        print_json(&reply)?;
        return Ok(0);
    }
    match reply {
        Reply::Images { images } => print_images(&images),
        Reply::ImageDetail { image, metadata } => print_inspect(&image, &metadata),
        Reply::Done { message } => println!("{message}"),
        Reply::ImagePushed {
            service,
            generation,
            reference,
            manifest_digest,
            layer_bytes,
            ..
        } => println!(
            "pushed {service}@{generation} to {reference} ({}, manifest {manifest_digest})",
            human_bytes(layer_bytes)
        ),
        Reply::ImagePulled {
            image,
            reference,
            manifest_digest,
            created_service,
            ..
        } => {
            println!(
                "pulled {reference} ({manifest_digest}) as {}@{}{}",
                image.service,
                image.generation,
                if created_service {
                    " (service created from the image's command)"
                } else {
                    ""
                }
            );
        }
        other => print_json(&other)?,
    }
    Ok(0)
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        s if s >= 86400 => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn age(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    format!(
        "{} ago",
        human_duration(miehisto::sys::time::unix_ms().saturating_sub(unix_ms))
    )
}

/// Prints rows as columns padded to the widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(miehisto::printable(c).chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let s: Vec<String> = cells
            .into_iter()
            .map(|c| miehisto::printable(&c))
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == n {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn describe_service(s: &ServiceInfo) -> String {
    let mut out = format!("{}: {}", s.name, s.state);
    if let (Some(pid), Some(sup)) = (s.pid, s.supervisor_pid) {
        let from = match s.generation {
            Some(g) => format!("restored from image generation {g}"),
            None => "started cold".to_string(),
        };
        out.push_str(&format!(" (pid {pid} under runmh {sup}, {from})"));
    } else if let Some(e) = &s.last_exit {
        out.push_str(&format!(" ({e})"));
    }
    out
}

fn print_services(list: &[ServiceInfo]) {
    if list.is_empty() {
        println!("no services; create one with `mhctl service create NAME -- CMD...`");
        return;
    }
    let rows = list
        .iter()
        .map(|s| {
            let state = match (&s.busy, &s.on_demand) {
                (Some(op), _) => format!("{} ({op})", s.state),
                (None, Some(od)) => match od.standby_rss_kib {
                    Some(kib) => format!(
                        "{} (on-demand: {}, RSS {:.1} MiB)",
                        s.state,
                        od.state.as_str(),
                        kib as f64 / 1024.0
                    ),
                    None => format!("{} (on-demand: {})", s.state, od.state.as_str()),
                },
                (None, None) => s.state.to_string(),
            };
            let activations = match &s.on_demand {
                Some(od) => match od.last_activation_ms {
                    Some(ms) => format!("{} (last {ms:.0} ms)", od.activations),
                    None => od.activations.to_string(),
                },
                None => "-".into(),
            };
            let image = match (s.state, s.generation) {
                (ServiceState::Running | ServiceState::Standby, Some(g)) => format!("gen {g}"),
                (ServiceState::Running, None) => "cold".into(),
                _ => "-".into(),
            };
            vec![
                s.name.clone(),
                state,
                s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                image,
                s.uptime_ms
                    .map(human_duration)
                    .unwrap_or_else(|| "-".into()),
                match s.latest_generation {
                    Some(g) => format!("{} (newest {g})", s.images),
                    None => "0".into(),
                },
                s.backend.clone(),
                match &s.user {
                    Some(u) => u.clone(),
                    None if s.state == ServiceState::Broken => "-".into(),
                    None => "root".into(),
                },
                activations,
                match &s.problem {
                    Some(p) => format!("BROKEN RECORD: {p}"),
                    None => s.command.join(" "),
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "PID",
            "IMAGE",
            "UPTIME",
            "IMAGES",
            "BACKEND",
            "USER",
            "ACTIVATIONS",
            "COMMAND",
        ],
        rows,
    );
}

fn describe_image(i: &ImageInfo) -> String {
    let stop = i
        .stop_syscall
        .as_ref()
        .map(|s| format!(", stopped before {s}"))
        .unwrap_or_default();
    format!(
        "{}@{}: published at {} (backend {}{stop}, dump {} ms, {})",
        i.service,
        i.generation,
        i.path.display(),
        i.backend.map_or("unknown", |b| b.as_str()),
        i.dump_ms,
        human_bytes(i.bytes)
    )
}

fn print_images(list: &[ImageInfo]) {
    if list.is_empty() {
        println!(
            "no images; make one with `mhctl service prebake NAME` or `mhctl service dump NAME`"
        );
        return;
    }
    let rows = list
        .iter()
        .map(|i| {
            if !i.valid {
                let problem = i.problem.clone().unwrap_or_default();
                return vec![
                    format!("{}@{}", i.service, i.generation),
                    "-".into(),
                    "INVALID".into(),
                    "-".into(),
                    human_bytes(i.bytes),
                    "-".into(),
                    problem,
                ];
            }
            vec![
                format!("{}@{}", i.service, i.generation),
                age(i.created_unix_ms),
                i.backend.map_or("unknown", |b| b.as_str()).to_string(),
                i.stop_syscall.clone().unwrap_or_else(|| "-".into()),
                human_bytes(i.bytes),
                format!("{} ms", i.dump_ms),
                i.path.display().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "IMAGE", "CREATED", "BACKEND", "STOP", "SIZE", "DUMP", "PATH",
        ],
        rows,
    );
}

fn print_inspect(i: &ImageInfo, md: &miehisto::images::Metadata) {
    let kv = |k: &str, v: String| println!("{k:<14} {}", miehisto::printable(&v));
    kv("image", format!("{}@{}", i.service, i.generation));
    kv("path", i.path.display().to_string());
    kv("created", age(md.created_unix_ms));
    kv(
        "size",
        format!("{} in {} files", human_bytes(i.bytes), i.files),
    );
    kv(
        "backend",
        format!("{} ({})", md.backend.kind, md.backend.reason),
    );
    if let Some(sig) = md.backend.marker_signal {
        kv("marker signal", sig.to_string());
    }
    match &md.stop {
        Some(s) => kv(
            "stop event",
            format!(
                "before {}() {} ms after start (tid {}, args {:?})",
                s.syscall,
                s.since_start_ms,
                s.hit.tid,
                &s.hit.args[..3]
            ),
        ),
        None => kv("stop event", "none: dumped while running".into()),
    }
    for b in md.stop.iter().flat_map(|s| s.bound.iter()) {
        kv(
            "bound socket",
            format!(
                "{} (pid {} fd {}{}{})",
                b.addr,
                b.pid,
                b.fd,
                if b.listening { ", listening" } else { "" },
                if b.reuseport { ", SO_REUSEPORT" } else { "" }
            ),
        );
    }
    kv(
        "dump",
        format!(
            "{} ms{}",
            md.dump_ms,
            if md.leave_running {
                ", service left running"
            } else {
                ""
            }
        ),
    );
    kv("command", md.spec.argv.join(" "));
    kv("program", md.spec.program.display().to_string());
    kv("cwd", md.spec.cwd.display().to_string());
    kv("logs", md.spec.log_dir.display().to_string());
    kv("user", format!("{}:{}", md.spec.uid, md.spec.gid));
    kv("criu", md.criu_version.clone());
    kv("kernel", md.kernel.clone());
    kv("miehisto", md.miehisto_version.clone());
}

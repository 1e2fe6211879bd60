//! One measurement each: start a server one way, time it to its first good
//! HTTP response, read what else is worth knowing (RSS, CRIU's own time),
//! and take it down again. Everything runs the real `runmh` binary and the
//! real CRIU, as a user would.

use super::bare;
use super::breakdown;
use super::load;
use super::workloads::Workload;
use super::BenchError;
use crate::criu::kdat::KdatCache;
use crate::criu::Criu;
use crate::images::Metadata;
use crate::instance::Instance;
use crate::sys;
use crate::sys::procfs;
use nix::libc;
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// What every measurement needs.
pub struct Ctx {
    pub runmh: PathBuf,
    pub criu: Criu,
    /// runmh's `--state-dir`.
    pub state: PathBuf,
    /// The benchmark's own scratch directory (logs, images, CRIU work dirs).
    pub work: PathBuf,
    pub timeout: Duration,
    /// Seconds of steady-state load; 0 skips it.
    pub load_secs: u64,
    /// runmh/bare restore pairs of the NOTIFY image per run.
    pub pairs: u32,
    pub kdat: Option<KdatCache>,
    /// `K=V` pairs given to every `runmh prebake` as `-e`.
    pub prebake_env: Vec<String>,
}

/// A server that came up.
#[derive(Debug, Default, Clone)]
pub struct Boot {
    /// Start → first good HTTP response.
    pub first_response: Duration,
    /// Start → the port accepted a connection.
    pub listen: Duration,
    pub rss_mib: Option<f64>,
    pub rps: Option<f64>,
    /// Requests per second of the plain twin measured alongside.
    pub twin_rps: Option<f64>,
    /// CRIU's own restore time, from its log.
    pub criu_ms: Option<f64>,
    /// Restores only: where the time to the first response went.
    pub phases: Option<breakdown::Sample>,
}

/// A published image.
#[derive(Debug, Clone)]
pub struct Baked {
    pub stop_ms: f64,
    pub dump_ms: f64,
    pub image_mib: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn millis(d: Duration) -> f64 {
    ms(d)
}

/// VmRSS of `pid` in MiB.
pub fn rss_mib(pid: i32) -> Option<f64> {
    let kib = procfs::status(Pid::from_raw(pid)).ok()?.vm_rss_kib?;
    Some(kib as f64 / 1024.0)
}

/// The last timestamp of a CRIU log ("(00.041234) ..."), in ms.
pub fn criu_log_span_ms(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| {
        let inner = l.strip_prefix('(')?.split_once(')')?.0;
        inner.trim().parse::<f64>().ok().map(|s| s * 1000.0)
    })
}

/// Whether CRIU loaded its kernel-feature cache on this run.
pub fn criu_log_loaded_kdat(log: &Path) -> bool {
    std::fs::read_to_string(log)
        .map(|t| t.contains("Loaded kdat cache"))
        .unwrap_or(false)
}

/// Where the benchmark's clients connect from: a loopback address of their
/// own per wait, never reused in a run. The load phase (`wrk`,
/// `Connection: close`) leaves thousands of the server side's TIME_WAIT
/// sockets on a workload's port, keyed by 127.0.0.1 and the client's
/// ephemeral port, and a new connect from 127.0.0.1 picks those ports
/// again. A SYN that meets such a TIME_WAIT is answered with an ACK
/// (tcp_timewait_state_process), not a SYN-ACK or a RST, and waits for its
/// retransmit: 5-20 ms measured here (NOTES §6), charged to whichever
/// restore was being polled while the port opened — runmh's, polled from
/// its start, far more often than bare CRIU's, polled after CRIU exits.
pub fn probe_source() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (254 * 256);
    // 127.77.0.1 up to 127.77.255.254.
    Ipv4Addr::from(0x7f4d_0000 | (n / 254) << 8 | (n % 254 + 1))
}

/// A TCP connection to 127.0.0.1:`port` from `source` (any port), bounded
/// by `timeout` (connect(2) honours SO_SNDTIMEO).
pub fn connect_from(source: Ipv4Addr, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(
            libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            timeout.subsec_micros().into(),
        ),
    )?;
    socket::bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )?;
    socket::connect(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )?;
    Ok(TcpStream::from(fd))
}

/// One GET; Some(status) when a whole response came back.
fn get(stream: &mut TcpStream, path: &str) -> std::io::Result<u16> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::with_capacity(1024);
    stream.read_to_end(&mut buf)?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
    Ok(head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Polls until `port` answers 200 at `path`; returns (first accepted
/// connection, first good response), both measured from `t0`. `alive`
/// says whether the thing being started is still worth waiting for.
pub fn wait_first_response(
    what: &str,
    port: u16,
    path: &str,
    t0: Instant,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<(Duration, Duration), BenchError> {
    let source = probe_source();
    let mut listen: Option<Duration> = None;
    loop {
        let last = match connect_from(source, port, Duration::from_secs(1)) {
            Ok(mut s) => {
                let accepted = t0.elapsed();
                listen.get_or_insert(accepted);
                match get(&mut s, path) {
                    Ok(200) => return Ok((listen.unwrap_or(accepted), t0.elapsed())),
                    Ok(code) => format!("HTTP status {code}"),
                    Err(e) => e.to_string(),
                }
            }
            Err(e) => e.to_string(),
        };
        if let Err(why) = alive() {
            return Err(BenchError::NoResponse {
                what: what.to_string(),
                port,
                detail: why,
            });
        }
        if t0.elapsed() > timeout {
            return Err(BenchError::NoResponse {
                what: what.to_string(),
                port,
                detail: format!("no HTTP 200 within {}s (last: {last})", timeout.as_secs()),
            });
        }
        // Refused connects on loopback cost microseconds: poll finely so the
        // poll interval does not blur millisecond-scale restores.
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn child_alive(child: &mut Child, log: &Path) -> Result<(), String> {
    match child.try_wait() {
        Ok(Some(st)) => Err(format!(
            "it exited ({st}) before answering; {}",
            last_lines(log, 3)
        )),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("cannot wait for it: {e}")),
    }
}

/// The last `n` non-empty lines of a log, for error messages.
pub fn last_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        format!("log {} is empty", log.display())
    } else {
        format!("log {}: {tail}", log.display())
    }
}

/// Kills `child` if still running and reaps it, bounded.
fn finish(child: &mut Child, grace: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The workload's command without runmh, with the environment runmh gives
/// a sandboxed service (`SandboxSpec` keeps PATH, HOME, LANG and TERM):
/// the caller's other variables change boot times (Node.js, for one,
/// loads the certificates NODE_EXTRA_CA_CERTS names), so a plain spawn
/// with the full environment would not be the same boot.
fn plain_command(wl: &Workload, port: u16) -> Command {
    let argv = wl.command(port);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(&wl.cwd)
        .stdin(Stdio::null())
        .env_clear();
    for k in ["PATH", "HOME", "LANG", "TERM"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd
}

fn log_file(path: &Path) -> Result<std::fs::File, BenchError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| BenchError::Io {
            path: path.to_path_buf(),
            source,
        })
}

impl Ctx {
    fn runmh_cmd(&self) -> Command {
        let mut c = Command::new(&self.runmh);
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("--criu")
            .arg(&self.criu.path);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    }

    fn spawn(&self, what: &str, cmd: &mut Command, log: &Path) -> Result<Child, BenchError> {
        let f = log_file(log)?;
        cmd.stderr(f);
        cmd.spawn().map_err(|source| BenchError::Spawn {
            what: what.to_string(),
            source,
        })
    }

    /// The instance of a service runmh started, once its record names the
    /// service's pid (a restored NOTIFY service may answer before its
    /// supervisor has written it).
    fn instance_of(
        &self,
        pred: impl Fn(&crate::instance::InstanceRecord) -> bool,
    ) -> Option<(Instance, i32)> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Some((inst, rec)) = Instance::list(&self.state).into_iter().find(|(_, r)| {
                pred(r) && r.root_pid > 0 && r.state == crate::instance::InstanceState::Running
            }) {
                return Some((inst, rec.root_pid));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Steady-state requests per second of the server on `port` and of a
    /// plain twin of it (the same command, without runmh, on another port),
    /// in alternating one-second slices so that the machine's other load
    /// hits both alike. Returns (server, twin).
    fn paired_load(&self, wl: &Workload, port: u16, tag: &str) -> Result<(f64, f64), BenchError> {
        let twin_port = super::free_port()?;
        let log = self.work.join(format!("twin-{tag}.log"));
        let mut cmd = plain_command(wl, twin_port);
        cmd.stdout(log_file(&log)?);
        let t0 = Instant::now();
        let mut twin = self.spawn("plain twin", &mut cmd, &log)?;
        let result =
            wait_first_response("plain twin", twin_port, wl.path, t0, self.timeout, || {
                child_alive(&mut twin, &log)
            })
            .and_then(|_| {
                let slice = Duration::from_secs(1);
                let (mut ours, mut theirs) = (0.0, 0.0);
                for i in 0..self.load_secs {
                    let order = if i % 2 == 0 {
                        [port, twin_port]
                    } else {
                        [twin_port, port]
                    };
                    for p in order {
                        let rps = load::requests_per_second(p, wl.path, slice)?;
                        if p == port {
                            ours += rps;
                        } else {
                            theirs += rps;
                        }
                    }
                }
                let n = self.load_secs as f64;
                Ok((ours / n, theirs / n))
            });
        let _ = twin.kill();
        finish(&mut twin, Duration::from_secs(10));
        result
    }

    /// (a) `runmh run` → first response; RSS of the service.
    pub fn cold_runmh(&self, wl: &Workload, port: u16, tag: &str) -> Result<Boot, BenchError> {
        let logs = self.work.join("logs").join(format!("run-{tag}"));
        let err = self.work.join(format!("runmh-run-{tag}.err"));
        let mut cmd = self.runmh_cmd();
        cmd.arg("run")
            .arg("--log-dir")
            .arg(&logs)
            .arg("--stop-timeout")
            .arg("1")
            .arg("-C")
            .arg(&wl.cwd)
            .arg("--");
        cmd.args(wl.command(port));
        let t0 = Instant::now();
        let mut child = self.spawn("runmh run", &mut cmd, &err)?;
        let r = wait_first_response("runmh run", port, wl.path, t0, self.timeout, || {
            child_alive(&mut child, &err)
        });
        let mut root = None;
        let result = r.map(|(listen, first)| {
            let sup = sys::child_pid(&child).as_raw();
            root = self
                .instance_of(|rec| rec.supervisor_pid == sup)
                .map(|(_, p)| p);
            Boot {
                first_response: first,
                listen,
                rss_mib: root.and_then(rss_mib),
                ..Default::default()
            }
        });
        self.take_down(&mut child, root);
        result
    }

    /// Kills a runmh-supervised service and waits for its runmh.
    fn take_down(&self, child: &mut Child, root: Option<i32>) {
        if let Some(root) = root {
            // As PID 1 of its namespace the service ignores SIGTERM unless it
            // handles it; the benchmark does not need a graceful end.
            let _ = sys::kill(Pid::from_raw(root), libc::SIGKILL);
        } else {
            let _ = child.kill();
        }
        finish(child, Duration::from_secs(10));
    }

    /// (b) plain spawn → first response (and → first accepted connection); RSS.
    pub fn cold_plain(&self, wl: &Workload, port: u16, tag: &str) -> Result<Boot, BenchError> {
        let log = self.work.join(format!("plain-{tag}.log"));
        let mut cmd = plain_command(wl, port);
        cmd.stdout(log_file(&log)?);
        let t0 = Instant::now();
        let mut child = self.spawn("plain spawn", &mut cmd, &log)?;
        let r = wait_first_response("plain spawn", port, wl.path, t0, self.timeout, || {
            child_alive(&mut child, &log)
        });
        let result = r.map(|(listen, first)| Boot {
            first_response: first,
            listen,
            rss_mib: rss_mib(sys::child_pid(&child).as_raw()),
            ..Default::default()
        });
        let _ = child.kill();
        finish(&mut child, Duration::from_secs(10));
        result
    }

    /// (c) `runmh prebake --backend <backend>` into `images`.
    pub fn prebake(
        &self,
        wl: &Workload,
        port: u16,
        backend: &str,
        images: &Path,
        tag: &str,
    ) -> Result<Baked, BenchError> {
        let _ = std::fs::remove_dir_all(images);
        let logs = self
            .work
            .join("logs")
            .join(format!("prebake-{backend}-{tag}"));
        let err = self.work.join(format!("runmh-prebake-{backend}-{tag}.err"));
        let mut cmd = self.runmh_cmd();
        cmd.arg("prebake")
            .arg("--backend")
            .arg(backend)
            .arg("--images")
            .arg(images);
        cmd.arg("--timeout")
            .arg(self.timeout.as_secs().max(1).to_string());
        for kv in &self.prebake_env {
            cmd.arg("-e").arg(kv);
        }
        cmd.arg("--log-dir")
            .arg(&logs)
            .arg("-C")
            .arg(&wl.cwd)
            .arg("--")
            .args(wl.command(port));
        let mut child = self.spawn("runmh prebake", &mut cmd, &err)?;
        let deadline = Instant::now() + self.timeout + Duration::from_secs(60);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    finish(&mut child, Duration::ZERO);
                    return Err(BenchError::Prebake {
                        backend: backend.to_string(),
                        detail: format!("no result in time; {}", last_lines(&err, 2)),
                    });
                }
            }
        };
        if !status.success() {
            return Err(BenchError::Prebake {
                backend: backend.to_string(),
                detail: format!("{status}; {}", last_lines(&err, 2)),
            });
        }
        let md = Metadata::read(images)?;
        let stop_ms = md
            .stop
            .as_ref()
            .map(|s| s.since_start_ms as f64)
            .unwrap_or(f64::NAN);
        Ok(Baked {
            stop_ms,
            dump_ms: md.dump_ms as f64,
            image_mib: md.image_bytes as f64 / (1024.0 * 1024.0),
        })
    }

    /// (d) `runmh restore` (foreground, as a supervisor would run it) →
    /// first response; RSS; CRIU's own time; with `load_against`, steady
    /// load against it and a plain twin ([`Boot::rps`], [`Boot::twin_rps`]).
    pub fn runmh_restore(
        &self,
        images: &Path,
        port: u16,
        path: &str,
        tag: &str,
        load_against: Option<&Workload>,
    ) -> Result<Boot, BenchError> {
        let err = self.work.join(format!("runmh-restore-{tag}.err"));
        let stamps = self.work.join(format!("timings-{tag}.txt"));
        let _ = std::fs::remove_file(&stamps);
        let mut cmd = self.runmh_cmd();
        cmd.arg("restore")
            .arg("--images")
            .arg(images)
            .arg("--stop-timeout")
            .arg("1")
            .arg("--timings")
            .arg(&stamps);
        let t0_ns = crate::timings::now_ns();
        let t0 = Instant::now();
        let mut child = self.spawn("runmh restore", &mut cmd, &err)?;
        let r = wait_first_response("runmh restore", port, path, t0, self.timeout, || {
            child_alive(&mut child, &err)
        });
        let abs = std::path::absolute(images).unwrap_or_else(|_| images.to_path_buf());
        let mut root = None;
        let result = r.and_then(|(listen, first)| {
            let found = self.instance_of(|rec| rec.image.as_deref() == Some(abs.as_path()));
            root = found.as_ref().map(|(_, p)| *p);
            let log = found.as_ref().map(|(i, _)| i.dir.join("restore.log"));
            let criu_ms = log.as_deref().and_then(criu_log_span_ms);
            // The instance (and its log) goes with the service: keep a copy.
            if let Some(log) = &log {
                let _ = std::fs::copy(log, self.work.join(format!("restore-{tag}.log")));
            }
            if let Some(log) = &log {
                if self.kdat.is_some() && !criu_log_loaded_kdat(log) {
                    log::info!("this restore's CRIU probed the kernel (no kdat cache yet)");
                }
            }
            let rss = root.and_then(rss_mib);
            let (rps, twin_rps) = match load_against {
                Some(wl) if self.load_secs > 0 => self
                    .paired_load(wl, port, tag)
                    .map(|(a, b)| (Some(a), Some(b)))?,
                _ => (None, None),
            };
            Ok(Boot {
                first_response: first,
                listen,
                rss_mib: rss,
                rps,
                twin_rps,
                criu_ms,
                phases: None,
            })
        });
        self.take_down(&mut child, root);
        // After the take-down: the supervisor has written all its stamps.
        result.map(|mut b| {
            b.phases = Some(
                breakdown::Inputs {
                    t0_ns,
                    stamps: crate::timings::read(&stamps).unwrap_or_else(|e| {
                        log::warn!("{e}");
                        Vec::new()
                    }),
                    criu: breakdown::criu_marks(&self.work.join(format!("restore-{tag}.log"))),
                    listen_ms: ms(b.listen),
                    first_ms: ms(b.first_response),
                }
                .sample(),
            );
            b
        })
    }

    /// (e) bare `criu restore --restore-detached` of the same image, with
    /// runmh's CRIU command line otherwise → first response.
    pub fn bare_restore(
        &self,
        images: &Path,
        port: u16,
        path: &str,
        tag: &str,
    ) -> Result<Boot, BenchError> {
        let dir = self.work.join(format!("bare-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).map_err(|source| BenchError::Io {
            path: dir.clone(),
            source,
        })?;
        let md = Metadata::read(images)?;
        let kdat = self.kdat.as_ref().and_then(|k| k.load().ok().flatten());
        let (created_tx, log_created) = crossbeam_channel::bounded(1);
        let watched =
            crate::timings::watch_creation(&dir, "restore.log", self.timeout, move |ns| {
                let _ = created_tx.send(ns);
            })
            .is_ok();
        let t0_ns = crate::timings::now_ns();
        let t0 = Instant::now();
        let restored = bare::restore(
            &self.criu,
            images,
            &dir,
            &md,
            self.kdat.is_some(),
            kdat.as_deref(),
        );
        let root = match restored {
            Ok(root) => root,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let r = wait_first_response("bare criu restore", port, path, t0, self.timeout, || {
            if procfs::alive(Pid::from_raw(root)) {
                Ok(())
            } else {
                Err(format!("the restored process {root} is gone"))
            }
        });
        let log = dir.join("restore.log");
        let result = r.map(|(listen, first)| Boot {
            first_response: first,
            listen,
            rss_mib: rss_mib(root),
            criu_ms: criu_log_span_ms(&log),
            phases: Some(
                breakdown::Inputs {
                    t0_ns,
                    stamps: watched
                        .then(|| log_created.try_recv().ok())
                        .flatten()
                        .map(|ns| vec![(crate::timings::CRIU_LOG.to_string(), ns)])
                        .unwrap_or_default(),
                    criu: breakdown::criu_marks(&log),
                    listen_ms: ms(listen),
                    first_ms: ms(first),
                }
                .sample(),
            ),
            ..Default::default()
        });
        bare::kill_tree(root);
        let _ = std::fs::copy(
            dir.join("restore.log"),
            self.work.join(format!("restore-bare-{tag}.log")),
        );
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

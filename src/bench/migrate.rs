//! `mhctl bench --migrate`: live-migration downtime against a local
//! restore, side by side, for one workload (Django by default).
//!
//! Two hosts on this machine: network namespaces `mhb<pid>a`/`mhb<pid>b`
//! joined by a veth pair, with 192.0.2.1/24 and 192.0.2.2/24 (TEST-NET-1,
//! documentation only; the addresses exist only inside the two namespaces,
//! which the benchmark creates and deletes), each with its own miehistod.
//! The workload listens on 0.0.0.0:PORT, so its restored copy answers on
//! B's address. Each run, interleaved:
//! * **local restore**: `service start` on A (a restore of the prebaked
//!   image) → first good HTTP response on A's address;
//! * **migrate**: `service migrate` A → B (pages streamed by CRIU's page
//!   server) while a client in A's namespace polls both addresses; the
//!   downtime is that client's last good answer from A → its first good
//!   answer from B;
//! * **migrate --pre-dump 2**: measured when the kernel tracks dirty
//!   memory, else reported unavailable with CRIU's reason.
//!
//! The daemons talk over their UNIX sockets (both are local); the ssh
//! transport is what `mhctl --host` adds, outside the downtime window
//! except for the client's round trips, and is tested on its own.
//! Target: downtime ≤ 2 × the local restore's time to first response.

use super::workloads::Workload;
use super::{BenchArgs, BenchError};
use crate::criu::Criu;
use crate::daemon::api::{self, Reply, Request};
use crate::daemon::client::Client;
use crate::daemon::migrate::{self, MigrateRequest};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ADDR_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PORT: u16 = 8000;
const NAME: &str = "bench";

fn fail(what: impl Into<String>, detail: impl std::fmt::Display) -> BenchError {
    BenchError::NoResponse {
        what: what.into(),
        port: PORT,
        detail: detail.to_string(),
    }
}

fn run(cmd: &mut Command) -> Result<(), BenchError> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            what: what.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(
            what,
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

struct Host {
    netns: String,
    socket: PathBuf,
    state: PathBuf,
    daemon: Option<Child>,
}

impl Host {
    fn ns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
    fn client(&self) -> Client {
        Client::new(&self.socket)
    }
}

/// The two hosts; dropping them kills what runs in their namespaces and
/// deletes them.
struct Hosts {
    dir: PathBuf,
    a: Host,
    b: Host,
    inodes: Vec<u64>,
    keep: bool,
}

impl Hosts {
    fn new(criu: &Criu, keep: bool) -> Result<Hosts, BenchError> {
        let base = format!("mhb{}", std::process::id());
        // Short: runmh's control sockets under the state dirs must fit a
        // UNIX socket path.
        let dir = std::env::temp_dir().join(&base);
        let _ = std::fs::remove_dir_all(&dir);
        let host = |l: char| Host {
            netns: format!("{base}{l}"),
            socket: dir.join(format!("{l}.sock")),
            state: dir.join(l.to_string()),
            daemon: None,
        };
        let mut me = Hosts {
            a: host('a'),
            b: host('b'),
            dir: dir.clone(),
            inodes: Vec::new(),
            keep,
        };
        std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
            path: dir.clone(),
            source,
        })?;
        for h in [&me.a, &me.b] {
            run(Command::new("ip").args(["netns", "add", &h.netns]))?;
            if let Ok(m) = std::fs::metadata(h.ns_path()) {
                me.inodes.push(m.ino());
            }
        }
        run(Command::new("ip").args([
            "-n",
            &me.a.netns,
            "link",
            "add",
            &me.a.netns,
            "type",
            "veth",
            "peer",
            "name",
            &me.b.netns,
            "netns",
            &me.b.netns,
        ]))?;
        for (h, addr) in [(&me.a, ADDR_A), (&me.b, ADDR_B)] {
            run(Command::new("ip").args(["-n", &h.netns, "link", "set", "lo", "up"]))?;
            run(Command::new("ip").args([
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &h.netns,
            ]))?;
            run(Command::new("ip").args(["-n", &h.netns, "link", "set", &h.netns, "up"]))?;
        }
        let daemon = std::env::current_exe()
            .ok()
            .and_then(|e| {
                e.ancestors()
                    .skip(1)
                    .take(2)
                    .map(|d| d.join("miehistod"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| fail("miehistod", "no miehistod beside this program"))?;
        for h in [&mut me.a, &mut me.b] {
            let log =
                std::fs::File::create(dir.join(format!("{}.log", h.netns))).map_err(|source| {
                    BenchError::Io {
                        path: dir.clone(),
                        source,
                    }
                })?;
            let err = log.try_clone().map_err(|source| BenchError::Io {
                path: dir.clone(),
                source,
            })?;
            let child = Command::new("nsenter")
                .arg(format!("--net={}", h.ns_path().display()))
                .arg("--")
                .arg(&daemon)
                .arg("--socket")
                .arg(&h.socket)
                .arg("--state-dir")
                .arg(&h.state)
                .arg("--criu")
                .arg(&criu.path)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .map_err(|source| BenchError::Spawn {
                    what: "miehistod".into(),
                    source,
                })?;
            h.daemon = Some(child);
            let t0 = Instant::now();
            while h.client().call(&Request::Ping).is_err() {
                if t0.elapsed() > Duration::from_secs(20) {
                    return Err(fail("miehistod", "did not answer within 20 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(me)
    }

    fn ours(&self) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| self.inodes.contains(&m.ino()))
                    .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in [&mut self.a, &mut self.b] {
            if let Some(mut c) = h.daemon.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for _ in 0..50 {
            let left = self.ours();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = crate::sys::kill(nix::unistd::Pid::from_raw(pid), nix::libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for h in [&self.a, &self.b] {
            let _ = run(Command::new("ip").args(["netns", "del", &h.netns]));
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs `f` on a thread inside the network namespace at `ns`.
fn within<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BenchError> {
    let file = std::fs::File::open(ns).map_err(|source| BenchError::Io {
        path: ns.to_path_buf(),
        source,
    })?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| fail("setns", e))?;
        Ok(f())
    })
    .join()
    .map_err(|_| fail("namespace thread", "panicked"))?
}

/// One GET from the calling thread's namespace: true on a 200.
fn good(addr: Ipv4Addr, path: &str) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&SocketAddr::from((addr, PORT)), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    // Host: localhost, which the Django project allows (its ALLOWED_HOSTS).
    if write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

fn until_good(addr: Ipv4Addr, path: &str, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if good(addr, path) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn call(c: &Client, req: &Request, what: &str) -> Result<Reply, BenchError> {
    c.call(req).map_err(|e| fail(what, crate::error_chain(&e)))
}

/// One migration A → B with a client polling both addresses from A's
/// namespace; returns the client-observed downtime.
fn migrate_once(
    hosts: &Hosts,
    path: &'static str,
    pre_dump: u32,
) -> Result<Result<Duration, String>, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let poller = {
        let ns = hosts.a.ns_path();
        let file =
            std::fs::File::open(&ns).map_err(|source| BenchError::Io { path: ns, source })?;
        std::thread::spawn(move || -> Option<(Instant, Instant)> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let mut last_a = None;
            let t0 = Instant::now();
            // Stopped early only when the migration failed.
            while t0.elapsed() < Duration::from_secs(60) && !flag.load(Ordering::Relaxed) {
                if good(ADDR_A, path) {
                    last_a = Some(Instant::now());
                }
                if good(ADDR_B, path) {
                    return Some((last_a?, Instant::now()));
                }
            }
            None
        })
    };
    // Let the poller see A answer first.
    std::thread::sleep(Duration::from_millis(50));
    let src = hosts.a.socket.clone();
    let dst = hosts.b.socket.clone();
    let req = MigrateRequest {
        name: NAME.into(),
        pre_dump,
        address: ADDR_B.to_string(),
        probe: Some((PORT, path.into())),
        probe_timeout: Duration::from_secs(30),
    };
    let moved = within(&hosts.a.ns_path(), move || {
        migrate::migrate(&Client::new(&src), &Client::new(&dst), &req)
            .map_err(|e| crate::error_chain(&e))
    })?;
    if moved.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let seen = poller.join().ok().flatten();
    Ok(match (moved, seen) {
        (Err(e), _) => Err(e),
        (Ok(_), Some((a, b))) => Ok(b.saturating_duration_since(a)),
        (Ok(_), None) => Err("the client never saw A and then B answer".into()),
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// The `--migrate` benchmark; prints a table and PASS or MISS.
pub fn run_bench(args: &BenchArgs, criu: &Criu, w: &Workload) -> Result<i32, BenchError> {
    let hosts = Hosts::new(criu, args.keep)?;
    let a = hosts.a.client();
    let b = hosts.b.client();
    let argv: Vec<String> = w
        .command(PORT)
        .into_iter()
        .map(|x| x.replace("127.0.0.1:", "0.0.0.0:"))
        .chain(
            (w.name == "python")
                .then(|| ["--bind".to_string(), "0.0.0.0".to_string()])
                .into_iter()
                .flatten(),
        )
        .collect();
    call(
        &a,
        &Request::ServiceCreate(api::CreateService {
            name: NAME.into(),
            command: argv,
            env: vec![],
            cwd: w.cwd.clone(),
            backend: "auto".into(),
            stop_at: "listen".into(),
            force: false,
            on_demand: None,
            user: None,
        }),
        "service create",
    )?;
    call(
        &a,
        &Request::ServicePrebake(api::Named { name: NAME.into() }),
        "prebake",
    )?;
    let pre_dump_reason = crate::migrate::dirty_tracking(&criu.path, crate::migrate::run_plain)
        .err()
        .map(|e| e.to_string());
    let (mut local, mut moved, mut moved_pre) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = Vec::new();
    let path = w.path;
    for i in 0..(args.warmup + args.runs) {
        let counted = i >= args.warmup;
        for pre in [0u32, 2] {
            if pre > 0 && pre_dump_reason.is_some() {
                continue;
            }
            let t0 = Instant::now();
            call(
                &a,
                &Request::ServiceStart(api::StartService {
                    name: NAME.into(),
                    cold: false,
                }),
                "service start on A",
            )?;
            within(&hosts.a.ns_path(), move || {
                until_good(ADDR_A, path, Duration::from_secs(30))
            })?
            .ok_or_else(|| fail("the restored workload on A", "no answer within 30 s"))?;
            let restore = t0.elapsed();
            let r = migrate_once(&hosts, path, pre)?;
            // Back to the start: nothing on B, A stopped.
            let _ = b.call(&Request::ServiceStop(api::Named { name: NAME.into() }));
            let _ = b.call(&Request::ServiceDelete(api::Named { name: NAME.into() }));
            let _ = a.call(&Request::ServiceStop(api::Named { name: NAME.into() }));
            if !counted {
                continue;
            }
            match r {
                Ok(d) => {
                    let ms = d.as_secs_f64() * 1e3;
                    if pre == 0 {
                        local.push(restore.as_secs_f64() * 1e3);
                        moved.push(ms);
                    } else {
                        moved_pre.push(ms);
                    }
                }
                Err(e) => errors.push(format!(
                    "run {}{}: {e}",
                    i + 1,
                    if pre > 0 { " (--pre-dump 2)" } else { "" }
                )),
            }
        }
    }
    let row = |label: &str, v: &mut Vec<f64>| match (median(v), v.first(), v.last()) {
        (Some(m), Some(lo), Some(hi)) => {
            println!(
                "  {label:<44} {m:>8.1} ms  [{lo:.1} – {hi:.1}]  n={}",
                v.len()
            )
        }
        _ => println!("  {label:<44} {:>8}", "-"),
    };
    println!(
        "migration downtime: {} ({}), {} runs (+{} warm-up), median [min – max]",
        w.name, w.about, args.runs, args.warmup
    );
    row("local restore → first response (on A)", &mut local);
    row("migrate A → B: last answer on A → first on B", &mut moved);
    match &pre_dump_reason {
        Some(why) => println!("  {:<44} unavailable: {why}", "migrate --pre-dump 2"),
        None => row("migrate --pre-dump 2", &mut moved_pre),
    }
    for e in &errors {
        println!("  error: {e}");
    }
    let verdict = match (median(&mut local), median(&mut moved)) {
        (Some(l), Some(m)) => {
            let ratio = m / l;
            let pass = m <= 2.0 * l;
            println!(
                "target: migration downtime ≤ 2 × local restore: {m:.1} ms vs {:.1} ms (ratio {ratio:.2} of the local restore) → {}",
                2.0 * l,
                if pass { "PASS" } else { "MISS" }
            );
            pass
        }
        _ => {
            println!("target: migration downtime ≤ 2 × local restore → MISS (no complete run)");
            false
        }
    };
    drop(hosts);
    Ok(if verdict && errors.is_empty() { 0 } else { 1 })
}

//! `mhctl bench --on-demand`: what a client at zero waits for, side by side
//! with the ways of starting the same server by hand.
//!
//! Per workload, a miehistod of the benchmark's own (scratch state dir,
//! loopback only) holds two on-demand services of the workload, prebaked
//! by it with the TRACE backend: `od` (plain: nothing runs at zero) and
//! `sb` (`--standby`: one restored instance held at its stop point). Both
//! have a one-second idle timeout, so each goes back to zero (or to a
//! fresh standby) between measurements. Each run, interleaved:
//! * cold boot under `runmh run`, `runmh restore` of a TRACE image, and a
//!   bare `criu restore -d` of a NOTIFY image → first response, as the
//!   main benchmark measures them ([`super::measure`]);
//! * on-demand at zero: one client connects to `od`'s port and sends a GET
//!   while nothing runs → its 200 (median and p95 over the runs), and the
//!   daemon's own account of that activation (queued connection → the
//!   service listening, of which its restore step);
//! * `--standby`: the same against `sb`, and the standby's RSS before it;
//! * a burst of 50 concurrent clients at `od`'s zero: how many got no 200
//!   (and why), and when the last one got its 200.
//!
//! Every measurement starts with the daemon quiet (`od` at zero, `sb`
//! held), so none overlaps a restore or a stop of the daemon's own. The
//! times are from the client's side: connect → the whole 200.

use super::breakdown;
use super::measure::{millis, Ctx};
use super::report::{self, Kind, WorkloadReport};
use super::workloads::Workload;
use super::BenchError;
use crate::daemon::api::{self, OnDemandState, Reply, Request, ServiceInfo};
use crate::daemon::client::Client;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Concurrent clients of the burst at zero.
pub const BURST: usize = 50;
const OD: &str = "od";
const SB: &str = "sb";

fn fail(what: impl Into<String>, port: u16, detail: impl std::fmt::Display) -> BenchError {
    BenchError::NoResponse {
        what: what.into(),
        port,
        detail: detail.to_string(),
    }
}

/// The benchmark's own daemon; dropping it ends the daemon and every
/// service it started (their records are under its state dir).
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    keep: bool,
}

impl Daemon {
    fn start(ctx: &Ctx, keep: bool) -> Result<Daemon, BenchError> {
        // Short: runmh's control sockets under the state dir must fit a
        // UNIX socket path.
        let dir = std::env::temp_dir().join(format!("mho{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
            path: dir.clone(),
            source,
        })?;
        let exe = ctx
            .runmh
            .parent()
            .map(|d| d.join("miehistod"))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                fail(
                    "miehistod",
                    0,
                    format!("no miehistod beside {}", ctx.runmh.display()),
                )
            })?;
        let log_path = dir.join("miehistod.log");
        let io = |source| BenchError::Io {
            path: log_path.clone(),
            source,
        };
        let log = std::fs::File::create(&log_path).map_err(io)?;
        let err = log.try_clone().map_err(io)?;
        let socket = dir.join("d.sock");
        let child = Command::new(&exe)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("s"))
            .arg("--runmh")
            .arg(&ctx.runmh)
            .arg("--criu")
            .arg(&ctx.criu.path)
            .arg("--stop-timeout=1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                what: exe.display().to_string(),
                source,
            })?;
        let me = Daemon {
            dir,
            socket,
            child: Some(child),
            keep,
        };
        let t0 = Instant::now();
        while me.client().call(&Request::Ping).is_err() {
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(fail(
                    "miehistod",
                    0,
                    format!(
                        "did not answer within 20 s: {}",
                        super::measure::last_lines(&log_path, 2)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    fn call(&self, req: &Request, what: &str) -> Result<Reply, BenchError> {
        self.client()
            .call(req)
            .map_err(|e| fail(what, 0, crate::error_chain(&e)))
    }

    fn info(&self, name: &str) -> Result<ServiceInfo, BenchError> {
        match self.call(&Request::ServiceList, "service list")? {
            Reply::Services { services } => services
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| fail("service list", 0, format!("no service {name}"))),
            other => Err(fail(
                "service list",
                0,
                format!("unexpected reply {other:?}"),
            )),
        }
    }

    /// Waits until `name` is in on-demand state `want` (waiting: with no
    /// process left; standby: the instance held).
    fn wait(
        &self,
        name: &str,
        want: OnDemandState,
        timeout: Duration,
    ) -> Result<ServiceInfo, BenchError> {
        let t0 = Instant::now();
        loop {
            let info = self.info(name)?;
            let state = info.on_demand.as_ref().map(|o| o.state);
            let settled = match want {
                OnDemandState::Waiting => info.pid.is_none(),
                OnDemandState::Standby => info.state == api::ServiceState::Standby,
                _ => true,
            };
            if state == Some(want) && settled {
                return Ok(info);
            }
            if t0.elapsed() > timeout {
                return Err(fail(
                    format!("on-demand service {name}"),
                    0,
                    format!(
                        "not {} after {} s (it is {})",
                        want.as_str(),
                        timeout.as_secs(),
                        state.map(OnDemandState::as_str).unwrap_or("not on-demand")
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn create(
        &self,
        name: &str,
        wl: &Workload,
        port: u16,
        standby: bool,
    ) -> Result<(), BenchError> {
        self.call(
            &Request::ServiceCreate(api::CreateService {
                name: name.into(),
                command: wl.command(port),
                env: Vec::new(),
                cwd: wl.cwd.clone(),
                backend: "trace".into(),
                stop_at: api::default_stop_at(),
                force: false,
                on_demand: Some(api::OnDemandConfig {
                    idle_timeout_secs: 1,
                    standby,
                    listen: Vec::new(),
                }),
                user: None,
            }),
            "service create",
        )?;
        self.call(
            &Request::ServicePrebake(api::Named { name: name.into() }),
            &format!("service prebake {name}"),
        )?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The services outlive a daemon by design: end them here.
        let runmh_state = self.dir.join("s").join("runmh");
        for _ in 0..50 {
            let pids: Vec<i32> = crate::instance::Instance::list(&runmh_state)
                .into_iter()
                .flat_map(|(_, r)| [r.root_pid, r.supervisor_pid])
                .filter(|&p| p > 0 && crate::sys::procfs::alive(nix::unistd::Pid::from_raw(p)))
                .collect();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                let _ = crate::sys::kill(nix::unistd::Pid::from_raw(p), nix::libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // A SIGKILLed supervisor cannot remove its instance's cgroup: the
        // benchmark does, else every run leaves empty cgroups behind.
        for (inst, _) in crate::instance::Instance::list(&runmh_state) {
            if let Some(cg) = crate::sandbox::cgroup::InstanceCgroup::existing(&inst.id) {
                if let Err(e) = cg.destroy() {
                    log::warn!("cgroup of the benchmark's instance {}: {e}", inst.id);
                }
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One client: connect, GET, read the whole answer; the time to its end
/// when it was a 200.
fn one_get(port: u16, path: &str, timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = super::measure::connect_from(super::measure::probe_source(), port, timeout)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
    match head.split_whitespace().nth(1) {
        Some("200") => Ok(t0.elapsed()),
        Some(code) => Err(format!("HTTP status {code}")),
        None => Err("closed without an answer".into()),
    }
}

/// What a burst at zero gave.
struct Burst {
    /// Clients without a 200.
    lost: usize,
    /// Release of the clients → the last 200.
    last: Option<Duration>,
    /// Why clients were lost: each distinct error with its count.
    why: Vec<(String, usize)>,
}

/// `n` clients at once. They are released together by a barrier (the
/// threads take longer to start than the daemon takes to see the first
/// connection), so the burst is in the daemon's queue when it activates.
fn burst(n: usize, port: u16, path: &'static str, timeout: Duration) -> Burst {
    let gate = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait();
                one_get(port, path, timeout)
            })
        })
        .collect();
    let mut out = Burst {
        lost: 0,
        last: None,
        why: Vec::new(),
    };
    for t in threads {
        let r = t
            .join()
            .unwrap_or_else(|_| Err("the client thread panicked".into()));
        match r {
            Ok(d) => out.last = Some(out.last.map_or(d, |l| l.max(d))),
            Err(e) => {
                out.lost += 1;
                match out.why.iter_mut().find(|(w, _)| *w == e) {
                    Some((_, c)) => *c += 1,
                    None => out.why.push((e, 1)),
                }
            }
        }
    }
    out
}

/// The series of an on-demand report, in table order.
pub const KINDS: &[Kind] = &[
    report::COLD_RUNMH,
    report::RESTORE_TRACE,
    report::BARE,
    report::OD_ZERO,
    report::OD_ZERO_ACTIVATION,
    report::OD_ZERO_RESTORE,
    report::OD_STANDBY,
    report::OD_STANDBY_ACTIVATION,
    report::OD_STANDBY_RSS,
    report::OD_LOST,
    report::OD_BURST_LAST,
];

/// The images the side-by-side restores use.
pub struct Images {
    pub trace: PathBuf,
    pub notify: PathBuf,
}

/// Everything one workload needs across runs: its daemon and services.
pub struct Setup {
    daemon: Daemon,
    od_port: u16,
    sb_port: u16,
    images: Images,
}

/// Prebakes the images and makes the daemon's two services.
pub fn setup(ctx: &Ctx, wl: &Workload, port: u16, keep: bool) -> Result<Setup, BenchError> {
    let dir = ctx.work.join("images");
    let images = Images {
        trace: dir.join(format!("{}-trace", wl.name)),
        notify: dir.join(format!("{}-notify", wl.name)),
    };
    ctx.prebake(wl, port, "trace", &images.trace, wl.name)?;
    ctx.prebake(wl, port, "notify", &images.notify, wl.name)?;
    let daemon = Daemon::start(ctx, keep)?;
    let (od_port, sb_port) = (super::free_port()?, super::free_port()?);
    daemon.create(OD, wl, od_port, false)?;
    daemon.create(SB, wl, sb_port, true)?;
    Ok(Setup {
        daemon,
        od_port,
        sb_port,
        images,
    })
}

/// How one activation went, as the daemon saw it.
struct Activation {
    /// First queued connection → the service listening (`service stats`).
    latency_ms: Option<f64>,
    /// Of which the restore step (its log line), when the daemon logged it.
    restore_ms: Option<f64>,
}

impl Setup {
    /// Waits until the daemon is quiet: `od` at zero with no process and
    /// `sb` held at standby. Every measurement starts from there, so none
    /// of them shares the two cores with a restore or a stop of the
    /// daemon's own (each service goes idle a second after its client).
    fn settle(&self, timeout: Duration) -> Result<(), BenchError> {
        self.daemon.wait(OD, OnDemandState::Waiting, timeout)?;
        self.daemon.wait(SB, OnDemandState::Standby, timeout)?;
        Ok(())
    }

    fn activations(&self, name: &str) -> Result<u64, BenchError> {
        self.daemon
            .info(name)?
            .on_demand
            .map(|o| o.activations)
            .ok_or_else(|| fail(format!("service {name}"), 0, "it is not on-demand"))
    }

    /// The daemon's record of the activation that followed `before`
    /// activations. The client may read its 200 a moment before the
    /// daemon has counted the hand-over, hence the short wait.
    fn activation(&self, name: &str, before: u64) -> Result<Activation, BenchError> {
        let t0 = Instant::now();
        loop {
            let od = self.daemon.info(name)?.on_demand;
            if let Some(od) = od.filter(|o| o.activations > before) {
                if od.activations != before + 1 {
                    return Err(fail(
                        format!("on-demand service {name}"),
                        0,
                        format!(
                            "{} activations where one was expected: a client the benchmark did not send reached it",
                            od.activations - before
                        ),
                    ));
                }
                return Ok(Activation {
                    latency_ms: od.last_activation_ms,
                    restore_ms: self.logged_step_ms(name, od.activations),
                });
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(fail(
                    format!("on-demand service {name}"),
                    0,
                    "answered, but the daemon counted no activation within 5 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The restore (or resume) step of the `nth` activation of `name`,
    /// from the daemon's log line "NAME: activated in X ms (...; STEP
    /// took Y ms, ...)". The API gives the whole latency only; the split
    /// shows whether the time goes to runmh or to the wait for listen().
    /// None (the row stays unmeasured) when the line is not there in that
    /// form or the count does not match.
    fn logged_step_ms(&self, name: &str, nth: u64) -> Option<f64> {
        let log = std::fs::read_to_string(daemon_log(self)).ok()?;
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!(" {name}: activated in ")))
            .collect();
        if lines.len() as u64 != nth {
            return None;
        }
        let line = lines.last()?;
        let rest = &line[line.find(" took ")? + " took ".len()..];
        rest.split(" ms").next()?.trim().parse().ok()
    }
}

/// One run of every measurement (`count`: recorded, not a warm-up).
pub fn one_run(
    ctx: &Ctx,
    s: &Setup,
    wl: &Workload,
    port: u16,
    run: u32,
    rep: &mut WorkloadReport,
    count: bool,
) -> Result<(), BenchError> {
    let push = |rep: &mut WorkloadReport, k: Kind, v: Option<f64>| {
        if count {
            rep.push(k, v)
        }
    };
    let settle = ctx.timeout.max(Duration::from_secs(30));
    let tag = format!("od-{}-{run}", wl.name);

    // The ways of starting the server by hand, side by side.
    s.settle(settle)?;
    let cold = ctx.cold_runmh(wl, port, &tag)?;
    push(rep, report::COLD_RUNMH, Some(millis(cold.first_response)));
    let r = ctx.runmh_restore(&s.images.trace, port, wl.path, &tag, None)?;
    push(rep, report::RESTORE_TRACE, Some(millis(r.first_response)));
    let b = ctx.bare_restore(&s.images.notify, port, wl.path, &tag)?;
    push(rep, report::BARE, Some(millis(b.first_response)));
    // Their phases, as in the main benchmark: what the restore itself
    // costs under this run's load, to hold the activation's parts against.
    if count {
        for (v, boot) in [
            (breakdown::Variant::RunmhTrace, &r),
            (breakdown::Variant::Bare, &b),
        ] {
            if let Some(p) = &boot.phases {
                rep.breakdown.push(v, p);
            }
        }
    }

    // On-demand at zero: nothing of `od` runs.
    s.settle(settle)?;
    let before = s.activations(OD)?;
    let t = one_get(s.od_port, wl.path, ctx.timeout)
        .map_err(|e| fail("on-demand at zero", s.od_port, e))?;
    push(rep, report::OD_ZERO, Some(millis(t)));
    let a = s.activation(OD, before)?;
    push(rep, report::OD_ZERO_ACTIVATION, a.latency_ms);
    push(rep, report::OD_ZERO_RESTORE, a.restore_ms);

    // `--standby`: the held instance is only resumed.
    s.settle(settle)?;
    let rss = s
        .daemon
        .info(SB)?
        .on_demand
        .and_then(|o| o.standby_rss_kib)
        .map(|k| k as f64 / 1024.0);
    let before = s.activations(SB)?;
    let t = one_get(s.sb_port, wl.path, ctx.timeout)
        .map_err(|e| fail("on-demand --standby", s.sb_port, e))?;
    push(rep, report::OD_STANDBY, Some(millis(t)));
    push(rep, report::OD_STANDBY_RSS, rss);
    let a = s.activation(SB, before)?;
    push(rep, report::OD_STANDBY_ACTIVATION, a.latency_ms);

    // A burst at zero.
    s.settle(settle)?;
    let b = burst(BURST, s.od_port, wl.path, ctx.timeout);
    push(rep, report::OD_LOST, Some(b.lost as f64));
    push(rep, report::OD_BURST_LAST, b.last.map(millis));
    for (why, n) in &b.why {
        let note = format!(
            "{} run {run}: {n} of {BURST} burst clients lost: {why}",
            if count { "counted" } else { "warm-up" }
        );
        eprintln!("bench: {}: {note}", wl.name);
        rep.notes.push(note);
    }
    Ok(())
}

/// Where the benchmark's daemon logs (for an error message).
pub fn daemon_log(s: &Setup) -> PathBuf {
    s.daemon.dir.join("miehistod.log")
}

//! On-demand services: the daemon owns the service's port while no process
//! of it runs, restores the newest generation on the first connection, and
//! stops the service again after `idle_timeout_secs` without an open client
//! connection.
//!
//! One controller thread per on-demand service runs the cycle
//! waiting → activating → running → (idle) → waiting. The hand-over of the
//! clients that came while nothing ran is the kernel's, not a proxy's: see
//! [`crate::sockets`] (the waiting listener and the restored service's
//! socket share one reuseport group with migration on; when the daemon
//! closes its listener the queued connections move to the service's).
//!
//! * A failed activation (a restore error) answers the waiting clients by
//!   closing them, logs runmh's error line (which carries CRIU's decisive
//!   one), keeps the image, and retries on a later connection after a
//!   backoff (1 s, doubling, at most 60 s); connections inside the backoff
//!   are closed at once.
//! * Going back to zero: the daemon first listens beside the running
//!   service, which from then on gets no new client (they queue at the
//!   daemon), waits until the service's own connections are done, then
//!   stops it; connections still queued on the service's socket migrate to
//!   the daemon's when it closes. A client that comes meanwhile keeps the
//!   service running.
//! * While an image is made (`prebake`, or a cold `start`) the port is
//!   released: the booting service binds it itself.
//! * A daemon restart keeps a running service running (it is taken back and
//!   its idle time counted again) and re-arms a waiting one.

use super::api::{OnDemandConfig, OnDemandInfo, OnDemandState, OnDemandStats};
use super::service::{Caller, RestoreAs, ServiceError, Services};
use crate::sockets::{self, WaitingListener};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often a controller looks at its service.
const TICK: Duration = Duration::from_millis(100);
/// How long the service may take to finish its open connections once the
/// daemon has taken its port back, before going to zero is given up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// Time for a handshake already routed to the service's listener to show.
const STEER_SETTLE: Duration = Duration::from_millis(5);
/// Every how many polls an activation also scans the service's TCP table.
const SCAN_EVERY: u32 = 50;
/// How long a restored service may take to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Activation latencies kept for `service stats`.
const KEEP_LATENCIES: usize = 1000;

/// How an activation gets a running service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// Restore the newest generation.
    Restore,
    /// Resume the standby instance held at its stop point.
    Resume,
}

impl Activation {
    fn describe(self) -> &'static str {
        match self {
            Activation::Restore => "restoring the newest generation",
            Activation::Resume => "resuming the standby instance",
        }
    }
}

fn in_backoff(slot: &Slot) -> bool {
    lock(&slot.inner)
        .backoff_until
        .is_some_and(|t| Instant::now() < t)
}

/// Activation latency histogram bounds (ms) for the metrics endpoint.
pub const LATENCY_BUCKETS_MS: &[f64] =
    &[10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 5000.0];

#[derive(Default)]
struct Inner {
    state: Option<OnDemandState>,
    listeners: Vec<WaitingListener>,
    /// Addresses the listeners are open on (also while paused).
    addrs: Vec<SocketAddr>,
    paused: u32,
    activations: u64,
    failures: u64,
    refused: u64,
    restores: u64,
    latencies: VecDeque<f64>,
    last_failure: Option<String>,
    backoff: Duration,
    backoff_until: Option<Instant>,
}

struct Slot {
    inner: Mutex<Inner>,
    stop: AtomicBool,
}

/// One service's counters for the metrics: name, activations, failures,
/// restores, refused connections, latencies, state.
type Snapshot = (String, u64, u64, u64, u64, Vec<f64>, String);
/// A metric family of per-service counters: name, help, the value.
type CounterFamily = (&'static str, &'static str, fn(&Snapshot) -> u64);

/// The on-demand controllers of one daemon.
#[derive(Default)]
pub struct OnDemand {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases the port while an image is being made; re-armed on drop.
pub struct Pause {
    slot: Option<Arc<Slot>>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        if let Some(s) = &self.slot {
            let mut i = lock(&s.inner);
            i.paused = i.paused.saturating_sub(1);
        }
    }
}

fn percentile(sorted: &[f64], p: usize) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank: the smallest value with at least p % of the values at
    // or below it (integer arithmetic, p in whole percent).
    let n = sorted.len();
    let rank = (p * n).div_ceil(100).max(1);
    sorted.get(rank.min(n) - 1).copied()
}

impl OnDemand {
    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        lock(&self.slots).get(name).cloned()
    }

    /// Releases `name`'s port until the guard is dropped (a prebake or a
    /// cold start binds it itself).
    pub fn pause(&self, name: &str) -> Pause {
        let slot = self.slot(name);
        if let Some(s) = &slot {
            let mut i = lock(&s.inner);
            i.paused += 1;
            i.listeners.clear();
            i.state = Some(OnDemandState::Paused);
        }
        Pause { slot }
    }

    /// What `service list` shows.
    pub fn info(&self, name: &str, cfg: &OnDemandConfig) -> OnDemandInfo {
        let slot = self.slot(name);
        let empty = Inner::default();
        let guard = slot.as_ref().map(|s| lock(&s.inner));
        let i = guard.as_deref().unwrap_or(&empty);
        OnDemandInfo {
            state: i.state.unwrap_or(OnDemandState::NoImage),
            idle_timeout_secs: cfg.idle_timeout_secs,
            standby: cfg.standby,
            listen: if i.addrs.is_empty() {
                cfg.listen.clone()
            } else {
                i.addrs.clone()
            },
            activations: i.activations,
            failures: i.failures,
            last_activation_ms: i.latencies.back().copied(),
            last_failure: i.last_failure.clone(),
            refused_connections: i.refused,
            standby_rss_kib: None,
        }
    }

    /// What `service stats` shows.
    pub fn stats(&self, name: &str, cfg: &OnDemandConfig) -> OnDemandStats {
        let info = self.info(name, cfg);
        let latencies: Vec<f64> = self
            .slot(name)
            .map(|s| lock(&s.inner).latencies.iter().copied().collect())
            .unwrap_or_default();
        let mut sorted = latencies.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        OnDemandStats {
            name: name.to_string(),
            info,
            median_ms: percentile(&sorted, 50),
            p95_ms: percentile(&sorted, 95),
            max_ms: sorted.last().copied(),
            latencies_ms: latencies,
        }
    }

    /// Prometheus text for every on-demand service.
    pub fn metrics(&self, services: &Services) -> String {
        let mut names: Vec<String> = lock(&self.slots).keys().cloned().collect();
        names.sort();
        let mut out = String::new();
        let mut fam = |name: &str, kind: &str, help: &str, rows: &mut dyn FnMut(&mut String)| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            rows(&mut out);
        };
        let snap: Vec<Snapshot> = names
            .iter()
            .filter_map(|n| {
                let s = self.slot(n)?;
                let i = lock(&s.inner);
                Some((
                    n.clone(),
                    i.activations,
                    i.failures,
                    i.restores,
                    i.refused,
                    i.latencies.iter().copied().collect(),
                    i.state
                        .unwrap_or(OnDemandState::NoImage)
                        .as_str()
                        .to_string(),
                ))
            })
            .collect();
        let _ = services;
        // The per-service counters, one family each.
        let counters: [CounterFamily; 4] = [
            (
                "miehisto_ondemand_activations_total",
                "Activations on a first connection that ended with the service listening.",
                |s| s.1,
            ),
            (
                "miehisto_ondemand_activation_failures_total",
                "Activations whose restore failed (the waiting clients were closed).",
                |s| s.2,
            ),
            (
                "miehisto_ondemand_restores_total",
                "Restores started by on-demand activation.",
                |s| s.3,
            ),
            (
                "miehisto_ondemand_refused_connections_total",
                "Client connections closed unserved after a failed activation.",
                |s| s.4,
            ),
        ];
        for (name, help, value) in counters {
            fam(name, "counter", help, &mut |o| {
                for s in &snap {
                    o.push_str(&format!("{name}{{service=\"{}\"}} {}\n", s.0, value(s)));
                }
            });
        }
        fam(
            "miehisto_ondemand_state",
            "gauge",
            "1 for the on-demand state the service is in.",
            &mut |o| {
                for s in &snap {
                    o.push_str(&format!(
                        "miehisto_ondemand_state{{service=\"{}\",state=\"{}\"}} 1\n",
                        s.0, s.6
                    ));
                }
            },
        );
        fam(
            "miehisto_ondemand_activation_seconds",
            "histogram",
            "First queued connection to the restored service listening (last 1000 activations).",
            &mut |o| {
                for s in &snap {
                    for b in LATENCY_BUCKETS_MS {
                        let n = s.5.iter().filter(|&&l| l <= *b).count();
                        o.push_str(&format!(
                            "miehisto_ondemand_activation_seconds_bucket{{service=\"{}\",le=\"{}\"}} {n}\n",
                            s.0,
                            b / 1000.0
                        ));
                    }
                    o.push_str(&format!(
                        "miehisto_ondemand_activation_seconds_bucket{{service=\"{}\",le=\"+Inf\"}} {}\n",
                        s.0,
                        s.5.len()
                    ));
                    let sum: f64 = s.5.iter().sum::<f64>() / 1000.0;
                    o.push_str(&format!(
                        "miehisto_ondemand_activation_seconds_sum{{service=\"{}\"}} {sum}\n",
                        s.0
                    ));
                    o.push_str(&format!(
                        "miehisto_ondemand_activation_seconds_count{{service=\"{}\"}} {}\n",
                        s.0,
                        s.5.len()
                    ));
                }
            },
        );
        out
    }
}

/// The TCP sockets the newest image recorded at its stop point, read once
/// for everything the controller derives from them.
struct ImageSockets {
    bound: Vec<crate::sockets::BoundSocket>,
    /// Host pid of the dumped root: which of `bound` the root held.
    dumped_pid: i32,
}

/// The newest generation's sockets, read even when the image is damaged:
/// clients still wait on its address and see the activation fail.
fn image_sockets(services: &Services, name: &str) -> Result<ImageSockets, OnDemandState> {
    let Some(gen) = services.store().generations(name).last().copied() else {
        return Err(OnDemandState::NoImage);
    };
    let file = services
        .store()
        .generation_path(name, gen)
        .join(crate::images::metadata::FILE_NAME);
    let md = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::images::Metadata>(&b).ok())
        .ok_or(OnDemandState::NoImage)?;
    Ok(ImageSockets {
        bound: md.stop.into_iter().flat_map(|s| s.bound).collect(),
        dumped_pid: md.dumped_pid,
    })
}

impl ImageSockets {
    /// The sockets held with SO_REUSEPORT: bound at the stop point (the
    /// usual stop, before `listen`), or already listening (a stop at a
    /// later call: a server's second socket). Those are the only addresses
    /// the daemon can wait on and hand over: the restored service
    /// re-creates each of them beside the daemon's listener, in its
    /// reuseport group.
    fn reuseport_addrs(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = Vec::new();
        for b in &self.bound {
            if b.reuseport && !v.contains(&b.addr) {
                v.push(b.addr);
            }
        }
        v
    }

    /// The addresses an on-demand service answers on while at zero: the
    /// image's [`Self::reuseport_addrs`], or, with `--listen`, those of
    /// them it names (a server with several sockets that only some should
    /// wake).
    fn addresses(&self, cfg: &OnDemandConfig) -> Result<Vec<SocketAddr>, OnDemandState> {
        let img = self.reuseport_addrs();
        let v = if cfg.listen.is_empty() {
            img
        } else if cfg.listen.iter().all(|a| img.contains(a)) {
            cfg.listen.clone()
        } else {
            // A newer image moved the socket: waiting on the old address
            // would make the restored service's bind collide with our
            // listener.
            return Err(OnDemandState::NoAddress);
        };
        if v.is_empty() {
            return Err(OnDemandState::NoAddress);
        }
        Ok(v)
    }

    /// Whether the daemon's listener on `addr` is to be IPv6-only: unless
    /// the image's socket there is dual-stack (`IPV6_V6ONLY` off), when it
    /// must take IPv4 clients too.
    fn v6only(&self, addr: SocketAddr) -> bool {
        !self
            .bound
            .iter()
            .any(|b| b.addr == addr && b.v6only == Some(false))
    }

    /// The sockets the root process held, by address: the restored root
    /// has each at the same fd number (CRIU restores fds as they were), so
    /// whether it listens can be asked of that fd.
    fn root_fds(&self) -> HashMap<SocketAddr, i32> {
        self.bound
            .iter()
            .filter(|b| b.pid == self.dumped_pid)
            .map(|b| (b.addr, b.fd))
            .collect()
    }
}

/// [`ImageSockets::addresses`] of the newest image, with the image.
fn addresses(
    services: &Services,
    name: &str,
    cfg: &OnDemandConfig,
) -> Result<(Vec<SocketAddr>, ImageSockets), OnDemandState> {
    let img = image_sockets(services, name)?;
    Ok((img.addresses(cfg)?, img))
}

/// Opens the daemon's listeners on `addrs` in place of any it holds; an
/// address that cannot be opened is logged and left out.
fn open_listeners(name: &str, i: &mut Inner, addrs: &[SocketAddr], img: &ImageSockets) {
    i.listeners.clear();
    i.addrs = addrs.to_vec();
    for &a in addrs {
        match WaitingListener::open(a, img.v6only(a)) {
            Ok(l) => i.listeners.push(l),
            Err(e) => log::warn!("{name}: {}", crate::error_chain(&e)),
        }
    }
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a service cannot be on-demand with its newest image, if it cannot.
pub fn check_image(services: &Services, name: &str, cfg: &OnDemandConfig) -> Result<(), String> {
    let img = match image_sockets(services, name) {
        Ok(img) => img.reuseport_addrs(),
        // Checked again once there is one (state `no_address`).
        Err(_) => return Ok(()),
    };
    if img.is_empty() {
        return Err(format!(
            "{name}'s newest image holds no TCP socket bound with SO_REUSEPORT at its stop point, so there is no address to wait on; prebake it again with on-demand set (`mhctl service prebake {name}`)"
        ));
    }
    match cfg.listen.iter().find(|a| !img.contains(a)) {
        Some(a) => Err(format!(
            "--listen {a}: {name}'s newest image holds no socket on {a} (it holds {}); the restored service would bind {a} itself and collide with the daemon's listener, so name only addresses the image holds, or leave --listen out to serve them all",
            list(&img)
        )),
        None => Ok(()),
    }
}

impl Services {
    /// Starts the controller of an on-demand service (once).
    pub fn arm(self: &Arc<Self>, name: &str) {
        let slot = {
            let mut slots = lock(&self.ondemand.slots);
            if slots.contains_key(name) {
                return;
            }
            let s = Arc::new(Slot {
                inner: Mutex::new(Inner {
                    backoff: BACKOFF_FIRST,
                    ..Inner::default()
                }),
                stop: AtomicBool::new(false),
            });
            slots.insert(name.to_string(), Arc::clone(&s));
            s
        };
        let me = Arc::clone(self);
        let n = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("ondemand-{name}"))
            .spawn(move || {
                me.control(&n, &slot);
                let mut slots = lock(&me.ondemand.slots);
                if slots.get(&n).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    slots.remove(&n);
                }
            });
        if let Err(e) = spawned {
            log::warn!("{name}: cannot start the on-demand controller: {e}");
            lock(&self.ondemand.slots).remove(name);
        }
    }

    /// Stops the controller (the service was deleted or made manual).
    pub fn disarm(&self, name: &str) {
        if let Some(s) = lock(&self.ondemand.slots).remove(name) {
            s.stop.store(true, Ordering::SeqCst);
            lock(&s.inner).listeners.clear();
        }
    }

    /// Arms every on-demand service (daemon start).
    pub fn arm_all(self: &Arc<Self>) {
        for name in self.names(Caller::Root) {
            if self.on_demand_config(&name).is_some() {
                self.arm(&name);
            }
        }
    }

    /// Prometheus text of the on-demand services.
    pub fn ondemand_metrics(&self) -> String {
        self.ondemand.metrics(self)
    }

    pub fn on_demand_config(&self, name: &str) -> Option<OnDemandConfig> {
        self.service_config(name).ok().and_then(|c| c.on_demand)
    }

    /// `service.set`: turns on-demand on (or changes it) or off.
    pub fn set_on_demand(
        self: &Arc<Self>,
        name: &str,
        od: Option<OnDemandConfig>,
        who: Caller,
    ) -> Result<super::api::ServiceInfo, ServiceError> {
        {
            let _g = self.begin(name, super::api::Operation::Set)?;
            self.owned(name, who)?;
            if let Some(c) = &od {
                validate(c)?;
                self.check_listen(who, Some(c))?;
                if let Err(why) = check_image(self, name, c) {
                    return Err(ServiceError::BadSpec(why));
                }
            }
            self.set_config(name, |cfg| cfg.on_demand = od.clone())?;
        }
        self.disarm(name);
        match &od {
            Some(_) => self.arm(name),
            // Made manual: its standby instance was the controller's.
            None => {
                if self.live(name).is_some_and(|l| l.is_standby()) {
                    self.stop(name, Caller::Root)?;
                }
            }
        }
        self.info(name)
    }

    pub fn on_demand_stats(&self, name: &str, who: Caller) -> Result<OnDemandStats, ServiceError> {
        let cfg = self.owned(name, who)?.config;
        let od = cfg.on_demand.ok_or_else(|| {
            ServiceError::BadSpec(format!(
                "{name} is not on-demand; make it so with `mhctl service set {name} --on-demand`"
            ))
        })?;
        let mut st = self.ondemand.stats(name, &od);
        st.info.standby_rss_kib = self.live(name).filter(|l| l.is_standby()).and_then(|l| {
            crate::sys::procfs::tree_rss_kib(nix::unistd::Pid::from_raw(l.record.root_pid))
        });
        Ok(st)
    }

    fn control(self: &Arc<Self>, name: &str, slot: &Arc<Slot>) {
        let set = |st: OnDemandState| lock(&slot.inner).state = Some(st);
        let mut last_busy = Instant::now();
        let mut was_live = false;
        log::info!("{name}: on-demand controller armed");
        while !slot.stop.load(Ordering::SeqCst) {
            let Some(cfg) = self.on_demand_config(name) else {
                break;
            };
            if lock(&slot.inner).paused > 0 {
                std::thread::sleep(TICK);
                continue;
            }
            if let Some(live) = self.live(name) {
                if live.is_standby() {
                    was_live = false;
                    if !cfg.standby {
                        log::info!("{name}: --standby is off; ending the standby instance");
                        if let Err(e) = self.stop(name, Caller::Root) {
                            log::warn!("{name}: {}", crate::error_chain(&e));
                            std::thread::sleep(TICK);
                        }
                        continue;
                    }
                    // Held at its stop point: the port is served as at zero,
                    // and the first connection only resumes it.
                    if self.wait_port(name, slot, &cfg, OnDemandState::Standby) {
                        self.activate(name, slot, Activation::Resume);
                    }
                    continue;
                }
                if !was_live {
                    last_busy = Instant::now();
                    was_live = true;
                }
                set(OnDemandState::Running);
                let root = live.record.root_pid;
                let rows = sockets::tcp_table(Some(root));
                let mut i = lock(&slot.inner);
                // Still holding listeners (a service started by hand, or a
                // slow listen after activation): hand over once it listens.
                if !i.listeners.is_empty()
                    && i.listeners
                        .iter()
                        .all(|l| sockets::listening_elsewhere(&rows, l.addr, l.inode()))
                {
                    i.listeners.clear();
                }
                if i.addrs.is_empty() {
                    // Armed while it runs (`service set`, a daemon
                    // restart): its ports are the image's.
                    drop(i);
                    let addrs = addresses(self, name, &cfg)
                        .map(|(a, _)| a)
                        .unwrap_or_default();
                    i = lock(&slot.inner);
                    i.addrs = addrs;
                }
                let ports: Vec<u16> = i.addrs.iter().map(|a| a.port()).collect();
                drop(i);
                if ports.is_empty() || sockets::open_connections(&rows, &ports) > 0 {
                    last_busy = Instant::now();
                } else if last_busy.elapsed() >= Duration::from_secs(cfg.idle_timeout_secs) {
                    // Either way the idle time starts again: at zero, or
                    // with the client that kept the service.
                    self.to_zero(name, slot, &cfg, root);
                    was_live = false;
                    continue;
                }
                std::thread::sleep(TICK);
                continue;
            }
            was_live = false;
            if cfg.standby {
                // The port is served while the standby is made: a client
                // that comes meanwhile waits for it, then resumes it.
                if self.open_port(name, slot, &cfg, OnDemandState::Waiting) && !in_backoff(slot) {
                    self.make_standby(name, slot);
                    continue;
                }
            }
            // Nothing runs: wait on the port.
            if self.wait_port(name, slot, &cfg, OnDemandState::Waiting) {
                self.activate(name, slot, Activation::Restore);
            }
        }
        lock(&slot.inner).listeners.clear();
        log::info!("{name}: on-demand controller stopped");
    }

    /// Opens the waiting listeners on the service's addresses (unless they
    /// are open) and sets `st`; false (after a pause) when there is no
    /// address to open or the port is paused.
    fn open_port(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        cfg: &OnDemandConfig,
        st: OnDemandState,
    ) -> bool {
        let (addrs, img) = match addresses(self, name, cfg) {
            Ok(a) => a,
            Err(st) => {
                let mut i = lock(&slot.inner);
                i.listeners.clear();
                i.state = Some(st);
                drop(i);
                std::thread::sleep(TICK * 5);
                return false;
            }
        };
        let mut i = lock(&slot.inner);
        if i.paused > 0 {
            return false;
        }
        if i.addrs != addrs || i.listeners.len() != addrs.len() {
            open_listeners(name, &mut i, &addrs, &img);
        }
        i.state = Some(st);
        true
    }

    /// Serves the port for one tick; true when a client is waiting and
    /// may be served (outside a failure's backoff, where it is closed).
    fn wait_port(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        cfg: &OnDemandConfig,
        st: OnDemandState,
    ) -> bool {
        if !self.open_port(name, slot, cfg, st) {
            return false;
        }
        let mut i = lock(&slot.inner);
        let pending = sockets::wait_any(&i.listeners, TICK);
        if pending && i.backoff_until.is_some_and(|t| Instant::now() < t) {
            let n: usize = i.listeners.iter().map(|l| l.refuse_pending()).sum();
            i.refused += n as u64;
            false
        } else {
            pending
        }
    }

    /// A failed restore (or resume): the waiting clients are closed, the
    /// failure is kept for `service stats`, the next try backs off.
    fn failed(&self, name: &str, slot: &Arc<Slot>, what: &str, why: String) {
        let mut i = lock(&slot.inner);
        let n: usize = i.listeners.iter().map(|l| l.refuse_pending()).sum();
        i.refused += n as u64;
        i.failures += 1;
        i.backoff_until = Some(Instant::now() + i.backoff);
        log::warn!(
            "{name}: {what} failed ({why}); closed {n} waiting connection(s), the image is kept; next try in {} s at the earliest",
            i.backoff.as_secs()
        );
        i.backoff = (i.backoff * 2).min(BACKOFF_MAX);
        i.last_failure = Some(why);
        i.state = Some(OnDemandState::Waiting);
    }

    /// Restores the newest generation held at its stop point, beside the
    /// daemon's listeners.
    fn make_standby(self: &Arc<Self>, name: &str, slot: &Arc<Slot>) {
        lock(&slot.inner).restores += 1;
        let t0 = Instant::now();
        match self.restore_newest(name, RestoreAs::Standby) {
            Ok(info) => {
                let mut i = lock(&slot.inner);
                i.state = Some(OnDemandState::Standby);
                log::info!(
                    "{name}: standby instance ready in {:.1} ms (pid {}), held at its stop point",
                    t0.elapsed().as_secs_f64() * 1000.0,
                    info.pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "gone".into())
                );
            }
            // Started by hand meanwhile: the controller follows it.
            Err(ServiceError::Running { .. }) => {}
            Err(e) => self.failed(
                name,
                slot,
                "making the standby instance",
                crate::error_chain(&e),
            ),
        }
    }

    /// A connection is queued: restore (or resume the standby), wait for
    /// the service to listen, hand the queue over.
    fn activate(self: &Arc<Self>, name: &str, slot: &Arc<Slot>, how: Activation) {
        let t0 = Instant::now();
        {
            let mut i = lock(&slot.inner);
            i.state = Some(OnDemandState::Activating);
            if how == Activation::Restore {
                i.restores += 1;
            }
        }
        log::info!(
            "{name}: a client is waiting; activating ({})",
            how.describe()
        );
        let restore = |me: &Arc<Self>| match me.restore_newest(name, RestoreAs::Running) {
            Ok(info) => info
                .pid
                .ok_or_else(|| "the restored service has no pid".to_string()),
            Err(ServiceError::Running { pid, .. }) => Ok(pid),
            Err(e) => Err(crate::error_chain(&e)),
        };
        let started = match how {
            Activation::Restore => restore(self),
            Activation::Resume => match self.resume_standby(name) {
                Ok(pid) => Ok(pid),
                // Resumed by hand meanwhile.
                Err(ServiceError::Running { pid, .. }) => Ok(pid),
                Err(e) => {
                    // The held tree is in no known state: end it, and
                    // serve the waiting clients from a fresh restore.
                    log::warn!(
                        "{name}: {}; restoring afresh instead",
                        crate::error_chain(&e)
                    );
                    if let Err(e) = self.stop(name, Caller::Root) {
                        log::warn!("{name}: {}", crate::error_chain(&e));
                    }
                    lock(&slot.inner).restores += 1;
                    restore(self)
                }
            },
        };
        let root = match started {
            Ok(p) => p,
            Err(why) => return self.failed(name, slot, "activation", why),
        };
        let started_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // The restored service replays its listen(): its socket joins our
        // reuseport group. Then our listener can go, and its queue with it
        // to the service.
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let fds = image_sockets(self, name)
            .map(|img| img.root_fds())
            .unwrap_or_default();
        let mut polls = 0u32;
        let ready = loop {
            // The root's own sockets are asked directly (SO_ACCEPTCONN on a
            // pidfd_getfd copy, microseconds); a scan of /proc/PID/net/tcp
            // and tcp6 costs milliseconds, so it is only for sockets of
            // other processes, or now and then in case the service made a
            // new socket instead of listening on the image's.
            let scan = polls % SCAN_EVERY == SCAN_EVERY - 1;
            let ready = self.listening(slot, root, &fds, scan);
            polls += 1;
            if ready
                || !crate::sys::procfs::alive(nix::unistd::Pid::from_raw(root))
                || Instant::now() > deadline
            {
                break ready;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut i = lock(&slot.inner);
        if ready {
            i.listeners.clear();
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if i.latencies.len() >= KEEP_LATENCIES {
                i.latencies.pop_front();
            }
            i.latencies.push_back(ms);
            i.activations += 1;
            i.backoff = BACKOFF_FIRST;
            i.backoff_until = None;
            i.state = Some(OnDemandState::Running);
            log::info!(
                "{name}: activated in {ms:.1} ms (service pid {root}; {} took {started_ms:.1} ms, the rest is its listen)",
                how.describe()
            );
        } else {
            log::warn!(
                "{name}: restored (pid {root}) but not listening after {} s; keeping the port until it does",
                LISTEN_TIMEOUT.as_secs()
            );
        }
    }

    /// Whether the restored service (root `root`) listens on every address
    /// the daemon holds a listener on: through the root's own fds (`fds`,
    /// from the image) where known, else (or with `scan`) in its TCP table.
    fn listening(
        &self,
        slot: &Arc<Slot>,
        root: i32,
        fds: &HashMap<SocketAddr, i32>,
        scan: bool,
    ) -> bool {
        let held: Vec<(SocketAddr, u64)> = lock(&slot.inner)
            .listeners
            .iter()
            .map(|l| (l.addr, l.inode()))
            .collect();
        let direct = |a: &SocketAddr| {
            fds.get(a)
                .is_some_and(|&fd| sockets::fd_listening(root, fd))
        };
        if held.iter().all(|(a, _)| direct(a)) {
            return true;
        }
        if !scan && held.iter().all(|(a, _)| fds.contains_key(a)) {
            return false;
        }
        let rows = sockets::tcp_table(Some(root));
        held.iter()
            .all(|(a, ino)| direct(a) || sockets::listening_elsewhere(&rows, *a, *ino))
    }

    /// Idle: listen beside the service, so that every new client queues
    /// at the daemon (the steering program), let the service finish the
    /// connections it has, then stop it; whatever is still queued at its
    /// socket migrates to the daemon's. A client that comes meanwhile
    /// keeps the service: the daemon lets go of the port and its queue
    /// migrates to the service.
    fn to_zero(self: &Arc<Self>, name: &str, slot: &Arc<Slot>, cfg: &OnDemandConfig, root: i32) {
        log::info!(
            "{name}: no client connection for {} s; back to zero",
            cfg.idle_timeout_secs
        );
        let mut ports = Vec::new();
        if let Ok((addrs, img)) = addresses(self, name, cfg) {
            let mut i = lock(&slot.inner);
            if i.paused == 0 {
                // An address fails when the running instance's socket has
                // no SO_REUSEPORT (started cold); the loop opens it after.
                open_listeners(name, &mut i, &addrs, &img);
                ports = i.listeners.iter().map(|l| l.addr.port()).collect();
            }
        }
        if !ports.is_empty() {
            match self.drain(name, slot, root, &ports) {
                Drain::Done => {}
                Drain::ClientCame | Drain::StillBusy => {
                    // Closing our listeners hands their queue to the service.
                    lock(&slot.inner).listeners.clear();
                    return;
                }
            }
        }
        if let Err(e) = self.stop(name, Caller::Root) {
            log::warn!("{name}: going back to zero: {}", crate::error_chain(&e));
        }
        lock(&slot.inner).state = Some(OnDemandState::Waiting);
    }

    /// With the daemon's listeners steering new clients to themselves:
    /// waits until no connection is left on the service's ports.
    fn drain(&self, name: &str, slot: &Arc<Slot>, root: i32, ports: &[u16]) -> Drain {
        // A handshake that chose the service's listener just before the
        // program changed is in the table a moment later, not at once.
        std::thread::sleep(STEER_SETTLE);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let open = sockets::open_connections(&sockets::tcp_table(Some(root)), ports);
            if open == 0 {
                return Drain::Done;
            }
            // The count includes our own queue: a client there is a new one.
            let i = lock(&slot.inner);
            if sockets::wait_any(&i.listeners, Duration::ZERO) {
                log::info!("{name}: a client came while going to zero; the service stays");
                return Drain::ClientCame;
            }
            drop(i);
            if Instant::now() > deadline {
                log::info!(
                    "{name}: {open} connection(s) still open {} ms after the port was taken back; the service stays",
                    DRAIN_TIMEOUT.as_millis()
                );
                return Drain::StillBusy;
            }
            std::thread::sleep(DRAIN_POLL);
        }
    }
}

/// How a drain before going to zero ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// No connection left: the service can stop.
    Done,
    /// A new client queued at the daemon: the service is not idle.
    ClientCame,
    /// A connection of the service's stayed open past [`DRAIN_TIMEOUT`].
    StillBusy,
}

/// Checks an on-demand configuration.
pub fn validate(c: &OnDemandConfig) -> Result<(), ServiceError> {
    if c.idle_timeout_secs == 0 {
        return Err(ServiceError::BadSpec(
            "--idle-timeout must be at least 1 second".into(),
        ));
    }
    for a in &c.listen {
        if a.port() == 0 {
            return Err(ServiceError::BadSpec(format!(
                "--listen {a}: give a port other than 0"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 100.0];
        assert_eq!(percentile(&v, 50), Some(3.0));
        assert_eq!(percentile(&v, 95), Some(100.0));
        assert_eq!(percentile(&v, 0), Some(1.0));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn configs_are_checked() {
        let ok = OnDemandConfig {
            idle_timeout_secs: 5,
            standby: false,
            listen: vec!["127.0.0.1:8080".parse().unwrap()],
        };
        assert!(validate(&ok).is_ok());
        let zero = OnDemandConfig {
            idle_timeout_secs: 0,
            ..ok.clone()
        };
        assert!(validate(&zero)
            .unwrap_err()
            .to_string()
            .contains("idle-timeout"));
        let port0 = OnDemandConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            ..ok
        };
        assert!(validate(&port0)
            .unwrap_err()
            .to_string()
            .contains("--listen"));
    }
}

//! Service lifecycle: every step runs `runmh` as a child of the daemon, so
//! the tree is miehistod → runmh → service whether it booted cold or came
//! back from an image.
//!
//! * prebake: `runmh prebake --images <state>/images/<svc>/<gen> ...`
//!   (runmh stages the dump beside that path and publishes it by rename);
//! * start: `runmh restore --images <newest gen> --detach` (runmh forks the
//!   supervisor first; it is re-parented to the daemon, a child subreaper,
//!   when the process the daemon started exits), or `runmh run ...` cold;
//! * dump: `runmh dump --pid <service> --images <next gen> [--leave-running]`;
//! * stop: SIGTERM to the supervisor, which forwards it to the service and
//!   escalates to SIGKILL after `--stop-timeout`.
//!
//! runmh runs in its own process group with no parent-death signal and its
//! output in a file, so nothing ties it to the daemon's life: a daemon that
//! restarts finds its services in runmh's instance records (each service
//! has its own log directory, which the records carry) and in /proc.
//!
//! Two requests on one service are serialized: the second waits until the
//! first is done (a second `prebake` then makes the next generation).
//! Requests on different services run in parallel.

use super::api::{
    CreateService, ErrorCode, ImageInfo, Operation, ServiceInfo, ServiceState, StartedFrom,
};
use super::children::{Children, ChildrenError};
use super::registry::{self, Registry, RegistryError, ServiceConfig, ServiceRecord};
use super::store::{self, ImageStore, ImageStoreError};
use crate::channel::{ChannelError, StepReport};
use crate::criu::{Criu, CriuError};
use crate::filter::StopSyscall;
use crate::images::compat::{self, CompatError};
use crate::images::oci::{self, OciError};
use crate::images::{Metadata, MetadataError};
use crate::instance::{Instance, InstanceRecord};
use crate::stop::{BackendChoice, BackendKind};
use crate::sys;
use crate::sys::exit::ExitStatus;
use crate::sys::procfs;
use nix::libc;
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest a runmh step may take before the daemon gives up on it
/// (runmh has its own, shorter limits for the stop point and CRIU).
pub(super) const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest an on-demand restore may take before its waiting clients
/// are closed and the activation counts as failed (a hung restore).
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Scratch space of image transfers, under the state directory (the same
/// file system as the image store, so a pulled image moves in by rename).
const SCRATCH: &str = "tmp";
/// How long a cold start may take to report its service running.
const COLD_START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] ImageStoreError),
    #[error(transparent)]
    Children(#[from] ChildrenError),
    #[error("cannot start the thread that ends the instances of killed runmh children")]
    Janitor(#[source] std::io::Error),
    #[error("no service named {0:?}; `mhctl service list` shows the services")]
    NotFound(String),
    #[error("a service named {0:?} already exists; delete it first or choose another name")]
    Exists(String),
    #[error("the name {0:?} is taken by another user's service; choose another name")]
    NameTaken(String),
    #[error("uid {uid} may create services that run as itself only, not as {asked}; leave out --user, or ask root to create it")]
    OtherUser { uid: u32, asked: String },
    #[error("--listen {addr}: ports below {start} are for root's services (the daemon would bind it for a user who may not); choose port {start} or above")]
    PrivilegedPort {
        addr: std::net::SocketAddr,
        start: u16,
    },
    #[error("{what} is for root only: {why}")]
    RootOnly {
        what: &'static str,
        why: &'static str,
    },
    #[error("the record of service {name:?} is broken ({problem}); its images and logs are kept: repair the file, or replace everything with `mhctl service create --force {name} ...`")]
    Broken { name: String, problem: String },
    #[error(
        "{name} is already running (pid {pid}); stop it first with `mhctl service stop {name}`"
    )]
    Running { name: String, pid: i32 },
    #[error("{name} is not running; start it with `mhctl service start {name}`")]
    NotRunning { name: String },
    #[error("{name} is running (pid {pid}) and a prebake boots a second copy, whose ports would collide; stop it first, or dump the running one with `mhctl service dump {name} --leave-running`")]
    PrebakeWhileRunning { name: String, pid: i32 },
    #[error("invalid service definition: {0}")]
    BadSpec(String),
    #[error("the state directory {path} is too long ({len} bytes): runmh's control sockets under it would exceed the {max}-byte limit of a UNIX socket path; use a shorter --state-dir")]
    StateDirTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runmh {op} failed for {name}: {detail} (runmh's output: {log})")]
    Runmh {
        op: &'static str,
        name: String,
        detail: String,
        log: PathBuf,
    },
    #[error("runmh {op} for {name} did not finish within {secs} s and was interrupted (runmh's output: {log})")]
    Timeout {
        op: &'static str,
        name: String,
        secs: u64,
        log: PathBuf,
    },
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Compat(#[from] CompatError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("{reference} does not say which service it is for; pull it with --as NAME")]
    NoServiceName { reference: String },
    #[error("the newest image {path} cannot be restored (it is kept as it is)")]
    Unrestorable {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("cannot resume {name}'s standby instance (pid {pid})")]
    Resume {
        name: String,
        pid: i32,
        #[source]
        source: crate::control::ControlError,
    },
    #[error("runmh published {path}, but it does not read back as an image")]
    BadImage {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
}

impl ServiceError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::Store(
                ImageStoreError::NoGeneration { .. } | ImageStoreError::NoImage { .. },
            ) => ErrorCode::NotFound,
            ServiceError::Exists(_) | ServiceError::NameTaken(_) => ErrorCode::Exists,
            ServiceError::OtherUser { .. }
            | ServiceError::RootOnly { .. }
            | ServiceError::PrivilegedPort { .. } => ErrorCode::Forbidden,
            ServiceError::Broken { .. } => ErrorCode::Conflict,
            ServiceError::Running { .. }
            | ServiceError::NotRunning { .. }
            | ServiceError::PrebakeWhileRunning { .. } => ErrorCode::Conflict,
            ServiceError::BadSpec(_)
            | ServiceError::Registry(RegistryError::BadName { .. })
            | ServiceError::Oci(OciError::BadReference { .. })
            | ServiceError::NoServiceName { .. } => ErrorCode::BadRequest,
            ServiceError::Oci(_) | ServiceError::Compat(_) | ServiceError::Criu(_) => {
                ErrorCode::Failed
            }
            ServiceError::Runmh { .. }
            | ServiceError::Timeout { .. }
            | ServiceError::BadImage { .. }
            | ServiceError::Resume { .. }
            | ServiceError::Unrestorable { .. } => ErrorCode::Failed,
            _ => ErrorCode::Internal,
        }
    }
}

/// The daemon's settings that concern services.
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    /// Absolute state directory.
    pub state_dir: PathBuf,
    pub runmh: PathBuf,
    pub criu: Option<PathBuf>,
    /// Passed to runmh: seconds between SIGTERM and SIGKILL on stop.
    pub stop_timeout: u64,
}

/// Who a request is from, as the server tells it by `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// uid 0, and the daemon itself (on-demand activations): every service.
    Root,
    /// Any other allowed client: its own services only, which run as it.
    User { uid: u32, gid: u32 },
}

impl Caller {
    pub fn from_ids(uid: u32, gid: u32) -> Caller {
        if uid == 0 {
            Caller::Root
        } else {
            Caller::User { uid, gid }
        }
    }

    pub fn uid(self) -> u32 {
        match self {
            Caller::Root => 0,
            Caller::User { uid, .. } => uid,
        }
    }

    /// Whether this caller may see and touch the service.
    fn sees(self, rec: &ServiceRecord) -> bool {
        match self {
            Caller::Root => true,
            Caller::User { uid, .. } => rec.owner_uid == uid,
        }
    }

    /// Refuses what only root may ask for.
    pub(super) fn require_root(
        self,
        what: &'static str,
        why: &'static str,
    ) -> Result<(), ServiceError> {
        match self {
            Caller::Root => Ok(()),
            Caller::User { .. } => Err(ServiceError::RootOnly { what, why }),
        }
    }

    /// Who a service created by this caller runs as: a non-root caller's
    /// runs as that caller, whatever it asked; asking for someone else is
    /// an error, not silently ignored.
    fn run_as(self, asked: Option<&str>) -> Result<Option<String>, ServiceError> {
        // Names are resolved here too, so an unknown one is refused at
        // create time, not at the first start.
        let parsed = asked
            .map(crate::spec::parse_user)
            .transpose()
            .map_err(|e| ServiceError::BadSpec(e.to_string()))?;
        match (self, parsed) {
            (Caller::Root, _) => Ok(asked.map(str::to_string)),
            (Caller::User { uid, gid }, None) => Ok(Some(format!("{uid}:{gid}"))),
            (Caller::User { uid, gid }, Some((u, g))) => {
                // "USER" alone means the caller's own group.
                let gid_given = asked.is_some_and(|a| a.contains(':'));
                if u != uid || (gid_given && g != gid) {
                    return Err(ServiceError::OtherUser {
                        uid,
                        asked: asked.unwrap_or_default().to_string(),
                    });
                }
                Ok(Some(format!("{uid}:{gid}")))
            }
        }
    }
}

/// The lowest port a non-root process may bind (the kernel's
/// `net.ipv4.ip_unprivileged_port_start`, 1024 unless changed).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1024)
}

/// A running service, as runmh's instance record and /proc tell it.
#[derive(Debug, Clone)]
pub struct Live {
    pub instance: Instance,
    pub record: InstanceRecord,
}

impl Live {
    /// Restored and held at its stop point (a `--standby` instance).
    pub fn is_standby(&self) -> bool {
        self.record.state == crate::instance::InstanceState::Standby
    }
}

/// How a restore leaves the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreAs {
    /// Past its stop point, running.
    Running,
    /// Held at its stop point until resumed (`runmh restore --hold`).
    Standby,
}

/// The operations in progress, by service; doubles as the per-service lock.
#[derive(Default)]
struct Ops {
    busy: Mutex<HashMap<String, (Operation, Instant)>>,
    freed: Condvar,
}

/// Holds a service's lock until dropped.
pub struct OpGuard<'a> {
    ops: &'a Ops,
    name: String,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let mut b = self.ops.busy.lock().unwrap_or_else(|p| p.into_inner());
        b.remove(&self.name);
        drop(b);
        self.ops.freed.notify_all();
    }
}

pub struct Services {
    cfg: ServicesConfig,
    registry: Registry,
    store: ImageStore,
    children: Children,
    runmh_state: PathBuf,
    records: Mutex<BTreeMap<String, ServiceRecord>>,
    /// Services whose record does not parse, with the reason: shown by
    /// `list`, and never overwritten or deleted without `force`.
    broken: Mutex<BTreeMap<String, String>>,
    ops: Ops,
    /// The supervisor pid of each service the daemon started or took
    /// back, to tell how it ended once it is gone.
    watched: Mutex<HashMap<String, i32>>,
    /// The controllers of on-demand services.
    pub(super) ondemand: super::ondemand::OnDemand,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the janitor is told.
enum Janitor {
    /// A child of the daemon ended (the reaper saw it).
    Ended(i32),
    /// A live supervisor that is not the daemon's child (the daemon that
    /// started it is gone): watched through a pidfd.
    Adopt(i32),
}

/// How often the janitor looks at the supervisors it adopted.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// Ends the instance of a runmh that died without cleaning up (SIGKILL, a
/// crash) as soon as it is seen gone: left to the next daemon start, its
/// directory and its (empty, or still populated) cgroup would stay for as
/// long as this daemon runs, and for good if the state directory went
/// first. The reaper tells of the daemon's children; supervisors a previous
/// daemon started are re-parented away from this one, so they are adopted
/// and watched through pidfds. A runmh that ended cleanly removed its own
/// instance; a `runmh restore --detach` whose forked supervisor lives on
/// leaves an owned one, which `clean_dead` never touches. The work is done
/// off the reaper thread: killing a cgroup's leftovers may wait for them.
fn start_janitor(
    children: &Children,
    runmh_state: PathBuf,
) -> Result<crossbeam_channel::Sender<Janitor>, ServiceError> {
    let (tx, rx) = crossbeam_channel::unbounded::<Janitor>();
    std::thread::Builder::new()
        .name("janitor".into())
        .spawn(move || {
            let mut adopted: Vec<(i32, std::os::fd::OwnedFd)> = Vec::new();
            loop {
                let mut sweep = false;
                let first = match rx.recv_timeout(ADOPTED_POLL) {
                    Ok(m) => Some(m),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                };
                for m in first.into_iter().chain(rx.try_iter()) {
                    match m {
                        Janitor::Ended(pid) => {
                            log::debug!("child {pid} ended: looking for its instance");
                            sweep = true;
                        }
                        Janitor::Adopt(pid) => match sys::pidfd_open(pid) {
                            Ok(fd) => adopted.push((pid, fd)),
                            // Already gone.
                            Err(_) => sweep = true,
                        },
                    }
                }
                adopted.retain(|(pid, fd)| {
                    let gone = sys::pidfd_exited(fd.as_raw_fd()).unwrap_or(true);
                    if gone {
                        log::debug!("adopted supervisor {pid} ended");
                        sweep = true;
                    }
                    !gone
                });
                if !sweep {
                    continue;
                }
                for c in crate::instance::clean_dead(&runmh_state) {
                    log::info!(
                        "ended the instance {} ({}) of a runmh that died without cleaning up (killed pids {:?})",
                        c.id,
                        c.state.map_or("unrecorded", |s| s.as_str()),
                        c.killed
                    );
                }
            }
        })
        .map_err(ServiceError::Janitor)?;
    let ended = tx.clone();
    children.on_exit(move |pid, _| {
        let _ = ended.send(Janitor::Ended(pid));
    });
    Ok(tx)
}

fn describe_end(info: Option<ExitStatus>) -> String {
    match info {
        Some(ExitStatus::Exited(c)) => {
            format!("exited (runmh reported the service's exit status {c})")
        }
        Some(i) => format!("ended: runmh {i}"),
        None => "ended (not a child of this daemon: status unknown)".to_string(),
    }
}

impl Services {
    /// Opens the state directory and takes back the services that still run.
    pub fn open(cfg: ServicesConfig, children: Children) -> Result<Services, ServiceError> {
        let registry = Registry::open(&cfg.state_dir)?;
        let store = ImageStore::open(&cfg.state_dir)?;
        let runmh_state = cfg.state_dir.join("runmh");
        // runmh puts a control socket at runmh/instances/<ms>-<pid>/control.sock.
        let longest = runmh_state
            .join("instances")
            .join(format!("{}-{}", 9_999_999_999_999u64, 4_194_304))
            .join("control.sock");
        let max = 107;
        if longest.as_os_str().len() > max {
            return Err(ServiceError::StateDirTooLong {
                path: cfg.state_dir.clone(),
                len: cfg.state_dir.as_os_str().len(),
                max,
            });
        }
        for dir in [runmh_state.clone(), cfg.state_dir.join("logs")] {
            std::fs::create_dir_all(&dir).map_err(|source| ServiceError::Prepare {
                path: dir.clone(),
                source,
            })?;
        }
        let (recs, errs) = registry.load_all();
        let mut broken = BTreeMap::new();
        for e in errs {
            log::warn!("a service record is broken: {}", crate::error_chain(&e));
            if let Some(name) = e.service_name() {
                broken.insert(name, crate::error_chain(&e));
            }
        }
        // Image transfers run inside the daemon: whatever scratch space is
        // left was an interrupted one's.
        let _ = std::fs::remove_dir_all(cfg.state_dir.join(SCRATCH));
        for p in store.clean_stale() {
            log::info!(
                "removed {}, left by an interrupted image write",
                p.display()
            );
        }
        // Instances whose runmh died without cleaning up (SIGKILL, a
        // crash): their trees are killed (each instance's cgroup) and
        // their directories removed, so a service's port is free again.
        // Live supervisors' instances are left alone.
        for c in crate::instance::clean_dead(&runmh_state) {
            log::info!(
                "ended the instance {} left by a killed runmh (killed pids {:?})",
                c.id,
                c.killed
            );
        }
        let janitor = start_janitor(&children, runmh_state.clone())?;
        // Supervisors that outlived the daemon that started them: none is
        // this daemon's child.
        for (_, r) in Instance::list(&runmh_state) {
            if r.supervisor_pid > 0 && procfs::alive(Pid::from_raw(r.supervisor_pid)) {
                let _ = janitor.send(Janitor::Adopt(r.supervisor_pid));
            }
        }
        let me = Services {
            cfg,
            registry,
            store,
            children,
            runmh_state,
            records: Mutex::new(
                recs.into_iter()
                    .map(|r| (r.config.name.clone(), r))
                    .collect(),
            ),
            ops: Ops::default(),
            broken: Mutex::new(broken),
            watched: Mutex::new(HashMap::new()),
            ondemand: Default::default(),
        };
        let names: Vec<String> = lock(&me.records).keys().cloned().collect();
        for name in names {
            if let Some(live) = me.live(&name) {
                log::info!(
                    "took back {name}: service pid {} under runmh pid {}",
                    live.record.root_pid,
                    live.record.supervisor_pid
                );
                lock(&me.watched).insert(name, live.record.supervisor_pid);
            }
        }
        Ok(me)
    }

    pub fn state_dir(&self) -> &Path {
        &self.cfg.state_dir
    }

    pub fn config(&self) -> &ServicesConfig {
        &self.cfg
    }

    pub(super) fn children(&self) -> &Children {
        &self.children
    }

    /// Watches (Some) or stops watching (None) a service's supervisor.
    pub(super) fn watch(&self, name: &str, supervisor: Option<i32>) {
        match supervisor {
            Some(pid) => lock(&self.watched).insert(name.to_string(), pid),
            None => lock(&self.watched).remove(name),
        };
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    pub fn log_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("logs").join(name)
    }

    fn runmh_log(&self, name: &str) -> PathBuf {
        self.log_dir(name).join("runmh.log")
    }

    /// Takes the service's lock, waiting while another request holds it.
    pub(super) fn begin(&self, name: &str, op: Operation) -> Result<OpGuard<'_>, ServiceError> {
        registry::validate_name(name)?;
        let mut b = lock(&self.ops.busy);
        while b.contains_key(name) {
            b = self.ops.freed.wait(b).unwrap_or_else(|p| p.into_inner());
        }
        b.insert(name.to_string(), (op, Instant::now()));
        Ok(OpGuard {
            ops: &self.ops,
            name: name.to_string(),
        })
    }

    /// The service's declared configuration.
    pub(super) fn service_config(&self, name: &str) -> Result<ServiceConfig, ServiceError> {
        self.record(name).map(|r| r.config)
    }

    /// Changes the service's declared configuration and saves it.
    pub(super) fn set_config(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServiceConfig),
    ) -> Result<(), ServiceError> {
        self.update(name, |r| f(&mut r.config))
    }

    /// The service's record, if `who` may see it: another user's service
    /// is not found, as one that does not exist.
    pub(super) fn owned(&self, name: &str, who: Caller) -> Result<ServiceRecord, ServiceError> {
        let rec = self.record(name)?;
        if !who.sees(&rec) {
            return Err(ServiceError::NotFound(name.to_string()));
        }
        Ok(rec)
    }

    /// Refuses on-demand addresses a non-root caller could not bind itself.
    pub(super) fn check_listen(
        &self,
        who: Caller,
        od: Option<&super::api::OnDemandConfig>,
    ) -> Result<(), ServiceError> {
        let (Caller::User { .. }, Some(od)) = (who, od) else {
            return Ok(());
        };
        let start = unprivileged_port_start();
        match od.listen.iter().find(|a| a.port() < start) {
            Some(a) => Err(ServiceError::PrivilegedPort { addr: *a, start }),
            None => Ok(()),
        }
    }

    pub(super) fn record(&self, name: &str) -> Result<ServiceRecord, ServiceError> {
        registry::validate_name(name)?;
        lock(&self.records)
            .get(name)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))
    }

    pub(super) fn update(
        &self,
        name: &str,
        f: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), ServiceError> {
        let mut recs = lock(&self.records);
        let rec = recs
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
        let mut next = rec.clone();
        f(&mut next);
        self.registry.save(&next)?;
        *rec = next;
        Ok(())
    }

    /// The service's running instance: a live supervisor whose record is
    /// up, with the service as its child (a recycled pid would not be).
    pub fn live(&self, name: &str) -> Option<Live> {
        let log_dir = self.log_dir(name);
        let images = self.store.service_dir(name);
        // A generation restored by an older runmh kept the log directory of
        // the host it was dumped on; what it was restored from tells it is
        // ours all the same.
        let ours = |r: &InstanceRecord| {
            r.spec.log_dir == log_dir
                || r.image
                    .as_ref()
                    .is_some_and(|i| i.parent() == Some(&images))
        };
        Instance::list(&self.runmh_state)
            .into_iter()
            .filter(|(_, r)| ours(r) && r.state.is_up())
            .filter(|(_, r)| {
                r.supervisor_pid > 0
                    && procfs::alive(Pid::from_raw(r.supervisor_pid))
                    && procfs::alive(Pid::from_raw(r.root_pid))
                    && procfs::ppid(Pid::from_raw(r.root_pid))
                        == Some(Pid::from_raw(r.supervisor_pid))
            })
            .max_by_key(|(_, r)| r.started_unix_ms)
            .map(|(instance, record)| Live { instance, record })
    }

    /// Notes how a watched service ended once it is gone.
    fn settle(&self, name: &str, live: &Option<Live>) {
        if live.is_some() {
            return;
        }
        let Some(pid) = lock(&self.watched).remove(name) else {
            return;
        };
        let end = describe_end(self.children.take(pid));
        let _ = self.update(name, |r| r.last_exit = Some(end));
    }

    fn generation_of(&self, name: &str, image: Option<&Path>) -> Option<u64> {
        let image = image?;
        if image.parent()? != self.store.service_dir(name) {
            return None;
        }
        image.file_name()?.to_str()?.parse().ok()
    }

    pub fn info(&self, name: &str) -> Result<ServiceInfo, ServiceError> {
        let live = self.live(name);
        self.settle(name, &live);
        let rec = self.record(name)?;
        let busy = lock(&self.ops.busy).get(name).map(|(op, _)| *op);
        let gens = self.store.generations(name);
        let c = &rec.config;
        let mut info = ServiceInfo {
            name: c.name.clone(),
            state: ServiceState::Stopped,
            problem: None,
            busy,
            pid: None,
            supervisor_pid: None,
            generation: None,
            started_from: None,
            uptime_ms: None,
            last_exit: rec.last_exit.clone(),
            images: gens.len() as u64,
            latest_generation: gens.last().copied(),
            command: c.command.clone(),
            cwd: c.cwd.clone(),
            env: c.env.clone(),
            backend: c.backend.clone(),
            stop_at: c.stop_at.clone(),
            log_dir: self.log_dir(name),
            created_unix_ms: c.created_unix_ms,
            on_demand: c
                .on_demand
                .as_ref()
                .map(|od| Box::new(self.ondemand.info(name, od))),
            owner_uid: rec.owner_uid,
            user: c.user.clone(),
        };
        if let Some(l) = live {
            info.state = if l.is_standby() {
                if let Some(od) = info.on_demand.as_mut() {
                    od.standby_rss_kib = procfs::tree_rss_kib(Pid::from_raw(l.record.root_pid));
                }
                ServiceState::Standby
            } else {
                ServiceState::Running
            };
            info.pid = Some(l.record.root_pid);
            info.supervisor_pid = Some(l.record.supervisor_pid);
            info.generation = self.generation_of(name, l.record.image.as_deref());
            info.started_from = Some(if l.record.image.is_some() {
                StartedFrom::Restored
            } else {
                StartedFrom::Cold
            });
            info.uptime_ms =
                Some(crate::sys::time::unix_ms().saturating_sub(l.record.started_unix_ms));
        }
        Ok(info)
    }

    /// The services `who` sees. A broken record's owner is unknown: only
    /// root sees those.
    pub fn list(&self, who: Caller) -> Vec<ServiceInfo> {
        let names = self.names(who);
        let mut list: Vec<ServiceInfo> = names.iter().filter_map(|n| self.info(n).ok()).collect();
        let broken = match who {
            Caller::Root => lock(&self.broken).clone(),
            Caller::User { .. } => BTreeMap::new(),
        };
        for (name, problem) in broken {
            let gens = self.store.generations(&name);
            list.push(ServiceInfo {
                state: ServiceState::Broken,
                problem: Some(problem),
                busy: None,
                pid: None,
                supervisor_pid: None,
                generation: None,
                started_from: None,
                uptime_ms: None,
                last_exit: None,
                images: gens.len() as u64,
                latest_generation: gens.last().copied(),
                command: Vec::new(),
                cwd: PathBuf::new(),
                env: Vec::new(),
                backend: String::new(),
                stop_at: String::new(),
                log_dir: self.log_dir(&name),
                created_unix_ms: 0,
                on_demand: None,
                owner_uid: 0,
                user: None,
                name,
            });
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Refuses to touch a service whose record is broken, unless forced.
    fn refuse_broken(&self, name: &str, force: bool) -> Result<(), ServiceError> {
        match lock(&self.broken).get(name) {
            Some(problem) if !force => Err(ServiceError::Broken {
                name: name.to_string(),
                problem: problem.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// The names of the services `who` sees.
    pub fn names(&self, who: Caller) -> Vec<String> {
        lock(&self.records)
            .iter()
            .filter(|(_, r)| who.sees(r))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn exists(&self, name: &str, who: Caller) -> Result<(), ServiceError> {
        self.owned(name, who).map(drop)
    }

    pub fn create(&self, req: &CreateService, who: Caller) -> Result<ServiceInfo, ServiceError> {
        let name = req.name.as_str();
        let g = self.begin(name, Operation::Create)?;
        if let Some(r) = lock(&self.records).get(name) {
            return Err(if who.sees(r) {
                ServiceError::Exists(name.to_string())
            } else {
                ServiceError::NameTaken(name.to_string())
            });
        }
        if lock(&self.broken).contains_key(name) {
            // Whose it was is unknown: only root may replace it.
            who.require_root(
                "replacing a service whose record is broken",
                "whose it was cannot be told",
            )?;
        }
        self.refuse_broken(name, req.force)?;
        let mut cfg = validate_create(req)?;
        cfg.user = who.run_as(req.user.as_deref())?;
        self.check_listen(who, cfg.on_demand.as_ref())?;
        // What a delete interrupted by a crash may have left behind under
        // this name belongs to no service.
        self.store.remove_service(name)?;
        let _ = std::fs::remove_dir_all(self.log_dir(name));
        let rec = ServiceRecord::new(cfg, who.uid());
        self.registry.save(&rec)?;
        lock(&self.broken).remove(name);
        lock(&self.records).insert(name.to_string(), rec);
        drop(g);
        self.info(name)
    }

    pub fn delete(&self, name: &str, who: Caller) -> Result<String, ServiceError> {
        let _g = self.begin(name, Operation::Delete)?;
        if who != Caller::Root && lock(&self.broken).contains_key(name) {
            return Err(ServiceError::NotFound(name.to_string()));
        }
        self.refuse_broken(name, false)?;
        self.owned(name, who)?;
        // A standby instance is the daemon's, not the user's: it goes with
        // the service (its controller first, which would make another).
        if self.live(name).is_some_and(|l| l.is_standby()) {
            self.disarm(name);
            self.stop_locked(name)?;
        }
        if let Some(l) = self.live(name) {
            return Err(ServiceError::Running {
                name: name.to_string(),
                pid: l.record.root_pid,
            });
        }
        let n = self.store.generations(name).len();
        // The record goes last: until then, a crash leaves a service that
        // a second delete finishes removing.
        self.store.remove_service(name)?;
        let _ = std::fs::remove_dir_all(self.log_dir(name));
        self.registry.remove(name)?;
        lock(&self.records).remove(name);
        lock(&self.watched).remove(name);
        self.disarm(name);
        Ok(format!("deleted {name} and its {n} image generation(s)"))
    }

    /// A runmh command line for one of `name`'s steps: our state, CRIU,
    /// the step's report file, own process group, quiet stdin.
    pub(super) fn runmh(&self, name: &str, cwd: &Path) -> Command {
        let mut c = Command::new(&self.cfg.runmh);
        c.arg("--state-dir").arg(&self.runmh_state);
        c.arg("--report-file").arg(self.report_path(name));
        if let Some(criu) = &self.cfg.criu {
            c.arg("--criu").arg(criu);
        }
        // Its own process group: a terminal's ^C to the daemon is not for
        // the services; and no parent-death signal, so they outlive us.
        c.current_dir(cwd).stdin(Stdio::null()).process_group(0);
        c
    }

    fn sandbox_args(&self, c: &mut Command, cfg: &ServiceConfig) {
        c.arg(format!("--log-dir={}", self.log_dir(&cfg.name).display()));
        c.arg(format!("--cwd={}", cfg.cwd.display()));
        c.arg(format!("--stop-timeout={}", self.cfg.stop_timeout));
        if let Some(u) = &cfg.user {
            c.arg(format!("--user={u}"));
        }
        for e in &cfg.env {
            c.arg(format!("--env={e}"));
        }
        c.arg("--").args(&cfg.command);
    }

    /// Where runmh reports a step's outcome (one step per service at a
    /// time: the service's lock serializes them).
    fn report_path(&self, name: &str) -> PathBuf {
        self.log_dir(name).join("runmh-report.json")
    }

    /// Points runmh's output at the service's runmh.log and clears the
    /// report file of the last step; returns where this step's output
    /// starts.
    fn attach_log(&self, name: &str, op: &str, c: &mut Command) -> Result<u64, ServiceError> {
        let dir = self.log_dir(name);
        std::fs::create_dir_all(&dir).map_err(|source| ServiceError::Prepare {
            path: dir.clone(),
            source,
        })?;
        let report = self.report_path(name);
        match std::fs::remove_file(&report) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ServiceError::Prepare {
                    path: report,
                    source,
                })
            }
        }
        let path = self.runmh_log(name);
        let prep = |source| ServiceError::Prepare {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(prep)?;
        writeln!(
            f,
            "--- miehistod {}: runmh {op} ({} ms since the epoch)",
            std::process::id(),
            crate::sys::time::unix_ms()
        )
        .map_err(prep)?;
        let offset = f.metadata().map_err(prep)?.len();
        let err = f.try_clone().map_err(prep)?;
        c.stdout(f).stderr(err);
        Ok(offset)
    }

    /// The last line of runmh's output since `offset`: context for a runmh
    /// that ended without a report (it crashed or was killed).
    fn last_output(&self, name: &str, offset: u64) -> Option<String> {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.runmh_log(name)) {
            if f.seek(SeekFrom::Start(offset)).is_ok() {
                let _ = f.take(1 << 20).read_to_string(&mut text);
            }
        }
        text.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
    }

    /// What runmh reported for a step that ended with `status` (None: it
    /// still runs, as `run` does once its service is up), checked against
    /// what the step should produce.
    fn outcome(
        &self,
        name: &str,
        op: &'static str,
        offset: u64,
        status: Option<ExitStatus>,
        expect: Expect,
    ) -> Result<StepReport, ServiceError> {
        let fail = |detail: String| ServiceError::Runmh {
            op,
            name: name.into(),
            detail,
            log: self.runmh_log(name),
        };
        let report = StepReport::read(&self.report_path(name), expect.describe())
            .map_err(|e| fail(e.to_string()))?;
        let ended = |what: String| {
            let status = match status {
                Some(s) => s.to_string(),
                None => "no exit status".into(),
            };
            match self.last_output(name, offset) {
                Some(l) => format!("runmh ended with {status} {what}; its last output: {l}"),
                None => format!("runmh ended with {status} {what}"),
            }
        };
        match report {
            Some(StepReport::Failed { reason }) => Err(fail(reason)),
            Some(r) if !expect.matches(&r) => Err(fail(
                ChannelError::UnexpectedMessage {
                    channel: StepReport::CHANNEL,
                    expected: expect.describe(),
                    received: r.describe(),
                }
                .to_string(),
            )),
            Some(r) => match status {
                Some(s) if !s.success() => {
                    Err(fail(ended(format!("after reporting {}", r.describe()))))
                }
                _ => Ok(r),
            },
            None => Err(fail(ended("without reporting an outcome".into()))),
        }
    }

    /// Runs one runmh step to its end.
    pub(super) fn run_step(
        &self,
        name: &str,
        op: &'static str,
        c: Command,
        expect: Expect,
    ) -> Result<StepReport, ServiceError> {
        self.run_step_within(name, op, c, expect, STEP_TIMEOUT)
    }

    /// [`Self::run_step`], interrupted after `limit`.
    fn run_step_within(
        &self,
        name: &str,
        op: &'static str,
        mut c: Command,
        expect: Expect,
        limit: Duration,
    ) -> Result<StepReport, ServiceError> {
        let offset = self.attach_log(name, op, &mut c)?;
        let pid = self.children.spawn(&mut c)?;
        match self.children.wait(pid, limit) {
            Some(s) => self.outcome(name, op, offset, Some(s), expect),
            None => {
                // runmh cleans up (its staging directory, the service) on SIGTERM.
                let _ = sys::kill(Pid::from_raw(pid), libc::SIGTERM);
                if self.children.wait(pid, Duration::from_secs(30)).is_none() {
                    let _ = sys::kill(Pid::from_raw(pid), libc::SIGKILL);
                }
                Err(ServiceError::Timeout {
                    op,
                    name: name.into(),
                    secs: limit.as_secs(),
                    log: self.runmh_log(name),
                })
            }
        }
    }

    /// Hands out the next generation number, recorded before use so it is
    /// never handed out twice.
    pub(super) fn next_generation(&self, name: &str) -> Result<(u64, PathBuf), ServiceError> {
        let rec = self.record(name)?;
        let gen = self.store.next_generation(name, rec.last_generation)?;
        self.update(name, |r| r.last_generation = gen)?;
        Ok((gen, self.store.generation_path(name, gen)))
    }

    fn published(&self, name: &str, gen: u64, path: PathBuf) -> Result<ImageInfo, ServiceError> {
        let md = Metadata::read(&path).map_err(|source| ServiceError::BadImage {
            path: path.clone(),
            source,
        })?;
        let (bytes, files) = crate::images::dir_usage(&path);
        Ok(store::info_of(name, gen, path, &md, bytes, files))
    }

    pub fn prebake(&self, name: &str, who: Caller) -> Result<ImageInfo, ServiceError> {
        let _g = self.begin(name, Operation::Prebake)?;
        let rec = self.owned(name, who)?;
        // The booting copy binds the port itself: the daemon lets it go,
        // and a standby instance (of an older generation, soon) goes too.
        let _pause = rec
            .config
            .on_demand
            .as_ref()
            .map(|_| self.ondemand.pause(name));
        if self.live(name).is_some_and(|l| l.is_standby()) {
            self.stop_locked(name)?;
        }
        if let Some(l) = self.live(name) {
            return Err(ServiceError::PrebakeWhileRunning {
                name: name.into(),
                pid: l.record.root_pid,
            });
        }
        let (gen, dest) = self.next_generation(name)?;
        let cfg = &rec.config;
        let mut c = self.runmh(name, &cfg.cwd);
        c.arg("prebake")
            .arg("--images")
            .arg(&dest)
            .arg("--backend")
            .arg(&cfg.backend)
            .arg("--stop-at")
            .arg(&cfg.stop_at);
        // An on-demand service's image must let the daemon listen beside it.
        if cfg.on_demand.is_some() {
            c.arg("--reuseport");
        }
        self.sandbox_args(&mut c, cfg);
        self.run_step(name, "prebake", c, Expect::Published)?;
        let info = self.published(name, gen, dest)?;
        if let Some(od) = &cfg.on_demand {
            if let Err(why) = super::ondemand::check_image(self, name, od) {
                return Err(ServiceError::BadSpec(format!(
                    "image generation {gen} is published and kept, but {why}"
                )));
            }
        }
        Ok(info)
    }

    pub fn dump(
        &self,
        name: &str,
        leave_running: bool,
        who: Caller,
    ) -> Result<ImageInfo, ServiceError> {
        let _g = self.begin(name, Operation::Dump)?;
        self.owned(name, who)?;
        let live = self
            .live(name)
            .ok_or_else(|| ServiceError::NotRunning { name: name.into() })?;
        let (gen, dest) = self.next_generation(name)?;
        let mut c = self.runmh(name, Path::new("/"));
        c.arg("dump")
            .arg("--pid")
            .arg(live.record.root_pid.to_string())
            .arg("--images")
            .arg(&dest);
        if leave_running {
            c.arg("--leave-running");
        }
        self.run_step(name, "dump", c, Expect::Published)?;
        let info = self.published(name, gen, dest)?;
        if !leave_running {
            // CRIU killed the tree; its supervisor follows.
            let sup = live.record.supervisor_pid;
            wait_gone(sup, Duration::from_secs(30));
            lock(&self.watched).remove(name);
            let _ = self.children.wait(sup, Duration::from_millis(500));
            let _ = self.update(name, |r| {
                r.last_exit = Some(format!("dumped into image generation {gen}"))
            });
        }
        Ok(info)
    }

    pub fn start(&self, name: &str, cold: bool, who: Caller) -> Result<ServiceInfo, ServiceError> {
        let g = self.begin(name, Operation::Start)?;
        let rec = self.owned(name, who)?;
        if let Some(l) = self.live(name).filter(|l| l.is_standby() && !cold) {
            // Started by hand: the standby is what a start would restore.
            self.resume_live(name, &l)?;
            drop(g);
            return self.info(name);
        }
        if let Some(l) = self.live(name) {
            return Err(ServiceError::Running {
                name: name.into(),
                pid: l.record.root_pid,
            });
        }
        let image = if cold {
            None
        } else {
            self.store.newest_valid(name)
        };
        // A cold boot binds the port itself: an on-demand service's waiting
        // listener lets it go meanwhile.
        let _pause =
            (image.is_none() && rec.config.on_demand.is_some()).then(|| self.ondemand.pause(name));
        let sup = match image {
            Some((gen, _)) => {
                self.restore(name, &rec.config, gen, RestoreAs::Running, STEP_TIMEOUT)?
            }
            None => self.start_cold(name, &rec.config)?,
        };
        lock(&self.watched).insert(name.to_string(), sup);
        let _ = self.update(name, |r| r.last_exit = None);
        drop(g);
        self.info(name)
    }

    /// Restores the newest generation, and only it: a damaged newest image
    /// is an error, not a reason to fall back to an older one or to a cold
    /// boot (an on-demand activation, or its standby instance).
    pub(super) fn restore_newest(
        &self,
        name: &str,
        how: RestoreAs,
    ) -> Result<ServiceInfo, ServiceError> {
        let g = self.begin(name, Operation::Start)?;
        let rec = self.record(name)?;
        if let Some(l) = self.live(name) {
            return Err(ServiceError::Running {
                name: name.into(),
                pid: l.record.root_pid,
            });
        }
        let gen = self
            .store
            .generations(name)
            .last()
            .copied()
            .ok_or_else(|| ServiceError::BadSpec(format!("{name} has no image; prebake it")))?;
        let path = self.store.generation_path(name, gen);
        Metadata::read(&path).map_err(|source| ServiceError::Unrestorable { path, source })?;
        let sup = self.restore(name, &rec.config, gen, how, ACTIVATION_TIMEOUT)?;
        lock(&self.watched).insert(name.to_string(), sup);
        let _ = self.update(name, |r| r.last_exit = None);
        drop(g);
        self.info(name)
    }

    /// Resumes the service's standby instance; returns the service's pid.
    pub(super) fn resume_standby(&self, name: &str) -> Result<i32, ServiceError> {
        let _g = self.begin(name, Operation::Start)?;
        let live = self
            .live(name)
            .ok_or_else(|| ServiceError::NotRunning { name: name.into() })?;
        if !live.is_standby() {
            return Err(ServiceError::Running {
                name: name.into(),
                pid: live.record.root_pid,
            });
        }
        self.resume_live(name, &live)?;
        Ok(live.record.root_pid)
    }

    fn resume_live(&self, name: &str, live: &Live) -> Result<(), ServiceError> {
        crate::control::call(
            &live.instance.control_socket(),
            &crate::control::Request::Resume,
            Duration::from_secs(10),
        )
        .map(drop)
        .map_err(|source| ServiceError::Resume {
            name: name.into(),
            pid: live.record.root_pid,
            source,
        })
    }

    pub(super) fn restore(
        &self,
        name: &str,
        cfg: &ServiceConfig,
        gen: u64,
        how: RestoreAs,
        limit: Duration,
    ) -> Result<i32, ServiceError> {
        let mut c = self.runmh(name, &cfg.cwd);
        c.arg("restore")
            .arg("--images")
            .arg(self.store.generation_path(name, gen))
            .arg("--detach")
            // The service's own log directory, also for a generation made
            // on another host (pulled or migrated), whose paths are that
            // host's.
            .arg("--log-dir")
            .arg(self.log_dir(name));
        if how == RestoreAs::Standby {
            c.arg("--hold");
        }
        c.arg(format!("--stop-timeout={}", self.cfg.stop_timeout));
        match self.run_step_within(name, "restore", c, Expect::Running, limit)? {
            StepReport::Running { supervisor_pid, .. } => Ok(supervisor_pid.raw()),
            // `outcome` let only a running report through.
            other => Err(ServiceError::Runmh {
                op: "restore",
                name: name.into(),
                detail: format!("runmh reported {}", other.describe()),
                log: self.runmh_log(name),
            }),
        }
    }

    fn start_cold(&self, name: &str, cfg: &ServiceConfig) -> Result<i32, ServiceError> {
        let mut c = self.runmh(name, &cfg.cwd);
        c.arg("run");
        self.sandbox_args(&mut c, cfg);
        let offset = self.attach_log(name, "run", &mut c)?;
        let pid = self.children.spawn(&mut c)?;
        let report = self.report_path(name);
        let t0 = Instant::now();
        loop {
            // runmh reports once its service runs, and keeps supervising it.
            if report.exists() {
                return match self.outcome(name, "run", offset, None, Expect::Running)? {
                    StepReport::Running { supervisor_pid, .. } => Ok(supervisor_pid.raw()),
                    other => Err(ServiceError::Runmh {
                        op: "run",
                        name: name.into(),
                        detail: format!("runmh reported {}", other.describe()),
                        log: self.runmh_log(name),
                    }),
                };
            }
            if let Some(s) = self.children.take(pid) {
                return match self.outcome(name, "run", offset, Some(s), Expect::Running) {
                    // Up and already gone: how it ended is the service's
                    // exit status, which `service info` tells.
                    Ok(_) => Ok(pid),
                    Err(e) if report.exists() => Err(e),
                    Err(_) => Err(ServiceError::Runmh {
                        op: "run",
                        name: name.into(),
                        detail: format!("the service ended as soon as it started (runmh {s}); `mhctl service logs {name}` shows its output"),
                        log: self.runmh_log(name),
                    }),
                };
            }
            if t0.elapsed() > COLD_START_TIMEOUT {
                let _ = sys::kill(Pid::from_raw(pid), libc::SIGTERM);
                return Err(ServiceError::Timeout {
                    op: "run",
                    name: name.into(),
                    secs: COLD_START_TIMEOUT.as_secs(),
                    log: self.runmh_log(name),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn stop(&self, name: &str, who: Caller) -> Result<ServiceInfo, ServiceError> {
        let g = self.begin(name, Operation::Stop)?;
        self.owned(name, who)?;
        self.stop_locked(name)?;
        drop(g);
        self.info(name)
    }

    /// [`Self::stop`] for a caller that holds the service's lock.
    fn stop_locked(&self, name: &str) -> Result<(), ServiceError> {
        self.record(name)?;
        let live = self
            .live(name)
            .ok_or_else(|| ServiceError::NotRunning { name: name.into() })?;
        let sup = live.record.supervisor_pid;
        let root = live.record.root_pid;
        // The supervisor forwards SIGTERM and escalates to SIGKILL itself
        // after --stop-timeout; the daemon only steps in if it does not.
        let _ = sys::kill(Pid::from_raw(sup), libc::SIGTERM);
        let grace = Duration::from_secs(self.cfg.stop_timeout + 10);
        let mut how = String::from("stopped on request");
        if !wait_gone(sup, grace) {
            log::warn!("{name}: runmh {sup} did not stop within {} s; killing the service and its supervisor", grace.as_secs());
            let _ = sys::kill(Pid::from_raw(root), libc::SIGKILL);
            if !wait_gone(sup, Duration::from_secs(10)) {
                let _ = sys::kill(Pid::from_raw(sup), libc::SIGKILL);
                wait_gone(sup, Duration::from_secs(10));
            }
            how = "killed on request (it did not stop in time)".into();
        }
        lock(&self.watched).remove(name);
        if let Some(ExitStatus::Exited(c)) = self.children.wait(sup, Duration::from_millis(500)) {
            how = format!("{how}; exit status {c}");
        }
        let _ = self.update(name, |r| r.last_exit = Some(how));
        Ok(())
    }

    pub fn image_rm(
        &self,
        name: &str,
        generation: u64,
        who: Caller,
    ) -> Result<String, ServiceError> {
        let _g = self.begin(name, Operation::ImageRm)?;
        self.owned(name, who)?;
        self.store.remove_generation(name, generation)?;
        Ok(format!("removed image generation {generation} of {name}"))
    }

    fn scratch(&self) -> PathBuf {
        self.cfg.state_dir.join(SCRATCH)
    }

    /// A fresh scratch directory for one transfer, removed when dropped.
    fn scratch_dir(&self, what: &str) -> ScratchDir {
        ScratchDir(self.scratch().join(format!(
            "{what}-{}-{}",
            std::process::id(),
            sys::time::unix_ms()
        )))
    }

    /// Pushes one generation (the newest when `generation` is None).
    pub fn push(
        &self,
        name: &str,
        generation: Option<u64>,
        reference: &str,
        opts: &oci::RegistryOptions,
        progress: oci::ProgressFn<'_>,
        who: Caller,
    ) -> Result<(u64, oci::Pushed), ServiceError> {
        let _g = self.begin(name, Operation::Push)?;
        self.owned(name, who)?;
        let (info, _) = self.store.metadata(name, generation)?;
        let work = self.scratch_dir("push");
        let pushed = oci::push(
            &info.path,
            name,
            info.generation,
            reference,
            opts,
            &work.0,
            progress,
        )?;
        Ok((info.generation, pushed))
    }

    /// Pulls `reference` into a new generation of `as_name` (default: the
    /// service it was pushed from), creating the service from the image's
    /// recorded command when there is none. Verified and validated before
    /// it is published; a failed pull publishes nothing.
    pub fn pull(
        &self,
        reference: &str,
        as_name: Option<&str>,
        opts: &oci::RegistryOptions,
        progress: oci::ProgressFn<'_>,
        who: Caller,
    ) -> Result<(ImageInfo, oci::Pulled, bool), ServiceError> {
        who.require_root(
            "image.pull",
            "CRIU restores whatever credentials and memory an image records, so an image made elsewhere would run as anyone",
        )?;
        if let Some(n) = as_name {
            registry::validate_name(n)?;
        }
        let work = self.scratch_dir("pull");
        let fetched = oci::fetch(reference, &work.0.join("image"), opts, &work.0, progress)?;
        let name = match as_name {
            Some(n) => n.to_string(),
            None => oci::service_of(&fetched.pulled.annotations)
                .ok_or_else(|| ServiceError::NoServiceName {
                    reference: reference.to_string(),
                })?
                .to_string(),
        };
        let _g = self.begin(&name, Operation::Pull)?;
        let created = !lock(&self.records).contains_key(&name);
        if created {
            let rec = ServiceRecord::new(config_from_image(&name, &fetched.pulled.metadata), 0);
            self.registry.save(&rec)?;
            lock(&self.records).insert(name.clone(), rec);
        }
        let (gen, dest) = self.next_generation(&name)?;
        let pulled = fetched.publish_to(&dest)?;
        let info = self.published(&name, gen, dest)?;
        Ok((info, pulled, created))
    }

    /// Whether an image would restore on this host: a local generation, or
    /// a remote image downloaded into scratch space (never published).
    /// Returns what was checked and every difference.
    pub fn check(
        &self,
        local: Option<(&str, Option<u64>)>,
        reference: Option<&str>,
        opts: &oci::RegistryOptions,
        progress: oci::ProgressFn<'_>,
        who: Caller,
    ) -> Result<(String, Vec<compat::Difference>), ServiceError> {
        // The daemon's reaper owns every wait: CRIU's version comes from
        // runmh's cache (warmed before the reaper started), and `criu
        // cpuinfo check` runs as one of the daemon's children.
        let criu = || Criu::discover_cached(self.cfg.criu.as_deref(), &self.runmh_state);
        let mut run = |c: &mut Command| -> std::io::Result<bool> {
            let pid = self.children().spawn(c).map_err(std::io::Error::other)?;
            Ok(self
                .children()
                .wait(pid, Duration::from_secs(60))
                .is_some_and(ExitStatus::success))
        };
        match (local, reference) {
            (Some((name, generation)), None) => {
                let _g = self.begin(name, Operation::Check)?;
                self.owned(name, who)?;
                let criu = criu()?;
                let (info, md) = self.store.metadata(name, generation)?;
                let d = compat::differences_with(
                    &md,
                    &info.path,
                    &criu,
                    compat::CpuCheck::Always,
                    &mut run,
                )?;
                Ok((format!("{name}@{}", info.generation), d))
            }
            (None, Some(r)) => {
                let criu = criu()?;
                let work = self.scratch_dir("check");
                let fetched = oci::fetch(r, &work.0.join("image"), opts, &work.0, progress)?;
                let p = &fetched.pulled;
                let d = compat::differences_with(
                    &p.metadata,
                    &p.dir,
                    &criu,
                    compat::CpuCheck::Always,
                    &mut run,
                )?;
                Ok((p.reference.clone(), d))
            }
            _ => Err(ServiceError::BadSpec(
                "image.check takes either a name (and generation) or a reference".into(),
            )),
        }
    }

    /// The log files `service logs` shows.
    pub fn log_files(
        &self,
        name: &str,
        who: Caller,
    ) -> Result<Vec<(&'static str, PathBuf)>, ServiceError> {
        self.owned(name, who)?;
        let d = self.log_dir(name);
        Ok(vec![
            ("stdout", d.join("stdout.log")),
            ("stderr", d.join("stderr.log")),
        ])
    }
}

/// What a runmh step reports when it succeeds.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// `prebake`, `dump`.
    Published,
    /// `run`, `restore --detach`.
    Running,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Expect::Published => "published {image} or failed {reason}",
            Expect::Running => "running {instance, supervisor_pid, root_pid} or failed {reason}",
        }
    }
    fn matches(self, r: &StepReport) -> bool {
        matches!(
            (self, r),
            (Expect::Published, StepReport::Published { .. })
                | (Expect::Running, StepReport::Running { .. })
        )
    }
}

/// A directory removed when dropped.
struct ScratchDir(PathBuf);
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The service a pulled image implies: its recorded command, its working
/// directory when this host has it (else `/`), its stop point.
fn config_from_image(name: &str, md: &Metadata) -> ServiceConfig {
    let cwd = if md.spec.cwd.is_dir() {
        md.spec.cwd.clone()
    } else {
        PathBuf::from("/")
    };
    let backend = match md.backend.kind {
        BackendKind::Trace => BackendChoice::Trace,
        BackendKind::Notify => BackendChoice::Notify,
        // Dumped at any moment: a prebake of the pulled service picks.
        BackendKind::None => BackendChoice::Auto,
    }
    .as_str()
    .to_string();
    ServiceConfig {
        name: name.to_string(),
        command: md.spec.argv.clone(),
        env: Vec::new(),
        cwd,
        backend,
        stop_at: md
            .stop
            .as_ref()
            .map(|s| s.syscall.clone())
            .unwrap_or_else(|| "listen".into()),
        created_unix_ms: sys::time::unix_ms(),
        // A pulled service starts by hand until `service set --on-demand`.
        on_demand: None,
        // A cold start runs as the image's service did.
        user: (md.spec.uid, md.spec.gid)
            .ne(&(0, 0))
            .then(|| format!("{}:{}", md.spec.uid, md.spec.gid)),
    }
}

/// Polls until `pid` is gone (zombies count as gone); false on timeout.
pub(super) fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while procfs::alive(Pid::from_raw(pid)) {
        if t0.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Checks a `service.create` request the way runmh will see it, so a typo
/// fails now rather than at the first prebake.
fn validate_create(req: &CreateService) -> Result<ServiceConfig, ServiceError> {
    let bad = |s: String| Err(ServiceError::BadSpec(s));
    registry::validate_name(&req.name)?;
    let Some(first) = req.command.first() else {
        return bad("no command given: put it after `--`, e.g. `mhctl service create web -- python3 -m http.server`".into());
    };
    if req.command.iter().any(|a| a.contains('\0')) {
        return bad("an argument contains a NUL byte".into());
    }
    if let Err(e) = req.backend.parse::<BackendChoice>() {
        return bad(e);
    }
    if let Err(e) = StopSyscall::parse(&req.stop_at) {
        return bad(format!("--stop-at {:?}: {e}", req.stop_at));
    }
    if !req.cwd.is_absolute() {
        return bad(format!(
            "the working directory {} is not absolute",
            req.cwd.display()
        ));
    }
    if !req.cwd.is_dir() {
        return bad(format!(
            "the working directory {} does not exist or is not a directory",
            req.cwd.display()
        ));
    }
    let mut path = std::env::var("PATH").unwrap_or_else(|_| crate::spec::DEFAULT_PATH.into());
    for kv in &req.env {
        let (k, v) =
            crate::spec::parse_env(kv).map_err(|e| ServiceError::BadSpec(e.to_string()))?;
        if k == "PATH" {
            path = v;
        }
    }
    // runmh resolves a relative program path against its working
    // directory, which is the service's.
    let resolved = if first.contains('/') {
        crate::spec::resolve_program(&req.cwd.join(first).to_string_lossy(), &path)
    } else {
        crate::spec::resolve_program(first, &path)
    };
    if let Err(e) = resolved {
        return bad(e.to_string());
    }
    if let Some(od) = &req.on_demand {
        super::ondemand::validate(od)?;
    }
    Ok(ServiceConfig {
        on_demand: req.on_demand.clone(),
        name: req.name.clone(),
        command: req.command.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        backend: req.backend.clone(),
        stop_at: req.stop_at.clone(),
        created_unix_ms: crate::sys::time::unix_ms(),
        // The caller's identity decides it (`Caller::run_as`); runmh
        // resolves a name again at each start (the name is what the
        // record keeps).
        user: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, command: &[&str]) -> CreateService {
        CreateService {
            name: name.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: "/".into(),
            backend: "auto".into(),
            stop_at: "listen".into(),
            force: false,
            on_demand: None,
            user: None,
        }
    }

    #[test]
    fn create_requests_are_validated() {
        assert!(validate_create(&req("web", &["sh", "-c", "true"])).is_ok());
        let cases: Vec<(CreateService, &str)> = vec![
            (req("../x", &["sh"]), "invalid service name"),
            (req("web", &[]), "no command given"),
            (
                req("web", &["definitely-not-a-command-xyz"]),
                "command not found",
            ),
            (
                CreateService {
                    backend: "magic".into(),
                    ..req("web", &["sh"])
                },
                "unknown backend",
            ),
            (
                CreateService {
                    stop_at: "nosuchcall".into(),
                    ..req("web", &["sh"])
                },
                "--stop-at",
            ),
            (
                CreateService {
                    cwd: "relative".into(),
                    ..req("web", &["sh"])
                },
                "not absolute",
            ),
            (
                CreateService {
                    cwd: "/nonexistent-dir-xyz".into(),
                    ..req("web", &["sh"])
                },
                "does not exist",
            ),
            (
                CreateService {
                    env: vec!["NOVALUE".into()],
                    ..req("web", &["sh"])
                },
                "KEY=VALUE",
            ),
        ];
        for (r, want) in cases {
            let e = validate_create(&r).unwrap_err();
            assert!(e.to_string().contains(want), "{r:?}: {e}");
        }
        // A relative program path is taken from the service's directory.
        assert!(validate_create(&CreateService {
            cwd: "/bin".into(),
            ..req("web", &["./sh"])
        })
        .is_ok());
    }
}

//! Per-instance state: one directory per running sandbox under the state
//! directory, holding the root mount point, the supervisor's control socket
//! and a record of what runs there. It lives as long as the service.

use crate::images::BackendRecord;
use crate::sandbox::cgroup::InstanceCgroup;
use crate::sandbox::ExternalMount;
use crate::spec::SandboxSpec;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/miehisto/runmh";
const RECORD: &str = "instance.json";
/// Held (a shared flock) by the instance's owners for as long as they
/// live: the runmh that made it (for a restore, also its supervisor). A
/// cleaner's exclusive lock only succeeds once all are gone.
pub const OWNER_LOCK: &str = "owner.lock";
/// Version 1 had no `format_version` field and kept the state as free
/// text, "stopped" meaning the stop point; version 2 names the states.
pub const RECORD_VERSION: u32 = 2;
/// An instance record is a few KiB; anything larger is not one.
const MAX_RECORD_BYTES: u64 = 1 << 20;
/// Where control sockets go when the state directory's path is too long.
pub const SHORT_SOCKET_DIR: &str = "/run/miehisto/ctl";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot create the instance directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("pid {pid} is not a runmh sandbox: no instance under {state_dir} has it as its service or supervisor (dump only works on services started by runmh run, prebake or restore; pass the same --state-dir)")]
    NotFound { pid: i32, state_dir: PathBuf },
}

/// The state directory: `--state-dir`, else `MIEHISTO_STATE_DIR`, else the default.
pub fn state_dir(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os("MIEHISTO_STATE_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Where an instance is in its life, as its record tells other processes
/// (runmh dump, the daemon, benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// A prebake's sandbox is booting towards its stop point.
    Starting,
    /// A prebake's service is held at its stop point, about to be dumped.
    HeldAtStop,
    /// CRIU is restoring the image.
    Restoring,
    /// The service runs under its supervisor.
    Running,
    /// A traced service was frozen and let go for CRIU to dump it.
    Frozen,
    /// A dump of an untraced service is in progress.
    Dumping,
    /// CRIU dumped the service and killed it.
    Dumped,
    /// Restored and held at its stop point, not yet resumed (an on-demand
    /// service's `--standby` instance); the supervisor resumes it when asked.
    Standby,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::HeldAtStop => "held_at_stop",
            InstanceState::Restoring => "restoring",
            InstanceState::Running => "running",
            InstanceState::Frozen => "frozen",
            InstanceState::Dumping => "dumping",
            InstanceState::Dumped => "dumped",
            InstanceState::Standby => "standby",
        }
    }

    /// The service is up, a dump in progress and a held standby included.
    pub fn is_up(self) -> bool {
        matches!(
            self,
            InstanceState::Running
                | InstanceState::Frozen
                | InstanceState::Dumping
                | InstanceState::Standby
        )
    }

    /// A state as record version 1 wrote it.
    fn from_v1(s: &str) -> Option<InstanceState> {
        Some(match s {
            "starting" => InstanceState::Starting,
            // Version 1's only other use of "stopped" was never written to
            // a record: a prebake's service held before its stop syscall.
            "stopped" => InstanceState::HeldAtStop,
            "restoring" => InstanceState::Restoring,
            "running" => InstanceState::Running,
            "frozen" => InstanceState::Frozen,
            "dumping" => InstanceState::Dumping,
            "dumped" => InstanceState::Dumped,
            _ => return None,
        })
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    pub format_version: u32,
    pub id: String,
    pub spec: SandboxSpec,
    pub externals: Vec<ExternalMount>,
    pub backend: BackendRecord,
    /// The image this instance was restored from, if any.
    #[serde(default)]
    pub image: Option<PathBuf>,
    pub supervisor_pid: i32,
    /// For a restore by a runmh of the `--exec-cmd` design (before
    /// 2026-12-02): the `runmh restore` process that started the supervisor
    /// CRIU exec'd, so a user may name either. Now the front process is the
    /// supervisor, and this is None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_pid: Option<i32>,
    /// Host pid of the sandbox's PID 1 (0 until known).
    pub root_pid: i32,
    pub state: InstanceState,
    pub started_unix_ms: u64,
}

/// An instance record as version 1 wrote it: no version field, the state
/// as text.
#[derive(Deserialize)]
struct RecordV1 {
    id: String,
    spec: SandboxSpec,
    externals: Vec<ExternalMount>,
    backend: BackendRecord,
    #[serde(default)]
    image: Option<PathBuf>,
    supervisor_pid: i32,
    #[serde(default)]
    front_pid: Option<i32>,
    root_pid: i32,
    state: String,
    started_unix_ms: u64,
}

impl InstanceRecord {
    /// Parses a record of any version this runmh knows.
    pub fn parse(bytes: &[u8]) -> Result<InstanceRecord, String> {
        #[derive(Deserialize)]
        struct Probe {
            #[serde(default)]
            format_version: Option<u32>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        match probe.format_version {
            None => {
                let v1: RecordV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
                let state = InstanceState::from_v1(&v1.state).ok_or_else(|| {
                    format!(
                        "unknown instance state {:?} (version 1 knew starting, stopped, restoring, running, frozen, dumping, dumped)",
                        v1.state
                    )
                })?;
                Ok(InstanceRecord {
                    format_version: RECORD_VERSION,
                    id: v1.id,
                    spec: v1.spec,
                    externals: v1.externals,
                    backend: v1.backend,
                    image: v1.image,
                    supervisor_pid: v1.supervisor_pid,
                    front_pid: v1.front_pid,
                    root_pid: v1.root_pid,
                    state,
                    started_unix_ms: v1.started_unix_ms,
                })
            }
            Some(RECORD_VERSION) => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            Some(v) => Err(format!(
                "format version {v}, this runmh reads versions 1 and {RECORD_VERSION}; use a matching runmh"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_socket_path_always_fits_a_unix_address() {
        let short = Instance::open(Path::new("/tmp/s/instances/1-2")).unwrap();
        assert_eq!(
            short.control_socket(),
            Path::new("/tmp/s/instances/1-2/control.sock")
        );
        let deep = "/tmp/".to_string() + &"d".repeat(120) + "/instances/1795-42";
        let long = Instance::open(Path::new(&deep)).unwrap();
        assert!(Instance::open(Path::new("/")).is_err());
        assert_eq!(
            long.control_socket(),
            Path::new("/run/miehisto/ctl/1795-42.sock")
        );
        assert!(long.control_socket().as_os_str().len() < 100);
    }

    /// Written by runmh 0.1.0 (record version 1) for a restored service.
    const V1_RECORD: &str = include_str!("../tests/fixtures/v1/instance.json");

    #[test]
    fn a_version_1_record_still_reads() {
        let rec = InstanceRecord::parse(V1_RECORD.as_bytes()).unwrap();
        assert_eq!(rec.format_version, RECORD_VERSION);
        assert_eq!(rec.id, "1796125489262-19484");
        assert_eq!(rec.state, InstanceState::Running);
        assert_eq!(rec.backend.kind, crate::stop::BackendKind::Trace);
        assert_eq!(rec.root_pid, 19500);
        assert_eq!(rec.front_pid, Some(19484));
        assert_eq!(rec.image.as_deref(), Some(Path::new("/tmp/s10core/img")));

        // Version 1's "stopped" was a prebake held at its stop point.
        let held = V1_RECORD.replace("\"state\": \"running\"", "\"state\": \"stopped\"");
        let rec = InstanceRecord::parse(held.as_bytes()).unwrap();
        assert_eq!(rec.state, InstanceState::HeldAtStop);

        let bad = V1_RECORD.replace("\"state\": \"running\"", "\"state\": \"sleeping\"");
        let e = InstanceRecord::parse(bad.as_bytes()).unwrap_err();
        assert!(e.contains("unknown instance state \"sleeping\""), "{e}");
    }

    #[test]
    fn a_record_round_trips_and_a_future_version_is_refused() {
        let mut rec = InstanceRecord::parse(V1_RECORD.as_bytes()).unwrap();
        rec.state = InstanceState::HeldAtStop;
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains("\"state\":\"held_at_stop\""), "{text}");
        assert!(text.contains("\"format_version\":2"), "{text}");
        assert_eq!(InstanceRecord::parse(text.as_bytes()).unwrap(), rec);

        let future = text.replace("\"format_version\":2", "\"format_version\":3");
        let e = InstanceRecord::parse(future.as_bytes()).unwrap_err();
        assert!(e.contains("format version 3"), "{e}");
        // A version 2 record does not fall back to the old state names.
        let old_name = text.replace("held_at_stop", "stopped");
        assert!(InstanceRecord::parse(old_name.as_bytes()).is_err());
    }
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub dir: PathBuf,
    /// This process's hold on [`OWNER_LOCK`], when it owns the instance:
    /// held for as long as it lives, never read (and never inherited by
    /// children: close-on-exec).
    _lock: Option<Arc<OwnedFd>>,
    /// The instance's cgroup, when the system gave it one.
    pub cgroup: Option<InstanceCgroup>,
}

/// What [`clean_dead`] found and ended: an instance whose owner is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub id: String,
    pub state: Option<InstanceState>,
    /// The processes it killed (the cgroup's, or the recorded root's).
    pub killed: Vec<i32>,
}

/// Opens (creating it) the owner lock of the instance directory `dir`.
fn open_lock(dir: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(OWNER_LOCK))
        .map(OwnedFd::from)
}

/// A shared hold on the owner lock of `dir`.
fn take_shared(dir: &Path) -> std::io::Result<OwnedFd> {
    let fd = open_lock(dir)?;
    match crate::sys::try_flock(fd.as_raw_fd(), false) {
        Ok(true) => Ok(fd),
        Ok(false) => Err(std::io::Error::other(
            "its owner lock is held by a cleaner: its owners were gone",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Whether the instance in `dir` has lost its owners: the process that
/// named it (`<ms>-<pid>`) is gone (while it lives it holds the lock, or is
/// about to take it), and nobody else holds the lock (a process it forked
/// that shares the lock's open file may outlive it). Returns the lock,
/// taken exclusively, when the file exists.
fn take_if_dead(dir: &Path, id: &str) -> Option<Option<OwnedFd>> {
    let creator: i32 = id.rsplit_once('-')?.1.parse().ok()?;
    if crate::sys::procfs::alive(nix::unistd::Pid::from_raw(creator)) {
        return None;
    }
    if !dir.join(OWNER_LOCK).exists() {
        return Some(None);
    }
    let fd = open_lock(dir).ok()?;
    match crate::sys::try_flock(fd.as_raw_fd(), true) {
        Ok(true) => Some(Some(fd)),
        _ => None,
    }
}

/// Ends what runmh processes that died without cleaning up (SIGKILL, a
/// crash) left under `state_dir`: every instance whose owner is gone has
/// its cgroup killed and removed, then its directory. A live owner's
/// instance is never touched. Called by runmh before each run and by the
/// daemon on start; each one cleaned is logged with what was killed.
pub fn clean_dead(state_dir: &Path) -> Vec<Cleaned> {
    let Ok(rd) = std::fs::read_dir(state_dir.join("instances")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let dir = e.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if !crate::sandbox::cgroup::valid_id(&id) {
            continue;
        }
        // Held until the directory is gone: a second cleaner finds it locked.
        let Some(lock) = take_if_dead(&dir, &id) else {
            continue;
        };
        let inst = Instance {
            cgroup: InstanceCgroup::existing(&id),
            id: id.clone(),
            dir: dir.clone(),
            _lock: lock.map(Arc::new),
        };
        let rec = inst.read_record().ok();
        let mut killed = Vec::new();
        let mut how = String::new();
        match &inst.cgroup {
            Some(cg) => match cg.destroy() {
                Ok(pids) => {
                    killed = pids;
                    how = format!(" in {}", cg.path.display());
                }
                Err(e) => log::warn!(
                    "cannot end the instance {id} left by a dead runmh: {}",
                    crate::error_chain(&e)
                ),
            },
            // No cgroup: the recorded root, if it still is a namespace's init.
            None => {
                if let Some(root) = rec.as_ref().map(|r| r.root_pid).filter(|&p| p > 0) {
                    let pid = nix::unistd::Pid::from_raw(root);
                    let is_init = crate::sys::procfs::status(pid)
                        .is_ok_and(|s| s.ns_pids.len() > 1 && s.ns_pids.last() == Some(&1));
                    if is_init && crate::sys::kill(pid, nix::libc::SIGKILL).is_ok() {
                        killed.push(root);
                        how = " (its recorded PID 1)".into();
                    }
                }
            }
        }
        let state = rec.as_ref().map(|r| r.state);
        let state_text = state.map_or_else(|| "unrecorded".to_string(), |s| s.to_string());
        if killed.is_empty() {
            log::warn!(
                "removed the instance {id} ({state_text}) left by a runmh that ended without cleaning up; nothing of it was running"
            );
        } else {
            log::warn!(
                "removed the instance {id} ({state_text}) left by a runmh that ended without cleaning up: killed pids {killed:?}{how}"
            );
        }
        inst.remove();
        out.push(Cleaned { id, state, killed });
    }
    out
}

impl Instance {
    /// Makes a new instance owned by this process: its directory, the owner
    /// lock (held until this process and whatever inherited the lock end),
    /// and its cgroup where the system has one.
    pub fn create(state_dir: &Path) -> Result<Instance, InstanceError> {
        let id = format!("{}-{}", crate::sys::time::unix_ms(), std::process::id());
        let dir = state_dir.join("instances").join(&id);
        let created = |source| InstanceError::Create {
            path: dir.clone(),
            source,
        };
        crate::files::private_dir(&dir.join("root")).map_err(created)?;
        let lock = match take_shared(&dir) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(created(e));
            }
        };
        let cgroup = match InstanceCgroup::create(&id) {
            Ok(cg) => Some(cg),
            Err(e) => {
                crate::sandbox::cgroup::warn_unavailable(&e);
                None
            }
        };
        Ok(Instance {
            id,
            dir,
            _lock: Some(Arc::new(lock)),
            cgroup,
        })
    }

    /// The instance in `dir`, named by its last component.
    pub fn open(dir: &Path) -> Result<Instance, InstanceError> {
        let id =
            dir.file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| InstanceError::Corrupt {
                    path: dir.to_path_buf(),
                    detail: "not an instance directory (it needs a name of its own)".into(),
                })?;
        Ok(Instance {
            cgroup: InstanceCgroup::existing(id),
            id: id.to_string(),
            dir: dir.to_path_buf(),
            _lock: None,
        })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// The supervisor's control socket: in the instance directory when the
    /// path fits a UNIX socket address (108 bytes with the NUL), otherwise
    /// under /run/miehisto/ctl, named by the (machine-unique) instance id.
    pub fn control_socket(&self) -> PathBuf {
        let local = self.dir.join("control.sock");
        if local.as_os_str().len() < 100 {
            local
        } else {
            Path::new(SHORT_SOCKET_DIR).join(format!("{}.sock", self.id))
        }
    }
    /// Where CRIU writes the restored root's host pid.
    pub fn restored_pidfile(&self) -> PathBuf {
        self.dir.join("restored.pid")
    }
    /// The default log directory of services started cold by runmh.
    pub fn default_log_dir(state_dir: &Path, id: &str) -> PathBuf {
        state_dir.join("logs").join(id)
    }

    pub fn write_record(&self, rec: &InstanceRecord) -> Result<(), InstanceError> {
        let path = self.dir.join(RECORD);
        let text = serde_json::to_vec_pretty(rec).map_err(|e| InstanceError::Write {
            path: path.clone(),
            source: e.into(),
        })?;
        crate::files::write_replace(&path, &text)
            .map_err(|source| InstanceError::Write { path, source })
    }

    pub fn read_record(&self) -> Result<InstanceRecord, InstanceError> {
        let path = self.dir.join(RECORD);
        let read = |source| InstanceError::Read {
            path: path.clone(),
            source,
        };
        let size = std::fs::metadata(&path).map_err(read)?.len();
        if size > MAX_RECORD_BYTES {
            return Err(InstanceError::Corrupt {
                path,
                detail: format!("{size} bytes, larger than the {MAX_RECORD_BYTES}-byte limit"),
            });
        }
        let bytes = std::fs::read(&path).map_err(read)?;
        InstanceRecord::parse(&bytes).map_err(|detail| InstanceError::Corrupt { path, detail })
    }

    /// Removes the instance directory (its root and staging directories
    /// are only ever mounted on inside private mount namespaces that are
    /// gone by now: the sandbox's and CRIU's).
    pub fn remove(&self) {
        // The cgroup first: a directory without one is what a cleaner
        // looks for, never a cgroup without its directory.
        if let Some(cg) = &self.cgroup {
            match cg.destroy() {
                Ok(killed) if !killed.is_empty() => log::info!(
                    "instance {}: killed pids {killed:?} left in {}",
                    self.id,
                    cg.path.display()
                ),
                Ok(_) => {}
                Err(e) => {
                    // Without its directory nothing would ever find the
                    // cgroup again: keep the directory (and its record)
                    // for the next cleaner, which retries the whole end.
                    log::warn!(
                        "instance {}: {}; its directory {} is kept so that the next cleanup retries",
                        self.id,
                        crate::error_chain(&e),
                        self.dir.display()
                    );
                    return;
                }
            }
        }
        let sock = self.control_socket();
        if !sock.starts_with(&self.dir) {
            let _ = std::fs::remove_file(&sock);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Every instance under the state directory.
    pub fn list(state_dir: &Path) -> Vec<(Instance, InstanceRecord)> {
        let Ok(rd) = std::fs::read_dir(state_dir.join("instances")) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let inst = Instance::open(&e.path()).ok()?;
                let rec = inst.read_record().ok()?;
                Some((inst, rec))
            })
            .collect()
    }

    /// The instance whose service root or supervisor has host pid `pid`.
    pub fn find_by_pid(
        state_dir: &Path,
        pid: i32,
    ) -> Result<(Instance, InstanceRecord), InstanceError> {
        Instance::list(state_dir)
            .into_iter()
            .find(|(_, r)| r.root_pid == pid || r.supervisor_pid == pid || r.front_pid == Some(pid))
            .ok_or_else(|| InstanceError::NotFound {
                pid,
                state_dir: state_dir.to_path_buf(),
            })
    }
}

//! Per-instance state: one directory per running sandbox under the state
//! directory, holding the root mount point, the supervisor's control socket
//! and a record of what runs there. It lives as long as the service.

use crate::images::BackendRecord;
use crate::sandbox::ExternalMount;
use crate::spec::SandboxSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/miehisto/runmh";
const RECORD: &str = "instance.json";
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    pub id: String,
    pub spec: SandboxSpec,
    pub externals: Vec<ExternalMount>,
    pub backend: BackendRecord,
    /// The image this instance was restored from, if any.
    #[serde(default)]
    pub image: Option<PathBuf>,
    pub supervisor_pid: i32,
    /// For a restore: the `runmh restore` process that started it (it waits
    /// for the supervisor unless detached), so a user may name either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front_pid: Option<i32>,
    /// Host pid of the sandbox's PID 1 (0 until known).
    pub root_pid: i32,
    pub state: String,
    pub started_unix_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_socket_path_always_fits_a_unix_address() {
        let short = Instance::open(Path::new("/tmp/s/instances/1-2"));
        assert_eq!(
            short.control_socket(),
            Path::new("/tmp/s/instances/1-2/control.sock")
        );
        let deep = "/tmp/".to_string() + &"d".repeat(120) + "/instances/1795-42";
        let long = Instance::open(Path::new(&deep));
        assert_eq!(
            long.control_socket(),
            Path::new("/run/miehisto/ctl/1795-42.sock")
        );
        assert!(long.control_socket().as_os_str().len() < 100);
    }
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub dir: PathBuf,
}

impl Instance {
    pub fn create(state_dir: &Path) -> Result<Instance, InstanceError> {
        let id = format!("{}-{}", crate::sys::time::unix_ms(), std::process::id());
        let dir = state_dir.join("instances").join(&id);
        std::fs::create_dir_all(dir.join("root")).map_err(|source| InstanceError::Create {
            path: dir.clone(),
            source,
        })?;
        Ok(Instance { id, dir })
    }

    pub fn open(dir: &Path) -> Instance {
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Instance {
            id,
            dir: dir.to_path_buf(),
        }
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
        let tmp = self.dir.join(".instance.json.tmp");
        let text = serde_json::to_vec_pretty(rec).map_err(|e| InstanceError::Write {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&tmp, text).map_err(|source| InstanceError::Write {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| InstanceError::Write { path, source })
    }

    pub fn read_record(&self) -> Result<InstanceRecord, InstanceError> {
        let path = self.dir.join(RECORD);
        let bytes = std::fs::read(&path).map_err(|source| InstanceError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| InstanceError::Corrupt {
            path,
            detail: e.to_string(),
        })
    }

    /// Removes the instance directory. The root mount point is only ever
    /// mounted inside private mount namespaces, so nothing is mounted here
    /// from the caller's view; an unmount is attempted anyway for the
    /// restored supervisor, which lives in the namespace that has it.
    pub fn remove(&self) {
        if let Ok(c) = std::ffi::CString::new(self.root().as_os_str().as_encoded_bytes()) {
            let _ = crate::sys::umount2(&c, nix::libc::MNT_DETACH);
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
                let inst = Instance::open(&e.path());
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

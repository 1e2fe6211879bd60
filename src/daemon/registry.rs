//! The persistent service registry: one JSON file per service under
//! `<state>/services/`, each replaced atomically (write a temporary file,
//! fsync, rename), so a crash leaves the old record or the new one.
//!
//! The registry holds what the user declared (the command, backend, stop
//! syscall) and a little history (the last generation number handed out,
//! how the last run ended). Whether a service runs is not stored here: it
//! is read from runmh's instance records and /proc each time, so a daemon
//! that restarts cannot believe a stale "running".

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT_VERSION: u32 = 1;
/// A record is a few hundred bytes; anything much larger is not ours.
const MAX_RECORD_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid service name {name:?}: {why}; use 1 to 64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit")]
    BadName { name: String, why: &'static str },
    #[error("cannot create the registry directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the service record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the service record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service record {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot remove the service record {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks a service name: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, never `..`.
/// Names become directory names, so nothing that could climb out of one.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let bad = |why| {
        Err(RegistryError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 64 {
        return bad("it is longer than 64 characters");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name.contains("..") {
        return bad("it contains '..'");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("it must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return bad("it contains a character other than A-Z a-z 0-9 _ . -");
    }
    Ok(())
}

/// What the user declared with `service create`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub backend: String,
    pub stop_at: String,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<super::api::OnDemandConfig>,
    /// `USER[:GROUP]` the service runs as (runmh's `-u`); none: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// One service's file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub format_version: u32,
    pub config: ServiceConfig,
    /// The highest generation number ever handed out, so a removed
    /// generation's number is never reused for a different image.
    #[serde(default)]
    pub last_generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// The uid of the client that created the service: only it and root
    /// see and touch it. Records written before owners were recorded have
    /// none and are root's (uid 0).
    #[serde(default)]
    pub owner_uid: u32,
}

impl ServiceRecord {
    pub fn new(config: ServiceConfig, owner_uid: u32) -> ServiceRecord {
        ServiceRecord {
            format_version: FORMAT_VERSION,
            config,
            last_generation: 0,
            last_exit: None,
            owner_uid,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl RegistryError {
    /// The service whose record this error is about, when it is one.
    pub fn service_name(&self) -> Option<String> {
        match self {
            RegistryError::Corrupt { path, .. } | RegistryError::Read { path, .. } => path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string),
            _ => None,
        }
    }
}

impl Registry {
    pub fn open(state_dir: &Path) -> Result<Registry, RegistryError> {
        let dir = state_dir.join("services");
        std::fs::create_dir_all(&dir).map_err(|source| RegistryError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Registry { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub fn save(&self, rec: &ServiceRecord) -> Result<(), RegistryError> {
        validate_name(&rec.config.name)?;
        let path = self.path(&rec.config.name);
        let text = serde_json::to_vec_pretty(rec).map_err(|e| RegistryError::Write {
            path: path.clone(),
            source: e.into(),
        })?;
        // Durable before it replaces the old record (a crash right after
        // the rename must not leave an empty file), and no temporary file
        // left when the disk is full.
        crate::files::write_atomic(&path, &text)
            .map_err(|source| RegistryError::Write { path, source })
    }

    pub fn load(&self, name: &str) -> Result<Option<ServiceRecord>, RegistryError> {
        validate_name(name)?;
        let path = self.path(name);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RegistryError::Read { path, source }),
        };
        if size > MAX_RECORD_BYTES {
            return Err(RegistryError::Corrupt {
                path,
                detail: format!("{size} bytes, larger than any service record"),
            });
        }
        let bytes = std::fs::read(&path).map_err(|source| RegistryError::Read {
            path: path.clone(),
            source,
        })?;
        let rec: ServiceRecord =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if rec.format_version != FORMAT_VERSION {
            return Err(RegistryError::Corrupt {
                path,
                detail: format!(
                    "format version {} (this daemon reads {FORMAT_VERSION})",
                    rec.format_version
                ),
            });
        }
        if rec.config.name != name {
            return Err(RegistryError::Corrupt {
                path,
                detail: format!("it names the service {:?}", rec.config.name),
            });
        }
        Ok(Some(rec))
    }

    /// Every readable record, with the problems of the unreadable ones.
    pub fn load_all(&self) -> (Vec<ServiceRecord>, Vec<RegistryError>) {
        let mut recs = Vec::new();
        let mut errs = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return (recs, errs);
        };
        for e in rd.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if crate::files::is_stale_temp(&file) {
                // A temporary file of an interrupted save (one daemon per
                // state directory: no save of ours is under way yet).
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if file.starts_with('.') {
                continue;
            }
            match self.load(name) {
                Ok(Some(r)) => recs.push(r),
                Ok(None) => {}
                Err(err) => errs.push(err),
            }
        }
        recs.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        (recs, errs)
    }

    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        validate_name(name)?;
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RegistryError::Remove { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["web", "a", "A1", "my-svc_2.prod", &"x".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a..b",
            ".hidden",
            "-x",
            "_x",
            "sp ace",
            "é",
            &"x".repeat(65),
            "a\0b",
        ] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("invalid service name"), "{bad}: {e}");
        }
    }

    #[test]
    fn records_are_saved_atomically_and_read_back() {
        let dir = std::env::temp_dir().join(format!("mh-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reg = Registry::open(&dir).unwrap();
        let cfg = ServiceConfig {
            name: "web".into(),
            command: vec!["python3".into(), "-m".into(), "http.server".into()],
            env: vec!["A=1".into()],
            cwd: "/".into(),
            backend: "auto".into(),
            stop_at: "listen".into(),
            created_unix_ms: 1,
            on_demand: None,
            user: Some("nobody:nogroup".into()),
        };
        let mut rec = ServiceRecord::new(cfg, 65534);
        reg.save(&rec).unwrap();
        rec.last_generation = 3;
        reg.save(&rec).unwrap();
        assert_eq!(reg.load("web").unwrap(), Some(rec.clone()));
        assert_eq!(reg.load("nope").unwrap(), None);
        std::fs::write(dir.join("services/broken.json"), b"{").unwrap();
        let (all, errs) = reg.load_all();
        assert_eq!(all, vec![rec]);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].to_string().contains("corrupt"), "{}", errs[0]);
        reg.remove("web").unwrap();
        assert_eq!(reg.load("web").unwrap(), None);
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("services"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("broken.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_without_owner_or_user_is_roots() {
        let dir = std::env::temp_dir().join(format!("mh-registry-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let reg = Registry::open(&dir).unwrap();
        // As written before owners and users were recorded.
        std::fs::write(
            dir.join("services/old.json"),
            br#"{"format_version":1,"config":{"name":"old","command":["sh"],"env":[],"cwd":"/","backend":"auto","stop_at":"listen","created_unix_ms":1},"last_generation":2}"#,
        )
        .unwrap();
        let rec = reg.load("old").unwrap().unwrap();
        assert_eq!(rec.owner_uid, 0);
        assert_eq!(rec.config.user, None);
        assert_eq!(rec.last_generation, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

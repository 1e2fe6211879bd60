//! The CRIU executor: finds a usable CRIU, builds its command lines, runs
//! it, and turns its log into typed errors that quote the decisive line.

pub mod argv;
pub mod log;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use argv::{DumpArgs, RestoreArgs};

/// The oldest CRIU that works on this kernel (platform.md: 3.17 fails its
/// vDSO check on 6.13+, 4.1 cannot dump TCP sockets on 6.16+).
pub const MIN_VERSION: Version = Version(4, 2, 0);

/// What to run to get a good CRIU.
pub const SETUP_HINT: &str = "run `bash setup/install.sh` (or pass --criu PATH / set MIEHISTO_CRIU)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// Parses `criu --version` output ("Version: 4.2\n" or "Version: 4.2.1").
    pub fn parse_output(text: &str) -> Option<Version> {
        let v = text.lines().find_map(|l| l.trim().strip_prefix("Version:"))?.trim();
        let mut it = v.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
        let major = it.next()?.ok()?;
        let minor = it.next().and_then(|r| r.ok()).unwrap_or(0);
        let patch = it.next().and_then(|r| r.ok()).unwrap_or(0);
        Some(Version(major, minor, patch))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("no CRIU found (looked at {looked}); {SETUP_HINT}")]
    NotFound { looked: String },
    #[error("CRIU at {path} could not be run; {SETUP_HINT}")]
    Unrunnable { path: PathBuf, #[source] source: std::io::Error },
    #[error("CRIU at {path} did not report a version; {SETUP_HINT}")]
    NoVersion { path: PathBuf },
    #[error("CRIU at {path} is version {found}, but this kernel needs >= {MIN_VERSION}; {SETUP_HINT}")]
    TooOld { path: PathBuf, found: Version },
    #[error("`criu check` failed for {path}: {line}; {SETUP_HINT}")]
    CheckFailed { path: PathBuf, line: String },
    #[error("criu dump of pid {pid} failed: {line} (log: {log})")]
    DumpFailed { pid: i32, line: String, log: PathBuf },
    #[error("criu restore from {images} failed: {line} (log: {log})")]
    RestoreFailed { images: PathBuf, line: String, log: PathBuf },
    #[error("cannot start criu at {path}")]
    Spawn { path: PathBuf, #[source] source: std::io::Error },
}

/// A located, version-checked CRIU.
#[derive(Debug, Clone)]
pub struct Criu {
    pub path: PathBuf,
    pub version: Version,
}

/// Where the set-up step installs its private CRIU, relative to the repository.
pub fn private_prefix_criu() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/criu/sbin/criu")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

impl Criu {
    /// Finds CRIU: `explicit` (--criu), then `MIEHISTO_CRIU`, then the
    /// set-up step's private prefix, then `PATH`; checks its version.
    pub fn discover(explicit: Option<&Path>) -> Result<Criu, CriuError> {
        let mut looked = Vec::new();
        let candidate = if let Some(p) = explicit {
            Some(p.to_path_buf())
        } else if let Some(p) = std::env::var_os("MIEHISTO_CRIU").filter(|v| !v.is_empty()) {
            Some(PathBuf::from(p))
        } else {
            looked.push("--criu".to_string());
            looked.push("$MIEHISTO_CRIU".to_string());
            let private = private_prefix_criu();
            looked.push(private.display().to_string());
            if private.is_file() {
                Some(private)
            } else {
                looked.push("PATH".to_string());
                find_on_path("criu")
            }
        };
        let path = candidate.ok_or_else(|| CriuError::NotFound { looked: looked.join(", ") })?;
        Criu::at(&path)
    }

    /// Checks the CRIU at `path`.
    pub fn at(path: &Path) -> Result<Criu, CriuError> {
        let out = Command::new(path)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Unrunnable { path: path.to_path_buf(), source })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = Version::parse_output(&text).ok_or_else(|| CriuError::NoVersion { path: path.to_path_buf() })?;
        if version < MIN_VERSION {
            return Err(CriuError::TooOld { path: path.to_path_buf(), found: version });
        }
        Ok(Criu { path: path.to_path_buf(), version })
    }

    /// Runs `criu check`; the first error line on failure.
    pub fn check(&self) -> Result<(), CriuError> {
        let out = Command::new(&self.path)
            .arg("check")
            .output()
            .map_err(|source| CriuError::Unrunnable { path: self.path.clone(), source })?;
        if out.status.success() {
            return Ok(());
        }
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let line = log::decisive_line(&text).unwrap_or_else(|| format!("exit {}", out.status));
        Err(CriuError::CheckFailed { path: self.path.clone(), line })
    }

    pub fn command(&self) -> Command {
        Command::new(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(Version::parse_output("Version: 4.2\n"), Some(Version(4, 2, 0)));
        assert_eq!(Version::parse_output("Version: 4.2.1\nGitID: v4.2.1\n"), Some(Version(4, 2, 1)));
        assert_eq!(Version::parse_output("Version: 3.17.1"), Some(Version(3, 17, 1)));
        assert_eq!(Version::parse_output("nothing"), None);
        assert!(Version(3, 17, 1) < MIN_VERSION && Version(4, 1, 1) < MIN_VERSION && Version(4, 3, 0) >= MIN_VERSION);
    }

    #[test]
    fn old_or_missing_criu_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("mh-fakecriu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&fake).unwrap().permissions(), 0o755);
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = Criu::at(&fake).unwrap_err();
        assert!(matches!(e, CriuError::TooOld { found: Version(3, 17, 1), .. }), "{e}");
        assert!(e.to_string().contains("setup/install.sh"), "{e}");
        let e = Criu::at(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, CriuError::Unrunnable { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

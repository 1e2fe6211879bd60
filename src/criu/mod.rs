//! The CRIU executor: finds a usable CRIU, builds its command lines, runs
//! it, and turns its log into typed errors that quote the decisive line.

pub mod argv;
pub mod kdat;
pub mod log;
pub mod private_root;
pub mod watchdog;

use std::path::{Path, PathBuf};
use std::process::Command;

pub use argv::{DumpArgs, RestoreArgs};

/// The oldest CRIU that works on current kernels: 3.17 fails its vDSO check
/// on 6.13+ ("Unexpected rt vDSO area bounds": the vvar area was split,
/// fixed in CRIU 4.1), and 4.1 cannot dump a TCP socket on 6.16+ (the
/// kernel refuses SO_PASSCRED/SO_PASSSEC on inet sockets, "Can't get 1:16
/// opt: Operation not supported").
pub const MIN_VERSION: Version = Version(4, 2, 0);

/// What to run to get a good CRIU.
pub const SETUP_HINT: &str =
    "run `bash setup/install.sh` (or pass --criu PATH / set MIEHISTO_CRIU)";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// Parses `criu --version` output ("Version: 4.2\n" or "Version: 4.2.1").
    pub fn parse_output(text: &str) -> Option<Version> {
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))?
            .trim();
        let mut it = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u32>());
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
    Unrunnable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU at {path} did not report a version; {SETUP_HINT}")]
    NoVersion { path: PathBuf },
    #[error(
        "CRIU at {path} is version {found}, but this kernel needs >= {MIN_VERSION}; {SETUP_HINT}"
    )]
    TooOld { path: PathBuf, found: Version },
    #[error("`criu check` failed for {path}: {line}; {SETUP_HINT}")]
    CheckFailed { path: PathBuf, line: String },
    #[error("criu dump of pid {pid} failed: {line} (log: {log})")]
    DumpFailed {
        pid: i32,
        line: String,
        log: PathBuf,
    },
    #[error("criu restore from {images} failed: {line} (log: {log})")]
    RestoreFailed {
        images: PathBuf,
        line: String,
        log: PathBuf,
    },
    #[error("cannot create the staging directory {path} of an external mount")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the restore root {path} contains a NUL byte")]
    Root { path: PathBuf },
    #[error("cannot read the pid CRIU wrote to {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu {action} was ended because {ending}")]
    Ended {
        action: &'static str,
        ending: watchdog::Ending,
    },
    #[error("invalid CRIU limits: {0}")]
    Limits(String),
    #[error("cannot start criu at {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A one-line identity of a binary: its canonical path, device, inode,
/// size and times. Replacing or rebuilding the binary changes it.
pub fn binary_identity(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let exe = crate::files::canonical(path)?;
    let m = std::fs::metadata(&exe)?;
    // Debug formatting quotes the path: the identity stays on one line.
    Ok(format!(
        "{:?} dev={} ino={} size={} mtime={}.{} ctime={}.{}",
        exe,
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// Name of the version cache [`Criu::discover_cached`] keeps in its directory.
pub const VERSION_CACHE: &str = "criu-version";

impl Criu {
    /// Finds CRIU: `explicit` (--criu), then `MIEHISTO_CRIU`, then the
    /// set-up step's private prefix, then `PATH`; checks its version.
    pub fn discover(explicit: Option<&Path>) -> Result<Criu, CriuError> {
        Criu::at(&Criu::locate(explicit)?)
    }

    /// Like [`Criu::discover`], but remembers the version of the binary in
    /// `cache_dir`, keyed by [`binary_identity`]: running `criu --version`
    /// costs about 10 ms, which every restore paid before its CRIU started.
    /// The same checks apply; a replaced binary is run and checked again.
    pub fn discover_cached(explicit: Option<&Path>, cache_dir: &Path) -> Result<Criu, CriuError> {
        let path = Criu::locate(explicit)?;
        let Ok(id) = binary_identity(&path) else {
            return Criu::at(&path);
        };
        let file = cache_dir.join(VERSION_CACHE);
        let cached = std::fs::read_to_string(&file).ok().and_then(|text| {
            let (key, version) = text.split_once('\n')?;
            (key == id)
                .then(|| Version::parse_output(version))
                .flatten()
        });
        if let Some(version) = cached {
            if version < MIN_VERSION {
                return Err(CriuError::TooOld {
                    path,
                    found: version,
                });
            }
            return Ok(Criu { path, version });
        }
        let criu = Criu::at(&path)?;
        // Best effort: without the cache the next run asks CRIU again.
        let tmp = cache_dir.join(format!(".{VERSION_CACHE}.{}.tmp", std::process::id()));
        let saved = std::fs::create_dir_all(cache_dir)
            .and_then(|_| std::fs::write(&tmp, format!("{id}\nVersion: {}\n", criu.version)))
            .and_then(|_| std::fs::rename(&tmp, &file));
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&tmp);
            ::log::debug!("cannot save CRIU's version to {}: {e}", file.display());
        }
        Ok(criu)
    }

    /// Where [`Criu::discover`] finds CRIU, unchecked.
    pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, CriuError> {
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
        candidate.ok_or_else(|| CriuError::NotFound {
            looked: looked.join(", "),
        })
    }

    /// Checks the CRIU at `path`.
    pub fn at(path: &Path) -> Result<Criu, CriuError> {
        let out = Command::new(path)
            .arg("--version")
            .output()
            .map_err(|source| CriuError::Unrunnable {
                path: path.to_path_buf(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = Version::parse_output(&text).ok_or_else(|| CriuError::NoVersion {
            path: path.to_path_buf(),
        })?;
        if version < MIN_VERSION {
            return Err(CriuError::TooOld {
                path: path.to_path_buf(),
                found: version,
            });
        }
        Ok(Criu {
            path: path.to_path_buf(),
            version,
        })
    }

    /// Runs `criu check`; the first error line on failure.
    pub fn check(&self) -> Result<(), CriuError> {
        let out = Command::new(&self.path)
            .arg("check")
            .output()
            .map_err(|source| CriuError::Unrunnable {
                path: self.path.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let line = log::decisive_line(&text).unwrap_or_else(|| format!("exit {}", out.status));
        Err(CriuError::CheckFailed {
            path: self.path.clone(),
            line,
        })
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
        assert_eq!(
            Version::parse_output("Version: 4.2\n"),
            Some(Version(4, 2, 0))
        );
        assert_eq!(
            Version::parse_output("Version: 4.2.1\nGitID: v4.2.1\n"),
            Some(Version(4, 2, 1))
        );
        assert_eq!(
            Version::parse_output("Version: 3.17.1"),
            Some(Version(3, 17, 1))
        );
        assert_eq!(Version::parse_output("nothing"), None);
        assert!(
            Version(3, 17, 1) < MIN_VERSION
                && Version(4, 1, 1) < MIN_VERSION
                && Version(4, 3, 0) >= MIN_VERSION
        );
    }

    #[test]
    fn cached_version_is_used_only_for_the_same_binary() {
        let dir = std::env::temp_dir().join(format!("mh-criuver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        let write = |v: &str| {
            std::fs::write(&fake, format!("#!/bin/sh\necho 'Version: {v}'\n")).unwrap();
            std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        };
        write("4.2.1");
        let cache = dir.join("cache");
        assert_eq!(
            Criu::discover_cached(Some(&fake), &cache).unwrap().version,
            Version(4, 2, 1)
        );
        assert!(cache.join(VERSION_CACHE).is_file());
        // The cached answer is used while the binary is the same file...
        std::fs::write(
            cache.join(VERSION_CACHE),
            format!("{}\nVersion: 4.3.0\n", binary_identity(&fake).unwrap()),
        )
        .unwrap();
        assert_eq!(
            Criu::discover_cached(Some(&fake), &cache).unwrap().version,
            Version(4, 3, 0)
        );
        // ...and a replaced binary is asked again, and checked.
        write("3.17.1.0");
        let e = Criu::discover_cached(Some(&fake), &cache).unwrap_err();
        assert!(
            matches!(
                e,
                CriuError::TooOld {
                    found: Version(3, 17, 1),
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_or_missing_criu_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("mh-fakecriu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut std::fs::metadata(&fake).unwrap().permissions(),
            0o755,
        );
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = Criu::at(&fake).unwrap_err();
        assert!(
            matches!(
                e,
                CriuError::TooOld {
                    found: Version(3, 17, 1),
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("setup/install.sh"), "{e}");
        let e = Criu::at(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, CriuError::Unrunnable { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

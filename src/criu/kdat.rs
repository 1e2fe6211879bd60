//! CRIU's kernel-feature cache (kdat), kept where CRIU cannot keep it itself.
//!
//! Every CRIU run probes the kernel (45-70 ms on the reference machine)
//! unless it can load `/run/criu.kdat`, and CRIU only writes that file when
//! `/run` is a tmpfs, so that a reboot clears it. Where `/run` is an
//! ordinary directory every restore pays the probe. runmh already runs
//! `criu restore` in a private mount namespace, so there it mounts a fresh
//! tmpfs over `/run`, puts the saved cache in, and lets CRIU load it — or
//! probe and write it, after which runmh copies it to the state directory
//! through a descriptor of that `/run` it opened by `/proc/<criu>/root`
//! while CRIU ran (the namespace goes with CRIU; an open descriptor keeps
//! the mount readable). Nothing is mounted on the host.
//!
//! The saved copy is only used while its key matches: the boot id (a
//! reboot changes it, which is what CRIU's tmpfs rule stands for), the
//! kernel release and version, and the CRIU binary's path, inode, size and
//! times. CRIU checks its own magic numbers again on load (one of them is
//! its build time) and re-probes on any mismatch.

use crate::sys;
use nix::errno::Errno;
use nix::libc;
use std::ffi::CStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Where CRIU looks for its cache (`KDAT_RUNDIR`, fixed at CRIU's build).
pub const RUN_DIR: &str = "/run";
const RUN_DIR_C: &CStr = c"/run";
const CACHE_FILE_C: &CStr = c"/run/criu.kdat";
const CACHE_NAME: &str = "criu.kdat";
/// First line of the saved copy; the key follows on the same line.
const HEADER: &str = "miehisto-kdat 1";
/// CRIU's `struct kerndat_s` is a few KiB; anything far larger is not one.
const MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KdatError {
    #[error("cannot read the kdat cache {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot save the kdat cache to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the kdat cache {path} is not a saved CRIU cache (bad header or size)")]
    Corrupt { path: PathBuf },
    #[error("cannot identify {what} for the kdat cache key")]
    Key {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The saved cache of one state directory, for one CRIU on this boot.
#[derive(Debug, Clone)]
pub struct KdatCache {
    pub file: PathBuf,
    key: String,
}

fn is_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

/// Whether CRIU needs our help: it keeps its own cache when `/run` is a tmpfs.
pub fn needed() -> bool {
    Path::new(RUN_DIR).is_dir() && !is_tmpfs(Path::new(RUN_DIR))
}

/// Whether a tmpfs over `/run` would hide one of `paths` from CRIU (state
/// directory, images, binaries, logs).
pub fn would_hide(paths: &[&Path]) -> bool {
    paths.iter().any(|p| {
        let abs = crate::files::canonical(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf());
        abs.starts_with(RUN_DIR)
    })
}

fn key_for(criu: &Path) -> Result<String, KdatError> {
    let key_err = |what: &str, source| KdatError::Key {
        what: what.to_string(),
        source,
    };
    let exe = super::binary_identity(criu).map_err(|e| key_err(&criu.display().to_string(), e))?;
    let boot = crate::sys::procfs::read_text("/proc/sys/kernel/random/boot_id")
        .map_err(|e| key_err("the boot id", e))?;
    let uts = nix::sys::utsname::uname().map_err(|e| key_err("the kernel", e.into()))?;
    Ok(format!(
        "boot={} kernel={:?} {:?} criu={exe}",
        boot.trim(),
        uts.release(),
        uts.version()
    ))
}

impl KdatCache {
    /// The cache for `criu` under `state_dir`; None when CRIU keeps its own
    /// (a tmpfs `/run`) or the key cannot be built.
    pub fn for_state_dir(state_dir: &Path, criu: &Path) -> Option<KdatCache> {
        if !needed() {
            return None;
        }
        match key_for(criu) {
            Ok(key) => Some(KdatCache {
                file: state_dir.join("kdat").join(CACHE_NAME),
                key,
            }),
            Err(e) => {
                log::debug!("{e}");
                None
            }
        }
    }

    /// The saved bytes when they were made on this boot by this CRIU and
    /// kernel; Ok(None) when there is no usable copy (it is then replaced).
    pub fn load(&self) -> Result<Option<Vec<u8>>, KdatError> {
        let bytes = match std::fs::read(&self.file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(KdatError::Read {
                    path: self.file.clone(),
                    source,
                })
            }
        };
        let Some(nl) = bytes.iter().position(|&b| b == b'\n') else {
            return Err(KdatError::Corrupt {
                path: self.file.clone(),
            });
        };
        let expected = format!("{HEADER} {}", self.key);
        let body = &bytes[nl + 1..];
        if &bytes[..nl] != expected.as_bytes() {
            log::debug!(
                "kdat cache {} is from another boot, kernel or CRIU: ignored",
                self.file.display()
            );
            return Ok(None);
        }
        if body.is_empty() || body.len() as u64 > MAX_BYTES {
            return Err(KdatError::Corrupt {
                path: self.file.clone(),
            });
        }
        Ok(Some(body.to_vec()))
    }

    /// Copies the cache CRIU wrote into `run` (the tmpfs `/run` that
    /// [`install_in_child`] mounted, from [`open_run_of`]) to the state
    /// directory, atomically. Ok(false) when CRIU wrote none.
    pub fn save_from(&self, run: &RunDir) -> Result<bool, KdatError> {
        let src = run.path.join(CACHE_NAME);
        let file = match nix::fcntl::openat(
            run.fd.as_fd(),
            CACHE_NAME,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        ) {
            Ok(fd) => std::fs::File::from(fd),
            Err(nix::errno::Errno::ENOENT) => return Ok(false),
            Err(e) => {
                return Err(KdatError::Read {
                    path: src,
                    source: e.into(),
                })
            }
        };
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_BYTES + 1), &mut body)
            .map_err(|source| KdatError::Read {
                path: src.clone(),
                source,
            })?;
        if body.is_empty() || body.len() as u64 > MAX_BYTES {
            return Err(KdatError::Corrupt { path: src });
        }
        let write_err = |path: &Path, source| KdatError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
        // A per-process temporary name: concurrent restores may save at once.
        let tmp = dir.join(format!(".{CACHE_NAME}.{}.tmp", std::process::id()));
        let mut out = format!("{HEADER} {}\n", self.key).into_bytes();
        out.extend_from_slice(&body);
        std::fs::write(&tmp, &out).map_err(|e| write_err(&tmp, e))?;
        std::fs::rename(&tmp, &self.file).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            write_err(&self.file, e)
        })?;
        Ok(true)
    }
}

/// The `/run` of a CRIU run's private mount namespace, held open.
#[derive(Debug)]
pub struct RunDir {
    fd: std::os::fd::OwnedFd,
    /// How it was opened, for messages.
    path: PathBuf,
}

/// Opens `/run` as the process `pid` (a CRIU that [`install_in_child`]
/// prepared, already exec'd) sees it.
pub fn open_run_of(pid: i32) -> Result<RunDir, KdatError> {
    let path = PathBuf::from(format!("/proc/{pid}/root{RUN_DIR}"));
    nix::fcntl::open(
        &path,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(|fd| RunDir {
        fd,
        path: path.clone(),
    })
    .map_err(|e| KdatError::Read {
        path,
        source: e.into(),
    })
}

/// In a forked child that is alone in a private mount namespace: mounts a
/// fresh tmpfs over `/run` and, when `data` is given, writes it as
/// `/run/criu.kdat` for the CRIU about to be exec'd. Async-signal-safe (no
/// allocation: `data` was read before the fork). A failure leaves at worst
/// an empty tmpfs, where CRIU probes as usual and writes a new cache.
pub fn install_in_child(data: Option<&[u8]>) -> Result<(), Errno> {
    sys::mount(
        Some(c"tmpfs"),
        RUN_DIR_C,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )?;
    let Some(data) = data else { return Ok(()) };
    let fd = sys::open(
        CACHE_FILE_C,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
        0o600,
    )?;
    let r = sys::write_all(fd, data);
    sys::close(fd);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mh-kdat-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_changes_with_the_binary_and_a_stale_copy_is_ignored() {
        let d = tempdir("key");
        let bin = d.join("criu");
        std::fs::write(&bin, b"one").unwrap();
        let k1 = key_for(&bin).unwrap();
        std::fs::write(&bin, b"other binary").unwrap();
        let k2 = key_for(&bin).unwrap();
        assert_ne!(k1, k2, "a changed CRIU binary must change the key");
        assert!(!k1.contains('\n'));

        let cache = KdatCache {
            file: d.join("kdat").join(CACHE_NAME),
            key: k2.clone(),
        };
        assert!(cache.load().unwrap().is_none(), "no file yet");
        std::fs::create_dir_all(d.join("kdat")).unwrap();
        std::fs::write(&cache.file, format!("{HEADER} {k1}\nBYTES")).unwrap();
        assert!(
            cache.load().unwrap().is_none(),
            "a copy made for another binary is ignored"
        );
        std::fs::write(&cache.file, format!("{HEADER} {k2}\nBYTES")).unwrap();
        assert_eq!(cache.load().unwrap().as_deref(), Some(&b"BYTES"[..]));
        std::fs::write(&cache.file, b"no header line").unwrap();
        assert!(matches!(cache.load(), Err(KdatError::Corrupt { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn paths_under_run_are_detected() {
        assert!(would_hide(&[
            Path::new("/tmp"),
            Path::new("/run/miehisto/state")
        ]));
        assert!(!would_hide(&[
            Path::new("/var/lib/miehisto"),
            Path::new("/running")
        ]));
    }
}

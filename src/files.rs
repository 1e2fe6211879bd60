//! Files only their owner may read: state, records, images and logs hold
//! the service's memory and environment (secrets passed with `-e`), so
//! directories are 0700 and files 0600 whatever the umask, and records are
//! replaced atomically (a temporary file, fsync, rename, fsync of the
//! directory) without leaving temporary files behind on failure.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// The umask every miehisto process runs with: files and directories it
/// (or CRIU, which follows it) creates without an explicit mode are private.
pub const PRIVATE_UMASK: u32 = 0o077;

static CALLER_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Sets [`PRIVATE_UMASK`] for this process (once, at start); the umask it
/// replaced is what a sandboxed service gets back before its exec.
pub fn private_umask() {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(PRIVATE_UMASK));
    let _ = CALLER_UMASK.set(old.bits());
}

/// The umask a service runs with: the one this process was started with
/// (before [`private_umask`]), else the current one.
pub fn service_umask() -> u32 {
    if let Some(m) = CALLER_UMASK.get() {
        return *m;
    }
    // umask(2) only reads by writing: put the value straight back.
    let cur = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(PRIVATE_UMASK));
    nix::sys::stat::umask(cur);
    cur.bits()
}

/// `create_dir_all`, with every directory it creates 0700, and `dir`
/// itself tightened to 0700 if it existed.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten_one(dir)
}

/// Removes group and other permissions from `path` (not following a
/// symlink: its target may be anyone's).
fn tighten_one(path: &Path) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    if m.file_type().is_symlink() {
        return Ok(());
    }
    let mode = m.permissions().mode() & 0o7777;
    let want = if m.is_dir() {
        (mode & 0o7700) | DIR_MODE
    } else {
        mode & 0o7700
    };
    if want != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

/// Tightens `dir` and everything under it (see [`tighten_one`]), except
/// the paths `keep` names (with their contents): what a service running
/// as another user must read, such as the preload library. Mount points
/// are not crossed. Returns how many entries were changed.
pub fn tighten_tree(dir: &Path, keep: &[&Path]) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(dir)?;
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if keep.iter().any(|k| p.starts_with(k)) {
            continue;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != top.dev() || m.file_type().is_symlink() {
            continue;
        }
        let before = m.permissions().mode() & 0o7777;
        tighten_one(&p)?;
        if std::fs::symlink_metadata(&p).map(|m| m.permissions().mode() & 0o7777)? != before {
            changed += 1;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p)?.flatten() {
                stack.push(e.path());
            }
        }
    }
    Ok(changed)
}

/// A state directory as runmh finds it on start: the directory and its
/// direct entries tightened (cheap enough for every restore; the daemon
/// tightens its whole tree with [`tighten_tree`]).
pub fn tighten_state(dir: &Path) -> std::io::Result<()> {
    private_dir(dir)?;
    for e in std::fs::read_dir(dir)?.flatten() {
        tighten_one(&e.path())?;
    }
    Ok(())
}

/// `std::fs::canonicalize` in three system calls: realpath(3) readlinks
/// every component of the path in turn (a path ten deep is ten lookups from
/// `/`, ~40 readlinks for the paths a restore checks), while an `O_PATH`
/// open resolves it once and `/proc/self/fd` names what it resolved to.
/// The same answer for an existing path; without /proc, realpath(3).
pub fn canonical(path: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open(path)?;
    match std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) {
        // An unreachable or deleted target reads as something else.
        Ok(p) if p.is_absolute() && !p.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") => {
            Ok(p)
        }
        _ => std::fs::canonicalize(path),
    }
}

/// Creates (or truncates) `path` as a 0600 file and opens it for writing.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // An existing file keeps its mode through open(2): set it.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// `/dev/null`, for reading and writing: the stdio of a process that must
/// not hold its caller's terminal or pipes (a detached restore's CRIU and
/// supervisor).
pub fn dev_null() -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
}

/// Opens `path` for appending, creating it 0600 (a log file).
pub fn append_private(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically: a 0600 temporary file beside
/// it, written and fsynced, renamed over it, then the directory fsynced.
/// On any failure (a full disk) the temporary file is removed and `path`
/// keeps its old contents.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, true)
}

/// [`write_atomic`] without the fsyncs: for runtime records that do not
/// outlive a crash anyway (a running instance's), on the restore's path.
pub fn write_replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        if durable {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `name` is a temporary file [`write_atomic`] (or an older
/// version of it) leaves only when killed in between: safe to remove once
/// no writer runs.
pub fn is_stale_temp(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn private_whatever_the_umask() {
        let base = std::env::temp_dir().join(format!("mh-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0));
        let d = base.join("a/b");
        private_dir(&d).unwrap();
        let f = d.join("rec.json");
        write_atomic(&f, b"{}").unwrap();
        drop(create_private(&d.join("x")).unwrap());
        drop(append_private(&d.join("log")).unwrap());
        nix::sys::stat::umask(old);
        assert_eq!(mode(&base.join("a")), 0o700);
        assert_eq!(mode(&d), 0o700);
        for n in ["rec.json", "x", "log"] {
            assert_eq!(mode(&d.join(n)), 0o600, "{n}");
        }
        // Only the record is left: no temporary file.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 3);

        // Existing loose permissions are tightened, except what is kept.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let keep = base.join("a/keep");
        std::fs::create_dir(&keep).unwrap();
        std::fs::set_permissions(&keep, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(tighten_tree(&base, &[&keep]).unwrap() >= 2);
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        assert_eq!(mode(&keep), 0o755);

        // A failed write leaves no temporary file and the old contents.
        assert!(write_atomic(&d.join("missing/rec.json"), b"x").is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"{}");
        assert!(is_stale_temp(".rec.json.tmp-12-0") && !is_stale_temp("rec.json"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn canonical_is_realpath() {
        let base = std::env::temp_dir().join(format!("mh-canon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real/deep")).unwrap();
        std::fs::write(base.join("real/deep/f"), b"x").unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        std::os::unix::fs::symlink("deep/f", base.join("real/rel")).unwrap();
        for p in [
            base.join("link/deep/f"),
            base.join("link/rel"),
            base.join("real/deep/../deep/f"),
            base.join("link"),
            PathBuf::from("/"),
        ] {
            assert_eq!(
                canonical(&p).unwrap(),
                std::fs::canonicalize(&p).unwrap(),
                "{p:?}"
            );
        }
        assert_eq!(
            canonical(&base.join("link/missing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

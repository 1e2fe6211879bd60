//! The NOTIFY backend's LD_PRELOAD library, built from
//! `src/preload/mh_preload.c` by build.rs and embedded in the binaries.
//!
//! It is installed under a name derived from its content: CRIU records the
//! mapped library's size and build-id and refuses to restore an image whose
//! library file changed, so a file, once written, is never overwritten.
//!
//! Unlike everything else under the state directory it is readable by
//! all (0644, in a 0711 directory nobody may list): it is no secret, every
//! runmh binary carries it, and a service run as another user must load it
//! ([`open_to`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const LIB_MODE: u32 = 0o644;
/// Others may pass through, not list.
const PASS_MODE: u32 = 0o711;

pub static LIBRARY: &[u8] = include_bytes!(env!("MIEHISTO_PRELOAD_SO"));

/// The functions the library can hold before (see mh_preload.c).
pub const WRAPPED: &[&str] = &["listen", "bind", "accept", "accept4", "connect"];

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Writes the library into `dir` (once per content) and returns its path.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("libmhpreload-{:016x}.so", fnv1a(LIBRARY)));
    std::fs::create_dir_all(dir)?;
    set_mode(dir, PASS_MODE)?;
    if std::fs::metadata(&path)
        .map(|m| m.len() == LIBRARY.len() as u64)
        .unwrap_or(false)
    {
        // Tightened with the rest of the state (or written by an older
        // runmh): readable again.
        set_mode(&path, LIB_MODE)?;
        return Ok(path);
    }
    let tmp = dir.join(format!(".libmhpreload.{}.tmp", std::process::id()));
    std::fs::write(&tmp, LIBRARY)?;
    set_mode(&tmp, LIB_MODE)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Lets a service run as `uid:gid` (with no other groups, as the sandbox
/// sets them) load the installed library `lib`: `state_dir`, its ancestor,
/// becomes 0711 like the library's own directory (everything in it stays
/// 0700/0600), and every directory from `/` down must be searchable by
/// that user. `Err` names the first that is not.
pub fn open_to(
    lib: &Path,
    state_dir: &Path,
    uid: u32,
    gid: u32,
) -> Result<(), (PathBuf, std::io::Error)> {
    if uid == 0 {
        return Ok(());
    }
    // Ours, from the library's directory up to the state directory.
    if lib.starts_with(state_dir) {
        for d in lib.ancestors().skip(1) {
            set_mode(d, PASS_MODE).map_err(|e| (d.to_path_buf(), e))?;
            if d == state_dir {
                break;
            }
        }
    }
    let mut dirs: Vec<&Path> = lib.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        let m = std::fs::metadata(d).map_err(|e| (d.to_path_buf(), e))?;
        let bits = m.permissions().mode();
        let search = if m.uid() == uid {
            bits & 0o100
        } else if m.gid() == gid {
            bits & 0o010
        } else {
            bits & 0o001
        };
        if search == 0 {
            return Err((
                d.to_path_buf(),
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn library_is_an_elf_shared_object_and_installs_idempotently() {
        assert_eq!(&super::LIBRARY[..4], b"\x7fELF");
        let d = std::env::temp_dir().join(format!("mh-preload-{}", std::process::id()));
        let a = super::install(&d).unwrap();
        let b = super::install(&d).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), super::LIBRARY);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&a), 0o644);
        assert_eq!(mode(&d), 0o711);
        // Tightened by the state's hardening pass, then installed again.
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        super::install(&d).unwrap();
        assert_eq!(mode(&a), 0o644);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_service_user_must_be_able_to_reach_the_library() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("mh-preload-reach-{}", std::process::id()));
        let state = base.join("state");
        let lib = super::install(&state.join("lib")).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        super::open_to(&lib, &state, 65534, 65534).unwrap();
        let m = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(m, 0o711, "passable, not listable");
        // A private directory above the state is named, not changed.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (dir, _) = super::open_to(&lib, &state, 65534, 65534).unwrap_err();
        assert_eq!(dir, base);
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! The NOTIFY backend's LD_PRELOAD library, built from
//! `src/preload/mh_preload.c` by build.rs and embedded in the binaries.
//!
//! It is installed under a name derived from its content: CRIU records the
//! mapped library's size and build-id and refuses to restore an image whose
//! library file changed, so a file, once written, is never overwritten.

use std::path::{Path, PathBuf};

pub static LIBRARY: &[u8] = include_bytes!(env!("MIEHISTO_PRELOAD_SO"));

/// The functions the library can hold before (see mh_preload.c).
pub const WRAPPED: &[&str] = &["listen", "bind", "accept", "accept4", "connect"];

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes the library into `dir` (once per content) and returns its path.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("libmhpreload-{:016x}.so", fnv1a(LIBRARY)));
    if std::fs::metadata(&path)
        .map(|m| m.len() == LIBRARY.len() as u64)
        .unwrap_or(false)
    {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".libmhpreload.{}.tmp", std::process::id()));
    std::fs::write(&tmp, LIBRARY)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
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
        std::fs::remove_dir_all(&d).unwrap();
    }
}

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

/// The service's switch for the heap trim before the stop: "0" keeps
/// malloc's free memory (and, under TRACE, loads no library at all).
pub const TRIM_ENV: &str = "MIEHISTO_PRELOAD_TRIM";

/// Why the TRACE backend runs a service without the trim-only library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoTrim {
    /// `MIEHISTO_PRELOAD_TRIM=0` in the service's environment.
    SwitchedOff,
    /// The stop syscall is none the library wraps (it trims in the libc
    /// function's wrapper, right before the syscall).
    NotWrapped(String),
    /// The service sets LD_PRELOAD itself: left as it is.
    OwnPreload,
    /// The program would not load a glibc library, or might not: static,
    /// another libc, not an ELF executable we can read.
    NotGlibc(PathBuf),
}

impl std::fmt::Display for NoTrim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoTrim::SwitchedOff => write!(f, "{TRIM_ENV}=0"),
            NoTrim::NotWrapped(s) => write!(f, "the library wraps no {s}() to trim before"),
            NoTrim::OwnPreload => write!(f, "the service sets LD_PRELOAD itself"),
            NoTrim::NotGlibc(p) => write!(
                f,
                "{} is not a dynamically linked glibc program (static, another libc, or unreadable)",
                p.display()
            ),
        }
    }
}

/// The environment the TRACE backend adds for the heap trim before the
/// stop (the library in its "trim" mode: no marker, no output, only
/// malloc_trim(0) in the wrapper of `stop_at` before the real call enters
/// the traced syscall), or why it adds none. `glibc` tells whether the
/// program is dynamically linked against glibc ([`is_glibc_dynamic`]).
pub fn trace_trim_env(
    env: &[(String, String)],
    stop_at: &str,
    glibc: bool,
    program: &Path,
    lib: &Path,
) -> Result<Vec<(String, String)>, NoTrim> {
    if env.iter().any(|(k, v)| k == TRIM_ENV && v == "0") {
        return Err(NoTrim::SwitchedOff);
    }
    if !WRAPPED.contains(&stop_at) {
        return Err(NoTrim::NotWrapped(stop_at.to_string()));
    }
    if env.iter().any(|(k, _)| k == "LD_PRELOAD") {
        return Err(NoTrim::OwnPreload);
    }
    if !glibc {
        return Err(NoTrim::NotGlibc(program.to_path_buf()));
    }
    Ok(vec![
        ("LD_PRELOAD".to_string(), lib.display().to_string()),
        ("MIEHISTO_STOP_AT".to_string(), stop_at.to_string()),
        ("MIEHISTO_PRELOAD_MODE".to_string(), "trim".to_string()),
    ])
}

/// How much of a program is read to find its interpreter: the ELF header,
/// the program headers and PT_INTERP's string sit in its first page.
const HEAD_BYTES: u64 = 64 << 10;

/// Whether `program` is an ELF executable whose program interpreter is
/// glibc's dynamic loader (`ld-linux*`): one that loads an LD_PRELOAD
/// library built against glibc. A script (`#!`) is judged by its
/// interpreter, one level deep. Static programs ignore LD_PRELOAD; musl's
/// loader is `ld-musl-*`; anything unreadable or odd counts as "no".
pub fn is_glibc_dynamic(program: &Path) -> bool {
    glibc_dynamic_at(program, 1)
}

fn glibc_dynamic_at(program: &Path, scripts: u32) -> bool {
    use std::io::Read;
    let mut head = Vec::new();
    let read = std::fs::File::open(program).and_then(|f| f.take(HEAD_BYTES).read_to_end(&mut head));
    if read.is_err() {
        return false;
    }
    if let Some(line) = head.strip_prefix(b"#!") {
        let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty());
        return scripts > 0
            && interp.is_some_and(|i| {
                use std::os::unix::ffi::OsStrExt;
                glibc_dynamic_at(Path::new(std::ffi::OsStr::from_bytes(i)), scripts - 1)
            });
    }
    elf_interpreter(&head).is_some_and(|i| {
        Path::new(std::ffi::OsStr::new(&i))
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ld-linux"))
    })
}

/// PT_INTERP's path in a little-endian ELF64 image's first bytes, if any.
fn elf_interpreter(data: &[u8]) -> Option<String> {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return None;
    }
    let u16at = |o: usize| -> Option<usize> {
        Some(usize::from(u16::from_le_bytes(
            data.get(o..o + 2)?.try_into().ok()?,
        )))
    };
    let u32at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?))
    };
    let u64at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    let (phoff, phentsize, phnum) = (u64at(0x20)?, u16at(0x36)?, u16at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        // PT_INTERP = 3; p_offset at +8, p_filesz at +32.
        if u32at(ph)? == 3 {
            let off = u64at(ph + 8)?;
            let len = u64at(ph + 32)?;
            let raw = data.get(off..off.checked_add(len)?)?;
            let raw = raw.split(|&b| b == 0).next()?;
            return String::from_utf8(raw.to_vec()).ok();
        }
    }
    None
}

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
    use super::*;

    #[test]
    fn trace_trim_env_is_added_only_where_safe() {
        let lib = Path::new("/state/lib/libmhpreload-1.so");
        let prog = Path::new("/usr/bin/python3");
        let env = vec![("PATH".to_string(), "/usr/bin".to_string())];
        assert_eq!(
            trace_trim_env(&env, "listen", true, prog, lib).unwrap(),
            vec![
                ("LD_PRELOAD".to_string(), lib.display().to_string()),
                ("MIEHISTO_STOP_AT".to_string(), "listen".to_string()),
                ("MIEHISTO_PRELOAD_MODE".to_string(), "trim".to_string()),
            ]
        );
        let off = vec![(TRIM_ENV.to_string(), "0".to_string())];
        assert_eq!(
            trace_trim_env(&off, "listen", true, prog, lib),
            Err(NoTrim::SwitchedOff)
        );
        let on = vec![(TRIM_ENV.to_string(), "1".to_string())];
        assert!(trace_trim_env(&on, "listen", true, prog, lib).is_ok());
        assert_eq!(
            trace_trim_env(&env, "socket", true, prog, lib),
            Err(NoTrim::NotWrapped("socket".into()))
        );
        let own = vec![("LD_PRELOAD".to_string(), "/x.so".to_string())];
        assert_eq!(
            trace_trim_env(&own, "listen", true, prog, lib),
            Err(NoTrim::OwnPreload)
        );
        assert_eq!(
            trace_trim_env(&env, "listen", false, prog, lib),
            Err(NoTrim::NotGlibc(prog.into()))
        );
    }

    #[test]
    fn glibc_programs_are_told_from_static_and_other_ones() {
        // This test binary is a glibc program; so is /bin/sh here, and a
        // script naming it.
        let me = std::env::current_exe().unwrap();
        assert!(is_glibc_dynamic(&me), "{}", me.display());
        let d = std::env::temp_dir().join(format!("mh-glibc-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let script = d.join("s");
        std::fs::write(&script, b"#!/bin/sh -e\nexit 0\n").unwrap();
        assert!(is_glibc_dynamic(&script));
        // A script naming a script: one level only.
        let outer = d.join("o");
        std::fs::write(&outer, format!("#!{}\n", script.display())).unwrap();
        assert!(!is_glibc_dynamic(&outer));
        // A musl-style interpreter, a static ELF (no PT_INTERP), garbage.
        let mut elf = vec![0u8; 0x400];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let interp = b"/lib/ld-musl-x86_64.so.1\0";
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        elf[72..80].copy_from_slice(&0x200u64.to_le_bytes());
        elf[96..104].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        elf[0x200..0x200 + interp.len()].copy_from_slice(interp);
        assert_eq!(
            elf_interpreter(&elf).as_deref(),
            Some("/lib/ld-musl-x86_64.so.1")
        );
        let musl = d.join("musl");
        std::fs::write(&musl, &elf).unwrap();
        assert!(!is_glibc_dynamic(&musl));
        let glibc = b"/lib64/ld-linux-x86-64.so.2\0";
        elf[0x200..0x200 + glibc.len()].copy_from_slice(glibc);
        elf[96..104].copy_from_slice(&(glibc.len() as u64).to_le_bytes());
        std::fs::write(&musl, &elf).unwrap();
        assert!(is_glibc_dynamic(&musl));
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD: static
        std::fs::write(&musl, &elf).unwrap();
        assert!(!is_glibc_dynamic(&musl));
        std::fs::write(&musl, b"\x7fELF").unwrap();
        assert!(!is_glibc_dynamic(&musl));
        assert!(!is_glibc_dynamic(&d.join("missing")));
        std::fs::remove_dir_all(&d).unwrap();
    }

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

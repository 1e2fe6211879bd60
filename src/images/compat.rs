//! Will this image restore on this host? Checked before CRIU runs, so a
//! mismatch is one clear error listing every difference instead of a CRIU
//! failure half-way through a restore, or a SIGILL after it.
//!
//! What the dump records ([`HostRecord`], in `miehisto.json`):
//! * the architecture and the boot id of the host;
//! * `cpuinfo.img`, written by `criu cpuinfo dump` beside the images;
//! * every file the tree mapped or held open at the stop point, read from
//!   `/proc/PID/maps` and `/proc/PID/fd` of each task just before the dump
//!   (cheaper and as reliable as decoding CRIU's images afterwards, and it
//!   needs no `crit`): path, size, mtime and, for ELF files, the GNU
//!   build-id. Log files (appended to) and pseudo-files (/proc, /dev, ...)
//!   are left out.
//!
//! What a check compares: architecture, kernel release, CRIU version,
//! `criu cpuinfo check` (CRIU's own comparison of the recorded CPU features
//! with this CPU's; skipped by restores when the image was dumped during
//! this very boot, as the CPU cannot have changed), and each recorded file:
//! present, same size, and the same build-id (ELF) or mtime (others). A
//! binary rebuilt identically elsewhere keeps its build-id; a copy modified
//! after the dump does not.

use super::metadata::Metadata;
use crate::criu::Criu;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The file `criu cpuinfo dump` writes.
pub const CPUINFO_IMG: &str = "cpuinfo.img";
/// At most this many files are recorded (a tree mapping more is unusual;
/// the rest would make the metadata too large).
pub const MAX_FILES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileUse {
    /// Mapped into memory (a binary, a library, a mapped data file).
    Mapped,
    /// Held open by a file descriptor.
    Open,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub how: FileUse,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch. An i64 (enough until
    /// 2262), not an i128: serde cannot buffer an i128 inside the API's
    /// tagged replies, so an image inspect through the daemon would fail.
    pub mtime_ns: i64,
    /// The ELF GNU build-id, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// `std::env::consts::ARCH` of the dumping host.
    pub arch: String,
    /// /proc/sys/kernel/random/boot_id of the dumping host.
    pub boot_id: String,
    /// Whether `criu cpuinfo dump` wrote [`CPUINFO_IMG`] beside the images.
    pub cpuinfo: bool,
    pub files: Vec<FileRecord>,
}

/// One way the image and this host differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Arch {
        image: String,
        host: String,
    },
    Kernel {
        image: String,
        host: String,
    },
    Criu {
        image: String,
        host: String,
    },
    Cpu {
        detail: String,
    },
    NoCpuRecord,
    FileMissing {
        path: PathBuf,
    },
    FileSize {
        path: PathBuf,
        image: u64,
        host: u64,
    },
    FileBuildId {
        path: PathBuf,
        image: String,
        host: String,
    },
    FileMtime {
        path: PathBuf,
    },
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Difference::Arch { image, host } => {
                write!(f, "architecture: image {image}, host {host}")
            }
            Difference::Kernel { image, host } => write!(f, "kernel: image {image}, host {host}"),
            Difference::Criu { image, host } => write!(f, "CRIU: image {image}, host {host}"),
            Difference::Cpu { detail } => write!(f, "CPU: {detail}"),
            Difference::NoCpuRecord => write!(
                f,
                "CPU: the image has no {CPUINFO_IMG}, so its CPU features cannot be checked"
            ),
            Difference::FileMissing { path } => {
                write!(f, "file {}: missing on this host", path.display())
            }
            Difference::FileSize { path, image, host } => write!(
                f,
                "file {}: size {image} in the image, {host} here",
                path.display()
            ),
            Difference::FileBuildId { path, image, host } => write!(
                f,
                "file {}: build-id {image} in the image, {host} here",
                path.display()
            ),
            Difference::FileMtime { path } => write!(
                f,
                "file {}: modified since the dump (mtime differs)",
                path.display()
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    #[error("image {image} does not match this host ({} difference{}): {}; nothing was restored (prebake the service again on this host, or restore on a host that matches)", .differences.len(), if .differences.len() == 1 { "" } else { "s" }, list(.differences))]
    Mismatch {
        image: PathBuf,
        differences: Vec<Difference>,
    },
    #[error("cannot run `criu cpuinfo check` for {image}")]
    CpuCheck {
        image: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn list(d: &[Difference]) -> String {
    d.iter()
        .enumerate()
        .map(|(i, d)| format!("({}) {d}", i + 1))
        .collect::<Vec<_>>()
        .join("; ")
}

/// This boot's id (empty when unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The pids of the tree rooted at `root`, root first.
fn tree(root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() && out.len() < 4096 {
        let pid = out[i];
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in rd.flatten() {
                let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for k in kids
                    .split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok())
                {
                    if !out.contains(&k) {
                        out.push(k);
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// Paths that are not files a host provides (kernel pseudo-files, devices).
fn pseudo(p: &Path) -> bool {
    ["/proc", "/sys", "/dev", "/run", "/memfd:", "/SYSV"]
        .iter()
        .any(|pre| p.starts_with(pre) || p.to_string_lossy().starts_with(pre))
}

/// O_APPEND in /proc/PID/fdinfo's octal `flags`.
const O_APPEND: u64 = 0o2000;

fn fd_appends(pid: i32, fd: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
        })
        .is_some_and(|f| f & O_APPEND != 0)
}

fn record_of(path: &Path, how: FileUse) -> Option<FileRecord> {
    let m = std::fs::metadata(path).ok()?;
    if !m.is_file() {
        return None;
    }
    Some(FileRecord {
        path: path.to_path_buf(),
        how,
        size: m.size(),
        mtime_ns: mtime_ns(&m),
        build_id: build_id(path),
    })
}

/// Every file the tree rooted at `root` maps or holds open (read-only or
/// read-write, not appended to), outside `skip` (the service's log
/// directory). The tree must be stopped.
pub fn collect_files(root: i32, skip: &[&Path]) -> Vec<FileRecord> {
    let mut seen = std::collections::BTreeMap::<PathBuf, FileUse>::new();
    for pid in tree(root) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        for line in maps.lines() {
            // address perms offset dev inode path
            let mut it = line.splitn(6, ' ');
            let inode = it.nth(4).unwrap_or("0");
            let Some(path) = it.next().map(str::trim_start) else {
                continue;
            };
            if inode == "0" || !path.starts_with('/') || path.ends_with(" (deleted)") {
                continue;
            }
            seen.entry(PathBuf::from(path)).or_insert(FileUse::Mapped);
        }
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for e in rd.flatten() {
                let Ok(target) = std::fs::read_link(e.path()) else {
                    continue;
                };
                let fd = e.file_name().to_string_lossy().into_owned();
                if !target.is_absolute()
                    || target.to_string_lossy().ends_with(" (deleted)")
                    || fd_appends(pid, &fd)
                {
                    continue;
                }
                seen.entry(target).or_insert(FileUse::Open);
            }
        }
    }
    seen.into_iter()
        .filter(|(p, _)| !pseudo(p) && !skip.iter().any(|s| p.starts_with(s)))
        .filter_map(|(p, how)| record_of(&p, how))
        .take(MAX_FILES)
        .collect()
}

/// The GNU build-id of an ELF file (64- or 32-bit, little-endian), hex.
pub fn build_id(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh[..52]).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[5] != 1 {
        return None;
    }
    let is64 = eh[4] == 2;
    if is64 {
        f.read_exact(&mut eh[52..64]).ok()?;
    }
    // Offsets and sizes from the file are checked before use: a corrupt
    // header gives None, never a panic or a huge allocation.
    let us = |v: u64| usize::try_from(v).ok();
    let u16at = |b: &[u8], o: usize| -> Option<usize> {
        Some(usize::from(u16::from_le_bytes([
            *b.get(o)?,
            *b.get(o + 1)?,
        ])))
    };
    let u32at = |b: &[u8], o: usize| -> Option<u64> {
        let a: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(a)))
    };
    let u64at = |b: &[u8], o: usize| -> Option<u64> {
        let a: [u8; 8] = b.get(o..o + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(a))
    };
    let (phoff, phentsize, phnum) = if is64 {
        (u64at(&eh, 32)?, u16at(&eh, 54)?, u16at(&eh, 56)?)
    } else {
        (u32at(&eh, 28)?, u16at(&eh, 42)?, u16at(&eh, 44)?)
    };
    if phnum == 0 || phnum > 256 || phentsize < if is64 { 56 } else { 32 } {
        return None;
    }
    use std::io::{Seek, SeekFrom};
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff)).ok()?;
    f.read_exact(&mut ph).ok()?;
    for i in 0..phnum {
        let p = &ph[i * phentsize..];
        const PT_NOTE: u64 = 4;
        if u32at(p, 0)? != PT_NOTE {
            continue;
        }
        let (off, size) = if is64 {
            (u64at(p, 8)?, u64at(p, 32)?)
        } else {
            (u32at(p, 4)?, u32at(p, 16)?)
        };
        if size > 1 << 16 {
            continue;
        }
        let mut notes = vec![0u8; us(size)?];
        f.seek(SeekFrom::Start(off)).ok()?;
        if f.read_exact(&mut notes).is_err() {
            continue;
        }
        let mut o = 0usize;
        while o + 12 <= notes.len() {
            let namesz = us(u32at(&notes, o)?)?;
            let descsz = us(u32at(&notes, o + 4)?)?;
            let typ = u32at(&notes, o + 8)?;
            let name_at = o + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let end = desc_at + descsz.div_ceil(4) * 4;
            if desc_at + descsz > notes.len() {
                break;
            }
            const NT_GNU_BUILD_ID: u64 = 3;
            if typ == NT_GNU_BUILD_ID && notes[name_at..name_at + namesz].starts_with(b"GNU") {
                let id = &notes[desc_at..desc_at + descsz];
                return Some(id.iter().map(|b| format!("{b:02x}")).collect());
            }
            o = end;
        }
    }
    None
}

/// Runs `criu cpuinfo dump` into `dir`; false (with a warning) when it fails.
pub fn cpuinfo_dump_command(criu: &Criu, dir: &Path) -> std::process::Command {
    let mut c = criu.command();
    c.arg("cpuinfo")
        .arg("dump")
        .arg("-D")
        .arg(dir)
        .arg("-W")
        .arg(dir)
        .arg("-o")
        .arg("cpuinfo-dump.log")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// `criu cpuinfo check` of the image in `dir`: None when it matches, else
/// CRIU's reason.
fn cpuinfo_check(criu: &Criu, dir: &Path, run: Run<'_>) -> Result<Option<String>, std::io::Error> {
    let work = std::env::temp_dir().join(format!(
        "mh-cpuinfo-{}-{}",
        std::process::id(),
        crate::sys::time::unix_ms()
    ));
    std::fs::create_dir_all(&work)?;
    let mut c = criu.command();
    c.arg("cpuinfo")
        .arg("check")
        .arg("-D")
        .arg(dir)
        .arg("-W")
        .arg(&work)
        .arg("-o")
        .arg("cpuinfo-check.log")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let ok = run(&mut c);
    let log = std::fs::read_to_string(work.join("cpuinfo-check.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    if ok? {
        return Ok(None);
    }
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .map(|l| match l.find("): ") {
            Some(i) => l[i + 3..].trim(),
            None => l.trim(),
        })
        .collect();
    Ok(Some(if errors.is_empty() {
        "criu cpuinfo check failed (its log names no error)".to_string()
    } else {
        format!("criu cpuinfo check: {}", errors.join(" / "))
    }))
}

/// When to run `criu cpuinfo check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuCheck {
    /// Always (`mhctl image check`).
    Always,
    /// Unless the image was dumped during this boot (restores).
    UnlessSameBoot,
}

/// Runs a command to its end; true when it succeeded. A daemon, whose
/// reaper owns every wait, passes one that waits through it (a plain
/// `Command::status` would lose the child to the reaper: ECHILD).
pub type Run<'a> = &'a mut dyn FnMut(&mut std::process::Command) -> std::io::Result<bool>;

/// [`differences_with`], running CRIU with `Command::status`.
pub fn differences(
    md: &Metadata,
    dir: &Path,
    criu: &Criu,
    cpu: CpuCheck,
) -> Result<Vec<Difference>, CompatError> {
    differences_with(md, dir, criu, cpu, &mut |c| c.status().map(|s| s.success()))
}

/// Every difference between the image in `dir` (metadata `md`) and this
/// host; `run` runs `criu cpuinfo check`.
pub fn differences_with(
    md: &Metadata,
    dir: &Path,
    criu: &Criu,
    cpu: CpuCheck,
    run: Run<'_>,
) -> Result<Vec<Difference>, CompatError> {
    let mut d = Vec::new();
    let host_arch = std::env::consts::ARCH.to_string();
    if let Some(h) = &md.host {
        if h.arch != host_arch {
            d.push(Difference::Arch {
                image: h.arch.clone(),
                host: host_arch,
            });
        }
    }
    let kernel = super::metadata::kernel_release();
    if md.kernel != kernel {
        d.push(Difference::Kernel {
            image: md.kernel.clone(),
            host: kernel,
        });
    }
    let criu_version = criu.version.to_string();
    if md.criu_version != criu_version {
        d.push(Difference::Criu {
            image: md.criu_version.clone(),
            host: criu_version,
        });
    }
    let same_boot = md.host.as_ref().is_some_and(|h| h.boot_id == boot_id());
    let run_cpu = cpu == CpuCheck::Always || !same_boot;
    if run_cpu {
        if dir.join(CPUINFO_IMG).is_file() {
            match cpuinfo_check(criu, dir, run) {
                Ok(None) => {}
                Ok(Some(detail)) => d.push(Difference::Cpu { detail }),
                Err(source) => {
                    return Err(CompatError::CpuCheck {
                        image: dir.to_path_buf(),
                        source,
                    })
                }
            }
        } else if md.host.is_some() {
            d.push(Difference::NoCpuRecord);
        }
    }
    for f in md.host.iter().flat_map(|h| &h.files) {
        let Ok(m) = std::fs::metadata(&f.path) else {
            d.push(Difference::FileMissing {
                path: f.path.clone(),
            });
            continue;
        };
        if m.size() != f.size {
            d.push(Difference::FileSize {
                path: f.path.clone(),
                image: f.size,
                host: m.size(),
            });
            continue;
        }
        match &f.build_id {
            Some(id) => {
                let here = build_id(&f.path).unwrap_or_else(|| "none".into());
                if &here != id {
                    d.push(Difference::FileBuildId {
                        path: f.path.clone(),
                        image: id.clone(),
                        host: here,
                    });
                }
            }
            None => {
                let mtime = mtime_ns(&m);
                if mtime != f.mtime_ns {
                    d.push(Difference::FileMtime {
                        path: f.path.clone(),
                    });
                }
            }
        }
    }
    Ok(d)
}

/// [`differences`] as a result: Ok when there are none.
pub fn check(md: &Metadata, dir: &Path, criu: &Criu, cpu: CpuCheck) -> Result<(), CompatError> {
    let differences = differences(md, dir, criu, cpu)?;
    if differences.is_empty() {
        return Ok(());
    }
    Err(CompatError::Mismatch {
        image: dir.to_path_buf(),
        differences,
    })
}

/// What a dump records about this host and the tree rooted at `root`.
pub fn record(root: i32, skip: &[&Path]) -> HostRecord {
    HostRecord {
        arch: std::env::consts::ARCH.to_string(),
        boot_id: boot_id(),
        cpuinfo: false,
        files: collect_files(root, skip),
    }
}

/// A file's modification time in nanoseconds since the epoch, saturating
/// (a time past 2262 or before 1678 compares as the bound).
fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_of_this_test_binary_and_none_of_a_text_file() {
        let me = std::env::current_exe().unwrap();
        let id = build_id(&me);
        // rustc links with --build-id on Linux by default.
        assert!(id.as_deref().is_some_and(|s| s.len() >= 16), "{id:?}");
        assert_eq!(build_id(&me), id, "stable");
        let t = std::env::temp_dir().join(format!("mh-bid-{}", std::process::id()));
        std::fs::write(&t, b"hello").unwrap();
        assert_eq!(build_id(&t), None);
        std::fs::remove_file(&t).unwrap();
    }

    #[test]
    fn own_process_files_are_found_and_logs_are_skipped() {
        let me = nix::unistd::getpid().as_raw();
        let dir = std::env::temp_dir().join(format!("mh-cf-{me}"));
        std::fs::create_dir_all(&dir).unwrap();
        let held = dir.join("held.dat");
        std::fs::write(&held, b"data").unwrap();
        let _f = std::fs::File::open(&held).unwrap();
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let all = collect_files(me, &[]);
        assert!(
            all.iter()
                .any(|f| f.path == exe && f.how == FileUse::Mapped),
            "{all:?}"
        );
        let h = all.iter().find(|f| f.path == held).expect("held file");
        assert_eq!((h.how, h.size), (FileUse::Open, 4));
        let skipped = collect_files(me, &[dir.as_path()]);
        assert!(!skipped.iter().any(|f| f.path == held));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn differences_are_listed_in_one_message() {
        let e = CompatError::Mismatch {
            image: "/img".into(),
            differences: vec![
                Difference::Kernel {
                    image: "6.1".into(),
                    host: "6.18".into(),
                },
                Difference::FileMissing {
                    path: "/usr/bin/x".into(),
                },
            ],
        };
        let m = e.to_string();
        assert!(m.contains("2 differences"), "{m}");
        assert!(m.contains("(1) kernel: image 6.1, host 6.18"), "{m}");
        assert!(m.contains("(2) file /usr/bin/x: missing"), "{m}");
    }
}

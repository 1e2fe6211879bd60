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
//!
//! Reading the build-ids was the longest step of a restore before CRIU
//! runs (~40 libraries for a Python service, an open and a few reads
//! each). So the dump also records each ELF file's [`FileStamp`] (inode
//! and change times, taken on the very descriptor the build-id was read
//! from), and a restore during the same boot skips reading a file whose
//! stamp is unchanged: no write, rename or copy leaves a file's inode and
//! ctime as they were (see [`FileStamp`]). Another boot reads them all, and
//! so does a file on a network or FUSE file system ([`LOCAL_FS_MAGICS`]).

use super::metadata::Metadata;
use super::verify::FileStamp;
use crate::criu::Criu;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::os::unix::fs::{FileExt, MetadataExt};
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
    /// The file as it was while its build-id was read; absent when that
    /// could not be trusted (a change too recent, see [`FileStamp`]), for
    /// files without a build-id, and in images made before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
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
    crate::sys::procfs::read_text("/proc/sys/kernel/random/boot_id")
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
    // Before the open: opening a FIFO would block.
    let m = std::fs::metadata(path).ok()?;
    if !m.is_file() {
        return None;
    }
    let Ok(f) = std::fs::File::open(path) else {
        return Some(FileRecord {
            path: path.to_path_buf(),
            how,
            size: m.size(),
            mtime_ns: mtime_ns(&m),
            build_id: None,
            stamp: None,
        });
    };
    // Size, times and build-id all of the one inode the descriptor holds.
    let Ok(before) = f.metadata() else {
        return Some(FileRecord {
            path: path.to_path_buf(),
            how,
            size: m.size(),
            mtime_ns: mtime_ns(&m),
            build_id: build_id_of(&f),
            stamp: None,
        });
    };
    let began = std::time::SystemTime::now();
    let build_id = build_id_of(&f);
    let stamp = match (&build_id, f.metadata()) {
        (Some(_), Ok(after)) => {
            let (b, a) = (FileStamp::of(&before), FileStamp::of(&after));
            b.trusted(&a, began).then_some(b)
        }
        _ => None,
    };
    Some(FileRecord {
        path: path.to_path_buf(),
        how,
        size: before.size(),
        mtime_ns: mtime_ns(&before),
        build_id,
        stamp,
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
    build_id_of(&std::fs::File::open(path).ok()?)
}

/// How much of a file [`build_id_of`] reads first: the ELF header, the
/// program headers and the notes of a binary or library all lie in its
/// first page, so one pread usually serves them all.
const HEAD_BYTES: usize = 4096;

/// Fills `buf` from offset `off` of `f`, short only at the end of the file.
fn read_full_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let at = off.saturating_add(u64::try_from(n).map_err(std::io::Error::other)?);
        match f.read_at(&mut buf[n..], at) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `len` bytes at offset `off` of `f`: from `head` (its first bytes) when
/// they lie there, else read; None when the file is shorter.
fn bytes_at<'a>(f: &std::fs::File, head: &'a [u8], off: u64, len: usize) -> Option<Cow<'a, [u8]>> {
    if let Some(b) = usize::try_from(off)
        .ok()
        .and_then(|o| head.get(o..o.checked_add(len)?))
    {
        return Some(Cow::Borrowed(b));
    }
    let mut v = vec![0u8; len];
    (read_full_at(f, &mut v, off).ok()? == len).then_some(Cow::Owned(v))
}

/// [`build_id`] of an open file.
pub fn build_id_of(f: &std::fs::File) -> Option<String> {
    let mut head = vec![0u8; HEAD_BYTES];
    let n = read_full_at(f, &mut head, 0).ok()?;
    head.truncate(n);
    let eh = head.get(..52)?;
    if &eh[..4] != b"\x7fELF" || eh[5] != 1 {
        return None;
    }
    let is64 = eh[4] == 2;
    let eh = if is64 { head.get(..64)? } else { eh };
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
        (u64at(eh, 32)?, u16at(eh, 54)?, u16at(eh, 56)?)
    } else {
        (u32at(eh, 28)?, u16at(eh, 42)?, u16at(eh, 44)?)
    };
    if phnum == 0 || phnum > 256 || phentsize < if is64 { 56 } else { 32 } {
        return None;
    }
    let ph = bytes_at(f, &head, phoff, phentsize * phnum)?;
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
        let Some(notes) = bytes_at(f, &head, off, us(size)?) else {
            continue;
        };
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
    let this_boot = boot_id();
    let same_boot = md.host.as_ref().is_some_and(|h| h.boot_id == this_boot);
    // A stamp only speaks for the boot it was taken in (inode numbers are
    // reused, device numbers may be assigned anew after a reboot).
    let stamps_hold = same_boot && !this_boot.is_empty();
    let mut local = std::collections::HashMap::<u64, bool>::new();
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
            Some(_)
                if stamps_hold
                    && unchanged_since_dump(f, &m)
                    && *local
                        .entry(m.dev())
                        .or_insert_with(|| attributes_are_local(&f.path)) => {}
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

/// Whether `f`, as `m` shows it now, is the very inode whose build-id the
/// dump read, unwritten since (see [`FileStamp`]): its build-id then is
/// still the recorded one. Only within the boot of the dump.
fn unchanged_since_dump(f: &FileRecord, m: &std::fs::Metadata) -> bool {
    f.stamp.is_some_and(|s| s == FileStamp::of(m))
}

/// Local file systems, whose inode times are the kernel's own: on NFS,
/// SMB, FUSE and the like a stat may answer from an attribute cache (NFS:
/// up to `acregmax`, 60 s) while another host changed the file, where an
/// open would revalidate. Anything not listed has its build-ids read.
const LOCAL_FS_MAGICS: &[u64] = &[
    0xEF53,      // ext2, ext3, ext4
    0x5846_5342, // xfs
    0x9123_683E, // btrfs
    0x0102_1994, // tmpfs
    0x8584_58F6, // ramfs
    0x794C_7630, // overlayfs (a copy-up gets a new ctime)
    0xF2F5_2010, // f2fs
    0x7371_7368, // squashfs (read-only)
    0xE0F5_E1E2, // erofs (read-only)
    0x2FC1_2FC1, // zfs
    0xCA45_1A4E, // bcachefs
];

/// Whether the file system holding `path` is one of [`LOCAL_FS_MAGICS`].
fn attributes_are_local(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| {
        u64::try_from(s.filesystem_type().0).is_ok_and(|t| LOCAL_FS_MAGICS.contains(&t))
    })
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

    /// A minimal ELF64 file whose one PT_NOTE holds a GNU build-id `id`,
    /// padded to `len` bytes (the note past the first page when `far`).
    fn tiny_elf(id: &[u8], len: usize, far: bool) -> Vec<u8> {
        let note_off: u64 = if far { 8192 } else { 120 };
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&u32::try_from(id.len()).unwrap().to_le_bytes());
        note.extend_from_slice(&3u32.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(id);
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&note_off.to_le_bytes());
        ph[32..40].copy_from_slice(&u64::try_from(note.len()).unwrap().to_le_bytes());
        b.extend_from_slice(&ph);
        b.resize(usize::try_from(note_off).unwrap(), 0);
        b.extend_from_slice(&note);
        assert!(b.len() <= len);
        b.resize(len, 0);
        b
    }

    #[test]
    fn build_id_within_and_past_the_first_page() {
        let d = std::env::temp_dir().join(format!("mh-bid2-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for far in [false, true] {
            let p = d.join(format!("elf-{far}"));
            std::fs::write(&p, tiny_elf(&[0xab, 0xcd, 0x01], 9000, far)).unwrap();
            assert_eq!(build_id(&p).as_deref(), Some("abcd01"), "far={far}");
            // Cut inside the note: no build-id, no panic.
            std::fs::write(
                &p,
                &tiny_elf(&[0xab, 0xcd, 0x01], 9000, far)[..if far { 8200 } else { 130 }],
            )
            .unwrap();
            assert_eq!(build_id(&p), None, "far={far}, truncated");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A restore in the boot of the dump trusts an unchanged stamp; a file
    /// rewritten in place, same size, is still caught by its build-id, and
    /// so is any file when the boot differs.
    #[test]
    fn stamps_skip_only_unchanged_files_of_this_boot() {
        let d = std::env::temp_dir().join(format!("mh-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("lib.so");
        std::fs::write(&p, tiny_elf(&[1, 2, 3, 4], 4096, false)).unwrap();
        // Past the racy window of the write (see FileStamp::trusted).
        std::thread::sleep(std::time::Duration::from_millis(40));
        let rec = record_of(&p, FileUse::Mapped).unwrap();
        assert_eq!(rec.build_id.as_deref(), Some("01020304"));
        let stamp = rec.stamp.expect("an old enough file is stamped");
        let now = std::fs::metadata(&p).unwrap();
        assert_eq!(stamp, FileStamp::of(&now));
        assert!(unchanged_since_dump(&rec, &now));
        assert!(
            attributes_are_local(&p),
            "the temporary directory is on a local file system"
        );
        assert!(!attributes_are_local(Path::new("/proc/self/status")));

        let criu = Criu {
            path: "/nonexistent/criu".into(),
            version: crate::criu::Version(4, 2, 0),
        };
        let mut md = crate::images::metadata::tests::sample();
        md.host = Some(HostRecord {
            arch: std::env::consts::ARCH.into(),
            boot_id: boot_id(),
            cpuinfo: false,
            files: vec![rec.clone()],
        });
        let files = |md: &Metadata| {
            differences_with(md, &d, &criu, CpuCheck::UnlessSameBoot, &mut |_| Ok(true))
                .unwrap()
                .into_iter()
                .filter(|x| {
                    matches!(
                        x,
                        Difference::FileBuildId { .. }
                            | Difference::FileSize { .. }
                            | Difference::FileMissing { .. }
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(files(&md), vec![]);

        // Same size, another build-id: the stamp changed, the id is read.
        std::fs::write(&p, tiny_elf(&[9, 9, 9, 9], 4096, false)).unwrap();
        assert!(!unchanged_since_dump(&rec, &std::fs::metadata(&p).unwrap()));
        assert_eq!(
            files(&md),
            vec![Difference::FileBuildId {
                path: p.clone(),
                image: "01020304".into(),
                host: "09090909".into(),
            }]
        );
        // Another boot: the stamp is not consulted at all.
        std::fs::write(&p, tiny_elf(&[1, 2, 3, 4], 4096, false)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40));
        let rec = record_of(&p, FileUse::Mapped).unwrap();
        std::fs::write(&p, tiny_elf(&[7, 7, 7, 7], 4096, false)).unwrap();
        let mut forged = rec.clone();
        forged.stamp = Some(FileStamp::of(&std::fs::metadata(&p).unwrap()));
        md.host = Some(HostRecord {
            arch: std::env::consts::ARCH.into(),
            boot_id: "another-boot".into(),
            cpuinfo: false,
            files: vec![forged],
        });
        assert_eq!(
            files(&md),
            vec![Difference::FileBuildId {
                path: p.clone(),
                image: "01020304".into(),
                host: "07070707".into(),
            }]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_fresh_file_is_not_stamped() {
        let d = std::env::temp_dir().join(format!("mh-fresh-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("new.so");
        std::fs::write(&p, tiny_elf(&[5; 20], 4096, false)).unwrap();
        let rec = record_of(&p, FileUse::Mapped).unwrap();
        assert_eq!(rec.build_id.as_deref(), Some("05".repeat(20).as_str()));
        assert_eq!(rec.stamp, None, "written within the racy window");
        std::fs::remove_dir_all(&d).unwrap();
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

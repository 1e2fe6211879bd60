//! Checking an image before CRIU reads it. CRIU's restorer trusts its
//! images: a `pages-N.img` shorter than its pagemap says makes the restorer
//! retry `preadv` forever (`Preadv ... returned 0`), writing a log line each
//! time. So every pages image's size is checked against its pagemap, and
//! every file against the size and checksum recorded when it was published.
//!
//! CRIU's image format (criu/include/magic.h, images/pagemap.proto): a
//! pagemap image starts with two little-endian u32 magics (IMG_COMMON_MAGIC
//! then PAGEMAP_MAGIC), then protobuf messages each preceded by its u32
//! size: one `pagemap_head { pages_id = 1 }` and then `pagemap_entry {
//! vaddr = 1; compat_nr_pages = 2; in_parent = 3; flags = 4; nr_pages = 5 }`.
//! Only entries flagged PE_PRESENT have their pages in `pages-<pages_id>.img`
//! (raw pages, no header); PE_PARENT pages live in a parent image.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PE_PARENT: u64 = 1 << 0;
const PE_PRESENT: u64 = 1 << 2;
/// A pagemap is a few KiB; anything far larger is not one CRIU wrote.
const MAX_PAGEMAP_BYTES: u64 = 64 << 20;
/// One pagemap entry is under 32 bytes.
const MAX_ENTRY_BYTES: u32 = 4096;

/// The recorded size and checksum of one image file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileSum {
    pub name: String,
    pub bytes: u64,
    /// XXH64 (seed 0) of the whole file, as 16 hex digits.
    pub xxh64: String,
    /// The file as it was when hashed at publish time; absent when that
    /// could not be trusted (see [`seal`]) and in images made before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<FileStamp>,
}

/// A file's inode and change times. Every write to a file updates its mtime
/// and ctime (and anything else that could swap its content - rename over
/// it, truncate, a copy - changes the inode or the times), so a file with
/// the stamp it had when it was hashed still has the bytes that were
/// hashed: [`verify`] then skips reading it, which for a large image was
/// the longest step of a restore before CRIU runs (~0.3 ms/MiB here).
/// A copy on another host or file system has another inode: hashed again.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub mtime_s: i64,
    pub mtime_ns: i64,
    pub ctime_s: i64,
    pub ctime_ns: i64,
}

/// How old a file's last change must be when its hash starts for its stamp
/// to be trusted. File times come from the kernel's coarse clock (one tick,
/// at most 10 ms at HZ=100, behind the real time): a write in the same tick
/// as the last one, after the hash began, could keep the same times. With
/// the last change two ticks before the hash, any later write gets newer
/// times. (Git's "racily clean" index entries are the same problem.)
const STAMP_MARGIN: std::time::Duration = std::time::Duration::from_millis(20);

impl FileStamp {
    pub fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            mtime_s: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            ctime_s: m.ctime(),
            ctime_ns: m.ctime_nsec(),
        }
    }

    /// The later of the change times, as a wall-clock time (None if it does
    /// not fit one: then the stamp is not trusted).
    fn changed(&self) -> Option<std::time::SystemTime> {
        let at = |s: i64, ns: i64| {
            let s = u64::try_from(s).ok()?;
            let ns = u32::try_from(ns).ok()?;
            std::time::UNIX_EPOCH.checked_add(std::time::Duration::new(s, ns))
        };
        Some(at(self.mtime_s, self.mtime_ns)?.max(at(self.ctime_s, self.ctime_ns)?))
    }

    /// Whether a file stamped `self` before its hash began at `began` and
    /// `after` once it ended was unchanged meanwhile and can be trusted
    /// later (see [`STAMP_MARGIN`]).
    pub fn trusted(&self, after: &FileStamp, began: std::time::SystemTime) -> bool {
        self == after
            && self
                .changed()
                .and_then(|c| c.checked_add(STAMP_MARGIN))
                .is_some_and(|c| c <= began)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("image {dir} is damaged: {file} is {found} bytes but its pagemap {pagemap} lists {expected} bytes of pages; dump the service again")]
    PagesSize {
        dir: PathBuf,
        file: String,
        pagemap: String,
        found: u64,
        expected: u64,
    },
    #[error(
        "image {dir} is damaged: {file} (named by {pagemap}) is missing; dump the service again"
    )]
    PagesMissing {
        dir: PathBuf,
        file: String,
        pagemap: String,
    },
    #[error(
        "image {dir} is damaged: {file} is not a CRIU pagemap ({detail}); dump the service again"
    )]
    Pagemap {
        dir: PathBuf,
        file: String,
        detail: String,
    },
    #[error("image {dir} is damaged: {file} is missing, though it was published with the image; dump the service again")]
    FileMissing { dir: PathBuf, file: String },
    #[error("image {dir} is damaged: {file} is {found} bytes, it was published with {expected}; dump the service again")]
    FileSize {
        dir: PathBuf,
        file: String,
        found: u64,
        expected: u64,
    },
    #[error("image {dir} is damaged: {file} does not match the checksum recorded when it was published; dump the service again")]
    Checksum { dir: PathBuf, file: String },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Files of an image directory that are part of the image (CRIU's images
/// and the metadata), not CRIU's logs or statistics.
fn is_image_file(name: &str) -> bool {
    name.ends_with(".img")
}

/// Hashes (and, with `sync`, fsyncs) every image file in `dir`, sorted by
/// name: what [`super::Staged::publish`] records before the rename.
pub fn seal(dir: &Path, sync: bool) -> Result<Vec<FileSum>, VerifyError> {
    let io = |path: &Path, source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| io(dir, e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_image_file(n))
        .collect();
    names.sort();
    // CRIU has just written these files: let the newest change fall out of
    // the racy window, so that every stamp can be trusted (a few ms at most
    // after a dump, none after a pull or a copy).
    let newest = names
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .filter_map(|m| FileStamp::of(&m).changed())
        .max();
    if let Some(wait) = newest
        .and_then(|c| c.checked_add(STAMP_MARGIN))
        .and_then(|c| c.duration_since(std::time::SystemTime::now()).ok())
    {
        std::thread::sleep(wait.min(STAMP_MARGIN));
    }
    let mut sums = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
        let before = file.metadata().map_err(|e| io(&path, e))?;
        let began = std::time::SystemTime::now();
        let (bytes, hash) = hash_reader(&file).map_err(|e| io(&path, e))?;
        if sync {
            file.sync_all().map_err(|e| io(&path, e))?;
        }
        let after = file.metadata().map_err(|e| io(&path, e))?;
        let (before, after) = (FileStamp::of(&before), FileStamp::of(&after));
        sums.push(FileSum {
            name,
            bytes,
            xxh64: format!("{hash:016x}"),
            stamp: before.trusted(&after, began).then_some(before),
        });
    }
    Ok(sums)
}

/// Checks the image in `dir`: every pages image against its pagemap, and
/// every file recorded at publish time (`sums`; older images have none)
/// against its size and checksum. Reads every recorded byte of a file whose
/// stamp changed since (or that has none) once; the page cache then serves
/// CRIU's own reads.
pub fn verify(dir: &Path, sums: &[FileSum]) -> Result<(), VerifyError> {
    check_pagemaps(dir)?;
    // Sizes first: a truncated file is reported without hashing anything.
    let mut stats = Vec::with_capacity(sums.len());
    for s in sums {
        let path = dir.join(&s.name);
        let m = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VerifyError::FileMissing {
                    dir: dir.to_path_buf(),
                    file: s.name.clone(),
                })
            }
            Err(source) => return Err(VerifyError::Io { path, source }),
        };
        if m.len() != s.bytes {
            return Err(VerifyError::FileSize {
                dir: dir.to_path_buf(),
                file: s.name.clone(),
                found: m.len(),
                expected: s.bytes,
            });
        }
        stats.push(m);
    }
    for (s, m) in sums.iter().zip(&stats) {
        // Not written since it was hashed (see FileStamp): the stat above
        // says so without an open. CRIU opens the files by path later
        // anyway, so an fstat of our own descriptor would prove no more.
        if s.stamp.is_some_and(|st| st == FileStamp::of(m)) {
            continue;
        }
        let path = dir.join(&s.name);
        let file = std::fs::File::open(&path).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        let (_, hash) = hash_reader(&file).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        if format!("{hash:016x}") != s.xxh64 {
            return Err(VerifyError::Checksum {
                dir: dir.to_path_buf(),
                file: s.name.clone(),
            });
        }
    }
    Ok(())
}

/// Every `pagemap*.img` in `dir` against the size of the pages image it names.
pub fn check_pagemaps(dir: &Path) -> Result<(), VerifyError> {
    let rd = std::fs::read_dir(dir).map_err(|source| VerifyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let page = crate::sys::page_size();
    for e in rd.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if !(name.starts_with("pagemap") && name.ends_with(".img")) {
            continue;
        }
        let path = e.path();
        let bad = |detail: String| VerifyError::Pagemap {
            dir: dir.to_path_buf(),
            file: name.clone(),
            detail,
        };
        let size = e
            .metadata()
            .map_err(|source| VerifyError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if size > MAX_PAGEMAP_BYTES {
            return Err(bad(format!(
                "{size} bytes, over the {MAX_PAGEMAP_BYTES}-byte limit"
            )));
        }
        let data = std::fs::read(&path).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        let map = parse_pagemap(&data).map_err(bad)?;
        let pages_name = format!("pages-{}.img", map.pages_id);
        let expected = map.present_pages.saturating_mul(page);
        let found = match std::fs::metadata(dir.join(&pages_name)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && expected == 0 => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VerifyError::PagesMissing {
                    dir: dir.to_path_buf(),
                    file: pages_name,
                    pagemap: name,
                })
            }
            Err(source) => {
                return Err(VerifyError::Io {
                    path: dir.join(&pages_name),
                    source,
                })
            }
        };
        if found != expected {
            return Err(VerifyError::PagesSize {
                dir: dir.to_path_buf(),
                file: pages_name,
                pagemap: name,
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// What a pagemap says: which pages image, and how many pages it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u64,
    pub present_pages: u64,
}

/// Parses a pagemap image (see the module comment).
pub fn parse_pagemap(data: &[u8]) -> Result<Pagemap, String> {
    let u32_at = |off: usize| -> Option<u32> {
        data.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if u32_at(0) != Some(IMG_COMMON_MAGIC) || u32_at(4) != Some(PAGEMAP_MAGIC) {
        return Err("wrong magic".into());
    }
    let mut off = 8;
    let mut head: Option<u64> = None;
    let mut present: u64 = 0;
    while off < data.len() {
        let len = u32_at(off).ok_or_else(|| format!("truncated entry size at byte {off}"))?;
        if len > MAX_ENTRY_BYTES {
            return Err(format!("entry of {len} bytes at byte {off}"));
        }
        off += 4;
        let msg = data
            .get(off..off + len as usize)
            .ok_or_else(|| format!("truncated entry at byte {off}"))?;
        off += len as usize;
        let fields = parse_fields(msg).map_err(|e| format!("{e} in the entry at byte {off}"))?;
        let get = |n: u32| fields.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        match head {
            None => head = Some(get(1).ok_or("the head has no pages_id")?),
            Some(_) => {
                let nr = get(5)
                    .or(get(2))
                    .ok_or_else(|| format!("an entry without nr_pages at byte {off}"))?;
                // As CRIU's init_compat_pagemap_entry: images without flags
                // mark parent pages with in_parent, all others are present.
                let flags = match get(4) {
                    Some(f) => f,
                    None if get(3).unwrap_or(0) != 0 => PE_PARENT,
                    None => PE_PRESENT,
                };
                if flags & PE_PRESENT != 0 {
                    present = present.saturating_add(nr);
                }
            }
        }
    }
    Ok(Pagemap {
        pages_id: head.ok_or("no pagemap head")?,
        present_pages: present,
    })
}

/// The varint fields of a protobuf message (others are skipped).
fn parse_fields(msg: &[u8]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    let varint = |i: &mut usize| -> Result<u64, String> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *msg.get(*i).ok_or("truncated varint")?;
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("overlong varint".into())
    };
    while i < msg.len() {
        let key = varint(&mut i)?;
        let field = u32::try_from(key >> 3).map_err(|_| "field number out of range")?;
        match key & 7 {
            0 => out.push((field, varint(&mut i)?)),
            1 => i += 8,
            5 => i += 4,
            2 => {
                let n = varint(&mut i)?;
                i = i.saturating_add(usize::try_from(n).map_err(|_| "field too long")?);
            }
            w => return Err(format!("wire type {w}")),
        }
        if i > msg.len() {
            return Err("truncated field".into());
        }
    }
    Ok(out)
}

fn hash_reader(mut r: impl Read) -> std::io::Result<(u64, u64)> {
    let mut h = Xxh64::new(0);
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        h.write_all(&buf[..n])?;
    }
    Ok((total, h.finish()))
}

/// XXH64 (Yann Collet's xxHash, 64-bit), streaming: fast enough to check
/// an image of tens of MiB in a few milliseconds.
pub struct Xxh64 {
    v: [u64; 4],
    seed: u64,
    buf: [u8; 32],
    buf_len: usize,
    total: u64,
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl Xxh64 {
    pub fn new(seed: u64) -> Xxh64 {
        Xxh64 {
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            seed,
            buf: [0; 32],
            buf_len: 0,
            total: 0,
        }
    }

    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        v[0] = round(v[0], le64(&s[0..]));
        v[1] = round(v[1], le64(&s[8..]));
        v[2] = round(v[2], le64(&s[16..]));
        v[3] = round(v[3], le64(&s[24..]));
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            Self::stripe(&mut self.v, &b);
            self.buf_len = 0;
        }
        let mut chunks = data.chunks_exact(32);
        for c in &mut chunks {
            Self::stripe(&mut self.v, c);
        }
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn finish(&self) -> u64 {
        let mut h = if self.total >= 32 {
            let [a, b, c, d] = self.v;
            let mut h = a
                .rotate_left(1)
                .wrapping_add(b.rotate_left(7))
                .wrapping_add(c.rotate_left(12))
                .wrapping_add(d.rotate_left(18));
            for v in self.v {
                h = merge(h, v);
            }
            h
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h = (h ^ round(0, le64(rest)))
                .rotate_left(27)
                .wrapping_mul(P1)
                .wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            h = (h ^ u64::from(w).wrapping_mul(P1))
                .rotate_left(23)
                .wrapping_mul(P2)
                .wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h = (h ^ u64::from(b).wrapping_mul(P5))
                .rotate_left(11)
                .wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

impl Write for Xxh64 {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.update(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xxh(data: &[u8]) -> u64 {
        let mut h = Xxh64::new(0);
        h.update(data);
        h.finish()
    }

    #[test]
    fn xxh64_known_values() {
        // Reference values of the xxHash project (XXH64, seed 0).
        assert_eq!(xxh(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh(b"abc"), 0x44BC_2CF5_AD77_0999);
        // Streaming in odd pieces gives the one-shot answer.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let mut h = Xxh64::new(0);
        for c in data.chunks(13) {
            h.update(c);
        }
        assert_eq!(h.finish(), xxh(&data));
        assert_ne!(xxh(&data), xxh(&data[1..]));
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A pagemap as CRIU writes it: (vaddr, nr_pages, flags) entries.
    pub fn pagemap(pages_id: u64, entries: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        d.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut push = |msg: Vec<u8>| {
            d.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_le_bytes());
            d.extend_from_slice(&msg);
        };
        let mut head = vec![0x08];
        varint(pages_id, &mut head);
        push(head);
        for &(vaddr, nr, flags) in entries {
            let mut m = vec![0x08];
            varint(vaddr, &mut m);
            m.push(0x10);
            varint(nr, &mut m);
            m.push(0x20);
            varint(flags, &mut m);
            push(m);
        }
        d
    }

    #[test]
    fn pagemap_counts_only_present_pages() {
        let d = pagemap(
            3,
            &[
                (0x400000, 2, PE_PRESENT),
                (0x7f0000000000, 5, PE_PARENT),
                (0x7f0000100000, 1, PE_PRESENT | 2),
            ],
        );
        assert_eq!(
            parse_pagemap(&d).unwrap(),
            Pagemap {
                pages_id: 3,
                present_pages: 3
            }
        );
        assert!(parse_pagemap(&d[..d.len() - 2])
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_pagemap(b"\0\0\0\0\0\0\0\0")
            .unwrap_err()
            .contains("magic"));
    }

    #[test]
    fn a_stamped_file_is_not_hashed_again_until_it_is_written() {
        let dir = std::env::temp_dir().join(format!("mh-verify-stamp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pages = dir.join("pages-1.img");
        std::fs::write(&pages, vec![7u8; 8192]).unwrap();
        // Sealed right after the write: seal waits out the racy window.
        let sums = seal(&dir, false).unwrap();
        let st = sums[0]
            .stamp
            .expect("a file sealed after the margin is stamped");
        assert_eq!(st, FileStamp::of(&std::fs::metadata(&pages).unwrap()));
        // A wrong checksum goes unnoticed while the stamp matches: proof
        // that the file was not read ...
        let mut forged = sums.clone();
        forged[0].xxh64 = "0000000000000000".into();
        verify(&dir, &forged).unwrap();
        // ... and is found without a stamp, or once the file is written,
        // even with the same bytes.
        let mut unstamped = forged.clone();
        unstamped[0].stamp = None;
        assert!(matches!(
            verify(&dir, &unstamped),
            Err(VerifyError::Checksum { .. })
        ));
        std::fs::write(&pages, vec![7u8; 8192]).unwrap();
        assert!(matches!(
            verify(&dir, &forged),
            Err(VerifyError::Checksum { .. })
        ));
        verify(&dir, &sums).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stamp_is_trusted_only_when_stable_and_older_than_the_margin() {
        let m = std::fs::metadata("/proc/self/exe").unwrap();
        let st = FileStamp::of(&m);
        let changed = st.changed().unwrap();
        assert!(st.trusted(&st, changed + STAMP_MARGIN));
        assert!(!st.trusted(&st, changed + STAMP_MARGIN / 2));
        let other = FileStamp {
            ctime_ns: (st.ctime_ns + 1) % 1_000_000_000,
            ..st
        };
        assert!(!st.trusted(&other, changed + STAMP_MARGIN * 10));
    }

    #[test]
    fn truncated_or_changed_files_are_found() {
        let dir = std::env::temp_dir().join(format!("mh-verify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let page = usize::try_from(crate::sys::page_size()).unwrap();
        std::fs::write(
            dir.join("pagemap-1.img"),
            pagemap(1, &[(0x1000, 3, PE_PRESENT)]),
        )
        .unwrap();
        std::fs::write(dir.join("pages-1.img"), vec![7u8; 3 * page]).unwrap();
        std::fs::write(dir.join("core-1.img"), b"core").unwrap();
        std::fs::write(dir.join("dump.log"), b"not part of the image").unwrap();
        let sums = seal(&dir, false).unwrap();
        let names: Vec<&str> = sums.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["core-1.img", "pagemap-1.img", "pages-1.img"]);
        verify(&dir, &sums).unwrap();

        // Truncated: found by the pagemap alone, without recorded sums.
        std::fs::write(dir.join("pages-1.img"), vec![7u8; page]).unwrap();
        let e = check_pagemaps(&dir).unwrap_err();
        assert!(
            matches!(e, VerifyError::PagesSize { found, .. } if found == page as u64),
            "{e}"
        );
        // Emptied.
        std::fs::write(dir.join("pages-1.img"), b"").unwrap();
        assert!(matches!(
            verify(&dir, &sums),
            Err(VerifyError::PagesSize { .. })
        ));
        // Same size, one byte changed: only the checksum sees it.
        let mut pages = vec![7u8; 3 * page];
        pages[100] = 8;
        std::fs::write(dir.join("pages-1.img"), pages).unwrap();
        let e = verify(&dir, &sums).unwrap_err();
        assert!(
            matches!(e, VerifyError::Checksum { ref file, .. } if file == "pages-1.img"),
            "{e}"
        );
        std::fs::write(dir.join("pages-1.img"), vec![7u8; 3 * page]).unwrap();
        std::fs::remove_file(dir.join("core-1.img")).unwrap();
        assert!(matches!(
            verify(&dir, &sums),
            Err(VerifyError::FileMissing { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

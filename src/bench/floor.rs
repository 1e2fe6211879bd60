//! The floor a restore is held against, measured in the same run: what
//! CRIU needs to restore a payload with next to no memory (the fixed cost:
//! a bare `criu restore` of a tiny C server to its first response) plus
//! the image's pages at this machine's rate of copying memory into fresh
//! pages. Copying into memory that was never touched is what any eager
//! restore must do (CRIU's preadv from the page cache is exactly that),
//! so the page fault and zeroing of each destination page are part of the
//! rate; an already-faulted destination would flatter it.

use super::measure::{millis, Ctx};
use super::workloads::Workload;
use super::BenchError;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The empty payload: the smallest C server of examples/ (a few hundred
/// KiB of memory), stopped before its listen like every workload.
pub fn empty_payload() -> Workload {
    let dir = Path::new(env!("MIEHISTO_PAYLOAD_DIR"));
    let bin = dir.join("simple_server");
    Workload {
        name: "empty",
        about: "examples/simple_server.c, the floor's fixed cost",
        argv: vec![bin.display().to_string(), "--port".into(), "{port}".into()],
        cwd: dir.to_path_buf(),
        path: "/health",
        missing: (!bin.is_file())
            .then(|| format!("{} is missing; run `cargo build`", bin.display())),
    }
}

/// The empty payload's NOTIFY image, made once per benchmark.
pub struct Empty {
    pub images: PathBuf,
    pub port: u16,
}

impl Empty {
    pub fn prebake(ctx: &Ctx) -> Result<Empty, BenchError> {
        let wl = empty_payload();
        if let Some(why) = wl.missing {
            return Err(BenchError::NotInstalled {
                name: wl.name.into(),
                why,
            });
        }
        let port = super::free_port()?;
        let images = ctx.work.join("images").join("empty-notify");
        ctx.prebake(&wl, port, "notify", &images, "empty")?;
        Ok(Empty { images, port })
    }

    /// Bare CRIU restore of the empty payload → first response, in ms.
    pub fn fixed_ms(&self, ctx: &Ctx, tag: &str) -> Result<f64, BenchError> {
        let b = ctx.bare_restore(&self.images, self.port, "/health", &format!("empty-{tag}"))?;
        Ok(millis(b.first_response))
    }
}

/// Bytes of memory pages in a CRIU image directory (its `pages-*.img`).
pub fn image_page_bytes(images: &Path) -> u64 {
    std::fs::read_dir(images)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("pages-") && n.ends_with(".img")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Milliseconds per MiB to copy `bytes` (at least 1 MiB, at most 1 GiB)
/// from memory already touched into freshly mapped anonymous memory.
pub fn copy_ms_per_mib(bytes: u64) -> f64 {
    const MIB: usize = 1 << 20;
    let n = usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .clamp(MIB, 1 << 30);
    // Filled, so every source page is present before the clock starts.
    let src = vec![0x5au8; n];
    // A mapping of its own: no page of it is present until the copy
    // touches it (an allocator could return memory faulted in earlier).
    let Ok(mut dst) = crate::sys::FreshMap::new(n) else {
        return f64::NAN;
    };
    let t = Instant::now();
    dst.as_mut_slice().copy_from_slice(&src);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    // Keep the copy from being optimised away.
    std::hint::black_box(dst.as_mut_slice());
    ms / (n as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rate_is_positive_and_pages_are_summed() {
        let r = copy_ms_per_mib(4 << 20);
        assert!(r > 0.0 && r.is_finite(), "{r}");
        let dir = std::env::temp_dir().join(format!("mh-floor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pages-1.img"), vec![0u8; 8192]).unwrap();
        std::fs::write(dir.join("pages-2.img"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.join("pagemap-1.img"), vec![0u8; 100]).unwrap();
        assert_eq!(image_page_bytes(&dir), 12288);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

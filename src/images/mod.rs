//! The image store: a dump is written into a hidden staging directory beside
//! its destination and published by `rename(2)`, so a reader sees either no
//! image or a whole one — never a half-written dump.

pub mod compat;
pub mod metadata;
pub mod oci;
pub mod verify;

pub use metadata::{BackendRecord, Metadata, MetadataError, StopRecord};
use std::path::{Path, PathBuf};
pub use verify::{FileSum, VerifyError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{dest} already holds an image; remove it or choose another --images directory")]
    Exists { dest: PathBuf },
    #[error("cannot create the staging directory {path}")]
    Stage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the image metadata in {path}")]
    WriteMetadata {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot publish {from} as {to}")]
    Publish {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid image name {0:?}")]
    BadName(String),
    #[error("cannot seal the staged image")]
    Seal(#[source] VerifyError),
    #[error("cannot flush {path} to disk")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// fsync(2) of a directory, so that the names in it (a new file, a
/// rename) survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Sync {
            path: dir.to_path_buf(),
            source,
        })
}

/// An image being written. Dropped unpublished, it is removed.
#[derive(Debug)]
pub struct Staged {
    pub dir: PathBuf,
    dest: PathBuf,
    published: bool,
}

/// Size and file count of a directory (not recursive: CRIU images are flat).
pub fn dir_usage(dir: &Path) -> (u64, u64) {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .fold((0, 0), |(b, n), m| (b + m.len(), n + 1))
        })
        .unwrap_or((0, 0))
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut r| r.next().is_none())
        .unwrap_or(false)
}

/// Removes the staging directories `<prefix><pid>` in `parent` whose
/// writer is gone (a runmh killed mid-dump leaves hundreds of MB there).
/// A live pid, even a reused one, keeps its directory: never a live dump's.
fn remove_dead_staging(parent: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            log::info!(
                "removing {}, left by a dump that was interrupted",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `dest` made absolute (the image is renamed there from another working
/// directory's view), refused when it holds anything: a publish never
/// replaces an image.
fn free_destination(dest: &Path) -> Result<PathBuf, StoreError> {
    let dest = std::path::absolute(dest).map_err(|source| StoreError::Stage {
        path: dest.to_path_buf(),
        source,
    })?;
    if dest.exists() && !is_empty_dir(&dest) {
        return Err(StoreError::Exists { dest });
    }
    Ok(dest)
}

impl Staged {
    /// Prepares to write an image that will be published at `dest`, which
    /// must not exist yet (or be an empty directory).
    pub fn new(dest: &Path) -> Result<Staged, StoreError> {
        let dest = free_destination(dest)?;
        // Only `/` has no parent, and it cannot be an image's name.
        let parent = dest
            .parent()
            .ok_or_else(|| StoreError::BadName(dest.display().to_string()))?;
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Stage {
            path: parent.to_path_buf(),
            source,
        })?;
        let name = dest
            .file_name()
            .ok_or_else(|| StoreError::BadName(dest.display().to_string()))?;
        let prefix = format!(".{}.staging-", name.to_string_lossy());
        remove_dead_staging(parent, &prefix);
        let dir = parent.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|source| StoreError::Stage {
            path: dir.clone(),
            source,
        })?;
        Ok(Staged {
            dir,
            dest,
            published: false,
        })
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Records every image file's size and checksum in `md`, writes it,
    /// flushes files and directory to disk, and renames the staging
    /// directory into place: after a crash the published name holds the
    /// whole image, not files whose data never reached the disk.
    pub fn publish(mut self, md: &Metadata) -> Result<PathBuf, StoreError> {
        let mut md = md.clone();
        md.files = verify::seal(&self.dir, true).map_err(StoreError::Seal)?;
        md.write(&self.dir)
            .map_err(|source| StoreError::WriteMetadata {
                path: self.dir.clone(),
                source,
            })?;
        sync_dir(&self.dir)?;
        // An empty destination directory may be replaced; rename(2) onto a
        // non-empty one fails, which is what we want.
        if self.dest.is_dir() && is_empty_dir(&self.dest) {
            let _ = std::fs::remove_dir(&self.dest);
        }
        std::fs::rename(&self.dir, &self.dest).map_err(|source| StoreError::Publish {
            from: self.dir.clone(),
            to: self.dest.clone(),
            source,
        })?;
        self.published = true;
        sync_dir(self.dest.parent().unwrap_or(Path::new("/")))?;
        Ok(self.dest.clone())
    }
}

impl Staged {
    /// Like [`Staged::publish`], at another destination than the one it
    /// was staged for (on the same file system: it is one `rename(2)`).
    pub fn publish_to(mut self, md: &Metadata, dest: &Path) -> Result<PathBuf, StoreError> {
        self.dest = free_destination(dest)?;
        self.publish(md)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_image_is_published_whole_or_not_at_all() {
        let base = std::env::temp_dir().join(format!("mh-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dest = base.join("img");
        {
            let s = Staged::new(&dest).unwrap();
            std::fs::write(s.dir.join("pages-1.img"), b"data").unwrap();
            // dropped without publish: nothing appears
        }
        assert!(!dest.exists());
        assert_eq!(
            std::fs::read_dir(&base).unwrap().count(),
            0,
            "staging removed"
        );
        let s = Staged::new(&dest).unwrap();
        std::fs::write(s.dir.join("pages-1.img"), b"data").unwrap();
        let md = metadata::tests::sample();
        let p = s.publish(&md).unwrap();
        assert_eq!(p, dest);
        assert!(dest.join(metadata::FILE_NAME).is_file());
        assert_eq!(dir_usage(&dest).1, 2);
        assert!(matches!(Staged::new(&dest), Err(StoreError::Exists { .. })));
        // A killed writer's staging directory goes with the next write
        // to the same place; a live writer's stays.
        let dead = base.join(".img2.staging-999999999");
        let live = base.join(format!(".img2.staging-{}", std::process::id()));
        std::fs::create_dir_all(dead.join("x")).unwrap();
        drop(Staged::new(&base.join("img2")).unwrap());
        assert!(!dead.exists() && !live.exists());
        std::fs::create_dir_all(&dead).unwrap();
        let s = Staged::new(&base.join("img2")).unwrap();
        assert!(!dead.exists() && s.dir == live && live.exists());
        drop(s);
        std::fs::remove_dir_all(&base).unwrap();
    }
}

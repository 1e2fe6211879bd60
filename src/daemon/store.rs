//! The daemon's image store: `<state>/images/<service>/<generation>/`.
//!
//! The daemon never writes image files itself: it hands runmh the final
//! path of the next generation, and runmh stages the dump beside it
//! ([`crate::images::Staged`]: `.<generation>.staging-<pid>`) and publishes
//! it with one `rename(2)`. A generation directory therefore either does
//! not exist or is whole. Removal goes the same way backwards: rename to a
//! hidden name first, then delete, so a half-deleted generation is never
//! visible under its number either.

use super::api::ImageInfo;
use crate::images::{self, Metadata};
use crate::sys::procfs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("cannot create the image directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{service} has no image generation {generation}; `mhctl image list {service}` shows the generations")]
    NoGeneration { service: String, generation: u64 },
    #[error("{service} has no image; run `mhctl service prebake {service}` or `mhctl service dump {service}` first")]
    NoImage { service: String },
    #[error("image generation {generation} of {service} is unreadable")]
    Unreadable {
        service: String,
        generation: u64,
        #[source]
        source: images::MetadataError,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// The generation number an entry of a service directory is about, and
/// whether it is a published generation (a plain number) or a by-product:
/// `.N.staging-PID`, `.N.removing-PID`, `N.dump-failed.log`.
fn entry_generation(file: &str) -> Option<(u64, bool)> {
    if let Ok(n) = file.parse::<u64>() {
        return Some((n, true));
    }
    let digits: String = file
        .trim_start_matches('.')
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok().map(|n| (n, false))
}

/// The pid in a `.N.staging-PID` or `.N.removing-PID` name.
fn writer_pid(file: &str) -> Option<i32> {
    let (_, pid) = file
        .rsplit_once(".staging-")
        .or_else(|| file.rsplit_once(".removing-"))?;
    pid.parse().ok()
}

impl ImageStore {
    pub fn open(state_dir: &Path) -> Result<ImageStore, ImageStoreError> {
        let root = state_dir.join("images");
        std::fs::create_dir_all(&root).map_err(|source| ImageStoreError::CreateDir {
            path: root.clone(),
            source,
        })?;
        Ok(ImageStore { root })
    }

    pub fn service_dir(&self, service: &str) -> PathBuf {
        self.root.join(service)
    }

    pub fn generation_path(&self, service: &str, generation: u64) -> PathBuf {
        self.service_dir(service).join(generation.to_string())
    }

    fn entries(&self, service: &str) -> Vec<String> {
        std::fs::read_dir(self.service_dir(service))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Published generations, oldest first.
    pub fn generations(&self, service: &str) -> Vec<u64> {
        let mut g: Vec<u64> = self
            .entries(service)
            .iter()
            .filter_map(|f| entry_generation(f))
            .filter(|&(_, published)| published)
            .map(|(n, _)| n)
            .filter(|&n| self.generation_path(service, n).is_dir())
            .collect();
        g.sort_unstable();
        g
    }

    /// The number for a new generation: above every number in use, a
    /// staging directory or a failed dump's log included, and above `floor`
    /// (the highest ever handed out, from the registry).
    pub fn next_generation(&self, service: &str, floor: u64) -> Result<u64, ImageStoreError> {
        let dir = self.service_dir(service);
        std::fs::create_dir_all(&dir)
            .map_err(|source| ImageStoreError::CreateDir { path: dir, source })?;
        let max = self
            .entries(service)
            .iter()
            .filter_map(|f| entry_generation(f))
            .map(|(n, _)| n)
            .max()
            .unwrap_or(0);
        Ok(max.max(floor) + 1)
    }

    /// What one generation holds, read from its metadata.
    pub fn info(&self, service: &str, generation: u64) -> ImageInfo {
        let path = self.generation_path(service, generation);
        let (bytes, files) = images::dir_usage(&path);
        match Metadata::read(&path) {
            Ok(md) => info_of(service, generation, path, &md, bytes, files),
            Err(e) => ImageInfo {
                service: service.to_string(),
                generation,
                path,
                valid: false,
                problem: Some(e.to_string()),
                created_unix_ms: 0,
                backend: None,
                stop_syscall: None,
                bytes,
                files,
                dump_ms: 0,
            },
        }
    }

    pub fn list(&self, service: &str) -> Vec<ImageInfo> {
        self.generations(service)
            .into_iter()
            .map(|g| self.info(service, g))
            .collect()
    }

    /// The newest generation whose metadata validates.
    pub fn newest_valid(&self, service: &str) -> Option<(u64, Metadata)> {
        self.generations(service).into_iter().rev().find_map(|g| {
            match Metadata::read(&self.generation_path(service, g)) {
                Ok(md) => Some((g, md)),
                Err(e) => {
                    log::warn!("{service}: skipping image generation {g}: {e}");
                    None
                }
            }
        })
    }

    pub fn metadata(
        &self,
        service: &str,
        generation: Option<u64>,
    ) -> Result<(ImageInfo, Metadata), ImageStoreError> {
        let generation = match generation {
            Some(g) => g,
            None => *self
                .generations(service)
                .last()
                .ok_or_else(|| ImageStoreError::NoImage {
                    service: service.to_string(),
                })?,
        };
        let path = self.generation_path(service, generation);
        if !path.is_dir() {
            return Err(ImageStoreError::NoGeneration {
                service: service.to_string(),
                generation,
            });
        }
        let info = self.info(service, generation);
        let md = Metadata::read(&path).map_err(|source| ImageStoreError::Unreadable {
            service: service.to_string(),
            generation,
            source,
        })?;
        Ok((info, md))
    }

    /// Removes one generation: hidden first (one rename), then deleted.
    pub fn remove_generation(&self, service: &str, generation: u64) -> Result<(), ImageStoreError> {
        let path = self.generation_path(service, generation);
        if !path.is_dir() {
            return Err(ImageStoreError::NoGeneration {
                service: service.to_string(),
                generation,
            });
        }
        let hidden = self
            .service_dir(service)
            .join(format!(".{generation}.removing-{}", std::process::id()));
        std::fs::rename(&path, &hidden).map_err(|source| ImageStoreError::Remove {
            path: path.clone(),
            source,
        })?;
        std::fs::remove_dir_all(&hidden).map_err(|source| ImageStoreError::Remove {
            path: hidden,
            source,
        })
    }

    /// Removes every image of a service, hidden first like one generation.
    pub fn remove_service(&self, service: &str) -> Result<(), ImageStoreError> {
        let dir = self.service_dir(service);
        if !dir.exists() {
            return Ok(());
        }
        let hidden = self
            .root
            .join(format!(".{service}.removing-{}", std::process::id()));
        std::fs::rename(&dir, &hidden).map_err(|source| ImageStoreError::Remove {
            path: dir.clone(),
            source,
        })?;
        std::fs::remove_dir_all(&hidden).map_err(|source| ImageStoreError::Remove {
            path: hidden,
            source,
        })
    }

    /// Removes what interrupted writers left behind: staging and removal
    /// directories whose process is gone. A live writer (a runmh prebake
    /// that outlived a daemon restart) keeps its staging directory.
    pub fn clean_stale(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let mut dirs = vec![self.root.clone()];
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if !file.starts_with('.') {
                    continue;
                }
                let Some(pid) = writer_pid(&file) else {
                    continue;
                };
                if pid != nix::unistd::getpid().as_raw()
                    && procfs::alive(nix::unistd::Pid::from_raw(pid))
                {
                    continue;
                }
                if std::fs::remove_dir_all(e.path()).is_ok() {
                    removed.push(e.path());
                }
            }
        }
        removed
    }

    /// Hidden work directories (staging, removal) of one service.
    pub fn hidden_entries(&self, service: &str) -> Vec<String> {
        self.entries(service)
            .into_iter()
            .filter(|f| f.starts_with('.'))
            .collect()
    }
}

pub fn info_of(
    service: &str,
    generation: u64,
    path: PathBuf,
    md: &Metadata,
    bytes: u64,
    files: u64,
) -> ImageInfo {
    ImageInfo {
        service: service.to_string(),
        generation,
        path,
        valid: true,
        problem: None,
        created_unix_ms: md.created_unix_ms,
        backend: Some(md.backend.kind),
        stop_syscall: md.stop.as_ref().map(|s| s.syscall.clone()),
        bytes,
        files,
        dump_ms: md.dump_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        assert_eq!(entry_generation("12"), Some((12, true)));
        assert_eq!(entry_generation(".3.staging-77"), Some((3, false)));
        assert_eq!(entry_generation("4.dump-failed.log"), Some((4, false)));
        assert_eq!(entry_generation("notes"), None);
        assert_eq!(writer_pid(".3.staging-77"), Some(77));
        assert_eq!(writer_pid(".web.removing-5"), Some(5));
        assert_eq!(writer_pid("3"), None);
    }

    #[test]
    fn generations_numbering_and_removal() {
        let state = std::env::temp_dir().join(format!("mh-imgstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let store = ImageStore::open(&state).unwrap();
        assert_eq!(store.next_generation("web", 0).unwrap(), 1);
        std::fs::create_dir_all(store.generation_path("web", 1)).unwrap();
        std::fs::create_dir_all(store.generation_path("web", 4)).unwrap();
        std::fs::write(store.service_dir("web").join("6.dump-failed.log"), b"x").unwrap();
        assert_eq!(store.generations("web"), vec![1, 4]);
        assert_eq!(store.next_generation("web", 0).unwrap(), 7);
        assert_eq!(store.next_generation("web", 9).unwrap(), 10);
        let info = store.info("web", 4);
        assert!(
            !info.valid
                && info
                    .problem
                    .as_deref()
                    .unwrap_or("")
                    .contains("miehisto.json"),
            "{info:?}"
        );
        assert!(store.newest_valid("web").is_none());
        // A staging directory of a dead writer goes; ours would too.
        let dead = store.service_dir("web").join(".8.staging-999999999");
        std::fs::create_dir_all(&dead).unwrap();
        assert_eq!(store.clean_stale(), vec![dead]);
        store.remove_generation("web", 4).unwrap();
        assert_eq!(store.generations("web"), vec![1]);
        assert!(store.hidden_entries("web").is_empty());
        assert!(matches!(
            store.remove_generation("web", 4),
            Err(ImageStoreError::NoGeneration { .. })
        ));
        store.remove_service("web").unwrap();
        assert!(!store.service_dir("web").exists());
        std::fs::remove_dir_all(&state).unwrap();
    }
}

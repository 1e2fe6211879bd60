//! Versioned image metadata (`miehisto.json` beside CRIU's images): what was
//! dumped, how, by which CRIU on which kernel. Validated on every read.

use crate::sandbox::ExternalMount;
use crate::spec::SandboxSpec;
use crate::stop::hit::StopHit;
use crate::stop::BackendKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "miehisto.json";
/// Version 2 names the backend kind as an enum; version 1 kept it as free
/// text, though it only ever wrote the same three words (`trace`,
/// `notify`, `none`), so a version 1 file reads as version 2.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this runmh still reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// Metadata larger than this is refused unread: it is a few KiB normally.
pub const MAX_BYTES: u64 = 1 << 20;
/// CRIU files an image must have to be restorable at all.
pub const REQUIRED_FILES: &[&str] = &["inventory.img", "pstree.img"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendRecord {
    /// `none` is a plain dump at any moment.
    pub kind: BackendKind,
    /// Why it was chosen (auto selection, or "requested").
    pub reason: String,
    /// The marker signal (NOTIFY).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker_signal: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StopRecord {
    /// The syscall the service was held before.
    pub syscall: String,
    /// Milliseconds from the sandbox's start to the stop.
    pub since_start_ms: u64,
    /// What the trap saw: for TRACE the stop syscall and its arguments; for
    /// NOTIFY the marker `kill(pid, sig)`.
    pub hit: StopHit,
    /// The TCP sockets the tree held bound at the stop point (on-demand
    /// services listen on their addresses while at zero).
    #[serde(default)]
    pub bound: Vec<crate::sockets::BoundSocket>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub format_version: u32,
    pub miehisto_version: String,
    pub criu_version: String,
    pub kernel: String,
    pub created_unix_ms: u64,
    pub spec: SandboxSpec,
    pub externals: Vec<ExternalMount>,
    pub backend: BackendRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopRecord>,
    /// Host pid of the dumped tree's root, for the record.
    pub dumped_pid: i32,
    pub dump_ms: u64,
    pub image_bytes: u64,
    pub image_files: u64,
    pub leave_running: bool,
    /// The host and the files the tree used, for the compatibility check
    /// before a restore elsewhere; absent in images made before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<super::compat::HostRecord>,
    /// Every CRIU image file's size and checksum, recorded at publish time
    /// and checked before a restore (empty in images made before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<super::FileSum>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(
        "{dir} does not exist; give the directory that `runmh dump` or `runmh prebake` published"
    )]
    Missing { dir: PathBuf },
    #[error("{dir} holds no miehisto image ({FILE_NAME} is missing); it may be empty or a half-written dump")]
    NoMetadata { dir: PathBuf },
    #[error("{path} is {size} bytes, larger than the {MAX_BYTES}-byte limit for image metadata; the image is corrupt")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path} is corrupt: {detail}; dump the service again")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path} has format version {found}, this runmh reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}; use a matching runmh or dump again")]
    Version { path: PathBuf, found: u32 },
    #[error("image {dir} lacks {file}; the dump is incomplete, dump again")]
    Incomplete { dir: PathBuf, file: String },
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Metadata {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(FILE_NAME);
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&path, &text)
    }

    /// Reads and validates the metadata of the image in `dir`.
    pub fn read(dir: &Path) -> Result<Metadata, MetadataError> {
        if !dir.is_dir() {
            return Err(MetadataError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        let path = dir.join(FILE_NAME);
        // One open: the size limit is checked on the descriptor read from.
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetadataError::NoMetadata {
                    dir: dir.to_path_buf(),
                })
            }
            Err(source) => return Err(MetadataError::Io { path, source }),
        };
        let size = match file.metadata() {
            Ok(m) => m.len(),
            Err(source) => return Err(MetadataError::Io { path, source }),
        };
        if size > MAX_BYTES {
            return Err(MetadataError::TooLarge { path, size });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        if let Err(source) = std::io::Read::read_to_end(&mut file, &mut bytes) {
            return Err(MetadataError::Io { path, source });
        }
        // Parsed once, as the current layout (versions 1 and 2 share it,
        // see FORMAT_VERSION); only a file that does not parse is probed
        // for its version, so that a future version is named as such
        // rather than as corrupt. Same verdicts as probing first, at half
        // the parsing (the metadata is ~20 KiB for a Python service).
        #[derive(Deserialize)]
        struct Probe {
            format_version: u32,
        }
        let parsed: Result<Metadata, _> = serde_json::from_slice(&bytes);
        let version = match &parsed {
            Ok(md) => md.format_version,
            Err(_) => match serde_json::from_slice::<Probe>(&bytes) {
                Ok(p) => p.format_version,
                Err(e) => {
                    return Err(MetadataError::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })
                }
            },
        };
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(MetadataError::Version {
                path,
                found: version,
            });
        }
        let mut md = parsed.map_err(|e| MetadataError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        md.format_version = FORMAT_VERSION;
        if md.spec.argv.is_empty()
            || !md.spec.program.is_absolute()
            || !md.spec.log_dir.is_absolute()
        {
            return Err(MetadataError::Corrupt {
                path,
                detail: "the recorded command or log directory is invalid".into(),
            });
        }
        for f in REQUIRED_FILES {
            if !dir.join(f).is_file() {
                return Err(MetadataError::Incomplete {
                    dir: dir.to_path_buf(),
                    file: f.to_string(),
                });
            }
        }
        Ok(md)
    }
}

/// The running kernel's release, for the record.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Metadata {
        Metadata {
            format_version: FORMAT_VERSION,
            miehisto_version: "0.1.0".into(),
            criu_version: "4.2.1".into(),
            kernel: "6.18".into(),
            created_unix_ms: 1,
            spec: SandboxSpec {
                argv: vec!["python3".into(), "-m".into(), "http.server".into()],
                program: "/usr/bin/python3".into(),
                env: vec![("PATH".into(), "/bin".into())],
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                log_dir: "/var/log/x".into(),
            },
            externals: vec![ExternalMount {
                path: "/dev".into(),
                key: "dev".into(),
            }],
            backend: BackendRecord {
                kind: BackendKind::Trace,
                reason: "requested".into(),
                marker_signal: None,
            },
            stop: Some(StopRecord {
                syscall: "listen".into(),
                since_start_ms: 120,
                hit: StopHit {
                    tid: 1,
                    tgid: 1,
                    syscall: "listen".into(),
                    nr: 50,
                    args: [3, 5, 0, 0, 0, 0],
                    at_unix_ms: 2,
                    frozen: vec![1],
                    held: false,
                },
                bound: vec![],
            }),
            dumped_pid: 1234,
            dump_ms: 80,
            image_bytes: 1000,
            image_files: 10,
            leave_running: false,
            host: None,
            files: Vec::new(),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mh-md-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_validation() {
        let d = tempdir("rt");
        let md = sample();
        md.write(&d).unwrap();
        assert!(matches!(
            Metadata::read(&d),
            Err(MetadataError::Incomplete { .. })
        ));
        for f in REQUIRED_FILES {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        assert_eq!(Metadata::read(&d).unwrap(), md);

        std::fs::write(d.join(FILE_NAME), b"{not json").unwrap();
        let e = Metadata::read(&d).unwrap_err();
        assert!(matches!(e, MetadataError::Corrupt { .. }), "{e}");

        std::fs::write(d.join(FILE_NAME), br#"{"format_version": 99}"#).unwrap();
        assert!(matches!(
            Metadata::read(&d),
            Err(MetadataError::Version { found: 99, .. })
        ));

        let big = vec![b' '; usize::try_from(MAX_BYTES + 1).unwrap()];
        std::fs::write(d.join(FILE_NAME), big).unwrap();
        assert!(matches!(
            Metadata::read(&d),
            Err(MetadataError::TooLarge { .. })
        ));

        std::fs::remove_file(d.join(FILE_NAME)).unwrap();
        assert!(matches!(
            Metadata::read(&d),
            Err(MetadataError::NoMetadata { .. })
        ));
        assert!(matches!(
            Metadata::read(&d.join("nope")),
            Err(MetadataError::Missing { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Written by `runmh prebake` 0.1.0 (format version 1) for
    /// examples/http_server.py.
    const V1_METADATA: &str = include_str!("../../tests/fixtures/v1/miehisto.json");

    #[test]
    fn a_version_1_image_still_reads() {
        let d = tempdir("v1");
        std::fs::write(d.join(FILE_NAME), V1_METADATA).unwrap();
        for f in REQUIRED_FILES {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let md = Metadata::read(&d).unwrap();
        assert_eq!(md.format_version, FORMAT_VERSION);
        assert_eq!(md.backend.kind, BackendKind::Trace);
        assert_eq!(
            md.backend.reason,
            "auto: the supervisor can ptrace the target"
        );
        assert_eq!(md.criu_version, "4.2.1");
        assert_eq!(md.stop.as_ref().unwrap().hit.syscall, "listen");
        assert_eq!(md.dumped_pid, 19212);

        // A kind version 1 never wrote is refused, naming what was expected.
        let bad = V1_METADATA.replace("\"kind\": \"trace\"", "\"kind\": \"ptrace\"");
        std::fs::write(d.join(FILE_NAME), bad).unwrap();
        let e = Metadata::read(&d).unwrap_err().to_string();
        assert!(
            e.contains("unknown variant `ptrace`") && e.contains("`notify`"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}

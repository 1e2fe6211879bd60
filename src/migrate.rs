//! Live migration, the CRIU side: a dump whose pages go straight to a
//! page server on the destination host, and that page server.
//!
//! On the destination, `criu page-server --daemon -D DIR --address ADDR
//! --port PORT` listens for one dump and writes the pagemap and pages it
//! receives into DIR; on the source, `criu dump --page-server --address
//! ADDR --port PORT` sends them there instead of writing them, and writes
//! only the rest of the image (cores, mm, files, sockets: tens of KiB)
//! locally; these are then copied over and completed with the pages into
//! a full image. With `--leave-stopped` the source tree stays stopped
//! after the dump, so nothing it does afterwards is lost: it is killed
//! once the destination answers, or resumed if the destination fails.
//!
//! Iterative pre-dumps (`criu pre-dump --track-mem`, each iteration sending
//! only the pages dirtied since the last) need the kernel's soft-dirty bits
//! (CONFIG_MEM_SOFT_DIRTY); [`dirty_tracking`] asks CRIU whether they are
//! there (`criu check --feature mem_dirty_track`) and a pre-dump is refused
//! with that reason when they are not.
//!
//! The pages are the service's memory (its secrets included), so the page
//! server and the dump speak TLS (CRIU's `--tls`, GnuTLS), with a CA and
//! a certificate made for this one migration ([`TlsMaterial`]): the
//! destination makes them and the source receives them through the
//! migration's own channel (the daemons' sockets, or ssh), so no other
//! party can connect to the page server or pose as it.

use crate::criu::argv::{address_port, dirs_and_log};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A runner for callers that reap nothing else: `status()`.
pub fn run_plain(c: &mut Command) -> std::io::Result<bool> {
    c.status().map(|s| s.success())
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot run {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--pre-dump needs memory dirty tracking, which this kernel lacks (`criu check --feature mem_dirty_track` fails: the kernel is built without CONFIG_MEM_SOFT_DIRTY); migrate without --pre-dump")]
    NoDirtyTracking,
    #[error("criu page-server did not start on {address}:{port}: {line} (CRIU's log: {log})")]
    PageServer {
        address: String,
        port: u16,
        line: String,
        log: PathBuf,
    },
    #[error("criu page-server started but wrote no pid to {path}")]
    NoPid { path: PathBuf },
    #[error("malformed base64 data: {0}")]
    Base64(String),
    #[error("cannot make the page server's TLS certificate for {address}")]
    Certificate {
        address: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write the page server's TLS file {path}")]
    WriteTls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One migration's TLS: a CA made for it and one certificate, for the
/// destination's address, signed by it. Both ends present the certificate
/// and trust only the CA: CRIU requires a client certificate and checks
/// either peer's against the page server's address (`--address`).
///
/// Validity: rcgen's default span (1975–4096) on purpose. The key pair and
/// the CA live for one migration and are deleted after it, so the dates
/// protect nothing, while a short span would fail a migration between
/// hosts whose clocks differ.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &format!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"(secret)")
            .finish()
    }
}

impl TlsMaterial {
    /// A fresh CA and a certificate for `address` (an IP address or a host
    /// name, as the dump will name the page server).
    pub fn generate(address: &str) -> Result<TlsMaterial, MigrateError> {
        let fail = |source| MigrateError::Certificate {
            address: address.to_string(),
            source,
        };
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().map_err(fail)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "miehisto migration CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).map_err(fail)?;
        let key = KeyPair::generate().map_err(fail)?;
        let mut leaf = CertificateParams::new(vec![address.to_string()]).map_err(fail)?;
        leaf.distinguished_name.push(DnType::CommonName, address);
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::new(ca, ca_key);
        let cert = leaf.signed_by(&key, &issuer).map_err(fail)?;
        Ok(TlsMaterial {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the three PEM files into `dir` (private: 0700 / 0600).
    pub fn write(&self, dir: &Path) -> Result<TlsFiles, MigrateError> {
        let files = TlsFiles::in_dir(dir);
        crate::files::private_dir(dir).map_err(|source| MigrateError::WriteTls {
            path: dir.to_path_buf(),
            source,
        })?;
        for (path, pem) in [
            (&files.cacert, &self.ca_pem),
            (&files.cert, &self.cert_pem),
            (&files.key, &self.key_pem),
        ] {
            crate::files::write_replace(path, pem.as_bytes()).map_err(|source| {
                MigrateError::WriteTls {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(files)
    }
}

/// Where a [`TlsMaterial`] was written, as CRIU's `--tls-*` options take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cacert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The file names [`TlsMaterial::write`] uses in `dir`.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            cacert: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    pub fn argv(&self) -> Vec<OsString> {
        vec![
            "--tls".into(),
            "--tls-cacert".into(),
            self.cacert.clone().into_os_string(),
            "--tls-cert".into(),
            self.cert.clone().into_os_string(),
            "--tls-key".into(),
            self.key.clone().into_os_string(),
        ]
    }
}

/// Where a dump sends its pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageServerTarget {
    pub address: String,
    pub port: u16,
    /// The migration's TLS files (None: plain TCP, only for research).
    pub tls: Option<TlsFiles>,
}

/// What a migration adds to `criu dump`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpExtra {
    pub page_server: Option<PageServerTarget>,
    /// Leave the tree stopped after a successful dump (neither killed nor resumed).
    pub leave_stopped: bool,
}

impl DumpExtra {
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        if let Some(ps) = &self.page_server {
            a.push("--page-server".into());
            a.extend(address_port(&ps.address, ps.port));
            if let Some(t) = &ps.tls {
                a.extend(t.argv());
            }
            a.extend([
                // Client connections cannot follow to another address:
                // connected sockets are dumped as closed (the restore's
                // --tcp-close brings them back shut down), and connections
                // not yet accepted are dropped, instead of failing the dump.
                "--tcp-close".into(),
                "--skip-in-flight".into(),
            ]);
        }
        if self.leave_stopped {
            a.push("--leave-stopped".into());
        }
        a
    }
}

/// `criu page-server` on the destination.
#[derive(Debug, Clone)]
pub struct PageServerArgs {
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    pub log_name: String,
    pub address: String,
    pub port: u16,
    pub pidfile: PathBuf,
    /// The migration's TLS files (None: plain TCP, only for research).
    pub tls: Option<TlsFiles>,
}

impl PageServerArgs {
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["page-server".into()];
        a.extend(dirs_and_log(
            &self.images_dir,
            &self.work_dir,
            &self.log_name,
        ));
        a.extend(address_port(&self.address, self.port));
        if let Some(t) = &self.tls {
            a.extend(t.argv());
        }
        a.extend([
            // The parent returns once the socket listens; the server
            // (re-parented to the daemon, a subreaper) takes one dump.
            "--daemon".into(),
            "--pidfile".into(),
            self.pidfile.clone().into_os_string(),
        ]);
        a
    }

    /// Starts the page server with `run` (which runs a command to its end
    /// and tells whether it succeeded: a daemon reaps its children itself);
    /// returns the server's pid once it listens.
    pub fn start(
        &self,
        criu: &Path,
        run: impl FnOnce(&mut Command) -> std::io::Result<bool>,
    ) -> Result<i32, MigrateError> {
        let _ = std::fs::remove_file(&self.pidfile);
        let mut c = Command::new(criu);
        c.args(self.argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let ok = run(&mut c).map_err(|source| MigrateError::Spawn {
            path: criu.to_path_buf(),
            source,
        })?;
        let log = self.work_dir.join(&self.log_name);
        if !ok {
            return Err(MigrateError::PageServer {
                address: self.address.clone(),
                port: self.port,
                line: crate::criu::log::decisive_line_of(&log),
                log,
            });
        }
        std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 0)
            .ok_or_else(|| MigrateError::NoPid {
                path: self.pidfile.clone(),
            })
    }
}

/// Whether CRIU can track dirty memory here (what `--pre-dump` needs);
/// `run` as for [`PageServerArgs::start`].
pub fn dirty_tracking(
    criu: &Path,
    run: impl FnOnce(&mut Command) -> std::io::Result<bool>,
) -> Result<(), MigrateError> {
    let mut c = Command::new(criu);
    c.args(["check", "--feature", "mem_dirty_track"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let ok = run(&mut c).map_err(|source| MigrateError::Spawn {
        path: criu.to_path_buf(),
        source,
    })?;
    if ok {
        Ok(())
    } else {
        Err(MigrateError::NoDirtyTracking)
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (image files travel in JSON lines).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Result<Vec<u8>, MigrateError> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return Err(MigrateError::Base64(format!(
            "length {} is not a multiple of 4",
            bytes.len()
        )));
    }
    let val = |c: u8| -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let groups = bytes.len() / 4;
    for (g, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return Err(MigrateError::Base64("misplaced padding".into()));
        }
        let mut n = 0u32;
        for (i, &c) in quad.iter().enumerate() {
            let v = if i >= 4 - pad {
                0
            } else {
                val(c).ok_or_else(|| {
                    MigrateError::Base64(format!("byte {:?} at {}", c as char, g * 4 + i))
                })?
            };
            n = (n << 6) | v;
        }
        let [_, b0, b1, b2] = n.to_be_bytes();
        out.extend_from_slice(&[b0, b1, b2][..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (raw, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(raw), enc);
            assert_eq!(base64_decode(enc).unwrap(), raw);
        }
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("Zg=").is_err());
        assert!(base64_decode("Z===").is_err());
        assert!(base64_decode("Zg==Zm9v").is_err());
        assert!(base64_decode("Zm9*").is_err());
    }

    #[test]
    fn dump_and_page_server_argv() {
        let x = DumpExtra {
            page_server: Some(PageServerTarget {
                address: "192.0.2.2".into(),
                port: 4000,
                tls: None,
            }),
            leave_stopped: true,
        };
        assert_eq!(
            x.argv(),
            [
                "--page-server",
                "--address",
                "192.0.2.2",
                "--port",
                "4000",
                "--tcp-close",
                "--skip-in-flight",
                "--leave-stopped"
            ]
            .map(OsString::from)
        );
        assert!(DumpExtra::default().argv().is_empty());
        let ps = PageServerArgs {
            images_dir: "/i".into(),
            work_dir: "/w".into(),
            log_name: "ps.log".into(),
            address: "192.0.2.2".into(),
            port: 4000,
            pidfile: "/w/ps.pid".into(),
            tls: Some(TlsFiles::in_dir(Path::new("/w/tls"))),
        };
        let a: Vec<String> = ps
            .argv()
            .iter()
            .map(|s| s.to_string_lossy().into())
            .collect();
        assert_eq!(a[0], "page-server");
        assert!(a.windows(2).any(|w| w == ["--port", "4000"]));
        assert!(a.contains(&"--daemon".to_string()));
        assert!(
            a.windows(3)
                .any(|w| w == ["--tls", "--tls-cacert", "/w/tls/ca.pem"]),
            "{a:?}"
        );
    }

    #[test]
    fn tls_material_is_a_ca_and_a_certificate_for_the_address() {
        let m = TlsMaterial::generate("192.0.2.2").unwrap();
        assert!(m.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(m.ca_pem, m.cert_pem);
        // Another migration, other keys.
        assert_ne!(
            TlsMaterial::generate("192.0.2.2").unwrap().key_pem,
            m.key_pem
        );
        assert!(!format!("{m:?}").contains("PRIVATE"), "Debug hides the key");
        let d = std::env::temp_dir().join(format!("mh-tls-unit-{}", std::process::id()));
        let files = m.write(&d).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), m.cert_pem);
        let _ = std::fs::remove_dir_all(&d);
    }
}

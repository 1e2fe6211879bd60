//! Image generations as OCI images in a registry.
//!
//! A generation becomes an OCI image manifest with one layer: a tar of the
//! image directory (CRIU's images, `cpuinfo.img`, `miehisto.json`),
//! zstd-compressed (`application/vnd.oci.image.layer.v1.tar+zstd`). The
//! manifest carries the annotations of the checkpoint-image convention
//! CRI-O, podman and checkpointctl share (`org.criu.checkpoint.*`) plus
//! miehisto's own (`io.miehisto.*`); the image config repeats them as
//! labels, which is what `skopeo inspect` prints.
//!
//! Transport is the `oci-client` crate (the OCI distribution client of the
//! Rust OCI projects), documents are `oci-spec` types. Its API is async: a
//! current-thread tokio runtime lives inside [`push`] and [`pull`] only.
//!
//! A pull is verified twice before anything is published: the layer's
//! sha256 must match the manifest's digest (a mismatch is refused) and the
//! uncompressed tar's must match the config's `diff_ids`; the unpacked
//! directory must then read back as valid metadata. It is unpacked into a
//! [`Staged`] directory and published with one `rename(2)`: a failed pull
//! publishes nothing.
//!
//! Plain HTTP is used for registries on loopback addresses (`127.0.0.0/8`,
//! `::1`, `localhost`) and for the registries the caller names as
//! insecure (`mhctl --insecure-registry`); every other registry is HTTPS.

use super::metadata::{Metadata, MetadataError, FILE_NAME};
use super::{Staged, StoreError};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder, ImageManifest,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The miehisto format of what the layer holds (bumped when its layout changes).
pub const LAYER_FORMAT: &str = "1";
/// A manifest or config larger than this is refused unread.
const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// A layer larger than this is refused before download.
pub const MAX_LAYER_BYTES: u64 = 64 << 30;
/// One file in a layer larger than this is refused.
const MAX_ENTRY_BYTES: u64 = 64 << 30;
const CHUNK: usize = 4 << 20;

// The checkpoint-image convention (checkpointctl's metadata package, used
// by CRI-O and podman).
pub const ANN_ENGINE: &str = "org.criu.checkpoint.engine.name";
pub const ANN_ENGINE_VERSION: &str = "org.criu.checkpoint.engine.version";
pub const ANN_CONTAINER_NAME: &str = "org.criu.checkpoint.container.name";
pub const ANN_CRIU_VERSION: &str = "org.criu.checkpoint.criu.version";
pub const ANN_HOST_ARCH: &str = "org.criu.checkpoint.host.arch";
pub const ANN_HOST_KERNEL: &str = "org.criu.checkpoint.host.kernel";
pub const ANN_CGROUP_VERSION: &str = "org.criu.checkpoint.cgroup.version";
pub const ANN_DISTRIBUTION_NAME: &str = "org.criu.checkpoint.distribution.name";
pub const ANN_DISTRIBUTION_VERSION: &str = "org.criu.checkpoint.distribution.version";
// miehisto's own.
pub const ANN_FORMAT: &str = "io.miehisto.format.version";
pub const ANN_LAYER_FORMAT: &str = "io.miehisto.layer.format";
pub const ANN_BACKEND: &str = "io.miehisto.backend";
pub const ANN_STOP_SYSCALL: &str = "io.miehisto.stop.syscall";
pub const ANN_STOP_MS: &str = "io.miehisto.stop.since_start_ms";
pub const ANN_COMMAND: &str = "io.miehisto.command";
pub const ANN_SERVICE: &str = "io.miehisto.service";
pub const ANN_GENERATION: &str = "io.miehisto.generation";
pub const ANN_CREATED_MS: &str = "io.miehisto.created_unix_ms";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{reference:?} is not an image reference ({detail}); write HOST[:PORT]/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/web:1")]
    BadReference { reference: String, detail: String },
    #[error("cannot start the registry client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot pack {path} into a layer")]
    Pack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the downloaded layer to {path}")]
    Download {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the OCI {what}: {detail}")]
    Document { what: &'static str, detail: String },
    #[error("registry {registry} refused to {step} {reference}: {detail}")]
    Registry {
        registry: String,
        step: &'static str,
        reference: String,
        detail: String,
    },
    #[error("{reference} is not a miehisto image: {detail}")]
    NotMiehisto { reference: String, detail: String },
    #[error("the layer of {reference} does not match its digest: the manifest says {expected}, the downloaded bytes hash to {actual}; the registry's copy is corrupt or was tampered with, nothing was published")]
    DigestMismatch {
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("the layer of {reference} is {found} bytes, the manifest says {expected}; nothing was published")]
    SizeMismatch {
        reference: String,
        expected: u64,
        found: u64,
    },
    #[error("the layer of {reference} unpacks to content with digest {actual}, but the image config lists {expected}; nothing was published")]
    DiffIdMismatch {
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("the layer of {reference} holds {entry:?}, which is not a plain file name of an image directory; refused, nothing was published")]
    BadEntry { reference: String, entry: String },
    #[error("cannot unpack the layer of {reference}")]
    Unpack {
        reference: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries (`HOST[:PORT]`) to reach over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
}

/// What a push or pull is doing, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// `pack`, `upload`, `download`, `unpack`.
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// Called with progress now and then (at most every ~100 ms, and at the end of a phase).
pub type ProgressFn<'a> = &'a mut dyn FnMut(&Progress);

/// What a push sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_bytes: u64,
    pub annotations: HashMap<String, String>,
}

/// What a pull brought.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_bytes: u64,
    pub annotations: HashMap<String, String>,
    /// The published image directory (or, for [`fetch`], the scratch one).
    pub dir: PathBuf,
    pub metadata: Metadata,
}

/// Parses `HOST[:PORT]/REPO[:TAG|@DIGEST]`. A reference without a
/// registry host is refused rather than sent to a default registry.
pub fn parse_reference(s: &str) -> Result<Reference, OciError> {
    let bad = |detail: String| OciError::BadReference {
        reference: s.to_string(),
        detail,
    };
    let first = s.split('/').next().unwrap_or("");
    if !s.contains('/') || !(first.contains('.') || first.contains(':') || first == "localhost") {
        return Err(bad("it names no registry host".into()));
    }
    s.parse::<Reference>().map_err(|e| bad(e.to_string()))
}

/// Whether `registry` (`HOST[:PORT]`) is a loopback address.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

fn client_for(reference: &Reference, opts: &RegistryOptions) -> oci_client::Client {
    // rustls needs one process-wide crypto provider; installing it twice
    // is harmless (the second attempt reports the first is in place).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = reference.resolve_registry().to_string();
    let mut http: Vec<String> = opts.insecure.clone();
    if is_loopback(&registry) {
        http.push(registry);
    }
    oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(http),
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(120)),
        platform_resolver: None,
        ..Default::default()
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, OciError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(OciError::Runtime)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_digest(h: Sha256) -> String {
    format!("sha256:{}", hex(&h.finalize()))
}

/// Rate-limits progress calls.
struct Ticker<'a> {
    f: ProgressFn<'a>,
    last: Option<Instant>,
}

impl<'a> Ticker<'a> {
    fn new(f: ProgressFn<'a>) -> Self {
        Ticker { f, last: None }
    }
    fn tick(&mut self, phase: &'static str, done: u64, total: u64) {
        let due = self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_millis(100));
        if due || done >= total {
            (self.f)(&Progress { phase, done, total });
            self.last = Some(Instant::now());
        }
    }
}

/// A writer that hashes what goes through it.
struct HashWriter<W: Write> {
    inner: W,
    hash: Sha256,
    n: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what comes through it.
struct HashReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// A packed layer on disk.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    /// sha256 of the compressed bytes (the blob).
    pub digest: String,
    /// sha256 of the uncompressed tar (the config's diff_id).
    pub diff_id: String,
    pub size: u64,
}

/// The regular files of an image directory, sorted (the layer is
/// reproducible for the same directory).
fn image_files(dir: &Path) -> std::io::Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_file() {
            files.push((e.file_name().to_string_lossy().into_owned(), m.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// Packs the image directory `dir` into `out` (tar, zstd level 3).
pub fn pack(dir: &Path, out: &Path, progress: ProgressFn<'_>) -> Result<Layer, OciError> {
    let err = |source| OciError::Pack {
        path: dir.to_path_buf(),
        source,
    };
    let files = image_files(dir).map_err(err)?;
    let total: u64 = files.iter().map(|(_, n)| n).sum();
    let file = std::fs::File::create(out).map_err(err)?;
    let blob = HashWriter {
        inner: std::io::BufWriter::new(file),
        hash: Sha256::new(),
        n: 0,
    };
    let enc = zstd::Encoder::new(blob, 3).map_err(err)?;
    let tarred = HashWriter {
        inner: enc,
        hash: Sha256::new(),
        n: 0,
    };
    let mut tb = tar::Builder::new(tarred);
    let mut ticker = Ticker::new(progress);
    let mut done = 0;
    for (name, len) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_size(*len);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        let f = std::fs::File::open(dir.join(name)).map_err(err)?;
        // The size in the header was taken before: a file that changes
        // while packed fails the append rather than writing a bad tar.
        tb.append_data(&mut h, name, f.take(*len)).map_err(err)?;
        done += len;
        ticker.tick("pack", done, total);
    }
    let tarred = tb.into_inner().map_err(err)?;
    let diff_id = sha256_digest(tarred.hash);
    let mut blob = tarred.inner.finish().map_err(err)?;
    blob.flush().map_err(err)?;
    ticker.tick("pack", total, total);
    Ok(Layer {
        path: out.to_path_buf(),
        digest: sha256_digest(blob.hash),
        diff_id,
        size: blob.n,
    })
}

/// The host's distribution, from os-release (empty when unknown).
fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("ID"), get("VERSION_ID"))
}

fn cgroup_version() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "2"
    } else {
        "1"
    }
}

/// The annotations of an image: the checkpoint-image convention plus
/// miehisto's own. `service`/`generation` name where it came from.
pub fn annotations(md: &Metadata, service: &str, generation: u64) -> HashMap<String, String> {
    let mut a = HashMap::new();
    let mut put = |k: &str, v: String| {
        if !v.is_empty() {
            a.insert(k.to_string(), v);
        }
    };
    put(ANN_ENGINE, "miehisto".into());
    put(ANN_ENGINE_VERSION, md.miehisto_version.clone());
    put(ANN_CONTAINER_NAME, service.to_string());
    put(ANN_CRIU_VERSION, md.criu_version.clone());
    put(
        ANN_HOST_ARCH,
        md.host
            .as_ref()
            .map(|h| h.arch.clone())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string()),
    );
    put(ANN_HOST_KERNEL, md.kernel.clone());
    put(ANN_CGROUP_VERSION, cgroup_version().into());
    let (dist, ver) = os_release();
    put(ANN_DISTRIBUTION_NAME, dist);
    put(ANN_DISTRIBUTION_VERSION, ver);
    put(ANN_FORMAT, md.format_version.to_string());
    put(ANN_LAYER_FORMAT, LAYER_FORMAT.into());
    put(ANN_BACKEND, md.backend.kind.to_string());
    if let Some(s) = &md.stop {
        put(ANN_STOP_SYSCALL, s.syscall.clone());
        put(ANN_STOP_MS, s.since_start_ms.to_string());
    }
    put(
        ANN_COMMAND,
        serde_json::to_string(&md.spec.argv).unwrap_or_default(),
    );
    put(ANN_SERVICE, service.to_string());
    put(ANN_GENERATION, generation.to_string());
    put(ANN_CREATED_MS, md.created_unix_ms.to_string());
    a
}

fn oci_arch() -> Arch {
    match std::env::consts::ARCH {
        "x86_64" => Arch::Amd64,
        "aarch64" => Arch::ARM64,
        other => Arch::Other(other.to_string()),
    }
}

fn doc_err(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> OciError {
    move |e| OciError::Document {
        what,
        detail: e.to_string(),
    }
}

fn parse_digest(s: &str, what: &'static str) -> Result<Digest, OciError> {
    s.parse::<Digest>().map_err(doc_err(what))
}

/// The config blob and the manifest for `layer`.
fn documents(layer: &Layer, ann: &HashMap<String, String>) -> Result<(Vec<u8>, Vec<u8>), OciError> {
    let config = ImageConfigurationBuilder::default()
        .architecture(oci_arch())
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .labels(ann.clone())
                .build()
                .map_err(doc_err("image config"))?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer.diff_id.clone()])
                .build()
                .map_err(doc_err("image config"))?,
        )
        .build()
        .map_err(doc_err("image config"))?;
    let config_bytes = serde_json::to_vec(&config).map_err(|e| OciError::Document {
        what: "image config",
        detail: e.to_string(),
    })?;
    let mut h = Sha256::new();
    h.update(&config_bytes);
    let config_desc = Descriptor::new(
        MediaType::ImageConfig,
        config_bytes.len() as u64,
        parse_digest(&sha256_digest(h), "config digest")?,
    );
    let mut layer_desc = Descriptor::new(
        MediaType::ImageLayerZstd,
        layer.size,
        parse_digest(&layer.digest, "layer digest")?,
    );
    layer_desc.set_annotations(Some(HashMap::from([(
        "org.opencontainers.image.title".to_string(),
        "miehisto-image.tar.zst".to_string(),
    )])));
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .annotations(ann.clone())
        .build()
        .map_err(doc_err("manifest"))?;
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| OciError::Document {
        what: "manifest",
        detail: e.to_string(),
    })?;
    Ok((config_bytes, manifest_bytes))
}

fn registry_err<'a>(
    reference: &'a Reference,
    step: &'static str,
) -> impl Fn(oci_client::errors::OciDistributionError) -> OciError + 'a {
    move |e| OciError::Registry {
        registry: reference.resolve_registry().to_string(),
        step,
        reference: reference.whole(),
        detail: crate::error_chain(&e),
    }
}

/// Pushes the image directory `dir` (a published generation) as `reference`.
/// `work` is a directory on the same machine for the packed layer (removed after).
pub fn push(
    dir: &Path,
    service: &str,
    generation: u64,
    reference: &str,
    opts: &RegistryOptions,
    work: &Path,
    progress: ProgressFn<'_>,
) -> Result<Pushed, OciError> {
    let r = parse_reference(reference)?;
    let md = Metadata::read(dir)?;
    let ann = annotations(&md, service, generation);
    std::fs::create_dir_all(work).map_err(|source| OciError::Pack {
        path: work.to_path_buf(),
        source,
    })?;
    let tmp = TempFile(work.join(format!(
        ".push-{}-{}.tar.zst",
        std::process::id(),
        crate::sys::time::unix_ms()
    )));
    let layer = pack(dir, &tmp.0, progress)?;
    let (config, manifest) = documents(&layer, &ann)?;
    let client = client_for(&r, opts);
    let rt = runtime()?;
    let mut ticker = Ticker::new(progress);
    rt.block_on(async {
        client
            .store_auth_if_needed(r.resolve_registry(), &RegistryAuth::Anonymous)
            .await;
        if !client
            .blob_exists(&r, &layer.digest)
            .await
            .map_err(registry_err(&r, "check a blob of"))?
        {
            let file = std::fs::File::open(&layer.path).map_err(|source| OciError::Pack {
                path: layer.path.clone(),
                source,
            })?;
            let total = layer.size;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
            let stream = futures_util::stream::unfold((file, 0u64), move |(mut f, sent)| {
                let tx = tx.clone();
                async move {
                    let mut buf = vec![0u8; CHUNK];
                    match f.read(&mut buf) {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            let _ = tx.send(sent + n as u64);
                            Some((Ok(bytes::Bytes::from(buf)), (f, sent + n as u64)))
                        }
                        Err(e) => Some((
                            Err(oci_client::errors::OciDistributionError::IoError(e)),
                            (f, sent),
                        )),
                    }
                }
            });
            let upload = client.push_blob_stream(&r, stream, &layer.digest, Some(total));
            let mut upload = std::pin::pin!(upload);
            loop {
                tokio::select! {
                    res = &mut upload => {
                        res.map_err(registry_err(&r, "accept the layer of"))?;
                        break;
                    }
                    Some(sent) = rx.recv() => ticker.tick("upload", sent, total),
                }
            }
        }
        ticker.tick("upload", layer.size, layer.size);
        let mut h = Sha256::new();
        h.update(&config);
        client
            .push_blob(&r, config, &sha256_digest(h))
            .await
            .map_err(registry_err(&r, "accept the config of"))?;
        client
            .push_manifest_raw(
                &r,
                manifest.clone(),
                http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"),
            )
            .await
            .map_err(registry_err(&r, "accept the manifest of"))?;
        Ok::<(), OciError>(())
    })?;
    let mut h = Sha256::new();
    h.update(&manifest);
    Ok(Pushed {
        reference: r.whole(),
        manifest_digest: sha256_digest(h),
        layer_digest: layer.digest.clone(),
        layer_bytes: layer.size,
        annotations: ann,
    })
}

/// A file removed when dropped.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The client's descriptor type for an `oci-spec` one.
fn client_desc(d: &Descriptor) -> oci_client::manifest::OciDescriptor {
    oci_client::manifest::OciDescriptor {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        // Layers over MAX_LAYER_BYTES are refused before this is used.
        size: i64::try_from(d.size()).unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// The manifest of `r`, its digest, and its layer's descriptor and diff_id.
struct Remote {
    manifest_digest: String,
    annotations: HashMap<String, String>,
    layer: Descriptor,
    diff_id: String,
}

async fn remote(client: &oci_client::Client, r: &Reference) -> Result<Remote, OciError> {
    let not_ours = |detail: String| OciError::NotMiehisto {
        reference: r.whole(),
        detail,
    };
    let (bytes, digest) = client
        .pull_manifest_raw(
            r,
            &RegistryAuth::Anonymous,
            &["application/vnd.oci.image.manifest.v1+json"],
        )
        .await
        .map_err(registry_err(r, "send the manifest of"))?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(not_ours(format!("its manifest is {} bytes", bytes.len())));
    }
    let manifest: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| not_ours(format!("its manifest does not parse ({e})")))?;
    let annotations = manifest.annotations().clone().unwrap_or_default();
    if annotations.get(ANN_ENGINE).map(String::as_str) != Some("miehisto") {
        return Err(not_ours(format!(
            "the manifest has no {ANN_ENGINE}=miehisto annotation"
        )));
    }
    if annotations.get(ANN_LAYER_FORMAT).map(String::as_str) != Some(LAYER_FORMAT) {
        return Err(not_ours(format!(
            "its layer format is {:?}, this miehisto reads {LAYER_FORMAT:?}",
            annotations.get(ANN_LAYER_FORMAT)
        )));
    }
    let [layer] = manifest.layers().as_slice() else {
        return Err(not_ours(format!(
            "it has {} layers, a miehisto image has one",
            manifest.layers().len()
        )));
    };
    if *layer.media_type() != MediaType::ImageLayerZstd {
        return Err(not_ours(format!("its layer is {}", layer.media_type())));
    }
    if layer.size() > MAX_LAYER_BYTES {
        return Err(not_ours(format!(
            "its layer is {} bytes, over the {MAX_LAYER_BYTES}-byte limit",
            layer.size()
        )));
    }
    let mut config = Vec::new();
    client
        .pull_blob(r, &client_desc(manifest.config()), &mut config)
        .await
        .map_err(registry_err(r, "send the config of"))?;
    if config.len() > MAX_DOCUMENT_BYTES {
        return Err(not_ours(format!("its config is {} bytes", config.len())));
    }
    let cfg: oci_spec::image::ImageConfiguration = serde_json::from_slice(&config)
        .map_err(|e| not_ours(format!("its config does not parse ({e})")))?;
    let [diff_id] = cfg.rootfs().diff_ids().as_slice() else {
        return Err(not_ours(
            "its config does not list exactly one diff_id".into(),
        ));
    };
    Ok(Remote {
        manifest_digest: digest,
        annotations,
        layer: layer.clone(),
        diff_id: diff_id.clone(),
    })
}

/// Downloads the layer of `rem` into `out`, verifying size and digest.
async fn download(
    client: &oci_client::Client,
    r: &Reference,
    rem: &Remote,
    out: &Path,
    ticker: &mut Ticker<'_>,
) -> Result<(), OciError> {
    let werr = |source| OciError::Download {
        path: out.to_path_buf(),
        source,
    };
    let expected = rem.layer.size();
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(werr)?);
    let mut stream = client
        .pull_blob_stream(r, &client_desc(&rem.layer))
        .await
        .map_err(registry_err(r, "send the layer of"))?;
    let mut hash = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            // The client verifies the digest itself as the stream ends.
            if let Some(oci_client::errors::DigestError::VerificationError { expected, actual }) = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<oci_client::errors::DigestError>())
            {
                return OciError::DigestMismatch {
                    reference: r.whole(),
                    expected: expected.clone(),
                    actual: actual.clone(),
                };
            }
            OciError::Registry {
                registry: r.resolve_registry().to_string(),
                step: "send the layer of",
                reference: r.whole(),
                detail: e.to_string(),
            }
        })?;
        got += chunk.len() as u64;
        if got > expected {
            return Err(OciError::SizeMismatch {
                reference: r.whole(),
                expected,
                found: got,
            });
        }
        hash.update(&chunk);
        f.write_all(&chunk).map_err(werr)?;
        ticker.tick("download", got, expected);
    }
    f.flush().map_err(werr)?;
    if got != expected {
        return Err(OciError::SizeMismatch {
            reference: r.whole(),
            expected,
            found: got,
        });
    }
    let actual = sha256_digest(hash);
    if actual != rem.layer.digest().to_string() {
        return Err(OciError::DigestMismatch {
            reference: r.whole(),
            expected: rem.layer.digest().to_string(),
            actual,
        });
    }
    Ok(())
}

/// Unpacks a verified layer file into `dir` (an empty staging directory).
fn unpack(
    reference: &str,
    layer: &Path,
    diff_id: &str,
    dir: &Path,
    ticker: &mut Ticker<'_>,
) -> Result<(), OciError> {
    let uerr = |source| OciError::Unpack {
        reference: reference.to_string(),
        source,
    };
    let total = std::fs::metadata(layer).map_err(uerr)?.len();
    let dec = zstd::Decoder::new(std::fs::File::open(layer).map_err(uerr)?).map_err(uerr)?;
    let mut tarred = HashReader {
        inner: dec,
        hash: Sha256::new(),
    };
    {
        let mut ar = tar::Archive::new(&mut tarred);
        let mut done = 0u64;
        for entry in ar.entries().map_err(uerr)? {
            let mut entry = entry.map_err(uerr)?;
            let name = entry.path().map_err(uerr)?.to_string_lossy().into_owned();
            let plain = !name.is_empty()
                && !name.contains('/')
                && name != "."
                && name != ".."
                && entry.header().entry_type() == tar::EntryType::Regular;
            let size = entry.size();
            if !plain || size > MAX_ENTRY_BYTES {
                return Err(OciError::BadEntry {
                    reference: reference.to_string(),
                    entry: name,
                });
            }
            let path = dir.join(&name);
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(uerr)?;
            std::io::copy(&mut (&mut entry).take(size), &mut out).map_err(uerr)?;
            done += size;
            ticker.tick("unpack", done.min(total), total.max(done));
        }
    }
    // The tar's end-of-archive padding counts for the diff_id too.
    std::io::copy(&mut tarred, &mut std::io::sink()).map_err(uerr)?;
    let actual = sha256_digest(tarred.hash);
    if actual != diff_id {
        return Err(OciError::DiffIdMismatch {
            reference: reference.to_string(),
            expected: diff_id.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Downloads `reference`, verifies it and unpacks it into `staged`'s
/// directory, whose metadata it validates. Nothing is published here.
fn fetch_into(
    r: &Reference,
    opts: &RegistryOptions,
    staged_dir: &Path,
    work: &Path,
    progress: ProgressFn<'_>,
) -> Result<(Remote, Metadata), OciError> {
    let client = client_for(r, opts);
    let rt = runtime()?;
    let mut ticker = Ticker::new(progress);
    std::fs::create_dir_all(work).map_err(|source| OciError::Download {
        path: work.to_path_buf(),
        source,
    })?;
    let tmp = TempFile(work.join(format!(
        ".pull-{}-{}.tar.zst",
        std::process::id(),
        crate::sys::time::unix_ms()
    )));
    let rem = rt.block_on(async {
        let rem = remote(&client, r).await?;
        download(&client, r, &rem, &tmp.0, &mut ticker).await?;
        Ok::<Remote, OciError>(rem)
    })?;
    unpack(&r.whole(), &tmp.0, &rem.diff_id, staged_dir, &mut ticker)?;
    if !staged_dir.join(FILE_NAME).is_file() {
        return Err(OciError::NotMiehisto {
            reference: r.whole(),
            detail: format!("its layer holds no {FILE_NAME}"),
        });
    }
    let md = Metadata::read(staged_dir)?;
    Ok((rem, md))
}

/// Pulls `reference` and publishes it at `dest` (which must not exist).
pub fn pull(
    reference: &str,
    dest: &Path,
    opts: &RegistryOptions,
    work: &Path,
    progress: ProgressFn<'_>,
) -> Result<Pulled, OciError> {
    let r = parse_reference(reference)?;
    let staged = Staged::new(dest)?;
    let (rem, md) = fetch_into(&r, opts, &staged.dir, work, progress)?;
    let layer_bytes = rem.layer.size();
    let dir = staged.publish(&md)?;
    Ok(Pulled {
        reference: r.whole(),
        manifest_digest: rem.manifest_digest,
        layer_bytes,
        annotations: rem.annotations,
        dir,
        metadata: md,
    })
}

/// The service name a pulled image is for, from its annotations.
pub fn service_of(annotations: &HashMap<String, String>) -> Option<&str> {
    annotations
        .get(ANN_SERVICE)
        .or_else(|| annotations.get(ANN_CONTAINER_NAME))
        .map(String::as_str)
}

/// A scratch copy of a remote image, removed when dropped: what
/// `image check REF` looks at.
pub struct Fetched {
    pub pulled: Pulled,
    _staged: Staged,
}

impl Fetched {
    /// Publishes the verified image at `dest` (on the same file system).
    pub fn publish_to(self, dest: &Path) -> Result<Pulled, OciError> {
        let Fetched {
            mut pulled,
            _staged,
        } = self;
        pulled.dir = _staged.publish_to(&pulled.metadata, dest)?;
        Ok(pulled)
    }
}

/// Downloads and verifies `reference` into a scratch directory beside
/// `scratch_dest` (never published).
pub fn fetch(
    reference: &str,
    scratch_dest: &Path,
    opts: &RegistryOptions,
    work: &Path,
    progress: ProgressFn<'_>,
) -> Result<Fetched, OciError> {
    let r = parse_reference(reference)?;
    let staged = Staged::new(scratch_dest)?;
    let (rem, md) = fetch_into(&r, opts, &staged.dir, work, progress)?;
    Ok(Fetched {
        pulled: Pulled {
            reference: r.whole(),
            manifest_digest: rem.manifest_digest,
            layer_bytes: rem.layer.size(),
            annotations: rem.annotations,
            dir: staged.dir.clone(),
            metadata: md,
        },
        _staged: staged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_need_a_registry_host() {
        assert!(parse_reference("127.0.0.1:5000/web:1").is_ok());
        assert!(parse_reference("localhost/web").is_ok());
        assert!(parse_reference("registry.example/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").is_ok());
        for bad in ["web", "web:1", "library/web", "127.0.0.1:5000/Web:1"] {
            let e = parse_reference(bad).unwrap_err();
            assert!(e.to_string().contains("HOST[:PORT]"), "{bad}: {e}");
        }
    }

    #[test]
    fn loopback_registries() {
        for l in ["127.0.0.1:5000", "127.3.4.5", "localhost:80", "[::1]:5000"] {
            assert!(is_loopback(l), "{l}");
        }
        for n in ["10.0.0.1:5000", "registry.example", "[fe80::1]:5000"] {
            assert!(!is_loopback(n), "{n}");
        }
    }

    #[test]
    fn pack_and_unpack_round_trip_and_refuse_a_bad_diff_id() {
        let base = std::env::temp_dir().join(format!("mh-oci-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("pages-1.img"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.join("inventory.img"), b"inv").unwrap();
        let mut calls = 0;
        let mut cb = |_: &Progress| calls += 1;
        let layer = pack(&src, &base.join("l.tar.zst"), &mut cb).unwrap();
        assert!(calls > 0);
        assert!(layer.size < 300_000, "compressed: {}", layer.size);
        let again = pack(&src, &base.join("l2.tar.zst"), &mut |_| {}).unwrap();
        assert_eq!(layer.digest, again.digest, "reproducible");
        let out = base.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut noop = |_: &Progress| {};
        let mut t = Ticker::new(&mut noop);
        unpack("r", &layer.path, &layer.diff_id, &out, &mut t).unwrap();
        assert_eq!(std::fs::read(out.join("inventory.img")).unwrap(), b"inv");
        assert_eq!(
            std::fs::metadata(out.join("pages-1.img")).unwrap().len(),
            300_000
        );
        let out2 = base.join("out2");
        std::fs::create_dir_all(&out2).unwrap();
        let e = unpack("r", &layer.path, &again.digest, &out2, &mut t).unwrap_err();
        assert!(matches!(e, OciError::DiffIdMismatch { .. }), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}

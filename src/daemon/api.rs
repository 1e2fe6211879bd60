//! The daemon's wire protocol, version 1: JSON lines over a UNIX stream
//! socket.
//!
//! Every request is one JSON object on one line (at most
//! [`MAX_REQUEST_BYTES`] bytes, newline included), carrying the API version
//! `"v": 1` and an operation `"op"`; every reply is one JSON object on one
//! line with `"v"`, `"ok"` and either `"result"` or `"error"`. A connection
//! may carry several requests, one after the other; replies come in order.
//!
//! ```text
//! → {"v":1,"op":"service.start","name":"web","cold":false}
//! ← {"v":1,"ok":true,"result":{"kind":"service","name":"web","state":"running",...}}
//! → {"v":1,"op":"service.stop","name":"nope"}
//! ← {"v":1,"ok":false,"error":{"code":"not_found","message":"no service named \"nope\"; ..."}}
//! ```
//!
//! | `op`              | fields                                                        | `result.kind`   |
//! |-------------------|---------------------------------------------------------------|-----------------|
//! | `ping`            |                                                               | `pong`          |
//! | `service.create`  | `name`, `command` [argv], `env` [K=V], `cwd`, `backend` (trace\|notify\|auto), `stop_at`, `user` (UID[:GID], optional) | `service` |
//! | `service.prebake` | `name`                                                        | `image`         |
//! | `service.start`   | `name`, `cold` (bool)                                         | `service`       |
//! | `service.dump`    | `name`, `leave_running` (bool)                                | `image`         |
//! | `service.stop`    | `name`                                                        | `service`       |
//! | `service.delete`  | `name`                                                        | `done`          |
//! | `service.list`    |                                                               | `services`      |
//! | `service.logs`    | `name`, `follow` (bool), `tail_bytes`                         | `log`… then `log_end` |
//! | `image.list`      | `name` (optional)                                             | `images`        |
//! | `image.inspect`   | `name`, `generation` (optional: newest)                       | `image_detail`  |
//! | `image.rm`        | `name`, `generation`                                          | `done`          |
//! | `image.push`      | `name`, `generation` (optional: newest), `reference`, `insecure_registries` | `progress`… then `image_pushed` |
//! | `image.pull`      | `reference`, `as` (optional: the image's service name), `insecure_registries` | `progress`… then `image_pulled` |
//! | `image.check`     | `name` + `generation`, or `reference`; `insecure_registries`  | `progress`… then `image_check` |
//! | `migrate.receive` | `service` {as `service.create`}, `address`                    | `migrate_listening` (`port`, `tls`: the PEMs made for it), then a session (below) |
//! | `service.migrate_out` | `name`, `address`, `port`, `tls` (from `migrate_listening`), `pre_dump` | `migrate_chunk`… `migrate_dumped`, then a session |
//!
//! The two migration operations open a session on their connection: the
//! destination takes `migrate.chunk` (`file`, `offset`, `data` base64,
//! answered `done`) and one `migrate.restore` (answered `service`); the
//! source takes one `migrate.finish` (`moved`, `to`; answered `service`).
//! A session whose connection closes early is rolled back: the
//! destination forgets the half-received image, the source resumes the
//! stopped service.
//! | `service.set`     | `name`, `on_demand` (object, or absent to turn it off)        | `service`       |
//! | `service.stats`   | `name`                                                        | `stats`         |
//!
//! `on_demand` (in `service.create` and `service.set`):
//! `{"idle_timeout_secs":30,"standby":false,"listen":["127.0.0.1:8080"]}`.
//!
//! `reference` is `HOST[:PORT]/REPOSITORY[:TAG]`. Registries on loopback
//! addresses are reached over plain HTTP; so are those listed in
//! `insecure_registries` (`HOST[:PORT]`); every other one over HTTPS.
//! `image.pull` creates the service from the image's recorded command
//! when no service of that name exists. `image.check` answers
//! `compatible: false` with every difference when the image would not
//! restore on the daemon's host.
//!
//! Unknown fields are refused, so a typo is an error, not a silent default.
//!
//! Root's clients see and manage every service. Any other allowed client
//! (`--allow-uid`, `--allow-gid`) sees only the services it created, which
//! run as it (its uid and gid from `SO_PEERCRED`); to it, another's
//! service is `not_found`. It may not bring in images made elsewhere
//! (`image.pull`, `migrate.receive`: CRIU restores whatever credentials an
//! image records) nor have the daemon listen on a privileged port.
//!
//! `progress` results (`phase`, `done`, `total` bytes) precede the final
//! reply of the image transfers. `service.logs` is the other streaming
//! operation: it answers with any
//! number of `log` results (`stream` is `stdout` or `stderr`) and, unless
//! `follow` is set, a final `log_end`; with `follow` it streams until the
//! client closes the connection.
//!
//! Error codes: `bad_request` (malformed JSON, unknown op or field, invalid
//! name), `too_large` (request over the limit; the connection is then
//! closed), `unsupported_version`, `forbidden` (the peer's uid/gid is not
//! allowed; the connection is then closed), `not_found`, `exists`,
//! `conflict` (e.g. starting a running service), `forbidden` also for an
//! operation only root may ask for, `failed` (runmh or CRIU
//! failed; the message carries runmh's error line), `unavailable` (too many
//! connections), `internal`.

use crate::images::Metadata;
use crate::stop::BackendKind;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const API_VERSION: u32 = 1;
/// The longest request line accepted, newline included.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_SOCKET: &str = "/run/miehisto/miehistod.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/miehisto";

/// What a client asks for (the `"op"` field selects the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Request {
    #[serde(rename = "ping")]
    Ping,
    #[serde(rename = "service.create")]
    ServiceCreate(CreateService),
    #[serde(rename = "service.prebake")]
    ServicePrebake(Named),
    #[serde(rename = "service.start")]
    ServiceStart(StartService),
    #[serde(rename = "service.dump")]
    ServiceDump(DumpService),
    #[serde(rename = "service.stop")]
    ServiceStop(Named),
    #[serde(rename = "service.delete")]
    ServiceDelete(Named),
    #[serde(rename = "service.list")]
    ServiceList,
    #[serde(rename = "service.logs")]
    ServiceLogs(LogsRequest),
    #[serde(rename = "image.list")]
    ImageList(MaybeNamed),
    #[serde(rename = "image.inspect")]
    ImageInspect(ImageRef),
    #[serde(rename = "image.rm")]
    ImageRm(ImageRm),
    #[serde(rename = "image.push")]
    ImagePush(PushImage),
    #[serde(rename = "image.pull")]
    ImagePull(PullImage),
    #[serde(rename = "image.check")]
    ImageCheck(CheckImage),
    #[serde(rename = "migrate.receive")]
    MigrateReceive(MigrateReceive),
    #[serde(rename = "migrate.chunk")]
    MigrateChunk(FileChunk),
    #[serde(rename = "migrate.restore")]
    MigrateRestore,
    #[serde(rename = "service.migrate_out")]
    MigrateOut(MigrateOut),
    #[serde(rename = "migrate.finish")]
    MigrateFinish(MigrateFinish),
    #[serde(rename = "service.set")]
    ServiceSet(SetService),
    #[serde(rename = "service.stats")]
    ServiceStats(Named),
}

impl Request {
    /// The `"op"` name.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::ServiceCreate(_) => "service.create",
            Request::ServicePrebake(_) => "service.prebake",
            Request::ServiceStart(_) => "service.start",
            Request::ServiceDump(_) => "service.dump",
            Request::ServiceStop(_) => "service.stop",
            Request::ServiceDelete(_) => "service.delete",
            Request::ServiceList => "service.list",
            Request::ServiceLogs(_) => "service.logs",
            Request::ImageList(_) => "image.list",
            Request::ImageInspect(_) => "image.inspect",
            Request::ImageRm(_) => "image.rm",
            Request::ImagePush(_) => "image.push",
            Request::ImagePull(_) => "image.pull",
            Request::ImageCheck(_) => "image.check",
            Request::MigrateReceive(_) => "migrate.receive",
            Request::MigrateChunk(_) => "migrate.chunk",
            Request::MigrateRestore => "migrate.restore",
            Request::MigrateOut(_) => "service.migrate_out",
            Request::MigrateFinish(_) => "migrate.finish",
            Request::ServiceSet(_) => "service.set",
            Request::ServiceStats(_) => "service.stats",
        }
    }

    /// The service a request is about, if any.
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::ServiceCreate(c) => Some(&c.name),
            Request::ServicePrebake(n) | Request::ServiceStop(n) | Request::ServiceDelete(n) => {
                Some(&n.name)
            }
            Request::ServiceStart(s) => Some(&s.name),
            Request::ServiceDump(d) => Some(&d.name),
            Request::ServiceLogs(l) => Some(&l.name),
            Request::ImageList(m) => m.name.as_deref(),
            Request::ImageInspect(i) => Some(&i.name),
            Request::ImageRm(i) => Some(&i.name),
            Request::ImagePush(p) => Some(&p.name),
            Request::ImagePull(p) => p.as_name.as_deref(),
            Request::ImageCheck(c) => c.name.as_deref(),
            Request::ServiceSet(s) => Some(&s.name),
            Request::ServiceStats(n) => Some(&n.name),
            Request::MigrateReceive(m) => Some(&m.service.name),
            Request::MigrateOut(m) => Some(&m.name),
            Request::Ping
            | Request::ServiceList
            | Request::MigrateChunk(_)
            | Request::MigrateRestore
            | Request::MigrateFinish(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Named {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaybeNamed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateService {
    pub name: String,
    /// argv of the service; never run through a shell.
    pub command: Vec<String>,
    /// `KEY=VALUE` settings added to the service's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Absolute working directory (the client sends its own when none is given).
    pub cwd: PathBuf,
    /// `trace`, `notify` or `auto`.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// The syscall a prebake stops before.
    #[serde(default = "default_stop_at")]
    pub stop_at: String,
    /// Replace a record that does not parse (and its images and logs);
    /// without it such a name is refused, so nothing is lost unasked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// Start on the first connection, go back to zero when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<OnDemandConfig>,
    /// `USER[:GROUP]` (names or ids) the service runs as. Root's clients
    /// may name anyone (none: root); every other client's services run as
    /// that client, and naming another user is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// How an on-demand service starts and stops by itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnDemandConfig {
    /// Seconds without an open client connection before it goes back to zero.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Keep a restored instance held at its stop point, ready.
    #[serde(default)]
    pub standby: bool,
    /// Addresses to listen on while at zero, besides (or instead of) the
    /// ones the image holds bound at its stop point.
    #[serde(default)]
    pub listen: Vec<std::net::SocketAddr>,
}

pub fn default_idle_timeout() -> u64 {
    60
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetService {
    pub name: String,
    /// None: the service is started by hand only.
    #[serde(default)]
    pub on_demand: Option<OnDemandConfig>,
}

/// An on-demand service's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDemandState {
    /// No image to start from yet: prebake it.
    NoImage,
    /// The image holds no bound TCP socket and no --listen was given.
    NoAddress,
    /// At zero, the port accepts connections.
    Waiting,
    /// A connection came; the newest generation is being restored.
    Activating,
    /// The service runs and accepts the clients itself.
    Running,
    /// A restored instance is held at its stop point, ready.
    Standby,
    /// An image is being made: the port is released meanwhile.
    Paused,
}

impl OnDemandState {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDemandState::NoImage => "no_image",
            OnDemandState::NoAddress => "no_address",
            OnDemandState::Waiting => "waiting",
            OnDemandState::Activating => "activating",
            OnDemandState::Running => "running",
            OnDemandState::Standby => "standby",
            OnDemandState::Paused => "paused",
        }
    }
}

/// What `service.list` and `service.stats` tell about an on-demand service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnDemandInfo {
    pub state: OnDemandState,
    pub idle_timeout_secs: u64,
    pub standby: bool,
    /// The addresses it answers on while at zero.
    pub listen: Vec<std::net::SocketAddr>,
    pub activations: u64,
    pub failures: u64,
    /// First queued connection → the service listening on its own socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activation_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// Client connections closed unserved after a failed activation.
    pub refused_connections: u64,
    /// RSS of the instance held at standby (KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_rss_kib: Option<u64>,
}

/// `service.stats`: the activation latency distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnDemandStats {
    pub name: String,
    pub info: OnDemandInfo,
    /// Activation latencies in ms, oldest first (the last 1000).
    pub latencies_ms: Vec<f64>,
    pub median_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

pub fn default_backend() -> String {
    "auto".into()
}
pub fn default_stop_at() -> String {
    "listen".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartService {
    pub name: String,
    /// Boot the command instead of restoring the newest image.
    #[serde(default)]
    pub cold: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpService {
    pub name: String,
    #[serde(default)]
    pub leave_running: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsRequest {
    pub name: String,
    #[serde(default)]
    pub follow: bool,
    /// How much of the end of each log to send first (default 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub name: String,
    /// None: the newest generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRm {
    pub name: String,
    pub generation: u64,
}

/// Opens the destination side of a live migration (one connection, one
/// session): the service is created from `service` when the host does not
/// have it yet, and a `criu page-server` listens on `address` for the
/// pages. Then come `migrate.chunk`s (the rest of the image) and one
/// `migrate.restore`; a connection that closes before that leaves nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateReceive {
    pub service: CreateService,
    /// This host's address, as the source reaches it.
    pub address: String,
}

/// Part of one image file, base64 in `data`, written at `offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileChunk {
    pub file: String,
    pub offset: u64,
    pub data: String,
}

/// Opens the source side of a live migration: dumps the running service
/// with its pages sent to the page server at `address:port`, leaves it
/// stopped, answers with the image's other files as `migrate_chunk`s and a
/// `migrate_dumped`, then waits on the same connection for
/// `migrate.finish`: moved kills the stopped copy, not moved (or a
/// connection that closes first) resumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOut {
    pub name: String,
    pub address: String,
    pub port: u16,
    /// CRIU pre-dump iterations first (needs memory dirty tracking).
    #[serde(default)]
    pub pre_dump: u32,
    /// The page server's TLS, from the destination's `migrate_listening`.
    pub tls: crate::migrate::TlsMaterial,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateFinish {
    /// The destination answers: the stopped copy here goes.
    pub moved: bool,
    /// Where it went, for the service's last_exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushImage {
    pub name: String,
    /// None: the newest generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// `HOST[:PORT]/REPOSITORY[:TAG]`.
    pub reference: String,
    /// Registries (`HOST[:PORT]`) to reach over plain HTTP besides loopback ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    pub reference: String,
    /// The service to add the image to (default: the one it was pushed from).
    #[serde(rename = "as", default, skip_serializing_if = "Option::is_none")]
    pub as_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckImage {
    /// A local image: the service...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// ...and its generation (None: the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Or a remote one, downloaded into scratch space and never published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
}

/// A request line as sent: the version next to the operation.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<'a> {
    pub v: u32,
    #[serde(flatten)]
    pub req: &'a Request,
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Response {
    pub fn ok(result: Reply) -> Response {
        Response {
            v: API_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Response {
        Response {
            v: API_VERSION,
            ok: false,
            result: None,
            error: Some(ApiError {
                code,
                message: message.into(),
            }),
        }
    }
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"v":{API_VERSION},"ok":false,"error":{{"code":"internal","message":"cannot encode the reply: {e}"}}}}"#)
        });
        s.push('\n');
        s
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    UnsupportedVersion,
    Forbidden,
    NotFound,
    Exists,
    Conflict,
    Failed,
    Unavailable,
    Internal,
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        daemon_version: String,
        api_version: u32,
        pid: i32,
        state_dir: PathBuf,
    },
    Service(ServiceInfo),
    Services {
        services: Vec<ServiceInfo>,
    },
    Image(ImageInfo),
    Images {
        images: Vec<ImageInfo>,
    },
    ImageDetail {
        image: ImageInfo,
        metadata: Box<Metadata>,
    },
    Done {
        message: String,
    },
    Log {
        stream: String,
        text: String,
    },
    LogEnd,
    /// How far an image transfer is (`phase`: pack, upload, download, unpack).
    Progress {
        phase: String,
        done: u64,
        total: u64,
    },
    ImagePushed {
        service: String,
        generation: u64,
        reference: String,
        manifest_digest: String,
        layer_digest: String,
        layer_bytes: u64,
        annotations: std::collections::BTreeMap<String, String>,
    },
    ImagePulled {
        image: ImageInfo,
        reference: String,
        manifest_digest: String,
        layer_bytes: u64,
        /// Whether the pull created the service.
        created_service: bool,
    },
    ImageCheck {
        /// What was checked (`NAME@GEN` or the reference).
        image: String,
        compatible: bool,
        /// Every difference, one line each.
        differences: Vec<String>,
        /// The whole verdict in one line.
        message: String,
    },
    /// `migrate.receive`: the page server listens on this port.
    MigrateListening {
        port: u16,
        /// The page server's TLS, made for this migration: the source's
        /// dump must present it (it travels only on the migration's own
        /// channel).
        tls: crate::migrate::TlsMaterial,
    },
    MigrateChunk(FileChunk),
    /// `service.migrate_out`: the dump is done and every chunk was sent.
    MigrateDumped {
        dump_ms: u64,
        files: u64,
        bytes: u64,
    },
    Stats(OnDemandStats),
}

/// Whether a service runs, as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Its supervisor and service are alive.
    Running,
    /// A restored instance is held at its stop point, not yet resumed
    /// (an on-demand service's `--standby`).
    Standby,
    /// Not running: never started, stopped, dumped or ended.
    Stopped,
    /// Its record does not parse: shown, never touched without `--force`.
    Broken,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Running => "running",
            ServiceState::Standby => "standby",
            ServiceState::Stopped => "stopped",
            ServiceState::Broken => "broken",
        }
    }
}

impl std::fmt::Display for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The operation that holds a service's lock, as `service.list` shows it
/// while it runs (the wire spelling is the one the daemon always sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    #[serde(rename = "create")]
    Create,
    #[serde(rename = "delete")]
    Delete,
    #[serde(rename = "set")]
    Set,
    #[serde(rename = "prebake")]
    Prebake,
    #[serde(rename = "dump")]
    Dump,
    #[serde(rename = "start")]
    Start,
    #[serde(rename = "stop")]
    Stop,
    #[serde(rename = "image rm")]
    ImageRm,
    #[serde(rename = "push")]
    Push,
    #[serde(rename = "pull")]
    Pull,
    #[serde(rename = "check")]
    Check,
    #[serde(rename = "migrate in")]
    MigrateIn,
    #[serde(rename = "migrate out")]
    MigrateOut,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Set => "set",
            Operation::Prebake => "prebake",
            Operation::Dump => "dump",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::ImageRm => "image rm",
            Operation::Push => "push",
            Operation::Pull => "pull",
            Operation::Check => "check",
            Operation::MigrateIn => "migrate in",
            Operation::MigrateOut => "migrate out",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend kind that may be unknown, on the wire as the daemon always
/// sent it: the kind's name, or `""` for an image whose metadata does not
/// read.
mod empty_is_none {
    use crate::stop::BackendKind;
    use serde::de::IntoDeserializer;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<BackendKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.map_or("", BackendKind::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BackendKind>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        BackendKind::deserialize(text.into_deserializer()).map(Some)
    }
}

/// How a running service was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartedFrom {
    /// Restored from an image generation.
    Restored,
    /// Booted from its command.
    Cold,
}

/// A service as `service.list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub state: ServiceState,
    /// Why a `broken` service's record does not parse (its images and
    /// logs are kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The operation in progress (`prebake`, `start`, `dump`, ...), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<Operation>,
    /// Host pid of the service (the sandbox's PID 1) while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Host pid of the runmh that supervises it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_pid: Option<i32>,
    /// The image generation it was restored from; None when started cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// While it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_from: Option<StartedFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// How the last run ended, as far as the daemon saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    pub images: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_generation: Option<u64>,
    pub command: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<String>,
    pub backend: String,
    pub stop_at: String,
    pub log_dir: PathBuf,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand: Option<Box<OnDemandInfo>>,
    /// The uid of the client that created it (only it and root see it).
    #[serde(default)]
    pub owner_uid: u32,
    /// `USER[:GROUP]` it runs as, when not root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// One published image generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub service: String,
    pub generation: u64,
    pub path: PathBuf,
    /// Whether the metadata read and validated; when not, `problem` says why.
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub created_unix_ms: u64,
    /// `trace`, `notify` or `none` (a dump at any moment); unknown (`""`
    /// on the wire) when the metadata does not read.
    #[serde(default, with = "empty_is_none")]
    pub backend: Option<BackendKind>,
    /// The syscall the service was stopped before (prebaked images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_syscall: Option<String>,
    /// Bytes on disk, metadata included.
    pub bytes: u64,
    pub files: u64,
    pub dump_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_version() {
        let req = Request::ServiceStart(StartService {
            name: "web".into(),
            cold: true,
        });
        let line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            req: &req,
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"v":1,"op":"service.start","name":"web","cold":true}"#
        );
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v.as_object_mut().unwrap().remove("v");
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), req);
        let list: Request = serde_json::from_str(r#"{"op":"service.list"}"#).unwrap();
        assert_eq!(list, Request::ServiceList);
    }

    #[test]
    fn image_transfer_requests() {
        let pull: Request = serde_json::from_str(
            r#"{"op":"image.pull","reference":"127.0.0.1:5000/web:1","as":"web2"}"#,
        )
        .unwrap();
        assert_eq!(
            pull,
            Request::ImagePull(PullImage {
                reference: "127.0.0.1:5000/web:1".into(),
                as_name: Some("web2".into()),
                insecure_registries: vec![],
            })
        );
        assert_eq!(pull.service(), Some("web2"));
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"image.push","name":"web","reference":"r/x","insecure":true}"#
        )
        .is_err());
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        assert!(serde_json::from_str::<Request>(
            r#"{"op":"service.dump","name":"a","leave_runing":true}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"service.explode","name":"a"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"service.stop"}"#).is_err());
    }

    #[test]
    fn busy_and_image_backend_keep_their_wire_spelling() {
        let ops = [
            (Operation::Create, "create"),
            (Operation::Delete, "delete"),
            (Operation::Set, "set"),
            (Operation::Prebake, "prebake"),
            (Operation::Dump, "dump"),
            (Operation::Start, "start"),
            (Operation::Stop, "stop"),
            (Operation::ImageRm, "image rm"),
            (Operation::Push, "push"),
            (Operation::Pull, "pull"),
            (Operation::Check, "check"),
            (Operation::MigrateIn, "migrate in"),
            (Operation::MigrateOut, "migrate out"),
        ];
        for (op, word) in ops {
            assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{word}\""));
            assert_eq!(op.as_str(), word);
            assert_eq!(
                serde_json::from_str::<Operation>(&format!("\"{word}\"")).unwrap(),
                op
            );
        }
        // An image as an older daemon sent it, and one whose metadata did
        // not read (backend "").
        let image = |backend: &str| {
            format!(
                r#"{{"service":"web","generation":1,"path":"/i","valid":true,"created_unix_ms":1,"backend":"{backend}","bytes":1,"files":1,"dump_ms":1}}"#
            )
        };
        for (kind, word) in [
            (Some(BackendKind::Trace), "trace"),
            (Some(BackendKind::Notify), "notify"),
            (Some(BackendKind::None), "none"),
            (None, ""),
        ] {
            let line = image(word);
            let info: ImageInfo = serde_json::from_str(&line).unwrap();
            assert_eq!(info.backend, kind);
            assert_eq!(serde_json::to_string(&info).unwrap(), line);
        }
    }

    #[test]
    fn an_unknown_busy_or_backend_names_what_came_and_what_was_expected() {
        let e = serde_json::from_str::<Operation>(r#""explode""#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("explode") && e.contains("migrate out"), "{e}");
        // Nested in a reply, as a client reads it.
        let reply = r#"{"v":1,"ok":true,"result":{"kind":"images","images":[{"service":"web","generation":1,"path":"/i","valid":true,"created_unix_ms":1,"backend":"magic","bytes":1,"files":1,"dump_ms":1}]}}"#;
        let e = serde_json::from_str::<Response>(reply)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("magic") && e.contains("trace") && e.contains("notify"),
            "{e}"
        );
    }

    #[test]
    fn replies_round_trip() {
        let r = Response::err(ErrorCode::Forbidden, "no");
        let line = r.to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(serde_json::from_str::<Response>(line.trim()).unwrap(), r);
        let ok = Response::ok(Reply::Done {
            message: "x".into(),
        });
        assert_eq!(
            serde_json::from_str::<Response>(ok.to_line().trim()).unwrap(),
            ok
        );
    }
}

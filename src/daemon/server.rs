//! The daemon's socket: binding it (mode 0600 by default), checking each
//! peer's credentials, and serving each connection on its own thread.
//!
//! A peer is allowed when its uid (from `SO_PEERCRED`) is root or listed
//! with `--allow-uid`, or its gid, or one of its supplementary groups (read
//! from /proc at connect time), is listed with `--allow-gid`. Anyone else
//! gets one `forbidden` reply and the connection is closed. The socket's
//! file mode is a second gate in front of that check, not a replacement.
//!
//! No client can keep another out. The accepting thread only reads the
//! peer's credentials (no I/O with the client) and hands the connection
//! on: refusals (forbidden, too many connections) go to short-lived
//! threads, at most [`MAX_REFUSALS`] at once, that give up after
//! [`REFUSAL_DEADLINE`] whatever the client does; beyond that a refused
//! connection is closed without a word. A request line must arrive whole
//! within [`LINE_DEADLINE`] of its first byte, and a connection with no
//! request for [`Limits::idle`] is closed (blank lines do not count as
//! requests).
//! [`ROOT_RESERVE`] of the [`MAX_CONNECTIONS`] slots are root's alone.

use super::api::{
    self, ApiError, ErrorCode, Reply, Request, Response, API_VERSION, MAX_REQUEST_BYTES,
};
use super::logs;
use super::migrate;
use super::service::{Caller, ServiceError, Services};
use crate::images::compat::CompatError;
use crate::images::oci::{Progress, RegistryOptions};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once; more get an `unavailable` reply.
pub const MAX_CONNECTIONS: usize = 64;
/// Of [`MAX_CONNECTIONS`], the slots only root's connections may take, so
/// the other allowed users together cannot lock root out.
pub const ROOT_RESERVE: usize = 8;
/// Refusals being delivered at once; past that a refused connection is
/// closed without a reply. Each waits at most [`REFUSAL_DEADLINE`] for its
/// client, on a small stack: a flood of this many a second still gets
/// its replies.
pub const MAX_REFUSALS: usize = 64;
const REFUSAL_STACK: usize = 64 * 1024;
/// The longest a refusal spends on its client (reply, then draining what
/// it still sends so it reads the reply rather than ECONNRESET).
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);
/// From the first byte of a request line to its newline.
pub const LINE_DEADLINE: Duration = Duration::from_secs(5);
/// A connection without a request this long is closed (by default: see
/// [`Limits`]).
pub const IDLE: Duration = Duration::from_secs(300);
/// A client that reads none of its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another miehistod is already listening on {path}; stop it, or give this one another --socket")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another --socket")]
    NotASocket { path: PathBuf },
    #[error("cannot create the socket directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the mode of {path} to {mode:o}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the accept thread")]
    Thread(#[source] std::io::Error),
}

/// Who may talk to the daemon.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

/// How long clients may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection without a request this long is closed.
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { idle: IDLE }
    }
}

/// The peer of a connection, as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    // A peer that is gone has no groups to let it in.
    crate::sys::procfs::status(nix::unistd::Pid::from_raw(pid))
        .map(|s| s.groups)
        .unwrap_or_default()
}

impl Access {
    pub fn allows(&self, p: &Peer) -> bool {
        if p.uid == 0 || self.allow_uids.contains(&p.uid) || self.allow_gids.contains(&p.gid) {
            return true;
        }
        !self.allow_gids.is_empty()
            && supplementary_groups(p.pid)
                .iter()
                .any(|g| self.allow_gids.contains(g))
    }

    fn describe(&self) -> String {
        let mut who = vec!["uid 0".to_string()];
        who.extend(
            self.allow_uids
                .iter()
                .filter(|&&u| u != 0)
                .map(|u| format!("uid {u}")),
        );
        who.extend(self.allow_gids.iter().map(|g| format!("gid {g}")));
        who.join(", ")
    }
}

/// Binds the socket with `mode`, refusing to steal a live daemon's.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Err(_) => {}
    }
    // The socket is created with the mode the umask leaves; a tight umask
    // around bind(2) means no moment where it is wider than 0600.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ServerError::Chmod {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    Ok(listener)
}

pub struct Server {
    services: Arc<Services>,
    access: Access,
    limits: Limits,
    /// Connections being served.
    active: Arc<AtomicUsize>,
    /// Refusals being delivered.
    refusing: Arc<AtomicUsize>,
    /// Refusals are logged at most once a second (a flood of hostile
    /// connections must not flood the log): the second of the last one
    /// logged, and how many went unlogged since.
    refusal_logged_at: AtomicU64,
    refusals_unlogged: AtomicU64,
}

/// One taken place of a bounded count, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes a place if fewer than `limit` are taken.
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The peer's credentials, as the kernel recorded them at connect(2).
fn peer_of(conn: &UnixStream) -> nix::Result<Peer> {
    getsockopt(conn, PeerCredentials).map(|c| Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

fn service_err(e: ServiceError) -> Response {
    Response::err(e.code(), crate::error_chain(&e))
}

/// Writes a last reply, then reads (and drops) what the client may still
/// be sending, so it can read the reply instead of getting ECONNRESET; all
/// within `deadline` in total, however slowly the client sends.
fn last_word(conn: &UnixStream, resp: Response, deadline: Duration) {
    let end = Instant::now() + deadline;
    let _ = conn.set_write_timeout(Some(deadline));
    let _ = (&*conn).write_all(resp.to_line().as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 16 * 1024];
    let mut left: usize = 4 << 20;
    while left > 0 {
        let now = Instant::now();
        if now >= end || conn.set_read_timeout(Some(end - now)).is_err() {
            break;
        }
        match (&*conn).read(&mut sink) {
            Ok(0) => break,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// How reading one request line ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LineRead {
    /// A line, newline included (or the last bytes before the client
    /// closed its end).
    Line(Vec<u8>),
    /// Longer than [`MAX_REQUEST_BYTES`]; the rest is unread.
    TooLarge,
    /// The client closed the connection (or it failed).
    Closed,
    /// No byte of a request before the idle deadline.
    Idle,
    /// The line began but did not end within [`LINE_DEADLINE`].
    Slow,
}

/// Reads one request line: its first byte may come until `idle_until`, the
/// rest must follow within [`LINE_DEADLINE`] of it.
pub(super) fn read_line(reader: &mut BufReader<&UnixStream>, idle_until: Instant) -> LineRead {
    let mut line = Vec::new();
    let mut line_until: Option<Instant> = None;
    loop {
        let until = line_until.unwrap_or(idle_until);
        let now = Instant::now();
        let late = if line_until.is_some() {
            LineRead::Slow
        } else {
            LineRead::Idle
        };
        if now >= until {
            return late;
        }
        // A timeout applies to each read(2), so it is renewed with what is
        // left: a client trickling bytes cannot stretch the deadline.
        if reader
            .get_ref()
            .set_read_timeout(Some(until - now))
            .is_err()
        {
            return LineRead::Closed;
        }
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return late
            }
            Err(_) => return LineRead::Closed,
        };
        if buf.is_empty() {
            return if line.is_empty() {
                LineRead::Closed
            } else {
                LineRead::Line(line)
            };
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REQUEST_BYTES {
            return LineRead::TooLarge;
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return LineRead::Line(line);
        }
        line_until.get_or_insert_with(|| Instant::now() + LINE_DEADLINE);
    }
}

/// Parses one request line; an error is the reply to send.
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    let bad = |m: String| ApiError {
        code: ErrorCode::BadRequest,
        message: m,
    };
    let text = std::str::from_utf8(line)
        .map_err(|_| bad("the request is not UTF-8 text; send one JSON object per line".into()))?;
    let mut value: serde_json::Value = serde_json::from_str(text.trim()).map_err(|e| {
        bad(format!("malformed request ({e}); send one JSON object per line, e.g. {{\"v\":{API_VERSION},\"op\":\"ping\"}}"))
    })?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| bad("the request must be a JSON object".into()))?;
    match obj.remove("v") {
        None => {
            return Err(bad(format!(
                "the request has no API version; add \"v\":{API_VERSION}"
            )))
        }
        Some(v) if v.as_u64() == Some(API_VERSION as u64) => {}
        Some(v) => {
            return Err(ApiError {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "API version {v} is not supported; this miehistod speaks version {API_VERSION}"
                ),
            })
        }
    }
    let req: Request =
        serde_json::from_value(value.clone()).map_err(|e| bad(format!("invalid request: {e}")))?;
    // serde ignores the other fields of an internally tagged unit variant
    // (`deny_unknown_fields` does not reach it): refuse them here, as the
    // API promises for every request.
    if matches!(req, Request::Ping | Request::ServiceList) {
        let extra: Vec<&String> = value
            .as_object()
            .map(|o| o.keys().filter(|k| *k != "op").collect())
            .unwrap_or_default();
        if let Some(k) = extra.first() {
            return Err(bad(format!(
                "invalid request: unknown field `{k}`: {} takes no fields but \"v\" and \"op\"",
                req.op()
            )));
        }
    }
    Ok(req)
}

impl Server {
    pub fn new(services: Arc<Services>, access: Access, limits: Limits) -> Arc<Server> {
        Arc::new(Server {
            services,
            access,
            limits,
            active: Arc::new(AtomicUsize::new(0)),
            refusing: Arc::new(AtomicUsize::new(0)),
            refusal_logged_at: AtomicU64::new(0),
            refusals_unlogged: AtomicU64::new(0),
        })
    }

    /// Accepts connections on a background thread.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) -> Result<(), ServerError> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => me.admit(c),
                        Err(e) => {
                            log::warn!("accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map(drop)
            .map_err(ServerError::Thread)
    }

    /// Decides about a new connection without any I/O with its client:
    /// this runs on the accepting thread.
    fn admit(self: &Arc<Self>, conn: UnixStream) {
        let peer = match peer_of(&conn) {
            Ok(p) => p,
            Err(e) => {
                return self.refuse(
                    conn,
                    format!("a connection whose peer cannot be told (SO_PEERCRED: {e})"),
                    Response::err(
                        ErrorCode::Forbidden,
                        format!("cannot tell who is connecting (SO_PEERCRED: {e}); refused"),
                    ),
                )
            }
        };
        if !self.access.allows(&peer) {
            return self.refuse(
                conn,
                format!("pid {} uid {} gid {} (not allowed)", peer.pid, peer.uid, peer.gid),
                Response::err(
                    ErrorCode::Forbidden,
                    format!(
                        "permission denied: uid {} (gid {}) may not use miehistod; allowed: {}; ask the administrator to start it with --allow-uid or --allow-gid",
                        peer.uid,
                        peer.gid,
                        self.access.describe()
                    ),
                ),
            );
        }
        let limit = if peer.uid == 0 {
            MAX_CONNECTIONS
        } else {
            MAX_CONNECTIONS - ROOT_RESERVE
        };
        let Some(slot) = Slot::take(&self.active, limit) else {
            let whose = if peer.uid == 0 {
                String::new()
            } else {
                format!(" (the other {ROOT_RESERVE} are kept for root)")
            };
            return self.refuse(
                conn,
                format!("pid {} uid {} (all {limit} slots busy)", peer.pid, peer.uid),
                Response::err(
                    ErrorCode::Unavailable,
                    format!("miehistod is serving {limit} connections already{whose}; try again"),
                ),
            );
        };
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _slot = slot;
                me.connection(conn, peer);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a connection thread: {e}");
        }
    }

    /// Delivers a refusal on a thread of its own, bounded in time; when
    /// [`MAX_REFUSALS`] are under way already, closes the connection as it
    /// is (the client reads end-of-file).
    fn refuse(&self, conn: UnixStream, who: String, resp: Response) {
        self.log_refusal(&who, &resp);
        let Some(slot) = Slot::take(&self.refusing, MAX_REFUSALS) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("refuse".into())
            .stack_size(REFUSAL_STACK)
            .spawn(move || {
                let _slot = slot;
                last_word(&conn, resp, REFUSAL_DEADLINE);
            });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread to refuse a connection: {e}");
        }
    }

    fn log_refusal(&self, who: &str, resp: &Response) {
        let now = crate::sys::time::unix_ms() / 1000;
        if self.refusal_logged_at.swap(now, Ordering::SeqCst) == now {
            self.refusals_unlogged.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let unlogged = self.refusals_unlogged.swap(0, Ordering::SeqCst);
        let why = resp.error.as_ref().map(|e| e.code);
        if unlogged > 0 {
            log::warn!("refused {who}: {why:?} (and {unlogged} more refusals in the last second)");
        } else {
            log::warn!("refused {who}: {why:?}");
        }
    }

    fn connection(&self, conn: UnixStream, peer: Peer) {
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let mut reader = BufReader::new(&conn);
        let idle = self.limits.idle;
        let mut idle_until = Instant::now() + idle;
        loop {
            let line = match read_line(&mut reader, idle_until) {
                LineRead::Line(l) => l,
                LineRead::Closed => return,
                LineRead::Idle => {
                    log::info!(
                        "pid {} uid {}: no request for {} s; the connection is closed",
                        peer.pid,
                        peer.uid,
                        idle.as_secs()
                    );
                    return;
                }
                LineRead::Slow => {
                    log::warn!(
                        "pid {} uid {}: a request line did not arrive whole within {} s",
                        peer.pid,
                        peer.uid,
                        LINE_DEADLINE.as_secs()
                    );
                    last_word(
                        &conn,
                        Response::err(ErrorCode::BadRequest, format!("the request line did not arrive whole within {} s of its first byte; the connection is closed", LINE_DEADLINE.as_secs())),
                        REFUSAL_DEADLINE,
                    );
                    return;
                }
                LineRead::TooLarge => {
                    log::warn!(
                        "pid {} uid {}: request over {MAX_REQUEST_BYTES} bytes refused",
                        peer.pid,
                        peer.uid
                    );
                    last_word(
                        &conn,
                        Response::err(ErrorCode::TooLarge, format!("the request is larger than {MAX_REQUEST_BYTES} bytes; the connection is closed")),
                        REFUSAL_DEADLINE,
                    );
                    return;
                }
            };
            // Blank lines are no request: they do not keep a connection
            // from counting as idle.
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let req = match parse_request(&line) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("pid {} uid {}: {}", peer.pid, peer.uid, e.message);
                    let resp = Response::err(e.code, e.message);
                    if (&conn).write_all(resp.to_line().as_bytes()).is_err() {
                        return;
                    }
                    idle_until = Instant::now() + idle;
                    continue;
                }
            };
            let op = req.op();
            let name = req.service().map(|n| format!(" {n}")).unwrap_or_default();
            log::info!("pid {} uid {}: {op}{name}", peer.pid, peer.uid);
            // The migration operations open a session that reads further
            // lines of this connection.
            let who = Caller::from_ids(peer.uid, peer.gid);
            let resp = match req {
                Request::MigrateReceive(m) => {
                    migrate::serve_receive(&self.services, m, &conn, &mut reader, who)
                }
                Request::MigrateOut(m) => {
                    migrate::serve_out(&self.services, m, &conn, &mut reader, who)
                }
                other => self.dispatch(other, &conn, who),
            };
            let Some(resp) = resp else {
                return;
            };
            match &resp.error {
                Some(e) => log::info!("{op}{name}: {:?}: {}", e.code, e.message),
                None => log::info!("{op}{name}: ok"),
            }
            if (&conn).write_all(resp.to_line().as_bytes()).is_err() {
                return;
            }
            idle_until = Instant::now() + idle;
        }
    }

    /// Runs one request; None when the reply was streamed already.
    fn dispatch(&self, req: Request, conn: &UnixStream, who: Caller) -> Option<Response> {
        let s = &self.services;
        let r: Result<Reply, ServiceError> = match req {
            Request::MigrateReceive(_)
            | Request::MigrateOut(_)
            | Request::MigrateChunk(_)
            | Request::MigrateRestore
            | Request::MigrateFinish(_) => {
                return Some(Response::err(
                    ErrorCode::BadRequest,
                    format!(
                        "{} belongs inside a migration session (after migrate.receive or service.migrate_out on the same connection)",
                        req.op()
                    ),
                ))
            }
            Request::Ping => Ok(Reply::Pong {
                daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                api_version: API_VERSION,
                pid: nix::unistd::getpid().as_raw(),
                state_dir: s.state_dir().to_path_buf(),
            }),
            Request::ServiceCreate(c) => s.create(&c, who).map(|info| {
                if c.on_demand.is_some() {
                    s.arm(&c.name);
                }
                Reply::Service(info)
            }),
            Request::ServiceSet(st) => s
                .set_on_demand(&st.name, st.on_demand, who)
                .map(Reply::Service),
            Request::ServiceStats(n) => s.on_demand_stats(&n.name, who).map(Reply::Stats),
            Request::ServicePrebake(n) => s.prebake(&n.name, who).map(Reply::Image),
            Request::ServiceStart(st) => s.start(&st.name, st.cold, who).map(Reply::Service),
            Request::ServiceDump(d) => s.dump(&d.name, d.leave_running, who).map(Reply::Image),
            Request::ServiceStop(n) => s.stop(&n.name, who).map(Reply::Service),
            Request::ServiceDelete(n) => s
                .delete(&n.name, who)
                .map(|message| Reply::Done { message }),
            Request::ServiceList => Ok(Reply::Services {
                services: s.list(who),
            }),
            Request::ServiceLogs(l) => match s.log_files(&l.name, who) {
                Ok(files) => {
                    let _ = logs::stream(
                        conn,
                        files,
                        l.tail_bytes.unwrap_or(logs::DEFAULT_TAIL),
                        l.follow,
                    );
                    return None;
                }
                Err(e) => Err(e),
            },
            Request::ImageList(m) => match m.name {
                Some(n) => s.exists(&n, who).map(|_| Reply::Images {
                    images: s.store().list(&n),
                }),
                None => Ok(Reply::Images {
                    images: s
                        .names(who)
                        .iter()
                        .flat_map(|n| s.store().list(n))
                        .collect(),
                }),
            },
            Request::ImageInspect(r) => s.exists(&r.name, who).and_then(|_| {
                let (image, metadata) = s.store().metadata(&r.name, r.generation)?;
                Ok(Reply::ImageDetail {
                    image,
                    metadata: Box::new(metadata),
                })
            }),
            Request::ImageRm(r) => s
                .image_rm(&r.name, r.generation, who)
                .map(|message| Reply::Done { message }),
            Request::ImagePush(p) => {
                let opts = RegistryOptions {
                    insecure: p.insecure_registries.clone(),
                };
                let mut progress = progress_to(conn);
                s.push(&p.name, p.generation, &p.reference, &opts, &mut progress, who)
                    .map(|(generation, pushed)| Reply::ImagePushed {
                        service: p.name.clone(),
                        generation,
                        reference: pushed.reference,
                        manifest_digest: pushed.manifest_digest,
                        layer_digest: pushed.layer_digest,
                        layer_bytes: pushed.layer_bytes,
                        annotations: pushed.annotations.into_iter().collect(),
                    })
            }
            Request::ImagePull(p) => {
                let opts = RegistryOptions {
                    insecure: p.insecure_registries.clone(),
                };
                let mut progress = progress_to(conn);
                s.pull(&p.reference, p.as_name.as_deref(), &opts, &mut progress, who)
                    .map(|(image, pulled, created_service)| Reply::ImagePulled {
                        image,
                        reference: pulled.reference,
                        manifest_digest: pulled.manifest_digest,
                        layer_bytes: pulled.layer_bytes,
                        created_service,
                    })
            }
            Request::ImageCheck(c) => {
                let opts = RegistryOptions {
                    insecure: c.insecure_registries.clone(),
                };
                let mut progress = progress_to(conn);
                let local = c.name.as_deref().map(|n| (n, c.generation));
                s.check(local, c.reference.as_deref(), &opts, &mut progress, who)
                    .map(|(image, differences)| {
                        let compatible = differences.is_empty();
                        let message = if compatible {
                            format!("{image} matches this host: it can be restored here")
                        } else {
                            CompatError::Mismatch {
                                image: image.clone().into(),
                                differences: differences.clone(),
                            }
                            .to_string()
                        };
                        Reply::ImageCheck {
                            image,
                            compatible,
                            differences: differences.iter().map(|d| d.to_string()).collect(),
                            message,
                        }
                    })
            }
        };
        Some(match r {
            Ok(reply) => Response::ok(reply),
            Err(e) => service_err(e),
        })
    }
}

/// Sends each progress report as a `progress` reply line. A client that
/// went away does not stop the transfer: its result is still published.
fn progress_to(conn: &UnixStream) -> impl FnMut(&Progress) + '_ {
    move |p: &Progress| {
        let line = Response::ok(Reply::Progress {
            phase: p.phase.to_string(),
            done: p.done,
            total: p.total,
        })
        .to_line();
        let _ = (&*conn).write_all(line.as_bytes());
    }
}

/// Re-exported for the binary: the default socket path.
pub fn default_socket() -> PathBuf {
    PathBuf::from(api::DEFAULT_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_checked() {
        assert_eq!(
            parse_request(br#"{"v":1,"op":"ping"}"#).unwrap(),
            Request::Ping
        );
        let code = |line: &[u8]| parse_request(line).unwrap_err().code;
        assert_eq!(code(b"\xff\xfe"), ErrorCode::BadRequest);
        assert_eq!(code(b"{garbage"), ErrorCode::BadRequest);
        assert_eq!(code(b"[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(br#"{"op":"ping"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(br#"{"v":2,"op":"ping"}"#),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            code(br#"{"v":1,"op":"service.start"}"#),
            ErrorCode::BadRequest
        );
        for line in [
            &br#"{"v":1,"op":"ping","x":1}"#[..],
            br#"{"v":1,"op":"service.list","name":"web"}"#,
        ] {
            let e = parse_request(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("unknown field"), "{}", e.message);
        }
        assert_eq!(
            parse_request(br#"{"v":1,"op":"service.list"}"#).unwrap(),
            Request::ServiceList
        );
        let msg = parse_request(br#"{"v":1,"op":"nope"}"#)
            .unwrap_err()
            .message;
        assert!(msg.contains("invalid request"), "{msg}");
    }

    #[test]
    fn access_rules() {
        let a = Access {
            allow_uids: vec![1000],
            allow_gids: vec![50],
        };
        assert!(a.allows(&Peer {
            pid: 0,
            uid: 0,
            gid: 0
        }));
        assert!(a.allows(&Peer {
            pid: 0,
            uid: 1000,
            gid: 1000
        }));
        assert!(a.allows(&Peer {
            pid: 0,
            uid: 7,
            gid: 50
        }));
        assert!(!a.allows(&Peer {
            pid: 0,
            uid: 65534,
            gid: 65534
        }));
        assert!(!Access::default().allows(&Peer {
            pid: 0,
            uid: 65534,
            gid: 65534
        }));
    }
}

//! The daemon's socket: binding it (mode 0600 by default), checking each
//! peer's credentials, and serving each connection on its own thread.
//!
//! A peer is allowed when its uid (from `SO_PEERCRED`) is root or listed
//! with `--allow-uid`, or its gid, or one of its supplementary groups (read
//! from /proc at connect time), is listed with `--allow-gid`. Anyone else
//! gets one `forbidden` reply and the connection is closed. The socket's
//! file mode is a second gate in front of that check, not a replacement.

use super::api::{
    self, ApiError, ErrorCode, Reply, Request, Response, API_VERSION, MAX_REQUEST_BYTES,
};
use super::logs;
use super::migrate;
use super::service::{ServiceError, Services};
use crate::images::compat::CompatError;
use crate::images::oci::{Progress, RegistryOptions};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more get an `unavailable` reply.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long between requests is closed.
const IDLE: Duration = Duration::from_secs(300);

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
    active: AtomicUsize,
}

struct Active<'a>(&'a AtomicUsize);
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn service_err(e: ServiceError) -> Response {
    Response::err(e.code(), crate::error_chain(&e))
}

/// Writes a last reply, then reads (and drops) what the client may still
/// be sending, so it can read the reply instead of getting ECONNRESET.
/// Whether the connection's peer is root (SO_PEERCRED); a peer that
/// cannot be told is not.
fn peer_is_root(conn: &UnixStream) -> bool {
    getsockopt(conn, PeerCredentials).is_ok_and(|c| c.uid() == 0)
}

fn last_word(conn: &UnixStream, resp: Response) {
    let _ = (&*conn).write_all(resp.to_line().as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 16 * 1024];
    let mut left: usize = 4 << 20;
    while left > 0 {
        match (&*conn).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
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
    pub fn new(services: Arc<Services>, access: Access) -> Arc<Server> {
        Arc::new(Server {
            services,
            access,
            active: AtomicUsize::new(0),
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
                        Ok(c) => me.spawn_connection(c),
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

    fn spawn_connection(self: &Arc<Self>, conn: UnixStream) {
        if self.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            self.active.fetch_sub(1, Ordering::SeqCst);
            last_word(
                &conn,
                Response::err(
                    ErrorCode::Unavailable,
                    format!(
                        "miehistod is serving {MAX_CONNECTIONS} connections already; try again"
                    ),
                ),
            );
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _active = Active(&me.active);
                me.connection(conn);
            });
        if let Err(e) = spawned {
            self.active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("cannot start a connection thread: {e}");
        }
    }

    fn connection(&self, conn: UnixStream) {
        let peer = match getsockopt(&conn, PeerCredentials) {
            Ok(c) => Peer {
                pid: c.pid(),
                uid: c.uid(),
                gid: c.gid(),
            },
            Err(e) => {
                last_word(
                    &conn,
                    Response::err(
                        ErrorCode::Forbidden,
                        format!("cannot tell who is connecting (SO_PEERCRED: {e}); refused"),
                    ),
                );
                return;
            }
        };
        if !self.access.allows(&peer) {
            log::warn!("refused pid {} uid {} gid {}", peer.pid, peer.uid, peer.gid);
            last_word(
                &conn,
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
            return;
        }
        let _ = conn.set_read_timeout(Some(IDLE));
        let mut reader = BufReader::new(&conn);
        loop {
            let mut line = Vec::new();
            match (&mut reader)
                .take(MAX_REQUEST_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
                Err(_) => return,
            }
            if line.len() > MAX_REQUEST_BYTES {
                log::warn!(
                    "pid {} uid {}: request over {MAX_REQUEST_BYTES} bytes refused",
                    peer.pid,
                    peer.uid
                );
                last_word(
                    &conn,
                    Response::err(ErrorCode::TooLarge, format!("the request is larger than {MAX_REQUEST_BYTES} bytes; the connection is closed")),
                );
                return;
            }
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
                    continue;
                }
            };
            let op = req.op();
            let name = req.service().map(|n| format!(" {n}")).unwrap_or_default();
            log::info!("pid {} uid {}: {op}{name}", peer.pid, peer.uid);
            // The migration operations open a session that reads further
            // lines of this connection.
            let resp = match req {
                Request::MigrateReceive(m) => {
                    migrate::serve_receive(&self.services, m, &conn, &mut reader)
                }
                Request::MigrateOut(m) => migrate::serve_out(&self.services, m, &conn, &mut reader),
                other => self.dispatch(other, &conn),
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
        }
    }

    /// Runs one request; None when the reply was streamed already.
    fn dispatch(&self, req: Request, conn: &UnixStream) -> Option<Response> {
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
            Request::ServiceCreate(c) if c.user.is_some() && !peer_is_root(conn) => {
                return Some(Response::err(
                    ErrorCode::Forbidden,
                    "only root may choose the user a service runs as (--user)",
                ))
            }
            Request::ServiceCreate(c) => s.create(&c).map(|info| {
                if c.on_demand.is_some() {
                    s.arm(&c.name);
                }
                Reply::Service(info)
            }),
            Request::ServiceSet(st) => s.set_on_demand(&st.name, st.on_demand).map(Reply::Service),
            Request::ServiceStats(n) => s.on_demand_stats(&n.name).map(Reply::Stats),
            Request::ServicePrebake(n) => s.prebake(&n.name).map(Reply::Image),
            Request::ServiceStart(st) => s.start(&st.name, st.cold).map(Reply::Service),
            Request::ServiceDump(d) => s.dump(&d.name, d.leave_running).map(Reply::Image),
            Request::ServiceStop(n) => s.stop(&n.name).map(Reply::Service),
            Request::ServiceDelete(n) => s.delete(&n.name).map(|message| Reply::Done { message }),
            Request::ServiceList => Ok(Reply::Services { services: s.list() }),
            Request::ServiceLogs(l) => match s.log_files(&l.name) {
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
                Some(n) => s.exists(&n).map(|_| Reply::Images {
                    images: s.store().list(&n),
                }),
                None => Ok(Reply::Images {
                    images: s.names().iter().flat_map(|n| s.store().list(n)).collect(),
                }),
            },
            Request::ImageInspect(r) => s.exists(&r.name).and_then(|_| {
                let (image, metadata) = s.store().metadata(&r.name, r.generation)?;
                Ok(Reply::ImageDetail {
                    image,
                    metadata: Box::new(metadata),
                })
            }),
            Request::ImageRm(r) => s
                .image_rm(&r.name, r.generation)
                .map(|message| Reply::Done { message }),
            Request::ImagePush(p) => {
                let opts = RegistryOptions {
                    insecure: p.insecure_registries.clone(),
                };
                let mut progress = progress_to(conn);
                s.push(&p.name, p.generation, &p.reference, &opts, &mut progress)
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
                s.pull(&p.reference, p.as_name.as_deref(), &opts, &mut progress)
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
                s.check(local, c.reference.as_deref(), &opts, &mut progress)
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

//! The supervisor's control socket: how `runmh dump` (or the daemon) asks a
//! running supervisor to freeze its tree and let go of it before CRIU
//! seizes, and to take it back afterwards. One JSON line each way.

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Stop the tree and detach any tracer: a dump is about to start.
    Freeze,
    /// The dump is over; `alive` says whether the tree was left running
    /// (or survived a failed dump).
    Thaw {
        alive: bool,
    },
    /// The dump succeeded and the tree stays stopped for someone else's
    /// later `Thaw` (a migration): the dumper may end now.
    KeepFrozen,
    Status,
    /// Resume a restored tree held at its stop point (a standby instance).
    Resume,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub pids: Vec<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::instance::InstanceState>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the supervisor at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor at {path} did not answer")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor at {path} sent a malformed reply: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("the supervisor refused: {0}")]
    Refused(String),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sends one request and waits for its reply.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| io(e.into()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(s.take(MAX_LINE))
        .read_line(&mut reply)
        .map_err(io)?;
    let resp: Response =
        serde_json::from_str(reply.trim()).map_err(|e| ControlError::Malformed {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if !resp.ok {
        return Err(ControlError::Refused(resp.error.unwrap_or_default()));
    }
    Ok(resp)
}

/// A request from a client, with the way back.
pub struct Incoming {
    pub req: Request,
    pub reply: Sender<Response>,
    /// The client's pid (SO_PEERCRED), when the kernel gave it.
    pub peer: Option<i32>,
}

/// Listens on `path` in a background thread; requests arrive on `tx`.
pub fn serve(path: &Path, tx: Sender<Incoming>) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Listen {
        path: path.to_path_buf(),
        source,
    })?;
    // Only root may steer a supervisor.
    let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = handle(conn, &tx);
            }
        })
        .map_err(|source| ControlError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(())
}

fn handle(conn: UnixStream, tx: &Sender<Incoming>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::err(format!("malformed request: {e}")),
        Ok(req) => {
            let (reply, r) = crossbeam_channel::bounded(1);
            let peer =
                nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.pid())
                    .filter(|&p| p > 0);
            if tx.send(Incoming { req, reply, peer }).is_err() {
                Response::err("the supervisor is shutting down")
            } else {
                r.recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|_| Response::err("the supervisor did not answer in time"))
            }
        }
    };
    let mut out = serde_json::to_string(&resp).map_err(std::io::Error::other)?;
    out.push('\n');
    (&conn).write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_over_a_socket() {
        let path = std::env::temp_dir().join(format!("mh-ctl-{}.sock", std::process::id()));
        let (tx, rx) = crossbeam_channel::unbounded::<Incoming>();
        serve(&path, tx).unwrap();
        std::thread::spawn(move || {
            while let Ok(inc) = rx.recv() {
                let resp = match inc.req {
                    // The client's pid, as the supervisor watches it.
                    Request::Freeze => Response {
                        ok: true,
                        pids: inc.peer.into_iter().collect(),
                        ..Default::default()
                    },
                    Request::Thaw { alive } => {
                        if alive {
                            Response::ok()
                        } else {
                            Response::err("no")
                        }
                    }
                    Request::Resume => Response::err("not held"),
                    Request::Status => Response {
                        ok: true,
                        state: Some(crate::instance::InstanceState::Running),
                        ..Default::default()
                    },
                    Request::KeepFrozen => Response::ok(),
                };
                let _ = inc.reply.send(resp);
            }
        });
        assert_eq!(
            call(&path, &Request::Freeze, Duration::from_secs(5))
                .unwrap()
                .pids,
            vec![nix::unistd::getpid().as_raw()]
        );
        assert!(call(
            &path,
            &Request::Thaw { alive: true },
            Duration::from_secs(5)
        )
        .is_ok());
        let e = call(
            &path,
            &Request::Thaw { alive: false },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            matches!(e, ControlError::Refused(ref m) if m == "no"),
            "{e}"
        );
        let mut raw = UnixStream::connect(&path).unwrap();
        raw.write_all(b"{garbage\n").unwrap();
        let mut reply = String::new();
        BufReader::new(raw).read_line(&mut reply).unwrap();
        assert!(reply.contains("malformed request"), "{reply}");
        let _ = std::fs::remove_file(&path);
    }
}

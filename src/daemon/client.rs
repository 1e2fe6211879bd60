//! The client side of the protocol ([`super::api`]), used by `mhctl`.

use super::api::{ApiError, Envelope, Reply, Request, Response, API_VERSION};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A reply is at most this long (an image's metadata is the largest).
const MAX_REPLY_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("miehistod is not running at {path} (start it, or point --socket at its socket)")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on {path}: the socket is for root or the users miehistod allows (run with sudo, or ask for --allow-uid/--allow-gid and a wider --socket-mode)")]
    SocketDenied {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to miehistod at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to miehistod at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("miehistod at {path} closed the connection without a reply")]
    NoReply { path: PathBuf },
    #[error("miehistod at {path} sent a malformed reply: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{}", .0.message)]
    Daemon(ApiError),
}

pub struct Client {
    path: PathBuf,
}

/// One open exchange: the request is sent, replies are read one by one.
pub struct Exchange {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Exchange {
    /// The next reply; a daemon error reply becomes [`ClientError::Daemon`].
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_BYTES)
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::NoReply {
                path: self.path.clone(),
            });
        }
        let resp: Response =
            serde_json::from_str(line.trim()).map_err(|e| ClientError::Malformed {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        if resp.v != API_VERSION {
            return Err(ClientError::Malformed {
                path: self.path.clone(),
                detail: format!("API version {} (this mhctl speaks {API_VERSION})", resp.v),
            });
        }
        match (resp.ok, resp.result, resp.error) {
            (true, Some(r), _) => Ok(r),
            (false, _, Some(e)) => Err(ClientError::Daemon(e)),
            _ => Err(ClientError::Malformed {
                path: self.path.clone(),
                detail: "neither a result nor an error".into(),
            }),
        }
    }
}

impl Client {
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_path_buf(),
        }
    }

    /// Sends `req`; the replies are read from the returned exchange.
    pub fn send(&self, req: &Request) -> Result<Exchange, ClientError> {
        let path = self.path.clone();
        let stream = UnixStream::connect(&path).map_err(|source| match source.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.clone(),
                source,
            },
            ErrorKind::PermissionDenied => ClientError::SocketDenied {
                path: path.clone(),
                source,
            },
            _ => ClientError::Connect {
                path: path.clone(),
                source,
            },
        })?;
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            req,
        })
        .map_err(|e| ClientError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        line.push('\n');
        // A daemon that refuses us replies and closes without reading: a
        // failed write is then no reason to miss its explanation.
        let written = (&stream).write_all(line.as_bytes());
        let mut ex = Exchange {
            path: path.clone(),
            reader: BufReader::new(stream),
        };
        if let Err(source) = written {
            return match ex.read_reply() {
                Err(ClientError::Daemon(e)) => Err(ClientError::Daemon(e)),
                _ => Err(ClientError::Io { path, source }),
            };
        }
        Ok(ex)
    }

    /// One request, one reply.
    pub fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?.read_reply()
    }
}

//! The client side of the protocol ([`super::api`]), used by `mhctl`:
//! over the daemon's UNIX socket, or through ssh ([`super::remote`]).

use super::api::{ApiError, Envelope, Reply, Request, Response, API_VERSION};
use super::remote::{DaemonAddr, SshOptions};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    #[error("cannot run ssh for {target} (is openssh-client installed?)")]
    SshSpawn {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh to {target} failed: {detail}")]
    Ssh { target: String, detail: String },
    #[error("lost the connection to miehistod at {at}")]
    Io {
        at: String,
        #[source]
        source: std::io::Error,
    },
    #[error("miehistod at {at} closed the connection without a reply")]
    NoReply { at: String },
    #[error("miehistod at {at} sent a malformed reply: {detail}")]
    Malformed { at: String, detail: String },
    #[error("{}", .0.message)]
    Daemon(ApiError),
}

/// A client of one daemon, local (its socket) or remote (through ssh).
pub struct Client {
    addr: DaemonAddr,
    ssh: SshOptions,
}

/// The ssh child of a remote connection, and what it printed on stderr.
struct SshChild {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl SshChild {
    /// ssh's last words, once it has exited (or a short wait passed).
    fn last_words(&mut self) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(r) = self.reader.take() {
            if self.child.try_wait().ok().flatten().is_some() {
                let _ = r.join();
            }
        }
        let text = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        match lines.last() {
            Some(l) => l.to_string(),
            None => match self.child.try_wait() {
                Ok(Some(st)) => format!("ssh ended ({st}) without a word"),
                _ => "no answer".to_string(),
            },
        }
    }
}

impl Drop for SshChild {
    fn drop(&mut self) {
        // Our end of stdin is closed by now: the remote dial-stdio sees end
        // of input, the daemon closes, and ssh exits. Give it a moment.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One open exchange: requests are sent, replies are read one by one.
pub struct Exchange {
    at: String,
    // Declared before `ssh` so that they are closed first.
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    ssh: Option<SshChild>,
}

impl Exchange {
    fn lost(&mut self) -> ClientError {
        match &mut self.ssh {
            Some(s) => ClientError::Ssh {
                target: self.at.clone(),
                detail: s.last_words(),
            },
            None => ClientError::NoReply {
                at: self.at.clone(),
            },
        }
    }

    /// The next reply; a daemon error reply becomes [`ClientError::Daemon`].
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_BYTES)
            .read_line(&mut line)
            .map_err(|source| ClientError::Io {
                at: self.at.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.lost());
        }
        let resp: Response =
            serde_json::from_str(line.trim()).map_err(|e| ClientError::Malformed {
                at: self.at.clone(),
                detail: e.to_string(),
            })?;
        if resp.v != API_VERSION {
            return Err(ClientError::Malformed {
                at: self.at.clone(),
                detail: format!("API version {} (this mhctl speaks {API_VERSION})", resp.v),
            });
        }
        match (resp.ok, resp.result, resp.error) {
            (true, Some(r), _) => Ok(r),
            (false, _, Some(e)) => Err(ClientError::Daemon(e)),
            _ => Err(ClientError::Malformed {
                at: self.at.clone(),
                detail: "neither a result nor an error".into(),
            }),
        }
    }

    /// Sends one more request on this connection (the replies come in order).
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            req,
        })
        .map_err(|e| ClientError::Io {
            at: self.at.clone(),
            source: e.into(),
        })?;
        line.push('\n');
        let written = self
            .writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.flush());
        if let Err(source) = written {
            // A daemon that refuses us replies and closes without reading:
            // a failed write is then no reason to miss its explanation.
            return match self.read_reply() {
                Err(e @ (ClientError::Daemon(_) | ClientError::Ssh { .. })) => Err(e),
                _ => Err(ClientError::Io {
                    at: self.at.clone(),
                    source,
                }),
            };
        }
        Ok(())
    }

    /// One more request, its one reply.
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?;
        self.read_reply()
    }
}

impl Client {
    /// A client of the daemon listening on the UNIX socket `path`.
    pub fn new(path: &Path) -> Client {
        Client::at(DaemonAddr::Unix(path.to_path_buf()), SshOptions::default())
    }

    pub fn at(addr: DaemonAddr, ssh: SshOptions) -> Client {
        Client { addr, ssh }
    }

    pub fn addr(&self) -> &DaemonAddr {
        &self.addr
    }

    /// Opens a connection (a UNIX socket, or an ssh child running
    /// `mhctl system dial-stdio` on the remote host).
    pub fn connect(&self) -> Result<Exchange, ClientError> {
        let at = self.addr.to_string();
        match &self.addr {
            DaemonAddr::Unix(path) => {
                let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
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
                let writer = stream.try_clone().map_err(|source| ClientError::Connect {
                    path: path.clone(),
                    source,
                })?;
                Ok(Exchange {
                    at,
                    reader: BufReader::new(Box::new(stream)),
                    writer: Box::new(writer),
                    ssh: None,
                })
            }
            DaemonAddr::Ssh(t) => {
                let mut child =
                    t.dial_command(&self.ssh)
                        .spawn()
                        .map_err(|source| ClientError::SshSpawn {
                            target: at.clone(),
                            source,
                        })?;
                let (Some(stdin), Some(stdout), Some(mut err)) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take())
                else {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ClientError::Ssh {
                        target: at,
                        detail: "ssh's pipes were not set up".into(),
                    });
                };
                let stderr = Arc::new(Mutex::new(String::new()));
                let sink = Arc::clone(&stderr);
                // Drained all along, so a chatty ssh never blocks on a full pipe.
                let reader = std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = err.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if let Ok(mut s) = sink.lock() {
                            if s.len() < 64 * 1024 {
                                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                            }
                        }
                    }
                });
                Ok(Exchange {
                    at,
                    reader: BufReader::new(Box::new(stdout)),
                    writer: Box::new(stdin),
                    ssh: Some(SshChild {
                        child,
                        stderr,
                        reader: Some(reader),
                    }),
                })
            }
        }
    }

    /// Sends `req` on a new connection; the replies are read from the
    /// returned exchange.
    pub fn send(&self, req: &Request) -> Result<Exchange, ClientError> {
        let mut ex = self.connect()?;
        ex.send(req)?;
        Ok(ex)
    }

    /// One request, one reply.
    pub fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        self.send(req)?.read_reply()
    }
}

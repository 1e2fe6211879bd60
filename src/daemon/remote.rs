//! Reaching a daemon on another host the way docker and podman do: through
//! the system's `ssh`, to the remote daemon's UNIX socket.
//!
//! `mhctl --host ssh://[USER@]HOST[:PORT][/SOCKET]` (or `MIEHISTO_HOST`)
//! runs `ssh -o BatchMode=yes [-p PORT] [-l USER] HOST -- mhctl system
//! dial-stdio [--socket SOCKET]` and speaks the ordinary JSON-lines
//! protocol over the ssh child's stdin and stdout. On the remote host
//! `mhctl system dial-stdio` (like `docker system dial-stdio`) connects to
//! the daemon's socket and copies bytes both ways, so no socat or port
//! forwarding is needed, and the remote daemon checks `SO_PEERCRED` of that
//! process: the user ssh logged in as, with the same rules as a local
//! client. The socket path in the URL follows podman's
//! `ssh://user@host:port/run/podman/podman.sock`.
//!
//! ssh settings are the user's own (`~/.ssh/config`, agent, known_hosts);
//! `MIEHISTO_SSH_CONFIG=FILE` passes `-F FILE` instead, and
//! `MIEHISTO_REMOTE_MHCTL` names the remote mhctl when it is not on the
//! remote PATH. BatchMode means a missing key or an unknown host key is an
//! error, never a prompt.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const SSH: &str = "ssh";
pub const DEFAULT_REMOTE_MHCTL: &str = "mhctl";

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url:?} is not a daemon address: {why} (write ssh://[USER@]HOST[:PORT][/SOCKET] or unix:///PATH)")]
    BadUrl { url: String, why: String },
    #[error("cannot connect to miehistod at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copying between stdio and {path} failed")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonAddr {
    Unix(PathBuf),
    Ssh(SshTarget),
}

impl std::fmt::Display for DaemonAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DaemonAddr::Unix(p) => write!(f, "{}", p.display()),
            DaemonAddr::Ssh(t) => write!(f, "{t}"),
        }
    }
}

/// `ssh://[USER@]HOST[:PORT][/SOCKET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    /// The daemon's socket on the remote host; None: its default.
    pub socket: Option<PathBuf>,
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ssh://")?;
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        if let Some(s) = &self.socket {
            write!(f, "{}", s.display())?;
        }
        Ok(())
    }
}

fn ok_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%'))
}

impl DaemonAddr {
    /// Parses `ssh://...`, `unix:///PATH`, or a plain socket path.
    pub fn parse(url: &str) -> Result<DaemonAddr, RemoteError> {
        let bad = |why: &str| RemoteError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        if let Some(p) = url.strip_prefix("unix://") {
            if !p.starts_with('/') {
                return Err(bad("a unix:// address needs an absolute path, e.g. unix:///run/miehisto/miehistod.sock"));
            }
            return Ok(DaemonAddr::Unix(PathBuf::from(p)));
        }
        let Some(rest) = url.strip_prefix("ssh://") else {
            if url.starts_with('/') {
                return Ok(DaemonAddr::Unix(PathBuf::from(url)));
            }
            return Err(bad("unknown scheme"));
        };
        let (authority, socket) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(PathBuf::from(&rest[i..]))),
            None => (rest, None),
        };
        if socket.as_ref().is_some_and(|s| s.as_os_str() == "/") {
            return Err(bad("the path after the host must be the remote socket, e.g. /run/miehisto/miehistod.sock"));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u.to_string()), h),
            None => (None, authority),
        };
        if let Some(u) = &user {
            if !ok_word(u) || u.contains(':') {
                return Err(bad("the user name may hold letters, digits, '.', '_' and '-' and may not start with '-'"));
            }
        }
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 address in [] has no closing ]"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("junk after the ]")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if !ok_word(&host) {
            return Err(bad("no host name, or one ssh would take for an option"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
            ),
        };
        Ok(DaemonAddr::Ssh(SshTarget {
            user,
            host,
            port,
            socket,
        }))
    }
}

/// Quotes one word for the remote login shell (ssh joins its remote
/// command into a single string that the shell splits again).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:,+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How to run ssh: the user's config by default.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// `-F FILE`.
    pub config: Option<PathBuf>,
    /// The mhctl to run on the remote host.
    pub remote_mhctl: Option<String>,
}

impl SshOptions {
    /// From `MIEHISTO_SSH_CONFIG` and `MIEHISTO_REMOTE_MHCTL`.
    pub fn from_env() -> SshOptions {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        SshOptions {
            config: var("MIEHISTO_SSH_CONFIG").map(PathBuf::from),
            remote_mhctl: var("MIEHISTO_REMOTE_MHCTL").map(|v| v.to_string_lossy().into_owned()),
        }
    }
}

impl SshTarget {
    /// The host name or address alone (what a TCP peer on that host is reached at).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The ssh argv (after the program) that runs `remote` words on the host.
    pub fn ssh_args(&self, opts: &SshOptions, remote: &[String]) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["-o".into(), "BatchMode=yes".into()];
        if let Some(c) = &opts.config {
            a.push("-F".into());
            a.push(c.clone().into_os_string());
        }
        if let Some(p) = self.port {
            a.push("-p".into());
            a.push(p.to_string().into());
        }
        if let Some(u) = &self.user {
            a.push("-l".into());
            a.push(u.into());
        }
        // No tty, no stdin games: the protocol runs over the pipes.
        a.push("-T".into());
        a.push("--".into());
        a.push(self.host.clone().into());
        a.push(
            remote
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" ")
                .into(),
        );
        a
    }

    /// `ssh ... HOST -- mhctl system dial-stdio [--socket S]`, stdio piped.
    pub fn dial_command(&self, opts: &SshOptions) -> Command {
        let mut remote = vec![
            opts.remote_mhctl
                .clone()
                .unwrap_or_else(|| DEFAULT_REMOTE_MHCTL.to_string()),
            "system".to_string(),
            "dial-stdio".to_string(),
        ];
        if let Some(s) = &self.socket {
            remote.push("--socket".into());
            remote.push(s.to_string_lossy().into_owned());
        }
        let mut c = Command::new(SSH);
        c.args(self.ssh_args(opts, &remote))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

/// `mhctl system dial-stdio`: connects to the daemon's socket and copies
/// stdin to it and it to stdout until both directions end.
pub fn dial_stdio(socket: &Path) -> Result<(), RemoteError> {
    let conn = UnixStream::connect(socket).map_err(|source| RemoteError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let up = conn.try_clone().map_err(|source| RemoteError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let path = socket.to_path_buf();
    let upstream = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stdin = std::io::stdin().lock();
        let mut w = &up;
        let r = std::io::copy(&mut stdin, &mut w);
        // The client is done sending: the daemon sees end of input and
        // closes after its last reply.
        let _ = up.shutdown(std::net::Shutdown::Write);
        r.map(drop)
    });
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 64 * 1024];
    let mut r = &conn;
    let down = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]).and_then(|_| out.flush()) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    // The daemon closed: stop reading stdin too (the thread may block in
    // read; the process exits right after).
    drop(upstream);
    down.map_err(|source| RemoteError::Copy { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssh(user: Option<&str>, host: &str, port: Option<u16>, sock: Option<&str>) -> DaemonAddr {
        DaemonAddr::Ssh(SshTarget {
            user: user.map(str::to_string),
            host: host.into(),
            port,
            socket: sock.map(PathBuf::from),
        })
    }

    #[test]
    fn urls_parse() {
        assert_eq!(
            DaemonAddr::parse("ssh://b").unwrap(),
            ssh(None, "b", None, None)
        );
        assert_eq!(
            DaemonAddr::parse("ssh://root@192.0.2.2:2222/tmp/x/miehistod.sock").unwrap(),
            ssh(
                Some("root"),
                "192.0.2.2",
                Some(2222),
                Some("/tmp/x/miehistod.sock")
            )
        );
        assert_eq!(
            DaemonAddr::parse("ssh://me@[2001:db8::1]:22").unwrap(),
            ssh(Some("me"), "2001:db8::1", Some(22), None)
        );
        assert_eq!(
            DaemonAddr::parse("unix:///run/m.sock").unwrap(),
            DaemonAddr::Unix("/run/m.sock".into())
        );
        for bad in [
            "ssh://",
            "ssh://-oProxyCommand=x",
            "ssh://h:0",
            "ssh://h:99999",
            "ssh://h:x",
            "ssh://-l@h",
            "tcp://h:1",
            "unix://rel",
            "ssh://h/",
        ] {
            let e = DaemonAddr::parse(bad).unwrap_err().to_string();
            assert!(e.contains("is not a daemon address"), "{bad}: {e}");
        }
        let t = "ssh://root@192.0.2.2:2222/tmp/s.sock";
        assert_eq!(DaemonAddr::parse(t).unwrap().to_string(), t);
    }

    #[test]
    fn the_remote_command_is_quoted_for_the_shell() {
        assert_eq!(shell_quote("/usr/bin/mhctl"), "/usr/bin/mhctl");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        let DaemonAddr::Ssh(t) = DaemonAddr::parse("ssh://u@h:2/s p.sock").unwrap() else {
            panic!()
        };
        let args: Vec<String> = t
            .ssh_args(&SshOptions::default(), &["mhctl".into(), "x y".into()])
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-o",
                "BatchMode=yes",
                "-p",
                "2",
                "-l",
                "u",
                "-T",
                "--",
                "h",
                "mhctl 'x y'"
            ]
        );
    }
}

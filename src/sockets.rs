//! The service's listening sockets, for on-demand start: which TCP sockets
//! a tree holds bound at its stop point (recorded in the image), and the
//! waiting listener the daemon holds on the same address while no process
//! of the service runs.
//!
//! # The hand-over
//! The image is taken right before `listen(2)`, so the service's socket is
//! *bound* in the image, not listening. At the stop point the prebake takes
//! a `pidfd_getfd(2)` copy of each bound TCP socket, sets `SO_REUSEPORT` on
//! it (the option lives on the socket, so the dump records it) and notes
//! its address. While the service is at zero the daemon listens on that
//! address with its own socket, also `SO_REUSEPORT`, same owner (root):
//! clients connect, the kernel completes their handshakes and queues them
//! on the daemon's socket, which never accepts them. On the first one the
//! daemon restores the image: CRIU binds the image's socket beside the
//! daemon's (allowed: both reuseport, same uid), the restored service calls
//! its `listen()` and joins the daemon's reuseport group. The daemon then
//! closes its socket, and the kernel *migrates* the queued connections to
//! the service's listener (`reuseport_migrate_sock`): the service accepts
//! the clients' own connections, no proxy, none refused or reset.
//!
//! Migration is off by default (`net.ipv4.tcp_migrate_req=0`, per network
//! namespace). Instead of flipping that sysctl, the daemon attaches to the
//! group a small BPF program of attach type
//! `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, which turns migration on for that
//! group only (the kernel consults the program before the sysctl), and
//! *steers*: while the daemon's listener is open every new connection and
//! every migrating one goes to it (a one-slot sockarray holds it); once it
//! is closed the slot is empty and the kernel picks by hash as without a
//! program. That is what makes going back to zero lossless: the daemon
//! listens beside the idle service, from then on no new client reaches
//! the service, and the service is stopped only once the connections it
//! already has are done.

use crate::sys;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("cannot open a pidfd for process {pid}")]
    Pidfd {
        pid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot copy fd {fd} of process {pid} (pidfd_getfd)")]
    GetFd {
        pid: i32,
        fd: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot set SO_REUSEPORT on fd {fd} of process {pid} ({addr})")]
    ReusePort {
        pid: i32,
        fd: i32,
        addr: SocketAddr,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot load the reuseport migration BPF program (needs CAP_BPF, Linux >= 5.14)")]
    Bpf(#[source] nix::errno::Errno),
    #[error("cannot {step} the waiting listener on {addr}")]
    Listen {
        addr: SocketAddr,
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
}

/// A TCP socket the tree held bound (and, at a `listen` stop, not yet
/// listening) at its stop point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoundSocket {
    pub addr: SocketAddr,
    /// Host pid of the process that held it, and its fd there, at the stop.
    pub pid: i32,
    pub fd: i32,
    /// Already listening at the stop point (e.g. a stop at a later call).
    pub listening: bool,
    /// `SO_REUSEPORT` is set, so the daemon can listen beside it.
    pub reuseport: bool,
    /// `IPV6_V6ONLY` of an IPv6 socket: `Some(false)` is dual-stack (the
    /// Linux default), which IPv4 clients reach too, so the daemon's socket
    /// must be dual-stack as well. None for IPv4 and in older images (the
    /// daemon then listens IPv6-only, as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v6only: Option<bool>,
}

/// The socket inodes among `/proc/<pid>/fd`, as (fd, inode).
fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut v: Vec<(i32, u64)> = rd
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let ino = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, ino))
        })
        .collect();
    v.sort();
    v
}

fn to_std(ss: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = ss.as_sockaddr_in() {
        return Some(SocketAddr::new(IpAddr::V4(a.ip()), a.port()));
    }
    if let Some(a) = ss.as_sockaddr_in6() {
        return Some(SocketAddr::new(IpAddr::V6(a.ip()), a.port()));
    }
    None
}

/// The TCP sockets with a local port that the processes `pids` (host pids,
/// a stopped tree) hold, each once. With `set_reuseport`, sets
/// `SO_REUSEPORT` on each through a `pidfd_getfd` copy, so the image
/// carries it.
pub fn scan_bound(pids: &[i32], set_reuseport: bool) -> Result<Vec<BoundSocket>, SocketsError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &pid in pids {
        let fds = socket_fds(pid);
        if fds.is_empty() {
            continue;
        }
        let pidfd = sys::pidfd_open(pid).map_err(|source| SocketsError::Pidfd { pid, source })?;
        for (fd, ino) in fds {
            if !seen.insert(ino) {
                continue;
            }
            let copy = sys::pidfd_getfd(pidfd.as_raw_fd(), fd)
                .map_err(|source| SocketsError::GetFd { pid, fd, source })?;
            if socket::getsockopt(&copy, sockopt::SockType) != Ok(SockType::Stream) {
                continue;
            }
            let Some(addr) = socket::getsockname::<SockaddrStorage>(copy.as_raw_fd())
                .ok()
                .as_ref()
                .and_then(to_std)
            else {
                continue;
            };
            if addr.port() == 0 {
                continue;
            }
            // A connected socket is no server's: skip it.
            if socket::getpeername::<SockaddrStorage>(copy.as_raw_fd()).is_ok() {
                continue;
            }
            let listening = socket::getsockopt(&copy, sockopt::AcceptConn).unwrap_or(false);
            let mut reuseport = socket::getsockopt(&copy, sockopt::ReusePort).unwrap_or(false);
            if set_reuseport && !reuseport {
                socket::setsockopt(&copy, sockopt::ReusePort, &true).map_err(|source| {
                    SocketsError::ReusePort {
                        pid,
                        fd,
                        addr,
                        source,
                    }
                })?;
                reuseport = true;
            }
            let v6only = if addr.is_ipv6() {
                socket::getsockopt(&copy, sockopt::Ipv6V6Only).ok()
            } else {
                None
            };
            out.push(BoundSocket {
                addr,
                pid,
                fd,
                listening,
                reuseport,
                v6only,
            });
        }
    }
    Ok(out)
}

/// The daemon's socket on a service's address while the service is at
/// zero: listening, never accepting (clients wait in its queue), in one
/// reuseport group with the service's socket, migration on.
#[derive(Debug)]
pub struct WaitingListener {
    pub addr: SocketAddr,
    fd: OwnedFd,
    inode: u64,
}

/// Accept queue of the waiting listener (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;

impl WaitingListener {
    /// `v6only` (IPv6 only): whether the service's socket there is IPv6-only;
    /// a dual-stack one gets a dual-stack listener, in the same reuseport
    /// group, that IPv4 clients reach too.
    pub fn open(addr: SocketAddr, v6only: bool) -> Result<WaitingListener, SocketsError> {
        let err = |step| move |source| SocketsError::Listen { addr, step, source };
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let fd = socket::socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(err("create"))?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err("set SO_REUSEADDR on"))?;
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(err("set SO_REUSEPORT on"))?;
        if addr.is_ipv6() {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)
                .map_err(err("set IPV6_V6ONLY on"))?;
        }
        let map = sys::bpf_reuseport_sockarray().map_err(SocketsError::Bpf)?;
        let prog = sys::bpf_load_reuseport_steer(map.as_raw_fd()).map_err(SocketsError::Bpf)?;
        let sa = SockaddrStorage::from(addr);
        socket::bind(fd.as_raw_fd(), &sa).map_err(err("bind"))?;
        let backlog = socket::Backlog::new(BACKLOG).unwrap_or(socket::Backlog::MAXCONN);
        socket::listen(&fd, backlog).map_err(err("listen on"))?;
        // After listen: a listener joining a group that exists (the running
        // service's) leaves behind the group it had, and a program attached
        // to that one with it (`reuseport_add_sock`); attached now, the
        // program replaces the group's. The group keeps it (and it the
        // map), so our copies of both fds can go.
        sys::attach_reuseport_prog(fd.as_raw_fd(), prog.as_raw_fd())
            .map_err(err("attach the steering program to"))?;
        sys::bpf_sockarray_set(map.as_raw_fd(), fd.as_raw_fd())
            .map_err(err("steer new connections to"))?;
        drop((prog, map));
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map(|m| m.ino())
            .unwrap_or(0);
        Ok(WaitingListener { addr, fd, inode })
    }

    /// The socket's inode (as `/proc/net/tcp` shows it).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Waits up to `timeout` for a queued connection; true if one is there.
    pub fn wait_pending(&self, timeout: Duration) -> bool {
        wait_any(std::slice::from_ref(self), timeout)
    }

    /// Accepts every queued connection and closes it: the answer to clients
    /// when the service cannot be started. Returns how many there were.
    pub fn refuse_pending(&self) -> usize {
        let mut n = 0;
        while let Ok(c) = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            sys::close(c);
            n += 1;
        }
        n
    }
}

/// Waits up to `timeout` for a connection queued on any of `ls`.
pub fn wait_any(ls: &[WaitingListener], timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    if ls.is_empty() {
        std::thread::sleep(timeout);
        return false;
    }
    let mut fds: Vec<PollFd> = ls
        .iter()
        .map(|l| PollFd::new(l.fd.as_fd(), PollFlags::POLLIN))
        .collect();
    let ms =
        PollTimeout::try_from(timeout.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::NONE);
    matches!(poll(&mut fds, ms), Ok(n) if n > 0)
}

/// One line of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRow {
    pub local: SocketAddr,
    pub state: u8,
    pub inode: u64,
}

/// TCP states as `/proc/net/tcp` numbers them (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LISTEN: u8 = 10;

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The address is printed as 32-bit words in host byte order.
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub fn parse_tcp_table(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            Some(TcpRow {
                local: parse_addr(f[1])?,
                state: u8::from_str_radix(f[3], 16).ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The TCP sockets of the network namespace of `pid` (None: ours).
pub fn tcp_table(pid: Option<i32>) -> Vec<TcpRow> {
    let base = match pid {
        Some(p) => format!("/proc/{p}/net"),
        None => "/proc/net".to_string(),
    };
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|f| {
            parse_tcp_table(&std::fs::read_to_string(format!("{base}/{f}")).unwrap_or_default())
        })
        .collect()
}

/// Is a socket other than `own_inode` listening on `addr`?
pub fn listening_elsewhere(rows: &[TcpRow], addr: SocketAddr, own_inode: u64) -> bool {
    rows.iter()
        .any(|r| r.state == TCP_LISTEN && r.local == addr && r.inode != own_inode)
}

/// Client connections open on the server side of `ports`: established,
/// half-open or closed by the client but not yet by the server (queued and
/// unaccepted ones included).
pub fn open_connections(rows: &[TcpRow], ports: &[u16]) -> usize {
    rows.iter()
        .filter(|r| {
            matches!(r.state, TCP_ESTABLISHED | TCP_SYN_RECV | TCP_CLOSE_WAIT)
                && ports.contains(&r.local.port())
        })
        .count()
}

/// Whether the socket fd `fd` of `pid` listens (SO_ACCEPTCONN).
pub fn fd_listening(pid: i32, fd: i32) -> bool {
    let Ok(pidfd) = sys::pidfd_open(pid) else {
        return false;
    };
    let Ok(copy) = sys::pidfd_getfd(pidfd.as_raw_fd(), fd) else {
        return false;
    };
    socket::getsockopt(&copy, sockopt::AcceptConn).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0700007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let rows = parse_tcp_table(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(rows[0].state, TCP_LISTEN);
        assert_eq!(rows[0].inode, 12345);
        assert!(listening_elsewhere(&rows, rows[0].local, 1));
        assert!(!listening_elsewhere(&rows, rows[0].local, 12345));
        assert_eq!(open_connections(&rows, &[8080]), 1);
        assert_eq!(open_connections(&rows, &[8081]), 0);
        let v6 = "h\n 0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 9 1\n";
        let r6 = parse_tcp_table(v6);
        assert_eq!(r6[0].local, "[::1]:80".parse().unwrap());
    }
}

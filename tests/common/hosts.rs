//! Two hosts on one machine, for the fleet tests: two network namespaces
//! joined by a veth pair, each with its own `miehistod`, state directory
//! and socket, and (on request) a real `sshd` in host B's namespace.
//!
//! Addresses: 192.0.2.1/24 (host A) and 192.0.2.2/24 (host B), from
//! TEST-NET-1 (RFC 5737, documentation only). They exist only inside the
//! two namespaces this guard creates, so traffic to them never leaves the
//! machine; several test processes can use the same addresses at once,
//! each pair of namespaces being its own little network.
//!
//! Names are `mh<pid>n<k>a` / `...b` (namespaces and veth ends alike), so
//! they are unique per test process and never touch another run's.
//! Everything is torn down on drop, panics included: every process whose
//! network namespace is one of ours is killed (the daemons, sshd, CRIU page
//! servers, and the services, which outlive their daemon by design), then
//! the namespaces are deleted, which deletes the veth pair.
//!
//! Processes enter a namespace with `nsenter --net=/run/netns/NAME`, which
//! changes the network namespace only: `ip netns exec` would also make a
//! new mount namespace with its own /sys, and the sandboxes runmh builds
//! (and CRIU's mount checks) should see the host's mount tree as in
//! production. Sockets are opened in a namespace from a thread that
//! `setns(2)`s into it (the namespace of a socket is the one its creator
//! was in).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// sshd's port inside host B's namespace (no other process can hold it there).
pub const SSH_PORT: u16 = 2222;

static PAIRS: AtomicU32 = AtomicU32::new(0);

pub use super::daemon::{mhctl_bin, miehistod_bin};
use super::daemon::{spawn_daemon, Mhctl};

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What the fleet tests need besides root and CRIU: None when all is there.
pub fn missing_tools() -> Option<String> {
    let need = [
        ("/usr/sbin/ip", "iproute2"),
        ("/usr/bin/nsenter", "util-linux"),
        ("/usr/sbin/sshd", "openssh-server"),
        ("/usr/bin/ssh", "openssh-client"),
        ("/usr/bin/ssh-keygen", "openssh-client"),
    ];
    super::missing_programs(&need)
}

/// One host: a network namespace, its address and its daemon.
pub struct Host {
    pub label: char,
    pub netns: String,
    pub veth: String,
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    daemon: Option<Child>,
    starts: u32,
}

impl Host {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// `prog` run inside this host's network namespace.
    pub fn command(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("/usr/bin/nsenter");
        c.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(prog);
        c
    }

    pub fn daemon_log(&self) -> PathBuf {
        self.dir.join(format!("daemon-{}.log", self.starts))
    }

    /// Starts this host's miehistod (in its namespace) and waits until it answers.
    pub fn start_daemon(&mut self) {
        assert!(
            self.daemon.is_none(),
            "host {}: a daemon runs already",
            self.label
        );
        self.starts += 1;
        let mut c = self.command(miehistod_bin());
        c.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state);
        let child = spawn_daemon(c, &self.daemon_log(), || {
            self.mhctl(&["ping"]).status.success()
        });
        self.daemon = Some(child);
    }

    /// Runs `f` on a thread inside this host's network namespace.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let ns = std::fs::File::open(self.netns_path())?;
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// One HTTP/1.0 GET from this host to `addr:port`: (status, body).
    pub fn http_get(
        &self,
        addr: Ipv4Addr,
        port: u16,
        path: &str,
    ) -> std::io::Result<(u16, String)> {
        let path = path.to_string();
        self.within(move || {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((addr, port)),
                Duration::from_millis(500),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(super::parse_http(&buf))
        })
    }

    /// Polls until a GET from this host to `addr:port` answers 200.
    pub fn wait_http(
        &self,
        addr: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<String, String> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < timeout {
            match self.http_get(addr, port, "/") {
                Ok((200, body)) => return Ok(body),
                Ok((c, _)) => last = format!("status {c}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "host {}: no HTTP 200 from {addr}:{port} within {timeout:?}: {last}",
            self.label
        ))
    }

    /// Polls until `addr:port` accepts a TCP connection from this host.
    pub fn wait_tcp(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        let mut last = String::new();
        while t0.elapsed() < timeout {
            match self.within(move || {
                TcpStream::connect_timeout(
                    &SocketAddr::from((addr, port)),
                    Duration::from_millis(500),
                )
            }) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "host {}: {addr}:{port} did not accept within {timeout:?}: {last}",
            self.label
        ))
    }

    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let pid = miehisto::sys::child_pid(&child);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if super::wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// An sshd in host B's namespace, with keys and files made by the test.
pub struct Sshd {
    pub dir: PathBuf,
    /// An ssh_config(5) file for the client: key, known_hosts, strict checking.
    pub client_config: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

/// Both hosts; dropping it tears everything down.
pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
    pub dir: PathBuf,
    pub sshd: Option<Sshd>,
    netns_inodes: Vec<u64>,
}

impl TwoHosts {
    /// Creates the namespaces, the veth pair and the addresses (no daemons yet).
    pub fn new() -> TwoHosts {
        let k = PAIRS.fetch_add(1, Ordering::SeqCst);
        let base = format!("mh{}n{k}", std::process::id());
        assert!(base.len() < 15, "interface name {base}a too long");
        // Short: runmh's control sockets under the state dirs must fit a
        // UNIX socket path.
        let dir = std::env::temp_dir().join(&base);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("hosts dir");
        let host = |label: char, addr: Ipv4Addr| {
            let hdir = dir.join(label.to_string());
            std::fs::create_dir_all(&hdir).expect("host dir");
            Host {
                label,
                netns: format!("{base}{label}"),
                veth: format!("{base}{label}"),
                addr,
                socket: hdir.join("miehistod.sock"),
                state: hdir.join("state"),
                dir: hdir,
                daemon: None,
                starts: 0,
            }
        };
        let mut me = TwoHosts {
            a: host('a', ADDR_A),
            b: host('b', ADDR_B),
            dir,
            sshd: None,
            netns_inodes: Vec::new(),
        };
        if let Err(e) = me.plumb() {
            // Drop deletes whatever was made before the failure.
            panic!("cannot set up the two test hosts: {e}");
        }
        me
    }

    fn plumb(&mut self) -> Result<(), String> {
        for h in [&self.a, &self.b] {
            run(Command::new("/usr/sbin/ip").args(["netns", "add", &h.netns]))?;
            let ino = std::fs::metadata(h.netns_path())
                .map_err(|e| format!("{}: {e}", h.netns_path().display()))?
                .ino();
            self.netns_inodes.push(ino);
        }
        let (a, b) = (&self.a, &self.b);
        run(Command::new("/usr/sbin/ip").args([
            "-n", &a.netns, "link", "add", &a.veth, "type", "veth", "peer", "name", &b.veth,
            "netns", &b.netns,
        ]))?;
        for h in [a, b] {
            // CRIU needs a working loopback in the namespace it runs in.
            run(Command::new("/usr/sbin/ip").args(["-n", &h.netns, "link", "set", "lo", "up"]))?;
            run(Command::new("/usr/sbin/ip").args([
                "-n",
                &h.netns,
                "addr",
                "add",
                &format!("{}/24", h.addr),
                "dev",
                &h.veth,
            ]))?;
            run(Command::new("/usr/sbin/ip").args(["-n", &h.netns, "link", "set", &h.veth, "up"]))?;
        }
        Ok(())
    }

    /// Starts both daemons.
    pub fn start_daemons(&mut self) {
        self.a.start_daemon();
        self.b.start_daemon();
    }

    /// Starts sshd in host B's namespace on [`SSH_PORT`], with a host key,
    /// a client key in its authorized_keys and a known_hosts file for the
    /// client, all made here; waits until it accepts connections from A.
    pub fn start_sshd(&mut self) -> &Sshd {
        let dir = self.dir.join("ssh");
        std::fs::create_dir_all(&dir).expect("ssh dir");
        let keygen = |path: &Path| {
            run(Command::new("/usr/bin/ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "miehisto-test", "-f"])
                .arg(path))
            .expect("ssh-keygen");
        };
        let host_key = dir.join("host_ed25519");
        let client_key = dir.join("client_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        let authorized = dir.join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
        let host_pub = super::read(&host_key.with_extension("pub"));
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = (
            fields.next().expect("host key type"),
            fields.next().expect("host key"),
        );
        let known = dir.join("known_hosts");
        std::fs::write(
            &known,
            format!("[{}]:{SSH_PORT} {kind} {key}\n", self.b.addr),
        )
        .expect("known_hosts");
        let config = dir.join("sshd_config");
        // StrictModes off: the files live under /tmp (world-writable), which
        // sshd's ownership walk refuses. No PAM, no passwords: key only.
        std::fs::write(
            &config,
            format!(
                "Port {SSH_PORT}\nListenAddress {addr}\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
                 PidFile {pid}\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nAllowTcpForwarding no\nX11Forwarding no\nPrintMotd no\n\
                 LogLevel VERBOSE\n",
                addr = self.b.addr,
                hk = host_key.display(),
                ak = authorized.display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .expect("sshd_config");
        let client_config = dir.join("ssh_config");
        std::fs::write(
            &client_config,
            format!(
                "Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n  \
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n  \
                 ConnectTimeout 10\n",
                key = client_key.display(),
                known = known.display(),
            ),
        )
        .expect("ssh_config");
        // sshd's privilege-separation directory is compiled in; Debian's
        // unit file creates it at boot, which never ran here.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let log = std::fs::File::create(dir.join("sshd.log")).expect("sshd log");
        let child = self
            .b
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("sshd log"))
            .stderr(log)
            .spawn()
            .expect("spawn sshd");
        self.sshd = Some(Sshd {
            dir: dir.clone(),
            client_config,
            port: SSH_PORT,
            child: Some(child),
        });
        if let Err(e) = self
            .a
            .wait_tcp(self.b.addr, SSH_PORT, Duration::from_secs(10))
        {
            panic!(
                "sshd did not come up: {e}: {}",
                super::read(&dir.join("sshd.log"))
            );
        }
        self.sshd.as_ref().expect("sshd")
    }

    /// `ssh://root@B:PORT/B's socket`, the URL mhctl on A uses for host B.
    pub fn b_url(&self) -> String {
        format!(
            "ssh://root@{}:{SSH_PORT}{}",
            self.b.addr,
            self.b.socket.display()
        )
    }

    /// mhctl on host A with the ssh settings the test made, and no
    /// --socket (add --host, or use A's socket for `service migrate`).
    pub fn mhctl_a_ssh(&self) -> Command {
        let mut c = self.a.command(mhctl_bin());
        c.stdin(Stdio::null());
        if let Some(s) = &self.sshd {
            c.env("MIEHISTO_SSH_CONFIG", &s.client_config);
        }
        c.env("MIEHISTO_REMOTE_MHCTL", mhctl_bin());
        c
    }

    /// The pids of every process in one of our namespaces.
    pub fn our_processes(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                if self.netns_inodes.contains(&m.ino()) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // The services first, while their daemons run to end their
        // instances (cgroups included).
        for h in [&self.a, &self.b]
            .into_iter()
            .filter(|h| h.daemon.is_some())
        {
            let left = super::kill_daemon_services(&h.state);
            if !left.is_empty() {
                eprintln!(
                    "teardown: host {}'s daemon did not end the instances {left:?}",
                    h.label
                );
            }
        }
        self.a.stop_daemon();
        self.b.stop_daemon();
        if let Some(s) = &mut self.sshd {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Services outlive their daemon by design; everything left in our
        // namespaces is ours (the inode identifies the namespace).
        for _ in 0..50 {
            let left = self.our_processes();
            if left.is_empty() {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for h in [&self.a, &self.b] {
            if h.netns_path().exists() {
                if let Err(e) = run(Command::new("/usr/sbin/ip").args(["netns", "del", &h.netns])) {
                    eprintln!("teardown: {e}");
                }
            }
        }
        for h in [&self.a, &self.b] {
            super::remove_instance_cgroups(&h.state);
        }
        // Unmount checks: the state dirs must hold no mount after the test.
        for h in [&self.a, &self.b] {
            let left = super::mounts_under(&h.state);
            if !left.is_empty() {
                eprintln!(
                    "teardown: mounts left under {}: {left:?}",
                    h.state.display()
                );
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// mhctl on this host, in its namespace, talking to its own daemon.
impl Mhctl for Host {
    fn mhctl_cmd(&self) -> Command {
        let mut c = self.command(mhctl_bin());
        c.arg("--socket").arg(&self.socket);
        c
    }

    fn context(&self) -> String {
        format!("host {}: {}", self.label, super::read(&self.daemon_log()))
    }
}

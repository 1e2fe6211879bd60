//! On-demand services: the socket hand-over (no CRIU) and the daemon's
//! waiting → activating → running → idle cycle (real daemon, CRIU, HTTP).

mod common;

use miehisto::sockets::WaitingListener;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::case::Case;
use common::daemon::Mhctl;

/// A plain reuseport listener on `addr`, as a restored service has it.
fn service_socket(addr: SocketAddr) -> std::net::TcpListener {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    socket::setsockopt(&fd, sockopt::ReusePort, &true).expect("reuseport");
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).expect("bind beside the daemon");
    socket::listen(&fd, socket::Backlog::new(64).expect("backlog")).expect("listen");
    std::net::TcpListener::from(fd)
}

/// The socket tests need root (CAP_BPF for the steering program), not CRIU.
fn needs_bpf(test: &str) -> bool {
    common::require(
        test,
        (!nix::unistd::geteuid().is_root()).then(|| "root (CAP_BPF)".to_string()),
    )
}

/// `n` clients of `addr`, each having sent one line.
fn echo_clients(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("client {i}: {e}"));
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(format!("hello {i}\n").as_bytes()).unwrap();
            c
        })
        .collect()
}

/// The service accepts every client (migrated ones included), echoes its
/// line and closes; each client must get its line back.
fn echo_back(service: &std::net::TcpListener, clients: &mut [TcpStream]) {
    for _ in 0..clients.len() {
        let (mut s, _) = service.accept().expect("accept a migrated connection");
        let mut buf = [0u8; 32];
        let n = s.read(&mut buf).expect("read");
        s.write_all(&buf[..n]).expect("write");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut buf = String::new();
        c.read_to_string(&mut buf)
            .unwrap_or_else(|e| panic!("client {i} lost: {e}"));
        assert!(buf.starts_with("hello "), "client {i}: {buf:?}");
    }
}

#[test]
fn queued_connections_migrate_to_the_service() {
    if !needs_bpf("queued_connections_migrate_to_the_service") {
        return;
    }
    let _l = common::lock();
    let port = common::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let waiting = WaitingListener::open(addr, true).expect("waiting listener");
    let mut clients = echo_clients(addr, 50);
    assert!(waiting.wait_pending(Duration::from_secs(1)));
    let service = service_socket(addr);
    drop(waiting);
    echo_back(&service, &mut clients);
}

/// Going back to zero: once the daemon listens beside a running service,
/// no new client reaches the service (the steering program sends them all
/// to the daemon's queue), so the service can finish what it has and stop
/// without losing a client; and if it stays, closing the daemon's listener
/// hands the queue to it.
#[test]
fn new_connections_go_to_the_daemon_beside_a_running_service() {
    if !needs_bpf("new_connections_go_to_the_daemon_beside_a_running_service") {
        return;
    }
    let _l = common::lock();
    let port = common::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let service = service_socket(addr);
    service.set_nonblocking(true).expect("nonblocking");
    // Alone, the service gets its clients.
    let before = TcpStream::connect(addr).expect("client before the daemon listens");
    std::thread::sleep(Duration::from_millis(20));
    let (first, _) = service
        .accept()
        .expect("the service accepts its own client");
    drop((first, before));

    let waiting = WaitingListener::open(addr, true).expect("waiting listener beside the service");
    let mut clients = echo_clients(addr, 20);
    assert!(waiting.wait_pending(Duration::from_secs(1)));
    std::thread::sleep(Duration::from_millis(50));
    match service.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a client reached the service while the daemon listened: {other:?}"),
    }
    // The service stays after all: the daemon lets go, its queue migrates.
    drop(waiting);
    service.set_nonblocking(false).expect("blocking");
    echo_back(&service, &mut clients);
    // And with the daemon gone, new clients reach the service again.
    let _after = TcpStream::connect(addr).expect("client after the daemon left");
    service
        .set_nonblocking(false)
        .and_then(|()| service.accept())
        .expect("the service accepts clients again");
}

// ---- The daemon end to end ------------------------------------------------

/// One test's daemon, with a metrics endpoint, in a [`Case`] of its own.
fn start(tag: &str) -> Case {
    let mut c = Case::for_daemon(tag);
    let metrics = format!("--metrics=127.0.0.1:{}", common::free_port());
    c.start_daemon(&["--stop-timeout=2", &metrics]);
    c
}

impl Case {
    fn on_demand_state(&self, name: &str) -> String {
        self.service(name)["on_demand"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn wait_state(&self, name: &str, want: &str, timeout: Duration) {
        let t0 = Instant::now();
        loop {
            let s = self.on_demand_state(name);
            if s == want {
                return;
            }
            assert!(
                t0.elapsed() < timeout,
                "{name} is {s:?}, not {want:?}, after {timeout:?}: {}",
                self.service(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_on_demand(&self, name: &str, backend: &str, port: u16, idle: u64) {
        self.create_on_demand_with(name, backend, port, idle, &[]);
    }

    /// [`Case::create_on_demand`] with more `service create` switches.
    fn create_on_demand_with(
        &self,
        name: &str,
        backend: &str,
        port: u16,
        idle: u64,
        extra: &[&str],
    ) {
        let idle_text = idle.to_string();
        let mut options = vec![
            "--backend",
            backend,
            "--on-demand",
            "--idle-timeout",
            &idle_text,
        ];
        options.extend_from_slice(extra);
        let v = self.create_python(name, &options, port, &[]);
        assert_eq!(v["on_demand"]["idle_timeout_secs"], idle, "{v}");
    }

    /// SIGKILLs `name`'s supervisor (it cannot clean up) and insists the
    /// daemon ends its instance, cgroup included, while it runs on: this
    /// run's state dir going later would otherwise strand the empty cgroup
    /// under the hierarchy.
    fn kill_supervisor_and_expect_its_instance_gone(&self, name: &str) {
        let sup = self.service(name)["supervisor_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_else(|| panic!("{name} runs under a supervisor"));
        let (inst, _) = miehisto::instance::Instance::list(&self.state.join("runmh"))
            .into_iter()
            .find(|(_, r)| r.supervisor_pid == sup)
            .expect("the supervisor's instance");
        // None: no cgroup v2 hierarchy here, only the directory can be checked.
        let cgroup = miehisto::sandbox::cgroup::InstanceCgroup::locate(&inst.id).ok();
        let cgroup_left = || cgroup.as_ref().is_some_and(|c| c.path.exists());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sup),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the supervisor");
        let t0 = Instant::now();
        while (inst.dir.exists() || cgroup_left()) && t0.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !inst.dir.exists(),
            "the killed supervisor's instance {} is still there",
            inst.dir.display()
        );
        assert!(
            !cgroup_left(),
            "the killed supervisor's cgroup {cgroup:?} is still there"
        );
    }

    fn stdout_log(&self, name: &str) -> String {
        common::read(&self.state.join("logs").join(name).join("stdout.log"))
    }

    fn metrics(&self) -> String {
        let addr = self
            .daemon_args
            .iter()
            .find_map(|a| a.strip_prefix("--metrics="))
            .expect("the daemon serves metrics");
        let mut s = TcpStream::connect(addr).expect("metrics connect");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("metrics write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics read");
        text
    }
}

/// One HTTP/1.0 GET from source address `from` (any port); the status
/// line's code, or the error that ended the exchange.
fn get_from(from: [u8; 4], port: u16) -> Result<(u16, String), String> {
    get_paused(from, port, Duration::ZERO)
}

/// [`get_from`], sending the request `pause` after the connection is made.
fn get_paused(from: [u8; 4], port: u16, pause: Duration) -> Result<(u16, String), String> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let src: SocketAddr = (std::net::Ipv4Addr::from(from), 0).into();
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(src)).map_err(|e| format!("bind: {e}"))?;
    let dst: SocketAddr = ([127, 0, 0, 1], port).into();
    socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst))
        .map_err(|e| format!("connect: {e}"))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(pause);
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {buf:?} (closed without an answer)"))?;
    Ok((code, buf))
}

/// `n` clients at once; returns how many got no 200, with the reasons.
fn burst(n: usize, port: u16) -> Vec<String> {
    let threads: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || get_from([127, 0, 0, 1], port)))
        .collect();
    threads
        .into_iter()
        .filter_map(|t| match t.join() {
            Ok(Ok((200, _))) => None,
            Ok(Ok((c, b))) => Some(format!("status {c}: {b}")),
            Ok(Err(e)) => Some(e),
            Err(_) => Some("client thread panicked".into()),
        })
        .collect()
}

fn wait_zero(d: &Case, name: &str) {
    d.wait_state(name, "waiting", Duration::from_secs(60));
    let t0 = Instant::now();
    while !d.live_services().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "processes left at zero: {:?}",
            d.live_services()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn on_demand_cycle(backend: &str) {
    if !common::require_privileged(&format!("on_demand_cycle_{backend}")) {
        return;
    }
    let _l = common::lock();
    let d = start(&format!("od-{backend}"));
    let port = common::free_port();
    d.create_on_demand("web", backend, port, 2);
    assert_eq!(d.on_demand_state("web"), "no_image");
    let img = d.json(&["service", "prebake", "web"]);
    assert_eq!(img["generation"], 1);
    // The image records the socket bound at the stop point.
    let inspect = d.json(&["image", "inspect", "web"]);
    let bound = &inspect["metadata"]["stop"]["bound"];
    assert_eq!(bound[0]["addr"], format!("127.0.0.1:{port}"), "{inspect}");
    assert_eq!(bound[0]["reuseport"], true, "{inspect}");
    assert!(d
        .ok(&["image", "inspect", "web"])
        .contains(&format!("127.0.0.1:{port}")));
    d.wait_state("web", "waiting", Duration::from_secs(10));
    assert!(d.live_services().is_empty(), "nothing runs while waiting");
    // --listen picks among the image's sockets; another address is refused.
    let other = format!("127.0.0.1:{}", common::free_port());
    let err = d.fails(&[
        "service",
        "set",
        "web",
        "--on-demand",
        "--idle-timeout",
        "2",
        "--listen",
        &other,
    ]);
    assert!(
        err.contains(&format!("--listen {other}")) && err.contains("holds no socket on"),
        "{err}"
    );
    let own = format!("127.0.0.1:{port}");
    d.ok(&[
        "service",
        "set",
        "web",
        "--on-demand",
        "--idle-timeout",
        "2",
        "--listen",
        &own,
    ]);
    d.wait_state("web", "waiting", Duration::from_secs(10));

    // Cycle 1: one client at zero, from 127.0.0.7.
    let (code, body) = get_from([127, 0, 0, 7], port).expect("the first client is answered");
    assert_eq!(code, 200, "{body}");
    let svc = d.service("web");
    assert_eq!(svc["state"], "running", "{svc}");
    assert_eq!(svc["generation"], 1);
    assert_eq!(svc["on_demand"]["activations"], 1, "{svc}");
    assert!(
        svc["on_demand"]["last_activation_ms"].as_f64().is_some(),
        "{svc}"
    );
    let log = d.stdout_log("web");
    assert!(
        log.lines()
            .any(|l| l.contains("request n=1 client=127.0.0.7")),
        "the service saw the client's own address: {log}"
    );
    wait_zero(&d, "web");

    // Cycles 2 and 3: a burst of 50 concurrent clients at zero, all answered.
    for cycle in 2..=3u64 {
        let lost = burst(50, port);
        assert!(
            lost.is_empty(),
            "cycle {cycle}: {} of 50 lost: {lost:?}",
            lost.len()
        );
        let svc = d.service("web");
        assert_eq!(svc["generation"], 1, "restored from the same generation");
        assert_eq!(svc["on_demand"]["activations"], cycle, "{svc}");
        wait_zero(&d, "web");
    }
    assert_eq!(
        d.json(&["image", "list", "web"])
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );

    let stats = d.json(&["service", "stats", "web"]);
    assert_eq!(stats["info"]["activations"], 3, "{stats}");
    assert_eq!(
        stats["latencies_ms"].as_array().map(|a| a.len()),
        Some(3),
        "{stats}"
    );
    assert!(
        stats["median_ms"].as_f64().is_some_and(|m| m > 0.0),
        "{stats}"
    );
    let m = d.metrics();
    assert!(
        m.contains("miehisto_ondemand_activations_total{service=\"web\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("miehisto_ondemand_activation_seconds_count{service=\"web\"} 3"),
        "{m}"
    );
    eprintln!("{backend}: activation latencies {}", stats["latencies_ms"]);
}

#[test]
fn on_demand_cycle_trace() {
    on_demand_cycle("trace");
}

#[test]
fn on_demand_cycle_notify() {
    on_demand_cycle("notify");
}

/// Clients that come right at the idle timeout, while the service is
/// being taken back to zero, are all answered: each one connects, waits a
/// little (so that the service has accepted it when the stop would come)
/// and only then sends its request. The pauses between clients sweep the
/// moment the idle timeout fires.
#[test]
fn clients_at_the_idle_edge_are_all_answered() {
    if !common::require_privileged("clients_at_the_idle_edge_are_all_answered") {
        return;
    }
    let _l = common::lock();
    let d = start("od-edge");
    let port = common::free_port();
    d.create_on_demand("edge", "trace", port, 1);
    d.ok(&["service", "prebake", "edge"]);
    d.wait_state("edge", "waiting", Duration::from_secs(10));
    let mut lost = Vec::new();
    for k in 0..14u64 {
        match get_slow(port, Duration::from_millis(150)) {
            Ok((200, _)) => {}
            Ok((c, b)) => lost.push(format!("client {k}: status {c}: {b}")),
            Err(e) => lost.push(format!("client {k}: {e}")),
        }
        // 0.85 s to 1.37 s after the last answer: around the moment the
        // 1 s idle timeout (counted in 100 ms ticks) takes the port back.
        std::thread::sleep(Duration::from_millis(850 + 40 * k));
    }
    // And clients that come exactly while the daemon takes the port back:
    // as soon as a second listener (the daemon's) shows beside the
    // running service, a burst of slow clients.
    for round in 0..3 {
        assert_eq!(get_slow(port, Duration::ZERO).map(|r| r.0), Ok(200));
        let t0 = Instant::now();
        while miehisto::sockets::tcp_table(None)
            .iter()
            .filter(|r| r.state == miehisto::sockets::TCP_LISTEN && r.local.port() == port)
            .count()
            < 2
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "round {round}: the daemon never took the port back"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let threads: Vec<_> = (0..10)
            .map(|_| std::thread::spawn(move || get_slow(port, Duration::from_millis(150))))
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            match t.join() {
                Ok(Ok((200, _))) => {}
                Ok(Ok((c, b))) => lost.push(format!("round {round} client {i}: status {c}: {b}")),
                Ok(Err(e)) => lost.push(format!("round {round} client {i}: {e}")),
                Err(_) => lost.push(format!("round {round} client {i}: thread panicked")),
            }
        }
    }
    let stats = d.json(&["service", "stats", "edge"]);
    let log = d.context();
    let went_back = log.matches("edge: no client connection for").count();
    let stayed = log.matches("the service stays").count();
    eprintln!(
        "idle edge: {} activation(s) for 14 + 3 x (1 + 10) clients; {went_back} time(s) idle, {stayed} of them kept by a client that came meanwhile",
        stats["info"]["activations"],
    );
    assert!(lost.is_empty(), "clients lost at the idle edge: {lost:?}");
    assert!(
        stats["info"]["activations"].as_u64() >= Some(2),
        "the service never went back to zero between clients: {stats}"
    );
}

/// A GET whose request is sent `pause` after the connection is made.
fn get_slow(port: u16, pause: Duration) -> Result<(u16, String), String> {
    get_paused([127, 0, 0, 1], port, pause)
}

/// A service run as another user (`-u nobody`: its own user namespace)
/// starts on demand too: the daemon's listener (root's) and the restored
/// socket must share one reuseport group, which the kernel allows only
/// between sockets of one owner.
#[test]
fn nonroot_service_on_demand() {
    if !common::require_privileged("nonroot_service_on_demand") {
        return;
    }
    let _l = common::lock();
    let d = start("od-nobody");
    let port = common::free_port();
    d.create_on_demand_with("low", "notify", port, 1, &["-u", "nobody"]);
    d.ok(&["service", "prebake", "low"]);
    d.wait_state("low", "waiting", Duration::from_secs(10));
    for cycle in 1..=2u64 {
        let lost = burst(10, port);
        assert!(lost.is_empty(), "cycle {cycle}: lost {lost:?}");
        let svc = d.service("low");
        let pid = svc["pid"].as_i64().expect("it runs");
        let status = common::read(std::path::Path::new(&format!("/proc/{pid}/status")));
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(uid, ["65534"; 4], "cycle {cycle}: {status}");
        assert_eq!(svc["on_demand"]["activations"], cycle, "{svc}");
        wait_zero(&d, "low");
    }
}

/// A service bound to `[::]` (dual-stack, the Linux default) is reached by
/// IPv4 clients too; at zero the daemon's listener must be dual-stack as
/// well, or IPv4 clients would be refused while the service waits.
#[test]
fn dual_stack_service_waits_for_ipv4_and_ipv6_clients() {
    if !common::require_privileged("dual_stack_service_waits_for_ipv4_and_ipv6_clients") {
        return;
    }
    let _l = common::lock();
    let d = start("od-dual");
    let port = common::free_port();
    let options = ["--backend", "trace", "--on-demand", "--idle-timeout", "1"];
    d.create_python("dual", &options, port, &["--bind", "::"]);
    d.ok(&["service", "prebake", "dual"]);
    let inspect = d.json(&["image", "inspect", "dual"]);
    let bound = &inspect["metadata"]["stop"]["bound"][0];
    assert_eq!(bound["addr"], format!("[::]:{port}"), "{inspect}");
    assert_eq!(bound["v6only"], false, "{inspect}");
    for (cycle, v6) in [(1u64, false), (2, true)] {
        d.wait_state("dual", "waiting", Duration::from_secs(30));
        let r = if v6 {
            TcpStream::connect(("::1", port))
        } else {
            TcpStream::connect(("127.0.0.1", port))
        }
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf)
        });
        let body = r.unwrap_or_else(|e| panic!("cycle {cycle} (IPv6 {v6}): {e}"));
        assert!(body.starts_with("HTTP/1.0 200"), "cycle {cycle}: {body}");
        let svc = d.service("dual");
        assert_eq!(svc["on_demand"]["activations"], cycle, "{svc}");
    }
    wait_zero(&d, "dual");
}

#[test]
fn failed_activation_closes_clients_and_keeps_the_image() {
    if !common::require_privileged("failed_activation_closes_clients_and_keeps_the_image") {
        return;
    }
    let _l = common::lock();
    let d = start("od-fail");
    let (good, bad) = (common::free_port(), common::free_port());
    d.create_on_demand("good", "trace", good, 60);
    d.create_on_demand("bad", "trace", bad, 60);
    d.ok(&["service", "prebake", "good"]);
    d.ok(&["service", "prebake", "bad"]);
    // Truncate the bad generation's memory pages.
    let gen = d.state.join("images/bad/1");
    let mut truncated = 0;
    for e in std::fs::read_dir(&gen).expect("generation dir").flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("pages-") && n.ends_with(".img") {
            std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .and_then(|f| f.set_len(4096))
                .expect("truncate pages");
            truncated += 1;
        }
    }
    assert!(truncated > 0, "no pages-*.img in {}", gen.display());
    d.wait_state("bad", "waiting", Duration::from_secs(10));
    d.wait_state("good", "waiting", Duration::from_secs(10));

    let r = get_from([127, 0, 0, 1], bad);
    assert!(
        r.is_err(),
        "a client of the broken service got an answer: {r:?}"
    );
    eprintln!("the client of the broken service: {r:?}");
    std::thread::sleep(Duration::from_millis(300));
    let stats = d.json(&["service", "stats", "bad"]);
    assert!(stats["info"]["failures"].as_u64() >= Some(1), "{stats}");
    assert!(
        stats["info"]["refused_connections"].as_u64() >= Some(1),
        "{stats}"
    );
    let why = stats["info"]["last_failure"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!why.is_empty(), "the failure is told: {stats}");
    eprintln!("the failed activation said: {why}");
    // The image is kept, the other service still starts on demand.
    let imgs = d.json(&["image", "list", "bad"]);
    assert_eq!(imgs.as_array().map(|a| a.len()), Some(1), "{imgs}");
    assert!(gen.join("pstree.img").is_file());
    let (code, _) = get_from([127, 0, 0, 1], good).expect("the good service answers");
    assert_eq!(code, 200);
    assert_eq!(d.service("good")["on_demand"]["activations"], 1);
    // Within the backoff a client is closed at once, without a restore.
    let failures = stats["info"]["failures"].as_u64();
    let t0 = Instant::now();
    let r = get_from([127, 0, 0, 1], bad);
    assert!(r.is_err(), "{r:?}");
    let st = d.json(&["service", "stats", "bad"]);
    eprintln!(
        "second client closed after {:?}, failures {} -> {}",
        t0.elapsed(),
        failures.unwrap_or(0),
        st["info"]["failures"]
    );
    assert!(d
        .metrics()
        .contains("miehisto_ondemand_activation_failures_total{service=\"bad\"}"));

    // The good service's supervisor killed outright (it cannot clean up):
    // the daemon ends its instance, cgroup included, while it runs on.
    d.kill_supervisor_and_expect_its_instance_gone("good");
}

#[test]
fn daemon_restart_rearms_waiting_and_keeps_running() {
    if !common::require_privileged("daemon_restart_rearms_waiting_and_keeps_running") {
        return;
    }
    let _l = common::lock();
    let mut d = start("od-restart");
    let (a, b) = (common::free_port(), common::free_port());
    d.create_on_demand("a", "trace", a, 3);
    d.create_on_demand("b", "notify", b, 300);
    d.ok(&["service", "prebake", "a"]);
    d.ok(&["service", "prebake", "b"]);
    d.wait_state("a", "waiting", Duration::from_secs(10));
    d.wait_state("b", "waiting", Duration::from_secs(10));
    // b is activated and must survive the restart.
    assert_eq!(get_from([127, 0, 0, 1], b).expect("b answers").0, 200);
    let pid_b = d.service("b")["pid"].as_i64().expect("b runs");
    d.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    d.restart_daemon();
    // The unserved gap of a: from the old daemon's exit to the port
    // accepting again.
    loop {
        if TcpStream::connect(("127.0.0.1", a)).is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "a never waits again"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "port of a unserved for {:?} across the daemon restart",
        t0.elapsed()
    );
    assert_eq!(
        d.service("b")["pid"].as_i64(),
        Some(pid_b),
        "b kept running"
    );
    assert_eq!(d.on_demand_state("b"), "running");
    assert_eq!(get_from([127, 0, 0, 1], a).expect("a answers").0, 200);
    assert_eq!(get_from([127, 0, 0, 1], b).expect("b answers").0, 200);
    wait_zero_one(&d, "a");
    // b's supervisor is no child of the new daemon (the old one started
    // it): killed, its instance still goes.
    d.kill_supervisor_and_expect_its_instance_gone("b");
}

/// `a` is back at zero (other services may still run).
fn wait_zero_one(d: &Case, name: &str) {
    d.wait_state(name, "waiting", Duration::from_secs(60));
    assert!(d.service(name)["pid"].is_null());
}

/// The process state letter of `pid` (`T`: stopped).
fn task_state(pid: i64) -> String {
    let stat = common::read(std::path::Path::new(&format!("/proc/{pid}/stat")));
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// Waits for a standby instance other than `not` to be held; its pid.
fn wait_standby(d: &Case, name: &str, not: Option<i64>) -> i64 {
    let t0 = Instant::now();
    loop {
        let svc = d.service(name);
        // The instance is held a moment before the controller has seen
        // its restore return.
        if svc["state"] == "standby"
            && svc["on_demand"]["state"] == "standby"
            && svc["pid"].as_i64() != not
        {
            if let Some(pid) = svc["pid"].as_i64() {
                return pid;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no new standby instance of {name}: {svc}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn standby_cycle(backend: &str) {
    if !common::require_privileged(&format!("standby_cycle_{backend}")) {
        return;
    }
    let _l = common::lock();
    let mut d = start(&format!("od-sb-{}", &backend[..1]));
    let port = common::free_port();
    d.create_on_demand_with("web", backend, port, 2, &["--standby"]);
    assert_eq!(d.service("web")["on_demand"]["standby"], true);
    d.ok(&["service", "prebake", "web"]);

    // A restored instance held at its stop point: stopped, never listened,
    // its memory told; the daemon serves the port beside it.
    let held = wait_standby(&d, "web", None);
    let svc = d.service("web");
    assert_eq!(svc["on_demand"]["state"], "standby", "{svc}");
    assert_eq!(svc["generation"], 1, "{svc}");
    assert!(
        svc["on_demand"]["standby_rss_kib"]
            .as_u64()
            .is_some_and(|k| k > 1024),
        "the standby's RSS is shown: {svc}"
    );
    assert!(
        d.ok(&["service", "list"]).contains("RSS"),
        "service list shows what the standby costs"
    );
    assert_eq!(task_state(held), "T", "the standby is held stopped");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let listeners = |pid: i64| {
        miehisto::sockets::tcp_table(i32::try_from(pid).ok())
            .iter()
            .filter(|r| r.local == addr && r.state == miehisto::sockets::TCP_LISTEN)
            .count()
    };
    assert_eq!(listeners(held), 1, "only the daemon listens on the port");

    // The first connection only resumes it: the same process answers.
    let (code, body) = get_from([127, 0, 0, 7], port).expect("the first client is answered");
    assert_eq!(code, 200, "{body}");
    let svc = d.service("web");
    assert_eq!(svc["state"], "running", "{svc}");
    assert_eq!(
        svc["pid"].as_i64(),
        Some(held),
        "resumed, not restored anew"
    );
    assert_eq!(svc["on_demand"]["activations"], 1, "{svc}");
    assert!(
        d.stdout_log("web")
            .lines()
            .any(|l| l.contains("request n=1 client=127.0.0.7")),
        "the service saw the client's own address"
    );

    // Idle: it is stopped and a new standby is made from the same image.
    let held2 = wait_standby(&d, "web", Some(held));
    assert_eq!(task_state(held2), "T");

    // 50 concurrent clients at the standby: all answered by one resume.
    let lost = burst(50, port);
    assert!(lost.is_empty(), "{} of 50 lost: {lost:?}", lost.len());
    let svc = d.service("web");
    assert_eq!(svc["pid"].as_i64(), Some(held2), "{svc}");
    assert_eq!(svc["on_demand"]["activations"], 2, "{svc}");

    let stats = d.json(&["service", "stats", "web"]);
    assert_eq!(stats["info"]["activations"], 2, "{stats}");
    assert_eq!(stats["info"]["failures"], 0, "{stats}");
    assert_eq!(
        stats["latencies_ms"].as_array().map(|a| a.len()),
        Some(2),
        "{stats}"
    );
    let m = d.metrics();
    assert!(
        m.contains("miehisto_ondemand_activations_total{service=\"web\"} 2"),
        "{m}"
    );
    eprintln!(
        "{backend} standby: activation latencies {}",
        stats["latencies_ms"]
    );

    // A daemon restart keeps the held standby and serves its port again.
    let held3 = wait_standby(&d, "web", Some(held2));
    d.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    d.restart_daemon();
    d.wait_state("web", "standby", Duration::from_secs(10));
    assert_eq!(d.service("web")["pid"].as_i64(), Some(held3));
    assert_eq!(get_from([127, 0, 0, 1], port).expect("answers").0, 200);
    assert_eq!(d.service("web")["pid"].as_i64(), Some(held3));

    // Made plain on-demand: no standby is kept, the port still waits.
    d.ok(&[
        "service",
        "set",
        "web",
        "--on-demand",
        "--idle-timeout",
        "1",
    ]);
    wait_zero(&d, "web");
}

#[test]
fn standby_cycle_trace() {
    standby_cycle("trace");
}

#[test]
fn standby_cycle_notify() {
    standby_cycle("notify");
}

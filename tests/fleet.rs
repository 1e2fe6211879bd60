//! Beyond one machine: two hosts (network namespaces joined by a veth
//! pair, each with its own miehistod), remote daemons over a real sshd,
//! and live migration of a running service with CRIU's page server.

mod common;

use common::daemon::Mhctl;
use common::hosts::{TwoHosts, ADDR_A, ADDR_B};
use std::time::Duration;

const PORT: u16 = 8080;

fn prerequisites(test: &str) -> bool {
    common::require_privileged(test) && common::require(test, common::hosts::missing_tools())
}

/// `service create NAME -- python3 http_server.py --port PORT --bind BIND`.
fn create_python(h: &common::hosts::Host, name: &str, bind: &str) {
    h.create_python(name, &[], PORT, &["--bind", bind]);
}

/// The harness itself: each host's daemon runs in its namespace, a service
/// prebaked and restored there (CRIU inside the namespace) answers on the
/// host's own address, and the hosts reach each other over the veth pair.
#[test]
fn two_hosts_each_restore_and_answer_across_the_veth() {
    if !prerequisites("two_hosts_each_restore_and_answer_across_the_veth") {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    for h in [&hosts.a, &hosts.b] {
        create_python(h, "web", "0.0.0.0");
        h.ok(&["service", "prebake", "web"]);
        h.ok(&["service", "start", "web"]);
        let s = h.find_service("web").expect("web listed");
        assert_eq!(s["state"], "running", "{s}");
        assert_eq!(s["started_from"], "restored", "{s}");
    }
    // Each answers on its own address, seen from the other host.
    let from_a = hosts
        .a
        .wait_http(ADDR_B, PORT, Duration::from_secs(10))
        .unwrap();
    let from_b = hosts
        .b
        .wait_http(ADDR_A, PORT, Duration::from_secs(10))
        .unwrap();
    assert!(from_a.starts_with("payload=python"), "{from_a}");
    assert!(from_b.starts_with("payload=python"), "{from_b}");
    // The namespaces really are separate: nothing listens on B's address
    // inside A, and host A does not own 192.0.2.2.
    assert!(hosts.a.http_get(ADDR_A, PORT, "/").is_ok());
    let pids = hosts.our_processes();
    assert!(!pids.is_empty());
    let netns = [hosts.a.netns.clone(), hosts.b.netns.clone()];
    drop(hosts);
    for ns in netns {
        assert!(
            !std::path::Path::new("/run/netns").join(&ns).exists(),
            "{ns} left behind"
        );
    }
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/ns/net")).exists(),
            "pid {pid} survived the teardown"
        );
    }
}

/// Runs mhctl on host A against host B through ssh; returns the output.
fn a_to_b(hosts: &TwoHosts, args: &[&str]) -> std::process::Output {
    hosts
        .mhctl_a_ssh()
        .arg("--host")
        .arg(hosts.b_url())
        .args(args)
        .output()
        .expect("run mhctl --host")
}

fn a_to_b_ok(hosts: &TwoHosts, args: &[&str]) -> String {
    let out = a_to_b(hosts, args);
    assert!(
        out.status.success(),
        "mhctl --host {} {args:?} failed ({}): {}{}\nsshd: {}\ndaemon b: {}",
        hosts.b_url(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        hosts
            .sshd
            .as_ref()
            .map(|s| common::read(&s.dir.join("sshd.log")))
            .unwrap_or_default(),
        common::read(&hosts.b.daemon_log()),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mhctl --host ssh://root@B:2222/SOCKET` from host A, through a real
/// sshd in B's namespace: create, prebake, start and list round-trip; the
/// service answers on B's address; B's daemon saw the requests come from a
/// local peer (the dial-stdio process ssh ran) whose credentials it checked.
#[test]
fn mhctl_host_ssh_round_trip() {
    if !prerequisites("mhctl_host_ssh_round_trip") {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    hosts.start_sshd();
    let create = common::daemon::python_service_args("web", &[], PORT, &["--bind", "0.0.0.0"]);
    a_to_b_ok(
        &hosts,
        &create.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let pong = a_to_b_ok(&hosts, &["ping"]);
    assert!(
        pong.contains(&hosts.b.state.display().to_string()),
        "{pong}"
    );
    a_to_b_ok(&hosts, &["service", "prebake", "web"]);
    let started = a_to_b_ok(&hosts, &["service", "start", "web"]);
    assert!(
        started.contains("restored from image generation 1"),
        "{started}"
    );
    let list = a_to_b_ok(&hosts, &["service", "--json", "list"]);
    let v: serde_json::Value = serde_json::from_str(&list).expect("json list");
    assert_eq!(v[0]["name"], "web", "{v}");
    assert_eq!(v[0]["state"], "running", "{v}");
    // The same service as B's local client sees it.
    assert_eq!(
        hosts.b.find_service("web").expect("listed on B")["pid"],
        v[0]["pid"]
    );
    // Nothing of it on A.
    assert!(hosts.a.find_service("web").is_none());
    let body = hosts
        .a
        .wait_http(ADDR_B, PORT, Duration::from_secs(10))
        .unwrap();
    assert!(body.starts_with("payload=python"), "{body}");
    let log = common::read(&hosts.b.daemon_log());
    assert!(log.contains("uid 0: service.prebake web"), "{log}");
    a_to_b_ok(&hosts, &["service", "stop", "web"]);
    assert_eq!(hosts.b.find_service("web").unwrap()["state"], "stopped");

    // A host key that is not in known_hosts is refused, never trusted.
    let sshd = hosts.sshd.as_ref().unwrap();
    let strict = sshd.dir.join("ssh_config.unknown");
    let cfg = common::read(&sshd.client_config).replace(
        &sshd.dir.join("known_hosts").display().to_string(),
        &sshd.dir.join("known_hosts.empty").display().to_string(),
    );
    std::fs::write(sshd.dir.join("known_hosts.empty"), "").unwrap();
    std::fs::write(&strict, cfg).unwrap();
    let mut c = hosts.a.command(common::hosts::mhctl_bin());
    c.env("MIEHISTO_SSH_CONFIG", &strict)
        .env("MIEHISTO_REMOTE_MHCTL", common::hosts::mhctl_bin())
        .args(["--host", &hosts.b_url(), "service", "list"])
        .stdin(std::process::Stdio::null());
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ssh to ssh://root@192.0.2.2") && err.contains("Host key verification failed"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

/// The count in the payload's `requests=N` answer.
fn requests_of(body: &str) -> u64 {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("requests="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no requests=N in {body:?}"))
}

/// A's daemon, ssh settings for B: `mhctl service migrate NAME --to B ...`.
fn migrate_cmd(hosts: &TwoHosts, name: &str, extra: &[&str]) -> std::process::Output {
    hosts
        .mhctl_a_ssh()
        .arg("--socket")
        .arg(&hosts.a.socket)
        .args(["service", "migrate", name, "--to", &hosts.b_url()])
        .args(extra)
        .output()
        .expect("run mhctl service migrate")
}

/// Creates `web` on A listening on `bind`, prebakes it, starts it from
/// the image and sends it three requests; returns its pid.
fn running_on_a(hosts: &TwoHosts, bind: &str) -> i64 {
    create_python(&hosts.a, "web", bind);
    hosts.a.ok(&["service", "prebake", "web"]);
    hosts.a.ok(&["service", "start", "web"]);
    for _ in 0..3 {
        hosts
            .a
            .wait_http(ADDR_A, PORT, Duration::from_secs(10))
            .unwrap();
    }
    let s = hosts.a.find_service("web").unwrap();
    assert_eq!(s["state"], "running", "{s}");
    s["pid"].as_i64().expect("pid")
}

/// Live migration of a running service: its pages go from A's dump
/// straight to a page server on B, B restores it and answers on B's
/// address with the state it had on A (the request counter goes on), and
/// only then is A's copy gone. The downtime is printed.
#[test]
fn service_migrate_moves_a_running_service_to_b() {
    if !prerequisites("service_migrate_moves_a_running_service_to_b") {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    hosts.start_sshd();
    let pid_a = running_on_a(&hosts, "0.0.0.0");
    let before = requests_of(
        &hosts
            .a
            .wait_http(ADDR_A, PORT, Duration::from_secs(5))
            .unwrap(),
    );
    let out = migrate_cmd(&hosts, "web", &["--probe-port", &PORT.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed ({}): {stdout}{}\ndaemon a: {}\ndaemon b: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        common::read(&hosts.a.daemon_log()),
        common::read(&hosts.b.daemon_log())
    );
    println!("{stdout}");
    let downtime: u64 = stdout
        .split("downtime ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no downtime printed: {stdout}"));
    assert!(downtime > 0, "{stdout}");
    assert!(stdout.contains("first answer at"), "{stdout}");
    // B runs it, from a new generation, and it kept its memory.
    let b = hosts.b.find_service("web").expect("web on B");
    assert_eq!(b["state"], "running", "{b}");
    assert_eq!(b["started_from"], "restored", "{b}");
    let body = hosts
        .a
        .wait_http(ADDR_B, PORT, Duration::from_secs(5))
        .unwrap();
    // One more than A served: mhctl's probe, the first answer on B.
    assert_eq!(requests_of(&body), before + 2, "{body}");
    // B's copy logs to B's log directory (its files handed to CRIU in
    // place of A's paths); A's log ends where A's copy stopped.
    let stdout_log = |h: &common::hosts::Host| common::read(&h.state.join("logs/web/stdout.log"));
    let last = format!("request n={} ", before + 2);
    let t0 = std::time::Instant::now();
    while !stdout_log(&hosts.b).contains(&last) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stdout_log(&hosts.b).contains(&last),
        "B's stdout.log lacks {last:?}: {}",
        stdout_log(&hosts.b)
    );
    assert!(
        !stdout_log(&hosts.a).contains(&format!("request n={} ", before + 1)),
        "A's stdout.log got B's requests: {}",
        stdout_log(&hosts.a)
    );
    // A's copy is gone, and A says where it went.
    let a = hosts.a.find_service("web").expect("web still known on A");
    assert_eq!(a["state"], "stopped", "{a}");
    assert!(
        a["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("migrated to ssh://"),
        "{a}"
    );
    let pid_a = i32::try_from(pid_a).unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid_a}/ns/net")).exists(),
        "A's copy (pid {pid_a}) still runs"
    );
    assert!(
        hosts.a.http_get(ADDR_A, PORT, "/").is_err(),
        "A still answers"
    );
}

/// A migration whose restore on B fails (the service listens on A's own
/// address, which B does not have, so CRIU cannot bind its socket there)
/// leaves A's copy running and answering, with its state, and says why.
#[test]
fn failed_restore_on_b_leaves_a_running_and_answering() {
    if !prerequisites("failed_restore_on_b_leaves_a_running_and_answering") {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    hosts.start_sshd();
    let pid_a = running_on_a(&hosts, &ADDR_A.to_string());
    let before = requests_of(
        &hosts
            .a
            .wait_http(ADDR_A, PORT, Duration::from_secs(5))
            .unwrap(),
    );
    let out = migrate_cmd(&hosts, "web", &["--probe-port", &PORT.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the migration should fail: {err}");
    assert!(
        err.contains("the restore on ssh://") && err.contains("runs on the source again"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let a = hosts.a.find_service("web").unwrap();
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(a["pid"].as_i64(), Some(pid_a), "{a}");
    let body = hosts
        .a
        .wait_http(ADDR_A, PORT, Duration::from_secs(10))
        .unwrap();
    assert_eq!(requests_of(&body), before + 1, "{body}");
    let b = hosts.b.find_service("web").expect("created on B");
    assert_eq!(b["state"], "stopped", "{b}");
    // Once more: A's copy still migrates out and back in (the supervisor
    // took it back whole).
    hosts.a.ok(&["service", "dump", "web", "--leave-running"]);
    hosts
        .a
        .wait_http(ADDR_A, PORT, Duration::from_secs(10))
        .unwrap();
}

/// `--pre-dump` needs the kernel's memory dirty tracking: here it is
/// refused with CRIU's reason before anything is dumped (when the kernel
/// has it, the refusal says the iterations are not built yet).
#[test]
fn pre_dump_is_refused_with_a_reason_and_nothing_moves() {
    if !prerequisites("pre_dump_is_refused_with_a_reason_and_nothing_moves") {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    hosts.start_sshd();
    let pid_a = running_on_a(&hosts, "0.0.0.0");
    let out = migrate_cmd(&hosts, "web", &["--pre-dump", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pre-dump"), "{err}");
    let a = hosts.a.find_service("web").unwrap();
    assert_eq!(a["pid"].as_i64(), Some(pid_a), "{a}");
    hosts
        .a
        .wait_http(ADDR_A, PORT, Duration::from_secs(10))
        .unwrap();
    // B forgets the service it created for an image that never came.
    assert!(
        hosts.b.find_service("web").is_none(),
        "B kept what it created for the refused migration: {:?}",
        hosts.b.find_service("web")
    );
}

/// The page server takes pages only from a dump holding this migration's
/// certificate: a dump presenting another migration's CA and key fails the
/// TLS handshake and nothing is written; this migration's goes through,
/// encrypted. Real CRIU on loopback, a sleeping process as the payload.
#[test]
fn page_server_takes_pages_only_over_this_migrations_tls() {
    use miehisto::migrate::{
        run_plain, DumpExtra, PageServerArgs, PageServerTarget, TlsFiles, TlsMaterial,
    };
    use std::process::{Command, Stdio};
    if !common::require_privileged("page_server_takes_pages_only_over_this_migrations_tls") {
        return;
    }
    let _l = common::lock();
    let criu = common::criu_path().expect("a CRIU");
    let dir = common::temp_dir("pstls");
    // setsid(1) execs in place (its caller is no group leader): the pid is
    // the sleeper's, alone in its session as CRIU wants a tree.
    let mut sleeper = Command::new("/usr/bin/setsid")
        .args(["/bin/sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the sleeper");
    std::thread::sleep(Duration::from_millis(200));
    let pid = sleeper.id().to_string();
    let ours = TlsMaterial::generate("127.0.0.1")
        .and_then(|m| m.write(&dir.join("tls-ours")))
        .expect("this migration's TLS");
    let theirs = TlsMaterial::generate("127.0.0.1")
        .and_then(|m| m.write(&dir.join("tls-theirs")))
        .expect("another migration's TLS");
    let pages = |d: &std::path::Path| -> usize {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
                    .count()
            })
            .unwrap_or(0)
    };
    // One page server (it takes one dump) and one dump with `tls`.
    let attempt = |tag: &str, tls: &TlsFiles| -> (bool, String, usize) {
        let ps = PageServerArgs {
            images_dir: dir.join(format!("received-{tag}")),
            work_dir: dir.join(format!("ps-{tag}")),
            log_name: "page-server.log".into(),
            address: "127.0.0.1".into(),
            port: common::free_port(),
            pidfile: dir.join(format!("ps-{tag}/pid")),
            tls: Some(ours.clone()),
        };
        for d in [&ps.images_dir, &ps.work_dir] {
            std::fs::create_dir_all(d).expect("page server dirs");
        }
        let server = ps.start(&criu, run_plain).expect("the page server starts");
        let out = dir.join(format!("dump-{tag}"));
        std::fs::create_dir_all(&out).expect("dump dir");
        let extra = DumpExtra {
            page_server: Some(PageServerTarget {
                address: ps.address.clone(),
                port: ps.port,
                tls: Some(tls.clone()),
            }),
            leave_stopped: false,
        };
        let ok = Command::new(&criu)
            .args(["dump", "-t", &pid, "-D"])
            .arg(&out)
            .arg("-W")
            .arg(&out)
            .args(["-o", "dump.log", "-v4", "--leave-running"])
            .args(extra.argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run criu dump")
            .success();
        // A page server that was refused may still wait for a dump.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server),
            nix::sys::signal::Signal::SIGKILL,
        );
        (
            ok,
            common::read(&out.join("dump.log")),
            pages(&ps.images_dir),
        )
    };

    let (ok, log, written) = attempt("theirs", &theirs);
    assert!(
        !ok,
        "a dump with another migration's CA went through: {log}"
    );
    assert!(log.contains("TLS") || log.contains("tls"), "{log}");
    assert_eq!(written, 0, "the page server wrote pages for a stranger");
    assert!(
        common::alive(i32::try_from(sleeper.id()).unwrap()),
        "the payload runs on"
    );

    let (ok, log, written) = attempt("ours", &ours);
    assert!(ok, "this migration's dump failed: {log}");
    assert!(log.contains("TLS handshake completed"), "{log}");
    assert!(written > 0, "no pages reached the page server");

    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

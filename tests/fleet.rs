//! Beyond one machine: two hosts (network namespaces joined by a veth
//! pair, each with its own miehistod), remote daemons over a real sshd,
//! and live migration of a running service with CRIU's page server.

mod common;

use common::hosts::{TwoHosts, ADDR_A, ADDR_B};
use std::time::Duration;

const PORT: u16 = 8080;

fn prerequisites(test: &str) -> bool {
    if !common::require_privileged(test) {
        return false;
    }
    if let Some(m) = common::hosts::missing_tools() {
        let msg = format!("{test}: needs {m}");
        if common::in_ci() {
            panic!("{msg} (CI=true: a missing prerequisite is a failure)");
        }
        eprintln!("SKIP {msg}");
        return false;
    }
    true
}

/// `service create NAME -- python3 http_server.py --port PORT --bind BIND`.
fn create_python(h: &common::hosts::Host, name: &str, bind: &str) {
    let py = common::python();
    let script = common::python_payload();
    h.ok(&[
        "service",
        "create",
        name,
        "--",
        &py.to_string_lossy(),
        &script.to_string_lossy(),
        "--port",
        &PORT.to_string(),
        "--bind",
        bind,
    ]);
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
        let s = h.service("web").expect("web listed");
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
    let py = common::python();
    let script = common::python_payload();
    let port = PORT.to_string();
    a_to_b_ok(
        &hosts,
        &[
            "service",
            "create",
            "web",
            "--",
            &py.to_string_lossy(),
            &script.to_string_lossy(),
            "--port",
            &port,
            "--bind",
            "0.0.0.0",
        ],
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
        hosts.b.service("web").expect("listed on B")["pid"],
        v[0]["pid"]
    );
    // Nothing of it on A.
    assert!(hosts.a.service("web").is_none());
    let body = hosts
        .a
        .wait_http(ADDR_B, PORT, Duration::from_secs(10))
        .unwrap();
    assert!(body.starts_with("payload=python"), "{body}");
    let log = common::read(&hosts.b.daemon_log());
    assert!(log.contains("uid 0: service.prebake web"), "{log}");
    a_to_b_ok(&hosts, &["service", "stop", "web"]);
    assert_eq!(hosts.b.service("web").unwrap()["state"], "stopped");

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

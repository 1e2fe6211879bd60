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

//! miehistod and mhctl end to end: a real daemon (a child process) on a
//! temporary socket and state directory, real runmh, real CRIU, a Python
//! HTTP server as the service.

mod common;

use common::case::Case;
use common::daemon::Mhctl;

use miehisto::images::Metadata;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

impl Case {
    fn create_web(&self, name: &str, backend: &str, port: u16) {
        let created = self.create_python(name, &["--backend", backend], port, &[]);
        assert_eq!(created["name"], name);
        assert_eq!(created["state"], "stopped");
        assert_eq!(created["backend"], backend);
    }

    fn images_dir(&self, name: &str) -> PathBuf {
        self.state.join("images").join(name)
    }
}

fn pid_of(v: &Value, key: &str) -> i32 {
    let n = v[key].as_i64().unwrap_or_else(|| panic!("no {key} in {v}"));
    i32::try_from(n).unwrap_or_else(|_| panic!("{key} in {v} is not a pid"))
}

/// The restored (or cold) service is miehistod → runmh → service.
fn assert_chain(c: &Case, svc: &Value) {
    let pid = pid_of(svc, "pid");
    let sup = pid_of(svc, "supervisor_pid");
    assert_eq!(
        common::ppid_of(pid),
        Some(sup),
        "the service's parent is its runmh: {svc}"
    );
    assert_eq!(common::comm_of(sup), "runmh", "the supervisor is runmh");
    assert_eq!(
        common::ppid_of(sup),
        Some(c.daemon_pid()),
        "runmh's parent is the daemon"
    );
}

fn wait_gone(pid: i32) {
    for _ in 0..1000 {
        if !common::alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("pid {pid} is still alive");
}

fn lifecycle(backend: &str) {
    // Short tags: runmh's control sockets live under the state directory,
    // and a UNIX socket path has at most 107 bytes.
    let mut c = Case::for_daemon(&format!("dl{backend}"));
    c.start_daemon(&[]);
    let port = common::free_port();
    c.create_web("web", backend, port);

    let img = c.json(&["service", "prebake", "web"]);
    assert_eq!(img["generation"], 1, "{img}");
    assert_eq!(img["backend"], backend, "{img}");
    assert_eq!(img["stop_syscall"], "listen", "{img}");
    assert_eq!(img["valid"], true, "{img}");
    Metadata::read(&c.images_dir("web").join("1")).expect("generation 1 is a valid image");
    assert_eq!(
        c.service("web")["state"],
        "stopped",
        "prebake leaves nothing running"
    );
    assert!(
        common::http_get(port, "/").is_err(),
        "nothing listens after the prebake"
    );

    let mut pids = Vec::new();
    for round in 1..=2 {
        let started = c.json(&["service", "start", "web"]);
        assert_eq!(started["state"], "running", "{started}");
        assert_eq!(started["started_from"], "restored", "{started}");
        assert_eq!(
            started["generation"], 1,
            "round {round} restores generation 1: {started}"
        );
        let body =
            common::wait_http(port, Duration::from_secs(20)).expect("the restored service answers");
        assert!(body.starts_with("payload=python pid=1 "), "{body}");
        let listed = c.service("web");
        assert_eq!(listed["pid"], started["pid"]);
        assert_chain(&c, &listed);
        pids.push(pid_of(&listed, "pid"));

        // A running service is not started twice, nor prebaked beside itself.
        let again = c.mhctl(&["service", "start", "web"]);
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("already running"),
            "{again:?}"
        );

        let stopped = c.json(&["service", "stop", "web"]);
        assert_eq!(stopped["state"], "stopped", "{stopped}");
        wait_gone(pids[round - 1]);
        assert!(
            common::http_get(port, "/").is_err(),
            "the stopped service no longer answers"
        );
    }
    assert_ne!(pids[0], pids[1], "the second start is a new restore");

    // Each restore replayed the held listen(2) once, successfully.
    let logs = c.ok(&["service", "logs", "web"]);
    assert_eq!(
        common::count_lines(&logs, "MHLOG python listen ret=0 errno=0"),
        2,
        "{logs}"
    );

    let gone = c.ok(&["service", "delete", "web"]);
    assert!(gone.contains("deleted web"), "{gone}");
    assert_eq!(c.json(&["service", "list"]), serde_json::json!([]));
    assert!(
        !c.images_dir("web").exists(),
        "the images went with the service"
    );
    assert!(c.live_services().is_empty());
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    assert!(
        !c.socket.exists(),
        "the daemon removes its socket on SIGTERM"
    );
    assert!(common::mounts_under(&c.dir).is_empty());
}

#[test]
fn lifecycle_trace() {
    let Some(_g) = common::privileged("lifecycle_trace") else {
        return;
    };
    lifecycle("trace");
}

#[test]
fn lifecycle_notify() {
    let Some(_g) = common::privileged("lifecycle_notify") else {
        return;
    };
    lifecycle("notify");
}

#[test]
fn daemon_restart_keeps_services() {
    let Some(_g) = common::privileged("daemon_restart_keeps_services") else {
        return;
    };
    let mut c = Case::for_daemon("drs");
    c.start_daemon(&[]);
    let port = common::free_port();
    c.create_web("web", "trace", port);
    c.ok(&["service", "prebake", "web"]);
    let started = c.json(&["service", "start", "web"]);
    common::wait_http(port, Duration::from_secs(20)).expect("the service answers");
    let pid = pid_of(&started, "pid");
    let sup = pid_of(&started, "supervisor_pid");

    // Poll the service all through two restarts: a clean one and a crash.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let poller = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0u32, Vec::new());
        while !flag.load(Ordering::Relaxed) {
            match common::http_get(port, "/") {
                Ok((200, _)) => ok += 1,
                other => failed.push(format!("{other:?}")),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, failed)
    });
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let old = c.daemon_pid();
        c.stop_daemon(sig);
        assert!(
            common::alive(pid) && common::alive(sup),
            "the service and its runmh outlive the daemon ({sig})"
        );
        c.start_daemon(&[]);
        assert_ne!(c.daemon_pid(), old);
        let listed = c.service("web");
        assert_eq!(listed["state"], "running", "after {sig}: {listed}");
        assert_eq!(pid_of(&listed, "pid"), pid, "the same service, taken back");
        assert_eq!(pid_of(&listed, "supervisor_pid"), sup);
        assert_eq!(listed["generation"], 1);
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = poller.join().expect("poller");
    assert!(
        failed.is_empty(),
        "the service failed to answer during the restarts: {failed:?}"
    );
    assert!(ok > 0, "the poller got answers");

    // The new daemon manages it as before.
    let img = c.json(&["service", "dump", "web", "--leave-running"]);
    assert_eq!(img["generation"], 2, "{img}");
    common::wait_http(port, Duration::from_secs(20))
        .expect("still answers after a dump that leaves it running");
    let stopped = c.json(&["service", "stop", "web"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    wait_gone(pid);
    wait_gone(sup);
    assert!(common::http_get(port, "/").is_err());
    assert!(c.live_services().is_empty());
    assert!(common::mounts_under(&c.dir).is_empty());
}

/// Sends raw bytes on a fresh connection; returns the reply lines read
/// until the daemon closes or `replies` lines arrived.
fn raw(socket: &Path, bytes: &[u8], replies: usize) -> Vec<Value> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    while out.len() < replies {
        let mut line = String::new();
        if r.read_line(&mut line).expect("read reply") == 0 {
            break;
        }
        out.push(
            serde_json::from_str(line.trim())
                .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}")),
        );
    }
    out
}

fn error_code(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "{v}");
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code: {v}"))
}

#[test]
fn refusals_and_bad_requests() {
    let Some(_g) = common::privileged("refusals_and_bad_requests") else {
        return;
    };
    let mut c = Case::for_daemon("drf");
    // The socket is opened to everyone so that only SO_PEERCRED decides.
    c.start_daemon(&["--socket-mode", "0666"]);
    let as_nobody = |c: &Case, args: &[&str]| -> Output { c.mhctl_as(NOBODY, args) };
    let out = as_nobody(&c, &["service", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("mhctl: error: permission denied: uid 65534"),
        "{err}"
    );
    assert!(err.contains("may not use miehistod"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");

    // Garbage on a connection gets an error reply, and the same connection
    // still serves a proper request.
    let replies = raw(&c.socket, b"{this is not json\n\xff\xfe\n[1]\n{\"v\":99,\"op\":\"ping\"}\n{\"v\":1,\"op\":\"service.stop\"}\n{\"v\":1,\"op\":\"ping\"}\n", 6);
    assert_eq!(replies.len(), 6, "{replies:?}");
    for (r, want) in replies.iter().zip([
        "bad_request",
        "bad_request",
        "bad_request",
        "unsupported_version",
        "bad_request",
    ]) {
        assert_eq!(error_code(r), want, "{r}");
    }
    assert!(
        replies[0]["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("malformed request"),
        "{}",
        replies[0]
    );
    assert_eq!(replies[5]["ok"], true, "{}", replies[5]);
    assert_eq!(replies[5]["result"]["kind"], "pong");

    // An oversized request: an error reply, then the connection is closed.
    let mut big = vec![b'a'; 200 * 1024];
    big.push(b'\n');
    let replies = raw(&c.socket, &big, 2);
    assert_eq!(
        replies.len(),
        1,
        "one reply, then the daemon hangs up: {replies:?}"
    );
    assert_eq!(error_code(&replies[0]), "too_large");

    // Invalid names are refused before anything touches the disk.
    for bad in ["../etc", "a/b", ".hidden", "x..y"] {
        let out = c.mhctl(&["service", "create", bad, "--", "true"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid service name"), "{bad}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(c.state.join("services"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );

    // The daemon still serves everyone it should.
    c.ok(&["ping"]);
    assert_eq!(c.json(&["service", "list"]), serde_json::json!([]));

    // And an allowed non-root uid gets through.
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    c.start_daemon(&["--socket-mode", "0666", "--allow-uid", "65534"]);
    let out = as_nobody(&c, &["service", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).expect("json"),
        serde_json::json!([])
    );
}

#[test]
fn concurrent_prebakes_make_whole_generations() {
    let Some(_g) = common::privileged("concurrent_prebakes_make_whole_generations") else {
        return;
    };
    let mut c = Case::for_daemon("dpb");
    c.start_daemon(&[]);
    let port = common::free_port();
    c.create_web("web", "notify", port);
    let spawn = |c: &Case| {
        Command::new(common::daemon::mhctl_bin())
            .arg("--socket")
            .arg(&c.socket)
            .args(["service", "prebake", "web", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mhctl")
    };
    let children = [spawn(&c), spawn(&c)];
    let outs: Vec<Output> = children
        .into_iter()
        .map(|ch| ch.wait_with_output().expect("mhctl"))
        .collect();
    // Requests on one service wait for each other: both succeed, in turn.
    let mut gens: Vec<u64> = outs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let v: Value = serde_json::from_slice(&o.stdout).expect("json");
            v["generation"].as_u64().expect("generation")
        })
        .collect();
    gens.sort_unstable();
    assert_eq!(gens, vec![1, 2]);

    let listed = c.json(&["image", "list", "web"]);
    let listed: Vec<u64> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["generation"].as_u64().expect("gen"))
        .collect();
    assert_eq!(
        listed, gens,
        "exactly one generation per successful prebake"
    );
    let mut entries: Vec<String> = std::fs::read_dir(c.images_dir("web"))
        .expect("images dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        vec!["1", "2"],
        "no staging directory or other leftover"
    );
    for g in &gens {
        let md = Metadata::read(&c.images_dir("web").join(g.to_string())).expect("a whole image");
        assert_eq!(md.backend.kind.as_str(), "notify");
        assert!(md.stop.is_some());
    }
    // The second runmh started only after the first had published.
    let log = common::read(&c.state.join("logs/web/runmh.log"));
    let steps: Vec<&str> = log
        .lines()
        .filter_map(|l| {
            if l.starts_with("--- miehistod") {
                Some("start")
            } else if l.starts_with("runmh: image published") {
                Some("published")
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        steps,
        vec!["start", "published", "start", "published"],
        "{log}"
    );

    // Inspect and remove through the daemon.
    let detail = c.json(&["image", "inspect", "web@2"]);
    assert_eq!(detail["image"]["generation"], 2);
    assert_eq!(detail["metadata"]["backend"]["kind"], "notify");
    c.ok(&["image", "rm", "web@1"]);
    let left: Vec<u64> = c
        .json(&["image", "list", "web"])
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|i| i["generation"].as_u64())
        .collect();
    assert_eq!(left, vec![2]);
    let out = c.mhctl(&["image", "rm", "web@1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no image generation 1"),
        "{out:?}"
    );
    assert!(c.live_services().is_empty());
    assert!(common::mounts_under(&c.dir).is_empty());
}

/// Issue 11 #6: a record that does not parse is shown as broken with its
/// reason, and neither a create nor a delete of that name touches its
/// record, images or logs unless forced. Issue 11 #8: `ping` and
/// `service.list` refuse unknown fields.
#[test]
fn broken_record_is_reported_and_kept() {
    let Some(_g) = common::privileged("broken_record_is_reported_and_kept") else {
        return;
    };
    let mut c = Case::for_daemon("dbr");
    c.start_daemon(&[]);
    c.ok(&["service", "create", "victim", "--", "/bin/sleep", "100"]);
    c.ok(&["service", "create", "other", "--", "/bin/sleep", "100"]);
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let record = c.state.join("services/victim.json");
    std::fs::write(&record, b"{\"format_version\": 1, \"config\": {trunc").expect("corrupt");
    // What the service owns: an image generation and its logs.
    let image = c.images_dir("victim").join("1");
    std::fs::create_dir_all(&image).expect("mkdir image");
    std::fs::write(image.join("pages-1.img"), b"memory").expect("image file");
    let logs = c.state.join("logs/victim");
    std::fs::create_dir_all(&logs).expect("mkdir logs");
    std::fs::write(logs.join("stdout.log"), b"history").expect("log");
    c.start_daemon(&[]);

    let victim = c.service("victim");
    assert_eq!(victim["state"], "broken", "{victim}");
    let problem = victim["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("victim.json") && problem.contains("corrupt"),
        "{victim}"
    );
    assert_eq!(c.service("other")["state"], "stopped");
    let table = c.ok(&["service", "list"]);
    assert!(
        table.contains("victim") && table.contains("BROKEN"),
        "{table}"
    );

    for args in [
        &["service", "create", "victim", "--", "/bin/true"][..],
        &["service", "delete", "victim"][..],
    ] {
        let out = c.mhctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(
            err.contains("broken") && err.contains("--force"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(&record).expect("record"),
        b"{\"format_version\": 1, \"config\": {trunc",
        "the broken record is left as it was"
    );
    assert!(image.join("pages-1.img").is_file(), "its image is kept");
    assert!(logs.join("stdout.log").is_file(), "its logs are kept");

    let created = c.json(&["service", "create", "--force", "victim", "--", "/bin/true"]);
    assert_eq!(created["state"], "stopped", "{created}");
    assert_eq!(c.service("victim")["state"], "stopped");

    for line in [
        &b"{\"v\":1,\"op\":\"ping\",\"x\":1}\n"[..],
        b"{\"v\":1,\"op\":\"service.list\",\"name\":\"victim\"}\n",
    ] {
        let r = raw(&c.socket, line, 1);
        assert_eq!(error_code(&r[0]), "bad_request", "{:?}", r[0]);
        assert!(r[0]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field"));
    }
    c.ok(&["service", "delete", "victim"]);
    c.ok(&["service", "delete", "other"]);
}

/// The uid and gid a process runs as (real ids, from /proc).
fn ids_of(pid: i32) -> (u32, u32) {
    let status = common::read(Path::new(&format!("/proc/{pid}/status")));
    let first = |key: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {status}"))
    };
    (first("Uid:"), first("Gid:"))
}

/// Issue 11 #7 through the daemon: `service create -u nobody` is prebaked
/// (NOTIFY: the preload library under the daemon's private state must be
/// readable by nobody), restored and cold-started as uid 65534, answering
/// HTTP each time.
#[test]
fn nonroot_service() {
    let Some(_g) = common::privileged("nonroot_service") else {
        return;
    };
    let mut c = Case::for_daemon("dnr");
    c.start_daemon(&[]);
    let port = common::free_port();
    let created = c.create_python("web", &["--backend", "notify", "-u", "nobody"], port, &[]);
    assert_eq!(created["user"], "nobody", "{created}");
    let err = c.fails(&[
        "service",
        "create",
        "bad",
        "-u",
        "no-such-user-xyz",
        "--",
        "/bin/true",
    ]);
    assert!(err.contains("no user named \"no-such-user-xyz\""), "{err}");

    let img = c.json(&["service", "prebake", "web"]);
    assert_eq!(img["generation"], 1, "{img}");
    assert_eq!(img["backend"], "notify", "{img}");
    let md = Metadata::read(&c.images_dir("web").join("1")).expect("a valid image");
    assert_eq!((md.spec.uid, md.spec.gid), (65534, 65534));

    for cold in [false, true] {
        let args: &[&str] = if cold {
            &["service", "start", "web", "--cold"]
        } else {
            &["service", "start", "web"]
        };
        let started = c.json(args);
        assert_eq!(started["state"], "running", "{started}");
        let body = common::wait_http(port, Duration::from_secs(20)).expect("the service answers");
        assert!(body.starts_with("payload=python pid=1 "), "{body}");
        let pid = pid_of(&c.service("web"), "pid");
        assert_eq!(ids_of(pid), (65534, 65534), "cold={cold}");
        c.json(&["service", "stop", "web"]);
        wait_gone(pid);
    }
    let logs = c.ok(&["service", "logs", "web"]);
    assert_eq!(
        common::count_lines(&logs, "ERROR: ld.so"),
        0,
        "the preload library loaded: {logs}"
    );
    c.ok(&["service", "delete", "web"]);
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    assert!(common::mounts_under(&c.dir).is_empty());
}

const NOBODY: u32 = 65534;

/// Opens connections to the daemon and holds them (`idle`: silent;
/// `trickle`: a byte of a request that never ends every 0.5 s), prints
/// `ready` once all are connected, and after `secs` seconds one JSON line:
/// for each connection when it was opened, the first reply line, and when
/// the daemon closed it (seconds since the start).
const FLOOD: &str = r#"
import json, select, socket, sys, time
path, trickle, idle, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
now = lambda: time.monotonic() - t0
conns = []
for kind in ["trickle"] * trickle + ["idle"] * idle:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    conns.append({"s": s, "kind": kind, "at": now(), "reply": None, "closed": None, "buf": b"", "sent": 0})
print("ready", flush=True)
part = b'{"v":1,"op":"ping"'
next_byte = 0.0
while now() < secs:
    if now() >= next_byte:
        for c in conns:
            if c["kind"] == "trickle" and c["closed"] is None:
                try:
                    c["s"].send(part[c["sent"] % len(part):][:1])
                    c["sent"] += 1
                except OSError:
                    pass
        next_byte = now() + 0.5
    live = [c for c in conns if c["closed"] is None]
    if not live:
        time.sleep(0.1)
        continue
    ready, _, _ = select.select([c["s"] for c in live], [], [], 0.1)
    for c in live:
        if c["s"] not in ready:
            continue
        try:
            data = c["s"].recv(65536)
        except OSError as e:
            data = b""
            c["error"] = str(e)
        if data:
            c["buf"] += data
            if c["reply"] is None and b"\n" in c["buf"]:
                c["reply"] = json.loads(c["buf"].split(b"\n")[0])
        else:
            c["closed"] = now()
            c["s"].close()
for c in conns:
    del c["s"], c["buf"]
print(json.dumps(conns), flush=True)
"#;

/// The flood's program as `uid`, once it printed `ready`.
fn flood(c: &Case, uid: u32, trickle: u32, idle: u32, secs: u32) -> std::process::Child {
    let id = uid.to_string();
    let mut child = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .arg(common::python())
        .arg("-c")
        .arg(FLOOD)
        .arg(&c.socket)
        .args([trickle.to_string(), idle.to_string(), secs.to_string()])
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the flood");
    let mut line = String::new();
    let out = child.stdout.as_mut().expect("stdout");
    let mut r = BufReader::new(out);
    r.read_line(&mut line).expect("read the flood's ready");
    assert_eq!(
        line.trim(),
        "ready",
        "the flood as uid {uid} did not connect"
    );
    child
}

/// The flood's account of its connections.
fn flood_report(child: std::process::Child) -> Vec<Value> {
    let out = child.wait_with_output().expect("the flood");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the flood failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    v.as_array().expect("a list").clone()
}

fn secs(v: &Value, key: &str) -> Option<f64> {
    v[key].as_f64()
}

/// Issue 11 #4: 56 idle and trickling connections of an allowed user, and
/// more of them beyond the limit, plus trickling ones of a user who is not
/// allowed at all, lock nobody out: root's `service list` answers at once
/// throughout (a slot is kept for root, refusals never wait on the
/// accepting thread); a request line that does not end is cut off after
/// the line deadline, an idle connection after the idle timeout; another
/// allowed client is told the daemon is busy instead of hanging.
#[test]
fn slow_and_idle_clients_do_not_lock_root_out() {
    let Some(_g) = common::privileged("slow_and_idle_clients_do_not_lock_root_out") else {
        return;
    };
    let mut c = Case::for_daemon("dlock");
    c.start_daemon(&[
        "--socket-mode",
        "0666",
        "--allow-uid",
        &NOBODY.to_string(),
        "--client-idle-timeout",
        "8",
    ]);
    // 100 idle and 20 trickling connections from the allowed user: the
    // tricklers come first, so they are among the 56 served.
    let allowed = flood(&c, NOBODY, 20, 100, 12);
    // And 10 + 10 from a user who is not allowed.
    let stranger = flood(&c, NOBODY - 1, 10, 10, 12);

    let busy = c.mhctl_as(NOBODY, &["service", "list"]);
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "all its slots are taken: {err}");
    assert!(err.contains("kept for root"), "{err}");

    let t0 = std::time::Instant::now();
    let mut took = Vec::new();
    while t0.elapsed() < Duration::from_secs(11) {
        let t = std::time::Instant::now();
        c.ok(&["service", "list"]);
        took.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(300));
    }
    took.sort();
    let median = took[took.len() / 2];
    let max = took[took.len() - 1];
    eprintln!(
        "root's service list: {} calls, median {median:?}, max {max:?}",
        took.len()
    );
    assert!(median < Duration::from_secs(1), "median {median:?}");
    assert!(max < Duration::from_secs(3), "max {max:?}");

    let conns = flood_report(allowed);
    let (trickle, idle): (Vec<&Value>, Vec<&Value>) =
        conns.iter().partition(|v| v["kind"] == "trickle");
    for t in &trickle {
        assert_eq!(t["reply"]["error"]["code"], "bad_request", "{t}");
        let msg = t["reply"]["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("did not arrive whole"), "{t}");
        let after = secs(t, "closed").expect("closed") - secs(t, "at").expect("at");
        assert!((4.5..9.0).contains(&after), "cut off after {after} s: {t}");
    }
    // Served and silent until the idle timeout closed them...
    let held: Vec<&&Value> = idle
        .iter()
        .filter(|v| v["reply"].is_null() && secs(v, "closed").is_some_and(|s| s > 7.0))
        .collect();
    assert_eq!(
        held.len(),
        server_slots_for_others() - trickle.len(),
        "the idle ones that got a slot"
    );
    for h in &held {
        assert!(
            secs(h, "closed").expect("closed") < 11.5,
            "idle timeout: {h}"
        );
    }
    // ...the others refused at once (with a reply while the refusers keep
    // up, else closed without one).
    let refused: Vec<&&Value> = idle.iter().filter(|v| !held.contains(v)).collect();
    assert!(
        refused
            .iter()
            .any(|v| v["reply"]["error"]["code"] == "unavailable"),
        "{refused:?}"
    );
    for r in &refused {
        let after = secs(r, "closed").expect("closed") - secs(r, "at").expect("at");
        assert!(after < 3.0, "refused in {after} s: {r}");
        if !r["reply"].is_null() {
            assert_eq!(r["reply"]["error"]["code"], "unavailable", "{r}");
        }
    }
    for s in flood_report(stranger) {
        let after = secs(&s, "closed").expect("closed") - secs(&s, "at").expect("at");
        assert!(after < 3.0, "refused in {after} s: {s}");
        if !s["reply"].is_null() {
            assert_eq!(s["reply"]["error"]["code"], "forbidden", "{s}");
        }
    }
    // Once they are gone, the allowed user gets in again.
    let out = c.mhctl_as(NOBODY, &["service", "list"]);
    assert!(out.status.success(), "{out:?}");
}

/// The slots anyone but root may take.
fn server_slots_for_others() -> usize {
    miehisto::daemon::server::MAX_CONNECTIONS - miehisto::daemon::server::ROOT_RESERVE
}

/// Issue 11 #5: an allowed non-root client's service runs as that client,
/// and it sees and touches only its own services; root sees all. (Its
/// prebake is not tried: here CRIU cannot dump another user's task, see
/// NOTES §10.)
#[test]
fn an_allowed_user_runs_and_sees_only_its_own_services() {
    let Some(_g) = common::privileged("an_allowed_user_runs_and_sees_only_its_own_services") else {
        return;
    };
    let mut c = Case::for_daemon("down");
    c.start_daemon(&["--socket-mode", "0666", "--allow-uid", &NOBODY.to_string()]);
    let root_port = common::free_port();
    c.create_web("rootsvc", "auto", root_port);
    let root_pid = pid_of(&c.json(&["service", "start", "rootsvc"]), "pid");
    common::wait_http(root_port, Duration::from_secs(30)).expect("root's service answers");

    let ok = |c: &Case, args: &[&str]| -> String {
        let out = c.mhctl_as(NOBODY, args);
        assert!(
            out.status.success(),
            "as nobody: mhctl {args:?}: {}\n--- daemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.context()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fails = |c: &Case, args: &[&str]| -> String {
        let out = c.mhctl_as(NOBODY, args);
        assert!(
            !out.status.success(),
            "as nobody: mhctl {args:?} should fail"
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        err
    };
    let port = common::free_port();
    // From `/`: nobody may not enter the crate's directory.
    let mut web = common::daemon::python_service_args("web", &["-C", "/"], port, &[]);
    web.insert(1, "--json".into());
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    let created: Value = serde_json::from_str(&ok(&c, &web)).expect("json");
    assert_eq!(created["owner_uid"], NOBODY, "{created}");
    assert_eq!(created["user"], format!("{NOBODY}:{NOBODY}"), "{created}");

    // It runs as its creator.
    let started: Value =
        serde_json::from_str(&ok(&c, &["service", "--json", "start", "web"])).expect("json");
    assert_eq!(started["started_from"], "cold", "{started}");
    let pid = pid_of(&started, "pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ids = |key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let all = format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY}");
    assert_eq!(ids("Uid:"), all, "{status}");
    assert_eq!(ids("Gid:"), all, "{status}");
    common::wait_http(port, Duration::from_secs(30)).expect("nobody's service answers");

    // It sees its own service only...
    let listed: Value =
        serde_json::from_str(&ok(&c, &["service", "--json", "list"])).expect("json");
    let names: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["web"], "{listed}");
    // ...and root's is as if it did not exist.
    for args in [
        &["service", "stop", "rootsvc"][..],
        &["service", "start", "rootsvc"],
        &["service", "dump", "rootsvc", "--leave-running"],
        &["service", "prebake", "rootsvc"],
        &["service", "delete", "rootsvc"],
        &["service", "logs", "rootsvc"],
        &["service", "stats", "rootsvc"],
        &["service", "set", "rootsvc", "--manual"],
        &["image", "list", "rootsvc"],
        &["image", "inspect", "rootsvc"],
        &["image", "rm", "rootsvc@1"],
        &["image", "check", "rootsvc"],
        &["image", "push", "rootsvc", "127.0.0.1:1/x:1"],
    ] {
        let err = fails(&c, args);
        assert!(
            err.contains("no service named \"rootsvc\""),
            "{args:?}: {err}"
        );
    }
    // Its name is taken all the same, and no other user is to be had.
    let err = fails(&c, &["service", "create", "rootsvc", "--", "/bin/true"]);
    assert!(err.contains("taken by another user's service"), "{err}");
    let err = fails(
        &c,
        &["service", "create", "x", "--user", "0", "--", "/bin/true"],
    );
    assert!(err.contains("run as itself only"), "{err}");
    let err = fails(&c, &["image", "pull", "127.0.0.1:1/x:1", "--as", "y"]);
    assert!(err.contains("for root only"), "{err}");
    let err = fails(
        &c,
        &[
            "service",
            "create",
            "low",
            "--on-demand",
            "--listen",
            "127.0.0.1:80",
            "--",
            "/bin/true",
        ],
    );
    assert!(err.contains("ports below"), "{err}");
    // Root's service did not notice.
    let r = c.service("rootsvc");
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(pid_of(&r, "pid"), root_pid, "{r}");

    // Root sees both, and who owns which; so does a restarted daemon.
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    c.restart_daemon();
    let w = c.service("web");
    assert_eq!(w["owner_uid"], NOBODY, "{w}");
    assert_eq!(w["state"], "running", "{w}");
    assert_eq!(c.service("rootsvc")["owner_uid"], 0);
    let listed: Value =
        serde_json::from_str(&ok(&c, &["service", "--json", "list"])).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    ok(&c, &["service", "stop", "web"]);
    ok(&c, &["service", "delete", "web"]);
    c.ok(&["service", "stop", "rootsvc"]);
    c.ok(&["service", "delete", "rootsvc"]);
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    c.assert_clean();
}

/// Issue 11 #8: a migration that a client opens and abandons before any
/// image arrives leaves nothing on the destination: not the service it
/// created, not its work directory, no page server.
#[test]
fn an_abandoned_migration_leaves_nothing() {
    let Some(_g) = common::privileged("an_abandoned_migration_leaves_nothing") else {
        return;
    };
    let mut c = Case::for_daemon("dmig");
    c.start_daemon(&[]);
    let req = serde_json::json!({
        "v": 1,
        "op": "migrate.receive",
        "address": "127.0.0.1",
        "service": {
            "name": "moved",
            "command": ["/bin/sleep", "1000"],
            "cwd": "/",
        },
    });
    let replies = raw(&c.socket, format!("{req}\n").as_bytes(), 1);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(
        replies[0]["result"]["kind"], "migrate_listening",
        "{}",
        replies[0]
    );
    // raw() closed the connection: the daemon rolls the session back.
    let t0 = std::time::Instant::now();
    while c.find_service("moved").is_some() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.find_service("moved").is_none(),
        "the created service is gone"
    );
    let left: Vec<PathBuf> = std::fs::read_dir(c.state.join("migrate"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<PathBuf>::new(), "work directories left");
    assert!(!c.images_dir("moved").exists(), "an image directory left");
    assert!(!c.state.join("services/moved.json").exists());
    // No page server left either: nothing but the daemon of this test.
    c.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    c.assert_clean();
}

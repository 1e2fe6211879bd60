//! Issue 3 acceptance: `runmh prebake` with the TRACE and NOTIFY backends,
//! for real: the payloads are held right before their first listen(2),
//! dumped by CRIU, published, and restored (three times in a row) into
//! servers that answer HTTP; plus the faults that must fail cleanly.

mod common;

use common::case::{wait_exit, Case, DEADLINE};

use miehisto::images::Metadata;
use miehisto::instance::InstanceState;
use miehisto::sys::procfs::{self, TaskState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Case {
    /// `runmh prebake --images IMG --backend B [opts] -e TAG -- argv`.
    fn prebake(&self, img: &Path, backend: &str, opts: &[&str], argv: &[String]) -> Command {
        self.prebake_with(
            &common::criu_path().expect("criu"),
            img,
            backend,
            opts,
            argv,
        )
    }

    fn prebake_with(
        &self,
        criu: &Path,
        img: &Path,
        backend: &str,
        opts: &[&str],
        argv: &[String],
    ) -> Command {
        let mut c = Command::new(common::runmh());
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("--criu")
            .arg(criu)
            .stdin(Stdio::null());
        c.args(["prebake", "--backend", backend, "--images"])
            .arg(img)
            .args(opts);
        c.arg("-e").arg(&self.tag).arg("--").args(argv);
        c
    }

    fn restore_cmd(&self, img: &Path) -> Command {
        let mut c = common::runmh_cmd(&self.state);
        c.arg("restore").arg("--images").arg(img);
        c
    }
}

/// A payload: its log name and command line.
struct Payload {
    name: &'static str,
    argv: Vec<String>,
    port: u16,
}

fn payload(which: &str) -> Payload {
    let port = common::free_port();
    let (name, mut argv) = match which {
        "python" => (
            "python",
            vec![
                common::python().to_string_lossy().into_owned(),
                common::python_payload().to_string_lossy().into_owned(),
            ],
        ),
        bin => {
            let name = match bin {
                "threaded_server" => "threaded",
                "forking_server" => "forking",
                "simple_server" => "simple",
                "simple_server_static" => "simple_static",
                "direct_syscall_server" => "direct_syscall",
                other => panic!("unknown payload {other}"),
            };
            (
                name,
                vec![common::payload(bin).to_string_lossy().into_owned()],
            )
        }
    };
    argv.extend(["--port".to_string(), port.to_string()]);
    Payload { name, argv, port }
}

/// A CRIU wrapper that, on `dump`, announces the target pid in `at-dump`
/// and waits for `go` before it execs the real CRIU: the test looks at the
/// held process while it sits at its stop point, just before CRIU seizes it.
fn observing_criu(c: &Case) -> PathBuf {
    let real = common::criu_path().expect("criu");
    let dir = c.state.join("observe");
    std::fs::create_dir_all(&dir).expect("mkdir observe");
    let script = dir.join("criu");
    let text = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = dump ]; then\n\
         \techo \"$3\" > '{d}/at-dump.tmp' && mv '{d}/at-dump.tmp' '{d}/at-dump'\n\
         \twhile [ ! -e '{d}/go' ]; do sleep 0.01; done\n\
         \trm -f '{d}/go' '{d}/at-dump'\n\
         fi\n\
         exec '{real}' \"$@\"\n",
        d = dir.display(),
        real = real.display()
    );
    common::write_script(&script, &text);
    script
}

/// The inodes of every TCP socket the kernel lists as listening or
/// connected, and whether some socket listens on `port`.
fn tcp_table(port: u16) -> (Vec<String>, bool) {
    let mut inodes = Vec::new();
    let mut listening = false;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for l in common::read(Path::new(f)).lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let local_port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if local_port == Some(port) && cols[3] == "0A" {
                listening = true;
            }
            inodes.push(cols[9].to_string());
        }
    }
    (inodes, listening)
}

/// Prebakes through [`observing_criu`] and checks, while the target is
/// held at its stop, that its socket is bound but not listening.
fn prebake_observed(c: &Case, img: &Path, backend: &str, p: &Payload) -> Metadata {
    let criu = observing_criu(c);
    let dir = criu.parent().expect("observe dir").to_path_buf();
    let mut child = c.spawn(c.prebake_with(&criu, img, backend, &[], &p.argv), "prebake");
    let t0 = Instant::now();
    let pid: i32 = loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("at-dump")) {
            break text.trim().parse().expect("pid from the criu wrapper");
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "prebake exited ({st}) before its dump: {}",
                c.stderr_of("prebake")
            );
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "no dump within {DEADLINE:?}: {}",
            c.stderr_of("prebake")
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = common::read(
        &c.instances()
            .first()
            .expect("the prebaking instance")
            .1
            .spec
            .stdout_log(),
    );
    let fd = bound_fd(&log, p.name, p.port);
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .expect("the bound fd of the held process");
    let link = link.to_string_lossy().into_owned();
    let inode = link
        .strip_prefix("socket:[")
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or_else(|| panic!("fd {fd} is {link}"));
    let (inodes, listening) = tcp_table(p.port);
    // A bound TCP socket that never listened is in neither the listening
    // nor the established table; after listen(2) it would be.
    assert!(
        !inodes.iter().any(|i| i == inode),
        "the held socket {inode} is not listening"
    );
    assert!(!listening, "nothing listens on port {} at the stop", p.port);
    let refused = std::net::TcpStream::connect(("127.0.0.1", p.port))
        .map(drop)
        .map_err(|e| e.kind());
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "connect at the stop"
    );
    // Bound all the same: a socket without SO_REUSEADDR cannot take the port.
    let probe = Command::new(common::python())
        .args([
            "-c",
            "import socket,sys; socket.socket().bind(('127.0.0.1', int(sys.argv[1])))",
            &p.port.to_string(),
        ])
        .output()
        .expect("run the bind probe");
    let probe_err = String::from_utf8_lossy(&probe.stderr);
    assert!(
        !probe.status.success() && probe_err.contains("Errno 98"),
        "the port is taken (EADDRINUSE): {probe_err}"
    );
    let state = procfs::stat(Pid::from_raw(pid))
        .expect("the stopped target's stat")
        .state;
    match backend {
        // Group-stop, no tracer: what CRIU wants to seize.
        "trace" => assert_eq!(state, TaskState::Stopped, "a TRACE stop is a group-stop"),
        // Blocked inside the marker kill(2), waiting for the listener.
        _ => assert_eq!(
            state,
            TaskState::Sleeping,
            "a NOTIFY stop sleeps in the kernel"
        ),
    }
    assert_eq!(
        procfs::status(Pid::from_raw(pid))
            .expect("the stopped target's status")
            .tracer_pid,
        Some(0),
        "no tracer holds the target when CRIU starts"
    );
    std::fs::write(dir.join("go"), b"").expect("release the wrapper");
    let st = wait_exit(&mut child, "prebake");
    assert!(
        st.success(),
        "prebake {} with {backend}: {}",
        p.name,
        c.stderr_of("prebake")
    );
    c.assert_clean();
    Metadata::read(img).expect("published image has valid metadata")
}

/// Prebakes `p` with `backend`; asserts success and returns the metadata.
fn prebake_ok(c: &Case, img: &Path, backend: &str, opts: &[&str], p: &Payload) -> Metadata {
    let out = c
        .prebake(img, backend, opts, &p.argv)
        .output()
        .expect("runmh prebake");
    assert!(
        out.status.success(),
        "prebake {} with {backend}: {}",
        p.name,
        String::from_utf8_lossy(&out.stderr)
    );
    // The tree was dumped and killed: nothing runs until a restore.
    c.assert_clean();
    Metadata::read(img).expect("published image has valid metadata")
}

/// The `fd=N` of the payload's `bound` line.
fn bound_fd(log: &str, name: &str, port: u16) -> u64 {
    let prefix = format!("MHLOG {name} bound port={port} fd=");
    let lines: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    assert_eq!(lines.len(), 1, "one bound line: {log}");
    lines[0].trim().parse().expect("fd number")
}

/// Checks that the image was taken right before the first listen(2):
/// the payload bound its socket and never logged a listen; the stop event
/// is the one each backend traps.
fn assert_stopped_before_listen(md: &Metadata, backend: &str, p: &Payload) {
    let log = common::read(&md.spec.stdout_log());
    let fd = bound_fd(&log, p.name, p.port);
    assert_eq!(
        common::count_lines(&log, "listen"),
        0,
        "no listen before the dump: {log}"
    );
    assert_eq!(md.backend.kind.as_str(), backend);
    let stop = md.stop.as_ref().expect("a prebaked image records its stop");
    assert_eq!(stop.syscall, "listen");
    let hit = &stop.hit;
    match backend {
        "trace" => {
            assert_eq!(hit.syscall, "listen", "{hit:?}");
            assert_eq!(hit.nr, syscalls::Sysno::listen as i64, "{hit:?}");
            assert_eq!(
                hit.args[0], fd,
                "the trapped listen is on the socket the payload bound: {hit:?}"
            );
            assert!(!hit.held, "the tracer detached before CRIU seized");
            let processes = if p.name == "forking" { 2 } else { 1 };
            assert_eq!(
                hit.frozen.len(),
                processes,
                "the whole tree was frozen: {hit:?}"
            );
            assert!(hit.frozen.contains(&hit.tgid), "{hit:?}");
            assert_eq!(md.backend.marker_signal, None);
        }
        "notify" => {
            let marker = md
                .backend
                .marker_signal
                .expect("a NOTIFY image records its marker signal");
            assert_eq!(hit.syscall, "kill", "{hit:?}");
            assert_eq!(hit.nr, syscalls::Sysno::kill as i64, "{hit:?}");
            assert_eq!(
                hit.args[1],
                u64::try_from(marker).expect("a positive signal"),
                "the trapped kill carries the marker: {hit:?}"
            );
            assert!(
                md.spec.env.iter().any(|(k, _)| k == "LD_PRELOAD"),
                "the recorded environment carries the preload library: {:?}",
                md.spec.env
            );
            // The marker never returned before the dump: no preload line yet.
            let err = common::read(&md.spec.stderr_log());
            assert_eq!(common::count_lines(&err, "miehisto-preload:"), 0, "{err}");
        }
        other => panic!("unknown backend {other}"),
    }
}

/// Restores `img` in the foreground and waits for HTTP 200. Checks the
/// restored service's first action was its listen, that it is a child of
/// runmh, then stops it with SIGTERM to the front process.
fn restore_serve_stop(c: &Case, img: &Path, md: &Metadata, p: &Payload, round: usize) {
    let log_path = md.spec.stdout_log();
    let len_before = common::read(&log_path).len();
    let label = format!("restore{round}");
    let mut front = c.spawn(c.restore_cmd(img), &label);
    let t0 = Instant::now();
    let rec = loop {
        if let Ok(Some(st)) = front.try_wait() {
            panic!(
                "restore {round} exited early ({st}): {}",
                c.stderr_of(&label)
            );
        }
        if let Some((_, r)) = c
            .instances()
            .into_iter()
            .find(|(_, r)| r.root_pid > 0 && r.state == InstanceState::Running)
        {
            break r;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "restore {round} never ran: {}",
            c.stderr_of(&label)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let body = common::wait_http(p.port, DEADLINE)
        .unwrap_or_else(|e| panic!("restore {round}: {e}; {}", c.stderr_of(&label)));
    assert!(
        body.starts_with(&format!("payload={} pid=1 ", p.name)),
        "{body}"
    );
    if p.name == "forking" {
        assert!(
            !body.contains("helper=-1"),
            "the forked helper came back with its pipe: {body}"
        );
    }
    let ppid = common::ppid_of(rec.root_pid).expect("ppid of the restored service");
    assert_eq!(
        common::comm_of(ppid),
        "runmh",
        "the restored service's parent is runmh"
    );

    let log = common::read(&log_path);
    let new = &log[len_before..];
    // A forked helper may still have been about to log its start when the
    // tree was frozen; the main process's first line is what counts.
    assert_eq!(
        new.lines()
            .find(|l| !l.starts_with(&format!("MHLOG {} helper ", p.name))),
        Some(format!("MHLOG {} listen ret=0 errno=0", p.name).as_str()),
        "restore {round}: the restored process's first action is its listen: {new}"
    );
    assert_eq!(
        common::count_lines(&log, "listen ret=0 errno=0"),
        round,
        "one successful listen per restore: {log}"
    );
    assert_eq!(
        common::count_lines(new, "listen ret=-1"),
        0,
        "no failed listen (ENOSYS): {log}"
    );
    if md.backend.kind.as_str() == "notify" {
        // After a restore the marker returns ENOSYS, which the wrapper ignores.
        let err = common::read(&md.spec.stderr_log());
        let marker = md.backend.marker_signal.expect("marker");
        let line = format!("miehisto-preload: marker sig={marker} before listen ret=-1 errno=38");
        assert_eq!(common::count_lines(&err, &line), round, "{err}");
    }

    kill(miehisto::sys::child_pid(&front), Signal::SIGTERM).expect("SIGTERM");
    let st = wait_exit(&mut front, "runmh restore after SIGTERM");
    assert_eq!(
        st.code(),
        Some(128 + 15),
        "the service ended through its SIGTERM handler: {}",
        c.stderr_of(&label)
    );
    // (A forking payload's helper may log its own exit after the parent's.)
    let log = common::read(&log_path);
    assert_eq!(
        common::count_lines(
            &log[len_before..],
            &format!("MHLOG {} exit signal=15", p.name)
        ),
        1,
        "{log}"
    );
    c.assert_clean();
}

fn payload_cycle(backend: &str, which: &str) {
    let c = Case::new(&format!("pb-{backend}-{which}"));
    let p = payload(which);
    let img = c.state.join("img");
    let md = prebake_observed(&c, &img, backend, &p);
    assert_eq!(md.backend.reason, "requested");
    assert_eq!(md.spec.argv, p.argv);
    assert_stopped_before_listen(&md, backend, &p);
    for round in 1..=3 {
        restore_serve_stop(&c, &img, &md, &p, round);
        Metadata::read(&img).expect("the image stays valid after a restore");
    }
}

#[test]
fn trace_python() {
    if let Some(_g) = common::privileged("trace_python") {
        payload_cycle("trace", "python");
    }
}

#[test]
fn trace_threaded() {
    if let Some(_g) = common::privileged("trace_threaded") {
        payload_cycle("trace", "threaded_server");
    }
}

#[test]
fn trace_forking() {
    if let Some(_g) = common::privileged("trace_forking") {
        payload_cycle("trace", "forking_server");
    }
}

#[test]
fn notify_python() {
    if let Some(_g) = common::privileged("notify_python") {
        payload_cycle("notify", "python");
    }
}

#[test]
fn notify_threaded() {
    if let Some(_g) = common::privileged("notify_threaded") {
        payload_cycle("notify", "threaded_server");
    }
}

#[test]
fn notify_forking() {
    if let Some(_g) = common::privileged("notify_forking") {
        payload_cycle("notify", "forking_server");
    }
}

#[test]
fn trace_without_reseize_reproduces_enosys() {
    let Some(_g) = common::privileged("trace_without_reseize_reproduces_enosys") else {
        return;
    };
    let c = Case::new("pb-enosys");
    let p = payload("simple_server");
    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "trace", &[], &p);
    let log_path = md.spec.stdout_log();

    let mut cmd = c.restore_cmd(&img);
    cmd.arg("--no-reseize");
    let mut front = c.spawn(cmd, "noreseize");
    let st = wait_exit(&mut front, "restore --no-reseize");
    let log = common::read(&log_path);
    assert_eq!(
        common::count_lines(&log, "MHLOG simple listen ret=-1 errno=38"),
        1,
        "the talk's ENOSYS: {log}"
    );
    assert_eq!(
        common::count_lines(&log, "MHLOG simple fatal listen failed"),
        1,
        "{log}"
    );
    assert_eq!(
        st.code(),
        Some(3),
        "the payload's exit status for a failed listen: {}",
        c.stderr_of("noreseize")
    );
    c.assert_clean();
    Metadata::read(&img).expect("the image stays valid");

    // The same image with the re-seize: the replayed listen succeeds.
    let len_before = log.len();
    restore_serve_stop(
        &c,
        &img,
        &md,
        &Payload {
            name: p.name,
            argv: p.argv.clone(),
            port: p.port,
        },
        1,
    );
    let after = common::read(&log_path);
    assert_eq!(
        common::count_lines(&after[len_before..], "errno=38"),
        0,
        "{after}"
    );
}

#[test]
fn auto_picks_trace() {
    let Some(_g) = common::privileged("auto_picks_trace") else {
        return;
    };
    let c = Case::new("pb-auto");
    let p = payload("simple_server");
    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "auto", &[], &p);
    assert_eq!(md.backend.kind.as_str(), "trace");
    assert!(md.backend.reason.contains("auto"), "{}", md.backend.reason);
    assert_stopped_before_listen(&md, "trace", &p);
    restore_serve_stop(&c, &img, &md, &p, 1);
}

#[test]
fn auto_falls_back_to_notify_without_ptrace() {
    let Some(_g) = common::privileged("auto_falls_back_to_notify_without_ptrace") else {
        return;
    };
    let c = Case::new("pb-auto-notify");
    let p = payload("simple_server");
    let img = c.state.join("img");
    let out = c
        .prebake(&img, "auto", &["--research-deny-ptrace"], &p.argv)
        .output()
        .expect("runmh prebake");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.assert_clean();
    let md = Metadata::read(&img).expect("metadata");
    assert_eq!(md.backend.kind.as_str(), "notify");
    let reason = &md.backend.reason;
    assert!(
        reason.contains("auto") && reason.contains("ptrace"),
        "{reason}"
    );
    assert!(
        reason.contains("EPERM") || reason.contains("Operation not permitted"),
        "the reason names the failure: {reason}"
    );
    assert_eq!(md.backend.marker_signal, Some(miehisto::sys::sigrtmax()));
    assert_stopped_before_listen(&md, "notify", &p);
    restore_serve_stop(&c, &img, &md, &p, 1);
}

/// A prebake that must fail: one `runmh: error:` line, nothing published,
/// nothing left running or mounted.
fn prebake_fails(c: &Case, backend: &str, opts: &[&str], argv: &[String]) -> String {
    let img = c.state.join("img");
    let out: Output = c
        .prebake(&img, backend, opts, argv)
        .output()
        .expect("runmh prebake");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("runmh: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(!img.exists(), "no image published after: {err}");
    let staging: Vec<_> = std::fs::read_dir(&c.state)
        .expect("read state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("staging") || n.contains("img"))
        .collect();
    assert_eq!(staging, Vec::<String>::new(), "no staging directory left");
    c.assert_clean();
    lines[0].to_string()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn faults_fail_cleanly() {
    let Some(_g) = common::privileged("faults_fail_cleanly") else {
        return;
    };
    let c = Case::new("pb-faults");
    for backend in ["trace", "notify"] {
        let line = prebake_fails(&c, backend, &[], &strings(&["/bin/sh", "-c", "exit 7"]));
        assert!(
            line.contains("exited") && line.contains("exit status 7") && line.contains("listen"),
            "{backend}: {line}"
        );

        let line = prebake_fails(
            &c,
            backend,
            &["--timeout", "2"],
            &strings(&["/bin/sleep", "100"]),
        );
        assert!(
            line.contains("within 2s") && line.contains("--timeout"),
            "{backend}: {line}"
        );
    }
    let line = prebake_fails(
        &c,
        "trace",
        &["--stop-at", "nosuchcall"],
        &strings(&["/bin/sleep", "100"]),
    );
    assert!(
        line.contains("nosuchcall") && line.contains("unknown syscall"),
        "{line}"
    );
}

#[test]
fn static_binary_needs_trace() {
    let Some(_g) = common::privileged("static_binary_needs_trace") else {
        return;
    };
    let bin = common::payload("simple_server_static");
    if !common::require(
        "static_binary_needs_trace",
        (!bin.is_file()).then(|| format!("{} built (there was no libc.a)", bin.display())),
    ) {
        return;
    }
    assert!(miehisto::prebake::is_static_elf(&bin));
    let c = Case::new("pb-static");
    let p = payload("simple_server_static");
    let line = prebake_fails(&c, "notify", &["--timeout", "3"], &p.argv);
    assert!(
        line.contains("within 3s")
            && line.contains("statically linked")
            && line.contains("--backend trace"),
        "{line}"
    );

    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "trace", &[], &p);
    assert_stopped_before_listen(&md, "trace", &p);
    restore_serve_stop(&c, &img, &md, &p, 1);
}

/// The TRACE backend's heap trim: a payload that leaves 48 MiB of freed
/// heap before its listen is dumped without those pages when the preload
/// library's trim-only mode runs malloc_trim(0) in its listen wrapper, and
/// with them under `MIEHISTO_PRELOAD_TRIM=0` (no library at all) or for a
/// static program (never loads it); the trimmed service restores and
/// serves as before, and the library said nothing on its stderr.
#[test]
fn trace_trims_freed_heap_before_the_stop() {
    let Some(_g) = common::privileged("trace_trims_freed_heap_before_the_stop") else {
        return;
    };
    const FREED: &[&str] = &["-e", "MH_FREED_HEAP_MIB=48"];
    let mib = |md: &Metadata| md.image_bytes as f64 / f64::from(1u32 << 20);
    let has = |md: &Metadata, k: &str, v: Option<&str>| {
        md.spec
            .env
            .iter()
            .any(|(ek, ev)| ek == k && v.map_or(true, |v| v == ev))
    };
    let c = Case::new("pb-trim");
    let p_on = payload("simple_server");
    let on_img = c.state.join("img-on");
    let on = prebake_ok(&c, &on_img, "trace", FREED, &p_on);
    assert_stopped_before_listen(&on, "trace", &p_on);
    assert!(has(&on, "LD_PRELOAD", None), "{:?}", on.spec.env);
    assert!(
        has(&on, "MIEHISTO_PRELOAD_MODE", Some("trim")),
        "{:?}",
        on.spec.env
    );

    let p_off = payload("simple_server");
    let off_img = c.state.join("img-off");
    let off_opts = [FREED, &["-e", "MIEHISTO_PRELOAD_TRIM=0"]].concat();
    let off = prebake_ok(&c, &off_img, "trace", &off_opts, &p_off);
    assert!(!has(&off, "LD_PRELOAD", None), "{:?}", off.spec.env);
    assert!(
        mib(&off) > mib(&on) + 40.0,
        "trimmed {:.1} MiB, untrimmed {:.1} MiB",
        mib(&on),
        mib(&off)
    );

    let stat = common::payload("simple_server_static");
    if stat.is_file() {
        let p_static = payload("simple_server_static");
        let st = prebake_ok(&c, &c.state.join("img-static"), "trace", FREED, &p_static);
        assert!(!has(&st, "LD_PRELOAD", None), "{:?}", st.spec.env);
        assert!(mib(&st) > 48.0, "static: {:.1} MiB", mib(&st));
    } else {
        assert!(!common::in_ci(), "{} was not built", stat.display());
    }

    restore_serve_stop(&c, &on_img, &on, &p_on, 1);
    let err = common::read(&on.spec.stderr_log());
    assert_eq!(common::count_lines(&err, "miehisto-preload:"), 0, "{err}");
}

#[test]
fn direct_syscall_needs_trace() {
    let Some(_g) = common::privileged("direct_syscall_needs_trace") else {
        return;
    };
    let c = Case::new("pb-direct");
    let p = payload("direct_syscall_server");
    let line = prebake_fails(&c, "notify", &["--timeout", "3"], &p.argv);
    assert!(
        line.contains("within 3s") && line.contains("--backend trace"),
        "{line}"
    );

    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "trace", &[], &p);
    assert_stopped_before_listen(&md, "trace", &p);
    restore_serve_stop(&c, &img, &md, &p, 1);
}

#[test]
fn notify_marker_signal_option() {
    let Some(_g) = common::privileged("notify_marker_signal_option") else {
        return;
    };
    let c = Case::new("pb-marker");
    let p = payload("simple_server");
    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "notify", &["--marker-signal", "SIGRTMAX-4"], &p);
    let want = miehisto::sys::sigrtmax() - 4;
    assert_eq!(md.backend.marker_signal, Some(want));
    assert!(
        md.spec
            .env
            .iter()
            .any(|(k, v)| k == "MIEHISTO_MARKER_SIG" && v == &want.to_string()),
        "the wrapper was told the marker: {:?}",
        md.spec.env
    );
    assert_stopped_before_listen(&md, "notify", &p);
    restore_serve_stop(&c, &img, &md, &p, 1);
}

/// The process whose thread traces `pid` (TracerPid names the tracer
/// thread, and runmh's tracer is a thread of its own).
fn tracer_process(pid: i32) -> Option<String> {
    let tid = procfs::status(Pid::from_raw(pid)).ok()?.tracer_pid?;
    if tid == 0 {
        return Some("0".into());
    }
    procfs::tgid(Pid::from_raw(tid)).map(|p| p.to_string())
}

/// A restored TRACE service is dumped at any moment (`runmh dump
/// --leave-running`): its supervisor freezes the tree and lets go of it for
/// CRIU, then takes it back as its tracer; the new image restores too, and
/// the filter left in the process never costs the service an ENOSYS.
#[test]
fn restored_trace_service_dumped_at_any_moment() {
    let Some(_g) = common::privileged("restored_trace_service_dumped_at_any_moment") else {
        return;
    };
    let c = Case::new("pb-redump");
    let p = payload("simple_server");
    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, "trace", &[], &p);
    let log_path = md.spec.stdout_log();

    let mut front = c.spawn(c.restore_cmd(&img), "first");
    common::wait_http(p.port, DEADLINE).unwrap_or_else(|e| panic!("{e}; {}", c.stderr_of("first")));
    let rec = c
        .instances()
        .into_iter()
        .map(|(_, r)| r)
        .find(|r| r.root_pid > 0)
        .expect("the restored instance");
    let tracer = tracer_process(rec.root_pid).expect("service status");
    assert_eq!(
        tracer,
        rec.supervisor_pid.to_string(),
        "the supervisor traces the restored service"
    );

    let img2 = c.state.join("img2");
    let out = common::runmh_cmd(&c.state)
        .args(["dump", "--leave-running", "--pid"])
        .arg(rec.root_pid.to_string())
        .arg("--images")
        .arg(&img2)
        .output()
        .expect("run runmh dump");
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md2 = Metadata::read(&img2).expect("the second image is published");
    assert_eq!(
        md2.backend.kind.as_str(),
        "trace",
        "the image keeps the backend it needs after a restore"
    );
    // Taken back: traced again, and still serving.
    assert_eq!(
        common::http_get(p.port, "/").map(|(code, _)| code).ok(),
        Some(200)
    );
    let tracer = tracer_process(rec.root_pid).expect("service status");
    assert_eq!(
        tracer,
        rec.supervisor_pid.to_string(),
        "re-seized after the dump"
    );

    nix::sys::signal::kill(miehisto::sys::child_pid(&front), Signal::SIGTERM).expect("SIGTERM");
    wait_exit(&mut front, "first restore");
    let mut second = c.spawn(c.restore_cmd(&img2), "second");
    common::wait_http(p.port, DEADLINE)
        .unwrap_or_else(|e| panic!("{e}; {}", c.stderr_of("second")));
    nix::sys::signal::kill(miehisto::sys::child_pid(&second), Signal::SIGTERM).expect("SIGTERM");
    wait_exit(&mut second, "second restore");
    let log = common::read(&log_path);
    assert_eq!(
        common::count_lines(&log, "errno=38"),
        0,
        "no ENOSYS at any point: {log}"
    );
    assert_eq!(
        common::count_lines(&log, "MHLOG simple listen ret=0 errno=0"),
        1,
        "listen ran once, in the first restore: {log}"
    );
    c.assert_clean();
}

/// The restored service's (uid, gid) and whether it is in a user
/// namespace other than ours.
fn ids_and_userns(pid: i32) -> ((u32, u32), bool) {
    let status = common::read(Path::new(&format!("/proc/{pid}/status")));
    let field = |key: &str| -> u32 {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {status}"));
        // Real, effective, saved and filesystem ids: all the same.
        let ids: Vec<u32> = line
            .split_whitespace()
            .map(|n| n.parse().expect("an id"))
            .collect();
        assert!(ids.iter().all(|i| *i == ids[0]), "{key} {ids:?}");
        ids[0]
    };
    let ns = |p: &str| std::fs::read_link(p).expect("user ns link");
    let own = ns(&format!("/proc/{pid}/ns/user")) != ns("/proc/self/ns/user");
    ((field("Uid:"), field("Gid:")), own)
}

/// Issue 11 #7: a service run as `nobody` (named, not numbered) is
/// prebaked and restored with both backends on a host whose root lacks
/// CAP_SYS_RESOURCE (criu dump used to fail reading its rlimits): it runs
/// in a user namespace of its own, as uid 65534 on the host too, and
/// answers HTTP after each restore.
fn nonroot_cycle(backend: &str, user: &str) {
    let c = Case::new(&format!("pb-nonroot-{backend}"));
    let p = payload("python");
    let img = c.state.join("img");
    let md = prebake_ok(&c, &img, backend, &["-u", user], &p);
    assert_eq!((md.spec.uid, md.spec.gid), (65534, 65534), "{user}");
    assert_stopped_before_listen(&md, backend, &p);
    for round in 1..=2 {
        let label = format!("restore{round}");
        let mut front = c.spawn(c.restore_cmd(&img), &label);
        let t0 = Instant::now();
        let rec = loop {
            if let Ok(Some(st)) = front.try_wait() {
                panic!("restore exited early ({st}): {}", c.stderr_of(&label));
            }
            if let Some((_, r)) = c
                .instances()
                .into_iter()
                .find(|(_, r)| r.root_pid > 0 && r.state == InstanceState::Running)
            {
                break r;
            }
            assert!(t0.elapsed() < DEADLINE, "{}", c.stderr_of(&label));
            std::thread::sleep(Duration::from_millis(20));
        };
        let body = common::wait_http(p.port, DEADLINE)
            .unwrap_or_else(|e| panic!("restore {round}: {e}; {}", c.stderr_of(&label)));
        assert!(body.starts_with("payload=python pid=1 "), "{body}");
        let (ids, own_userns) = ids_and_userns(rec.root_pid);
        assert_eq!(ids, (65534, 65534), "the restored service runs as nobody");
        assert!(
            own_userns,
            "the restored service is in its own user namespace"
        );
        let log = common::read(&md.spec.stdout_log());
        assert_eq!(
            common::count_lines(&log, "listen ret=0 errno=0"),
            round,
            "{log}"
        );
        kill(miehisto::sys::child_pid(&front), Signal::SIGTERM).expect("SIGTERM");
        let st = wait_exit(&mut front, "runmh restore after SIGTERM");
        assert_eq!(st.code(), Some(128 + 15), "{}", c.stderr_of(&label));
        c.assert_clean();
    }
}

#[test]
fn nonroot_trace() {
    if let Some(_g) = common::privileged("nonroot_trace") {
        nonroot_cycle("trace", "nobody");
    }
}

#[test]
fn nonroot_notify() {
    if let Some(_g) = common::privileged("nonroot_notify") {
        nonroot_cycle("notify", "nobody:nogroup");
    }
}

#[test]
fn unknown_user_is_refused_before_booting() {
    let Some(_g) = common::privileged("unknown_user_is_refused_before_booting") else {
        return;
    };
    let c = Case::new("pb-nouser");
    let p = payload("python");
    let line = prebake_fails(&c, "trace", &["-u", "no-such-user-xyz"], &p.argv);
    assert!(
        line.contains("no user named \"no-such-user-xyz\""),
        "{line}"
    );
    let line = prebake_fails(&c, "trace", &["-u", "nobody:no-such-group-xyz"], &p.argv);
    assert!(
        line.contains("no group named \"no-such-group-xyz\""),
        "{line}"
    );
}

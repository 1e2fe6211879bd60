//! Issue 2 acceptance: `runmh run`, `runmh dump`, `runmh restore` and
//! `runmh doctor`, for real (root, CRIU, namespaces, HTTP), plus the bad
//! inputs that must fail with one clear line and leave nothing behind.

mod common;

use common::case::{wait_exit, Case, DEADLINE};

use miehisto::images::Metadata;
use miehisto::instance::{InstanceRecord, InstanceState};
use nix::sys::signal::{kill, Signal};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Case {
    fn runmh(&self) -> Command {
        common::runmh_cmd(&self.state)
    }

    /// `runmh ... run -e TAG -- ARGS`, without --criu (run needs none).
    fn run_args(&self, extra: &[&str], argv: &[&str]) -> Command {
        let mut c = Command::new(common::runmh());
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("run")
            .arg("-e")
            .arg(&self.tag);
        c.args(extra).arg("--").args(argv);
        c.stdin(Stdio::null());
        c
    }

    /// Waits for the single instance matching `pick` to run its service.
    fn wait_running(&self, pick: impl Fn(&InstanceRecord) -> bool) -> InstanceRecord {
        let t0 = Instant::now();
        while t0.elapsed() < DEADLINE {
            if let Some((_, r)) = self
                .instances()
                .into_iter()
                .find(|(_, r)| pick(r) && r.root_pid > 0 && r.state == InstanceState::Running)
            {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "no running instance under {} within {DEADLINE:?}: {:?}",
            self.state.display(),
            self.instance_dirs()
        );
    }
}

fn term(child: &Child) {
    kill(miehisto::sys::child_pid(child), Signal::SIGTERM).expect("send SIGTERM");
}

/// A failed command: non-zero exit, exactly one stderr line starting `runmh: error:`.
fn assert_one_line_error(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what}: expected failure, got {:?}; stderr: {err}",
        out.status
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got: {err}"
    );
    assert!(lines[0].starts_with("runmh: error: "), "{what}: {err}");
    lines[0].to_string()
}

/// `runmh restore --images IMG`, which must fail with one clear line.
fn restore_error(c: &Case, img: &Path, what: &str) -> String {
    let out = c
        .runmh()
        .arg("restore")
        .arg("--images")
        .arg(img)
        .output()
        .expect("runmh restore");
    assert_one_line_error(&out, what)
}

/// Every file of an image, by name, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read image dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read image file"),
            )
        })
        .collect()
}

fn python_argv(port: u16) -> Vec<String> {
    vec![
        common::python().to_string_lossy().into_owned(),
        common::python_payload().to_string_lossy().into_owned(),
        "--port".into(),
        port.to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn stdout_log(md: &Metadata) -> PathBuf {
    md.spec.stdout_log()
}

/// Restores `img` in the foreground, waits for HTTP 200 on `port` and
/// checks the restored service's parent is runmh. Returns the front process.
fn restore_and_check(c: &Case, img: &Path, port: u16, label: &str) -> (Child, InstanceRecord) {
    let mut cmd = c.runmh();
    cmd.arg("restore").arg("--images").arg(img);
    let mut front = c.spawn(cmd, label);
    let rec = {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = front.try_wait() {
                panic!("restore exited early ({st}): {}", c.stderr_of(label));
            }
            if let Some((_, r)) = c.instances().into_iter().find(|(_, r)| {
                r.image.is_some() && r.root_pid > 0 && r.state == InstanceState::Running
            }) {
                break r;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "restore never ran: {}",
                c.stderr_of(label)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    common::wait_http(port, DEADLINE)
        .unwrap_or_else(|e| panic!("restored service: {e}; {}", c.stderr_of(label)));
    let ppid = common::ppid_of(rec.root_pid).expect("restored service's ppid");
    assert_eq!(
        common::comm_of(ppid),
        "runmh",
        "the restored service's parent (pid {ppid}) must be runmh"
    );
    assert_eq!(
        ppid, rec.supervisor_pid,
        "the instance record names the parent as supervisor"
    );
    assert!(
        c.leftovers().iter().any(|(p, _)| *p == rec.root_pid),
        "the leak check sees the restored service"
    );
    (front, rec)
}

/// Starts the python server under `runmh run`; returns the runmh child and its record.
fn run_python(c: &Case, port: u16) -> (Child, InstanceRecord) {
    let argv = python_argv(port);
    let mut run = c.spawn(c.run_args(&[], &strs(&argv)), "run");
    let rec = c.wait_running(|_| true);
    if let Err(e) = common::wait_http(port, DEADLINE) {
        let _ = run.kill();
        panic!("cold service: {e}; {}", c.stderr_of("run"));
    }
    assert!(
        c.leftovers().iter().any(|(p, _)| *p == rec.root_pid),
        "the leak check sees the service"
    );
    (run, rec)
}

#[test]
fn run_dump_restore_twice() {
    let Some(_g) = common::privileged("run_dump_restore_twice") else {
        return;
    };
    let c = Case::new("sbx-cycle");
    let port = common::free_port();
    let (mut run, rec) = run_python(&c, port);
    assert_eq!(
        common::ppid_of(rec.root_pid),
        Some(miehisto::sys::child_pid(&run).as_raw()),
        "runmh run is the service's parent"
    );
    let (code, body) = common::http_get(port, "/").expect("GET");
    assert_eq!(code, 200);
    assert!(
        body.starts_with("payload=python pid=1 "),
        "the service is PID 1 of its namespace: {body}"
    );

    // Dump by the runmh pid: the image appears, the service ends with it.
    let img = c.state.join("img");
    let out = c
        .runmh()
        .args(["dump", "--pid", &run.id().to_string(), "--images"])
        .arg(&img)
        .output()
        .expect("runmh dump");
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_exit(&mut run, "runmh run after the dump");
    assert!(
        st.success(),
        "a dumped service's runmh exits 0, got {st}: {}",
        c.stderr_of("run")
    );
    c.assert_clean();

    let md = Metadata::read(&img).expect("published image has valid metadata");
    assert!(img.join("miehisto.json").is_file());
    assert_eq!(md.spec.argv, python_argv(port));
    assert_eq!(md.dumped_pid, rec.root_pid);
    assert_eq!(
        md.backend.kind.as_str(),
        "none",
        "a plain dump has no stop backend"
    );
    assert!(md.stop.is_none());
    assert!(!md.leave_running);
    assert!(md.image_bytes > 0 && md.image_files > 2, "{md:?}");
    assert_eq!(md.kernel, miehisto::images::metadata::kernel_release());
    let criu = miehisto::criu::Criu::at(&common::criu_path().expect("criu")).expect("criu");
    assert_eq!(md.criu_version, criu.version.to_string());
    assert!(
        md.externals.iter().any(|e| e.path == Path::new("/dev")),
        "{:?}",
        md.externals
    );
    let log = stdout_log(&md);
    let requests_before = common::count_lines(&common::read(&log), "request n=");
    assert_eq!(requests_before, 2, "{}", common::read(&log));

    for round in 1..=2 {
        let label = format!("restore{round}");
        let len_before = common::read(&log).len();
        let (mut front, rec) = restore_and_check(&c, &img, port, &label);
        let (code, body) = common::http_get(port, "/").expect("GET after restore");
        assert_eq!(code, 200);
        // The request counter lives in the restored memory: it goes on.
        assert!(
            body.contains(&format!("requests={}", requests_before + 2)),
            "round {round}: {body}"
        );
        let text = common::read(&log);
        assert!(
            text.len() > len_before,
            "the log keeps growing after a restore"
        );
        assert_eq!(
            common::count_lines(&text[len_before..], "request n="),
            2,
            "round {round}: {text}"
        );
        assert_eq!(
            common::count_lines(&text, "listen ret="),
            1,
            "a restored service does not boot again: {text}"
        );

        term(&front);
        let st = wait_exit(&mut front, "runmh restore after SIGTERM");
        assert_eq!(
            st.code(),
            Some(128 + 15),
            "the service's own SIGTERM exit status comes back: {}",
            c.stderr_of(&label)
        );
        assert!(
            common::read(&log).ends_with("MHLOG python exit signal=15\n"),
            "{}",
            common::read(&log)
        );
        assert!(
            std::fs::metadata(format!("/proc/{}", rec.root_pid)).is_err(),
            "restored service is gone"
        );
        c.assert_clean();
        // The image survives its restores, byte for byte usable again.
        Metadata::read(&img).expect("image still valid after a restore");
    }
}

#[test]
fn dump_by_service_pid_leave_running() {
    let Some(_g) = common::privileged("dump_by_service_pid_leave_running") else {
        return;
    };
    let c = Case::new("sbx-leave");
    let port = common::free_port();
    let (mut run, rec) = run_python(&c, port);
    let img = c.state.join("img");
    let out = c
        .runmh()
        .args([
            "dump",
            "--leave-running",
            "--pid",
            &rec.root_pid.to_string(),
            "--images",
        ])
        .arg(&img)
        .output()
        .expect("runmh dump");
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = Metadata::read(&img).expect("metadata");
    assert!(md.leave_running);
    assert_eq!(md.dumped_pid, rec.root_pid);

    // The original goes on serving, in the same process.
    let (code, body) = common::http_get(port, "/").expect("GET after the dump");
    assert_eq!(code, 200);
    assert!(body.contains("requests=2"), "{body}");
    assert_eq!(
        run.try_wait().expect("try_wait"),
        None,
        "runmh run still supervises"
    );
    assert_eq!(
        common::ppid_of(rec.root_pid),
        Some(miehisto::sys::child_pid(&run).as_raw())
    );

    term(&run);
    let st = wait_exit(&mut run, "runmh run after SIGTERM");
    assert_eq!(st.code(), Some(128 + 15));
    c.assert_clean();

    let (mut front, _) = restore_and_check(&c, &img, port, "restore");
    let (_, body) = common::http_get(port, "/").expect("GET after restore");
    // The image was taken after the first request, before the second.
    assert!(body.contains("requests=3"), "{body}");
    term(&front);
    wait_exit(&mut front, "runmh restore after SIGTERM");
    c.assert_clean();
}

#[test]
fn sigterm_stops_service_and_cleans_up() {
    let Some(_g) = common::privileged("sigterm_stops_service_and_cleans_up") else {
        return;
    };
    let c = Case::new("sbx-term");
    let port = common::free_port();
    let (mut run, rec) = run_python(&c, port);
    term(&run);
    let st = wait_exit(&mut run, "runmh run after SIGTERM");
    assert_eq!(
        st.code(),
        Some(128 + 15),
        "runmh exits with the service's status: {}",
        c.stderr_of("run")
    );
    assert!(
        std::fs::metadata(format!("/proc/{}", rec.root_pid)).is_err(),
        "service gone"
    );
    let log = rec.spec.stdout_log();
    assert!(
        common::read(&log).contains("MHLOG python exit signal=15"),
        "the service got the forwarded SIGTERM"
    );
    assert!(
        common::http_get(port, "/").is_err(),
        "nothing answers on the port any more"
    );
    c.assert_clean();
}

#[test]
fn stop_timeout_escalates_to_sigkill() {
    let Some(_g) = common::privileged("stop_timeout_escalates_to_sigkill") else {
        return;
    };
    let c = Case::new("sbx-kill");
    let mut run = c.spawn(
        c.run_args(
            &["--stop-timeout", "1"],
            &["/bin/sh", "-c", "trap '' TERM; sleep 1000"],
        ),
        "run",
    );
    let rec = c.wait_running(|_| true);
    // Wait until the shell has set SIGTERM to ignored (SigIgn bit 15).
    let t0 = Instant::now();
    loop {
        let status = common::read(Path::new(&format!("/proc/{}/status", rec.root_pid)));
        let ign = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .unwrap_or(0);
        if ign & (1 << (15 - 1)) != 0 {
            break;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "the shell never ignored SIGTERM: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    term(&run);
    let st = wait_exit(&mut run, "runmh run of a SIGTERM-ignoring service");
    assert_eq!(
        st.code(),
        Some(128 + 9),
        "the service was SIGKILLed after --stop-timeout: {}",
        c.stderr_of("run")
    );
    assert!(
        c.stderr_of("run").contains("SIGKILL"),
        "runmh says it escalated: {}",
        c.stderr_of("run")
    );
    c.assert_clean();
}

#[test]
fn doctor_passes() {
    let Some(_g) = common::privileged("doctor_passes") else {
        return;
    };
    let c = Case::new("sbx-doctor");
    let out = c.runmh().arg("doctor").output().expect("runmh doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "doctor failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks = miehisto::doctor::run(common::criu_path().as_deref());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), checks.len(), "one line per check: {text}");
    for (line, check) in lines.iter().zip(&checks) {
        assert!(
            line.starts_with("ok ") || line.starts_with("warn "),
            "{line}"
        );
        assert!(line.contains(check.name), "{line} vs {}", check.name);
    }
    for name in [
        "root",
        "kernel",
        "seccomp",
        "ptrace",
        "criu",
        "libseccomp",
        "kdat",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(name)),
            "doctor checks {name}: {text}"
        );
    }
}

/// A restorable image of a short-lived payload, for the bad-input tests.
fn small_image(c: &Case) -> PathBuf {
    let img = c.state.join("good-img");
    let port = common::free_port();
    let mut cmd = c.runmh();
    cmd.args(["prebake", "--backend", "trace", "--images"])
        .arg(&img);
    cmd.arg("-e")
        .arg(&c.tag)
        .arg("--")
        .arg(common::payload("simple_server"))
        .arg("--port")
        .arg(port.to_string());
    let out = cmd.output().expect("runmh prebake");
    assert!(
        out.status.success(),
        "prebake: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Metadata::read(&img).expect("metadata");
    img
}

#[test]
fn bad_input_is_one_clear_line() {
    let Some(_g) = common::privileged("bad_input_is_one_clear_line") else {
        return;
    };
    let c = Case::new("sbx-bad");

    // A command that does not exist.
    let missing_cmd = c.state.join("no-such-program");
    let out = c
        .run_args(&[], &[&missing_cmd.to_string_lossy()])
        .output()
        .expect("runmh run");
    let line = assert_one_line_error(&out, "missing command");
    assert!(
        line.contains("not found") && line.contains("no-such-program"),
        "{line}"
    );
    c.assert_clean();

    // restore --images: missing, empty, corrupt metadata.
    let missing = c.state.join("missing-img");
    let line = restore_error(&c, &missing, "missing image dir");
    assert!(
        line.contains("missing-img") && line.contains("does not exist"),
        "{line}"
    );
    assert!(
        !missing.exists(),
        "a failed restore creates nothing at the image path"
    );
    c.assert_clean();

    let empty = c.state.join("empty-img");
    std::fs::create_dir(&empty).expect("mkdir");
    let line = restore_error(&c, &empty, "empty image dir");
    assert!(
        line.contains("empty-img") && line.contains("miehisto.json"),
        "{line}"
    );
    assert_eq!(snapshot(&empty).len(), 0);
    c.assert_clean();

    let img = small_image(&c);
    let md_path = img.join("miehisto.json");
    let text = std::fs::read(&md_path).expect("read metadata");
    std::fs::write(&md_path, &text[..text.len() / 2]).expect("truncate metadata");
    let before = snapshot(&img);
    let line = restore_error(&c, &img, "corrupt metadata");
    assert!(
        line.contains("miehisto.json") && line.contains("corrupt"),
        "{line}"
    );
    assert_eq!(
        snapshot(&img),
        before,
        "a failed restore leaves the image intact"
    );
    c.assert_clean();
    std::fs::write(&md_path, &text).expect("repair metadata");

    // CRIU missing, CRIU too old: for restore (the image stays intact) and
    // for prebake (nothing starts, nothing is published).
    let fake = c.state.join("fake-criu");
    common::write_script(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n");
    let before = snapshot(&img);
    for (criu, expect) in [
        (PathBuf::from("/nonexistent/criu"), "could not be run"),
        (fake.clone(), "3.17.1"),
    ] {
        let base = || {
            let mut cmd = Command::new(common::runmh());
            cmd.arg("--state-dir")
                .arg(&c.state)
                .arg("--criu")
                .arg(&criu)
                .stdin(Stdio::null());
            cmd
        };
        let out = base()
            .arg("restore")
            .arg("--images")
            .arg(&img)
            .output()
            .expect("runmh restore");
        let line = assert_one_line_error(&out, "restore with a bad CRIU");
        assert!(
            line.contains(&*criu.to_string_lossy()) && line.contains(expect),
            "{line}"
        );
        assert!(
            line.contains("setup/install.sh"),
            "names the setup command: {line}"
        );
        assert_eq!(snapshot(&img), before);
        c.assert_clean();

        let new_img = c.state.join("never");
        let out = base()
            .args(["prebake", "--images"])
            .arg(&new_img)
            .arg("-e")
            .arg(&c.tag)
            .arg("--")
            .arg(common::payload("simple_server"))
            .output()
            .expect("runmh prebake");
        let line = assert_one_line_error(&out, "prebake with a bad CRIU");
        assert!(
            line.contains(expect) && line.contains("setup/install.sh"),
            "{line}"
        );
        assert!(!new_img.exists(), "nothing published");
        c.assert_clean();
    }

    // Not root.
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match setpriv {
        None if common::in_ci() => panic!("setpriv is needed to test the not-root error (CI=true)"),
        None => eprintln!("SKIP not-root case: setpriv is absent"),
        Some(sp) => {
            for sub in [
                vec!["run", "--", "/bin/true"],
                vec!["restore", "--images", &*img.to_string_lossy()],
            ] {
                let out = Command::new(&sp)
                    .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(common::runmh())
                    .arg("--state-dir")
                    .arg(&c.state)
                    .args(&sub)
                    .stdin(Stdio::null())
                    .output()
                    .expect("setpriv runmh");
                let line = assert_one_line_error(&out, "not root");
                assert!(line.contains("root"), "{line}");
                c.assert_clean();
            }
            assert_eq!(snapshot(&img), before);
        }
    }
}

/// The service's first action names its cgroup, and it is its instance's:
/// the sandbox child starts there (clone3's CLONE_INTO_CGROUP, or its
/// first step's cgroup.procs write where the kernel refuses that).
#[test]
fn service_starts_in_its_instance_cgroup() {
    let Some(_g) = common::privileged("service_starts_in_its_instance_cgroup") else {
        return;
    };
    let own_parent = match miehisto::sandbox::cgroup::hierarchy() {
        Ok(_) => miehisto::sandbox::cgroup::cgroup_of(None),
        Err(e) if common::in_ci() => panic!("a cgroup v2 hierarchy (CI=true): {e}"),
        Err(e) => {
            eprintln!("SKIP service_starts_in_its_instance_cgroup: {e}");
            return;
        }
    };
    let c = Case::new("sbx-cgroup");
    // `read` is a builtin: the shell (the sandbox's PID 1) reads its own
    // /proc/self/cgroup before it runs anything else; the v2 line is
    // "0::PATH" (a hybrid host lists its v1 hierarchies too).
    let mut run = c.spawn(
        c.run_args(
            &[],
            &[
                "/bin/sh",
                "-c",
                "while read l; do case $l in 0::*) echo \"MHCG $l\";; esac; done < /proc/self/cgroup; trap 'exit 0' TERM; sleep 1000 & wait",
            ],
        ),
        "run",
    );
    let rec = c.wait_running(|_| true);
    let log = rec.spec.stdout_log();
    let t0 = Instant::now();
    let line = loop {
        if let Some(l) = common::read(&log)
            .lines()
            .find_map(|l| l.strip_prefix("MHCG ").map(str::to_string))
        {
            break l;
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "the service never printed its cgroup: {}",
            c.stderr_of("run")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let own = format!("/miehisto/{}", rec.id);
    assert!(
        line.starts_with("0::") && line.ends_with(&own),
        "the service's first look at /proc/self/cgroup names {own}: {line:?}"
    );
    assert_eq!(
        miehisto::sandbox::cgroup::cgroup_of(Some(rec.root_pid)).as_deref(),
        line.strip_prefix("0::"),
        "the service is still there"
    );
    assert_ne!(
        own_parent.as_deref(),
        line.strip_prefix("0::"),
        "the test itself is elsewhere"
    );
    let cg = miehisto::sandbox::cgroup::InstanceCgroup::existing(&rec.id)
        .expect("the instance's cgroup exists while it runs");
    assert!(cg.pids().contains(&rec.root_pid), "{:?}", cg.pids());
    term(&run);
    let st = wait_exit(&mut run, "runmh run after SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", c.stderr_of("run"));
    assert!(!cg.path.exists(), "the instance's cgroup is removed");
    c.assert_clean();
}

/// What clone3 into a cgroup hands the sandbox: a child in new PID and
/// mount namespaces that is in the cgroup at its first instruction, before
/// any cgroup.procs write could have moved it.
#[test]
fn clone_into_cgroup_child_is_there_from_its_first_instruction() {
    use miehisto::sys;
    use nix::libc;
    use std::os::fd::AsFd;
    let Some(_g) =
        common::privileged("clone_into_cgroup_child_is_there_from_its_first_instruction")
    else {
        return;
    };
    if let Err(e) = miehisto::sandbox::cgroup::hierarchy() {
        assert!(!common::in_ci(), "a cgroup v2 hierarchy (CI=true): {e}");
        eprintln!("SKIP: {e}");
        return;
    }
    // An id of the instance form, which no real instance has (its
    // milliseconds would be 1).
    let id = format!("1-{}", std::process::id());
    let cg = miehisto::sandbox::cgroup::InstanceCgroup::create(&id).expect("scratch cgroup");
    let dir = cg.dir_for_clone().expect("cgroup directory");
    let rel = cg
        .path
        .strip_prefix(miehisto::sandbox::cgroup::hierarchy().expect("hierarchy"))
        .expect("below the hierarchy");
    // Everything the child compares, built before the clone.
    let expected = format!("0::/{}\n", rel.display()).into_bytes();
    let file = c"/proc/self/cgroup";
    // SAFETY: the child only issues open/read/_exit on memory prepared
    // above (no allocation, no lock) and ends in _exit.
    let forked =
        unsafe { sys::clone_into_cgroup(libc::CLONE_NEWPID | libc::CLONE_NEWNS, dir.as_fd()) };
    match forked {
        Ok(0) => {
            let mut buf = [0u8; 4096];
            let n = match sys::open(file, libc::O_RDONLY | libc::O_CLOEXEC, 0) {
                Ok(fd) => sys::read(fd, &mut buf).unwrap_or(0),
                Err(_) => sys::exit_now(2),
            };
            // The v2 line among a hybrid host's v1 ones ("N:controllers:PATH").
            let found = buf[..n].windows(expected.len()).any(|w| w == expected);
            sys::exit_now(if found { 0 } else { 1 })
        }
        Ok(pid) => {
            let st = sys::waitpid(pid, 0).expect("waitpid");
            let _ = cg.destroy();
            assert!(
                matches!(st, Some(sys::Wait::Exited(_, 0))),
                "the child's first read of /proc/self/cgroup is {:?} (exit 1: another cgroup, 2: cannot open it): {st:?}",
                String::from_utf8_lossy(&expected)
            );
        }
        Err(e) => {
            let _ = cg.destroy();
            panic!("clone3 with CLONE_INTO_CGROUP on this kernel: {e}");
        }
    }
    assert!(!cg.path.exists(), "the scratch cgroup is removed");
}

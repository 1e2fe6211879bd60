//! Fault injection (issue 11): damaged images, runaway and killed CRIU
//! runs, signals in the middle of a restore. Each test syncs on a real
//! event (a file a CRIU wrapper writes when CRIU starts, a log line), never
//! on a blind sleep, and ends with nothing left running or mounted.

mod common;

use common::case::{wait_exit, Case, DEADLINE};

use miehisto::images::Metadata;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

impl Case {
    fn runmh(&self, criu: &Path) -> Command {
        let mut c = Command::new(common::runmh());
        c.arg("--state-dir")
            .arg(&self.state)
            .arg("--criu")
            .arg(criu)
            .stdin(Stdio::null());
        // The tag also marks CRIU and whatever it forks, for leftovers().
        let (k, v) = self.tag.split_once('=').expect("tag");
        c.env(k, v);
        c
    }

    fn prebake(&self, img: &Path, backend: &str, port: u16) -> Output {
        let criu = common::criu_path().expect("criu");
        let mut c = self.runmh(&criu);
        c.args(["prebake", "--backend", backend, "--images"])
            .arg(img)
            .arg("-e")
            .arg(&self.tag)
            .arg("--")
            .arg(common::payload("simple_server"))
            .args(["--port", &port.to_string()]);
        c.output().expect("runmh prebake")
    }

    fn prebaked(&self, name: &str, backend: &str) -> (PathBuf, u16) {
        let img = self.state.join(name);
        let port = common::free_port();
        let out = self.prebake(&img, backend, port);
        assert!(
            out.status.success(),
            "prebake: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (img, port)
    }

    fn restore(&self, criu: &Path, img: &Path, detach: bool) -> Command {
        let mut c = self.runmh(criu);
        c.arg("restore").arg("--images").arg(img);
        if detach {
            c.arg("--detach");
        }
        c
    }
}

/// The one `runmh: error:` line of a failed run.
fn one_error(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected a failure: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("runmh: error: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

/// Every file of an image with its contents, to show a refused restore
/// changed nothing.
fn snapshot(img: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(img)
        .expect("read image")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read image file"),
            )
        })
        .collect();
    v.sort();
    v
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|f| f.set_len(len))
        .expect("truncate");
}

/// A truncated, an emptied, and a same-size-but-changed pages image are
/// all refused before CRIU runs, with a one-line reason, and left as they
/// were; the intact image then restores and serves.
#[test]
fn damaged_images_are_refused_before_criu() {
    let Some(_g) = common::privileged("damaged_images_are_refused_before_criu") else {
        return;
    };
    let c = Case::new("flt-damaged");
    let (img, port) = c.prebaked("img", "trace");
    let criu = common::criu_path().expect("criu");
    let md = Metadata::read(&img).expect("metadata");
    assert!(
        md.files.iter().any(|f| f.name == "pages-1.img"),
        "checksums recorded at publish time: {:?}",
        md.files
    );
    let pages = img.join("pages-1.img");
    let good = std::fs::read(&pages).expect("read pages");
    assert!(good.len() > 100_000, "{}", good.len());
    // A refused restore creates nothing, not even the log directory the
    // image names (for an image from another host, a path of that host).
    let logs = md.spec.log_dir.clone();
    std::fs::remove_dir_all(&logs).expect("remove the image's log directory");

    for (what, len) in [("truncated", 100_000u64), ("emptied", 0)] {
        set_len(&pages, len);
        let before = snapshot(&img);
        let t0 = Instant::now();
        let out = c.restore(&criu, &img, true).output().expect("restore");
        let line = one_error(&out);
        assert!(
            line.contains("damaged") && line.contains("pages-1.img") && line.contains("pagemap"),
            "{what}: {line}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: bounded");
        assert_eq!(
            snapshot(&img),
            before,
            "{what}: the image is left as it was"
        );
        c.assert_clean();
        assert!(!logs.exists(), "{what}: the refused restore made {logs:?}");
    }
    // Same size, one byte changed: only the recorded checksum sees it.
    let mut bad = good.clone();
    bad[4096 * 3 + 17] ^= 0xff;
    std::fs::write(&pages, &bad).expect("write pages");
    let line = one_error(&c.restore(&criu, &img, true).output().expect("restore"));
    assert!(
        line.contains("checksum") && line.contains("pages-1.img"),
        "{line}"
    );
    c.assert_clean();
    assert!(!logs.exists(), "the refused restore made {logs:?}");

    std::fs::write(&pages, &good).expect("restore pages");
    let out = c.restore(&criu, &img, true).output().expect("restore");
    assert!(
        out.status.success(),
        "the intact image restores: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_http(port, DEADLINE).expect("restored service answers");
    let (_, rec) = c.instances().pop().expect("the restored instance");
    kill(Pid::from_raw(rec.supervisor_pid), Signal::SIGTERM).expect("SIGTERM the supervisor");
    c.assert_clean();
}

/// A CRIU wrapper: `--version` and `check` go to the real CRIU; `restore`
/// runs `body` (a shell fragment; `$W` is CRIU's work directory, where its
/// log goes) after writing `$W/criu-started`.
fn fake_restore_criu(c: &Case, label: &str, body: &str) -> PathBuf {
    let real = common::criu_path().expect("criu");
    let script = c.state.join(format!("criu-{label}"));
    let text = format!(
        "#!/bin/sh\n\
         if [ \"$1\" != restore ]; then exec '{real}' \"$@\"; fi\n\
         W=\n\
         prev=\n\
         for a in \"$@\"; do [ \"$prev\" = -W ] && W=\"$a\"; prev=\"$a\"; done\n\
         echo $$ > \"$W/criu-started\"\n\
         {body}\n",
        real = real.display()
    );
    common::write_script(&script, &text);
    script
}

/// A CRIU whose log grows without end (as the restorer's `Preadv ...
/// returned 0` loop did) is ended, with its children, once the log passes
/// the limit; the error names the log.
#[test]
fn runaway_criu_log_is_bounded() {
    let Some(_g) = common::privileged("runaway_criu_log_is_bounded") else {
        return;
    };
    let c = Case::new("flt-runaway");
    let (img, _) = c.prebaked("img", "trace");
    let criu = fake_restore_criu(
        &c,
        "runaway",
        "sleep 1000 &\nwhile :; do echo 'Error (criu/pagemap.c:420): Preadv 0x7f00:4096 returned 0' >> \"$W/restore.log\"; done",
    );
    let t0 = Instant::now();
    let out = c
        .restore(&criu, &img, true)
        .env("MIEHISTO_CRIU_LOG_MAX_BYTES", "200000")
        .output()
        .expect("restore");
    let line = one_error(&out);
    assert!(
        line.contains("restore was ended")
            && line.contains("restore.log")
            && line.contains("limit"),
        "{line}"
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "bounded");
    c.assert_clean();
}

/// A CRIU that hangs is ended after the time limit; SIGTERM to runmh
/// during a restore ends the restore at once (it used to be ignored).
#[test]
fn hung_criu_is_ended_by_time_and_by_sigterm() {
    let Some(_g) = common::privileged("hung_criu_is_ended_by_time_and_by_sigterm") else {
        return;
    };
    let c = Case::new("flt-hung");
    let (img, _) = c.prebaked("img", "notify");
    let criu = fake_restore_criu(&c, "hung", "sleep 1000 &\nsleep 1000");
    let out = c
        .restore(&criu, &img, true)
        .env("MIEHISTO_CRIU_TIMEOUT_SECS", "2")
        .output()
        .expect("restore");
    let line = one_error(&out);
    assert!(line.contains("longer than 2s"), "{line}");
    c.assert_clean();

    let mut front = c.spawn(c.restore(&criu, &img, false), "restore-term");
    let started = loop {
        let found = c
            .instance_dirs()
            .into_iter()
            .map(|d| d.join("criu-started"))
            // The fake CRIU's `echo $$ >` creates the file before it writes.
            .find(|p| !common::read(p).trim().is_empty());
        if let Some(p) = found {
            break p;
        }
        assert!(
            front.try_wait().expect("try_wait").is_none(),
            "{}",
            c.stderr_of("restore-term")
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let criu_pid: i32 = common::read(&started).trim().parse().expect("criu pid");
    assert!(Path::new(&format!("/proc/{criu_pid}")).exists());
    let t0 = Instant::now();
    kill(miehisto::sys::child_pid(&front), Signal::SIGTERM).expect("SIGTERM");
    let st = wait_exit(&mut front, "runmh restore after SIGTERM");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "SIGTERM honoured at once"
    );
    assert!(!st.success());
    let err = c.stderr_of("restore-term");
    assert!(err.contains("SIGTERM"), "{err}");
    c.assert_clean();
}

/// Runs `argv` as `nobody` (uid and gid 65534, no groups).
fn as_nobody(argv: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .args(argv)
        .output()
        .expect("setpriv")
}

/// Every path under `dir` (not following symlinks).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                stack.push(e.path());
            }
        }
        out.push(p);
    }
    out
}

/// With umask 022, a prebaked image (memory and environment holding a
/// secret), its metadata, its logs and the state directory are private:
/// `nobody` can read none of it; a world-readable leftover is tightened
/// on the next start.
#[test]
fn state_images_and_logs_are_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(_g) = common::privileged("state_images_and_logs_are_private") else {
        return;
    };
    let c = Case::new("flt-private");
    // The caller's umask is loose; miehisto must not rely on it.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let img = c.state.join("images/web");
    let port = common::free_port();
    let criu = common::criu_path().expect("criu");
    let mut cmd = c.runmh(&criu);
    cmd.args(["prebake", "--backend", "trace", "--images"])
        .arg(&img)
        .args(["-e", "API_TOKEN=s3cret-token", "-e"])
        .arg(&c.tag)
        .arg("--")
        .arg(common::payload("simple_server"))
        .args(["--port", &port.to_string()]);
    let out = cmd.output().expect("prebake");
    nix::sys::stat::umask(old);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The secret is in the image (so the test can see what it protects).
    let md = common::read(&img.join("miehisto.json"));
    assert!(
        md.contains("s3cret-token"),
        "the metadata records the environment"
    );

    let all = walk(&c.state);
    assert!(all.iter().any(|p| p.ends_with("pages-1.img")));
    assert!(all.iter().any(|p| p.ends_with("stdout.log")));
    for p in all.iter().filter(|p| p.starts_with(c.state.join("images"))) {
        let m = std::fs::symlink_metadata(p).expect("stat");
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.mode() & 0o777, want, "{}", p.display());
    }
    for p in &all {
        let m = std::fs::symlink_metadata(p).expect("stat");
        // The preload library (the TRACE backend's heap trim loads it too)
        // is public by design: 0644 in a 0711 directory, no secret in it.
        if m.file_type().is_symlink()
            || p.starts_with(c.state.join("criu-"))
            || p.starts_with(c.state.join("lib"))
        {
            continue;
        }
        assert_eq!(
            m.mode() & 0o077,
            0,
            "{} is {:o}",
            p.display(),
            m.mode() & 0o777
        );
    }
    let state = c.state.to_string_lossy().into_owned();
    let out = as_nobody(&["grep", "-rl", "s3cret-token", &state]);
    assert!(
        !out.status.success(),
        "nobody found the secret: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for p in ["images/web/pages-1.img", "images/web/miehisto.json"] {
        let out = as_nobody(&["cat", &c.state.join(p).to_string_lossy()]);
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "nobody read {p}"
        );
    }

    // A loose state directory (as older versions left it) is tightened.
    let loose = c.state.join("logs");
    std::fs::set_permissions(&c.state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = c.restore(&criu, &img, true).output().expect("restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in [&c.state, &loose] {
        let mode = std::fs::metadata(d).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    common::wait_http(port, DEADLINE).expect("restored service answers");
    let (_, rec) = c.instances().pop().expect("the restored instance");
    let inst_mode = walk(&c.state.join("instances"))
        .iter()
        .map(|p| {
            std::fs::symlink_metadata(p)
                .map(|m| m.mode() & 0o077)
                .unwrap_or(0)
        })
        .max();
    assert_eq!(inst_mode, Some(0), "instance records are private");
    kill(Pid::from_raw(rec.supervisor_pid), Signal::SIGTERM).expect("SIGTERM the supervisor");
    c.assert_clean();
}

// ---------------------------------------------------------------------------
// The kill -9 tier (issue 11, defect 2): runmh, CRIU, the supervisor or the
// dumping runmh is SIGKILLed (alone, or with its whole process group) at
// each phase of a prebake, a dump and a restore, for both backends. After
// it, no process of the service runs, nothing is mounted or half-published,
// and the next run of the same service on the same port succeeds (and
// reports what it cleaned up).

/// What a kill hits: one process, or its whole process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    Process,
    Group,
}

/// SIGKILL to `pid`, or to the group it leads.
fn sigkill(pid: i32, how: Kill) {
    let target = match how {
        Kill::Process => pid,
        Kill::Group => -pid,
    };
    // It may have ended by itself a moment ago: nothing else to do then.
    let _ = kill(Pid::from_raw(target), Signal::SIGKILL);
}

/// Polls `cond` (a real event: a file, a record, /proc) until it holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A live process (not a zombie).
fn alive(pid: i32) -> bool {
    pid > 0 && common::alive(pid)
}

/// The cgroup (v2 path) of `pid`.
fn cgroup_of(pid: i32) -> String {
    miehisto::sandbox::cgroup::cgroup_of(Some(pid)).unwrap_or_default()
}

/// Instance `id`'s cgroup directory, which must be gone after a cleanup.
fn instance_cgroup(id: &str) -> PathBuf {
    miehisto::sandbox::cgroup::InstanceCgroup::locate(id)
        .expect("the cgroup v2 hierarchy (CI runs the cgroup path)")
        .path
}

/// A CRIU wrapper: `dump` writes `$W/criu-dump-started` (its pid) and
/// runs `dump_body`; `restore` writes `$W/criu-started` and runs
/// `restore_body`; anything else goes to the real CRIU.
fn wrapped_criu(c: &Case, label: &str, dump_body: &str, restore_body: &str) -> PathBuf {
    let real = common::criu_path().expect("criu");
    // The scratch dir: a daemon's state dir does not exist before it starts.
    let script = c.dir.join(format!("criu-{label}"));
    let text = format!(
        "#!/bin/sh\n\
         W=\n\
         prev=\n\
         for a in \"$@\"; do [ \"$prev\" = -W ] && W=\"$a\"; prev=\"$a\"; done\n\
         case \"$1\" in\n\
         dump) echo $$ > \"$W/criu-dump-started\"; {dump_body} ;;\n\
         restore) echo $$ > \"$W/criu-started\"; {restore_body} ;;\n\
         esac\n\
         exec '{real}' \"$@\"\n",
        real = real.display()
    );
    common::write_script(&script, &text);
    script
}

/// The file `name` in any staging directory beside `img` (a dump's `-W`).
fn in_staging(img: &Path, name: &str) -> Option<PathBuf> {
    let parent = img.parent()?;
    let prefix = format!(".{}.staging-", img.file_name()?.to_string_lossy());
    std::fs::read_dir(parent)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join(name))
        .find(|p| p.exists())
}

/// Entries beside `img` other than `img` itself: a staging directory or a
/// half-written image would show here.
fn beside(img: &Path) -> Vec<String> {
    let name = img.file_name().map(|n| n.to_os_string());
    let mut v: Vec<String> = std::fs::read_dir(img.parent().expect("parent"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| Some(e.file_name()) != name)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.ends_with(".img"))
        .collect();
    v.sort();
    v
}

/// What a process that should have died is: its /proc status lines that
/// tell why a signal did not end it, and its command line.
fn survivor(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let keep = [
        "State", "PPid", "NSpid", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt",
    ];
    let mut v: Vec<String> = status
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(&format!("{k}:"))))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    v.push(format!(
        "cmdline: {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    ));
    v.push(format!(
        "wchan: {}",
        std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
    ));
    v.join("; ")
}

/// When a prebake is killed.
#[derive(Debug, Clone, Copy)]
enum PrebakePhase {
    /// The sandbox exists, its command on its way to the stop point.
    Booting,
    /// Held at the stop point (CRIU's CPU record runs, then the dump).
    Held,
    /// CRIU dumps the held tree.
    Dumping,
}

impl Case {
    /// The one instance record of this state dir, once it has a root pid.
    fn one_instance(
        &self,
    ) -> Option<(
        miehisto::instance::Instance,
        miehisto::instance::InstanceRecord,
    )> {
        self.instances().into_iter().find(|(_, r)| r.root_pid > 0)
    }

    fn prebake_with(&self, criu: &Path, img: &Path, backend: &str, port: u16) -> Command {
        let mut c = self.runmh(criu);
        c.args(["prebake", "--backend", backend, "--images"])
            .arg(img)
            .arg("-e")
            .arg(&self.tag)
            .arg("--")
            .arg(common::payload("simple_server"))
            .args(["--port", &port.to_string()]);
        c
    }

    /// After a kill that left instance `id` behind: the next prebake to
    /// the same place, on the same port, cleans it up and succeeds.
    fn next_prebake_cleans(&self, img: &Path, backend: &str, port: u16, dead: &str) {
        let out = self.prebake(img, backend, port);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the next prebake: {err}");
        assert!(
            err.contains(&format!("removed the instance {dead} ")),
            "the next prebake names what it cleaned: {err}"
        );
        Metadata::read(img).expect("a whole image");
        assert_eq!(beside(img), Vec::<String>::new(), "nothing half-published");
        assert!(
            !instance_cgroup(dead).exists(),
            "the dead instance's cgroup is removed"
        );
    }
}

fn killed_prebakes(backend: &str) {
    let c = Case::new(&format!("flt-kprebake-{backend}"));
    let criu = wrapped_criu(&c, "pb", "", "");
    for phase in [
        PrebakePhase::Booting,
        PrebakePhase::Held,
        PrebakePhase::Dumping,
    ] {
        for how in [Kill::Process, Kill::Group] {
            let what = format!("{backend} {phase:?} {how:?}");
            let img = c.state.join(format!("img-{phase:?}-{how:?}"));
            let port = common::free_port();
            let mut cmd = c.prebake_with(&criu, &img, backend, port);
            cmd.process_group(0);
            let mut runmh = c.spawn(cmd, "kprebake");
            let runmh_pid = miehisto::sys::child_pid(&runmh).as_raw();
            let mut seen = None;
            wait_for(&format!("{what}: the phase"), || {
                let inst = c.one_instance();
                let hit = match (phase, &inst) {
                    (PrebakePhase::Booting, Some(_)) => true,
                    (PrebakePhase::Held, Some((_, r))) => {
                        r.state == miehisto::instance::InstanceState::HeldAtStop
                    }
                    (PrebakePhase::Dumping, Some(_)) => {
                        in_staging(&img, "criu-dump-started").is_some()
                    }
                    _ => false,
                };
                if hit {
                    seen = inst;
                }
                assert!(
                    runmh.try_wait().expect("try_wait").is_none(),
                    "{what}: runmh ended first: {}",
                    c.stderr_of("kprebake")
                );
                hit
            });
            let (inst, rec) = seen.expect("instance");
            let root = rec.root_pid;
            // The tree is in the instance's cgroup (CI must exercise it;
            // a child just cloned moves itself in as its first step).
            let own = format!("/miehisto/{}", inst.id);
            wait_for(&format!("{what}: {root} in {own}"), || {
                cgroup_of(root).ends_with(&own) || !alive(root)
            });
            sigkill(runmh_pid, how);
            wait_exit(&mut runmh, &what);
            // The sandbox's PID 1 goes down with its supervisor at once
            // (its parent-death signal): no later run is needed for that.
            let t0 = Instant::now();
            while alive(root) {
                assert!(
                    t0.elapsed() < DEADLINE,
                    "timed out waiting for {what}: the service ends; the surviving root {root}: {}",
                    survivor(root)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(!img.exists(), "{what}: nothing published");
            c.next_prebake_cleans(&img, backend, port, &inst.id);
            c.assert_clean();
        }
    }
}

#[test]
fn killed_prebake_trace_leaves_nothing_running() {
    let Some(_g) = common::privileged("killed_prebake_trace_leaves_nothing_running") else {
        return;
    };
    killed_prebakes("trace");
}

#[test]
fn killed_prebake_notify_leaves_nothing_running() {
    let Some(_g) = common::privileged("killed_prebake_notify_leaves_nothing_running") else {
        return;
    };
    killed_prebakes("notify");
}

/// When a restore is killed, and what.
#[derive(Debug, Clone, Copy)]
enum RestoreKill {
    /// CRIU, as soon as it starts restoring.
    Criu,
    /// The front `runmh restore` (the supervisor-to-be), while CRIU restores.
    Front,
    /// The front's whole group (the front and CRIU) while CRIU restores.
    FrontGroup,
    /// The supervisor of a detached restore, once the service runs.
    Supervisor,
    /// A waiting front and its supervisor (one group), once it runs.
    RunningGroup,
}

impl Case {
    /// The next restore of `img` answers on `port`; it is then stopped.
    fn next_restore_serves(&self, img: &Path, port: u16, what: &str) -> String {
        let criu = common::criu_path().expect("criu");
        let out = self.restore(&criu, img, true).output().expect("restore");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{what}: the next restore: {err}");
        common::wait_http(port, DEADLINE).expect("the next restore serves");
        // The restored instance is the running one; a killed run's may
        // still be listed beside it.
        let (_, rec) = self
            .instances()
            .into_iter()
            .find(|(_, r)| {
                r.state == miehisto::instance::InstanceState::Running && alive(r.supervisor_pid)
            })
            .expect("the restored instance");
        kill(Pid::from_raw(rec.supervisor_pid), Signal::SIGTERM).expect("SIGTERM the supervisor");
        self.assert_clean();
        err
    }
}

/// A restore's marker file `name` (holding CRIU's pid) once it appears in
/// an instance directory: that directory, its instance id and the pid.
fn restore_marker(c: &Case, what: &str, name: &str) -> (PathBuf, String, i32) {
    let mut marker = None;
    wait_for(&format!("{what}: {name}"), || {
        marker = c
            .instance_dirs()
            .into_iter()
            .map(|d| d.join(name))
            .find(|p| !common::read(p).trim().is_empty());
        marker.is_some()
    });
    let marker = marker.expect("marker");
    let dir = marker.parent().expect("instance dir").to_path_buf();
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .expect("instance id");
    let pid = common::read(&marker).trim().parse().expect("criu pid");
    (dir, id, pid)
}

impl Case {
    /// The next restore serves and says it removed the dead instance `id`,
    /// whose cgroup is gone.
    fn next_restore_cleans(&self, img: &Path, port: u16, what: &str, id: &str) {
        let err = self.next_restore_serves(img, port, what);
        assert!(
            err.contains(&format!("removed the instance {id} ")),
            "{what}: the next restore names what it cleaned: {err}"
        );
        assert!(!instance_cgroup(id).exists(), "{what}: cgroup removed");
    }
}

fn killed_restores(backend: &str) {
    let c = Case::new(&format!("flt-krestore-{backend}"));
    let (img, port) = c.prebaked("img", backend);
    let criu = wrapped_criu(&c, "rs", "", "");
    for (kind, how) in [
        (RestoreKill::Criu, Kill::Process),
        (RestoreKill::Front, Kill::Process),
        (RestoreKill::FrontGroup, Kill::Group),
        (RestoreKill::Supervisor, Kill::Process),
        (RestoreKill::RunningGroup, Kill::Group),
    ] {
        let what = format!("{backend} {kind:?}");
        let detach = matches!(kind, RestoreKill::Supervisor);
        let mut cmd = c.restore(&criu, &img, detach);
        cmd.process_group(0);
        let mut front = c.spawn(cmd, "krestore");
        let front_pid = miehisto::sys::child_pid(&front).as_raw();
        let mut dead_id = None;
        match kind {
            RestoreKill::Criu | RestoreKill::Front | RestoreKill::FrontGroup => {
                let (_, id, criu_pid) = restore_marker(&c, &what, "criu-started");
                match kind {
                    RestoreKill::Criu => sigkill(criu_pid, how),
                    _ => sigkill(front_pid, how),
                }
                let st = wait_exit(&mut front, &what);
                match kind {
                    RestoreKill::Criu => {
                        // The front saw its CRIU die and ended the instance
                        // (its cgroup: a half-restored tree) itself.
                        assert!(!st.success(), "{what}");
                        c.assert_clean();
                        assert!(!instance_cgroup(&id).exists(), "{what}: cgroup removed");
                    }
                    _ => {
                        // The restored root would be the dead front's child
                        // (--restore-sibling), with nobody to supervise it:
                        // CRIU dies with its front (its parent-death
                        // signal), and the next run ends what it left. The
                        // next run may only judge that once CRIU is gone: a
                        // dying process still holds its instance's cgroup.
                        wait_for(&format!("{what}: CRIU dies with its front"), || {
                            !alive(criu_pid)
                        });
                        dead_id = Some(id);
                    }
                }
            }
            RestoreKill::Supervisor | RestoreKill::RunningGroup => {
                let mut rec = None;
                wait_for(&format!("{what}: the service runs"), || {
                    rec = c
                        .instances()
                        .into_iter()
                        .find(|(_, r)| r.state == miehisto::instance::InstanceState::Running);
                    rec.is_some()
                });
                let (inst, rec) = rec.expect("record");
                common::wait_http(port, DEADLINE).expect("restored service answers");
                let root = rec.root_pid;
                assert!(
                    cgroup_of(root).ends_with(&format!("/miehisto/{}", inst.id)),
                    "{what}: the restored tree is in its instance's cgroup: {:?}",
                    cgroup_of(root)
                );
                assert!(
                    !cgroup_of(rec.supervisor_pid).contains(&inst.id),
                    "{what}: its supervisor left it: {:?}",
                    cgroup_of(rec.supervisor_pid)
                );
                if detach {
                    wait_exit(&mut front, &what);
                    sigkill(rec.supervisor_pid, how);
                } else {
                    sigkill(front_pid, how);
                    wait_exit(&mut front, &what);
                }
                // The restored root kept its parent-death signal.
                wait_for(&format!("{what}: the restored service ends"), || {
                    !alive(root)
                });
                wait_for(&format!("{what}: the killed supervisor is gone"), || {
                    !alive(rec.supervisor_pid)
                });
                dead_id = Some(inst.id);
            }
        }
        // Whatever a killed owner left, the next run on the same port
        // finds it, ends it and says so.
        match dead_id.filter(|id| c.instance_dirs().iter().any(|d| d.ends_with(id))) {
            Some(id) => c.next_restore_cleans(&img, port, &what, &id),
            None => {
                c.next_restore_serves(&img, port, &what);
            }
        }
    }
}

#[test]
fn killed_restore_trace_leaves_nothing_running() {
    let Some(_g) = common::privileged("killed_restore_trace_leaves_nothing_running") else {
        return;
    };
    killed_restores("trace");
}

#[test]
fn killed_restore_notify_leaves_nothing_running() {
    let Some(_g) = common::privileged("killed_restore_notify_leaves_nothing_running") else {
        return;
    };
    killed_restores("notify");
}

/// The state letter of `pid` in /proc (R, S, T, ...).
fn state_of(pid: i32) -> char {
    miehisto::sys::procfs::stat(Pid::from_raw(pid))
        .map(|s| s.state.letter())
        .unwrap_or('?')
}

fn killed_dumps(backend: &str) {
    let c = Case::new(&format!("flt-kdump-{backend}"));
    let (img, port) = c.prebaked("img", backend);
    // The dump's CRIU never gets to run: the tree stays frozen for it.
    let criu = wrapped_criu(&c, "dmp", "exec sleep 1000", "");
    let real = common::criu_path().expect("criu");
    for how in [Kill::Process, Kill::Group] {
        let what = format!("{backend} dump {how:?}");
        let out = c.restore(&real, &img, true).output().expect("restore");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::wait_http(port, DEADLINE).expect("restored service answers");
        let (inst, rec) = c.instances().pop().expect("the restored instance");
        let root = rec.root_pid;
        let img2 = c.state.join(format!("dumped-{how:?}"));
        let mut cmd = c.runmh(&criu);
        cmd.arg("dump")
            .arg("--pid")
            .arg(rec.supervisor_pid.to_string())
            .arg("--images")
            .arg(&img2)
            .process_group(0);
        let mut dumper = c.spawn(cmd, "kdump");
        let mut marker = None;
        wait_for(&format!("{what}: the dump's CRIU starts"), || {
            marker = in_staging(&img2, "criu-dump-started")
                .filter(|p| !common::read(p).trim().is_empty());
            marker.is_some()
        });
        let criu_pid: i32 = common::read(&marker.expect("marker"))
            .trim()
            .parse()
            .expect("criu pid");
        if backend == "trace" {
            // The case: frozen in group-stop, no tracer.
            assert_eq!(
                state_of(root),
                'T',
                "{what}: the tree is frozen for the dump"
            );
        }
        sigkill(miehisto::sys::child_pid(&dumper).as_raw(), how);
        wait_exit(&mut dumper, &what);
        // Its supervisor sees the dumper gone without a thaw: it kills the
        // tree, ends, and removes the instance.
        wait_for(&format!("{what}: the service ends"), || !alive(root));
        wait_for(&format!("{what}: the supervisor ends"), || {
            !alive(rec.supervisor_pid)
        });
        if how == Kill::Process {
            // The wrapper outlived its runmh; it is ours to end.
            sigkill(criu_pid, Kill::Process);
        }
        c.assert_clean();
        assert!(
            !instance_cgroup(&inst.id).exists(),
            "{what}: cgroup removed"
        );
        assert!(!img2.exists(), "{what}: nothing published");
        let err = c.stderr_of("kdump");
        assert!(
            err.is_empty() || !err.contains("image published"),
            "{what}: {err}"
        );
        // The service comes back, and a dump to the same place succeeds
        // (and removes the killed one's staging directory).
        let out = c.restore(&real, &img, true).output().expect("restore");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::wait_http(port, DEADLINE).expect("restored again");
        let (_, rec) = c.instances().pop().expect("the restored instance");
        let out = c
            .runmh(&real)
            .arg("dump")
            .arg("--pid")
            .arg(rec.supervisor_pid.to_string())
            .arg("--images")
            .arg(&img2)
            .output()
            .expect("dump");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Metadata::read(&img2).expect("a whole image");
        assert_eq!(
            beside(&img2),
            Vec::<String>::new(),
            "{what}: nothing half-published"
        );
        c.assert_clean();
        std::fs::remove_dir_all(&img2).expect("remove the dump");
    }
}

#[test]
fn killed_dump_trace_kills_the_frozen_tree() {
    let Some(_g) = common::privileged("killed_dump_trace_kills_the_frozen_tree") else {
        return;
    };
    killed_dumps("trace");
}

#[test]
fn killed_dump_notify_kills_the_held_tree() {
    let Some(_g) = common::privileged("killed_dump_notify_kills_the_held_tree") else {
        return;
    };
    killed_dumps("notify");
}

/// `runmh run`'s supervisor killed: its cold-started service goes with it,
/// and the next run of the same command on the same port starts.
#[test]
fn killed_cold_supervisor_takes_its_service_along() {
    let Some(_g) = common::privileged("killed_cold_supervisor_takes_its_service_along") else {
        return;
    };
    let c = Case::new("flt-kcold");
    let real = common::criu_path().expect("criu");
    let port = common::free_port();
    let run = |label: &str| {
        let mut cmd = c.runmh(&real);
        cmd.arg("run")
            .arg("-e")
            .arg(&c.tag)
            .arg("--")
            .arg(common::payload("simple_server"))
            .args(["--port", &port.to_string()])
            .process_group(0);
        c.spawn(cmd, label)
    };
    for how in [Kill::Process, Kill::Group] {
        let mut sup = run("kcold");
        common::wait_http(port, DEADLINE).expect("the cold service answers");
        let (inst, rec) = c.one_instance().expect("instance");
        assert!(cgroup_of(rec.root_pid).ends_with(&format!("/miehisto/{}", inst.id)));
        sigkill(miehisto::sys::child_pid(&sup).as_raw(), how);
        wait_exit(&mut sup, "killed runmh run");
        wait_for("the cold service ends", || !alive(rec.root_pid));
        let mut next = run("kcold-next");
        common::wait_http(port, DEADLINE).expect("the next run answers on the same port");
        let err = c.stderr_of("kcold-next");
        assert!(
            err.contains(&format!("removed the instance {} ", inst.id)),
            "the next run names what it cleaned: {err}"
        );
        assert!(!instance_cgroup(&inst.id).exists());
        kill(miehisto::sys::child_pid(&next), Signal::SIGTERM).expect("SIGTERM");
        wait_exit(&mut next, "runmh run after SIGTERM");
        c.assert_clean();
    }
}

/// The issue's own case under the daemon: miehistod and the whole process
/// group of its runmh (runmh and CRIU) SIGKILLed while CRIU dumps a
/// prebake. The service goes down with its runmh; the restarted daemon
/// ends the dead instance (and says so), publishes nothing half-written,
/// and the next prebake and start of the same service on the same port
/// succeed.
fn killed_daemon_prebake(backend: &str) {
    use common::daemon::Mhctl;
    let mut c = Case::for_daemon(&format!("fkd{backend}"));
    let criu = wrapped_criu(&c, "d", "", "");
    let criu_arg = criu.to_string_lossy().into_owned();
    c.start_daemon(&["--criu", &criu_arg]);
    let port = common::free_port();
    let payload = common::payload("simple_server");
    c.ok(&[
        "service",
        "create",
        "web",
        "--backend",
        backend,
        "-e",
        &c.tag,
        "--",
        payload.to_str().expect("utf-8 path"),
        "--port",
        &port.to_string(),
    ]);
    let mut client = c.spawn(
        {
            let mut m = c.mhctl_cmd();
            m.args(["service", "prebake", "web"]);
            m
        },
        "kd-prebake",
    );
    let gen1 = c.state.join("images/web/1");
    wait_for("the daemon's prebake reaches CRIU", || {
        in_staging(&gen1, "criu-dump-started").is_some()
    });
    let runmh_state = c.state.join("runmh");
    let (inst, rec) = miehisto::instance::Instance::list(&runmh_state)
        .into_iter()
        .find(|(_, r)| r.root_pid > 0)
        .expect("the prebake's instance");
    let root = rec.root_pid;
    assert!(
        cgroup_of(root).ends_with(&format!("/miehisto/{}", inst.id)),
        "{:?}",
        cgroup_of(root)
    );
    // runmh leads its own process group (the daemon's children do).
    sigkill(rec.supervisor_pid, Kill::Group);
    c.stop_daemon(Signal::SIGKILL);
    wait_exit(&mut client, "mhctl service prebake");
    wait_for("the service ends with its runmh", || !alive(root));
    assert!(!gen1.exists(), "nothing published");

    c.restart_daemon();
    let log = common::read(&c.daemon_log(c.daemon_starts));
    assert!(
        log.contains(&format!("removed the instance {} ", inst.id)),
        "the restarted daemon names what it cleaned: {log}"
    );
    assert!(!instance_cgroup(&inst.id).exists(), "cgroup removed");
    let img = c.json(&["service", "prebake", "web"]);
    assert_eq!(img["valid"], true, "{img}");
    let gen = img["generation"].as_u64().expect("generation");
    let beside_gen = beside(&c.state.join(format!("images/web/{gen}")));
    assert_eq!(beside_gen, Vec::<String>::new(), "nothing half-published");
    let started = c.json(&["service", "start", "web"]);
    assert_eq!(started["state"], "running", "{started}");
    common::wait_http(port, DEADLINE).expect("the service answers on its port");
    c.ok(&["service", "stop", "web"]);
    c.stop_daemon(Signal::SIGTERM);
    c.assert_clean();
    assert!(
        miehisto::instance::Instance::list(&runmh_state).is_empty(),
        "no runmh instance left"
    );
}

#[test]
fn killed_daemon_and_runmh_group_trace() {
    let Some(_g) = common::privileged("killed_daemon_and_runmh_group_trace") else {
        return;
    };
    killed_daemon_prebake("trace");
}

#[test]
fn killed_daemon_and_runmh_group_notify() {
    let Some(_g) = common::privileged("killed_daemon_and_runmh_group_notify") else {
        return;
    };
    killed_daemon_prebake("notify");
}

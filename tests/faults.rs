//! Fault injection (issue 11): damaged images, runaway and killed CRIU
//! runs, signals in the middle of a restore. Each test syncs on a real
//! event (a file a CRIU wrapper writes when CRIU starts, a log line), never
//! on a blind sleep, and ends with nothing left running or mounted.

mod common;

use common::case::{wait_exit, Case, DEADLINE};

use miehisto::images::Metadata;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
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
    let _g = common::lock();
    if !common::require_privileged("damaged_images_are_refused_before_criu") {
        return;
    }
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
    std::fs::write(&script, text).expect("write criu wrapper");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    script
}

/// A CRIU whose log grows without end (as the restorer's `Preadv ...
/// returned 0` loop did) is ended, with its children, once the log passes
/// the limit; the error names the log.
#[test]
fn runaway_criu_log_is_bounded() {
    let _g = common::lock();
    if !common::require_privileged("runaway_criu_log_is_bounded") {
        return;
    }
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
    let _g = common::lock();
    if !common::require_privileged("hung_criu_is_ended_by_time_and_by_sigterm") {
        return;
    }
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
            .find(|p| p.exists());
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
    let _g = common::lock();
    if !common::require_privileged("state_images_and_logs_are_private") {
        return;
    }
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
        if m.file_type().is_symlink() || p.starts_with(c.state.join("criu-")) {
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

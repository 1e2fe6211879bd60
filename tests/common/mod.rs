//! Shared helpers of the integration tests: prerequisites (root, CRIU),
//! a process-wide lock, ports, HTTP, payload paths, temporary state dirs.
//!
//! Privileged tests call [`require_privileged`] first: on a developer
//! laptop without root or CRIU they skip with a printed reason; when
//! `CI=true` a missing prerequisite is a failure, never a silent skip.
#![allow(dead_code)]

pub mod case;
pub mod daemon;
pub mod hosts;
pub mod registry;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

static LOCK: Mutex<()> = Mutex::new(());

/// Serialises tests that fork, trace, mount or run CRIU within one test binary.
pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process-wide lock and the privilege check of a test that forks,
/// traces or runs CRIU: None, after [`require_privileged`] printed why, when
/// the test skips.
pub fn privileged(test: &str) -> Option<MutexGuard<'static, ()>> {
    let g = lock();
    require_privileged(test).then_some(g)
}

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// The CRIU the tests use: $MIEHISTO_CRIU, else the set-up step's.
pub fn criu_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MIEHISTO_CRIU").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".deps/criu/sbin/criu");
    p.is_file().then_some(p)
}

/// Returns false (after printing why) when the test must skip; panics in CI.
pub fn require_privileged(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    match criu_path() {
        None => missing.push("CRIU (run `bash setup/install.sh`)".to_string()),
        Some(p) => {
            if let Err(e) = miehisto::criu::Criu::at(&p) {
                missing.push(format!("a usable CRIU: {e}"));
            }
        }
    }
    require(test, (!missing.is_empty()).then(|| missing.join(", ")))
}

/// True when nothing is `missing`; else false after printing which
/// prerequisite the test lacks, or a panic in CI (where a missing
/// prerequisite is a failure, not a skip).
pub fn require(test: &str, missing: Option<String>) -> bool {
    let Some(m) = missing else {
        return true;
    };
    let msg = format!("{test}: needs {m}");
    if in_ci() {
        panic!("{msg} (CI=true: a missing prerequisite is a failure)");
    }
    eprintln!("SKIP {msg}");
    false
}

pub fn runmh() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_runmh"))
}

pub fn payload(name: &str) -> PathBuf {
    Path::new(env!("MIEHISTO_PAYLOAD_DIR")).join(name)
}

pub fn python_payload() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/http_server.py")
}

/// Debian's python3 (installed by the set-up step), else the one on PATH.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MIEHISTO_PYTHON").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let p = PathBuf::from("/usr/bin/python3");
    if p.exists() {
        p
    } else {
        PathBuf::from("python3")
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A fresh temporary directory on the root filesystem (the sandbox root is
/// a bind of `/`, so state and logs must live there, not on another mount).
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "mh-test-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0))
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

/// One HTTP/1.0 GET; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(parse_http(&buf))
}

/// An HTTP response's status code (0 when there is none) and body.
pub fn parse_http(buf: &str) -> (u16, String) {
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Polls until a GET answers 200, up to `timeout`.
pub fn wait_http(port: u16, timeout: Duration) -> Result<String, String> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < timeout {
        match http_get(port, "/") {
            Ok((200, body)) => return Ok(body),
            Ok((c, _)) => last = format!("status {c}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "no HTTP 200 on port {port} within {timeout:?}: {last}"
    ))
}

/// `runmh` with the test's state dir and CRIU.
pub fn runmh_cmd(state: &Path) -> Command {
    let mut c = Command::new(runmh());
    c.arg("--state-dir").arg(state);
    if let Some(p) = criu_path() {
        c.arg("--criu").arg(p);
    }
    c.stdin(Stdio::null());
    c
}

/// Waits for a child with a deadline; kills it when the deadline passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The single log directory under `state/logs` (for services started by
/// runmh with the default log location).
pub fn only_log_dir(state: &Path) -> PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(state.join("logs"))
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop().expect("a log directory")
}

/// Writes `text` to `path` as an executable script (mode 0755): the CRIU
/// wrappers, fakes and action scripts the tests hand to runmh.
pub fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Mount points whose path mentions the state dir: must be none after a test.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    read(Path::new("/proc/self/mountinfo"))
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Is `pid` alive (a zombie or a dead task is not)?
pub fn alive(pid: i32) -> bool {
    miehisto::sys::procfs::alive(nix::unistd::Pid::from_raw(pid))
}

/// The parent pid of `pid`, from /proc.
pub fn ppid_of(pid: i32) -> Option<i32> {
    miehisto::sys::procfs::ppid(nix::unistd::Pid::from_raw(pid)).map(|p| p.as_raw())
}

pub fn comm_of(pid: i32) -> String {
    read(Path::new(&format!("/proc/{pid}/comm")))
        .trim()
        .to_string()
}

/// Count of log lines containing `needle`.
pub fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// Ends the services a daemon with state dir `state` still runs, while
/// the daemon lives: SIGKILLs each one's service and supervisor, then waits
/// (up to 5 s) for the daemon to end their instances, cgroups included, as
/// it does for any runmh child that dies without cleaning up. Returns the
/// instance directories still there.
pub fn kill_daemon_services(state: &Path) -> Vec<PathBuf> {
    let runmh_state = state.join("runmh");
    for (_, r) in miehisto::instance::Instance::list(&runmh_state) {
        for pid in [r.root_pid, r.supervisor_pid] {
            if pid > 0 && alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let left = || -> Vec<PathBuf> {
        std::fs::read_dir(runmh_state.join("instances"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let t0 = Instant::now();
    while !left().is_empty() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    left()
}

/// Removes the cgroups of the runmh instances still under `state` (runmh's
/// own, and a daemon's in `state/runmh`), killing what is left in them,
/// and says so: a test that kills an owner with no daemon around to see
/// it, and then deletes the state dir, would otherwise leave them under
/// `<hierarchy>/miehisto/` for good.
pub fn remove_instance_cgroups(state: &Path) {
    for dir in [state.join("instances"), state.join("runmh/instances")] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Some(cg) = miehisto::sandbox::cgroup::InstanceCgroup::existing(&id) {
                eprintln!(
                    "teardown: removing the cgroup of instance {id}, left in {}",
                    dir.display()
                );
                if let Err(e) = cg.destroy() {
                    eprintln!("teardown: cgroup of instance {id}: {e}");
                }
            }
        }
    }
}

/// The programs of `need` (path, Debian package) that are not installed,
/// as one line naming each with its package; None when all are there.
pub fn missing_programs(need: &[(&str, &str)]) -> Option<String> {
    let missing: Vec<String> = need
        .iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .map(|(p, pkg)| format!("{p} (package {pkg}; run `bash setup/install.sh`)"))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

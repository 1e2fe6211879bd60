//! Driving a `miehistod` from a test: starting one and waiting until it
//! answers, and running `mhctl` against it with the checks every daemon test
//! makes (success, failure, JSON, one service's entry). A [`Case`]'s daemon
//! and a fleet host's daemon (in its own network namespace) share all of it
//! through the [`Mhctl`] trait; only how `mhctl` is launched differs.

use super::case::Case;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn miehistod_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_miehistod"))
}

pub fn mhctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mhctl"))
}

/// `cmd` (a miehistod command line) spawned with its output in `log`;
/// returns once `answers()` is true. Panics, with the log, when the daemon
/// exits early or does not answer within 20 s.
pub fn spawn_daemon(mut cmd: Command, log: &Path, answers: impl Fn() -> bool) -> Child {
    let out = std::fs::File::create(log).expect("daemon log");
    let err = out.try_clone().expect("daemon log");
    // The tests' CRIU, unless the test passes its own (a fault-injecting wrapper).
    if !cmd.get_args().any(|a| a == "--criu") {
        if let Some(criu) = super::criu_path() {
            cmd.arg("--criu").arg(criu);
        }
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = cmd.spawn().expect("spawn miehistod");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("miehistod exited early ({st}): {}", super::read(log));
        }
        if answers() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("miehistod did not answer: {}", super::read(log));
}

/// `service create NAME OPTIONS... -- python3 examples/http_server.py
/// --port PORT SERVER_ARGS...`: the test service most daemon tests use.
/// Its working directory is the crate's unless `options` give a `-C`.
pub fn python_service_args(
    name: &str,
    options: &[&str],
    port: u16,
    server_args: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = ["service", "create", name]
        .iter()
        .chain(options)
        .map(|s| s.to_string())
        .collect();
    if !options.contains(&"-C") {
        a.extend(["-C".to_string(), env!("CARGO_MANIFEST_DIR").to_string()]);
    }
    a.push("--".into());
    for p in [super::python(), super::python_payload()] {
        a.push(p.to_str().expect("utf-8 path").to_string());
    }
    a.extend(["--port".to_string(), port.to_string()]);
    a.extend(server_args.iter().map(|s| s.to_string()));
    a
}

/// `mhctl` against one daemon, and the checks tests make of its answers.
pub trait Mhctl {
    /// An `mhctl` command set up to talk to this daemon.
    fn mhctl_cmd(&self) -> Command;

    /// What explains a failed command (the daemon's log).
    fn context(&self) -> String;

    fn mhctl(&self, args: &[&str]) -> Output {
        self.mhctl_cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run mhctl")
    }

    /// `mhctl ARGS` run as `uid` (its gid the same, no supplementary
    /// groups) through setpriv, from `/`.
    fn mhctl_as(&self, uid: u32, args: &[&str]) -> Output {
        let base = self.mhctl_cmd();
        let id = uid.to_string();
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
            .arg(base.get_program())
            .args(base.get_args())
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.output().expect("run setpriv")
    }

    /// Runs mhctl and insists on success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.mhctl(args);
        assert!(
            out.status.success(),
            "mhctl {args:?} failed ({}): {}{}\n--- daemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.context()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs mhctl and insists on failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.mhctl(args);
        assert!(
            !out.status.success(),
            "mhctl {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `mhctl ARGS --json` parsed (the flag goes right after the command
    /// group: anything after `--` would be argv).
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.insert(1, "--json");
        let text = self.ok(&a);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("mhctl {args:?} --json printed no JSON ({e}): {text}"))
    }

    /// Creates the python test service ([`python_service_args`]); returns
    /// the created service's JSON.
    fn create_python(
        &self,
        name: &str,
        options: &[&str],
        port: u16,
        server_args: &[&str],
    ) -> Value {
        let args = python_service_args(name, options, port, server_args);
        self.json(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The entry of `service list` for `name`, if it is listed.
    fn find_service(&self, name: &str) -> Option<Value> {
        self.json(&["service", "list"])
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
    }

    /// The entry of `service list` for `name`; panics when it is not listed.
    fn service(&self, name: &str) -> Value {
        self.find_service(name).unwrap_or_else(|| {
            panic!(
                "{name} is not in the list: {}",
                self.json(&["service", "list"])
            )
        })
    }
}

/// A daemon test's world is a [`Case`] with a miehistod of its own on a
/// socket in the scratch dir; everything goes when the case is dropped.
impl Case {
    /// Starts this case's miehistod with `extra` arguments (remembered for
    /// [`Case::restart_daemon`]) and waits until it answers `ping`.
    pub fn start_daemon(&mut self, extra: &[&str]) {
        assert!(self.daemon.is_none(), "a daemon is already running");
        self.daemon_args = extra.iter().map(|a| a.to_string()).collect();
        self.daemon_starts += 1;
        let mut c = Command::new(miehistod_bin());
        c.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra);
        let log = self.daemon_log(self.daemon_starts);
        let child = spawn_daemon(c, &log, || self.mhctl(&["ping"]).status.success());
        self.daemon = Some(child);
    }

    /// Starts the daemon again with the arguments of its last start.
    pub fn restart_daemon(&mut self) {
        let args = std::mem::take(&mut self.daemon_args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_daemon(&args);
    }

    pub fn daemon_pid(&self) -> i32 {
        miehisto::sys::child_pid(self.daemon.as_ref().expect("daemon running")).as_raw()
    }

    /// Ends the daemon with `sig` and waits for it.
    pub fn stop_daemon(&mut self, sig: nix::sys::signal::Signal) {
        let mut child = self.daemon.take().expect("daemon running");
        let _ = nix::sys::signal::kill(miehisto::sys::child_pid(&child), sig);
        assert!(
            super::wait_child(&mut child, Duration::from_secs(20)).is_some(),
            "miehistod did not exit on {sig}"
        );
    }
}

impl Mhctl for Case {
    fn mhctl_cmd(&self) -> Command {
        let mut c = Command::new(mhctl_bin());
        c.arg("--socket").arg(&self.socket);
        c
    }

    fn context(&self) -> String {
        super::read(&self.daemon_log(self.daemon_starts))
    }
}

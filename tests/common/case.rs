//! One integration test's world: a fresh scratch dir holding the state dir,
//! and a tag put into every service's environment so that leftover
//! processes can be found in /proc (without pgrep, and without ever
//! touching another test's processes). A daemon test also runs a
//! `miehistod` of its own on a socket in the scratch dir (common/daemon.rs). Test files add
//! their own methods in `impl Case` blocks.

use miehisto::instance::{Instance, InstanceRecord};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Generous deadlines: they only keep a broken run from hanging forever.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Case {
    /// The test's scratch dir; everything below it goes on drop.
    pub dir: PathBuf,
    /// The state dir: `dir` itself for runmh, `dir/state` for a daemon.
    pub state: PathBuf,
    /// `MH_TEST_TAG=<scratch dir name>`, for `-e`.
    pub tag: String,
    /// Where this test's miehistod listens (daemon tests).
    pub socket: PathBuf,
    /// This test's miehistod, while it runs; killed on drop.
    pub daemon: Option<Child>,
    /// How many times a daemon was started (each logs to `daemon-N.log`).
    pub daemon_starts: u32,
    /// The extra arguments of the daemon's last start, for a restart.
    pub daemon_args: Vec<String>,
}

impl Case {
    /// A runmh test's world: the scratch dir is the state dir.
    pub fn new(name: &str) -> Case {
        Case::in_dir(super::temp_dir(name), None)
    }

    /// A daemon test's world: the state dir is `state` in the scratch dir,
    /// beside the daemon's socket and logs.
    pub fn for_daemon(name: &str) -> Case {
        let dir = super::temp_dir(name);
        let state = dir.join("state");
        Case::in_dir(dir, Some(state))
    }

    fn in_dir(dir: PathBuf, state: Option<PathBuf>) -> Case {
        let tag = format!(
            "MH_TEST_TAG={}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        Case {
            state: state.unwrap_or_else(|| dir.clone()),
            socket: dir.join("miehistod.sock"),
            dir,
            tag,
            daemon: None,
            daemon_starts: 0,
            daemon_args: Vec::new(),
        }
    }

    /// Spawns a long-running runmh with its output going to files in the
    /// state dir (a pipe nobody reads could block it).
    pub fn spawn(&self, mut cmd: Command, label: &str) -> Child {
        let out = std::fs::File::create(self.state.join(format!("{label}.out")))
            .expect("create out file");
        let err = std::fs::File::create(self.state.join(format!("{label}.err")))
            .expect("create err file");
        cmd.stdout(out).stderr(err).spawn().expect("spawn runmh")
    }

    pub fn stderr_of(&self, label: &str) -> String {
        super::read(&self.state.join(format!("{label}.err")))
    }

    pub fn instances(&self) -> Vec<(Instance, InstanceRecord)> {
        Instance::list(&self.state)
    }

    pub fn instance_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state.join("instances"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// A daemon's services and their supervisors still alive, according to
    /// the records of the runmh children it keeps beneath its state dir.
    pub fn live_services(&self) -> Vec<i32> {
        Instance::list(&self.state.join("runmh"))
            .into_iter()
            .flat_map(|(_, r)| [r.root_pid, r.supervisor_pid])
            .filter(|&p| p > 0 && super::alive(p))
            .collect()
    }

    /// Processes of this test still alive: services carrying the tag in
    /// their environment, runmh, miehistod and CRIU processes naming the
    /// scratch dir. (A zombie has an empty cmdline and environ: it holds
    /// nothing.)
    pub fn leftovers(&self) -> Vec<(i32, String)> {
        let me = nix::unistd::getpid().as_raw();
        let dir = self.dir.to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let has_tag = environ.split(|b| *b == 0).any(|v| v == self.tag.as_bytes());
            if has_tag || String::from_utf8_lossy(&cmdline).contains(&dir) {
                found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
        found
    }

    /// No process, mount or instance directory of this test is left. The
    /// supervisor removes its instance directory right after its service
    /// ended; exiting processes get a moment to vanish.
    pub fn assert_clean(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < DEADLINE
            && (!self.leftovers().is_empty() || !self.instance_dirs().is_empty())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            self.leftovers(),
            Vec::<(i32, String)>::new(),
            "processes left behind"
        );
        assert_eq!(
            super::mounts_under(&self.state),
            Vec::<String>::new(),
            "mounts left behind"
        );
        let dirs = self.instance_dirs();
        let what: Vec<String> = dirs
            .iter()
            .map(|d| {
                let files: Vec<String> = std::fs::read_dir(d)
                    .map(|rd| {
                        rd.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "{}: files {files:?}, record {}",
                    d.display(),
                    super::read(&d.join("instance.json"))
                )
            })
            .collect();
        assert!(
            dirs.is_empty(),
            "instance directories left behind:\n{}",
            what.join("\n")
        );
    }

    /// The daemon's log of its `n`th start.
    pub fn daemon_log(&self, n: u32) -> PathBuf {
        self.dir.join(format!("daemon-{n}.log"))
    }

    /// The logs that explain a failed daemon test.
    fn daemon_logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = (1..=self.daemon_starts)
            .map(|i| self.daemon_log(i))
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.state.join("logs")) {
            for d in rd.flatten() {
                logs.extend(
                    ["runmh.log", "stdout.log", "stderr.log"]
                        .iter()
                        .map(|f| d.path().join(f)),
                );
            }
        }
        logs
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() && self.daemon_starts > 0 {
            // The directory is about to go: show what explains the failure.
            for l in self.daemon_logs() {
                eprintln!("===== {}\n{}", l.display(), super::read(&l));
            }
        }
        // The daemon's services first, while it runs to end their
        // instances. Only processes this test started carry its tag or
        // scratch path, or are in its daemon's records.
        if self.daemon.is_some() {
            let left = super::kill_daemon_services(&self.state);
            if !left.is_empty() {
                eprintln!("teardown: the daemon did not end the instances {left:?}");
            }
        }
        let pids = self.live_services().into_iter();
        for pid in pids.chain(self.leftovers().into_iter().map(|(p, _)| p)) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let t0 = Instant::now();
        while !self.live_services().is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        super::remove_instance_cgroups(&self.state);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    super::wait_child(child, DEADLINE)
        .unwrap_or_else(|| panic!("{what} did not exit within {DEADLINE:?}"))
}

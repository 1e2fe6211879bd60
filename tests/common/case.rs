//! One integration test's world: a fresh state dir, and a tag put into
//! every service's environment so that leftover processes can be found in
//! /proc (without pgrep, and without ever touching another test's
//! processes). Test files add their own methods in `impl Case` blocks.

use miehisto::instance::{Instance, InstanceRecord};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Generous deadlines: they only keep a broken run from hanging forever.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Case {
    pub state: PathBuf,
    /// `MH_TEST_TAG=<state dir name>`, for `-e`.
    pub tag: String,
}

impl Case {
    pub fn new(name: &str) -> Case {
        let state = super::temp_dir(name);
        let tag = format!(
            "MH_TEST_TAG={}",
            state
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        Case { state, tag }
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

    /// Processes of this test still alive: services carrying the tag in
    /// their environment, runmh and CRIU processes naming the state dir.
    /// (A zombie has an empty cmdline and environ: it holds nothing.)
    pub fn leftovers(&self) -> Vec<(i32, String)> {
        let me = nix::unistd::getpid().as_raw();
        let state = self.state.to_string_lossy().into_owned();
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
            if has_tag || String::from_utf8_lossy(&cmdline).contains(&state) {
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
        assert_eq!(
            self.instance_dirs(),
            Vec::<PathBuf>::new(),
            "instance directories left behind"
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        // Only processes this test started carry its tag or state path.
        for (pid, _) in self.leftovers() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

pub fn wait_exit(child: &mut Child, what: &str) -> ExitStatus {
    super::wait_child(child, DEADLINE)
        .unwrap_or_else(|| panic!("{what} did not exit within {DEADLINE:?}"))
}

//! One cgroup per instance: `<hierarchy>/miehisto/<instance id>` in the
//! cgroup v2 hierarchy, holding the sandbox's tree (and, for a restore, the
//! CRIU that forks it). Whatever ends runmh, however abruptly, the tree can
//! be found and killed as a whole: `cgroup.kill` (Linux 5.14) SIGKILLs every
//! process in it at once, then the empty directory is removed.
//!
//! The hierarchy is found at run time (a pure v2 system mounts it on
//! /sys/fs/cgroup, a hybrid one beside the v1 controllers, e.g. at
//! /sys/fs/cgroup/unified). No controller is enabled and no limit set: the
//! cgroup only names the tree. Without a usable hierarchy, runmh says so
//! once and relies on the parent-death signal alone.

use nix::libc;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The directory below the hierarchy's root that miehisto owns.
pub const PARENT: &str = "miehisto";
/// How long a killed cgroup may take to empty (SIGKILLed tasks exit in
/// milliseconds; one in uninterruptible sleep holds it longer).
const EMPTY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked for a cgroup2 entry in /proc/self/mountinfo)"
    )]
    NoHierarchy,
    #[error("{id:?} is not an instance id (digits, a dash, digits)")]
    BadId { id: String },
    #[error("cannot create the cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move pid {pid} into {path}")]
    Join {
        pid: i32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot kill the processes of {path}")]
    Kill {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cgroup {path} still holds pids {pids:?} {secs}s after SIGKILL")]
    StillPopulated {
        path: PathBuf,
        pids: Vec<i32>,
        secs: u64,
    },
    #[error("cannot remove the cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The cgroup2 mount point in a mountinfo text: /sys/fs/cgroup when it is
/// one (pure v2), else the first cgroup2 mount (hybrid).
fn hierarchy_in(mountinfo: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            // mountinfo escapes space, tab, newline and backslash as octal.
            found.push(PathBuf::from(unescape(mp)));
        }
    }
    found
        .iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or(found.first())
        .cloned()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: &u8| (b'0'..=b'7').contains(c);
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(octal) {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where distributions mount cgroup2: pure v2, then systemd's hybrid.
const USUAL_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The cgroup v2 hierarchy of this mount namespace, looked up once: a
/// statfs of the usual places first, since every restore and run asks and
/// the kernel renders the whole mountinfo for a read of it (0.1-0.2 ms
/// measured in `runmh restore`'s start); mountinfo only for a hierarchy
/// mounted elsewhere.
pub fn hierarchy() -> Result<&'static Path, CgroupError> {
    static H: OnceLock<Option<PathBuf>> = OnceLock::new();
    H.get_or_init(|| {
        USUAL_MOUNTS
            .iter()
            .map(Path::new)
            .find(|p| is_cgroup2(p))
            .map(Path::to_path_buf)
            .or_else(|| {
                crate::sys::procfs::read_text("/proc/self/mountinfo")
                    .ok()
                    .and_then(|t| hierarchy_in(&t))
            })
    })
    .as_deref()
    .ok_or(CgroupError::NoHierarchy)
}

/// An instance id as `Instance::create` makes them: `<ms>-<pid>`. Checked
/// before any path is built from one, so a corrupt name never reaches
/// `cgroup.kill` outside miehisto's own directory.
pub fn valid_id(id: &str) -> bool {
    let mut parts = id.splitn(2, '-');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next())
}

/// The cgroup v2 path (as `/proc/<pid>/cgroup` shows it, from the
/// hierarchy's root) of `pid`, `None` for "self".
pub fn cgroup_of(pid: Option<i32>) -> Option<String> {
    let file = match pid {
        Some(p) => format!("/proc/{p}/cgroup"),
        None => "/proc/self/cgroup".to_string(),
    };
    let text = crate::sys::procfs::read_text(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// One instance's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroup {
    pub path: PathBuf,
}

fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

impl InstanceCgroup {
    /// Where instance `id`'s cgroup is (whether or not it exists).
    pub fn locate(id: &str) -> Result<InstanceCgroup, CgroupError> {
        if !valid_id(id) {
            return Err(CgroupError::BadId { id: id.into() });
        }
        Ok(InstanceCgroup {
            path: hierarchy()?.join(PARENT).join(id),
        })
    }

    /// Creates instance `id`'s cgroup (and miehisto's directory above it).
    pub fn create(id: &str) -> Result<InstanceCgroup, CgroupError> {
        let cg = InstanceCgroup::locate(id)?;
        let create = |path: &Path| match std::fs::create_dir(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(CgroupError::Create {
                path: path.to_path_buf(),
                source: e,
            }),
            _ => Ok(()),
        };
        // The parent exists after the first instance: made only when the
        // instance's own mkdir says it is missing.
        match std::fs::create_dir(&cg.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = cg.path.parent() {
                    create(parent)?;
                }
                create(&cg.path)?;
            }
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(CgroupError::Create {
                    path: cg.path.clone(),
                    source: e,
                })
            }
            _ => {}
        }
        Ok(cg)
    }

    /// Instance `id`'s cgroup if it exists.
    pub fn existing(id: &str) -> Option<InstanceCgroup> {
        InstanceCgroup::locate(id)
            .ok()
            .filter(|cg| cg.path.is_dir())
    }

    fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// `cgroup.procs` opened for writing: a child writes "0" to it (one
    /// async-signal-safe write) to move itself in before it runs anything.
    pub fn procs_for_child(&self) -> Result<OwnedFd, CgroupError> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.procs_path())
            .map(OwnedFd::from)
            .map_err(|source| CgroupError::Open {
                path: self.procs_path(),
                source,
            })
    }

    /// The cgroup's directory, open for clone3's CLONE_INTO_CGROUP (see
    /// [`crate::sys::fork_into_cgroup`]): a child started in it needs no
    /// `cgroup.procs` write.
    pub fn dir_for_clone(&self) -> Result<OwnedFd, CgroupError> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.path)
            .map(OwnedFd::from)
            .map_err(|source| CgroupError::Open {
                path: self.path.clone(),
                source,
            })
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn join(&self, pid: i32) -> Result<(), CgroupError> {
        std::fs::write(self.procs_path(), pid.to_string()).map_err(|source| CgroupError::Join {
            pid,
            path: self.path.clone(),
            source,
        })
    }

    /// The processes in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.procs_path())
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup and waits until it is empty;
    /// returns the pids it held. `cgroup.kill` where the kernel has it;
    /// otherwise SIGKILL to each listed pid until none is left (a fork
    /// racing the loop lands in the cgroup and is listed next round).
    pub fn kill_all(&self) -> Result<Vec<i32>, CgroupError> {
        let me = nix::unistd::getpid().as_raw();
        let first = self.pids();
        if first.contains(&me) {
            // Killing our own cgroup would kill us: the caller moves out first.
            return Err(CgroupError::Kill {
                path: self.path.clone(),
                source: std::io::Error::other("this process is inside it"),
            });
        }
        if first.is_empty() && !populated(&self.path) {
            return Ok(first);
        }
        let kill_file = self.path.join("cgroup.kill");
        let by_file = kill_file.exists() && std::fs::write(&kill_file, "1").is_ok();
        let t0 = Instant::now();
        loop {
            let left = self.pids();
            if left.is_empty() && !populated(&self.path) {
                return Ok(first);
            }
            if !by_file {
                for p in &left {
                    let _ = crate::sys::kill(nix::unistd::Pid::from_raw(*p), libc::SIGKILL);
                }
            }
            if t0.elapsed() > EMPTY_WAIT {
                return Err(CgroupError::StillPopulated {
                    path: self.path.clone(),
                    pids: left,
                    secs: EMPTY_WAIT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills what is left in the cgroup and removes it; returns the pids
    /// that were killed. A cgroup already gone is fine.
    pub fn destroy(&self) -> Result<Vec<i32>, CgroupError> {
        if !self.path.exists() {
            return Ok(Vec::new());
        }
        let killed = self.kill_all()?;
        // rmdir can race the last exiting task's release: retry briefly.
        let t0 = Instant::now();
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(killed),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(killed),
                Err(e)
                    if t0.elapsed() < Duration::from_secs(2)
                        && e.raw_os_error() == Some(libc::EBUSY) =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

/// Says once per process that instance cgroups are unavailable and why.
pub fn warn_unavailable(e: &CgroupError) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        log::warn!(
            "no instance cgroup ({}): a service is tied to runmh by the parent-death signal only, and a tree left by a killed restore cannot be found",
            crate::error_chain(e)
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchy_is_the_cgroup2_mount_pure_v2_first() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            hierarchy_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "40 1 0:30 / /mnt/odd\\040place rw - cgroup2 cgroup2 rw\n\
                    41 1 0:31 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(hierarchy_in(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let odd = "40 1 0:30 / /mnt/odd\\040place rw - cgroup2 cgroup2 rw\n";
        assert_eq!(hierarchy_in(odd), Some(PathBuf::from("/mnt/odd place")));
        assert_eq!(
            hierarchy_in("32 30 0:28 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn only_instance_ids_name_a_cgroup() {
        assert!(valid_id("1796125489262-19484"));
        for bad in [
            "",
            "-",
            "1-",
            "-2",
            "..",
            "1-2/../../system.slice",
            "a-1",
            "1-2-3",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}

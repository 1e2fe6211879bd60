//! CRIU restores in the instance cgroup, so that the root task it forks
//! starts there (a fork only takes the kernel's `cgroup_threadgroup_rwsem`
//! for reading). The process CRIU execs into afterwards, the supervisor,
//! must not stay in it: killing the instance's tree must not kill its
//! supervisor. Moving a process is a `cgroup.procs` write, which takes that
//! rwsem for writing and so waits for an RCU grace period (5–120 ms here,
//! NOTES.md §6). Done by the supervisor, that wait sat between CRIU's end
//! and the service's first response. Done here, by the front process, it
//! overlaps CRIU's page read: as soon as the tree's root is in the cgroup
//! CRIU is needed there no longer — CRIU forks only the root task, the root
//! forks the rest of the tree (CRIU's `restore_root_task`).
//!
//! The root is the first task in the cgroup, CRIU aside, that lives in a
//! PID namespace of its own ("NSpid" with two or more levels): a helper
//! CRIU forks for itself (a user namespace's `usernsd`) stays in CRIU's
//! namespace and must not be mistaken for it. The supervisor still checks
//! its own cgroup and moves itself when this did not happen in time.

use crate::sandbox::cgroup::{self, InstanceCgroup};
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use nix::unistd::Pid;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the cgroup is looked at: the root appears 5–10 ms after CRIU's
/// exec and the page read that follows takes 10 ms or more.
const POLL: Duration = Duration::from_micros(500);

/// What became of the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// CRIU (and so its supervisor) is back in the front's cgroup.
    Moved,
    /// The move was refused; the supervisor tries again itself.
    Refused,
    /// CRIU ended, or the restore was over, before its root appeared.
    NoRoot,
}

/// The thread that moves CRIU out; [`Leaver::finish`] (or drop) ends it.
pub struct Leaver {
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<Left>>,
}

/// True when `pids` (a `cgroup.procs` listing) holds a task other than
/// `criu` that `levels` says lives in a nested PID namespace.
pub fn root_arrived(pids: &[i32], criu: i32, mut levels: impl FnMut(i32) -> usize) -> bool {
    pids.iter().any(|&p| p != criu && levels(p) >= 2)
}

fn ns_levels(pid: i32) -> usize {
    crate::sys::procfs::status(Pid::from_raw(pid)).map_or(0, |s| s.ns_pids.len())
}

impl Leaver {
    /// Starts watching `instance` for `criu`'s root task; then moves `criu`
    /// to `origin` (a path below the cgroup2 mount, as `/proc/PID/cgroup`
    /// names it).
    pub fn start(instance: InstanceCgroup, origin: String, criu: Pid) -> Leaver {
        let (stop, stopped) = bounded::<()>(0);
        let spawned = std::thread::Builder::new()
            .name("leave-cgroup".into())
            .spawn(move || loop {
                if root_arrived(&instance.pids(), criu.as_raw(), ns_levels) {
                    return match cgroup::move_to(&origin, criu.as_raw()) {
                        Ok(()) => Left::Moved,
                        Err(e) => {
                            log::debug!(
                                "{}; the supervisor leaves the instance cgroup itself",
                                crate::error_chain(&e)
                            );
                            Left::Refused
                        }
                    };
                }
                if !crate::sys::procfs::alive(criu) {
                    return Left::NoRoot;
                }
                match stopped.recv_timeout(POLL) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return Left::NoRoot,
                }
            });
        match spawned {
            Ok(handle) => Leaver {
                stop: Some(stop),
                handle: Some(handle),
            },
            Err(e) => {
                log::debug!(
                    "cannot start the cgroup-leaving thread: {e}; the supervisor moves itself"
                );
                Leaver {
                    stop: None,
                    handle: None,
                }
            }
        }
    }

    /// Ends the watch (a move under way completes first) and says what
    /// became of it.
    pub fn finish(mut self) -> Left {
        self.end()
    }

    fn end(&mut self) -> Left {
        drop(self.stop.take());
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(left)) => left,
            Some(Err(_)) | None => Left::NoRoot,
        }
    }
}

impl Drop for Leaver {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_task_in_a_nested_pid_namespace_is_the_root() {
        let levels = |p: i32| match p {
            10 => 1, // CRIU itself
            11 => 1, // a helper CRIU forked for itself (usernsd)
            12 => 2, // the root task: pid 1 of the restored namespace
            _ => 0,  // gone before its status was read
        };
        assert!(!root_arrived(&[], 10, levels));
        assert!(!root_arrived(&[10], 10, levels));
        assert!(!root_arrived(&[10, 11], 10, levels));
        assert!(!root_arrived(&[10, 13], 10, levels));
        assert!(root_arrived(&[10, 11, 12], 10, levels));
        // CRIU is never its own root, whatever its namespace.
        assert!(!root_arrived(&[10], 10, |_| 2));
    }
}

//! Services run as another user (`-u`), in a user namespace we own.
//!
//! `criu dump` reads every task's rlimits with prlimit(2), and the kernel
//! lets a process read another user's limits only with CAP_SYS_RESOURCE in
//! the *target's* user namespace (check_prlimit_permission in
//! kernel/sys.c). Some hosts drop CAP_SYS_RESOURCE from root's bounding set
//! (CapBnd 000001fffeffffff: bit 24 clear), and there every dump of a
//! non-root service failed with `Can't get rlimit 0: Operation not
//! permitted`. But the owner of a user namespace holds every capability
//! inside it, whatever its own bounding set (cap_capable in
//! security/commoncap.c: `ns->parent == cred->user_ns && ns->owner ==
//! cred->euid`). So the sandbox child is cloned with CLONE_NEWUSER besides
//! CLONE_NEWPID|CLONE_NEWNS (the PID and mount namespaces are then owned by
//! the new user namespace, which CRIU requires: "One or more namespaces
//! doesn't belong to the target user namespace" otherwise), and we write an
//! identity map of every id (`0 0 4294967295`): the service's uid is the
//! same number inside and out, files keep their owners, and inside it the
//! service, once it switched ids, has no capability at all.
//!
//! A mount namespace created with a user namespace gets its mounts locked
//! together (mount_namespaces(7)): the talk's non-recursive bind of `/`
//! fails with EINVAL there. The parent therefore takes detached copies of
//! `/` and of each special mount with `open_tree(OPEN_TREE_CLONE)` before
//! the clone, and the child attaches them with `move_mount(2)`. On restore
//! CRIU's own binds hit the same lock, so each external mount is staged as
//! a lone bind first (see `criu::private_root`).

use crate::sys;
use crate::sys::procfs;
use nix::libc;
use nix::unistd::Pid;
use std::path::PathBuf;

/// Capability number of CAP_SYS_RESOURCE (linux/capability.h).
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Every id mapped to itself; what `/proc/PID/{uid,gid}_map` get.
pub const IDENTITY_MAP: &str = "0 0 4294967295\n";

/// How the sandbox gives a service its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSwitch {
    /// The service runs with our own ids.
    Keep,
    /// setgid/setuid in a user namespace we own (the usual way).
    UserNs,
    /// setgid/setuid in our own user namespace: user namespaces are not
    /// available, but we hold CAP_SYS_RESOURCE, so CRIU can dump it anyway.
    Direct,
}

/// What this host allows, as [`probe`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIds {
    /// CAP_SYS_RESOURCE is in our effective set.
    pub cap_sys_resource: bool,
    /// Our bounding set, when /proc said.
    pub bounding: Option<u64>,
    /// `Err(why)` when a user namespace cannot be created (or its mounts
    /// cannot be attached).
    pub userns: Result<(), String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("cannot run a service as {uid}:{gid} here: criu dump needs CAP_SYS_RESOURCE to read another user's rlimits (prlimit(2)) and this process lacks it ({bounding}), and no user namespace is possible ({why}); run the service as root, or give runmh CAP_SYS_RESOURCE or user namespaces")]
    Refused {
        uid: u32,
        gid: u32,
        bounding: String,
        why: String,
    },
    #[error("cannot write {path} of the sandbox child {pid}")]
    Map {
        path: PathBuf,
        pid: Pid,
        #[source]
        source: std::io::Error,
    },
}

fn has_cap(set: u64, cap: u32) -> bool {
    set & (1u64 << cap) != 0
}

/// Can this process create a user namespace whose mount namespace gets
/// detached mounts attached? (A throw-away child tries.)
fn userns_works() -> Result<(), String> {
    // The copy a sandbox would take first.
    sys::open_tree_clone(c"/").map_err(|e| format!("open_tree(2) of /: {e}"))?;
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if max.trim() == "0" {
        return Err("user.max_user_namespaces is 0".into());
    }
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    // The child's word, not its exit status, is the answer: a tracer
    // thread of this process may reap it first (waitpid(-1)).
    // SAFETY: the child only calls write and _exit, which are
    // async-signal-safe, on an fd made before the clone.
    let pid = match unsafe { sys::clone_fork(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) } {
        Ok(0) => {
            let _ = sys::write_all(std::os::fd::AsRawFd::as_raw_fd(&w), b"y");
            sys::exit_now(0)
        }
        Ok(pid) => pid,
        Err(e) => return Err(format!("clone(CLONE_NEWUSER): {e}")),
    };
    drop(w);
    let mut b = [0u8; 1];
    let said = sys::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut b);
    let _ = sys::waitpid(pid, 0);
    match said {
        Ok(1) => Ok(()),
        other => Err(format!(
            "the probe child in a new user namespace did not answer ({other:?})"
        )),
    }
}

/// Looks at our capabilities and tries a user namespace (once per
/// process: neither changes while it runs).
pub fn probe() -> HostIds {
    static HOST: std::sync::OnceLock<HostIds> = std::sync::OnceLock::new();
    HOST.get_or_init(probe_now).clone()
}

fn probe_now() -> HostIds {
    let me = procfs::status(nix::unistd::getpid()).ok();
    HostIds {
        cap_sys_resource: me
            .as_ref()
            .and_then(|s| s.cap_eff)
            .is_some_and(|c| has_cap(c, CAP_SYS_RESOURCE)),
        bounding: me.and_then(|s| s.cap_bnd),
        userns: userns_works(),
    }
}

/// How a service run as `ids` gets them, given our own ids `own` and what
/// the host allows. A user namespace whenever one is possible (one path,
/// the same on every host); else a direct switch, which CRIU can dump only
/// with CAP_SYS_RESOURCE; else a refusal, before anything runs.
pub fn decide(ids: (u32, u32), own: (u32, u32), host: &HostIds) -> Result<IdSwitch, UsernsError> {
    if ids == own {
        return Ok(IdSwitch::Keep);
    }
    match &host.userns {
        Ok(()) => Ok(IdSwitch::UserNs),
        Err(_) if host.cap_sys_resource => Ok(IdSwitch::Direct),
        Err(why) => Err(UsernsError::Refused {
            uid: ids.0,
            gid: ids.1,
            bounding: match host.bounding {
                Some(b) if !has_cap(b, CAP_SYS_RESOURCE) => {
                    format!("not in its capability bounding set {b:016x}")
                }
                _ => "not in its effective set".into(),
            },
            why: why.clone(),
        }),
    }
}

/// [`decide`] for a service run as `uid:gid` by this process on this host.
pub fn switch_for(uid: u32, gid: u32) -> Result<IdSwitch, UsernsError> {
    let own = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if (uid, gid) == own {
        return Ok(IdSwitch::Keep);
    }
    decide((uid, gid), own, &probe())
}

/// Gives the freshly cloned child `pid` its identity maps (it waits for
/// them before it touches anything). We are the namespace's parent with
/// CAP_SETUID/CAP_SETGID there, so any map may be written, once.
pub fn write_maps(pid: Pid) -> Result<(), UsernsError> {
    for file in ["uid_map", "gid_map"] {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::write(&path, IDENTITY_MAP).map_err(|source| UsernsError::Map {
            path: path.clone(),
            pid,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cap: bool, userns: Result<(), String>) -> HostIds {
        HostIds {
            cap_sys_resource: cap,
            bounding: Some(if cap {
                0x1ff_ffff_ffff
            } else {
                0x1ff_feff_ffff
            }),
            userns,
        }
    }

    #[test]
    fn own_ids_need_nothing() {
        let h = host(false, Err("no".into()));
        assert_eq!(decide((0, 0), (0, 0), &h).unwrap(), IdSwitch::Keep);
    }

    #[test]
    fn a_user_namespace_is_preferred_wherever_it_works() {
        for cap in [false, true] {
            let h = host(cap, Ok(()));
            assert_eq!(
                decide((65534, 65534), (0, 0), &h).unwrap(),
                IdSwitch::UserNs
            );
        }
        // Another group alone is enough to need it (prlimit compares gids too).
        assert_eq!(
            decide((0, 50), (0, 0), &host(false, Ok(()))).unwrap(),
            IdSwitch::UserNs
        );
    }

    #[test]
    fn without_user_namespaces_cap_sys_resource_decides() {
        let h = host(true, Err("user.max_user_namespaces is 0".into()));
        assert_eq!(decide((1000, 1000), (0, 0), &h).unwrap(), IdSwitch::Direct);
        let h = host(false, Err("user.max_user_namespaces is 0".into()));
        let e = decide((65534, 65534), (0, 0), &h).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("CAP_SYS_RESOURCE"), "{msg}");
        assert!(msg.contains("65534:65534"), "{msg}");
        assert!(msg.contains("bounding set 000001fffeffffff"), "{msg}");
        assert!(msg.contains("user.max_user_namespaces is 0"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn the_map_covers_every_id_once() {
        let f: Vec<u64> = IDENTITY_MAP
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(f, vec![0, 0, u64::from(u32::MAX)]);
    }
}

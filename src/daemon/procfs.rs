//! What the daemon reads from /proc about processes it may not be the
//! parent of (services it took back after a restart): liveness that does
//! not count zombies, and parent pids.

use std::path::Path;

/// `(state, ppid)` from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, i32)> {
    if pid <= 0 {
        return None;
    }
    let s = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: the fields that follow start after the last ')'.
    let mut it = s.rsplit_once(')')?.1.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Is `pid` a live process? A zombie is not: whoever its parent is (after
/// a daemon restart, perhaps an init that reaps slowly), it has ended.
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((s, _)) if s != 'Z' && s != 'X' && s != 'x')
}

pub fn ppid(pid: i32) -> Option<i32> {
    stat(pid).map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive_and_has_a_parent() {
        let me = nix::unistd::getpid().as_raw();
        assert!(alive(me));
        assert_eq!(ppid(me), Some(nix::unistd::getppid().as_raw()));
        assert!(!alive(0));
        assert!(!alive(-1));
    }
}

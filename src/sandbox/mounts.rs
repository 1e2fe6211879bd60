//! Which host mounts the sandbox binds one by one, and whether a path will
//! be visible inside it. The sandbox root is a *non-recursive* bind of the
//! host `/` (a copy of the whole tree, with its stacked /dev/pts and /dev/shm
//! mounts, makes `criu dump` fail: see NOTES.md), so anything on another
//! mount is invisible unless it is one of these special mounts.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Special mounts bound individually, in this order (a parent before its
/// children), with the key CRIU's `--external mnt[...]` uses for each.
pub const SPECIAL_MOUNTS: &[(&str, &str)] = &[
    ("/dev", "dev"),
    ("/dev/pts", "devpts"),
    ("/dev/shm", "devshm"),
    ("/dev/mqueue", "devmqueue"),
    ("/sys", "sys"),
];

/// One host mount bound into the sandbox, named for CRIU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalMount {
    /// Mount point, the same on the host and inside the sandbox.
    pub path: PathBuf,
    /// The key CRIU records instead of the mount's source.
    pub key: String,
}

/// Mount points of the caller's mount namespace, from /proc/self/mountinfo.
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mount_points(&text))
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect()
}

/// The special mounts present on this host, in bind order.
pub fn externals_for(mounts: &[PathBuf]) -> Vec<ExternalMount> {
    SPECIAL_MOUNTS
        .iter()
        .filter(|(p, _)| mounts.iter().any(|m| m == Path::new(p)))
        .map(|(p, k)| ExternalMount {
            path: PathBuf::from(p),
            key: k.to_string(),
        })
        .collect()
}

/// The mount point `path` lives on (longest matching prefix).
pub fn mount_of<'a>(path: &Path, mounts: &'a [PathBuf]) -> Option<&'a PathBuf> {
    mounts
        .iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
}

/// Will `path` (which must exist) be reachable inside the sandbox?
pub fn visible_in_sandbox(path: &Path, mounts: &[PathBuf], externals: &[ExternalMount]) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    match mount_of(&real, mounts) {
        Some(m) => m == Path::new("/") || externals.iter().any(|e| &e.path == m),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw
26 24 0:24 / /dev/pts rw,relatime - devpts devpts rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
29 26 0:26 / /dev/pts rw,relatime - devpts devpts rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw
40 27 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw
";

    #[test]
    fn parses_and_orders_special_mounts() {
        let m = parse_mount_points(SAMPLE);
        assert!(m.contains(&PathBuf::from("/mnt/with space")));
        let ext = externals_for(&m);
        let keys: Vec<_> = ext.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["dev", "devpts", "devshm", "sys"]);
    }

    #[test]
    fn finds_the_mount_of_a_path() {
        let m = parse_mount_points(SAMPLE);
        assert_eq!(
            mount_of(Path::new("/sys/fs/cgroup/pids"), &m).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(mount_of(Path::new("/work/x"), &m).unwrap(), Path::new("/"));
        assert_eq!(
            mount_of(Path::new("/dev/null"), &m).unwrap(),
            Path::new("/dev")
        );
    }
}

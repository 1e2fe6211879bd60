//! Bare `criu restore`: the baseline runmh's restore is compared against.
//! The same CRIU command line runmh builds (src/criu/argv.rs), in the same
//! private root (src/criu/private_root.rs), with the same kdat cache when
//! runmh would use one — but no instance, no checks and no supervisor: CRIU
//! restores the tree as this process's child (`--restore-sibling`),
//! detaches and exits; this process kills and reaps it afterwards.

use super::BenchError;
use crate::criu::{private_root, Criu, RestoreArgs};
use crate::images::Metadata;
use crate::sys;
use nix::libc;
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

/// Restores `images` with bare CRIU; returns the restored root's host pid.
/// With `tmpfs_run`, CRIU finds `kdat` (when given) as its kdat cache.
pub fn restore(
    criu: &Criu,
    images: &Path,
    dir: &Path,
    md: &Metadata,
    tmpfs_run: bool,
    kdat: Option<&[u8]>,
) -> Result<i32, BenchError> {
    let args = RestoreArgs {
        // CRIU runs in a private root with its own working directory, where
        // a relative --images-dir would name another directory.
        images_dir: std::path::absolute(images).map_err(|source| BenchError::Absolute {
            path: images.to_path_buf(),
            source,
        })?,
        work_dir: dir.to_path_buf(),
        log_name: "restore.log".into(),
        root: dir.join("root"),
        externals: md.externals.clone(),
        pidfile: dir.join("restored.pid"),
        inherit_fds: Vec::new(),
        leave_stopped: false,
    };
    let run_tmpfs = tmpfs_run.then(|| kdat.map(<[u8]>::to_vec));
    let pid = private_root::restore_detached(criu, &args, &[], run_tmpfs)?;
    // What runmh's supervisor does for a NOTIFY image: a tree dumped in
    // group-stop comes back stopped. A no-op for a running tree.
    let _ = sys::kill(pid, libc::SIGCONT);
    Ok(pid.as_raw())
}

/// Kills a restored tree (its root is its PID namespace's init, so the
/// whole namespace goes) and reaps the root, bounded.
pub fn kill_tree(root: i32) {
    let _ = sys::kill(Pid::from_raw(root), libc::SIGKILL);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        match sys::waitpid(root, libc::WNOHANG) {
            Ok(Some(_)) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            // Not our child (no subreaper): wait for it to vanish instead.
            Err(_) => {
                if !sys::procfs::alive(Pid::from_raw(root)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

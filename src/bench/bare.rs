//! Bare `criu restore`: the baseline runmh's restore is compared against.
//! The same CRIU command line runmh builds (src/criu/argv.rs), in the same
//! kind of private mount namespace with the host `/` bound onto `--root`,
//! with the same kdat cache when runmh would use one — but
//! `--restore-detached` instead of `--exec-cmd`, and no supervisor: CRIU
//! restores the tree, detaches, exits. The restored tree is re-parented to
//! this process (a child subreaper), which kills and reaps it afterwards.

use super::BenchError;
use crate::criu::{kdat, Criu, CriuError, RestoreArgs};
use crate::images::Metadata;
use crate::sys;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Makes `cmd` start in a private mount namespace with the host `/` bound
/// onto `root` and, when `tmpfs_run`, a tmpfs over /run holding `kdat`.
fn in_private_mount_ns(cmd: &mut Command, root: CString, tmpfs_run: bool, kdat: Option<Vec<u8>>) {
    let hook = move || -> std::io::Result<()> {
        let os = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
        sys::unshare(libc::CLONE_NEWNS).map_err(os)?;
        sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE).map_err(os)?;
        sys::mount(Some(c"/"), &root, None, libc::MS_BIND).map_err(os)?;
        if tmpfs_run {
            // As in runmh's restore: best effort, CRIU probes without it.
            let _ = kdat::install_in_child(kdat.as_deref());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec; it only calls
    // the async-signal-safe wrappers of crate::sys on data moved into it
    // before the fork, and allocates nothing (io::Error::from_raw_os_error
    // does not allocate).
    unsafe { cmd.pre_exec(hook) };
}

/// Restores `images` with bare CRIU; returns the restored root's host pid.
pub fn restore(
    criu: &Criu,
    images: &Path,
    dir: &Path,
    md: &Metadata,
    tmpfs_run: bool,
    kdat: Option<&[u8]>,
) -> Result<i32, BenchError> {
    let args = RestoreArgs {
        images_dir: std::path::absolute(images).unwrap_or_else(|_| images.to_path_buf()),
        work_dir: dir.to_path_buf(),
        log_name: "restore.log".into(),
        root: dir.join("root"),
        externals: md.externals.clone(),
        pidfile: dir.join("restored.pid"),
        exec_cmd: Vec::new(),
    };
    let mut argv = args.argv();
    argv.push("--restore-detached".into());
    let root = CString::new(args.root.as_os_str().as_bytes()).map_err(|_| BenchError::Io {
        path: args.root.clone(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let mut cmd = Command::new(&criu.path);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    in_private_mount_ns(&mut cmd, root, tmpfs_run, kdat.map(<[u8]>::to_vec));
    let status = cmd.status().map_err(|source| BenchError::Spawn {
        what: "bare criu restore".into(),
        source,
    })?;
    let log = dir.join("restore.log");
    if !status.success() {
        let line = crate::criu::log::decisive_line_of(&log);
        return Err(CriuError::RestoreFailed {
            images: images.to_path_buf(),
            line,
            log,
        }
        .into());
    }
    let pid: i32 = std::fs::read_to_string(&args.pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| BenchError::Io {
            path: args.pidfile.clone(),
            source: std::io::ErrorKind::InvalidData.into(),
        })?;
    // What runmh's supervisor does for a NOTIFY image: a tree dumped in
    // group-stop comes back stopped. A no-op for a running tree.
    let _ = sys::kill(Pid::from_raw(pid), libc::SIGCONT);
    Ok(pid)
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
                if !Path::new(&format!("/proc/{root}")).exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

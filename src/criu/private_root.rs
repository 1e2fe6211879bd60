//! The root every restore runs in. `criu restore --root DIR` needs DIR to
//! be a mount point holding the tree the image expects, and a sandbox's
//! root is a bind of the host `/`. So a restore enters a private mount
//! namespace, binds the host `/` onto a fresh directory (non-recursively:
//! the image names each other mount it needs as an external, mapped back
//! on the command line) and runs CRIU there. Nothing of it is seen by the
//! host, and it all goes with the last process in the namespace.
//!
//! CRIU binds each external mount from the host path the command line
//! names, non-recursively. When the image's tree is in a user namespace CRIU
//! does that from inside it, where a mount with submounts (`/dev` with
//! `/dev/pts`, `/sys` with cgroups) is locked to them and a lone bind of it
//! fails with EINVAL. So every restore first binds each external mount
//! alone onto a staging directory ([`stage_externals`]) and names that: a
//! mount without submounts binds anywhere, and the result is the same.
//!
//! runmh's own restore forks by hand and calls [`enter`] in the child; the
//! bare restores that runmh's is measured and compared against (the bench's
//! baseline, the research matrix's patched-CRIU rows) use
//! [`restore_detached`].

use super::{kdat, log, Criu, CriuError, RestoreArgs};
use crate::sandbox::ExternalMount;
use crate::sys;
use nix::errno::Errno;
use nix::libc;
use nix::unistd::Pid;
use std::ffi::{CStr, CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;

/// A step of [`enter`], for the report of a child that failed at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Unshare,
    MakePrivate,
    BindRoot,
    BindExternal,
}

impl Step {
    /// What the step does, in words (plain text without quotes or
    /// backslashes: runmh's restore child copies it into a JSON message).
    pub fn name(self) -> &'static str {
        match self {
            Step::Unshare => "unshare the mount namespace",
            Step::MakePrivate => "make the mounts private",
            Step::BindRoot => "bind the host root",
            Step::BindExternal => "bind an external mount alone",
        }
    }
}

/// External mounts as a restore names them: each host mount bound alone
/// (by [`enter`]) onto its own directory under `dir`.
#[derive(Debug, Clone)]
pub struct Staged {
    /// What CRIU's command line maps each key to.
    pub externals: Vec<ExternalMount>,
    /// (host mount, staging directory) pairs for [`enter`].
    pub binds: Vec<(CString, CString)>,
}

/// Prefix of the staging directories in a restore's directory.
const STAGE_PREFIX: &str = "ext-";

/// Creates the staging directories in `dir` (which must not be under the
/// restore's root) for `externals`: `ext-<i>`, beside the restore's other
/// files rather than in a directory of their own, one mkdir fewer on every
/// restore (an ext4 mkdir is 30-60 us here).
pub fn stage_externals(dir: &Path, externals: &[ExternalMount]) -> Result<Staged, CriuError> {
    let mut staged = Staged {
        externals: Vec::new(),
        binds: Vec::new(),
    };
    for (i, e) in externals.iter().enumerate() {
        let at = dir.join(format!("{STAGE_PREFIX}{i}"));
        crate::files::private_dir(&at).map_err(|source| CriuError::Stage {
            path: at.clone(),
            source,
        })?;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| CriuError::Root {
                path: p.to_path_buf(),
            })
        };
        staged.binds.push((c(&e.path)?, c(&at)?));
        staged.externals.push(ExternalMount {
            path: at,
            key: e.key.clone(),
        });
    }
    Ok(staged)
}

/// Async-signal-safe, for a forked child before it execs CRIU: enters a
/// fresh private mount namespace, binds the host `/` onto `root` and each
/// external mount of `stage` alone onto its directory. With
/// `run_tmpfs` it also mounts a tmpfs over `/run` for CRIU's kdat cache,
/// holding the saved cache when there is one (see [`kdat`]).
pub fn enter(
    root: &CStr,
    stage: &[(CString, CString)],
    run_tmpfs: Option<Option<&[u8]>>,
) -> Result<(), (Step, Errno)> {
    sys::unshare(libc::CLONE_NEWNS).map_err(|e| (Step::Unshare, e))?;
    // Private, so that neither the bind below nor the tmpfs reaches the host.
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(|e| (Step::MakePrivate, e))?;
    sys::mount(Some(c"/"), root, None, libc::MS_BIND).map_err(|e| (Step::BindRoot, e))?;
    for (src, dst) in stage {
        sys::mount(Some(src), dst, None, libc::MS_BIND).map_err(|e| (Step::BindExternal, e))?;
    }
    // After the non-recursive bind above, so the restored tree's root never
    // sees this tmpfs; only CRIU and what it execs do. Best effort: without
    // it CRIU just probes the kernel.
    if let Some(data) = run_tmpfs {
        let _ = kdat::install_in_child(data);
    }
    Ok(())
}

/// The command line of [`restore_detached`], for `--explain`.
pub fn detached_argv(args: &RestoreArgs, extra: &[&str]) -> Vec<OsString> {
    let mut argv = args.argv();
    argv.extend(extra.iter().map(OsString::from));
    argv
}

/// `criu restore --restore-detached` (plus `extra` options) of `args`
/// inside a private root ([`enter`] on `args.root`, which must exist):
/// CRIU restores the tree as a sibling (the root is this process's child,
/// forked by the calling thread: its parent-death signal, if the image has
/// one, fires when that thread ends), detaches and exits. Returns the
/// restored root's host pid.
pub fn restore_detached(
    criu: &Criu,
    args: &RestoreArgs,
    extra: &[&str],
    run_tmpfs: Option<Option<Vec<u8>>>,
) -> Result<Pid, CriuError> {
    let root = CString::new(args.root.as_os_str().as_bytes()).map_err(|_| CriuError::Root {
        path: args.root.clone(),
    })?;
    let staged = stage_externals(&args.work_dir, &args.externals)?;
    let args = &RestoreArgs {
        externals: staged.externals,
        ..args.clone()
    };
    let stage = staged.binds;
    // CRIU opens its pidfile O_EXCL.
    let _ = std::fs::remove_file(&args.pidfile);
    let mut cmd = criu.command();
    cmd.args(detached_argv(args, extra))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let hook = move || -> std::io::Result<()> {
        enter(&root, &stage, run_tmpfs.as_ref().map(|d| d.as_deref()))
            .map_err(|(_, e)| std::io::Error::from_raw_os_error(e as i32))
    };
    // SAFETY: the hook runs in the forked child before exec; it only calls
    // the async-signal-safe wrappers of crate::sys on data moved into it
    // before the fork, and allocates nothing (io::Error::from_raw_os_error
    // does not allocate).
    unsafe { cmd.pre_exec(hook) };
    let status = cmd.status().map_err(|source| CriuError::Spawn {
        path: criu.path.clone(),
        source,
    })?;
    let log = args.work_dir.join(&args.log_name);
    if !status.success() {
        return Err(CriuError::RestoreFailed {
            images: args.images_dir.clone(),
            line: log::decisive_line_of(&log),
            log,
        });
    }
    let pidfile = &args.pidfile;
    let text = std::fs::read_to_string(pidfile).map_err(|source| CriuError::Pidfile {
        path: pidfile.clone(),
        source,
    })?;
    let bad = |what: String| CriuError::Pidfile {
        path: pidfile.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    };
    let pid: libc::pid_t = text
        .trim()
        .parse()
        .map_err(|e| bad(format!("{:?} is not a pid: {e}", text.trim())))?;
    // 0 or a negative number would make a later kill(2) signal a group.
    if pid <= 0 {
        return Err(bad(format!("{pid} is not a process's pid")));
    }
    Ok(Pid::from_raw(pid))
}

//! CRIU command lines, built as data so they can be shown (`--explain`),
//! tested, and run.

use crate::sandbox::ExternalMount;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `-D IMAGES -W WORK -o LOG -v4`: every CRIU run here logs at `-v4` into
/// its work dir, where the restore breakdown and the decisive-line finder
/// read it (`-o` is relative to `-W`).
pub fn dirs_and_log(images: &Path, work: &Path, log: &str) -> [OsString; 7] {
    [
        "-D".into(),
        images.as_os_str().to_owned(),
        "-W".into(),
        work.as_os_str().to_owned(),
        "-o".into(),
        log.into(),
        "-v4".into(),
    ]
}

/// `--address ADDR --port PORT`, as both ends of a page-server transfer
/// take them.
pub fn address_port(address: &str, port: u16) -> [OsString; 4] {
    [
        "--address".into(),
        address.into(),
        "--port".into(),
        port.to_string().into(),
    ]
}

/// `criu dump` of a sandboxed tree.
#[derive(Debug, Clone)]
pub struct DumpArgs {
    pub pid: i32,
    pub images_dir: PathBuf,
    /// Where CRIU writes its log (`-o` is relative to it).
    pub work_dir: PathBuf,
    pub log_name: String,
    pub externals: Vec<ExternalMount>,
    pub leave_running: bool,
}

impl DumpArgs {
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["dump".into(), "-t".into(), self.pid.to_string().into()];
        a.extend(dirs_and_log(
            &self.images_dir,
            &self.work_dir,
            &self.log_name,
        ));
        for e in &self.externals {
            // Bind mounts from outside the sandbox root are invisible to
            // CRIU's mount tree walk: each must be named on dump...
            a.push("--external".into());
            a.push(format!("mnt[{}]:{}", e.path.display(), e.key).into());
        }
        if self.leave_running {
            a.push("--leave-running".into());
        }
        // The tree's cgroup is its instance's, named by a run that is over
        // by the time the image restores: nothing of it belongs in the image.
        a.push("--manage-cgroups=ignore".into());
        a
    }
}

/// `criu restore` of a sandboxed tree: `--restore-detached
/// --restore-sibling`, so CRIU forks the tree's root with `CLONE_PARENT`
/// (its parent is CRIU's parent, the process that will supervise it),
/// lets go of the tree and exits.
#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    pub log_name: String,
    /// A mount point holding a bind of the host `/`.
    pub root: PathBuf,
    pub externals: Vec<ExternalMount>,
    pub pidfile: PathBuf,
    /// Files handed to CRIU open (`--inherit-fd fd[N]:KEY`): it uses fd N
    /// wherever the image has the file KEY (a regular file's path without
    /// its leading `/`, as CRIU keys it) instead of reopening that path.
    pub inherit_fds: Vec<(i32, PathBuf)>,
    /// `--leave-stopped`: CRIU sends every restored task SIGSTOP before it
    /// lets go of them (`finalize_restore`), so none runs a user
    /// instruction until someone sends SIGCONT: how a standby instance is
    /// held at its stop point whatever the backend (a NOTIFY image's task
    /// was blocked in the kernel, not stopped, when it was dumped).
    pub leave_stopped: bool,
}

impl RestoreArgs {
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["restore".into()];
        a.extend(dirs_and_log(
            &self.images_dir,
            &self.work_dir,
            &self.log_name,
        ));
        a.extend(["--root".into(), self.root.clone().into_os_string()]);
        for e in &self.externals {
            // ...and mapped back to a host path on restore.
            a.push("--external".into());
            a.push(format!("mnt[{}]:{}", e.key, e.path.display()).into());
        }
        a.extend(["--pidfile".into(), self.pidfile.clone().into_os_string()]);
        // A connected TCP socket in the image (only a migration's dump,
        // made with --tcp-close, has one) comes back shut down and unbound
        // instead of failing the restore: its peer and local address are
        // another host's. Images without one are unaffected.
        a.push("--tcp-close".into());
        // The restored tree stays in CRIU's own cgroup, the new instance's,
        // whatever cgroups the image names (an image dumped by another tool
        // would otherwise send it into, and create, the dumped ones).
        a.push("--manage-cgroups=ignore".into());
        for (fd, key) in &self.inherit_fds {
            a.push("--inherit-fd".into());
            let mut k = OsString::from(format!("fd[{fd}]:"));
            k.push(key);
            a.push(k);
        }
        if self.leave_stopped {
            a.push("--leave-stopped".into());
        }
        a.push("--restore-detached".into());
        // The root becomes the caller's child, not CRIU's: an image of a
        // runmh sandbox carries a parent-death signal, which would kill the
        // root the moment CRIU exits (CRIU restores prctl(PR_SET_PDEATHSIG);
        // cr-restore.c, maybe_clone_parent). Nor does the caller exec
        // anything: it is already running when CRIU ends.
        a.push("--restore-sibling".into());
        a
    }
}

/// A command line as one shell-quoted string, for logs and `--explain`.
pub fn shell_words(prog: &std::path::Path, args: &[OsString]) -> String {
    std::iter::once(prog.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext() -> Vec<ExternalMount> {
        vec![
            ExternalMount {
                path: "/dev".into(),
                key: "dev".into(),
            },
            ExternalMount {
                path: "/dev/pts".into(),
                key: "devpts".into(),
            },
        ]
    }

    #[test]
    fn dump_argv_names_each_external_mount() {
        let d = DumpArgs {
            pid: 42,
            images_dir: "/img".into(),
            work_dir: "/w".into(),
            log_name: "dump.log".into(),
            externals: ext(),
            leave_running: true,
        };
        let s = shell_words("criu".as_ref(), &d.argv());
        assert_eq!(
            s,
            "criu dump -t 42 -D /img -W /w -o dump.log -v4 --external 'mnt[/dev]:dev' --external 'mnt[/dev/pts]:devpts' --leave-running --manage-cgroups=ignore"
        );
    }

    #[test]
    fn restore_argv_maps_externals_back_and_restores_a_sibling() {
        let r = RestoreArgs {
            images_dir: "/img".into(),
            work_dir: "/w".into(),
            log_name: "restore.log".into(),
            root: "/r".into(),
            externals: ext(),
            pidfile: "/w/pid".into(),
            inherit_fds: vec![(7, "var/log/a/stdout.log".into())],
            leave_stopped: false,
        };
        let a = r.argv();
        let s = shell_words("criu".as_ref(), &a);
        assert!(
            s.contains("--root /r --external 'mnt[dev]:/dev' --external 'mnt[devpts]:/dev/pts'"),
            "{s}"
        );
        assert!(
            s.contains("--inherit-fd 'fd[7]:var/log/a/stdout.log' --restore-detached"),
            "{s}"
        );
        assert!(
            s.ends_with("--restore-detached --restore-sibling"),
            "CRIU accepts --restore-sibling only with --restore-detached: {s}"
        );
        assert!(s.contains(" --manage-cgroups=ignore "), "{s}");
        assert!(!a.iter().any(|x| x == "--exec-cmd"), "{s}");
    }
}

//! `runmh doctor`: is this machine able to do what miehisto does? One line
//! per check, each failing one with the fix.

use crate::criu::Criu;
use crate::sys;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    /// Works, but not as well as it could.
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub level: Level,
    pub detail: String,
    pub hint: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        level: Level::Ok,
        detail: detail.into(),
        hint: None,
    }
}
fn bad(
    name: &'static str,
    level: Level,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

/// Parses "6.18.44-fc" into (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn kernel_config_has(option: &str) -> Option<bool> {
    let release = crate::images::metadata::kernel_release();
    let text = std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("zcat")
                .arg("/proc/config.gz")
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })?;
    Some(text.lines().any(|l| l.trim() == format!("{option}=y")))
}

fn ptrace_works() -> Result<(), String> {
    let mut child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .map_err(|e| format!("cannot start a test process: {e}"))?;
    let pid = sys::child_pid(&child);
    let r = sys::ptrace_seize(pid, 0);
    let _ = child.kill();
    let _ = child.wait();
    r.map_err(|e| format!("PTRACE_SEIZE of a child failed: {e}"))
}

fn is_tmpfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .unwrap_or(false)
}

/// Runs every check. `criu` is the explicit `--criu`, if any.
pub fn run(criu: Option<&Path>) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(if sys::is_root() {
        ok("root", "running as root")
    } else {
        bad(
            "root",
            Level::Fail,
            "not running as root",
            "run runmh as root: namespaces, ptrace of the service and CRIU need it",
        )
    });
    let release = crate::images::metadata::kernel_release();
    out.push(match kernel_version(&release) {
        Some(v) if v >= (5, 9) => ok("kernel", format!("Linux {release}")),
        _ => bad(
            "kernel",
            Level::Fail,
            format!("Linux {release}"),
            "use Linux >= 5.9 (seccomp user notification with CONTINUE, close_range)",
        ),
    });
    out.push(match kernel_config_has("CONFIG_CHECKPOINT_RESTORE") {
        Some(true) => ok("checkpoint", "CONFIG_CHECKPOINT_RESTORE=y"),
        Some(false) => bad("checkpoint", Level::Fail, "CONFIG_CHECKPOINT_RESTORE is not set", "use a kernel built with CONFIG_CHECKPOINT_RESTORE=y"),
        None if Path::new("/proc/self/map_files").exists() => {
            ok("checkpoint", "kernel config not readable; /proc/self/map_files exists, so CONFIG_CHECKPOINT_RESTORE is on")
        }
        None => bad("checkpoint", Level::Fail, "CONFIG_CHECKPOINT_RESTORE appears to be off", "use a kernel built with CONFIG_CHECKPOINT_RESTORE=y"),
    });
    let actions =
        std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    for (name, action) in [("seccomp trace", "trace"), ("seccomp notify", "user_notif")] {
        out.push(if actions.split_whitespace().any(|a| a == action) {
            ok(
                name,
                format!("SECCOMP_RET_{} available", action.to_uppercase()),
            )
        } else {
            bad(
                name,
                Level::Fail,
                format!("the kernel does not offer seccomp action {action:?}"),
                "use a kernel with CONFIG_SECCOMP_FILTER=y (>= 5.0 for user_notif)",
            )
        });
    }
    out.push(match ptrace_works() {
        Ok(()) => ok("ptrace", "PTRACE_SEIZE allowed (TRACE backend usable)"),
        Err(e) => bad("ptrace", Level::Warn, e, "the TRACE backend needs ptrace (check kernel.yama.ptrace_scope and CAP_SYS_PTRACE); --backend notify works without it"),
    });
    let ids = crate::sandbox::userns::probe();
    let lacking = if ids.cap_sys_resource {
        ""
    } else {
        ", which this process lacks"
    };
    out.push(match (&ids.userns, ids.cap_sys_resource) {
        (Ok(()), _) => ok(
            "non-root",
            format!("a service run with -u gets a user namespace of its own, where CRIU holds CAP_SYS_RESOURCE{lacking}"),
        ),
        (Err(why), true) => ok(
            "non-root",
            format!("no user namespace ({why}); -u switches ids directly, and CRIU can dump them with this process's CAP_SYS_RESOURCE"),
        ),
        (Err(why), false) => bad(
            "non-root",
            Level::Warn,
            format!("a service run with -u cannot be dumped: CAP_SYS_RESOURCE is missing and no user namespace is possible ({why})"),
            "run services as root, or give runmh CAP_SYS_RESOURCE or user namespaces (user.max_user_namespaces)",
        ),
    });
    match Criu::discover(criu) {
        Ok(c) => {
            out.push(ok(
                "criu",
                format!("{} (version {})", c.path.display(), c.version),
            ));
            out.push(match c.check() {
                Ok(()) => ok("criu check", "passes"),
                Err(e) => bad(
                    "criu check",
                    Level::Fail,
                    e.to_string(),
                    crate::criu::SETUP_HINT,
                ),
            });
        }
        Err(e) => out.push(bad(
            "criu",
            Level::Fail,
            e.to_string(),
            crate::criu::SETUP_HINT,
        )),
    }
    let v = libseccomp::ScmpVersion::current();
    out.push(match v {
        Ok(v) if (v.major, v.minor) >= (2, 5) => {
            ok("libseccomp", format!("{}.{}.{}", v.major, v.minor, v.micro))
        }
        Ok(v) => bad(
            "libseccomp",
            Level::Fail,
            format!("{}.{}.{}", v.major, v.minor, v.micro),
            "install libseccomp >= 2.5 (user notification support)",
        ),
        Err(e) => bad(
            "libseccomp",
            Level::Fail,
            e.to_string(),
            "install libseccomp2 >= 2.5",
        ),
    });
    out.push(if is_tmpfs(Path::new("/run")) {
        ok(
            "kdat cache",
            "/run is a tmpfs: CRIU keeps its kernel-feature cache (/run/criu.kdat)",
        )
    } else {
        bad(
            "kdat cache",
            Level::Warn,
            "/run is not a tmpfs: CRIU re-probes the kernel on every run (tens of ms)",
            "mount a tmpfs on /run (CRIU only trusts its cache on tmpfs, which a reboot clears)",
        )
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions() {
        assert_eq!(super::kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(super::kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(super::kernel_version("x"), None);
    }
}

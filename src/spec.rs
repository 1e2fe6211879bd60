//! What a sandbox runs: the command, its environment and identity, where its
//! logs go. Built from the command line (or the daemon's service registry),
//! validated here once, then stored in instance state and image metadata.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command given: put it after `--`, e.g. `runmh run -- python3 -m http.server`")]
    EmptyCommand,
    #[error("command not found: {name:?} is not an executable file and not on PATH ({path})")]
    CommandNotFound { name: String, path: String },
    #[error("environment setting {0:?} is not of the form KEY=VALUE")]
    BadEnv(String),
    #[error("user {0:?} is not of the form USER[:GROUP] (names or numeric ids)")]
    BadUser(String),
    #[error("no user named {name:?} on this host (the passwd database has none); give another name or a numeric UID[:GID]")]
    UnknownUser { name: String },
    #[error("no group named {name:?} on this host (the group database has none); give another name or a numeric GID")]
    UnknownGroup { name: String },
    #[error("cannot look up {what} {name:?}")]
    Lookup {
        what: &'static str,
        name: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("working directory {path} does not exist or is not a directory")]
    BadCwd { path: PathBuf },
    #[error("{what} contains a NUL byte: {value:?}")]
    Nul { what: &'static str, value: String },
}

/// The environment a sandboxed service starts with when the caller adds
/// nothing: a clean, predictable set, because whatever is in it is baked
/// into every image dumped from the service.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxSpec {
    /// argv as given (argv[0] as the user wrote it).
    pub argv: Vec<String>,
    /// Absolute path of the program that is exec'd.
    pub program: PathBuf,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Directory of `stdout.log` and `stderr.log`.
    pub log_dir: PathBuf,
}

impl SandboxSpec {
    pub fn stdout_log(&self) -> PathBuf {
        self.log_dir.join("stdout.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.log_dir.join("stderr.log")
    }
}

/// Inputs of [`SandboxSpec::build`], as they come from a command line.
#[derive(Debug, Clone, Default)]
pub struct SpecInput {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub user: Option<String>,
    pub log_dir: PathBuf,
    /// Pass the caller's PATH, HOME, LANG and TERM through.
    pub inherit_basic_env: bool,
}

pub fn parse_env(kv: &str) -> Result<(String, String), SpecError> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(SpecError::BadEnv(kv.to_string())),
    }
}

/// `USER[:GROUP]`, each a name or a number, as `(uid, gid)`. Without a
/// group, a named user gets its primary group and a number the same
/// number. Names are looked up (getpwnam_r/getgrnam_r, so NSS too) here,
/// before any fork.
pub fn parse_user(s: &str) -> Result<(u32, u32), SpecError> {
    parse_user_with(s, &|name| lookup_user(name), &|name| lookup_group(name))
}

type Lookup<'a> = &'a dyn Fn(&str) -> Result<Option<(u32, u32)>, SpecError>;

fn parse_user_with(s: &str, user: Lookup, group: Lookup) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError::BadUser(s.to_string());
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    // A name starts with no digit (useradd(8)); all digits is an id.
    let numeric = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let plausible =
        |x: &str| !x.is_empty() && !x.starts_with('-') && !x.contains(['\0', '/', ':', ' ', '\n']);
    let (uid, primary) = if numeric(u) {
        let uid: u32 = u.parse().map_err(|_| bad())?;
        (uid, uid)
    } else if plausible(u) {
        user(u)?.ok_or_else(|| SpecError::UnknownUser { name: u.into() })?
    } else {
        return Err(bad());
    };
    let gid = match g {
        None => primary,
        Some(g) if numeric(g) => g.parse().map_err(|_| bad())?,
        Some(g) if plausible(g) => {
            group(g)?
                .ok_or_else(|| SpecError::UnknownGroup { name: g.into() })?
                .1
        }
        Some(_) => return Err(bad()),
    };
    Ok((uid, gid))
}

fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, SpecError> {
    nix::unistd::User::from_name(name)
        .map(|u| u.map(|u| (u.uid.as_raw(), u.gid.as_raw())))
        .map_err(|source| SpecError::Lookup {
            what: "user",
            name: name.into(),
            source,
        })
}

fn lookup_group(name: &str) -> Result<Option<(u32, u32)>, SpecError> {
    nix::unistd::Group::from_name(name)
        .map(|g| g.map(|g| (0, g.gid.as_raw())))
        .map_err(|source| SpecError::Lookup {
            what: "group",
            name: name.into(),
            source,
        })
}

/// Finds `name` the way execvp would: as a path when it has a slash,
/// otherwise in each directory of `path_var`.
pub fn resolve_program(name: &str, path_var: &str) -> Result<PathBuf, SpecError> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let not_found = || SpecError::CommandNotFound {
        name: name.to_string(),
        path: path_var.to_string(),
    };
    if name.contains('/') {
        let p = std::path::absolute(name).map_err(|_| not_found())?;
        return if is_exec(&p) { Ok(p) } else { Err(not_found()) };
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_exec(p))
        .ok_or_else(not_found)
}

impl SandboxSpec {
    pub fn build(input: SpecInput) -> Result<Self, SpecError> {
        let first = input.argv.first().ok_or(SpecError::EmptyCommand)?;
        for a in &input.argv {
            if a.contains('\0') {
                return Err(SpecError::Nul {
                    what: "argument",
                    value: a.clone(),
                });
            }
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v));
        };
        if input.inherit_basic_env {
            for k in ["PATH", "HOME", "LANG", "TERM"] {
                if let Ok(v) = std::env::var(k) {
                    set(k, v);
                }
            }
        }
        if !input.inherit_basic_env || std::env::var("PATH").is_err() {
            set("PATH", DEFAULT_PATH.to_string());
        }
        for kv in &input.env {
            let (k, v) = parse_env(kv)?;
            set(&k, v);
        }
        let path_var = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let program = resolve_program(first, &path_var)?;
        let cwd = match input.cwd {
            Some(c) => {
                std::path::absolute(&c).map_err(|_| SpecError::BadCwd { path: c.clone() })?
            }
            None => std::env::current_dir().map_err(|_| SpecError::BadCwd { path: ".".into() })?,
        };
        if !cwd.is_dir() {
            return Err(SpecError::BadCwd { path: cwd });
        }
        let (uid, gid) = match &input.user {
            Some(u) => parse_user(u)?,
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        Ok(SandboxSpec {
            argv: input.argv,
            program,
            env,
            cwd,
            uid,
            gid,
            log_dir: input.log_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_user_parsing() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(matches!(parse_env("novalue"), Err(SpecError::BadEnv(_))));
        assert!(matches!(parse_env("=x"), Err(SpecError::BadEnv(_))));
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("1000:50").unwrap(), (1000, 50));
        assert!(matches!(parse_user("1:"), Err(SpecError::BadUser(_))));
        assert!(matches!(parse_user(":1"), Err(SpecError::BadUser(_))));
        assert!(matches!(parse_user("-1"), Err(SpecError::BadUser(_))));
    }

    #[test]
    fn user_and_group_names() {
        let users = |n: &str| Ok((n == "postgres").then_some((105, 112)));
        let groups = |n: &str| Ok((n == "nogroup").then_some((0, 65534)));
        let p = |s: &str| parse_user_with(s, &users, &groups);
        assert_eq!(p("postgres").unwrap(), (105, 112), "its primary group");
        assert_eq!(p("postgres:nogroup").unwrap(), (105, 65534));
        assert_eq!(p("postgres:7").unwrap(), (105, 7));
        assert_eq!(p("1000:nogroup").unwrap(), (1000, 65534));
        let e = p("nosuchuser").unwrap_err();
        assert!(
            matches!(&e, SpecError::UnknownUser { name } if name == "nosuchuser"),
            "{e}"
        );
        assert!(
            e.to_string().contains("no user named \"nosuchuser\""),
            "{e}"
        );
        let e = p("postgres:nosuchgroup").unwrap_err();
        assert!(matches!(e, SpecError::UnknownGroup { .. }), "{e}");
        // The real databases: every Debian system has root and nobody.
        assert_eq!(parse_user("root").unwrap(), (0, 0));
        assert_eq!(parse_user("nobody").unwrap().0, 65534);
        assert_eq!(parse_user("nobody:nogroup").unwrap(), (65534, 65534));
        assert!(matches!(
            parse_user("definitely-not-a-user-xyz"),
            Err(SpecError::UnknownUser { .. })
        ));
    }

    #[test]
    fn program_resolution() {
        assert_eq!(
            resolve_program("sh", "/nonexistent:/bin").unwrap(),
            PathBuf::from("/bin/sh")
        );
        let e = resolve_program("definitely-not-a-command-xyz", "/bin:/usr/bin").unwrap_err();
        assert!(e.to_string().contains("command not found"), "{e}");
        assert!(
            resolve_program("/etc/passwd", "").is_err(),
            "not executable"
        );
    }

    #[test]
    fn build_sets_env_overrides_and_path() {
        let s = SandboxSpec::build(SpecInput {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into(), "X=1".into()],
            log_dir: "/tmp".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.program, PathBuf::from("/bin/sh"));
        assert!(s.env.contains(&("X".into(), "1".into())));
        assert_eq!(s.env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(matches!(
            SandboxSpec::build(SpecInput {
                log_dir: "/tmp".into(),
                ..Default::default()
            }),
            Err(SpecError::EmptyCommand)
        ));
    }
}

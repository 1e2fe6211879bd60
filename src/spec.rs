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
    #[error("user {0:?} is not of the form UID[:GID] with numeric ids")]
    BadUser(String),
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

pub fn parse_user(s: &str) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError::BadUser(s.to_string());
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => uid,
    };
    Ok((uid, gid))
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
        assert!(parse_user("bob").is_err());
        assert!(parse_user("1:x").is_err());
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

//! Finding the matrix's payloads: the C servers build.rs compiled, and the
//! Go server, built here at run time when a Go toolchain is on PATH.

use super::scenarios::Payload;
use crate::explain;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where the payloads come from.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The compiled C payloads (`$MIEHISTO_PAYLOAD_DIR` by default).
    pub payload_dir: PathBuf,
    /// The repository's `examples/` (for `examples/go`).
    pub examples_dir: PathBuf,
    /// Where to build what needs building.
    pub build_dir: PathBuf,
}

impl Sources {
    pub fn default_payload_dir() -> PathBuf {
        PathBuf::from(env!("MIEHISTO_PAYLOAD_DIR"))
    }
    pub fn default_examples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }
}

/// Resolves payloads once each; the Go build result is remembered.
pub struct Resolver {
    src: Sources,
    go: Option<Result<PathBuf, String>>,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Resolver {
    pub fn new(src: Sources) -> Self {
        Resolver { src, go: None }
    }

    /// The executable for `p`, or why this machine cannot run it.
    pub fn resolve(&mut self, p: Payload) -> Result<PathBuf, String> {
        if p == Payload::Go {
            if self.go.is_none() {
                self.go = Some(self.build_go());
            }
            return self
                .go
                .clone()
                .unwrap_or_else(|| Err("the Go build did not run".into()));
        }
        let path = self.src.payload_dir.join(p.name());
        if path.is_file() {
            return Ok(path);
        }
        let why = if p == Payload::Static {
            "build.rs skipped it: this machine has no static libc (libc.a; Debian package libc6-dev)"
        } else {
            "not built: run `cargo build`, or pass --payloads DIR"
        };
        Err(format!("{} is missing ({why})", path.display()))
    }

    fn build_go(&self) -> Result<PathBuf, String> {
        let Some(go) = find_on_path("go") else {
            return Err("no Go toolchain: `go` is not on PATH (Debian package golang-go)".into());
        };
        let src = self.src.examples_dir.join("go");
        if !src.join("go.mod").is_file() {
            return Err(format!(
                "the Go payload's source is not at {}",
                src.display()
            ));
        }
        let dir = self.src.build_dir.join("go");
        let out = dir.join("server");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        explain::say(
            "payload",
            &format!(
                "building the Go payload: go build -o {} (in {})",
                out.display(),
                src.display()
            ),
        );
        // A private build cache inside the matrix's work directory, and no
        // network: the module has no dependencies.
        let t0 = std::time::Instant::now();
        let result = Command::new(&go)
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(&src)
            .env("GOCACHE", dir.join("cache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .env("GOFLAGS", "-modcacherw")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", go.display()))?;
        if !result.status.success() {
            let text = String::from_utf8_lossy(&result.stderr);
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            return Err(format!(
                "`go build` of {} failed ({}): {first}",
                src.display(),
                result.status
            ));
        }
        explain::say(
            "payload",
            &format!("Go payload built in {} ms", t0.elapsed().as_millis()),
        );
        // The build cache is only needed for this build.
        let _ = std::fs::remove_dir_all(dir.join("cache"));
        let _ = std::fs::remove_dir_all(dir.join("gopath"));
        Ok(out)
    }
}

//! A real OCI registry for the tests: Debian's `docker-registry` (the CNCF
//! distribution registry, 2.8), started on a free loopback port with its
//! own config file and storage directory, no auth, plain HTTP. Killed and
//! removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
pub const SKOPEO_BIN: &str = "/usr/bin/skopeo";

/// What the registry tests need besides root and CRIU: None when all is there.
pub fn missing_tools() -> Option<String> {
    let need = [(REGISTRY_BIN, "docker-registry"), (SKOPEO_BIN, "skopeo")];
    super::missing_programs(&need)
}

pub struct Registry {
    /// `ADDR:PORT`, the registry part of a reference.
    pub host: String,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry listening on `addr:port` under `dir`; `cmd` is
    /// the registry binary, or a command that runs it in a test network
    /// namespace (`serve CONFIG` is appended). Waits until `ready` says it
    /// answers.
    pub fn start_with(
        dir: &Path,
        addr: &str,
        port: u16,
        mut cmd: Command,
        ready: impl Fn() -> bool,
    ) -> Registry {
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("registry storage dir");
        let config = dir.join("config.yml");
        // distribution's config format (version 0.1): filesystem storage,
        // deletes allowed, HTTP on one address, no auth section.
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}:{port}\n",
            storage.display()
        );
        std::fs::write(&config, yaml).expect("registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let err = log.try_clone().expect("registry log");
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        let child = cmd.spawn().expect("spawn docker-registry");
        let mut r = Registry {
            host: format!("{addr}:{port}"),
            dir: dir.to_path_buf(),
            child: Some(child),
        };
        let t0 = Instant::now();
        loop {
            if ready() {
                return r;
            }
            if let Some(Ok(Some(st))) = r.child.as_mut().map(|c| c.try_wait()) {
                panic!("docker-registry exited ({st}): {}", r.log());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                panic!("docker-registry did not answer on {}: {}", r.host, r.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A registry on 127.0.0.1, answering when this returns.
    pub fn start(dir: &Path) -> Registry {
        let port = super::free_port();
        Registry::start_with(dir, "127.0.0.1", port, Command::new(REGISTRY_BIN), || {
            matches!(super::http_get(port, "/v2/"), Ok((200, _)))
        })
    }

    pub fn log(&self) -> String {
        super::read(&self.dir.join("registry.log"))
    }

    /// Where the registry keeps the blob with this digest (`sha256:...`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// `skopeo inspect` (with `--raw` when asked) of `REPO:TAG` on this registry, as JSON.
    pub fn skopeo_inspect(&self, repo_tag: &str, raw: bool) -> serde_json::Value {
        let mut c = Command::new(SKOPEO_BIN);
        c.arg("inspect").arg("--tls-verify=false");
        if raw {
            c.arg("--raw");
        }
        let out = c
            .arg(format!("docker://{}/{repo_tag}", self.host))
            .stdin(Stdio::null())
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "skopeo printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

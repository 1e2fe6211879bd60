//! The benchmark workloads: real servers from `examples/`, each answering
//! HTTP on 127.0.0.1 at a port the benchmark picks.

use std::path::{Path, PathBuf};

/// One server to measure.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub about: &'static str,
    /// Program and arguments; `{port}` is replaced by the port.
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// The path a "good response" is asked for.
    pub path: &'static str,
    /// Why it cannot run here, if so (with the fix).
    pub missing: Option<String>,
}

impl Workload {
    pub fn command(&self, port: u16) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect()
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const SETUP: &str = "run `bash setup/workloads.sh`";

/// The heavy workload's name (its targets are its own).
pub const HEAVY: &str = "fastapi";

/// Whether `venv_python`'s venv has `package` in its site-packages.
fn venv_has(venv_python: &Path, package: &str) -> bool {
    venv_python
        .parent()
        .and_then(|b| b.parent())
        .map(|v| v.join("lib"))
        .is_some_and(|lib| {
            std::fs::read_dir(lib)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("site-packages").join(package).is_dir())
        })
}

/// Debian's python3 (the set-up step exports it), else /usr/bin/python3.
fn python() -> PathBuf {
    std::env::var_os("MIEHISTO_PYTHON")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/python3".into())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn need(path: &Path, what: &str) -> Option<String> {
    (!path.exists()).then(|| format!("{what} ({}) is missing; {SETUP}", path.display()))
}

/// Every workload, in the order they are measured.
pub fn all() -> Vec<Workload> {
    let ex = repo().join("examples");
    let py = python();
    let venv_python = repo().join(".deps/venv/bin/python");
    let django = ex.join("django_app");
    let express = ex.join("express_app");
    let node = on_path("node");
    let heavy = ex.join("fastapi_app");
    let heavy_python = repo().join(".deps/venv-fastapi/bin/python");
    vec![
        Workload {
            name: "python",
            about: "Python stdlib http.server importing ~20 stdlib modules at boot",
            argv: vec![
                py.display().to_string(),
                ex.join("http_server.py").display().to_string(),
                "--boot-imports".into(),
                "--port".into(),
                "{port}".into(),
            ],
            cwd: repo().to_path_buf(),
            path: "/health",
            missing: need(&py, "python3"),
        },
        Workload {
            name: "django",
            about:
                "Django 5.2 project (examples/django_app) under `manage.py runserver --noreload`",
            argv: vec![
                venv_python.display().to_string(),
                django.join("manage.py").display().to_string(),
                "runserver".into(),
                "--noreload".into(),
                "127.0.0.1:{port}".into(),
            ],
            cwd: django.clone(),
            path: "/health",
            missing: need(&venv_python, "the Django venv").or_else(|| {
                (!venv_has(&venv_python, "django")).then(|| {
                    format!(
                        "Django is not installed in {}; {SETUP}",
                        venv_python.display()
                    )
                })
            }),
        },
        Workload {
            name: "express",
            about: "Express 5 app (examples/express_app) on Node.js",
            argv: vec![
                node.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "node".into()),
                express.join("server.js").display().to_string(),
                "--port".into(),
                "{port}".into(),
            ],
            cwd: express.clone(),
            path: "/health",
            missing: match node {
                None => Some(format!("node is not on PATH; {SETUP}")),
                Some(_) => need(&express.join("node_modules/express"), "Express"),
            },
        },
        Workload {
            name: HEAVY,
            about: "FastAPI + pydantic service on uvicorn building a 200k-row pandas/numpy catalogue at boot (examples/fastapi_app)",
            argv: vec![
                heavy_python.display().to_string(),
                heavy.join("app.py").display().to_string(),
                "--port".into(),
                "{port}".into(),
            ],
            cwd: heavy.clone(),
            path: "/health",
            missing: need(&heavy_python, "the FastAPI venv").or_else(|| {
                ["fastapi", "pandas", "numpy", "uvicorn"]
                    .iter()
                    .find(|p| !venv_has(&heavy_python, p))
                    .map(|p| format!("{p} is not installed in {}; {SETUP}", heavy_python.display()))
            }),
        },
    ]
}

/// Names of every workload.
pub fn names() -> Vec<&'static str> {
    all().iter().map(|w| w.name).collect()
}

//! Build script: compiles miehisto's C helpers with the system C compiler.
//!
//! * `src/preload/mh_preload.c` -> `$OUT_DIR/libmhpreload.so` (LD_PRELOAD
//!   library of the NOTIFY stop backend)
//! * `examples/*.c` -> `$OUT_DIR/payloads/<name>` (test payload servers);
//!   `simple_server` is also built `-static` as `simple_server_static`.
//!
//! Exposes the locations to the crate as compile-time env vars:
//! `MIEHISTO_PRELOAD_SO` and `MIEHISTO_PAYLOAD_DIR` (use `env!`).
//!
//! The compiler is `$CC`, else `gcc`. A failing static build (no libc.a)
//! only warns and skips that binary; any other failure fails the build and
//! shows the compiler's output. No extra crates: plain std::process::Command.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const COMMON_FLAGS: &[&str] = &["-std=gnu11", "-Wall", "-Wextra", "-O2"];
const PRELOAD_SRC: &str = "src/preload/mh_preload.c";
const PAYLOAD_HEADER: &str = "examples/payload_common.h";

/// A C payload: output name, source, and whether it is linked -static.
struct Payload {
    name: &'static str,
    src: &'static str,
    static_link: bool,
}

const PAYLOADS: &[Payload] = &[
    Payload {
        name: "simple_server",
        src: "examples/simple_server.c",
        static_link: false,
    },
    Payload {
        name: "simple_server_static",
        src: "examples/simple_server.c",
        static_link: true,
    },
    Payload {
        name: "threaded_server",
        src: "examples/threaded_server.c",
        static_link: false,
    },
    Payload {
        name: "forking_server",
        src: "examples/forking_server.c",
        static_link: false,
    },
    Payload {
        name: "direct_syscall_server",
        src: "examples/direct_syscall_server.c",
        static_link: false,
    },
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("CC")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "gcc".into());

    // Paths are relative to the package root, where this script is not.
    println!("cargo:rerun-if-changed=src/build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let mut sources = vec![PRELOAD_SRC, PAYLOAD_HEADER];
    for p in PAYLOADS {
        if !sources.contains(&p.src) {
            sources.push(p.src);
        }
    }
    for src in sources {
        println!("cargo:rerun-if-changed={src}");
    }

    // The LD_PRELOAD library.
    let so = out_dir.join("libmhpreload.so");
    let mut args: Vec<String> = COMMON_FLAGS.iter().map(|s| s.to_string()).collect();
    args.extend(["-shared", "-fPIC", "-o"].map(String::from));
    args.push(path_str(&so));
    args.push(path_str(&manifest.join(PRELOAD_SRC)));
    args.push("-ldl".into());
    if let Err(msg) = compile(&cc, &args) {
        fail(&format!("building {} failed\n{msg}", so.display()));
    }

    // The payload servers.
    let payload_dir = out_dir.join("payloads");
    fs::create_dir_all(&payload_dir).expect("create $OUT_DIR/payloads");
    for p in PAYLOADS {
        let bin = payload_dir.join(p.name);
        let mut args: Vec<String> = COMMON_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push("-pthread".into());
        if p.static_link {
            args.extend(["-static", "-DMH_STATIC_BUILD"].map(String::from));
        }
        args.push("-o".into());
        args.push(path_str(&bin));
        args.push(path_str(&manifest.join(p.src)));
        if let Err(msg) = compile(&cc, &args) {
            if p.static_link {
                // Most likely no static libc (libc.a) on this machine.
                let _ = fs::remove_file(&bin);
                println!(
                    "cargo:warning=static build of {} skipped (no static libc?)",
                    p.name
                );
                for line in msg.lines().filter(|l| !l.trim().is_empty()).take(6) {
                    println!("cargo:warning=  {line}");
                }
                continue;
            }
            fail(&format!("building payload {} failed\n{msg}", p.name));
        }
    }

    println!("cargo:rustc-env=MIEHISTO_PRELOAD_SO={}", path_str(&so));
    println!(
        "cargo:rustc-env=MIEHISTO_PAYLOAD_DIR={}",
        path_str(&payload_dir)
    );
}

/// Run `cc args...`. On success, forward any compiler diagnostics as cargo
/// warnings; on failure return the command line and its output.
fn compile(cc: &str, args: &[String]) -> Result<(), String> {
    let cmdline = format!("{cc} {}", args.join(" "));
    let out = Command::new(cc)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{cmdline}`: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "`{cmdline}` exited with {}\n{stdout}{stderr}",
            out.status
        ));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

/// Fail the build with a readable message (cargo shows the script's stderr).
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("build paths must be UTF-8").to_string()
}

//! Image generations through a real OCI registry (Debian's docker-registry
//! on a loopback port), and the compatibility check before a restore.
//!
//! Two daemons with their own state directories and sockets stand for two
//! hosts: push on A, pull on B, start on B.

mod common;

use common::case::Case;
use common::daemon::Mhctl;
use common::hosts::TwoHosts;
use common::registry::{self, Registry};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn require(test: &str) -> bool {
    common::require_privileged(test) && common::require(test, registry::missing_tools())
}

/// One host's daemon, in a [`Case`] of its own.
fn daemon(tag: &str) -> Case {
    let mut c = Case::for_daemon(tag);
    c.start_daemon(&[]);
    c
}

impl Case {
    fn generations(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state.join("images").join(name))
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

fn create_python(d: &Case, name: &str, port: u16) {
    d.create_python(name, &["--backend", "trace"], port, &[]);
}

#[test]
fn push_on_a_pull_on_b_start_on_b_and_a_corrupt_layer_is_refused() {
    if !require("push_pull_start") {
        return;
    }
    let _l = common::lock();
    let base = common::temp_dir("oci");
    let reg = Registry::start(&base.join("reg"));
    let a = daemon("oci-a");
    let b = daemon("oci-b");
    let port = common::free_port();
    create_python(&a, "web", port);
    let img = a.json(&["service", "prebake", "web"]);
    assert_eq!(img["generation"], 1, "{img}");

    // Push generation 1 of A to the registry.
    let reference = format!("{}/miehisto/web:g1", reg.host);
    let pushed = a.json(&["image", "push", "web@1", &reference]);
    assert_eq!(pushed["reference"], reference.as_str(), "{pushed}");
    let manifest_digest = pushed["manifest_digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let layer_digest = pushed["layer_digest"].as_str().expect("digest").to_string();
    assert!(manifest_digest.starts_with("sha256:"), "{pushed}");
    assert!(
        reg.blob_path(&layer_digest).is_file(),
        "the registry holds the layer"
    );

    // Other tools read what miehisto wrote: the manifest's annotations
    // (skopeo --raw) and the config's labels (skopeo's summary).
    let raw = reg.skopeo_inspect("miehisto/web:g1", true);
    let ann = &raw["annotations"];
    assert_eq!(ann["org.criu.checkpoint.engine.name"], "miehisto", "{raw}");
    assert_eq!(ann["org.criu.checkpoint.container.name"], "web", "{raw}");
    assert_eq!(
        ann["org.criu.checkpoint.host.arch"],
        std::env::consts::ARCH,
        "{raw}"
    );
    let kernel = nix::sys::utsname::uname().expect("uname");
    assert_eq!(
        ann["org.criu.checkpoint.host.kernel"],
        kernel.release().to_string_lossy().as_ref(),
        "{raw}"
    );
    let criu = miehisto::criu::Criu::at(&common::criu_path().expect("criu")).expect("criu");
    assert_eq!(
        ann["org.criu.checkpoint.criu.version"],
        criu.version.to_string(),
        "{raw}"
    );
    assert_eq!(ann["io.miehisto.backend"], "trace", "{raw}");
    assert_eq!(ann["io.miehisto.stop.syscall"], "listen", "{raw}");
    assert_eq!(
        ann["io.miehisto.format.version"],
        miehisto::images::metadata::FORMAT_VERSION.to_string(),
        "{raw}"
    );
    assert!(
        ann["io.miehisto.command"]
            .as_str()
            .is_some_and(|c| c.contains("http_server.py")),
        "{raw}"
    );
    assert_eq!(
        raw["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
        "{raw}"
    );
    let summary = reg.skopeo_inspect("miehisto/web:g1", false);
    assert_eq!(summary["Digest"], manifest_digest.as_str(), "{summary}");
    assert_eq!(
        summary["Labels"]["org.criu.checkpoint.engine.name"], "miehisto",
        "{summary}"
    );
    assert_eq!(
        summary["Labels"]["io.miehisto.stop.syscall"], "listen",
        "{summary}"
    );

    // Pull on B: the service is created from the image's command.
    let pulled = b.json(&["image", "pull", &reference]);
    assert_eq!(pulled["created_service"], true, "{pulled}");
    assert_eq!(
        pulled["manifest_digest"],
        manifest_digest.as_str(),
        "{pulled}"
    );
    assert_eq!(pulled["image"]["service"], "web", "{pulled}");
    assert_eq!(pulled["image"]["generation"], 1, "{pulled}");
    assert_eq!(pulled["image"]["valid"], true, "{pulled}");
    let bimg = b.state.join("images/web/1");
    for f in [
        "miehisto.json",
        "inventory.img",
        "pstree.img",
        "cpuinfo.img",
    ] {
        assert!(bimg.join(f).is_file(), "{f} pulled into {}", bimg.display());
    }
    assert_eq!(
        std::fs::read(bimg.join("pstree.img")).expect("pulled"),
        std::fs::read(a.state.join("images/web/1/pstree.img")).expect("pushed"),
        "the pulled CRIU image is the pushed one"
    );
    let check = b.ok(&["image", "check", "web@1"]);
    assert!(check.contains("matches this host"), "{check}");
    let remote_check = b.ok(&["image", "check", &reference]);
    assert!(remote_check.contains("matches this host"), "{remote_check}");

    // Start on B: it is B's restore, B's supervisor, and it answers.
    let started = b.json(&["service", "start", "web"]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["started_from"], "restored", "{started}");
    assert_eq!(started["generation"], 1, "{started}");
    let body = common::wait_http(port, Duration::from_secs(20)).expect("B's restore answers");
    assert!(body.starts_with("payload=python pid=1 "), "{body}");
    assert_eq!(a.service("web")["state"], "stopped", "A runs nothing");
    // B's restore writes to B's log directory, not to A's paths that the
    // image was dumped with (CRIU gets B's files by --inherit-fd).
    let stdout_of = |d: &Case| common::read(&d.state.join("logs/web/stdout.log"));
    let t0 = std::time::Instant::now();
    while !stdout_of(&b).contains("request n=1 ") && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stdout_of(&b).contains("request n=1 "),
        "B's stdout.log: {}",
        stdout_of(&b)
    );
    assert!(
        !stdout_of(&a).contains("request n="),
        "A's stdout.log got B's requests: {}",
        stdout_of(&a)
    );
    assert!(b.ok(&["service", "logs", "web"]).contains("request n=1 "));
    b.ok(&["service", "stop", "web"]);

    // A layer whose bytes no longer match its digest is refused, and
    // nothing is published.
    let blob = reg.blob_path(&layer_digest);
    let mut bytes = std::fs::read(&blob).expect("blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).expect("corrupt the blob");
    let err = b.fails(&["image", "pull", &reference, "--as", "web2"]);
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(err.contains(&layer_digest), "{err}");
    assert!(
        b.generations("web2").is_empty(),
        "nothing published: {:?}",
        b.generations("web2")
    );
    let web2 = b.mhctl(&["service", "--json", "list"]);
    assert!(
        !String::from_utf8_lossy(&web2.stdout).contains("\"web2\""),
        "no service created by a failed pull"
    );
    let scratch: Vec<_> = std::fs::read_dir(b.state.join("tmp"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "no scratch left: {scratch:?}");
    // The same corrupt layer behind `image check REF` is refused too.
    let err = b.fails(&["image", "check", &reference]);
    assert!(err.contains("does not match its digest"), "{err}");

    // A reference without a registry host is a clear one-line error.
    let err = b.fails(&["image", "pull", "web:g1"]);
    assert!(err.contains("names no registry host"), "{err}");
    drop(b);
    drop(a);
    drop(reg);
    let _ = std::fs::remove_dir_all(&base);
}

/// Walks protobuf fields of `buf` (one message); calls `f(field, wire, start, end)` for each value.
fn pb_fields(buf: &[u8], mut f: impl FnMut(u64, u8, usize, usize)) {
    let varint = |b: &[u8], mut i: usize| -> (u64, usize) {
        let mut v = 0u64;
        let mut shift = 0;
        while i < b.len() {
            let byte = b[i];
            v |= u64::from(byte & 0x7f) << shift;
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        (v, i)
    };
    let mut i = 0;
    while i < buf.len() {
        let (key, j) = varint(buf, i);
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let (start, end) = match wire {
            0 => (j, varint(buf, j).1),
            1 => (j, j + 8),
            2 => {
                let (len, k) = varint(buf, j);
                (k, k + usize::try_from(len).expect("a length"))
            }
            5 => (j, j + 4),
            _ => return,
        };
        if end > buf.len() {
            return;
        }
        f(field, wire, start, end);
        i = end;
    }
}

/// Makes `cpuinfo.img` describe a CPU with a different xsave size: CRIU's
/// images are a magic pair, then (u32 size, CpuinfoEntry) records; the
/// entry's x86_entry (field 1) holds xsave_size as field 9 (a varint).
fn tamper_cpuinfo(path: &Path) {
    let mut img = std::fs::read(path).expect("cpuinfo.img");
    let entry_len = u32::from_le_bytes(img[8..12].try_into().expect("4 bytes")) as usize;
    let entry = 12..12 + entry_len;
    let mut x86 = None;
    pb_fields(&img[entry.clone()], |field, wire, s, e| {
        if field == 1 && wire == 2 {
            x86 = Some((12 + s, 12 + e));
        }
    });
    let (xs, xe) = x86.expect("an x86 entry in cpuinfo.img");
    let mut xsave = None;
    pb_fields(&img[xs..xe], |field, wire, s, _| {
        if field == 9 && wire == 0 {
            xsave = Some(xs + s);
        }
    });
    let at = xsave.expect("xsave_size in cpuinfo.img");
    // Flip a low bit of the first varint byte: same length, other value.
    img[at] ^= 0x08;
    std::fs::write(path, img).expect("write cpuinfo.img");
}

#[test]
fn an_image_whose_cpu_or_files_differ_is_refused_with_every_difference() {
    if !require("compat_refused") {
        return;
    }
    let _l = common::lock();
    let base = common::temp_dir("ocicompat");
    let d = daemon("ocicompat");
    // A copy of a payload binary, modified after the prebake below.
    let bin = base.join("srv");
    std::fs::copy(common::payload("simple_server"), &bin).expect("copy payload");
    let port = common::free_port();
    d.ok(&[
        "service",
        "create",
        "srv",
        "--backend",
        "trace",
        "--",
        bin.to_str().expect("utf-8"),
        "--port",
        &port.to_string(),
    ]);
    d.ok(&["service", "prebake", "srv"]);
    let img = d.state.join("images/srv/1");
    let md = miehisto::images::Metadata::read(&img).expect("metadata");
    let host = md.host.as_ref().expect("the dump recorded the host");
    assert!(host.cpuinfo, "criu cpuinfo dump ran");
    let canon = std::fs::canonicalize(&bin).expect("canon");
    let rec = host
        .files
        .iter()
        .find(|f| f.path == canon)
        .unwrap_or_else(|| panic!("the payload binary is recorded: {:?}", host.files));
    assert!(
        rec.build_id.is_some(),
        "the payload has a build-id: {rec:?}"
    );
    assert!(
        host.files
            .iter()
            .any(|f| f.path.to_string_lossy().contains("libc.so")),
        "libc is recorded: {:?}",
        host.files
    );
    let ok = d.ok(&["image", "check", "srv@1"]);
    assert!(ok.contains("matches this host"), "{ok}");

    // Now: the binary changed, the CPU record says another CPU, and the
    // recorded kernel is another one.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&bin)
        .expect("open");
    std::io::Write::write_all(&mut f, b"patched after the prebake").expect("modify");
    drop(f);
    tamper_cpuinfo(&img.join("cpuinfo.img"));
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(img.join("miehisto.json")).expect("md"))
            .expect("json");
    v["kernel"] = Value::from("5.10.0-other");
    // Another host's boot: restores run the CPU check too.
    v["host"]["boot_id"] = Value::from("00000000-0000-0000-0000-000000000000");
    std::fs::write(
        img.join("miehisto.json"),
        serde_json::to_vec_pretty(&v).expect("json"),
    )
    .expect("write md");

    let err = d.fails(&["image", "check", "srv@1"]);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("3 differences"), "{err}");
    assert!(err.contains("kernel: image 5.10.0-other"), "{err}");
    assert!(err.contains("CPU: criu cpuinfo check"), "{err}");
    assert!(
        err.contains(&format!("file {}: size", canon.display())),
        "{err}"
    );

    // `service start` and `runmh restore` refuse it the same way, before CRIU.
    let err = d.fails(&["service", "start", "srv"]);
    assert!(err.contains("3 differences"), "{err}");
    assert_eq!(d.service("srv")["state"], "stopped");
    assert!(common::http_get(port, "/").is_err(), "nothing was restored");
    let rstate = base.join("rs");
    let out = common::runmh_cmd(&rstate)
        .arg("restore")
        .arg("--images")
        .arg(&img)
        .arg("--detach")
        .output()
        .expect("runmh restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("3 differences") && err.contains("nothing was restored"),
        "{err}"
    );
    assert!(common::http_get(port, "/").is_err(), "nothing was restored");
    let instances = miehisto::instance::Instance::list(&rstate.join("."));
    assert!(instances.is_empty(), "no instance was created");
    assert!(
        !std::fs::read_dir(&img)
            .expect("image")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("restore")),
        "CRIU never ran on the image"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&base);
}

/// The fleet version: two network namespaces joined by a veth pair, a
/// daemon in each, the registry in host A's namespace on A's address (not
/// loopback, so both sides name it with --insecure-registry). Push on A,
/// pull on B, start on B, answer on B's address.
#[test]
fn two_hosts_push_on_a_pull_on_b_answer_on_b() {
    if !require("two_hosts_oci")
        || !common::require("two_hosts_oci", common::hosts::missing_tools())
    {
        return;
    }
    let _l = common::lock();
    let mut hosts = TwoHosts::new();
    hosts.start_daemons();
    let (a, b) = (&hosts.a, &hosts.b);
    // A's namespace is its own: a fixed port cannot collide there.
    let reg_port = 5000;
    let reg_addr = common::hosts::ADDR_A;
    let reg = Registry::start_with(
        &hosts.dir.join("reg"),
        &reg_addr.to_string(),
        reg_port,
        a.command(registry::REGISTRY_BIN),
        || matches!(a.http_get(reg_addr, reg_port, "/v2/"), Ok((200, _))),
    );
    let port = 8089;
    a.create_python("web", &["--backend", "trace"], port, &["--bind", "0.0.0.0"]);
    a.ok(&["service", "prebake", "web"]);
    let reference = format!("{}/fleet/web:1", reg.host);
    // Not loopback: plain HTTP only when asked for.
    let https = a.mhctl(&["image", "push", "web@1", &reference]);
    assert!(
        !https.status.success(),
        "HTTPS to a plain-HTTP registry fails"
    );
    let pushed = a.json(&[
        "image",
        "push",
        "web@1",
        &reference,
        "--insecure-registry",
        &reg.host,
    ]);
    let pulled = b.json(&[
        "image",
        "pull",
        &reference,
        "--insecure-registry",
        &reg.host,
    ]);
    assert_eq!(
        pulled["manifest_digest"], pushed["manifest_digest"],
        "{pulled}"
    );
    assert_eq!(pulled["created_service"], true, "{pulled}");
    let check = b.ok(&["image", "check", "web@1"]);
    assert!(check.contains("matches this host"), "{check}");
    let started = b.json(&["service", "start", "web"]);
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["started_from"], "restored", "{started}");
    let body = a
        .wait_http(common::hosts::ADDR_B, port, Duration::from_secs(20))
        .expect("B's restored service answers on B's address, from A");
    assert!(body.starts_with("payload=python pid=1 "), "{body}");
    assert!(
        a.http_get(common::hosts::ADDR_A, port, "/").is_err(),
        "nothing answers on A's address"
    );
    b.ok(&["service", "stop", "web"]);
    drop(reg);
}

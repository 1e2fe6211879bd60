//! Steady-state load: requests per second against a server on loopback.
//! wrk (Debian's package) when it is installed, `wrk -t1 -c8 -d<secs>s`
//! with `Connection: close`; otherwise a small client of our own with the
//! same shape (8 concurrent connections, HTTP/1.0). One request per
//! connection: it makes every server accept (and Django's runserver start
//! a thread) per request, which is where a tracer would cost something,
//! and it avoids runserver's poor keep-alive handling (wrk saw read errors
//! and ~180 req/s with keep-alive, ~670 req/s without). Both clients are
//! bounded in time, the own one also in count, and only talk to 127.0.0.1.

use super::BenchError;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 8;
/// Upper bound on requests of the own client, whatever the duration.
const MAX_REQUESTS: u64 = 5_000_000;

fn wrk() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("wrk"))
        .find(|p| p.is_file())
}

/// Which client [`requests_per_second`] uses.
pub fn client_name() -> &'static str {
    if wrk().is_some() {
        "wrk -t1 -c8, Connection: close"
    } else {
        "built-in client (8 connections, HTTP/1.0)"
    }
}

/// Requests per second that answered 2xx over `dur`.
pub fn requests_per_second(port: u16, path: &str, dur: Duration) -> Result<f64, BenchError> {
    match wrk() {
        Some(w) => with_wrk(&w, port, path, dur),
        None => own_client(port, path, dur),
    }
}

/// Parses wrk's summary; an error when some responses were not 2xx/3xx.
pub fn parse_wrk(out: &str) -> Result<f64, String> {
    if let Some(l) = out.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        return Err(l.trim().to_string());
    }
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| "wrk printed no Requests/sec line".to_string())
}

fn with_wrk(
    wrk: &std::path::Path,
    port: u16,
    path: &str,
    dur: Duration,
) -> Result<f64, BenchError> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let secs = dur.as_secs().max(1);
    let out = Command::new(wrk)
        .args([
            "-t1",
            "-c8",
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            "-H",
            "Connection: close",
            &url,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            what: "wrk".into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).map_err(|detail| BenchError::Load { port, detail })
}

fn one_request(addr: &SocketAddr, req: &[u8], buf: &mut Vec<u8>) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(req).is_err() {
        return false;
    }
    buf.clear();
    if s.read_to_end(buf).is_err() {
        return false;
    }
    buf.starts_with(b"HTTP/1.") && buf.get(9) == Some(&b'2')
}

fn own_client(port: u16, path: &str, dur: Duration) -> Result<f64, BenchError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").into_bytes();
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (ok, failed, req) = (ok.clone(), failed.clone(), req.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                while t0.elapsed() < dur && ok.load(Ordering::Relaxed) < MAX_REQUESTS {
                    if one_request(&addr, &req, &mut buf) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if failed > 0 {
        return Err(BenchError::Load {
            port,
            detail: format!("{failed} of {} requests failed", ok + failed),
        });
    }
    Ok(ok as f64 / secs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrk_output() {
        let out =
            "Running 3s test @ http://127.0.0.1:1/\n  1 threads and 8 connections\nRequests/sec:   4127.33\nTransfer/sec:    700.00KB\n";
        assert_eq!(super::parse_wrk(out), Ok(4127.33));
        let bad = "Requests/sec: 10.0\n  Non-2xx or 3xx responses: 4\n";
        assert!(super::parse_wrk(bad).is_err());
        assert!(super::parse_wrk("nothing").is_err());
    }
}

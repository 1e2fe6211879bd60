//! `miehistod --metrics ADDR:PORT`: the on-demand counters and the
//! activation latency histogram as Prometheus text, on `GET /metrics`.
//! A tiny HTTP/1.0 responder on its own thread: one request per
//! connection, a 2-second read limit, nothing else served.

use super::service::{Caller, Services};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// Prometheus text of the whole daemon.
pub fn render(services: &Services) -> String {
    let mut out = String::new();
    out.push_str("# HELP miehisto_services Services declared in this daemon.\n# TYPE miehisto_services gauge\n");
    out.push_str(&format!(
        "miehisto_services {}\n",
        services.names(Caller::Root).len()
    ));
    out.push_str(&services.ondemand_metrics());
    out
}

fn answer(mut conn: TcpStream, services: &Services) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut r = BufReader::new(&conn);
    if r.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers up to the blank line.
    let mut h = String::new();
    while r.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
        h.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render(services))
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let _ = write!(
        conn,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves the metrics on `addr` from a background thread.
pub fn serve(addr: SocketAddr, services: Arc<Services>) -> Result<SocketAddr, MetricsError> {
    let l = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = l.local_addr().unwrap_or(addr);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for c in l.incoming().flatten() {
                answer(c, &services);
            }
        })
        .map_err(MetricsError::Thread)?;
    Ok(bound)
}

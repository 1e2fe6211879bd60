//! `service.logs`: the end of a service's stdout.log and stderr.log sent
//! as `log` replies, then (with `follow`) what is appended, until the
//! client hangs up.

use super::api::{Reply, Response};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Default of how much of each log's end is sent first.
pub const DEFAULT_TAIL: u64 = 1 << 20;
const CHUNK: usize = 16 * 1024;
const POLL: Duration = Duration::from_millis(200);

struct Tail {
    stream: &'static str,
    path: PathBuf,
    offset: u64,
    /// Bytes of a UTF-8 character cut by a chunk boundary.
    carry: Vec<u8>,
}

impl Tail {
    /// Sends what the file holds past `offset`.
    fn pump(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Ok(());
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated or replaced: start over.
            self.offset = 0;
            self.carry.clear();
        }
        if len == self.offset {
            return Ok(());
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.offset += n as u64;
            let mut bytes = std::mem::take(&mut self.carry);
            bytes.extend_from_slice(&buf[..n]);
            let cut = match std::str::from_utf8(&bytes) {
                Ok(_) => bytes.len(),
                // An incomplete character at the end waits for its rest.
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => bytes.len(),
            };
            self.carry = bytes.split_off(cut);
            if bytes.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let line = Response::ok(Reply::Log {
                stream: self.stream.to_string(),
                text,
            })
            .to_line();
            out.write_all(line.as_bytes())?;
        }
    }
}

/// Streams the logs to `conn`; returns when done or when the client leaves.
pub fn stream(
    conn: &UnixStream,
    files: Vec<(&'static str, PathBuf)>,
    tail: u64,
    follow: bool,
) -> std::io::Result<()> {
    let mut tails: Vec<Tail> = files
        .into_iter()
        .map(|(stream, path)| {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            Tail {
                stream,
                path,
                offset: len.saturating_sub(tail),
                carry: Vec::new(),
            }
        })
        .collect();
    let mut out = conn;
    for t in tails.iter_mut() {
        t.pump(&mut out)?;
    }
    if !follow {
        return out.write_all(Response::ok(Reply::LogEnd).to_line().as_bytes());
    }
    // Reading doubles as the poll interval and tells when the client has
    // closed its end (a read of 0 bytes).
    conn.set_read_timeout(Some(POLL))?;
    let mut scratch = [0u8; 512];
    loop {
        match (&*conn).read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
        for t in tails.iter_mut() {
            t.pump(&mut out)?;
        }
    }
}

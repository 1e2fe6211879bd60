//! Live migration between two daemons: the source's and the destination's
//! sessions (served here), and the client that drives them (`mhctl
//! service migrate`).
//!
//! ```text
//! mhctl                     source daemon (A)             destination daemon (B)
//!   migrate.receive ───────────────────────────────────▶ create the service if new,
//!                                                         criu page-server on B's address
//!   ◀── migrate_listening {port, tls} ────────────────────  (a CA + cert made for this migration)
//!   service.migrate_out ──▶ freeze, criu dump --page-server B:port --tls --leave-stopped
//!                           (pages go straight to B) ───▶ pagemap + pages written
//!   ◀── migrate_chunk… ──── the image's other files
//!   migrate.chunk… ─────────────────────────────────────▶ written beside the pages
//!   ◀── migrate_dumped
//!   migrate.restore ────────────────────────────────────▶ publish as the next generation,
//!                                                         runmh restore
//!   ◀── service (running) ────────────────────────────────
//!   (optionally: an HTTP GET to B's address until it answers)
//!   migrate.finish {moved} ▶ moved: kill the stopped copy;
//!                           not moved: resume it
//! ```
//!
//! Each side's session lives on one connection: a connection that closes
//! early rolls its side back (B forgets the half-received image and stops
//! its page server; A resumes the stopped service), so an interrupted
//! migration loses nothing. A's copy is stopped, not killed, from the dump
//! until `migrate.finish`: what it would have done in between waits in its
//! sockets' queues.
//!
//! CRIU re-opens the service's files by the paths they had on A, except
//! its log files: B's restore hands CRIU B's own in their place (`runmh
//! restore --log-dir`, with `--inherit-fd`), so the image keeps A's paths,
//! which are what CRIU's images name.

use super::api::{
    ApiError, CreateService, ErrorCode, FileChunk, MigrateFinish, MigrateOut, MigrateReceive,
    Operation, Reply, Request, Response, ServiceInfo, MAX_REQUEST_BYTES,
};
use super::client::{Client, ClientError, Exchange};
use super::server::{parse_request, read_line, LineRead, LINE_DEADLINE};
use super::service::{wait_gone, Caller, Expect, RestoreAs, ServiceError, Services};
use crate::control;
use crate::criu::{Criu, CriuError};
use crate::images::{Metadata, MetadataError, Staged, StoreError};
use crate::migrate::{base64_decode, base64_encode, MigrateError, PageServerArgs, TlsMaterial};
use crate::sys;
use crate::sys::exit::ExitStatus;
use nix::libc;
use nix::unistd::Pid;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Raw bytes per chunk: base64 of it stays well inside a request line.
pub const CHUNK_BYTES: usize = 32 * 1024;
/// The most a migrated image's non-page files may hold.
const MAX_RECEIVED_BYTES: u64 = 1 << 30;
/// How long a session waits for its next step.
const SESSION_IDLE: Duration = Duration::from_secs(120);
/// How long the page server may take to finish writing after the dump.
const PAGE_SERVER_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the received image does not read back")]
    Metadata(#[source] MetadataError),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free port on {address} for the page server")]
    Port {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("criu page-server {how}; its log: {log}: {line}")]
    PageServerEnded {
        how: String,
        line: String,
        log: PathBuf,
    },
    #[error("the supervisor did not let {name} go or take it back")]
    Control {
        name: String,
        #[source]
        source: control::ControlError,
    },
}

impl MigrationError {
    fn code(&self) -> ErrorCode {
        match self {
            MigrationError::Service(e) => e.code(),
            MigrationError::Protocol(_) => ErrorCode::BadRequest,
            MigrationError::Migrate(MigrateError::NoDirtyTracking) => ErrorCode::Failed,
            _ => ErrorCode::Failed,
        }
    }

    fn response(&self) -> Response {
        Response::err(self.code(), crate::error_chain(self))
    }
}

/// The next request line of a session: it may begin within
/// [`SESSION_IDLE`], and must then arrive whole within the line deadline.
/// `Err(None)`: the client is gone; `Err(Some)`: what to tell it.
fn next_request(reader: &mut BufReader<&UnixStream>) -> Result<Request, Option<ApiError>> {
    let line = match read_line(reader, Instant::now() + SESSION_IDLE) {
        LineRead::Line(l) => l,
        LineRead::Closed | LineRead::Idle => return Err(None),
        LineRead::Slow => {
            return Err(Some(ApiError {
                code: ErrorCode::BadRequest,
                message: format!(
                    "a session line did not arrive whole within {} s of its first byte",
                    LINE_DEADLINE.as_secs()
                ),
            }))
        }
        LineRead::TooLarge => {
            return Err(Some(ApiError {
                code: ErrorCode::TooLarge,
                message: format!("a session line is larger than {MAX_REQUEST_BYTES} bytes"),
            }))
        }
    };
    parse_request(&line).map_err(Some)
}

fn send(conn: &UnixStream, resp: &Response) -> bool {
    let mut w = conn;
    w.write_all(resp.to_line().as_bytes()).is_ok()
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MigrationError + 'a {
    move |source| MigrationError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A session's scratch directory, removed however the session ends.
struct WorkDir(PathBuf);

impl std::ops::Deref for WorkDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn work_dir(s: &Services, name: &str, side: &str) -> Result<WorkDir, MigrationError> {
    let d = s
        .state_dir()
        .join("migrate")
        .join(format!("{name}-{side}-{}", crate::sys::time::unix_ms()));
    std::fs::create_dir_all(&d).map_err(io("create", &d))?;
    Ok(WorkDir(d))
}

/// The criu the daemon's runmh uses (runmh checks its version).
fn criu_of(s: &Services) -> Result<PathBuf, MigrationError> {
    Ok(Criu::locate(s.config().criu.as_deref())?)
}

/// Runs a command to its end as the daemon's child: the daemon's reaper
/// owns every wait, so `Command::status` would lose the race for it.
fn run_child(
    s: &Services,
) -> impl FnOnce(&mut std::process::Command) -> std::io::Result<bool> + '_ {
    move |c| {
        let pid = s.children().spawn(c).map_err(std::io::Error::other)?;
        Ok(s.children()
            .wait(pid, Duration::from_secs(60))
            .is_some_and(ExitStatus::success))
    }
}

// ------------------------------------------------------------ destination --

/// `migrate.receive`: the destination's whole session. Returns the last
/// reply to send (None when the connection is gone).
pub(super) fn serve_receive(
    s: &Services,
    req: MigrateReceive,
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    who: Caller,
) -> Option<Response> {
    match receive(s, req, conn, reader, who) {
        Ok(Some(info)) => Some(Response::ok(Reply::Service(info))),
        Ok(None) => None,
        Err(e) => Some(e.response()),
    }
}

/// A page server to stop unless it finished.
struct PageServer<'a> {
    s: &'a Services,
    pid: i32,
    done: bool,
}

impl Drop for PageServer<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Our own child (re-parented to the daemon, a subreaper), and
            // not yet reaped, so the pid cannot have been reused.
            if self.s.children().take(self.pid).is_none() {
                let _ = sys::kill(Pid::from_raw(self.pid), libc::SIGKILL);
                let _ = self.s.children().wait(self.pid, Duration::from_secs(5));
            }
        }
    }
}

fn receive(
    s: &Services,
    req: MigrateReceive,
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    who: Caller,
) -> Result<Option<ServiceInfo>, MigrationError> {
    who.require_root(
        "migrate.receive",
        "CRIU restores whatever credentials and memory an image records, so an image made elsewhere would run as anyone",
    )?;
    let name = req.service.name.clone();
    let created = s.exists(&name, who).is_err();
    if created {
        s.create(&req.service, who)?;
    }
    let r = receive_session(s, req, conn, reader);
    // A session that published nothing leaves no trace: not even the
    // service it created for the image that never came.
    if created && !matches!(r, Ok(Some(_))) && s.store().generations(&name).is_empty() {
        if let Err(e) = s.delete(&name, who) {
            log::warn!("{name}: cannot remove the service of an abandoned migration: {e}");
        }
    }
    r
}

fn receive_session(
    s: &Services,
    req: MigrateReceive,
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
) -> Result<Option<ServiceInfo>, MigrationError> {
    let name = req.service.name.clone();
    let g = s.begin(&name, Operation::MigrateIn)?;
    let rec = s.record(&name)?;
    if let Some(l) = s.live(&name) {
        return Err(ServiceError::Running {
            name,
            pid: l.record.root_pid,
        }
        .into());
    }
    let criu = criu_of(s)?;
    let (gen, dest) = s.next_generation(&name)?;
    let staged = Staged::new(&dest)?;
    let work = work_dir(s, &name, "in")?;
    // CRIU needs a port number; the kernel picks one that is free now.
    let port = std::net::TcpListener::bind((req.address.as_str(), 0))
        .and_then(|l| l.local_addr())
        .map_err(|source| MigrationError::Port {
            address: req.address.clone(),
            source,
        })?
        .port();
    let tls = TlsMaterial::generate(&req.address)?;
    let ps_args = PageServerArgs {
        images_dir: staged.dir.clone(),
        work_dir: work.to_path_buf(),
        log_name: "page-server.log".into(),
        address: req.address.clone(),
        port,
        pidfile: work.join("page-server.pid"),
        tls: Some(tls.write(&work.join("tls"))?),
    };
    let mut ps = PageServer {
        s,
        pid: ps_args.start(&criu, run_child(s))?,
        done: false,
    };
    log::info!(
        "{name}: page server (pid {}) listening on {}:{port} for generation {gen}",
        ps.pid,
        req.address
    );
    if !send(conn, &Response::ok(Reply::MigrateListening { port, tls })) {
        return Ok(None);
    }
    let mut received: u64 = 0;
    loop {
        match next_request(reader) {
            Ok(Request::MigrateChunk(c)) => {
                let r = write_chunk(&staged.dir, &c, &mut received);
                let resp = match r {
                    Ok(()) => Response::ok(Reply::Done {
                        message: format!("{} bytes of {}", c.data.len(), c.file),
                    }),
                    Err(e) => {
                        let _ = send(conn, &e.response());
                        return Ok(None);
                    }
                };
                if !send(conn, &resp) {
                    return Ok(None);
                }
            }
            Ok(Request::MigrateRestore) => break,
            Ok(other) => {
                return Err(MigrationError::Protocol(format!(
                    "a migrate.receive session takes migrate.chunk or migrate.restore, not {}",
                    other.op()
                )))
            }
            Err(Some(e)) => return Err(MigrationError::Protocol(e.message)),
            Err(None) => {
                log::warn!("{name}: the migration was abandoned before the restore; nothing kept");
                return Ok(None);
            }
        }
    }
    let log = work.join("page-server.log");
    log::info!("{name}: {received} bytes of image files received; waiting for the page server");
    match s.children().wait(ps.pid, PAGE_SERVER_WAIT) {
        Some(ExitStatus::Exited(0)) => ps.done = true,
        other => {
            let how = match other {
                Some(i) => format!("ended: {i}"),
                None => format!("did not finish within {} s", PAGE_SERVER_WAIT.as_secs()),
            };
            let line = crate::criu::log::decisive_line_of(&log);
            // The work directory goes; its log is kept with the service's.
            let kept = s.log_dir(&name).join("page-server.log");
            let log = match crate::files::private_dir(&s.log_dir(&name))
                .and_then(|()| std::fs::copy(&log, &kept))
            {
                Ok(_) => kept,
                Err(_) => log,
            };
            return Err(MigrationError::PageServerEnded { how, line, log });
        }
    }
    let mut md = Metadata::read(&staged.dir).map_err(MigrationError::Metadata)?;
    // The metadata keeps the source's log paths: they are what CRIU's
    // images name, and the restore hands CRIU this service's own log files
    // in their place (`runmh restore --log-dir`, `--inherit-fd`).
    let (bytes, files) = crate::images::dir_usage(&staged.dir);
    md.image_bytes = bytes;
    md.image_files = files;
    let image = staged.publish(&md)?;
    log::info!("{name}: migrated image published at {}", image.display());
    // A failed restore leaves the published generation as it is.
    let sup = s.restore(
        &name,
        &rec.config,
        gen,
        RestoreAs::Running,
        super::service::STEP_TIMEOUT,
    )?;
    s.watch(&name, Some(sup));
    let _ = s.update(&name, |r| r.last_exit = None);
    drop(g);
    drop(work);
    Ok(Some(s.info(&name)?))
}

fn write_chunk(dir: &Path, c: &FileChunk, received: &mut u64) -> Result<(), MigrationError> {
    let ok = !c.file.is_empty()
        && c.file.len() <= 128
        && !c.file.starts_with('.')
        && c.file
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'));
    if !ok {
        return Err(MigrationError::Protocol(format!(
            "{:?} is not an image file name",
            c.file
        )));
    }
    let data = base64_decode(&c.data)?;
    *received = received.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
    if *received > MAX_RECEIVED_BYTES {
        return Err(MigrationError::Protocol(format!(
            "the image's files exceed {} MiB",
            MAX_RECEIVED_BYTES >> 20
        )));
    }
    let path = dir.join(&c.file);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("create", &path))?;
    f.write_all_at(&data, c.offset)
        .map_err(io("write", &path))?;
    Ok(())
}

// ----------------------------------------------------------------- source --

/// `service.migrate_out`: the source's whole session.
pub(super) fn serve_out(
    s: &Services,
    req: MigrateOut,
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    who: Caller,
) -> Option<Response> {
    match out(s, req, conn, reader, who) {
        Ok(Some(info)) => Some(Response::ok(Reply::Service(info))),
        Ok(None) => None,
        Err(e) => Some(e.response()),
    }
}

fn out(
    s: &Services,
    req: MigrateOut,
    conn: &UnixStream,
    reader: &mut BufReader<&UnixStream>,
    who: Caller,
) -> Result<Option<ServiceInfo>, MigrationError> {
    let name = req.name.clone();
    let g = s.begin(&name, Operation::MigrateOut)?;
    s.owned(&name, who)?;
    let live = s
        .live(&name)
        .ok_or_else(|| ServiceError::NotRunning { name: name.clone() })?;
    if req.pre_dump > 0 {
        crate::migrate::dirty_tracking(&criu_of(s)?, run_child(s))?;
        return Err(MigrationError::Protocol(
            "this kernel tracks dirty memory, but miehisto's pre-dump iterations were built and tested only where it cannot (they are refused there); migrate without --pre-dump".into(),
        ));
    }
    let work = work_dir(s, &name, "out")?;
    let dest = work.join("image");
    let tls_dir = work.join("tls");
    req.tls.write(&tls_dir)?;
    let mut c = s.runmh(&name, Path::new("/"));
    c.arg("dump")
        .arg("--pid")
        .arg(live.record.root_pid.to_string())
        .arg("--images")
        .arg(&dest)
        .arg("--page-server")
        .arg(format!("{}:{}", req.address, req.port))
        .arg("--page-server-tls")
        .arg(&tls_dir)
        .arg("--leave-stopped");
    let t0 = Instant::now();
    if let Err(e) = s.run_step(&name, "migrate dump", c, Expect::Published) {
        // runmh gave the tree back to its supervisor (CRIU resumes it
        // after a failed dump).
        return Err(e.into());
    }
    let dump_ms = crate::sys::time::millis(t0.elapsed());
    let sock = live.instance.control_socket();
    let resume = |why: &str| {
        log::warn!("{name}: {why}; resuming it here");
        if let Err(e) = control::call(
            &sock,
            &control::Request::Thaw { alive: true },
            Duration::from_secs(30),
        ) {
            log::warn!("{name}: the supervisor did not resume it: {e}");
        }
    };
    // From here on the service is stopped; every way out resumes or kills it.
    let sent = send_image(conn, &dest);
    let (files, bytes) = match sent {
        Ok(Some(n)) => n,
        Ok(None) => {
            resume("the migration's client went away");
            return Ok(None);
        }
        Err(e) => {
            resume("its image could not be read back");
            return Err(e);
        }
    };
    drop(work);
    if !send(
        conn,
        &Response::ok(Reply::MigrateDumped {
            dump_ms,
            files,
            bytes,
        }),
    ) {
        resume("the migration's client went away");
        return Ok(None);
    }
    let finish: MigrateFinish = match next_request(reader) {
        Ok(Request::MigrateFinish(f)) => f,
        Ok(other) => {
            resume(&format!("migrate.finish expected, {} came", other.op()));
            return Err(MigrationError::Protocol(format!(
                "a service.migrate_out session takes migrate.finish, not {}",
                other.op()
            )));
        }
        Err(Some(e)) => {
            resume("the migration's client sent a malformed line");
            return Err(MigrationError::Protocol(e.message));
        }
        Err(None) => {
            resume("the migration's client went away before finishing");
            return Ok(None);
        }
    };
    if !finish.moved {
        resume("the destination did not take it over");
        drop(g);
        return Ok(Some(s.info(&name)?));
    }
    control::call(
        &sock,
        &control::Request::Thaw { alive: false },
        Duration::from_secs(30),
    )
    .map_err(|source| MigrationError::Control {
        name: name.clone(),
        source,
    })?;
    // PID 1 of its namespace: SIGKILL from outside is always delivered.
    let sup = live.record.supervisor_pid;
    let _ = sys::kill(Pid::from_raw(live.record.root_pid), libc::SIGKILL);
    wait_gone(sup, Duration::from_secs(30));
    s.watch(&name, None);
    let _ = s.children().wait(sup, Duration::from_millis(500));
    let to = finish.to.unwrap_or_else(|| "another host".into());
    let _ = s.update(&name, |r| r.last_exit = Some(format!("migrated to {to}")));
    drop(g);
    Ok(Some(s.info(&name)?))
}

/// Sends every file of `dir` as `migrate_chunk` replies; None when the
/// connection is gone. Returns (files, bytes).
fn send_image(conn: &UnixStream, dir: &Path) -> Result<Option<(u64, u64)>, MigrationError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io("read", dir))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK_BYTES];
    for n in names {
        let path = dir.join(&n);
        let mut f = std::fs::File::open(&path).map_err(io("read", &path))?;
        let mut offset: u64 = 0;
        loop {
            let got = match f.read(&mut buf) {
                Ok(g) => g,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("read", &path)(e)),
            };
            // An empty file still travels once, so that it exists on B.
            if got == 0 && offset > 0 {
                break;
            }
            let chunk = FileChunk {
                file: n.clone(),
                offset,
                data: base64_encode(&buf[..got]),
            };
            if !send(conn, &Response::ok(Reply::MigrateChunk(chunk))) {
                return Ok(None);
            }
            let got = u64::try_from(got).unwrap_or(u64::MAX);
            offset = offset.saturating_add(got);
            bytes = bytes.saturating_add(got);
            if got == 0 {
                break;
            }
        }
        files += 1;
    }
    Ok(Some((files, bytes)))
}

// ----------------------------------------------------------------- client --

#[derive(Debug, thiserror::Error)]
pub enum MigrateClientError {
    #[error("the source ({at}): {source}")]
    Source {
        at: String,
        #[source]
        source: ClientError,
    },
    #[error("the destination ({at}): {source}")]
    Destination {
        at: String,
        #[source]
        source: ClientError,
    },
    #[error("no service named {name:?} on {at}")]
    NoService { name: String, at: String },
    #[error("{name} is not running on {at}; only a running service migrates (start it, or push its image)")]
    NotRunning { name: String, at: String },
    #[error("{side} answered {what} where {want} was expected")]
    Unexpected {
        side: &'static str,
        what: String,
        want: &'static str,
    },
    #[error("{name} was restored on {at} but {addr}:{port} gave no HTTP answer within {secs} s ({last}); it was stopped there and resumed on the source")]
    NoAnswer {
        name: String,
        at: String,
        addr: String,
        port: u16,
        secs: u64,
        last: String,
    },
    #[error("the restore on {at} failed, and {name} runs on the source again: {source}")]
    RestoreFailed {
        name: String,
        at: String,
        #[source]
        source: ClientError,
    },
}

/// What `mhctl service migrate` asks for.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub name: String,
    pub pre_dump: u32,
    /// The destination's address as the source host reaches it (the page
    /// server listens there).
    pub address: String,
    /// Answer check: an HTTP GET to `address:port` + path until it answers.
    pub probe: Option<(u16, String)>,
    pub probe_timeout: Duration,
}

/// How a migration went, in milliseconds from the moment the dump was asked for.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MigrateReport {
    pub service: ServiceInfo,
    /// CRIU's dump on the source (pages streamed to the destination).
    pub dump_ms: u64,
    /// The dump's other files, copied through the client.
    pub files: u64,
    pub bytes: u64,
    /// Dump asked → restored on the destination.
    pub restored_ms: u64,
    /// Dump asked → first HTTP answer on the destination (with a probe).
    pub answered_ms: Option<u64>,
}

impl MigrateReport {
    /// The service's downtime as the client measured it: from the dump
    /// request (the source stops answering) to the destination's first
    /// answer, or to the restore when there was no probe.
    pub fn downtime_ms(&self) -> u64 {
        self.answered_ms.unwrap_or(self.restored_ms)
    }
}

/// One HTTP/1.0 GET; the status code.
pub fn http_status(addr: &str, port: u16, path: &str) -> std::io::Result<u16> {
    use std::net::ToSocketAddrs;
    let sa = (addr, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{addr} resolves to nothing")))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let got = s.read(&mut head[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

fn service_from(info: &ServiceInfo) -> CreateService {
    CreateService {
        name: info.name.clone(),
        command: info.command.clone(),
        env: info.env.clone(),
        cwd: info.cwd.clone(),
        backend: info.backend.clone(),
        stop_at: info.stop_at.clone(),
        force: false,
        // The migrated copy runs on the other host as started by hand;
        // `service set --on-demand` there makes it on-demand again.
        on_demand: None,
        user: info.user.clone(),
    }
}

/// Moves a running service from `src`'s host to `dst`'s: the steps of
/// the module's diagram, in order; on any failure after the dump the
/// source copy is resumed (by `migrate.finish {moved: false}`, or by the
/// source daemon itself when this connection drops).
pub fn migrate(
    src: &Client,
    dst: &Client,
    req: &MigrateRequest,
) -> Result<MigrateReport, MigrateClientError> {
    let src_at = src.addr().to_string();
    let dst_at = dst.addr().to_string();
    let se = |source| MigrateClientError::Source {
        at: src_at.clone(),
        source,
    };
    let de = |source| MigrateClientError::Destination {
        at: dst_at.clone(),
        source,
    };
    let services = match src.call(&Request::ServiceList).map_err(se)? {
        Reply::Services { services } => services,
        other => {
            return Err(MigrateClientError::Unexpected {
                side: "the source",
                what: format!("{other:?}"),
                want: "a service list",
            })
        }
    };
    let info = services
        .into_iter()
        .find(|s| s.name == req.name)
        .ok_or_else(|| MigrateClientError::NoService {
            name: req.name.clone(),
            at: src_at.clone(),
        })?;
    if info.pid.is_none() {
        return Err(MigrateClientError::NotRunning {
            name: req.name.clone(),
            at: src_at.clone(),
        });
    }
    let mut b: Exchange = dst.connect().map_err(de)?;
    let (port, tls) = match b
        .call(&Request::MigrateReceive(MigrateReceive {
            service: service_from(&info),
            address: req.address.clone(),
        }))
        .map_err(de)?
    {
        Reply::MigrateListening { port, tls } => (port, tls),
        other => {
            return Err(MigrateClientError::Unexpected {
                side: "the destination",
                what: format!("{other:?}"),
                want: "migrate_listening",
            })
        }
    };
    let t0 = Instant::now();
    let mut a = src.connect().map_err(se)?;
    a.send(&Request::MigrateOut(MigrateOut {
        name: req.name.clone(),
        address: req.address.clone(),
        port,
        pre_dump: req.pre_dump,
        tls,
    }))
    .map_err(se)?;
    let (dump_ms, files, bytes) = loop {
        match a.read_reply().map_err(se)? {
            Reply::MigrateChunk(c) => match b.call(&Request::MigrateChunk(c)).map_err(de)? {
                Reply::Done { .. } => {}
                other => {
                    return Err(MigrateClientError::Unexpected {
                        side: "the destination",
                        what: format!("{other:?}"),
                        want: "done",
                    })
                }
            },
            Reply::MigrateDumped {
                dump_ms,
                files,
                bytes,
            } => break (dump_ms, files, bytes),
            other => {
                return Err(MigrateClientError::Unexpected {
                    side: "the source",
                    what: format!("{other:?}"),
                    want: "migrate_chunk or migrate_dumped",
                })
            }
        }
    };
    let finish = |a: &mut Exchange, moved: bool| {
        a.call(&Request::MigrateFinish(MigrateFinish {
            moved,
            to: Some(dst_at.clone()),
        }))
    };
    let restored = b.call(&Request::MigrateRestore);
    let restored_ms = crate::sys::time::millis(t0.elapsed());
    drop(b);
    let service = match restored {
        Ok(Reply::Service(s)) => s,
        Ok(other) => {
            let _ = finish(&mut a, false);
            return Err(MigrateClientError::Unexpected {
                side: "the destination",
                what: format!("{other:?}"),
                want: "the restored service",
            });
        }
        Err(e) => {
            finish(&mut a, false).map_err(se)?;
            return Err(MigrateClientError::RestoreFailed {
                name: req.name.clone(),
                at: dst_at.clone(),
                source: e,
            });
        }
    };
    let mut answered_ms = None;
    if let Some((port, path)) = &req.probe {
        let mut last = String::from("no attempt");
        while t0
            .elapsed()
            .saturating_sub(Duration::from_millis(restored_ms))
            < req.probe_timeout
        {
            match http_status(&req.address, *port, path) {
                Ok(_) => {
                    answered_ms = Some(crate::sys::time::millis(t0.elapsed()));
                    break;
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if answered_ms.is_none() {
            let _ = dst.call(&Request::ServiceStop(super::api::Named {
                name: req.name.clone(),
            }));
            finish(&mut a, false).map_err(se)?;
            return Err(MigrateClientError::NoAnswer {
                name: req.name.clone(),
                at: dst_at,
                addr: req.address.clone(),
                port: *port,
                secs: req.probe_timeout.as_secs(),
                last,
            });
        }
    }
    finish(&mut a, true).map_err(se)?;
    Ok(MigrateReport {
        service,
        dump_ms,
        files,
        bytes,
        restored_ms,
        answered_ms,
    })
}

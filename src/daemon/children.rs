//! The daemon's children: it is a child subreaper, so a restored runmh
//! supervisor (whose CRIU front process exits once the restore is done)
//! is re-parented to the daemon, keeping the tree miehistod → runmh →
//! service. One thread reaps every child with `waitpid(-1)` and files the
//! exit statuses by pid; the rest of the daemon waits on that table and
//! never calls `wait` itself (two waiters would steal each other's
//! statuses).

use crate::sys::exit::ExitStatus;
use crate::sys::{self, Wait};
use nix::errno::Errno;
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ChildrenError {
    #[error("cannot make the daemon a child subreaper")]
    Subreaper(#[source] Errno),
    #[error("cannot start the reaper thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// Statuses nobody claimed are dropped after this long.
const KEEP: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct Table {
    exits: HashMap<i32, (ExitStatus, Instant)>,
    /// Bumped on every spawn, so a reaper idle for lack of children wakes.
    spawned: u64,
}

/// Called on the reaper thread with each child that ended.
type ExitHook = Box<dyn Fn(i32, ExitStatus) + Send + Sync>;

struct Inner {
    table: Mutex<Table>,
    exited: Condvar,
    spawned: Condvar,
    on_exit: Mutex<Option<ExitHook>>,
}

#[derive(Clone)]
pub struct Children {
    inner: Arc<Inner>,
}

impl Children {
    /// Makes this process a subreaper and starts the reaper thread.
    pub fn start() -> Result<Children, ChildrenError> {
        sys::set_child_subreaper().map_err(ChildrenError::Subreaper)?;
        let inner = Arc::new(Inner {
            table: Mutex::new(Table::default()),
            exited: Condvar::new(),
            spawned: Condvar::new(),
            on_exit: Mutex::new(None),
        });
        let me = Children { inner };
        let reaper = me.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.reap_forever())
            .map_err(ChildrenError::Thread)?;
        Ok(me)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reap_forever(&self) {
        loop {
            let seen = self.lock().spawned;
            match sys::waitpid(-1, 0) {
                Ok(Some(Wait::Exited(pid, code))) => {
                    self.file(pid.as_raw(), ExitStatus::Exited(code))
                }
                Ok(Some(Wait::Signaled(pid, sig))) => {
                    self.file(pid.as_raw(), ExitStatus::Signaled(sig))
                }
                Ok(_) => {}
                Err(Errno::ECHILD) => {
                    // No child: none can appear but through a spawn of ours
                    // (orphans are only re-parented from our descendants).
                    let t = self.lock();
                    if t.spawned == seen {
                        let _ = self.inner.spawned.wait_timeout(t, Duration::from_secs(5));
                    }
                }
                Err(e) => {
                    log::warn!("waitpid failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn file(&self, pid: i32, info: ExitStatus) {
        log::debug!("child {pid} ended: {info}");
        let mut t = self.lock();
        let now = Instant::now();
        t.exits.retain(|_, (_, at)| now.duration_since(*at) < KEEP);
        t.exits.insert(pid, (info, now));
        drop(t);
        self.inner.exited.notify_all();
        let hook = self.inner.on_exit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = hook.as_ref() {
            f(pid, info);
        }
    }

    /// Has `f` told of every child that ends from now on (on the reaper
    /// thread: it must not block).
    pub fn on_exit(&self, f: impl Fn(i32, ExitStatus) + Send + Sync + 'static) {
        *self.inner.on_exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Spawns `cmd` (never waited on by std: the reaper owns the status).
    pub fn spawn(&self, cmd: &mut Command) -> Result<i32, ChildrenError> {
        let child = cmd.spawn().map_err(|source| ChildrenError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let pid = sys::child_pid(&child).as_raw();
        // Dropping a Child neither waits for nor kills the process.
        drop(child);
        self.lock().spawned += 1;
        self.inner.spawned.notify_all();
        Ok(pid)
    }

    /// Waits up to `timeout` for child `pid` to end; takes its status.
    pub fn wait(&self, pid: i32, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut t = self.lock();
        loop {
            if let Some((info, _)) = t.exits.remove(&pid) {
                return Some(info);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            t = self
                .inner
                .exited
                .wait_timeout(t, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The status of `pid` if it was our child and has ended.
    pub fn take(&self, pid: i32) -> Option<ExitStatus> {
        self.lock().exits.remove(&pid).map(|(i, _)| i)
    }
}

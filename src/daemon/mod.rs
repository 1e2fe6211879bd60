//! The daemon, `miehistod`, and its client library (used by `mhctl`).
//!
//! # miehistod and mhctl
//!
//! `miehistod` manages services and their images; `mhctl` talks to it.
//! Every step runs `runmh` as the daemon's child, so the process tree is
//! `miehistod → runmh → service` whether the service booted cold or came
//! back from an image (a restored runmh supervisor is re-parented to the
//! daemon, which is a child subreaper).
//!
//! ```text
//! sudo miehistod &                                   # socket /run/miehisto/miehistod.sock
//! sudo mhctl service create web -- python3 examples/http_server.py --port 8080
//! sudo mhctl service prebake web                     # boot to the first listen(2), dump: generation 1
//! sudo mhctl service start web                       # restore the newest generation
//! sudo mhctl service list                            # NAME STATE PID IMAGE UPTIME ...
//! sudo mhctl service dump web --leave-running        # generation 2, from the running service
//! sudo mhctl service stop web
//! sudo mhctl service start web --cold                # boot the command instead
//! sudo mhctl image list web; sudo mhctl image inspect web@1; sudo mhctl image rm web@1
//! sudo mhctl service logs web -f
//! sudo mhctl image push web@1 127.0.0.1:5000/miehisto/web:1   # to an OCI registry
//! sudo mhctl image pull 127.0.0.1:5000/miehisto/web:1         # on another host
//! sudo mhctl image check web@1                                # would it restore here?
//! ```
//!
//! Every `mhctl` command prints a table or a few lines, or JSON with
//! `--json`; `prebake`, `dump` and `start` show elapsed seconds on stderr
//! when it is a terminal. `mhctl experiment ...` and `mhctl bench ...` run
//! the research matrix and the benchmarks without a daemon (`mhctl --criu
//! PATH --state-dir DIR experiment ...`).
//!
//! ## Daemon options
//! * `--socket PATH` (default `/run/miehisto/miehistod.sock`), created with
//!   `--socket-mode` (default `0600`).
//! * `--allow-uid UID`, `--allow-gid GID` (repeatable): who may connect
//!   besides root; each peer is checked with `SO_PEERCRED` (its uid, gid and
//!   supplementary groups). A refused client gets a `forbidden` reply. To
//!   let a group in, widen the socket too: `--allow-gid 50 --socket-mode 0660`
//!   with the socket's directory group-accessible. An allowed client other
//!   than root is no root: the services it creates run as it (its uid and
//!   gid; `service create --user` naming anyone else is refused), it sees
//!   and touches only those (another's are `not_found` to it), and it may not
//!   `image pull`, receive a migration (CRIU restores whatever credentials an
//!   image records) or have the daemon `--listen` on a port below 1024.
//!   Root sees every service; `service create --user UID[:GID]` runs one as
//!   another user.
//! * `--client-idle-timeout SECS` (default 300): a connection without a
//!   request this long is closed.
//! * `--state-dir DIR` (default `/var/lib/miehisto`): `services/<name>.json`
//!   (the registry, one file per service, replaced atomically),
//!   `images/<name>/<generation>/` (CRIU images + `miehisto.json`),
//!   `logs/<name>/` (the service's `stdout.log`, `stderr.log`, and runmh's
//!   own output in `runmh.log`), `runmh/` (runmh's instance records),
//!   `miehistod.lock` (one daemon per state directory).
//! * `--runmh PATH` (default: `runmh` beside `miehistod`), `--criu PATH`
//!   (passed to runmh), `--stop-timeout SECS` (SIGTERM to SIGKILL on stop).
//!
//! ## Guarantees
//! * **Restart-safe.** runmh runs in its own process group, without a
//!   parent-death signal, its output in a file: stopping or killing the
//!   daemon stops no service. A new daemon finds the running services in
//!   runmh's instance records (each service has its own log directory) and
//!   /proc, and manages them as before (list, dump, stop).
//! * **Atomic images.** A generation directory appears by one `rename(2)`
//!   of a staging directory, or not at all; a failed prebake or dump
//!   leaves no generation (runmh keeps CRIU's log as `<gen>.dump-failed.log`).
//!   Removing a generation hides it by rename before deleting it.
//! * **One request per service at a time.** A second request on the same
//!   service waits for the first to finish: two concurrent `prebake`s make
//!   two generations, one after the other. Different services proceed in
//!   parallel. `service list` never waits; it shows the step in progress.
//! * **Validated input.** Service names are `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`
//!   (no `/`, no `..`); commands are argv, never a shell line; requests are
//!   limited to 64 KiB; a malformed request gets an error reply and the
//!   daemon goes on serving.
//! * **No client locks others out.** A request line must arrive whole within
//!   5 s of its first byte; refusals (forbidden, busy) are answered on
//!   short-lived threads within 1 s, never by the thread that accepts; of the
//!   64 connections served at once, 8 are kept for root.
//!
//! ## Remote daemons
//! `mhctl --host ssh://[USER@]HOST[:PORT][/SOCKET] ...` (or `MIEHISTO_HOST`)
//! reaches a daemon on another host through the system's `ssh`, which runs
//! `mhctl system dial-stdio` there: see [`remote`]. The remote daemon
//! checks the credentials of that process like any local client's.
//!
//! ## API
//! JSON lines over the UNIX socket, versioned: see [`api`] for the full
//! table. Example with a plain tool:
//! `printf '{"v":1,"op":"service.list"}\n' | sudo socat - UNIX-CONNECT:/run/miehisto/miehistod.sock`.
//!
//! The modules: [`api`] (the wire types), [`server`] (socket, peer check,
//! one thread per connection), [`service`] (the lifecycle), [`registry`]
//! (persistent services), [`store`] (image generations), [`children`]
//! (subreaper and reaping), [`logs`] (log streaming), [`client`],
//! [`remote`] (ssh transport).

pub mod api;
pub mod children;
pub mod client;
pub mod logs;
pub mod metrics;
pub mod migrate;
pub mod ondemand;
pub mod registry;
pub mod remote;
pub mod server;
pub mod service;
pub mod store;

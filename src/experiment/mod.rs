//! The research matrix (issue 5): the talk's experiments, reproduced side by
//! side on this kernel with this CRIU. Each scenario boots a payload in a
//! fresh sandbox with the library's own prebake and restore, and the row
//! reports what happened — the stop, the dump, the restore, and what the
//! application saw at its `listen` afterwards, in its own words. No
//! outcome is written into the tool.
//!
//! * [`scenarios`] — the rows: payload, backend, research switches;
//! * [`run`] — running one row for real;
//! * [`payloads`] — the C payloads build.rs made, the Go one built here;
//! * [`report`] — the results as a table, markdown and JSON.

pub mod patched;
pub mod payloads;
pub mod report;
pub mod run;
pub mod scenarios;

use crate::criu::{Criu, CriuError};
use crate::explain;
use payloads::{Resolver, Sources};
use report::{Report, Row, Status};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Run only these scenario ids (repeatable): `3`, `7-go-trace`; an id
    /// also selects the rows below it (`7` runs every open question).
    #[arg(long = "only", value_name = "ID")]
    pub only: Vec<String>,
    /// Run each scenario N times.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub repeat: u32,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the results as a markdown table.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// A patched CRIU (seize-patch/): adds a twin of rows 1–6 run with it.
    #[arg(long, value_name = "PATH")]
    pub criu_patched: Option<PathBuf>,
    /// Seconds a target may take to reach listen(2) before the row says "no stop".
    #[arg(long = "stop-timeout", default_value_t = 5, value_name = "SECS")]
    pub stop_timeout: u64,
    /// Directory of the compiled C payloads (default: the ones this build made).
    #[arg(long, value_name = "DIR")]
    pub payloads: Option<PathBuf>,
    /// The repository's examples/ directory (for the Go payload's source).
    #[arg(long, value_name = "DIR")]
    pub examples: Option<PathBuf>,
    /// Keep each scenario's logs under STATE/experiments/ and print where.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(
        "the research matrix must run as root (namespaces, ptrace and CRIU need it); try sudo"
    )]
    NotRoot,
    #[error("--repeat must be at least 1")]
    BadRepeat,
    #[error("--stop-timeout must be at least 1 second")]
    BadTimeout,
    #[error("unknown scenario id {id:?} for --only; the ids are: {known}")]
    UnknownId { id: String, known: String },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("the patched CRIU given with --criu-patched is not usable")]
    PatchedCriu(#[source] CriuError),
    #[error("cannot block the supervisor's signals")]
    Signals(#[source] nix::errno::Errno),
    #[error("cannot make the state directory {path} an absolute path (empty, or the current directory is gone); pass an absolute --state-dir")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the matrix's work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the {what} report to {path}: its directory does not exist; create it or pick another path")]
    ReportDir { what: &'static str, path: PathBuf },
    #[error("cannot write the {what} report to {path}")]
    WriteReport {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything a matrix run needs, already validated.
pub struct MatrixOpts {
    pub scenarios: Vec<scenarios::Scenario>,
    /// Rows that need the patched CRIU's new options (seize-patch/).
    pub patched: Vec<patched::PatchedScenario>,
    pub repeat: u32,
    pub criu: Criu,
    pub criu_patched: Option<Criu>,
    pub state_dir: PathBuf,
    pub stop_timeout: Duration,
    pub sources_payloads: PathBuf,
    pub sources_examples: PathBuf,
    pub keep: bool,
}

/// The result of a run: the report, the kept work directory, and whether
/// a signal cut it short.
pub struct MatrixRun {
    pub report: Report,
    pub kept: Option<PathBuf>,
    pub interrupted: bool,
}

fn summary(r: &Row) -> String {
    match r.status {
        Status::Skipped => format!("skipped: {}", r.evidence),
        Status::Error => format!("error: {}", r.evidence),
        Status::Ran => format!(
            "stop {} · dump {} · restore {} · listen after restore {}",
            report::yes_no(r.stopped),
            report::yes_no(r.dumped),
            report::yes_no(r.restored),
            report::after(r.after_restore)
        ),
    }
}

/// Runs the selected scenarios `repeat` times each, one at a time.
pub fn run_matrix(opts: &MatrixOpts) -> Result<MatrixRun, ExperimentError> {
    crate::stop::tracer::block_supervisor_signals().map_err(ExperimentError::Signals)?;
    let started = crate::sys::time::unix_ms();
    let work = opts
        .state_dir
        .join("experiments")
        .join(format!("{started}-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|source| ExperimentError::WorkDir {
        path: work.clone(),
        source,
    })?;
    let mut resolver = Resolver::new(Sources {
        payload_dir: opts.sources_payloads.clone(),
        examples_dir: opts.sources_examples.clone(),
        build_dir: work.join("build"),
    });
    let kernel = crate::images::metadata::kernel_release();
    explain::say(
        "matrix",
        &format!(
            "{} scenario(s) × {} on kernel {kernel} with CRIU {}; each in a fresh sandbox, one after the other",
            opts.scenarios.len(),
            opts.repeat,
            opts.criu.version
        ),
    );
    let mut ctx = run::Ctx {
        criu: &opts.criu,
        criu_patched: opts.criu_patched.as_ref(),
        state_dir: &opts.state_dir,
        work_dir: &work,
        stop_timeout: opts.stop_timeout,
        resolver: &mut resolver,
    };
    let total = (opts.scenarios.len() + opts.patched.len()) * opts.repeat as usize;
    let mut rows = Vec::new();
    let mut interrupted = false;
    let signals = crate::supervisor::signals();
    // Plain scenarios, then the patched-CRIU ones, in one sequence.
    enum Job<'a> {
        Plain(&'a scenarios::Scenario),
        Patched(&'a patched::PatchedScenario),
    }
    let jobs: Vec<Job> = opts
        .scenarios
        .iter()
        .map(Job::Plain)
        .chain(opts.patched.iter().map(Job::Patched))
        .collect();
    'outer: for attempt in 1..=opts.repeat {
        for job in &jobs {
            let (id, technique) = match job {
                Job::Plain(sc) => (sc.id.as_str(), sc.technique.as_str()),
                Job::Patched(sc) => (sc.id, sc.technique),
            };
            eprintln!("mhctl: [{}/{total}] {id} — {technique}", rows.len() + 1);
            let row = match job {
                Job::Plain(sc) => run::run_scenario(sc, attempt, &mut ctx),
                Job::Patched(sc) => patched::run_patched(sc, attempt, &mut ctx),
            };
            eprintln!("mhctl:     {}", summary(&row));
            rows.push(row);
            // A signal that arrived during the restore phase (or stopped a
            // prebake) ends the matrix; the rows so far are still reported.
            if let Ok(sig) = signals.try_recv() {
                eprintln!(
                    "mhctl: interrupted by {}; reporting the rows so far",
                    crate::sys::signal::signal_name(sig)
                );
                interrupted = true;
                break 'outer;
            }
            if rows.last().is_some_and(|r| {
                r.status == Status::Error && r.evidence.starts_with("interrupted by")
            }) {
                interrupted = true;
                break 'outer;
            }
            explain::pause(2);
        }
    }
    let report = Report {
        schema_version: report::SCHEMA_VERSION,
        date: report::utc_date(started),
        generated_unix_ms: started,
        kernel,
        criu_version: opts.criu.version.to_string(),
        criu_patched_version: opts.criu_patched.as_ref().map(|c| c.version.to_string()),
        rows,
    };
    let kept = if opts.keep {
        let _ = std::fs::remove_dir_all(work.join("build"));
        Some(work)
    } else {
        let _ = std::fs::remove_dir_all(&work);
        // Leave no empty parent behind either.
        let _ = std::fs::remove_dir(opts.state_dir.join("experiments"));
        None
    };
    Ok(MatrixRun {
        report,
        kept,
        interrupted,
    })
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader never sees half a report.
fn write_atomic(what: &'static str, path: &Path, text: &str) -> Result<(), ExperimentError> {
    let err = |source| ExperimentError::WriteReport {
        what,
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "report".into());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Validates the arguments into [`MatrixOpts`].
pub fn prepare(
    args: &ExperimentArgs,
    criu: Option<&Path>,
    state_dir: &Path,
) -> Result<MatrixOpts, ExperimentError> {
    if !crate::sys::is_root() {
        return Err(ExperimentError::NotRoot);
    }
    if args.repeat == 0 {
        return Err(ExperimentError::BadRepeat);
    }
    if args.stop_timeout == 0 {
        return Err(ExperimentError::BadTimeout);
    }
    // Checked before the matrix runs for minutes, not after.
    for (what, path) in [("JSON", &args.json), ("markdown", &args.markdown)] {
        if let Some(p) = path {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(ExperimentError::ReportDir {
                    what,
                    path: p.clone(),
                });
            }
        }
    }
    let all = scenarios::all(args.criu_patched.is_some());
    let patched_all = if args.criu_patched.is_some() {
        patched::all()
    } else {
        Vec::new()
    };
    let known = all
        .iter()
        .map(|s| s.id.clone())
        .chain(patched_all.iter().map(|s| s.id.to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    // An id may select plain rows, patched rows, or both; each must select something.
    for w in &args.only {
        let hits_plain = all.iter().any(|s| scenarios::selects(w, &s.id));
        let hits_patched = patched_all.iter().any(|s| scenarios::selects(w, s.id));
        if !hits_plain && !hits_patched {
            return Err(ExperimentError::UnknownId {
                id: w.clone(),
                known,
            });
        }
    }
    let plain_only: Vec<String> = args
        .only
        .iter()
        .filter(|w| all.iter().any(|s| scenarios::selects(w, &s.id)))
        .cloned()
        .collect();
    let scenarios = if !args.only.is_empty() && plain_only.is_empty() {
        Vec::new()
    } else {
        scenarios::select(all, &plain_only).map_err(|id| ExperimentError::UnknownId {
            id,
            known: known.clone(),
        })?
    };
    let patched = if args.criu_patched.is_some() {
        patched::selected(&args.only)
    } else {
        Vec::new()
    };
    let criu = Criu::discover(criu)?;
    let criu_patched = match &args.criu_patched {
        Some(p) => Some(Criu::at(p).map_err(ExperimentError::PatchedCriu)?),
        None => None,
    };
    Ok(MatrixOpts {
        scenarios,
        patched,
        repeat: args.repeat,
        criu,
        criu_patched,
        // The sandbox and CRIU run with other working directories: a
        // relative state dir would name another place there.
        state_dir: std::path::absolute(state_dir).map_err(|source| ExperimentError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?,
        stop_timeout: Duration::from_secs(args.stop_timeout),
        sources_payloads: args
            .payloads
            .clone()
            .unwrap_or_else(Sources::default_payload_dir),
        sources_examples: args
            .examples
            .clone()
            .unwrap_or_else(Sources::default_examples_dir),
        keep: args.keep,
    })
}

/// `mhctl experiment`: runs the matrix, prints the table, writes the
/// reports. Exit code 0 when every row ran or was skipped, 1 when the
/// harness failed on a row, 130 when interrupted.
pub fn cli(
    args: &ExperimentArgs,
    criu: Option<&Path>,
    state_dir: &Path,
) -> Result<i32, ExperimentError> {
    let opts = prepare(args, criu, state_dir)?;
    let run = run_matrix(&opts)?;
    print!("{}", run.report.to_table());
    if let Some(p) = &args.json {
        write_atomic("JSON", p, &run.report.to_json())?;
        eprintln!("mhctl: JSON written to {}", p.display());
    }
    if let Some(p) = &args.markdown {
        write_atomic("markdown", p, &run.report.to_markdown())?;
        eprintln!("mhctl: markdown written to {}", p.display());
    }
    if let Some(k) = &run.kept {
        eprintln!("mhctl: logs of every scenario kept in {}", k.display());
    }
    if run.interrupted {
        return Ok(130);
    }
    Ok(
        if run.report.rows.iter().any(|r| r.status == Status::Error) {
            1
        } else {
            0
        },
    )
}

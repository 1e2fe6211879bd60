//! Benchmarks (issue 6): cold boot against restore, side by side, on real
//! applications, and what runmh's supervision costs.
//!
//! For each workload ([`workloads`]) and each of N interleaved runs
//! ([`measure`]): a cold boot under `runmh run` and the same boot without
//! runmh, to the first good HTTP response; `runmh prebake` with both stop
//! backends (time to the stop, dump time, image size); `runmh restore` of
//! each image to the first good response; a bare `criu restore` of the
//! NOTIFY image ([`bare`]; a TRACE image cannot run without its tracer);
//! RSS; and steady-state requests per second ([`load`]) of the restored
//! TRACE-supervised server against the same server started plainly.
//! [`report`] prints min/median/max and the targets with PASS or MISS, and
//! writes JSON and an SVG chart.

pub mod bare;
pub mod breakdown;
pub mod floor;
pub mod load;
pub mod measure;
pub mod migrate;
pub mod ondemand;
pub mod report;
pub mod workloads;

use crate::criu::kdat::{self, KdatCache};
use crate::criu::{Criu, CriuError};
use crate::images::MetadataError;
use measure::{millis, Ctx};
use report::{Report, WorkloadReport};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workloads to measure (repeatable; default: all installed).
    #[arg(long = "workload", value_name = "NAME")]
    pub workload: Vec<String>,
    /// Interleaved runs per measurement.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub runs: u32,
    /// Write every sample, the statistics and the targets as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw the chart as SVG.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Restores of the NOTIFY image per run, each by runmh and by bare CRIU
    /// side by side (the pair's order alternating; the load phase after the
    /// first only): the 8 % target between the two needs more samples than
    /// the cold boots do.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub pairs: u32,
    /// Runs done first and not counted (they fill page cache and CRIU's kdat cache).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: u32,
    /// Seconds of steady-state load per measured server (0: skip it).
    #[arg(long, default_value_t = 3, value_name = "SECS")]
    pub load_secs: u64,
    /// The runmh binary to measure (default: the one beside this program).
    #[arg(long, value_name = "PATH")]
    pub runmh: Option<PathBuf>,
    /// Give up on a boot or restore that answers nothing for this long.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub timeout: u64,
    /// Keep the scratch directory (logs, images) for inspection.
    #[arg(long)]
    pub keep: bool,
    /// Environment for the prebaked services (`runmh prebake -e`), e.g.
    /// MIEHISTO_PRELOAD_TRIM=0 to measure images without the preload's trim.
    #[arg(long = "prebake-env", value_name = "K=V")]
    pub prebake_env: Vec<String>,
    /// Measure live-migration downtime between two hosts made of network
    /// namespaces, against a local restore (default workload: django).
    #[arg(long, conflicts_with = "migrate")]
    pub migrate: bool,
    /// Measure on-demand services: first connection at zero (and with
    /// --standby) -> first response, beside cold boot, runmh restore and
    /// bare criu restore, and the connections lost in a burst at zero.
    #[arg(long)]
    pub on_demand: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the benchmarks must run as root (runmh, namespaces and CRIU need it); try sudo")]
    NotRoot,
    #[error("--runs must be at least 1")]
    NoRuns,
    #[error("--pairs must be at least 1")]
    NoPairs,
    #[error("unknown workload {name:?}; the workloads are: {known}")]
    UnknownWorkload { name: String, known: String },
    #[error("workload {name} cannot run here: {why}")]
    NotInstalled { name: String, why: String },
    #[error("no workload is installed ({why}); run `bash setup/workloads.sh`")]
    NothingToRun { why: String },
    #[error("no runmh binary found (looked at {looked}); build it with `cargo build` or pass --runmh PATH")]
    NoRunmh { looked: String },
    #[error("the benchmark cannot become a child subreaper (needed to reap bare CRIU restores)")]
    Subreaper(#[source] nix::errno::Errno),
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} on port {port} gave no good HTTP response: {detail}")]
    NoResponse {
        what: String,
        port: u16,
        detail: String,
    },
    #[error("runmh prebake --backend {backend} failed: {detail}")]
    Prebake { backend: String, detail: String },
    #[error("steady-state load on port {port} failed: {detail}")]
    Load { port: u16, detail: String },
    #[error("cannot make {path} an absolute path (empty, or the current directory is gone); pass an absolute path")]
    Absolute {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

fn find_runmh(explicit: Option<&Path>) -> Result<PathBuf, BenchError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(BenchError::NoRunmh {
                looked: p.display().to_string(),
            })
        };
    }
    let mut looked = Vec::new();
    if let Ok(me) = std::env::current_exe() {
        // mhctl and runmh are built and installed side by side; a test
        // binary lives one level deeper (target/<profile>/deps).
        for dir in me.ancestors().skip(1).take(2) {
            let p = dir.join("runmh");
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join("runmh"))
            .find(|p| p.is_file())
        {
            return Ok(p);
        }
    }
    looked.push("PATH".into());
    Err(BenchError::NoRunmh {
        looked: looked.join(", "),
    })
}

pub(crate) fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })
}

fn select_workloads(names: &[String]) -> Result<Vec<workloads::Workload>, BenchError> {
    let all = workloads::all();
    if names.is_empty() {
        let (ok, missing): (Vec<_>, Vec<_>) = all.into_iter().partition(|w| w.missing.is_none());
        for w in &missing {
            eprintln!(
                "bench: skipping {}: {}",
                w.name,
                w.missing.as_deref().unwrap_or("")
            );
        }
        if ok.is_empty() {
            let why = missing
                .iter()
                .filter_map(|w| w.missing.clone())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(BenchError::NothingToRun { why });
        }
        return Ok(ok);
    }
    let mut out = Vec::new();
    for n in names {
        let w = all.iter().find(|w| w.name == n.as_str()).ok_or_else(|| {
            BenchError::UnknownWorkload {
                name: n.clone(),
                known: workloads::names().join(", "),
            }
        })?;
        if let Some(why) = &w.missing {
            return Err(BenchError::NotInstalled {
                name: n.clone(),
                why: why.clone(),
            });
        }
        if !out.iter().any(|o: &workloads::Workload| o.name == w.name) {
            out.push(w.clone());
        }
    }
    Ok(out)
}

/// One run of every measurement for one workload. Stops at the first
/// failure (later steps need earlier ones' images) and returns it.
fn one_run(
    ctx: &Ctx,
    empty: Option<&floor::Empty>,
    wl: &workloads::Workload,
    port: u16,
    run: u32,
    rep: &mut WorkloadReport,
    count: bool,
) -> Result<(), BenchError> {
    use report::*;
    let tag = format!("{}-{run}", wl.name);
    let push = |rep: &mut WorkloadReport, k: Kind, v: Option<f64>| {
        if count {
            rep.push(k, v)
        }
    };

    let cold = ctx.cold_runmh(wl, port, &tag)?;
    push(rep, COLD_RUNMH, Some(millis(cold.first_response)));
    push(rep, RSS_COLD, cold.rss_mib);

    let plain = ctx.cold_plain(wl, port, &tag)?;
    push(rep, COLD_PLAIN, Some(millis(plain.first_response)));
    push(rep, PLAIN_LISTEN, Some(millis(plain.listen)));
    push(rep, RSS_PLAIN, plain.rss_mib);

    let images = ctx.work.join("images");
    let (img_t, img_n) = (
        images.join(format!("{}-trace", wl.name)),
        images.join(format!("{}-notify", wl.name)),
    );
    let t = ctx.prebake(wl, port, "trace", &img_t, &tag)?;
    push(rep, PREBAKE_TRACE_STOP, Some(t.stop_ms));
    push(rep, PREBAKE_TRACE_DUMP, Some(t.dump_ms));
    push(rep, IMAGE_TRACE, Some(t.image_mib));
    let n = ctx.prebake(wl, port, "notify", &img_n, &tag)?;
    push(rep, PREBAKE_NOTIFY_STOP, Some(n.stop_ms));
    push(rep, PREBAKE_NOTIFY_DUMP, Some(n.dump_ms));
    push(rep, IMAGE_NOTIFY, Some(n.image_mib));

    let rt = ctx.runmh_restore(&img_t, port, wl.path, &format!("trace-{tag}"), Some(wl))?;
    push(rep, RESTORE_TRACE, Some(millis(rt.first_response)));
    let phases = |rep: &mut WorkloadReport, v: breakdown::Variant, b: &measure::Boot| {
        if let (true, Some(p)) = (count, &b.phases) {
            rep.breakdown.push(v, p);
        }
    };
    phases(rep, breakdown::Variant::RunmhTrace, &rt);
    push(rep, RESTORE_TRACE_CRIU, rt.criu_ms);
    push(rep, RSS_RESTORED, rt.rss_mib);
    push(rep, RPS_TRACE, rt.rps);
    push(rep, RPS_PLAIN, rt.twin_rps);

    // The two restores of the NOTIFY image alternate which goes first, so
    // neither always meets the colder page cache.
    let notify = |rep: &mut WorkloadReport, pair: u32| -> Result<(), BenchError> {
        let rn = ctx.runmh_restore(
            &img_n,
            port,
            wl.path,
            &format!("notify-{tag}-{pair}"),
            (pair == 0).then_some(wl),
        )?;
        push(rep, RESTORE_NOTIFY, Some(millis(rn.first_response)));
        push(rep, RESTORE_NOTIFY_CRIU, rn.criu_ms);
        phases(rep, breakdown::Variant::RunmhNotify, &rn);
        push(rep, RPS_NOTIFY, rn.rps);
        push(rep, RPS_PLAIN_N, rn.twin_rps);
        Ok(())
    };
    let bare = |rep: &mut WorkloadReport, pair: u32| -> Result<(), BenchError> {
        let b = ctx.bare_restore(&img_n, port, wl.path, &format!("{tag}-{pair}"))?;
        push(rep, BARE, Some(millis(b.first_response)));
        push(rep, BARE_CRIU, b.criu_ms);
        push(rep, RSS_BARE, b.rss_mib);
        phases(rep, breakdown::Variant::Bare, &b);
        Ok(())
    };
    for pair in 0..ctx.pairs {
        if (run + pair) % 2 == 0 {
            notify(rep, pair)?;
            bare(rep, pair)?;
        } else {
            bare(rep, pair)?;
            notify(rep, pair)?;
        }
    }

    // The floor, measured next to the restores it bounds.
    if let Some(empty) = empty {
        let fixed = empty.fixed_ms(ctx, &tag)?;
        let pages = floor::image_page_bytes(&img_t) as f64 / (1024.0 * 1024.0);
        let rate = floor::copy_ms_per_mib(floor::image_page_bytes(&img_t));
        push(rep, FLOOR_FIXED, Some(fixed));
        push(rep, COPY_RATE, Some(rate));
        push(rep, PAGES_TRACE, Some(pages));
        push(rep, FLOOR, Some(fixed + pages * rate));
    }
    Ok(())
}

/// Runs the benchmarks and prints the report; returns the process exit
/// code (1 when a measurement failed; a MISS is a result, not a failure).
pub fn cli(args: &BenchArgs, criu: Option<&Path>, state_dir: &Path) -> Result<i32, BenchError> {
    if !crate::sys::is_root() {
        return Err(BenchError::NotRoot);
    }
    if args.runs == 0 {
        return Err(BenchError::NoRuns);
    }
    if args.pairs == 0 {
        return Err(BenchError::NoPairs);
    }
    if args.migrate {
        let names = if args.workload.is_empty() {
            vec!["django".to_string()]
        } else {
            args.workload.clone()
        };
        let criu = Criu::discover(criu)?;
        let mut code = 0;
        for w in select_workloads(&names)? {
            code = code.max(migrate::run_bench(args, &criu, &w)?);
        }
        return Ok(code);
    }
    let wls = select_workloads(&args.workload)?;
    let runmh = find_runmh(args.runmh.as_deref())?;
    let criu = Criu::discover(criu)?;
    // Bare `criu restore -d` leaves its restored tree to whoever reaps
    // orphans: make that us, so it can be killed and reaped cleanly.
    crate::sys::set_child_subreaper().map_err(BenchError::Subreaper)?;
    let state = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let work = state.join("bench").join(format!(
        "{}-{}",
        crate::sys::time::unix_ms(),
        std::process::id()
    ));
    std::fs::create_dir_all(work.join("logs")).map_err(|source| BenchError::Io {
        path: work.clone(),
        source,
    })?;
    let kdat_cache = KdatCache::for_state_dir(&state, &criu.path);
    let kdat_label = if kdat_cache.is_some() {
        "runmh's (tmpfs over /run in CRIU's mount namespace)".to_string()
    } else if !kdat::needed() {
        "CRIU's own (/run is a tmpfs)".to_string()
    } else {
        "none".to_string()
    };
    let ctx = Ctx {
        runmh,
        criu: criu.clone(),
        state: state.clone(),
        work: work.clone(),
        timeout: Duration::from_secs(args.timeout.max(1)),
        load_secs: args.load_secs,
        pairs: args.pairs,
        kdat: kdat_cache,
        prebake_env: args.prebake_env.clone(),
    };
    eprintln!(
        "bench: {} with {} (CRIU {}), {} warm-up + {} run(s); scratch in {}",
        wls.iter().map(|w| w.name).collect::<Vec<_>>().join(", "),
        ctx.runmh.display(),
        criu.version,
        args.warmup,
        args.runs,
        work.display()
    );
    let mut reports = Vec::new();
    for wl in &wls {
        reports.push(if args.on_demand {
            WorkloadReport::with_kinds(wl.name, wl.about, free_port()?, ondemand::KINDS)
        } else {
            WorkloadReport::new(wl.name, wl.about, free_port()?)
        });
    }
    let steal_at_start = crate::sys::procfs::cpu_steal();
    let mut failed = false;
    if args.on_demand {
        for (wl, rep) in wls.iter().zip(reports.iter_mut()) {
            let setup = match ondemand::setup(&ctx, wl, rep.port, args.keep) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("bench: {} on-demand set-up: {e}", wl.name);
                    rep.errors.push(format!("set-up: {e}"));
                    failed = true;
                    continue;
                }
            };
            for run in 0..args.warmup + args.runs {
                let count = run >= args.warmup;
                eprintln!(
                    "bench: {} on-demand {}",
                    wl.name,
                    if count {
                        format!("run {}/{}", run - args.warmup + 1, args.runs)
                    } else {
                        "warm-up".into()
                    }
                );
                if let Err(e) = ondemand::one_run(&ctx, &setup, wl, rep.port, run, rep, count) {
                    eprintln!(
                        "bench: {} on-demand run {run}: {e} (daemon log: {})",
                        wl.name,
                        ondemand::daemon_log(&setup).display()
                    );
                    rep.errors.push(format!("run {run}: {e}"));
                    failed = true;
                    break;
                }
            }
        }
    }
    let empty = if args.on_demand {
        None
    } else {
        match floor::Empty::prebake(&ctx) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("bench: no floor: the empty payload could not be prebaked: {e}");
                failed = true;
                None
            }
        }
    };
    let runs = if args.on_demand {
        0
    } else {
        args.warmup + args.runs
    };
    for run in 0..runs {
        let count = run >= args.warmup;
        for (wl, rep) in wls.iter().zip(reports.iter_mut()) {
            let label = if count {
                format!("run {}/{}", run - args.warmup + 1, args.runs)
            } else {
                "warm-up".into()
            };
            eprintln!("bench: {} {label}", wl.name);
            if let Err(e) = one_run(&ctx, empty.as_ref(), wl, rep.port, run, rep, count) {
                eprintln!("bench: {} {label}: {e}", wl.name);
                rep.errors.push(format!("{label}: {e}"));
                failed = true;
            }
        }
    }
    let cpu_steal_pct = match (steal_at_start, crate::sys::procfs::cpu_steal()) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => {
            Some((s1.saturating_sub(s0)) as f64 * 100.0 / (t1 - t0) as f64)
        }
        _ => None,
    };
    let mut targets = Vec::new();
    for rep in &mut reports {
        rep.finish();
        targets.extend(report::targets(rep));
    }
    let report = Report {
        runs: args.runs,
        warmup: args.warmup,
        pairs: args.pairs,
        kernel: crate::images::metadata::kernel_release(),
        criu: criu.version.to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kdat_cache: kdat_label,
        load_client: if args.load_secs > 0 {
            load::client_name().to_string()
        } else {
            "off".into()
        },
        load_secs: args.load_secs,
        cpu_steal_pct,
        workloads: reports,
        targets,
    };
    print!("{}", report.table());
    let write = |path: &Path, text: String| -> Result<(), BenchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(path, text).map_err(|source| BenchError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    if let Some(p) = &args.json {
        write(p, report.to_json())?;
        eprintln!("bench: JSON written to {}", p.display());
    }
    if let Some(p) = &args.svg {
        write(p, report.svg())?;
        eprintln!("bench: chart written to {}", p.display());
    }
    if args.keep {
        eprintln!("bench: kept {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_dir(state.join("bench"));
    }
    Ok(if failed { 1 } else { 0 })
}

//! Smoke test of the benchmarks (issue 6): `bench --runs 1 --workload
//! python` through the library, as `mhctl bench` runs it. It asserts that
//! every row of the report holds real numbers and every target a ratio
//! with a verdict — never a speed threshold (speed is the benchmark's
//! business, not CI's).

mod common;

use miehisto::bench::{self, BenchArgs, BenchError};
use std::time::Duration;

const PAIRS: u32 = 2;

fn args(workloads: &[&str]) -> BenchArgs {
    BenchArgs {
        workload: workloads.iter().map(|w| w.to_string()).collect(),
        runs: 1,
        json: None,
        svg: None,
        warmup: 0,
        load_secs: 1,
        pairs: PAIRS,
        runmh: Some(common::runmh()),
        timeout: 60,
        keep: false,
        prebake_env: Vec::new(),
        migrate: false,
        on_demand: false,
    }
}

#[test]
fn bench_python_smoke_reports_every_row_with_real_numbers() {
    let Some(_g) = common::privileged("bench_python_smoke_reports_every_row_with_real_numbers")
    else {
        return;
    };
    let state = common::temp_dir("bench");
    let json = state.join("out").join("bench.json");
    let svg = state.join("out").join("chart.svg");
    let mut a = args(&["python"]);
    a.json = Some(json.clone());
    a.svg = Some(svg.clone());
    let code = bench::cli(&a, common::criu_path().as_deref(), &state).expect("the benchmark runs");

    let report: serde_json::Value =
        serde_json::from_str(&common::read(&json)).expect("the JSON report parses");
    let workloads = report["workloads"].as_array().expect("workloads");
    assert_eq!(workloads.len(), 1);
    let w = &workloads[0];
    assert_eq!(w["name"], "python");
    assert_eq!(
        w["errors"].as_array().map(|e| e.len()),
        Some(0),
        "failed measurements: {}",
        w["errors"]
    );
    assert_eq!(code, 0, "exit code 0 when every measurement succeeded");
    let series = w["series"].as_array().expect("series");
    assert_eq!(
        series.len(),
        bench::report::ALL.len(),
        "one series per measurement"
    );
    // The NOTIFY image's runmh and bare restores are measured PAIRS times
    // a run (the load phase, and so the req/s, after the first only).
    let paired = [
        "restore_notify_ms",
        "restore_notify_criu_ms",
        "bare_criu_ms",
        "bare_criu_log_ms",
        "rss_bare_mib",
    ];
    for s in series {
        let st = &s["stats"];
        let n = if paired.iter().any(|k| s["key"] == *k) {
            PAIRS
        } else {
            1
        };
        assert_eq!(st["n"], n, "{} has exactly {n} sample(s): {s}", s["key"]);
        for f in ["min", "median", "max"] {
            let v = st[f].as_f64().unwrap_or(f64::NAN);
            assert!(
                v.is_finite() && v > 0.0,
                "{} {f} is a real positive number: {s}",
                s["key"]
            );
        }
    }
    // The breakdown: every variant measured once, its phases real numbers
    // that add up to that restore's first response, CRIU's page read among
    // them; runmh's own phases only where runmh ran.
    let median_of = |key: &str| median(series, key);
    let variants = w["breakdown"]["variants"].as_array().expect("breakdown");
    assert_eq!(variants.len(), 3, "runmh trace, runmh notify, bare criu");
    for v in variants {
        let runs = if v["variant"] == "runmh_trace" {
            1
        } else {
            PAIRS
        };
        assert_eq!(v["runs"], runs, "{runs} restore(s) broken down: {v}");
        let phase = |key: &str| -> Option<f64> {
            v["phases"]
                .as_array()?
                .iter()
                .find(|p| p["key"] == key)?
                .get("median")?
                .as_f64()
        };
        let phases = v["phases"].as_array().expect("phases");
        let sum: f64 = phases.iter().filter_map(|p| p["median"].as_f64()).sum();
        for p in phases {
            if let Some(m) = p["median"].as_f64() {
                assert!(m.is_finite() && m >= 0.0, "a real duration: {p}");
            }
        }
        let total = match v["variant"].as_str() {
            Some("runmh_trace") => median_of("restore_trace_ms"),
            Some("runmh_notify") => median_of("restore_notify_ms"),
            Some("bare_criu") => median_of("bare_criu_ms"),
            other => panic!("unknown variant {other:?}"),
        };
        assert!(
            (sum - total).abs() < 0.01,
            "the phases of {} add up to its first response: {sum} vs {total}",
            v["variant"]
        );
        assert!(
            phase("criu_pages").is_some_and(|p| p > 0.0),
            "CRIU's page read is found in its log: {v}"
        );
        assert!(
            phase("criu_exec_to_log").is_some(),
            "CRIU's log start is anchored: {v}"
        );
        let runmh = v["variant"] != "bare_criu";
        for key in [
            "start_to_criu_exec",
            "supervisor_tracer",
            "supervisor_ready",
        ] {
            assert_eq!(phase(key).is_some(), runmh, "{key} only under runmh: {v}");
        }
    }
    let (fixed, pages, rate, floor) = (
        median_of("floor_fixed_ms"),
        median_of("pages_trace_mib"),
        median_of("copy_ms_per_mib"),
        median_of("floor_ms"),
    );
    assert!(
        (floor - (fixed + pages * rate)).abs() < 1e-6,
        "floor = fixed + pages x rate"
    );
    assert!(
        pages <= median_of("image_trace_mib"),
        "the pages are part of the image"
    );

    let targets = report["targets"].as_array().expect("targets");
    assert_eq!(
        targets.len(),
        3,
        "python has the three general targets: {targets:?}"
    );
    for t in targets {
        assert!(
            t["ratio"]
                .as_f64()
                .is_some_and(|r| r.is_finite() && r > 0.0),
            "a ratio: {t}"
        );
        assert!(
            t["verdict"] == "PASS" || t["verdict"] == "MISS",
            "a verdict: {t}"
        );
    }

    let chart = common::read(&svg);
    assert!(
        chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"),
        "an SVG document"
    );
    assert!(
        chart.contains("python") && chart.contains("rect"),
        "the chart draws the workload's bars"
    );
    assert!(
        chart.contains("by phase") && chart.contains("criu: page read"),
        "the chart stacks the restore's phases"
    );

    // Nothing left behind: no instance, no mount, no scratch directory,
    // and nothing answering on the workload's port.
    let port = u16::try_from(w["port"].as_u64().expect("port")).expect("a port number");
    assert!(
        miehisto::instance::Instance::list(&state).is_empty(),
        "no instance left"
    );
    assert!(
        common::mounts_under(&state).is_empty(),
        "no mount left: {:?}",
        common::mounts_under(&state)
    );
    assert!(
        !state.join("bench").exists(),
        "the scratch directory is removed"
    );
    assert!(
        common::wait_http(port, Duration::from_millis(200)).is_err(),
        "no server left on port {port}"
    );
    std::fs::remove_dir_all(&state).expect("remove the state dir");
}

#[test]
fn bench_rejects_an_unknown_workload_clearly() {
    let Some(_g) = common::privileged("bench_rejects_an_unknown_workload_clearly") else {
        return;
    };
    let state = common::temp_dir("bench-bad");
    let e = bench::cli(&args(&["rails"]), common::criu_path().as_deref(), &state)
        .expect_err("an unknown workload is an error");
    assert!(matches!(e, BenchError::UnknownWorkload { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("rails") && msg.contains("python") && msg.contains("django"),
        "names the bad one and the choices: {msg}"
    );
    let mut a = args(&["python"]);
    a.runs = 0;
    assert!(matches!(
        bench::cli(&a, common::criu_path().as_deref(), &state),
        Err(BenchError::NoRuns)
    ));
    std::fs::remove_dir_all(&state).expect("remove the state dir");
}

/// `bench --on-demand --runs 1 --workload python`: its own daemon, every
/// row measured once, the on-demand targets with a ratio and a verdict,
/// nothing left behind.
#[test]
fn bench_on_demand_smoke() {
    let Some(_g) = common::privileged("bench_on_demand_smoke") else {
        return;
    };
    let state = common::temp_dir("bench-od");
    let json = state.join("out").join("od.json");
    let svg = state.join("out").join("od.svg");
    let mut a = args(&["python"]);
    a.on_demand = true;
    a.load_secs = 0;
    a.json = Some(json.clone());
    a.svg = Some(svg.clone());
    let code = bench::cli(&a, common::criu_path().as_deref(), &state).expect("the benchmark runs");
    let report: serde_json::Value =
        serde_json::from_str(&common::read(&json)).expect("the JSON report parses");
    let w = &report["workloads"][0];
    assert_eq!(w["name"], "python");
    assert_eq!(
        w["errors"].as_array().map(|e| e.len()),
        Some(0),
        "failed measurements: {}",
        w["errors"]
    );
    assert_eq!(code, 0);
    let series = w["series"].as_array().expect("series");
    assert_eq!(series.len(), bench::ondemand::KINDS.len(), "{series:?}");
    let keys: Vec<&str> = series.iter().filter_map(|s| s["key"].as_str()).collect();
    for k in [
        // side by side, in the same run
        "cold_runmh_ms",
        "restore_trace_ms",
        "bare_criu_ms",
        // at zero, the daemon's account of it, with --standby
        "ondemand_zero_ms",
        "ondemand_zero_activation_ms",
        "ondemand_zero_restore_ms",
        "ondemand_standby_ms",
        "ondemand_standby_activation_ms",
        "standby_rss_mib",
        // the burst
        "ondemand_lost",
        "ondemand_burst_last_ms",
    ] {
        assert!(keys.contains(&k), "the report has {k}: {keys:?}");
    }
    let median_of = |key: &str| median(series, key);
    for s in series {
        let st = &s["stats"];
        assert_eq!(st["n"], 1, "{} measured once: {s}", s["key"]);
        let v = st["median"].as_f64().unwrap_or(f64::NAN);
        // Lost connections may be 0; every time and size is positive.
        let counted = s["key"] == "ondemand_lost";
        assert!(
            v.is_finite() && (v > 0.0 || (counted && v == 0.0)),
            "{} is a real number: {s}",
            s["key"]
        );
        assert_eq!(st["p95"], st["median"], "one sample: p95 = median");
    }
    // The restore step is part of the activation (one clock, the daemon's).
    // The activation is not compared with the client's time: the daemon
    // stops its clock after the hand-over, and a fast service may answer
    // before it does.
    assert!(median_of("ondemand_zero_restore_ms") <= median_of("ondemand_zero_activation_ms"));
    // The side-by-side restores are broken down as in the main benchmark.
    let variants: Vec<(&str, u64)> = w["breakdown"]["variants"]
        .as_array()
        .expect("breakdown")
        .iter()
        .filter_map(|v| Some((v["variant"].as_str()?, v["runs"].as_u64()?)))
        .filter(|(_, runs)| *runs > 0)
        .collect();
    assert_eq!(variants, [("runmh_trace", 1), ("bare_criu", 1)]);
    // The lost count is from a real burst of BURST clients (the last 200
    // of it is a row above), and every lost client is explained.
    let lost = median_of("ondemand_lost");
    assert!(lost <= bench::ondemand::BURST as f64);
    let notes = w["notes"].as_array().expect("notes");
    assert_eq!(
        lost > 0.0,
        !notes.is_empty(),
        "a lost client is explained in a note: {notes:?}"
    );
    let targets = report["targets"].as_array().expect("targets");
    let names: Vec<&str> = targets.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "on-demand at zero / runmh restore",
            "connections lost at activation (worst run)"
        ],
        "python has the general on-demand targets (the standby one is Django's)"
    );
    for t in targets {
        assert!(
            t["ratio"].as_f64().is_some_and(f64::is_finite),
            "a value: {t}"
        );
        assert!(t["verdict"] == "PASS" || t["verdict"] == "MISS", "{t}");
    }
    let chart = common::read(&svg);
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    for row in [
        "on-demand at zero",
        "on-demand --standby",
        "cold boot under runmh run",
        "runmh restore trace image",
        "bare criu restore -d",
        "connections lost, burst of 50 clients at zero",
        "p95",
    ] {
        assert!(chart.contains(row), "the chart shows {row}");
    }
    assert!(
        miehisto::instance::Instance::list(&state).is_empty(),
        "no instance left"
    );
    assert!(
        !std::env::temp_dir()
            .join(format!("mho{}", std::process::id()))
            .exists(),
        "the benchmark's daemon directory is removed"
    );
    assert!(common::mounts_under(&state).is_empty());
    std::fs::remove_dir_all(&state).expect("remove the state dir");
}

/// The median of the report series `key`.
fn median(series: &[serde_json::Value], key: &str) -> f64 {
    series
        .iter()
        .find(|s| s["key"] == key)
        .and_then(|s| s["stats"]["median"].as_f64())
        .unwrap_or_else(|| panic!("series {key}"))
}

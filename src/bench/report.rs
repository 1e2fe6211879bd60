//! The benchmark's results: samples per measurement, min/median/max, the
//! targets with PASS or MISS, as a text table, JSON, and an SVG chart drawn
//! by hand (no plotting crate).

use serde::Serialize;
use std::fmt::Write as _;

/// What a series measures; the keys are stable (JSON, targets, chart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    /// Drawn in the chart (times to first response and to the stop).
    pub chart: bool,
}

macro_rules! kinds {
    ($($name:ident = $key:literal, $label:literal, $unit:literal, $chart:literal;)*) => {
        $(pub const $name: Kind = Kind { key: $key, label: $label, unit: $unit, chart: $chart };)*
        /// Every kind, in table order.
        pub const ALL: &[Kind] = &[$($name),*];
    };
}

kinds! {
    COLD_RUNMH = "cold_runmh_ms", "cold boot under `runmh run` -> first response", "ms", true;
    COLD_PLAIN = "cold_plain_ms", "cold boot, plain spawn -> first response", "ms", true;
    PLAIN_LISTEN = "plain_listen_ms", "plain spawn -> port accepts (listen)", "ms", false;
    PREBAKE_TRACE_STOP = "prebake_trace_stop_ms", "`runmh prebake` trace: start -> stopped before listen", "ms", true;
    PREBAKE_TRACE_DUMP = "prebake_trace_dump_ms", "`runmh prebake` trace: criu dump", "ms", false;
    PREBAKE_NOTIFY_STOP = "prebake_notify_stop_ms", "`runmh prebake` notify: start -> stopped before listen", "ms", false;
    PREBAKE_NOTIFY_DUMP = "prebake_notify_dump_ms", "`runmh prebake` notify: criu dump", "ms", false;
    RESTORE_TRACE = "restore_trace_ms", "`runmh restore` trace image -> first response", "ms", true;
    RESTORE_TRACE_CRIU = "restore_trace_criu_ms", "  of which criu restore (its log)", "ms", false;
    RESTORE_NOTIFY = "restore_notify_ms", "`runmh restore` notify image -> first response", "ms", true;
    RESTORE_NOTIFY_CRIU = "restore_notify_criu_ms", "  of which criu restore (its log)", "ms", false;
    BARE = "bare_criu_ms", "bare `criu restore -d` notify image -> first response", "ms", true;
    BARE_CRIU = "bare_criu_log_ms", "  of which criu restore (its log)", "ms", false;
    IMAGE_TRACE = "image_trace_mib", "image size, trace", "MiB", false;
    IMAGE_NOTIFY = "image_notify_mib", "image size, notify", "MiB", false;
    RSS_COLD = "rss_cold_mib", "RSS after first response, `runmh run`", "MiB", false;
    RSS_PLAIN = "rss_plain_mib", "RSS after first response, plain spawn", "MiB", false;
    RSS_RESTORED = "rss_restored_mib", "RSS after first response, `runmh restore` (trace)", "MiB", false;
    RSS_BARE = "rss_bare_mib", "RSS after first response, bare criu restore", "MiB", false;
    RPS_PLAIN = "rps_plain", "steady state without runmh (plain twin)", "req/s", false;
    RPS_TRACE = "rps_trace", "steady state, restored under TRACE supervision", "req/s", false;
    RPS_NOTIFY = "rps_notify", "steady state, restored NOTIFY image (no tracer)", "req/s", false;
    RPS_PLAIN_N = "rps_plain_notify_pair", "steady state without runmh (twin of the NOTIFY run)", "req/s", false;
    FLOOR_FIXED = "floor_fixed_ms", "floor: bare criu restore of an empty payload -> response", "ms", false;
    COPY_RATE = "copy_ms_per_mib", "floor: memory copy into fresh pages", "ms/MiB", false;
    PAGES_TRACE = "pages_trace_mib", "floor: memory pages in the trace image", "MiB", false;
    FLOOR = "floor_ms", "floor: fixed cost + trace image pages at copy rate", "ms", true;
}

// `mhctl bench --on-demand`'s own series (see [`super::ondemand`]); not in
// [`ALL`], which is the main benchmark's table.
pub const OD_ZERO: Kind = Kind {
    key: "ondemand_zero_ms",
    label: "on-demand at zero: connect -> first response",
    unit: "ms",
    chart: true,
};
pub const OD_ZERO_ACTIVATION: Kind = Kind {
    key: "ondemand_zero_activation_ms",
    label: "  of which the daemon: queued connection -> listening",
    unit: "ms",
    chart: true,
};
pub const OD_ZERO_RESTORE: Kind = Kind {
    key: "ondemand_zero_restore_ms",
    label: "    of which its restore step (runmh restore --detach)",
    unit: "ms",
    chart: true,
};
pub const OD_STANDBY: Kind = Kind {
    key: "ondemand_standby_ms",
    label: "on-demand --standby: connect -> first response",
    unit: "ms",
    chart: true,
};
pub const OD_STANDBY_ACTIVATION: Kind = Kind {
    key: "ondemand_standby_activation_ms",
    label: "  of which the daemon: queued connection -> resumed, listening",
    unit: "ms",
    chart: true,
};
pub const OD_STANDBY_RSS: Kind = Kind {
    key: "standby_rss_mib",
    label: "RSS of the held --standby instance",
    unit: "MiB",
    chart: false,
};
pub const OD_LOST: Kind = Kind {
    key: "ondemand_lost",
    label: "connections lost, burst of 50 clients at zero",
    unit: "conns",
    chart: false,
};
pub const OD_BURST_LAST: Kind = Kind {
    key: "ondemand_burst_last_ms",
    label: "burst of 50 at zero: release -> the last client's 200",
    unit: "ms",
    chart: false,
};

/// Every kind of either benchmark.
fn kind_of(key: &str) -> Option<Kind> {
    ALL.iter()
        .chain(super::ondemand::KINDS)
        .find(|k| k.key == key)
        .copied()
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    /// Nearest rank: the smallest sample with 95 % at or below it.
    pub p95: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let rank = (95 * n).div_ceil(100).clamp(1, n);
        Some(Stats {
            n,
            min: v[0],
            median,
            p95: v[rank - 1],
            max: v[n - 1],
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    pub stats: Option<Stats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    pub name: String,
    pub about: String,
    pub port: u16,
    pub series: Vec<Series>,
    /// Where each restore's time went, phase by phase.
    pub breakdown: super::breakdown::Breakdown,
    /// Measurements that failed, one line each.
    pub errors: Vec<String>,
    /// What a measurement saw besides its number (e.g. why burst clients
    /// were lost), one line each.
    pub notes: Vec<String>,
}

impl WorkloadReport {
    pub fn new(name: &str, about: &str, port: u16) -> WorkloadReport {
        Self::with_kinds(name, about, port, ALL)
    }

    /// A report of only these series (`bench --on-demand`).
    pub fn with_kinds(name: &str, about: &str, port: u16, kinds: &[Kind]) -> WorkloadReport {
        let series = kinds
            .iter()
            .map(|k| Series {
                key: k.key,
                label: k.label,
                unit: k.unit,
                samples: Vec::new(),
                stats: None,
            })
            .collect();
        WorkloadReport {
            name: name.to_string(),
            about: about.to_string(),
            port,
            series,
            breakdown: Default::default(),
            errors: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn push(&mut self, kind: Kind, value: Option<f64>) {
        if let (Some(v), Some(s)) = (value, self.series.iter_mut().find(|s| s.key == kind.key)) {
            s.samples.push(v);
        }
    }

    pub fn finish(&mut self) {
        for s in &mut self.series {
            s.stats = Stats::of(&s.samples);
        }
        self.breakdown.finish();
    }

    pub fn median(&self, kind: Kind) -> Option<f64> {
        self.series
            .iter()
            .find(|s| s.key == kind.key)?
            .stats
            .as_ref()
            .map(|s| s.median)
    }

    pub fn has(&self, kind: Kind) -> bool {
        self.series.iter().any(|s| s.key == kind.key)
    }

    pub fn stats(&self, kind: Kind) -> Option<&Stats> {
        self.series
            .iter()
            .find(|s| s.key == kind.key)?
            .stats
            .as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "MISS")]
    Miss,
    /// Not measured (a failed measurement, or load switched off).
    #[serde(rename = "n/a")]
    NotMeasured,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Miss => "MISS",
            Verdict::NotMeasured => "n/a",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub workload: String,
    pub name: &'static str,
    pub numerator: &'static str,
    /// None: the target is on the numerator's worst run itself (a count).
    pub denominator: Option<&'static str>,
    pub ratio: Option<f64>,
    /// ">=" or "<=".
    pub op: &'static str,
    pub goal: f64,
    pub verdict: Verdict,
}

struct TargetDef {
    name: &'static str,
    num: Kind,
    /// None: the numerator's max over the runs against the goal.
    den: Option<Kind>,
    op: &'static str,
    goal: f64,
    /// Only for this workload (None: every workload).
    only: Option<&'static str>,
    /// A target of `bench --on-demand` (else of the main benchmark): each
    /// report shows its own benchmark's targets, even where the other's
    /// series (cold boot, runmh restore) are measured in it too.
    on_demand: bool,
}

const TARGETS: &[TargetDef] = &[
    TargetDef {
        name: "cold boot / runmh restore",
        num: COLD_RUNMH,
        den: Some(RESTORE_TRACE),
        op: ">=",
        goal: 10.0,
        only: Some("django"),
        on_demand: false,
    },
    TargetDef {
        name: "cold boot / runmh restore",
        num: COLD_RUNMH,
        den: Some(RESTORE_TRACE),
        op: ">=",
        goal: 10.0,
        only: Some(super::workloads::HEAVY),
        on_demand: false,
    },
    TargetDef {
        name: "cold boot / runmh restore (moonshot)",
        num: COLD_RUNMH,
        den: Some(RESTORE_TRACE),
        op: ">=",
        goal: 20.0,
        only: Some(super::workloads::HEAVY),
        on_demand: false,
    },
    TargetDef {
        name: "runmh restore / bare criu restore",
        num: RESTORE_NOTIFY,
        den: Some(BARE),
        op: "<=",
        goal: 1.08,
        only: None,
        on_demand: false,
    },
    TargetDef {
        name: "runmh restore (trace) / floor",
        num: RESTORE_TRACE,
        den: Some(FLOOR),
        op: "<=",
        goal: 2.0,
        only: Some("django"),
        on_demand: false,
    },
    TargetDef {
        name: "req/s TRACE-supervised / without runmh",
        num: RPS_TRACE,
        den: Some(RPS_PLAIN),
        op: ">=",
        goal: 0.97,
        only: None,
        on_demand: false,
    },
    TargetDef {
        name: "prebake time to stop / plain boot to listen",
        num: PREBAKE_TRACE_STOP,
        den: Some(PLAIN_LISTEN),
        op: "<=",
        goal: 1.15,
        only: None,
        on_demand: false,
    },
    TargetDef {
        name: "on-demand at zero / runmh restore",
        num: OD_ZERO,
        den: Some(RESTORE_TRACE),
        op: "<=",
        goal: 1.2,
        only: None,
        on_demand: true,
    },
    TargetDef {
        name: "cold boot / on-demand --standby",
        num: COLD_RUNMH,
        den: Some(OD_STANDBY),
        op: ">=",
        goal: 30.0,
        only: Some("django"),
        on_demand: true,
    },
    TargetDef {
        name: "connections lost at activation (worst run)",
        num: OD_LOST,
        den: None,
        op: "<=",
        goal: 0.0,
        only: None,
        on_demand: true,
    },
];

/// Ratios shown for information only (no target).
const INFO: &[(&str, Kind, Kind)] = &[
    (
        "cold boot (plain) / runmh restore",
        COLD_PLAIN,
        RESTORE_TRACE,
    ),
    (
        "cold boot / runmh restore (notify image)",
        COLD_RUNMH,
        RESTORE_NOTIFY,
    ),
    ("bare criu restore: cold boot / restore", COLD_RUNMH, BARE),
    (
        "runmh restore (trace) / bare criu restore",
        RESTORE_TRACE,
        BARE,
    ),
    ("runmh restore (trace) / floor", RESTORE_TRACE, FLOOR),
    ("bare criu restore / floor", BARE, FLOOR),
    (
        "on-demand --standby / runmh restore",
        OD_STANDBY,
        RESTORE_TRACE,
    ),
    ("cold boot / on-demand at zero", COLD_RUNMH, OD_ZERO),
];

/// Pairs measured side by side in every run: the median of the per-run
/// ratios cancels what the machine's other load does to both (information;
/// the targets use the ratio of medians).
const PAIRED: &[(&str, Kind, Kind)] = &[
    (
        "req/s TRACE / plain twin, median of per-run ratios",
        RPS_TRACE,
        RPS_PLAIN,
    ),
    (
        "req/s NOTIFY / plain twin, median of per-run ratios",
        RPS_NOTIFY,
        RPS_PLAIN_N,
    ),
    (
        "runmh restore / bare criu, median of per-run ratios",
        RESTORE_NOTIFY,
        BARE,
    ),
    (
        "on-demand at zero / runmh restore, median of per-run ratios",
        OD_ZERO,
        RESTORE_TRACE,
    ),
];

/// The median of per-run ratios of two series, when they pair up (same
/// number of samples and no failed measurement).
pub fn paired_median(w: &WorkloadReport, num: Kind, den: Kind) -> Option<f64> {
    let a = &w.series.iter().find(|s| s.key == num.key)?.samples;
    let b = &w.series.iter().find(|s| s.key == den.key)?.samples;
    if a.is_empty() || a.len() != b.len() || !w.errors.is_empty() {
        return None;
    }
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y > 0.0)
        .map(|(x, y)| x / y)
        .collect();
    Stats::of(&ratios).map(|s| s.median)
}

pub fn targets(w: &WorkloadReport) -> Vec<Target> {
    TARGETS
        .iter()
        .filter(|t| t.only.map_or(true, |o| o == w.name))
        .filter(|t| t.on_demand == w.has(OD_ZERO))
        .filter(|t| w.has(t.num) && t.den.map_or(true, |d| w.has(d)))
        .map(|t| {
            let ratio = match t.den {
                Some(den) => match (w.median(t.num), w.median(den)) {
                    (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                    _ => None,
                },
                None => w.stats(t.num).map(|s| s.max),
            };
            let verdict = match ratio {
                None => Verdict::NotMeasured,
                Some(r) if (t.op == ">=" && r >= t.goal) || (t.op == "<=" && r <= t.goal) => {
                    Verdict::Pass
                }
                Some(_) => Verdict::Miss,
            };
            Target {
                workload: w.name.clone(),
                name: t.name,
                numerator: t.num.key,
                denominator: t.den.map(|d| d.key),
                ratio,
                op: t.op,
                goal: t.goal,
                verdict,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub runs: u32,
    pub warmup: u32,
    /// runmh/bare restore pairs of the NOTIFY image per run.
    pub pairs: u32,
    pub kernel: String,
    pub criu: String,
    pub cpus: usize,
    /// "runmh's kdat cache", "CRIU's own (/run is a tmpfs)" or "none".
    pub kdat_cache: String,
    pub load_client: String,
    pub load_secs: u64,
    /// Share of the machine's CPU time the hypervisor took during the
    /// measurements (/proc/stat); None where the kernel does not count it.
    pub cpu_steal_pct: Option<f64>,
    pub workloads: Vec<WorkloadReport>,
    pub targets: Vec<Target>,
}

pub(crate) fn fmt_num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// The text table: per workload, min/median/max of every series, then
    /// the targets.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "miehisto bench: {} run(s) after {} warm-up, {} runmh/bare restore pair(s) per run; kernel {}; CRIU {}; {} CPUs; kdat cache: {}; load: {} for {}s",
            self.runs, self.warmup, self.pairs, self.kernel, self.criu, self.cpus, self.kdat_cache, self.load_client, self.load_secs
        );
        if let Some(p) = self.cpu_steal_pct {
            // Time the host gave other guests: it lands on whichever
            // measurement ran then, and moves ratios of single medians.
            let _ = writeln!(out, "CPU steal during the measurements: {p:.1} %");
        }
        for w in &self.workloads {
            let _ = writeln!(out, "\n== {} — {} (port {})", w.name, w.about, w.port);
            let _ = writeln!(
                out,
                "{:<58} {:>6} {:>9} {:>9} {:>9} {:>9}",
                "measurement", "unit", "min", "median", "p95", "max"
            );
            for s in &w.series {
                match &s.stats {
                    Some(st) => {
                        let _ = writeln!(
                            out,
                            "{:<58} {:>6} {:>9} {:>9} {:>9} {:>9}",
                            s.label,
                            s.unit,
                            fmt_num(st.min),
                            fmt_num(st.median),
                            fmt_num(st.p95),
                            fmt_num(st.max)
                        );
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "{:<58} {:>6} {:>9} {:>9} {:>9} {:>9}",
                            s.label, s.unit, "-", "-", "-", "-"
                        );
                    }
                }
            }
            let mut ratio = |name: &str, r: f64| {
                let _ = writeln!(
                    out,
                    "{:<58} {:>6} {:>9} {:>9.2}",
                    format!("ratio: {name}"),
                    "x",
                    "",
                    r
                );
            };
            for (name, a, b) in INFO {
                if let (Some(x), Some(y)) = (w.median(*a), w.median(*b)) {
                    ratio(name, x / y);
                }
            }
            for (name, a, b) in PAIRED {
                if let Some(r) = paired_median(w, *a, *b) {
                    ratio(name, r);
                }
            }
            let bd = w.breakdown.table();
            if !bd.is_empty() {
                out.push('\n');
                out.push_str(&bd);
            }
            for n in &w.notes {
                let _ = writeln!(out, "note: {n}");
            }
            for e in &w.errors {
                let _ = writeln!(out, "error: {e}");
            }
        }
        let _ = writeln!(out, "\ntargets (medians of one run of this benchmark):");
        for t in &self.targets {
            let r = t
                .ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:<5} {:<9} {:<44} {:>7} {} {}",
                t.verdict.to_string(),
                t.workload,
                t.name,
                r,
                t.op,
                t.goal
            );
        }
        out
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// A chart of the time series marked `chart`: one panel per workload,
    /// bars at the median with min-max whiskers, its own linear scale, the
    /// targets underneath.
    pub fn svg(&self) -> String {
        // Each panel draws its own report's time series.
        let kinds_of = |w: &WorkloadReport| -> Vec<Kind> {
            w.series
                .iter()
                .filter_map(|s| kind_of(s.key))
                .filter(|k| k.chart)
                .collect()
        };
        let colors = [
            "#8c564b", "#bcbd22", "#7f7f7f", "#1f77b4", "#17becf", "#2ca02c",
        ];
        let (width, left, right) = (900.0_f64, 330.0_f64, 110.0_f64);
        let bar_h = 16.0;
        let gap = 6.0;
        let mut y = 72.0;
        let mut body = String::new();
        for w in &self.workloads {
            let kinds = kinds_of(w);
            let tg = targets(w);
            let max = kinds
                .iter()
                .filter_map(|k| w.stats(*k).map(|s| s.max))
                .fold(0.0_f64, f64::max);
            let scale = nice_ceiling(max.max(1.0));
            let plot_w = width - left - right;
            let _ = writeln!(
                body,
                r#"<text x="20" y="{:.1}" class="h">{} — {}</text>"#,
                y,
                esc(&w.name),
                esc(&w.about)
            );
            y += 14.0;
            let top = y;
            let bottom = y + kinds.len() as f64 * (bar_h + gap);
            // Grid and axis first, so the bars are drawn over them.
            for t in 0..=4 {
                let v = scale * t as f64 / 4.0;
                let x = left + plot_w * t as f64 / 4.0;
                let _ = writeln!(
                    body,
                    r#"<path d="M{x:.1} {:.1}V{:.1}" class="g"/>"#,
                    top - 2.0,
                    bottom
                );
                let label = if v.fract() == 0.0 {
                    format!("{v:.0}")
                } else {
                    fmt_num(v)
                };
                let _ = writeln!(
                    body,
                    r#"<text x="{x:.1}" y="{:.1}" class="t" text-anchor="middle">{label}</text>"#,
                    bottom + 12.0
                );
            }
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" class="t">ms</text>"#,
                left + plot_w + 22.0,
                bottom + 12.0
            );
            for (i, k) in kinds.iter().enumerate() {
                let cy = y + i as f64 * (bar_h + gap);
                let _ = writeln!(
                    body,
                    r#"<text x="{:.1}" y="{:.1}" class="l" text-anchor="end">{}</text>"#,
                    left - 8.0,
                    cy + bar_h * 0.75,
                    esc(&k.label.replace('`', ""))
                );
                if let Some(s) = w.stats(*k) {
                    let x = |v: f64| left + plot_w * (v / scale);
                    let _ = writeln!(
                        body,
                        r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: median {:.1} ms (min {:.1}, max {:.1}, n={})</title></rect>"#,
                        left,
                        cy,
                        (x(s.median) - left).max(1.0),
                        bar_h,
                        colors[i % colors.len()],
                        esc(k.label),
                        s.median,
                        s.min,
                        s.max,
                        s.n
                    );
                    let my = cy + bar_h / 2.0;
                    let _ = writeln!(
                        body,
                        r#"<path d="M{:.1} {:.1}H{:.1}M{:.1} {:.1}V{:.1}M{:.1} {:.1}V{:.1}" class="w"/>"#,
                        x(s.min),
                        my,
                        x(s.max),
                        x(s.min),
                        my - 4.0,
                        my + 4.0,
                        x(s.max),
                        my - 4.0,
                        my + 4.0
                    );
                    // The p95 as a heavier tick on the whisker: with few
                    // runs it is the max, with many it shows the tail.
                    let _ = writeln!(
                        body,
                        r#"<path d="M{:.1} {:.1}V{:.1}" class="p"/>"#,
                        x(s.p95),
                        cy,
                        cy + bar_h
                    );
                    let _ = writeln!(
                        body,
                        r#"<text x="{:.1}" y="{:.1}" class="v">{} ms (p95 {})</text>"#,
                        x(s.max) + 6.0,
                        cy + bar_h * 0.75,
                        fmt_num(s.median),
                        fmt_num(s.p95)
                    );
                } else {
                    let _ = writeln!(
                        body,
                        r#"<text x="{:.1}" y="{:.1}" class="v">not measured</text>"#,
                        left + 4.0,
                        cy + bar_h * 0.75
                    );
                }
            }
            let bottom = y + kinds.len() as f64 * (bar_h + gap);
            let (bd, mut next) = w.breakdown.svg(bottom + 22.0, left, width);
            body.push_str(&bd);
            // Counts (connections lost) are no time: a line each, per run.
            for st in w.series.iter().filter(|st| st.unit == "conns") {
                let runs = st
                    .samples
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    body,
                    r#"<text x="40" y="{:.1}" class="l">{}: {} (per run)</text>"#,
                    next,
                    esc(st.label),
                    if runs.is_empty() {
                        "not measured".into()
                    } else {
                        runs
                    }
                );
                next += 15.0;
            }
            y = next + 16.0;
            for t in &tg {
                let r = t
                    .ratio
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "-".into());
                let class = match t.verdict {
                    Verdict::Pass => "pass",
                    Verdict::Miss => "miss",
                    Verdict::NotMeasured => "na",
                };
                let _ = writeln!(
                    body,
                    r#"<text x="40" y="{y:.1}" class="{class}">{} {} = {} (target {} {})</text>"#,
                    t.verdict,
                    esc(t.name),
                    r,
                    esc(t.op),
                    t.goal
                );
                y += 15.0;
            }
            y += 22.0;
        }
        let height = y + 10.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(
            svg,
            "<style>.h{{font-size:14px;font-weight:bold}}.l{{font-size:11px}}.v{{font-size:11px;fill:#333}}.t{{font-size:10px;fill:#555}}.g{{stroke:#ddd;stroke-width:1}}.w{{stroke:#000;stroke-width:1.2;fill:none}}.p{{stroke:#000;stroke-width:3}}.pass{{font-size:12px;fill:#1a7f37}}.miss{{font-size:12px;fill:#c62828;font-weight:bold}}.na{{font-size:12px;fill:#777}}</style>"
        );
        let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="#fff"/>"##);
        let _ = writeln!(
            svg,
            r#"<text x="20" y="24" font-size="16" font-weight="bold">miehisto: start to first HTTP response (bar: median, thick tick: p95, whiskers: min-max; {} runs)</text>"#,
            self.runs
        );
        let _ = writeln!(
            svg,
            r##"<text x="20" y="40" font-size="11" fill="#555">Linux {}, CRIU {}, {} CPUs, kdat cache: {}</text>"##,
            esc(&self.kernel),
            esc(&self.criu),
            self.cpus,
            esc(&self.kdat_cache)
        );
        svg.push_str(&body);
        svg.push_str("</svg>\n");
        svg
    }
}

/// 1, 2 or 5 times a power of ten, at least `v`.
pub(crate) fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_targets() {
        let s = Stats::of(&[3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(Stats::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert!(Stats::of(&[]).is_none());

        let mut w = WorkloadReport::new("django", "x", 1);
        w.push(COLD_RUNMH, Some(1000.0));
        w.push(RESTORE_TRACE, Some(50.0));
        w.push(RESTORE_NOTIFY, Some(60.0));
        w.push(BARE, Some(40.0));
        w.push(FLOOR, Some(20.0));
        w.finish();
        let t = targets(&w);
        let by = |n: &str| t.iter().find(|t| t.name == n).unwrap();
        assert_eq!(t.len(), 5);
        assert_eq!(by("cold boot / runmh restore").verdict, Verdict::Pass);
        assert_eq!(by("cold boot / runmh restore").ratio, Some(20.0));
        assert_eq!(
            by("runmh restore / bare criu restore").verdict,
            Verdict::Miss,
            "60/40 = 1.5 > 1.08"
        );
        assert_eq!(
            by("runmh restore (trace) / floor").verdict,
            Verdict::Miss,
            "50/20 = 2.5 > 2"
        );
        assert_eq!(
            by("req/s TRACE-supervised / without runmh").verdict,
            Verdict::NotMeasured
        );
        let other = WorkloadReport::new("python", "x", 1);
        assert_eq!(
            targets(&other).len(),
            3,
            "the cold/restore and floor targets are Django's"
        );
        let heavy = WorkloadReport::new(super::super::workloads::HEAVY, "x", 1);
        assert_eq!(
            targets(&heavy).len(),
            5,
            "plus cold/restore >= 10 and >= 20"
        );
        assert_eq!(nice_ceiling(430.0), 500.0);
        assert_eq!(nice_ceiling(1.2), 2.0);
    }

    #[test]
    fn svg_is_well_formed_enough() {
        let mut w = WorkloadReport::new("python", "a <b> & c", 1);
        w.push(COLD_RUNMH, Some(300.0));
        w.push(RESTORE_TRACE, Some(30.0));
        w.finish();
        let r = Report {
            runs: 1,
            warmup: 0,
            pairs: 1,
            kernel: "6".into(),
            criu: "4".into(),
            cpus: 2,
            kdat_cache: "x".into(),
            load_client: "y".into(),
            load_secs: 0,
            cpu_steal_pct: None,
            targets: targets(&w),
            workloads: vec![w],
        };
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(r.table().contains("not measured") || r.table().contains(" - "));
    }
}

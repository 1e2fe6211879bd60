//! Where a restore's time goes, from the moment the benchmark starts it to
//! the first good HTTP response, in phases that add up to the total.
//!
//! The phase boundaries are milestones on one clock (CLOCK_MONOTONIC, see
//! [`crate::timings`]): stamps written by `runmh restore --timings` (front
//! process and its threads), the creation of CRIU's log (its time zero) plus
//! the relative timestamps of chosen lines of CRIU's `-v4` log, and the
//! benchmark's own view of the port (first accepted connection, first good
//! response). A phase lasts from the previous milestone to its own; when
//! milestones come out of order (a NOTIFY service may listen before its
//! supervisor has it marked ready) the later phase counts only what it adds to
//! the critical path, so every run's phases sum to its first response.

use crate::timings;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One phase: the milestone that ends it, and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    pub key: &'static str,
    pub label: &'static str,
    pub color: &'static str,
}

macro_rules! phases {
    ($($name:ident = $key:literal, $label:literal, $color:literal;)*) => {
        $(pub const $name: Phase = Phase { key: $key, label: $label, color: $color };)*
        /// Every phase, in the order they happen.
        pub const PHASES: &[Phase] = &[$($name),*];
    };
}

phases! {
    START = "start_to_criu_exec", "runmh start -> CRIU exec", "#8c564b";
    CRIU_START = "criu_exec_to_log", "CRIU exec -> its first log line", "#c49c94";
    CRIU_SETUP = "criu_setup", "criu: read images, plan mounts", "#1f77b4";
    CRIU_FORK = "criu_fork", "criu: fork the root task", "#aec7e8";
    CRIU_MNTNS = "criu_mntns", "criu: mount namespace", "#17becf";
    CRIU_PREPARE = "criu_prepare", "criu: files, sockets, memory layout", "#9edae5";
    CRIU_PAGES = "criu_pages", "criu: page read (preadv)", "#d62728";
    CRIU_RESTORER = "criu_restorer", "criu: restorer (vmas, vdso, threads)", "#ff9896";
    CRIU_RESUME = "criu_resume", "criu: resume (seccomp, unlock, trap)", "#9467bd";
    CRIU_END = "criu_end", "criu: stats, exit, reaped", "#c5b0d5";
    SUP_TRACER = "supervisor_tracer", "supervisor: tracer up", "#e377c2";
    SUP_RESUME = "supervisor_resume", "supervisor: re-seize (TRACE) / continue", "#f7b6d2";
    SUP_READY = "supervisor_ready", "supervisor: record, ready", "#7f7f7f";
    TO_TRAP = "ready_to_trap", "TRACE: replayed trap let through", "#dbdb8d";
    TO_LISTEN = "ready_to_listen", "ready -> port accepts", "#bcbd22";
    TO_RESPONSE = "listen_to_response", "port accepts -> first response", "#2ca02c";
}

/// Lines of CRIU's restore log that end a phase: (phase, text, last
/// occurrence rather than first).
const CRIU_MARKERS: &[(Phase, &str, bool)] = &[
    (CRIU_SETUP, "Forking task with", false),
    (CRIU_FORK, "mnt: Restoring mount namespace", false),
    (CRIU_MNTNS, "Running post-setup-namespaces scripts", false),
    (CRIU_PREPARE, ": Preadv ", false),
    (CRIU_PAGES, "`- returned", true),
    (CRIU_RESTORER, "Running post-restore scripts", false),
    (CRIU_RESUME, "Restore finished successfully", false),
];

/// Times (ms since the log's start) of the marker lines in a CRIU log,
/// and of its last timestamped line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CriuMarks {
    pub at: Vec<(&'static str, f64)>,
    pub last: Option<f64>,
}

/// `(SS.UUUUUU) text` -> (ms, text). CRIU overwrites the closing
/// parenthesis once seconds reach 100; such lines are skipped.
fn timestamp(line: &str) -> Option<(f64, &str)> {
    let rest = line.strip_prefix('(')?;
    let (ts, text) = rest.split_once(')')?;
    let (s, us) = ts.split_once('.')?;
    let (s, us): (u64, u64) = (s.parse().ok()?, us.parse().ok()?);
    Some((s as f64 * 1000.0 + us as f64 / 1000.0, text))
}

pub fn criu_marks_of(text: &str) -> CriuMarks {
    let mut m = CriuMarks::default();
    for line in text.lines() {
        let Some((ms, body)) = timestamp(line) else {
            continue;
        };
        m.last = Some(ms);
        for (phase, needle, last) in CRIU_MARKERS {
            if body.contains(needle) {
                match m.at.iter_mut().find(|(k, _)| *k == phase.key) {
                    Some(slot) if *last => slot.1 = ms,
                    Some(_) => {}
                    None => m.at.push((phase.key, ms)),
                }
            }
        }
    }
    m
}

pub fn criu_marks(log: &Path) -> Option<CriuMarks> {
    std::fs::read_to_string(log).ok().map(|t| criu_marks_of(&t))
}

/// Which restore a breakdown is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Variant {
    #[serde(rename = "runmh_trace")]
    RunmhTrace,
    #[serde(rename = "runmh_notify")]
    RunmhNotify,
    #[serde(rename = "bare_criu")]
    Bare,
}

impl Variant {
    pub const ALL: [Variant; 3] = [Variant::RunmhTrace, Variant::RunmhNotify, Variant::Bare];

    pub fn label(self) -> &'static str {
        match self {
            Variant::RunmhTrace => "runmh restore, trace image",
            Variant::RunmhNotify => "runmh restore, notify image",
            Variant::Bare => "bare criu restore -d, notify image",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Variant::RunmhTrace => "runmh trace",
            Variant::RunmhNotify => "runmh notify",
            Variant::Bare => "bare criu",
        }
    }
}

/// What one restore left behind to break down.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// CLOCK_MONOTONIC ns when the benchmark started the restore.
    pub t0_ns: u64,
    /// Stamps from [`crate::timings`] (runmh's, or the benchmark's own for
    /// a bare restore).
    pub stamps: Vec<(String, u64)>,
    pub criu: Option<CriuMarks>,
    /// ms since t0: the port accepted a connection / answered 200.
    pub listen_ms: f64,
    pub first_ms: f64,
}

/// One run's phases (ms; None where a milestone is missing: the next
/// phase then covers both).
pub type Sample = Vec<(&'static str, Option<f64>)>;

impl Inputs {
    fn stamp_ms(&self, name: &str) -> Option<f64> {
        self.stamps
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, ns)| ns.checked_sub(self.t0_ns))
            .map(|d| d as f64 / 1e6)
    }

    /// The milestone ending each phase, in ms since t0.
    fn milestones(&self) -> Vec<(Phase, Option<f64>)> {
        let log0 = self.stamp_ms(timings::CRIU_LOG);
        let criu = |key: &str| -> Option<f64> {
            let m = self.criu.as_ref()?;
            let rel = m.at.iter().find(|(k, _)| *k == key)?.1;
            Some(log0? + rel)
        };
        let criu_last = self
            .criu
            .as_ref()
            .and_then(|m| m.last)
            .and_then(|l| Some(log0? + l));
        let exited = self.stamp_ms(timings::CRIU_EXITED);
        let mut out = vec![
            (START, self.stamp_ms(timings::CRIU_EXEC)),
            (CRIU_START, log0),
        ];
        for (phase, _, _) in CRIU_MARKERS {
            out.push((*phase, criu(phase.key)));
        }
        // A bare CRIU's exit is not stamped: it ends at its log's last line.
        out.push((CRIU_END, exited.or(criu_last)));
        out.push((SUP_TRACER, self.stamp_ms(timings::TRACER_READY)));
        out.push((SUP_RESUME, self.stamp_ms(timings::RESUMED)));
        out.push((SUP_READY, self.stamp_ms(timings::READY)));
        out.push((TO_TRAP, self.stamp_ms(timings::TRAP_PASSED)));
        out.push((TO_LISTEN, Some(self.listen_ms)));
        out.push((TO_RESPONSE, Some(self.first_ms)));
        out
    }

    /// Phases of this run; they sum to `first_ms`.
    pub fn sample(&self) -> Sample {
        let mut prev = 0.0_f64;
        self.milestones()
            .into_iter()
            .map(|(phase, at)| match at {
                Some(t) if t.is_finite() => {
                    // What happens after the first response (a supervisor
                    // still reporting ready) is off the critical path.
                    let t = t.min(self.first_ms).max(prev);
                    let d = t - prev;
                    prev = t;
                    (phase.key, Some(d))
                }
                _ => (phase.key, None),
            })
            .collect()
    }
}

/// Every run's phases for one variant.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSeries {
    pub key: &'static str,
    pub label: &'static str,
    pub samples: Vec<f64>,
    pub median: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantBreakdown {
    pub variant: Variant,
    pub label: &'static str,
    pub runs: usize,
    pub phases: Vec<PhaseSeries>,
}

/// A workload's breakdowns, one per variant.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub variants: Vec<VariantBreakdown>,
}

impl Default for Breakdown {
    fn default() -> Self {
        Breakdown {
            variants: Variant::ALL
                .iter()
                .map(|v| VariantBreakdown {
                    variant: *v,
                    label: v.label(),
                    runs: 0,
                    phases: PHASES
                        .iter()
                        .map(|p| PhaseSeries {
                            key: p.key,
                            label: p.label,
                            samples: Vec::new(),
                            median: None,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Breakdown {
    pub fn push(&mut self, variant: Variant, sample: &Sample) {
        let Some(v) = self.variants.iter_mut().find(|v| v.variant == variant) else {
            return;
        };
        v.runs += 1;
        for (key, d) in sample {
            if let (Some(d), Some(p)) = (d, v.phases.iter_mut().find(|p| p.key == *key)) {
                p.samples.push(*d);
            }
        }
    }

    pub fn finish(&mut self) {
        for v in &mut self.variants {
            for p in &mut v.phases {
                p.median = super::report::Stats::of(&p.samples).map(|s| s.median);
            }
        }
    }

    pub fn median(&self, variant: Variant, phase: Phase) -> Option<f64> {
        self.variants
            .iter()
            .find(|v| v.variant == variant)?
            .phases
            .iter()
            .find(|p| p.key == phase.key)?
            .median
    }

    /// Sum of the phase medians of a variant (close to, not equal to, the
    /// median total).
    pub fn sum_of_medians(&self, variant: Variant) -> Option<f64> {
        let v = self.variants.iter().find(|v| v.variant == variant)?;
        let meds: Vec<f64> = v.phases.iter().filter_map(|p| p.median).collect();
        (!meds.is_empty()).then(|| meds.iter().sum())
    }

    /// The text table: one row per phase, one column per variant (median ms).
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.variants.iter().all(|v| v.runs == 0) {
            return out;
        }
        let _ = write!(
            out,
            "{:<58} {:>6}",
            "restore breakdown (median per phase)", "unit"
        );
        for v in &self.variants {
            let _ = write!(out, " {:>13}", v.variant.short());
        }
        out.push('\n');
        for p in PHASES {
            let _ = write!(out, "{:<58} {:>6}", p.label, "ms");
            for v in &self.variants {
                match self.median(v.variant, *p) {
                    Some(m) => {
                        let _ = write!(out, " {:>13.2}", m);
                    }
                    None => {
                        let _ = write!(out, " {:>13}", "-");
                    }
                }
            }
            out.push('\n');
        }
        let _ = write!(out, "{:<58} {:>6}", "sum of the medians", "ms");
        for v in &self.variants {
            match self.sum_of_medians(v.variant) {
                Some(s) => {
                    let _ = write!(out, " {:>13.2}", s);
                }
                None => {
                    let _ = write!(out, " {:>13}", "-");
                }
            }
        }
        out.push('\n');
        out
    }

    /// Stacked horizontal bars (one per variant, phases in order, widths at
    /// their medians) starting at `y`; returns the SVG and the next free y.
    pub fn svg(&self, y: f64, left: f64, width: f64) -> (String, f64) {
        let mut body = String::new();
        let shown: Vec<&VariantBreakdown> = self.variants.iter().filter(|v| v.runs > 0).collect();
        if shown.is_empty() {
            return (body, y);
        }
        let total = shown
            .iter()
            .filter_map(|v| self.sum_of_medians(v.variant))
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let scale = super::report::nice_ceiling(total);
        let plot_w = width - left - 110.0;
        let x = |v: f64| left + plot_w * (v / scale);
        let bar_h = 16.0;
        let mut y = y;
        let _ = writeln!(
            body,
            r#"<text x="20" y="{:.1}" class="l">restore -> first response, by phase (medians; scale 0-{} ms)</text>"#,
            y + 11.0,
            super::report::fmt_num(scale)
        );
        y += 18.0;
        for v in shown {
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" class="l" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + bar_h * 0.75,
                super::report::esc(v.label)
            );
            let mut at = 0.0;
            for p in PHASES {
                let Some(m) = self.median(v.variant, *p) else {
                    continue;
                };
                let _ = writeln!(
                    body,
                    r#"<rect x="{:.2}" y="{:.1}" width="{:.2}" height="{bar_h:.1}" fill="{}"><title>{}: {:.2} ms (median)</title></rect>"#,
                    x(at),
                    y,
                    (x(at + m) - x(at)).max(0.0),
                    p.color,
                    super::report::esc(p.label),
                    m
                );
                at += m;
            }
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" class="v">{} ms</text>"#,
                x(at) + 6.0,
                y + bar_h * 0.75,
                super::report::fmt_num(at)
            );
            y += bar_h + 6.0;
        }
        // Legend: the phases any shown variant has, four to a line.
        let present: Vec<&Phase> = PHASES
            .iter()
            .filter(|p| {
                self.variants
                    .iter()
                    .any(|v| self.median(v.variant, **p).is_some())
            })
            .collect();
        for (i, p) in present.iter().enumerate() {
            let col = (i % 4) as f64;
            let row = (i / 4) as f64;
            let lx = 40.0 + col * 215.0;
            let ly = y + 6.0 + row * 14.0;
            let _ = writeln!(
                body,
                r#"<rect x="{lx:.1}" y="{:.1}" width="9" height="9" fill="{}"/><text x="{:.1}" y="{:.1}" class="t">{}</text>"#,
                ly,
                p.color,
                lx + 13.0,
                ly + 8.5,
                super::report::esc(p.label)
            );
        }
        y += 10.0 + present.len().div_ceil(4) as f64 * 14.0;
        (body, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "(00.000000) CRIU run id = x
(00.000800) Forking task with 1 pid (flags 0x20020000)
(00.001800)      1: mnt: Restoring mount namespace
(00.002400) Running post-setup-namespaces scripts
(00.004600) pie: 1: Preadv 0x41f000:4096... (79 iovs)
(00.020000) pie: 1: `- returned 34398208
(00.021000) pie: 1: Preadv 0x71f000:4096... (2 iovs)
(00.022000) pie: 1: `- returned 8192
(00.024400) Running post-restore scripts
(00.025000) Restore finished successfully. Tasks resumed.
(00.025100) Writing stats
";

    #[test]
    fn criu_markers_and_phases_add_up() {
        let m = criu_marks_of(LOG);
        let get = |k: &str| m.at.iter().find(|(x, _)| *x == k).map(|(_, v)| *v);
        assert_eq!(get(CRIU_SETUP.key), Some(0.8));
        assert_eq!(get(CRIU_PREPARE.key), Some(4.6), "first Preadv");
        assert_eq!(get(CRIU_PAGES.key), Some(22.0), "last returned");
        assert_eq!(m.last, Some(25.1));
        let ms = |v: f64| {
            u64::try_from(std::time::Duration::from_secs_f64(v / 1000.0).as_nanos()).unwrap()
        };
        let t0 = 1_000_000_000;
        let inp = Inputs {
            t0_ns: t0,
            stamps: vec![
                (timings::CRIU_EXEC.into(), t0 + ms(1.0)),
                (timings::CRIU_LOG.into(), t0 + ms(3.0)),
                (timings::CRIU_EXITED.into(), t0 + ms(29.0)),
                (timings::TRACER_READY.into(), t0 + ms(30.0)),
                (timings::RESUMED.into(), t0 + ms(31.0)),
                (timings::READY.into(), t0 + ms(32.0)),
                (timings::TRAP_PASSED.into(), t0 + ms(32.2)),
            ],
            criu: Some(m.clone()),
            // Listened before "ready": that phase adds nothing.
            listen_ms: 31.5,
            first_ms: 33.0,
        };
        let late = Inputs {
            first_ms: 31.7,
            ..inp.clone()
        };
        let total: f64 = late.sample().iter().filter_map(|(_, d)| *d).sum();
        assert!(
            (total - 31.7).abs() < 1e-9,
            "ready after the response: {total}"
        );
        let s = inp.sample();
        assert_eq!(s.len(), PHASES.len());
        let total: f64 = s.iter().filter_map(|(_, d)| *d).sum();
        assert!((total - 33.0).abs() < 1e-9, "{total}");
        let d = |k: &str| s.iter().find(|(x, _)| *x == k).and_then(|(_, d)| *d);
        assert!((d(CRIU_PAGES.key).unwrap() - 17.4).abs() < 1e-9);
        assert!((d(TO_TRAP.key).unwrap() - 0.2).abs() < 1e-9);
        assert_eq!(d(TO_LISTEN.key), Some(0.0));
        assert!((d(TO_RESPONSE.key).unwrap() - 0.8).abs() < 1e-9);

        let mut b = Breakdown::default();
        b.push(Variant::RunmhTrace, &s);
        b.finish();
        assert!(b.table().contains("criu: page read"));
        let (svg, _) = b.svg(10.0, 300.0, 900.0);
        assert!(svg.contains("criu: page read (preadv)"), "{svg}");
        assert_eq!(
            svg.matches("</rect>").count(),
            PHASES.len(),
            "one bar segment per phase"
        );
    }

    #[test]
    fn a_missing_milestone_folds_into_the_next_phase() {
        let inp = Inputs {
            t0_ns: 0,
            stamps: vec![],
            criu: None,
            listen_ms: 10.0,
            first_ms: 12.0,
        };
        let s = inp.sample();
        let known: Vec<_> = s.iter().filter(|(_, d)| d.is_some()).collect();
        assert_eq!(known.len(), 2);
        assert_eq!(known[0].1, Some(10.0));
        assert_eq!(timestamp("(123.00001 x"), None);
    }
}

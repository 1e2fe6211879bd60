//! Teaching mode: `--explain` narrates each step as it happens, in plain
//! words for an audience. Off by default; one global switch, because the
//! narration points sit deep inside the sandbox, tracer and CRIU code.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static ON: AtomicBool = AtomicBool::new(false);
static PAUSE: AtomicBool = AtomicBool::new(false);

pub fn enable(pause: bool) {
    ON.store(true, Ordering::Relaxed);
    PAUSE.store(pause, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// One narrated step: a short tag and a sentence.
pub fn say(tag: &str, text: &str) {
    if !enabled() {
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "  [{tag:>8}] {text}");
}

/// A block of text (a filter listing, a command line), indented.
pub fn block(text: &str) {
    if !enabled() {
        return;
    }
    let mut err = std::io::stderr().lock();
    for l in text.lines() {
        let _ = writeln!(err, "             | {l}");
    }
}

/// A pause an audience can follow; skipped with `--no-pause`.
pub fn pause(seconds: u64) {
    if enabled() && PAUSE.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_secs(seconds));
    }
}

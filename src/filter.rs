//! The seccomp filters the stop backends install, built with libseccomp in
//! the supervisor (where allocation is allowed) and exported as raw BPF, so
//! that the sandbox child only has to issue one `seccomp(2)` call — the last
//! step before `execve`.

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use nix::libc;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek};
use std::str::FromStr;
use syscalls::Sysno;

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("unknown syscall {0:?}: use a name from `man 2 syscalls` as the syscalls crate spells it (e.g. listen, bind, accept4)")]
    UnknownSyscall(String),
    #[error("marker signal {sig} is not a real-time signal ({min}..={max}): pick one with --marker-signal")]
    BadMarkerSignal { sig: i32, min: i32, max: i32 },
    #[error("libseccomp failed to {step}")]
    Libseccomp {
        step: &'static str,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("could not read the exported BPF back from memory")]
    Export(#[source] std::io::Error),
    #[error("libseccomp exported a BPF program of {0} bytes, not a whole number of instructions")]
    BadLength(usize),
}

/// A syscall the user names as the stop point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSyscall {
    pub nr: i32,
}

impl StopSyscall {
    pub fn parse(name: &str) -> Result<Self, FilterError> {
        let sys =
            Sysno::from_str(name).map_err(|_| FilterError::UnknownSyscall(name.to_string()))?;
        Ok(StopSyscall { nr: sys.id() })
    }
    pub fn name(&self) -> String {
        usize::try_from(self.nr)
            .ok()
            .and_then(Sysno::new)
            .map(|s| s.name().to_string())
            .unwrap_or_else(|| format!("syscall#{}", self.nr))
    }
}

/// Which trap a filter installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FilterRule {
    /// `SECCOMP_RET_TRACE` on every call of the syscall: the tracer decides.
    Trace { syscall: StopSyscall },
    /// `SECCOMP_RET_USER_NOTIF` on `kill(*, sig)` only: the harmless marker.
    NotifyMarker { sig: i32 },
    /// `SECCOMP_RET_USER_NOTIF` directly on the syscall (research row: the
    /// restored filter then has no listener and the syscall fails ENOSYS).
    NotifyDirect { syscall: StopSyscall },
}

impl std::fmt::Display for FilterRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FilterRule::Trace { syscall } => {
                write!(f, "SECCOMP_RET_TRACE on {}(2)", syscall.name())
            }
            FilterRule::NotifyMarker { sig } => {
                write!(
                    f,
                    "SECCOMP_RET_USER_NOTIF on kill(*, {})",
                    crate::sys::signal::signal_name(*sig)
                )
            }
            FilterRule::NotifyDirect { syscall } => {
                write!(f, "SECCOMP_RET_USER_NOTIF on {}(2)", syscall.name())
            }
        }
    }
}

/// The value our TRACE rule puts in SECCOMP_RET_DATA; `PTRACE_GETEVENTMSG`
/// returns it at the stop, so the tracer can tell our trap from any other
/// filter the target might install itself.
pub const TRACE_TAG: u16 = 0x6d68; // "mh"

pub fn check_marker_signal(sig: i32) -> Result<(), FilterError> {
    let (min, max) = (crate::sys::sigrtmin(), crate::sys::sigrtmax());
    if sig < min || sig > max {
        return Err(FilterError::BadMarkerSignal { sig, min, max });
    }
    Ok(())
}

/// The marker signal as the value the filter compares `kill`'s second
/// argument with.
fn marker_datum(sig: i32) -> Result<u64, FilterError> {
    check_marker_signal(sig)?;
    let (min, max) = (crate::sys::sigrtmin(), crate::sys::sigrtmax());
    u64::try_from(sig).map_err(|_| FilterError::BadMarkerSignal { sig, min, max })
}

/// A compiled filter: the BPF the child loads, and libseccomp's
/// human-readable rendering of the same rules for `--explain`.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    pub rule: FilterRule,
    pub bpf: Vec<libc::sock_filter>,
    pub pfc: String,
}

impl CompiledFilter {
    pub fn wants_listener(&self) -> bool {
        matches!(
            self.rule,
            FilterRule::NotifyMarker { .. } | FilterRule::NotifyDirect { .. }
        )
    }

    /// Flags for `seccomp(SECCOMP_SET_MODE_FILTER)`.
    pub fn load_flags(&self) -> libc::c_ulong {
        if self.wants_listener() {
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER
        } else {
            0
        }
    }

    /// One line per BPF instruction, for teaching.
    pub fn bpf_listing(&self) -> String {
        self.bpf
            .iter()
            .enumerate()
            .map(|(i, f)| {
                format!(
                    "{i:3}: code=0x{:04x} jt={:3} jf={:3} k=0x{:08x}\n",
                    f.code, f.jt, f.jf, f.k
                )
            })
            .collect()
    }
}

fn lib<T>(
    step: &'static str,
    r: Result<T, libseccomp::error::SeccompError>,
) -> Result<T, FilterError> {
    r.map_err(|source| FilterError::Libseccomp { step, source })
}

pub fn compile(rule: FilterRule) -> Result<CompiledFilter, FilterError> {
    let mut ctx = lib(
        "create a filter context",
        ScmpFilterContext::new(ScmpAction::Allow),
    )?;
    // The child sets NO_NEW_PRIVS itself when it needs it; libseccomp's own
    // load is never used, so the attribute only matters for the PFC text.
    lib("clear the no-new-privs attribute", ctx.set_ctl_nnp(false))?;
    match rule {
        FilterRule::Trace { syscall } => {
            lib(
                "add the trace rule",
                ctx.add_rule(ScmpAction::Trace(TRACE_TAG), ScmpSyscall::from(syscall.nr)),
            )?;
        }
        FilterRule::NotifyMarker { sig } => {
            let datum = marker_datum(sig)?;
            let kill = ScmpSyscall::from(Sysno::kill.id());
            lib(
                "add the marker rule",
                ctx.add_rule_conditional(
                    ScmpAction::Notify,
                    kill,
                    &[ScmpArgCompare::new(1, ScmpCompareOp::Equal, datum)],
                ),
            )?;
        }
        FilterRule::NotifyDirect { syscall } => {
            lib(
                "add the notify rule",
                ctx.add_rule(ScmpAction::Notify, ScmpSyscall::from(syscall.nr)),
            )?;
        }
    }
    let bpf = export_bpf(&ctx)?;
    let pfc = export_pfc(&ctx)?;
    Ok(CompiledFilter { rule, bpf, pfc })
}

fn read_memfd(
    name: &std::ffi::CStr,
    write: impl FnOnce(&std::fs::File) -> Result<(), FilterError>,
) -> Result<Vec<u8>, FilterError> {
    let fd = crate::sys::memfd(name).map_err(|e| FilterError::Export(e.into()))?;
    let mut f = std::fs::File::from(fd);
    write(&f)?;
    f.rewind().map_err(FilterError::Export)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(FilterError::Export)?;
    Ok(buf)
}

fn export_bpf(ctx: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>, FilterError> {
    let raw = read_memfd(c"mh-bpf", |f| {
        lib("export the filter as BPF", ctx.export_bpf(f))
    })?;
    const INSN: usize = std::mem::size_of::<libc::sock_filter>();
    if raw.is_empty() || raw.len() % INSN != 0 {
        return Err(FilterError::BadLength(raw.len()));
    }
    Ok(raw
        .chunks_exact(INSN)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

fn export_pfc(ctx: &ScmpFilterContext) -> Result<String, FilterError> {
    let raw = read_memfd(c"mh-pfc", |f| {
        lib("export the filter as PFC", ctx.export_pfc(f))
    })?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RET_TRACE: u32 = 0x7ff0_0000;
    const RET_USER_NOTIF: u32 = 0x7fc0_0000;

    fn returns(f: &CompiledFilter) -> Vec<u32> {
        // BPF_RET|BPF_K instructions and their constants.
        f.bpf
            .iter()
            .filter(|i| i.code == 0x06)
            .map(|i| i.k)
            .collect()
    }

    #[test]
    fn trace_filter_traps_only_the_named_syscall() {
        let listen = StopSyscall::parse("listen").unwrap();
        assert_eq!(listen.nr, 50);
        assert_eq!(listen.name(), "listen");
        let f = compile(FilterRule::Trace { syscall: listen }).unwrap();
        assert!(
            returns(&f).contains(&(RET_TRACE | TRACE_TAG as u32)),
            "{}",
            f.bpf_listing()
        );
        // The syscall number is compared somewhere (BPF_JMP|BPF_JEQ|BPF_K == 0x15).
        assert!(f.bpf.iter().any(|i| i.code == 0x15 && i.k == 50));
        assert!(
            f.pfc.contains("listen") || f.pfc.contains("50"),
            "{}",
            f.pfc
        );
        assert_eq!(f.load_flags(), 0);
    }

    #[test]
    fn marker_filter_notifies_on_kill_with_the_signal() {
        let sig = crate::sys::sigrtmax();
        let f = compile(FilterRule::NotifyMarker { sig }).unwrap();
        assert!(returns(&f).contains(&RET_USER_NOTIF));
        assert!(
            f.bpf.iter().any(|i| i.code == 0x15 && i.k == 62),
            "kill is syscall 62"
        );
        assert!(
            f.bpf
                .iter()
                .any(|i| i.code == 0x15 && u64::from(i.k) == marker_datum(sig).unwrap()),
            "compares the signal"
        );
        assert!(f.wants_listener());
        assert_eq!(f.load_flags(), libc::SECCOMP_FILTER_FLAG_NEW_LISTENER);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            StopSyscall::parse("no_such_call"),
            Err(FilterError::UnknownSyscall(_))
        ));
        assert!(matches!(
            compile(FilterRule::NotifyMarker { sig: 9 }),
            Err(FilterError::BadMarkerSignal { .. })
        ));
    }
}

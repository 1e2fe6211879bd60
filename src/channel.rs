//! Typed messages between miehisto's own processes, one enum per channel,
//! each sent as one JSON line. A reader names what it expected: a message
//! that does not parse, or parses as the wrong kind, is an error carrying
//! both, never a default.
//!
//! * [`RestoreChildMsg`]: the restore child's close-on-exec pipe to the
//!   front process: silent when CRIU's exec succeeds, one message when a
//!   step before it failed.
//! * [`StepReport`]: a runmh step's outcome, written to the file named by
//!   `runmh --report-file` (the daemon's view of runmh).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// The longest line a reader accepts: messages are a few hundred bytes.
pub const MAX_LINE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the {channel} channel sent {received}, expected {expected}")]
    UnexpectedMessage {
        channel: &'static str,
        expected: &'static str,
        received: String,
    },
    #[error("the {channel} channel sent a malformed message {received:?} ({detail}), expected {expected}")]
    Malformed {
        channel: &'static str,
        expected: &'static str,
        received: String,
        detail: String,
    },
    #[error("cannot read the {channel} channel")]
    Io {
        channel: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A host pid as a message carries it: always a real process (> 0), so a
/// message cannot make a reader signal pid 0 (its own process group) or -1
/// (every process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i32", into = "i32")]
pub struct HostPid(i32);

impl HostPid {
    pub fn new(pid: i32) -> Result<HostPid, String> {
        if pid > 0 {
            Ok(HostPid(pid))
        } else {
            Err(format!("{pid} is not a process id"))
        }
    }
    pub fn raw(self) -> i32 {
        self.0
    }
    pub fn pid(self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0)
    }
}

impl TryFrom<i32> for HostPid {
    type Error = String;
    fn try_from(pid: i32) -> Result<HostPid, String> {
        HostPid::new(pid)
    }
}

impl From<HostPid> for i32 {
    fn from(p: HostPid) -> i32 {
        p.0
    }
}

impl From<nix::unistd::Pid> for HostPid {
    /// For pids the kernel gave us (fork, getpid): always positive.
    fn from(p: nix::unistd::Pid) -> HostPid {
        HostPid(p.as_raw())
    }
}

impl std::fmt::Display for HostPid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The restore child's failure pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum RestoreChildMsg {
    /// The restore child failed a step before CRIU ran.
    ChildFailed { step: String, errno: i32 },
}

impl RestoreChildMsg {
    pub const CHANNEL: &'static str = "restore child";
    pub const EXPECTED: &'static str = "child_failed {step, errno}";

    /// `{"msg":"child_failed","step":STEP,"errno":N}\n` assembled in `buf`
    /// without allocating (the restore child runs between fork and exec).
    /// `step` must be plain text without `"` or `\`; the message is cut
    /// at `buf`'s end. Returns the length.
    pub fn encode_child_failed(buf: &mut [u8; 160], step: &str, errno: i32) -> usize {
        let mut n = 0;
        let mut push = |bytes: &[u8], buf: &mut [u8; 160]| {
            let k = bytes.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&bytes[..k]);
            n += k;
        };
        push(br#"{"msg":"child_failed","step":""#, buf);
        push(step.as_bytes(), buf);
        push(br#"","errno":"#, buf);
        let mut digits = [0u8; 12];
        let mut v = errno.unsigned_abs();
        let mut d = digits.len();
        loop {
            d -= 1;
            digits[d] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if errno < 0 {
            d -= 1;
            digits[d] = b'-';
        }
        push(&digits[d..], buf);
        push(b"}\n", buf);
        n
    }
}

/// The outcome of one runmh step, for whoever started it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepReport {
    /// `run` and `restore --detach`: the service runs under its supervisor.
    Running {
        instance: String,
        supervisor_pid: HostPid,
        root_pid: HostPid,
    },
    /// `prebake` and `dump`: an image was published.
    Published { image: PathBuf },
    /// The step failed; runmh's one-line reason.
    Failed { reason: String },
}

impl StepReport {
    pub const CHANNEL: &'static str = "runmh report";

    /// Writes the report as one line, atomically (a reader polling the
    /// file never sees half of it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, line)?;
        std::fs::rename(&tmp, path)
    }

    /// The report in `path`, or None when runmh wrote none (yet).
    pub fn read(path: &Path, expected: &'static str) -> Result<Option<StepReport>, ChannelError> {
        match std::fs::File::open(path) {
            Ok(f) => read_line(std::io::BufReader::new(f), Self::CHANNEL, expected),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ChannelError::Io {
                channel: Self::CHANNEL,
                source,
            }),
        }
    }

    /// A few words naming the message, for an unexpected one.
    pub fn describe(&self) -> String {
        match self {
            StepReport::Running {
                instance, root_pid, ..
            } => format!("running (instance {instance}, pid {root_pid})"),
            StepReport::Published { image } => format!("published {}", image.display()),
            StepReport::Failed { reason } => format!("failed: {reason}"),
        }
    }
}

/// Reads one message line; None when the writer closed without sending.
pub fn read_line<T: DeserializeOwned>(
    r: impl BufRead,
    channel: &'static str,
    expected: &'static str,
) -> Result<Option<T>, ChannelError> {
    let mut line = String::new();
    r.take(MAX_LINE)
        .read_line(&mut line)
        .map_err(|source| ChannelError::Io { channel, source })?;
    if line.is_empty() {
        return Ok(None);
    }
    let text = line.trim_end_matches('\n');
    serde_json::from_str(text)
        .map(Some)
        .map_err(|e| ChannelError::Malformed {
            channel,
            expected,
            received: text.chars().take(200).collect(),
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(text: &str) -> Result<Option<RestoreChildMsg>, ChannelError> {
        read_line(
            text.as_bytes(),
            RestoreChildMsg::CHANNEL,
            RestoreChildMsg::EXPECTED,
        )
    }

    #[test]
    fn restore_child_messages_round_trip() {
        let m = RestoreChildMsg::ChildFailed {
            step: "bind \"the\" host root\nsecond line".into(),
            errno: 1,
        };
        let mut line = serde_json::to_string(&m).unwrap();
        assert!(!line.contains('\n'), "{line}");
        line.push('\n');
        assert_eq!(child(&line).unwrap(), Some(m));
        // The pipe closed without a word: CRIU's exec succeeded.
        assert_eq!(child("").unwrap(), None);
    }

    #[test]
    fn the_child_encoding_parses_as_child_failed() {
        let mut buf = [0u8; 160];
        for errno in [0, 1, 38, 4095, -5, i32::MIN] {
            let n = RestoreChildMsg::encode_child_failed(
                &mut buf,
                "unshare the mount namespace",
                errno,
            );
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            assert_eq!(
                child(text).unwrap(),
                Some(RestoreChildMsg::ChildFailed {
                    step: "unshare the mount namespace".into(),
                    errno
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_child_messages_are_errors_naming_both_sides() {
        for (text, detail) in [
            ("R 123\n", "expected value"),
            // The ready message of the --exec-cmd design's supervisor.
            (r#"{"msg":"ready","root":12}"#, "unknown variant `ready`"),
            (
                r#"{"msg":"child_failed","step":"x"}"#,
                "missing field `errno`",
            ),
            (
                r#"{"msg":"child_failed","step":"x","errno":"1"}"#,
                "invalid type",
            ),
            (r#"{"step":"x","errno":1}"#, "missing field `msg`"),
        ] {
            let e = child(text).unwrap_err();
            let s = e.to_string();
            assert!(matches!(e, ChannelError::Malformed { .. }), "{s}");
            assert!(s.contains(detail), "{text}: {s}");
            assert!(
                s.contains("expected child_failed {step, errno}"),
                "{text}: {s}"
            );
            assert!(s.contains(&format!("{:?}", text.trim_end())), "{text}: {s}");
        }
    }

    #[test]
    fn host_pids_are_real_processes() {
        for bad in ["0", "-1", "\"12\""] {
            assert!(serde_json::from_str::<HostPid>(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::from_str::<HostPid>("12").unwrap().raw(), 12);
    }

    #[test]
    fn step_reports_are_written_whole_and_read_back() {
        let dir = std::env::temp_dir().join(format!("mh-channel-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.json");
        assert!(StepReport::read(&path, "running").unwrap().is_none());
        let r = StepReport::Running {
            instance: "1-2".into(),
            supervisor_pid: HostPid::new(10).unwrap(),
            root_pid: HostPid::new(11).unwrap(),
        };
        r.write(&path).unwrap();
        assert_eq!(StepReport::read(&path, "running").unwrap(), Some(r));
        assert!(!dir.join("report.json.tmp").exists());

        std::fs::write(
            &path,
            r#"{"outcome":"running","instance":"1-2","supervisor_pid":0,"root_pid":11}"#,
        )
        .unwrap();
        let e = StepReport::read(&path, "running {instance, pids}").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("0 is not a process id") && s.contains("expected running {instance, pids}"),
            "{s}"
        );

        std::fs::write(&path, "runmh: error: no such file\n").unwrap();
        let e = StepReport::read(&path, "published {image}").unwrap_err();
        assert!(matches!(e, ChannelError::Malformed { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

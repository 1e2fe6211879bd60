//! miehisto: make any Linux server process checkpoint/restore-ready with
//! CRIU, stop it automatically right before a chosen syscall (by default its
//! first `listen(2)`), dump it, and restore it later in a fraction of its
//! boot time.
//!
//! The modules follow the data's path:
//! [`spec`] → [`filter`] → [`sandbox`] → [`stop`] → [`criu`] → [`images`] →
//! [`supervisor`] → [`daemon`]; [`prebake`], [`dump`] and [`restore`] are
//! the flows that string them together, [`migrate`] is the CRIU side of
//! live migration, [`sys`] is the ground they all
//! stand on. They form layers with no import cycle (`tests/layers.rs`
//! checks it; the README's Layout table lists them layer by layer).

pub mod bench;
pub mod channel;
pub mod control;
pub mod criu;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod dump;
pub mod experiment;
pub mod explain;
pub mod files;
pub mod filter;
pub mod images;
pub mod instance;
pub mod migrate;
pub mod prebake;
pub mod restore;
pub mod sandbox;
pub mod sockets;
pub mod spec;
pub mod stop;
pub mod supervisor;
pub mod sys;
pub mod timings;

/// Text from an image, a record or a client, made safe for a terminal:
/// control characters (escape sequences, newlines, carriage returns) are
/// shown escaped (`\u{1b}`), everything else as it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            super::printable("web\u{1b}[2J\r\nok é"),
            "web\\u{1b}[2J\\r\\nok é"
        );
        assert_eq!(
            super::printable("plain -m http.server"),
            "plain -m http.server"
        );
    }
}

/// An error and its causes on one line, joined like anyhow's `{:#}`: for
/// records, replies and reports that keep the reason as text. A cause whose
/// text its wrapper already quotes is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot open the image")]
        Open(#[source] std::io::Error),
        #[error("the restore failed: {0}")]
        Quoting(#[source] std::io::Error),
    }

    #[test]
    fn error_chain_joins_causes_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            super::error_chain(&Outer::Open(io())),
            "cannot open the image: no such file"
        );
        assert_eq!(
            super::error_chain(&Outer::Quoting(io())),
            "the restore failed: no such file"
        );
    }
}

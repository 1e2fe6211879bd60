//! miehisto: make any Linux server process checkpoint/restore-ready with
//! CRIU, stop it automatically right before a chosen syscall (by default its
//! first `listen(2)`), dump it, and restore it later in a fraction of its
//! boot time.
//!
//! The modules follow the data's path:
//! [`spec`] → [`sandbox`] → [`stop`] → [`criu`] → [`images`] → [`supervisor`]
//! → [`daemon`]; [`prebake`], [`dump`] and [`restore`] are the flows that
//! string them together.

pub mod bench;
pub mod control;
pub mod criu;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod dump;
pub mod experiment;
pub mod explain;
pub mod images;
pub mod instance;
pub mod prebake;
pub mod restore;
pub mod sandbox;
pub mod spec;
pub mod stop;
pub mod supervisor;
pub mod sys;

/// An error and its causes on one line, joined like anyhow's `{:#}`: for
/// records and reports that keep the reason as text.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

//! The stop as a backend saw it: which task called which syscall with which
//! arguments, and what was frozen. Kept in every image's metadata.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StopHit {
    pub tid: i32,
    pub tgid: i32,
    pub syscall: String,
    pub nr: i64,
    pub args: [u64; 6],
    /// Unix time of the trap, in milliseconds.
    pub at_unix_ms: u64,
    /// Processes frozen in group-stop (empty when held).
    pub frozen: Vec<i32>,
    pub held: bool,
}

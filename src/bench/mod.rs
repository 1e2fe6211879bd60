//! Benchmarks (issue 6): cold boot against restore, side by side.
//! PLACEHOLDER until the benchmarks land: the CLI contract only.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workloads to measure (repeatable; default: all installed).
    #[arg(long = "workload", value_name = "NAME")]
    pub workload: Vec<String>,
    /// Interleaved runs per measurement.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub runs: u32,
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("the benchmarks are not implemented yet")]
    NotYet,
}

/// Runs the benchmarks; returns the process exit code.
pub fn cli(_args: &BenchArgs, _criu: Option<&std::path::Path>, _state_dir: &std::path::Path) -> Result<i32, BenchError> {
    Err(BenchError::NotYet)
}

//! The research matrix (issue 5): the talk's experiments, reproduced side by
//! side. PLACEHOLDER until the matrix lands: the CLI contract only.

use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Run only these scenario ids (repeatable).
    #[arg(long = "only", value_name = "ID")]
    pub only: Vec<String>,
    /// Run each scenario N times.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub repeat: u32,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the results as a markdown table.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// A patched CRIU (seize-patch/) for the rows that compare it.
    #[arg(long, value_name = "PATH")]
    pub criu_patched: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("the research matrix is not implemented yet")]
    NotYet,
}

/// Runs the matrix; returns the process exit code.
pub fn cli(_args: &ExperimentArgs, _criu: Option<&std::path::Path>, _state_dir: &std::path::Path) -> Result<i32, ExperimentError> {
    Err(ExperimentError::NotYet)
}

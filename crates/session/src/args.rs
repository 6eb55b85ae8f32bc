//! The command-line arguments every training command takes, and where `--resume` points.

use std::path::{Path, PathBuf};

use colossal_core::train::list_checkpoints;
use colossal_core::{Error, Result};

/// `--config FILE [--set section.key=value]… [--resume DIR] [--max-steps N]`.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key: section.key=value (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Resume from a checkpoint directory, or the newest checkpoint of an output directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this optimizer step (the schedule still spans train.max_steps).
    #[arg(long)]
    pub max_steps: Option<usize>,
}

impl TrainArgs {
    /// The config file with the overrides applied.
    pub fn load<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        colossal_core::config::load_config(&self.config, &self.overrides)
    }

    /// The checkpoint `--resume` names (see [`resolve_resume`]).
    pub fn resume_dir(&self) -> Result<Option<PathBuf>> {
        self.resume.as_deref().map(resolve_resume).transpose()
    }
}

/// A checkpoint directory as given, or the newest checkpoint of an output directory.
pub fn resolve_resume(p: &Path) -> Result<PathBuf> {
    if p.join("trainer_state.json").exists() {
        return Ok(p.to_path_buf());
    }
    list_checkpoints(p).pop().ok_or_else(|| {
        Error::file(
            p,
            "--resume: no checkpoint (trainer_state.json) found there",
        )
    })
}

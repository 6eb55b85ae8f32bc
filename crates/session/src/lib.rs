//! The run loop every colossal-rs app shares, and what a person looks at of a run: a task
//! steps, evaluates and checkpoints; the session decides when, writes `metrics.jsonl`, shows
//! progress and draws the curves. The core library stays free of terminals and plotting.

mod args;
mod metrics;
mod pretrain;
mod session;

pub use args::{resolve_resume, TrainArgs};
pub use metrics::{plot_curves, plot_loss_curve, run_outputs, MetricsWriter};
pub use pretrain::{train, RunExt, RunSummary};
pub use session::{run_session, Plan, Record, Summary, Task};

/// Logs to stderr at `info` (`RUST_LOG` overrides), as the training binaries do.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

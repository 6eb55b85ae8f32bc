//! AdamW (torch semantics), global-norm clipping and LR schedules.
mod adamw;
mod clip;
mod scaler;
mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWKernel, Moment};
pub use clip::{clip_grad_norm, clip_to_norm, global_grad_norm};
pub use scaler::LossScaler;
pub use schedule::{LrSchedule, ScheduleKind};

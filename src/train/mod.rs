//! Training: the loop, its hooks, optimizers, schedules, logging and checkpoints.

pub mod config;
pub mod hooks;
pub mod schedule;
pub mod trainer;

pub use config::{OptimizerConfig, ScheduleSpan, TrainConfig};
pub use hooks::{EpochMetrics, Progress, TrainHook};
pub use schedule::Schedule;
pub use trainer::{
    Prepared, TrainOptions, TrainOutcome, evaluate, latest_checkpoint, prepare, read_metrics, train,
};

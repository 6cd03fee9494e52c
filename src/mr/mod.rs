//! MapReduce: applications, the task table, task execution, an in-process executor, and the
//! RPC coordinator and worker drivers.
//!
//! What this module owns:
//! - the application interface ([`App`], [`Combiner`], [`Emitter`], [`Values`]), the built-in
//!   applications `wc` and `indexer` ([`app_by_name`]) and the lab's test applications
//!   ([`test_apps`], kept out of the user-facing list);
//! - the task table ([`TaskTable`]), a pure state machine: time is passed in, nothing is read
//!   from a clock, a file or the network;
//! - task execution on files ([`run_map`], [`run_reduce`]): streaming map with a bounded
//!   combine table, partitioning by FNV-1a ([`partition`]), an external merge sort in reduce,
//!   atomic renames so a crash never leaves partial output visible;
//! - planning ([`plan_splits`], [`plan_splits_balanced`]), the sequential reference
//!   ([`run_sequential`]) and the in-process executor ([`run_job`]);
//! - the distributed drivers: the [`Coordinator`] (an RPC server over an [`Endpoint`] whose job
//!   state is durable in an [`MrStorage`] store; see `coordinator.rs` for the durability rules)
//!   and the worker loop ([`run_worker`]), speaking the protocol of [`RequestTask`],
//!   [`CompleteTask`] and [`FailTask`].
//!
//! The table, task execution, planning and the in-process executor touch neither the network nor
//! the store; only `coordinator.rs`, `worker.rs` and `job_store.rs` do, through [`Endpoint`] and
//! the storage traits (never sled directly).
//!
//! [`Endpoint`]: crate::net::Endpoint
//! [`MrStorage`]: crate::storage::MrStorage
//!
//! Files of a job: intermediate files `mr-<m>-a<attempt>` (one per map attempt, holding the
//! records of every reduce task, with an index) in [`ExecConfig::intermediate_dir`] (binary,
//! length-prefixed, checksummed), outputs
//! `mr-out-<r>` in [`ExecConfig::output_dir`] with one `key value` line per key, temporary
//! files `.mr-tmp-*` renamed into place when complete.
//!
//! # Example
//!
//! ```
//! use raftkv::mr::{JobConfig, app_by_name, run_job};
//!
//! let dir = tempfile::tempdir()?;
//! let input = dir.path().join("input.txt");
//! std::fs::write(&input, "the cat saw the dog\nthe end\n")?;
//! let mut config = JobConfig::new(dir.path().join("out"));
//! config.table.reduce_tasks = 2;
//! let summary = run_job(app_by_name("wc")?, &[input], &config)?;
//! let mut lines = Vec::new();
//! for output in &summary.outputs {
//!     lines.extend(std::fs::read_to_string(output)?.lines().map(String::from));
//! }
//! lines.sort();
//! assert_eq!(lines, ["cat 1", "dog 1", "end 1", "saw 1", "the 3"]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod app;
mod apps;
mod config;
mod coordinator;
mod error;
mod executor;
mod format;
mod hash;
mod job_store;
mod map_task;
mod protocol;
mod reduce_task;
mod sequential;
mod split;
mod table;
pub mod test_apps;
mod worker;

pub use app::{App, AppError, CombineOp, Combiner, Emitter, ValueSource, Values};
pub use apps::{APP_NAMES, Indexer, WordCount, app_by_name, for_each_word};
pub use config::ExecConfig;
pub use coordinator::{Coordinator, CoordinatorConfig, JobReport, JobStart, TASK_STAT_VALUE_MAX};
pub use error::MrError;
pub use executor::{JobConfig, JobSummary, WORKERS_MAX, run_job, run_job_with};
pub use hash::{FastBuildHasher, FastHasher, fnv1a32, partition};
pub use job_store::JobSpec;
pub use map_task::{intermediate_file_name, output_file_name, run_map};
pub use protocol::{
    APP_NAME_BYTES_MAX, COORDINATOR_NODE_ID, CompleteTask, FailTask, JobDirs, JobOutcome,
    ReportReply, RequestTask, TaskReply,
};
pub use reduce_task::run_reduce;
pub use sequential::run_sequential;
pub use split::{MapSplit, plan_splits, plan_splits_balanced};
pub use table::{
    Assignment, Completion, Failure, JobStatus, MapTask, Progress, REDUCE_TASKS_MAX, ReduceTask,
    TASK_ERROR_BYTES_MAX, TableConfig, TaskId, TaskRecord, TaskState, TaskStats, TaskTable,
    TaskTableParts, WorkerId,
};
pub use worker::{WorkerConfig, WorkerExit, WorkerSummary, run_worker};

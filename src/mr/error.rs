//! The error type of the MapReduce module.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::table::TaskId;
use crate::net::NetError;
use crate::storage::StorageError;

/// Everything that can go wrong while planning, executing or driving a MapReduce job.
#[derive(Debug, Error)]
pub enum MrError {
    /// A file or directory operation failed; `op` says which one.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// The operation that failed, e.g. "open input" or "rename output".
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// An intermediate file (or a reduce spill run) is not in the expected format.
    #[error("corrupted intermediate file {path} at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What was wrong.
        reason: String,
    },
    /// An input line is longer than `map_line_bytes_max`, so it cannot be handed to map whole.
    #[error(
        "line starting at byte {offset} of {path} is longer than map_line_bytes_max ({max} bytes)"
    )]
    LineTooLong {
        /// The input file.
        path: PathBuf,
        /// Byte offset of the start of the line.
        offset: u64,
        /// The configured limit.
        max: usize,
    },
    /// Map emitted a key/value pair larger than `record_bytes_max`.
    #[error(
        "map emitted a record with a {key_bytes}-byte key and a {value_bytes}-byte value, \
         over record_bytes_max ({max} bytes)"
    )]
    RecordTooLarge {
        /// Length of the key.
        key_bytes: usize,
        /// Length of the value.
        value_bytes: usize,
        /// The configured limit.
        max: usize,
    },
    /// The application's map, combine or reduce function returned an error or panicked.
    #[error("application {app:?} failed in {task}: {message}")]
    App {
        /// Name of the application.
        app: String,
        /// The task that was running.
        task: TaskId,
        /// The application's message (or the panic payload).
        message: String,
    },
    /// An input path is not valid UTF-8; map receives file names as strings.
    #[error("input path is not valid UTF-8: {0:?}")]
    NonUtf8Path(PathBuf),
    /// An input path is not a regular file.
    #[error("input {0} is not a regular file")]
    NotAFile(PathBuf),
    /// A configuration value or an assignment is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No application is registered under this name.
    #[error("unknown MapReduce application {name:?} (known: {known})")]
    UnknownApp {
        /// The name asked for.
        name: String,
        /// The registered names, comma-separated.
        known: String,
    },
    /// A task failed `task_failures_max` times, so the job was abandoned.
    #[error("job failed: {task} failed {failures} times; last error: {last_error}")]
    JobFailed {
        /// The task that kept failing.
        task: TaskId,
        /// How many times it failed.
        failures: u32,
        /// The error of its last failure.
        last_error: String,
    },
    /// The coordinator's durable job state could not be read or written.
    #[error("job state storage: {0}")]
    Storage(#[from] StorageError),
    /// The coordinator's job state holds something this build cannot accept.
    #[error("corrupted job state record {record}: {reason}")]
    StateCorrupt {
        /// Which record, e.g. `job/spec` or `map task 3`.
        record: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The state directory holds a different job than the one asked for.
    #[error(
        "the state directory holds a different job ({differences}); rerun the original \
         command, or use a new state directory for a new job"
    )]
    JobMismatch {
        /// Every field that differs, stored value first.
        differences: String,
    },
    /// The job state says a reduce task is done but its output file is gone.
    #[error("job state says the job is done but output {0} is missing")]
    OutputMissing(PathBuf),
    /// Setting up or using the network failed.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The coordinator stopped because its job state could not be persisted (fail-stop);
    /// restart it to resume from the durable state.
    #[error("coordinator stopped: {0}")]
    Stopped(String),
    /// The coordinator refused this worker (another application, or the coordinator failed).
    #[error("the coordinator refused this worker: {reason}")]
    Refused {
        /// The coordinator's reason.
        reason: String,
    },
    /// The coordinator was never reached.
    #[error("no reply from the coordinator (node {node}) within {waited_ms} ms: {last_error}")]
    CoordinatorUnreachable {
        /// The coordinator's node id.
        node: crate::NodeId,
        /// How long the worker kept trying.
        waited_ms: u64,
        /// The last error of a call.
        last_error: String,
    },
}

impl MrError {
    /// Wraps an I/O error with the operation and the path it concerned.
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        MrError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

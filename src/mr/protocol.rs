//! The coordinator–worker RPC protocol: what a worker asks and reports, what the coordinator
//! answers. Message kinds `0x0301`–`0x0303` (the `0x03xx` range belongs to MapReduce).
//!
//! A worker calls [`RequestTask`] in a loop; the coordinator answers with a [`TaskReply`] (a task
//! to run, wait, exit, or a refusal). After running a task the worker calls [`CompleteTask`] or
//! [`FailTask`], answered with a [`ReportReply`]. Every call is safe to repeat: a repeated
//! completion is a late completion, which the task table ignores, and a lost `RequestTask` reply
//! only leaves a task in progress until it times out.

use serde::{Deserialize, Serialize};

use super::table::{MapTask, ReduceTask, TaskId, TaskStats, WorkerId};
use crate::NodeId;
use crate::net::{Kind, Rpc};

/// The node id of the coordinator on the network; workers pick any other id.
pub const COORDINATOR_NODE_ID: NodeId = 0x6d72;

/// Longest application name a worker may send, in bytes.
pub const APP_NAME_BYTES_MAX: usize = 64;

/// A worker asks for its next task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestTask {
    /// The asking worker (one random id per worker process).
    pub worker: WorkerId,
    /// The application the worker runs; a job only accepts workers of its own application.
    pub app: String,
}

impl Rpc for RequestTask {
    const KIND: Kind = Kind::new(0x0301, 1);
    type Reply = TaskReply;
}

/// Where a job's files live, sent with every task. Paths are absolute on the coordinator's
/// machine: workers must see the same file system (as in the reference lab).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDirs {
    /// Identifies the job; reports name it so that a report meant for another job (a
    /// coordinator restarted on another state directory at the same address) is ignored.
    pub job_id: u64,
    /// Directory of the outputs `mr-out-<r>`.
    pub output_dir: String,
    /// Directory of the intermediate files.
    pub intermediate_dir: String,
}

/// How a finished job ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobOutcome {
    /// Every `mr-out-<r>` is in place.
    Done,
    /// A task failed too often and the job was abandoned.
    Failed {
        /// The task.
        task: TaskId,
        /// Its failure count.
        failures: u32,
        /// Its last error.
        last_error: String,
    },
}

/// The coordinator's answer to [`RequestTask`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskReply {
    /// Run this map task.
    Map {
        /// The job's directories.
        job: JobDirs,
        /// The task.
        task: MapTask,
    },
    /// Run this reduce task.
    Reduce {
        /// The job's directories.
        job: JobDirs,
        /// The task.
        task: ReduceTask,
    },
    /// Nothing to hand out now; ask again after `retry_after_ms` (0 when the coordinator
    /// already held the request while waiting for a change).
    Wait {
        /// How long to wait before asking again.
        retry_after_ms: u64,
    },
    /// The job is over; exit.
    Exit {
        /// How it ended.
        outcome: JobOutcome,
    },
    /// This worker cannot take part (another application, or the coordinator failed).
    Refused {
        /// Why, for the worker's error message.
        reason: String,
    },
}

/// A worker reports that it finished an attempt; its files are renamed into place (and
/// fsynced when the worker syncs files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteTask {
    /// The job the task belongs to ([`JobDirs::job_id`]).
    pub job_id: u64,
    /// The reporting worker.
    pub worker: WorkerId,
    /// The task.
    pub task: TaskId,
    /// The attempt that finished.
    pub attempt: u32,
    /// What the attempt measured.
    pub stats: TaskStats,
}

impl Rpc for CompleteTask {
    const KIND: Kind = Kind::new(0x0302, 1);
    type Reply = ReportReply;
}

/// A worker reports that an attempt failed (an application error, a bad input, a full disk).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailTask {
    /// The job the task belongs to ([`JobDirs::job_id`]).
    pub job_id: u64,
    /// The reporting worker.
    pub worker: WorkerId,
    /// The task.
    pub task: TaskId,
    /// The attempt that failed.
    pub attempt: u32,
    /// The error, for the job's failure report (truncated by the coordinator).
    pub error: String,
}

impl Rpc for FailTask {
    const KIND: Kind = Kind::new(0x0303, 1);
    type Reply = ReportReply;
}

/// The coordinator's answer to [`CompleteTask`] and [`FailTask`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportReply {
    /// The report changed the job's state, durably.
    Recorded,
    /// The report changed nothing that matters (a late completion, an unknown attempt, another
    /// job); the worker just asks for its next task.
    Ignored {
        /// Why.
        reason: String,
    },
    /// The coordinator cannot take reports (it failed).
    Refused {
        /// Why.
        reason: String,
    },
}

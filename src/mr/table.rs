//! The task table: the coordinator's state of a job, as a pure state machine.
//!
//! The table owns which task is idle, in progress (by which worker, which attempt, since when)
//! or done, and decides what a worker asking for work gets. It never reads a clock, touches a
//! file or sends a message: the caller passes the time in (`now_ms`, milliseconds of any
//! monotonic clock) and carries out the result. Every mutating call changes at most the one task
//! named in its argument or result (except [`TaskTable::reset_in_progress`], which says what it
//! changed), so a durable driver can persist one [`TaskRecord`] per call.
//!
//! Attempt numbers name the files an attempt writes (see `intermediate_file_name`), so they are
//! never reused: a restored table keeps each task's attempt counter.
//!
//! Durability contract for a driver that persists the table: persist the record changed by
//! `assign` before sending the assignment (so an attempt a worker runs is always known after a
//! restart), and persist the record changed by `complete` before acting on it (before handing
//! out reduce tasks that read the accepted attempt, or reporting the job done). A worker reports
//! completion only after its files are renamed into place (and fsynced with `sync_files`). After
//! a restart, call [`TaskTable::reset_in_progress`]: the old attempts may still report, and
//! their first completion is accepted.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::MrError;
use super::split::MapSplit;

/// Largest number of reduce tasks a job may have (each map task keeps a write buffer of at
/// least 4 KiB per reduce task).
pub const REDUCE_TASKS_MAX: u32 = 10_000;

/// Longest failure message kept per task, in bytes.
pub const TASK_ERROR_BYTES_MAX: usize = 1024;

/// Identifies a worker to the table. The driver chooses the numbers (one per worker process or
/// thread); the table only compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub u64);

/// A task of the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskId {
    /// Map task `n` (reads split `n`).
    Map(u32),
    /// Reduce task `n` (writes `mr-out-n`).
    Reduce(u32),
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskId::Map(n) => write!(f, "map task {n}"),
            TaskId::Reduce(n) => write!(f, "reduce task {n}"),
        }
    }
}

/// Limits and timing of a job's task table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableConfig {
    /// Number of reduce tasks, `R` (1..=[`REDUCE_TASKS_MAX`]).
    pub reduce_tasks: u32,
    /// A task in progress this long without completing is given to the next worker that asks.
    pub task_timeout_ms: u64,
    /// The job fails once one task has failed (reported an error) this many times. Timeouts do
    /// not count: a crashed worker is not the task's fault.
    pub task_failures_max: u32,
}

impl Default for TableConfig {
    /// R = 10, a 10 s timeout (the lab's values) and 4 failures per task.
    fn default() -> Self {
        TableConfig {
            reduce_tasks: 10,
            task_timeout_ms: 10_000,
            task_failures_max: 4,
        }
    }
}

impl TableConfig {
    fn validate(&self) -> Result<(), MrError> {
        if self.reduce_tasks == 0 || self.reduce_tasks > REDUCE_TASKS_MAX {
            return Err(MrError::Config(format!(
                "reduce_tasks must be in 1..={REDUCE_TASKS_MAX}, got {}",
                self.reduce_tasks
            )));
        }
        if self.task_timeout_ms == 0 {
            return Err(MrError::Config("task_timeout_ms must be positive".into()));
        }
        if self.task_failures_max == 0 {
            return Err(MrError::Config("task_failures_max must be positive".into()));
        }
        Ok(())
    }
}

/// What a task's execution measured; summed into [`Progress`] for accepted completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStats {
    /// Bytes read: the split for a map task, intermediate files for a reduce task.
    pub input_bytes: u64,
    /// Records read by a reduce task; for a map task, key/value pairs emitted by map.
    pub input_records: u64,
    /// Bytes written: intermediate files for a map task, `mr-out-<r>` for a reduce task.
    pub output_bytes: u64,
    /// Records written to intermediate files (map) or output lines (reduce).
    pub output_records: u64,
    /// Times the memory budget forced a spill: combine-table flushes before the final one
    /// (map) or sorted runs written to disk (reduce).
    pub spills: u64,
}

/// Where a task stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for a worker.
    Idle,
    /// Given to `worker` as `attempt` at `started_at_ms`.
    InProgress {
        /// The worker running the current attempt.
        worker: WorkerId,
        /// The current attempt's number (1-based).
        attempt: u32,
        /// When it was handed out.
        started_at_ms: u64,
    },
    /// Completed by `attempt`; its output is the task's output.
    Done {
        /// The accepted attempt.
        attempt: u32,
        /// When the completion arrived.
        finished_at_ms: u64,
    },
}

/// Everything the table knows about one task; the unit a durable driver persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Current state.
    pub state: TaskState,
    /// Attempts handed out so far; attempt numbers are `1..=attempts`.
    pub attempts: u32,
    /// Failures reported by any attempt.
    pub failures: u32,
    /// Times an attempt timed out and the task was handed to another worker.
    pub timeouts: u32,
    /// Completions that arrived after the task was already done (ignored).
    pub late_completions: u32,
    /// Message of the last reported failure (at most [`TASK_ERROR_BYTES_MAX`] bytes).
    pub last_error: Option<String>,
    /// Statistics of the accepted completion.
    pub stats: TaskStats,
}

impl TaskRecord {
    fn new() -> Self {
        TaskRecord {
            state: TaskState::Idle,
            attempts: 0,
            failures: 0,
            timeouts: 0,
            late_completions: 0,
            last_error: None,
            stats: TaskStats::default(),
        }
    }

    fn is_done(&self) -> bool {
        matches!(self.state, TaskState::Done { .. })
    }

    fn validate(&self, task: TaskId) -> Result<(), MrError> {
        let attempt = match self.state {
            TaskState::Idle => return Ok(()),
            TaskState::InProgress { attempt, .. } | TaskState::Done { attempt, .. } => attempt,
        };
        if attempt == 0 || attempt > self.attempts {
            return Err(MrError::Config(format!(
                "{task}: attempt {attempt} in state but only {} attempts issued",
                self.attempts
            )));
        }
        Ok(())
    }
}

/// A map task handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapTask {
    /// Map task number, `m`.
    pub task: u32,
    /// Attempt number; names the intermediate file `mr-<m>-a<attempt>`.
    pub attempt: u32,
    /// The bytes to map.
    pub split: MapSplit,
    /// Number of reduce tasks, `R`: the map partitions its output into R parts (blocks of its
    /// one intermediate file).
    pub reduce_tasks: u32,
}

/// A reduce task handed to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReduceTask {
    /// Reduce task number, `r`; the output is `mr-out-<r>`.
    pub task: u32,
    /// Attempt number.
    pub attempt: u32,
    /// For each map task `m`, its accepted attempt: the reduce reads its blocks of
    /// `mr-<m>-a<attempt>`.
    pub map_attempts: Vec<u32>,
}

/// What a worker asking for work is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Assignment {
    /// Run this map task.
    Map(MapTask),
    /// Run this reduce task.
    Reduce(ReduceTask),
    /// Nothing can be handed out now (tasks are in progress elsewhere); ask again later.
    Wait,
    /// The job is over (done or failed); exit.
    Exit,
}

/// How the table took a completion report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The first completion of the task: its output is now the task's output.
    Accepted,
    /// The task was already done; this attempt's output is ignored.
    Late,
    /// No such task.
    UnknownTask,
    /// No such attempt was ever handed out.
    UnknownAttempt,
}

/// How the table took a failure report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The failing attempt was the current one; the task is idle again and will be retried.
    Retry,
    /// Counted, but another attempt is running or the task is done; nothing else changes.
    Stale,
    /// The task reached `task_failures_max`: the job has failed.
    JobFailed,
    /// No such task or attempt; ignored.
    Unknown,
}

/// Whether the job is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobStatus {
    /// Tasks remain.
    Running,
    /// Every reduce task is done: all `mr-out-*` files are in place.
    Done,
    /// A task failed too often.
    Failed {
        /// The task.
        task: TaskId,
        /// Its failure count.
        failures: u32,
        /// Its last error.
        last_error: String,
    },
}

/// Counters for progress reporting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Number of map tasks.
    pub map_tasks: u32,
    /// Map tasks done.
    pub maps_done: u32,
    /// Map tasks in progress.
    pub maps_in_progress: u32,
    /// Number of reduce tasks.
    pub reduce_tasks: u32,
    /// Reduce tasks done.
    pub reduces_done: u32,
    /// Reduce tasks in progress.
    pub reduces_in_progress: u32,
    /// Total size of the input splits.
    pub input_bytes: u64,
    /// Size of the splits of done map tasks.
    pub input_bytes_done: u64,
    /// Intermediate bytes written by accepted map attempts.
    pub intermediate_bytes: u64,
    /// Output bytes written by accepted reduce attempts.
    pub output_bytes: u64,
    /// Reassignments after a timeout, over all tasks.
    pub timeouts: u64,
    /// Reported failures, over all tasks.
    pub failures: u64,
    /// Ignored late completions, over all tasks.
    pub late_completions: u64,
    /// Spills forced by memory budgets in accepted attempts.
    pub spills: u64,
}

/// The serialized form of a [`TaskTable`]; also what a durable driver reassembles from its
/// per-task records. [`TaskTable::from_parts`] validates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTableParts {
    /// The configuration.
    pub config: TableConfig,
    /// One split per map task.
    pub splits: Vec<MapSplit>,
    /// One record per map task.
    pub maps: Vec<TaskRecord>,
    /// One record per reduce task.
    pub reduces: Vec<TaskRecord>,
}

/// The task table of one job. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TaskTableParts", into = "TaskTableParts")]
pub struct TaskTable {
    config: TableConfig,
    splits: Vec<MapSplit>,
    maps: Vec<TaskRecord>,
    reduces: Vec<TaskRecord>,
    /// Derived: number of done map tasks.
    maps_done: u32,
    /// Derived: number of done reduce tasks.
    reduces_done: u32,
}

impl TryFrom<TaskTableParts> for TaskTable {
    type Error = MrError;

    fn try_from(parts: TaskTableParts) -> Result<Self, MrError> {
        TaskTable::from_parts(parts)
    }
}

impl From<TaskTable> for TaskTableParts {
    fn from(table: TaskTable) -> Self {
        TaskTableParts {
            config: table.config,
            splits: table.splits,
            maps: table.maps,
            reduces: table.reduces,
        }
    }
}

impl TaskTable {
    /// A fresh table: one idle map task per split, `config.reduce_tasks` idle reduce tasks.
    pub fn new(config: TableConfig, splits: Vec<MapSplit>) -> Result<Self, MrError> {
        let maps = vec![TaskRecord::new(); splits.len()];
        let reduces = vec![TaskRecord::new(); config.reduce_tasks as usize];
        TaskTable::from_parts(TaskTableParts {
            config,
            splits,
            maps,
            reduces,
        })
    }

    /// Reassembles a table from its parts, checking that they are consistent.
    pub fn from_parts(parts: TaskTableParts) -> Result<Self, MrError> {
        parts.config.validate()?;
        if parts.splits.is_empty() {
            return Err(MrError::Config("a job needs at least one input".into()));
        }
        if u32::try_from(parts.splits.len()).is_err() {
            return Err(MrError::Config("too many map tasks".into()));
        }
        if parts.maps.len() != parts.splits.len() {
            return Err(MrError::Config(format!(
                "{} map records for {} splits",
                parts.maps.len(),
                parts.splits.len()
            )));
        }
        if parts.reduces.len() != parts.config.reduce_tasks as usize {
            return Err(MrError::Config(format!(
                "{} reduce records for reduce_tasks = {}",
                parts.reduces.len(),
                parts.config.reduce_tasks
            )));
        }
        for split in &parts.splits {
            if split.start > split.end {
                return Err(MrError::Config(format!(
                    "split of {} starts after it ends",
                    split.path
                )));
            }
        }
        for (i, record) in parts.maps.iter().enumerate() {
            record.validate(TaskId::Map(i as u32))?;
        }
        for (i, record) in parts.reduces.iter().enumerate() {
            record.validate(TaskId::Reduce(i as u32))?;
        }
        let maps_done = parts.maps.iter().filter(|r| r.is_done()).count() as u32;
        let reduces_done = parts.reduces.iter().filter(|r| r.is_done()).count() as u32;
        let any_reduce_started = parts.reduces.iter().any(|r| r.attempts > 0);
        if any_reduce_started && maps_done as usize != parts.maps.len() {
            return Err(MrError::Config(
                "a reduce task was started before all map tasks were done".into(),
            ));
        }
        Ok(TaskTable {
            config: parts.config,
            splits: parts.splits,
            maps: parts.maps,
            reduces: parts.reduces,
            maps_done,
            reduces_done,
        })
    }

    /// A copy of the table's parts (for persisting it whole).
    pub fn to_parts(&self) -> TaskTableParts {
        self.clone().into()
    }

    /// The configuration.
    pub fn config(&self) -> &TableConfig {
        &self.config
    }

    /// The map splits, indexed by map task.
    pub fn splits(&self) -> &[MapSplit] {
        &self.splits
    }

    /// Number of map tasks, `M`.
    pub fn map_tasks(&self) -> u32 {
        self.maps.len() as u32
    }

    /// Number of reduce tasks, `R`.
    pub fn reduce_tasks(&self) -> u32 {
        self.reduces.len() as u32
    }

    /// The record of `task`, if it exists.
    pub fn record(&self, task: TaskId) -> Option<&TaskRecord> {
        match task {
            TaskId::Map(n) => self.maps.get(n as usize),
            TaskId::Reduce(n) => self.reduces.get(n as usize),
        }
    }

    fn record_mut(&mut self, task: TaskId) -> Option<&mut TaskRecord> {
        match task {
            TaskId::Map(n) => self.maps.get_mut(n as usize),
            TaskId::Reduce(n) => self.reduces.get_mut(n as usize),
        }
    }

    fn all_maps_done(&self) -> bool {
        self.maps_done as usize == self.maps.len()
    }

    /// Whether the job is done, failed or still running.
    pub fn status(&self) -> JobStatus {
        let failed = self
            .maps
            .iter()
            .enumerate()
            .map(|(i, r)| (TaskId::Map(i as u32), r))
            .chain(
                self.reduces
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (TaskId::Reduce(i as u32), r)),
            )
            .find(|(_, r)| r.failures >= self.config.task_failures_max);
        if let Some((task, record)) = failed {
            return JobStatus::Failed {
                task,
                failures: record.failures,
                last_error: record.last_error.clone().unwrap_or_default(),
            };
        }
        if self.reduces_done as usize == self.reduces.len() {
            JobStatus::Done
        } else {
            JobStatus::Running
        }
    }

    /// Hands `worker` its next task at time `now_ms`: an idle map task, else a map task whose
    /// attempt timed out; once every map task is done, the same for reduce tasks. `Wait` when
    /// every remaining task is in progress and none timed out; `Exit` when the job is over.
    pub fn assign(&mut self, worker: WorkerId, now_ms: u64) -> Assignment {
        if self.status() != JobStatus::Running {
            return Assignment::Exit;
        }
        let timeout = self.config.task_timeout_ms;
        if !self.all_maps_done() {
            let Some((index, timed_out)) = pick(&self.maps, now_ms, timeout) else {
                return Assignment::Wait;
            };
            let attempt = start(&mut self.maps[index], worker, now_ms, timed_out);
            return Assignment::Map(MapTask {
                task: index as u32,
                attempt,
                split: self.splits[index].clone(),
                reduce_tasks: self.reduce_tasks(),
            });
        }
        let Some((index, timed_out)) = pick(&self.reduces, now_ms, timeout) else {
            return Assignment::Wait;
        };
        let attempt = start(&mut self.reduces[index], worker, now_ms, timed_out);
        let map_attempts = self
            .maps
            .iter()
            .map(|record| match record.state {
                TaskState::Done { attempt, .. } => attempt,
                ref state => panic!("reduce handed out while a map task is {state:?}"),
            })
            .collect();
        Assignment::Reduce(ReduceTask {
            task: index as u32,
            attempt,
            map_attempts,
        })
    }

    /// Records that `attempt` of `task` completed at `now_ms`. Only the first completion of a
    /// task is accepted — from any attempt ever handed out, including one that timed out —
    /// and later ones are ignored.
    pub fn complete(
        &mut self,
        task: TaskId,
        attempt: u32,
        stats: TaskStats,
        now_ms: u64,
    ) -> Completion {
        let Some(record) = self.record_mut(task) else {
            return Completion::UnknownTask;
        };
        if attempt == 0 || attempt > record.attempts {
            return Completion::UnknownAttempt;
        }
        if record.is_done() {
            record.late_completions += 1;
            return Completion::Late;
        }
        record.state = TaskState::Done {
            attempt,
            finished_at_ms: now_ms,
        };
        record.stats = stats;
        match task {
            TaskId::Map(_) => self.maps_done += 1,
            TaskId::Reduce(_) => self.reduces_done += 1,
        }
        assert!(
            self.maps_done as usize <= self.maps.len(),
            "maps_done overflow"
        );
        assert!(
            self.reduces_done as usize <= self.reduces.len(),
            "reduces_done overflow"
        );
        Completion::Accepted
    }

    /// Records that `attempt` of `task` failed with `error`. If it was the current attempt the
    /// task becomes idle again so the next worker retries it at once.
    pub fn fail(&mut self, task: TaskId, attempt: u32, error: &str) -> Failure {
        let failures_max = self.config.task_failures_max;
        let Some(record) = self.record_mut(task) else {
            return Failure::Unknown;
        };
        if attempt == 0 || attempt > record.attempts {
            return Failure::Unknown;
        }
        record.failures += 1;
        record.last_error = Some(truncate_message(error));
        let current = matches!(record.state,
            TaskState::InProgress { attempt: a, .. } if a == attempt);
        if record.failures >= failures_max && !record.is_done() {
            if current {
                record.state = TaskState::Idle;
            }
            return Failure::JobFailed;
        }
        if current {
            record.state = TaskState::Idle;
            Failure::Retry
        } else {
            Failure::Stale
        }
    }

    /// Makes every in-progress task idle (for a driver restarting after a crash, whose clock
    /// and workers are new). Returns the tasks it changed. Completions from the old attempts
    /// are still accepted if they come first.
    pub fn reset_in_progress(&mut self) -> Vec<TaskId> {
        let mut changed = Vec::new();
        for (i, record) in self.maps.iter_mut().enumerate() {
            if matches!(record.state, TaskState::InProgress { .. }) {
                record.state = TaskState::Idle;
                changed.push(TaskId::Map(i as u32));
            }
        }
        for (i, record) in self.reduces.iter_mut().enumerate() {
            if matches!(record.state, TaskState::InProgress { .. }) {
                record.state = TaskState::Idle;
                changed.push(TaskId::Reduce(i as u32));
            }
        }
        changed
    }

    /// The earliest time at which an in-progress task of the current phase times out (when a
    /// waiting worker should ask again), or `None` if no task is in progress.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let phase = if self.all_maps_done() {
            &self.reduces
        } else {
            &self.maps
        };
        phase
            .iter()
            .filter_map(|record| match record.state {
                TaskState::InProgress { started_at_ms, .. } => {
                    Some(started_at_ms.saturating_add(self.config.task_timeout_ms))
                }
                _ => None,
            })
            .min()
    }

    /// Counters for progress reporting.
    pub fn progress(&self) -> Progress {
        let mut progress = Progress {
            map_tasks: self.map_tasks(),
            reduce_tasks: self.reduce_tasks(),
            maps_done: self.maps_done,
            reduces_done: self.reduces_done,
            input_bytes: self.splits.iter().map(MapSplit::len).sum(),
            ..Progress::default()
        };
        for (record, split) in self.maps.iter().zip(&self.splits) {
            match record.state {
                TaskState::InProgress { .. } => progress.maps_in_progress += 1,
                TaskState::Done { .. } => {
                    progress.input_bytes_done += split.len();
                    progress.intermediate_bytes += record.stats.output_bytes;
                    progress.spills += record.stats.spills;
                }
                TaskState::Idle => {}
            }
        }
        for record in &self.reduces {
            match record.state {
                TaskState::InProgress { .. } => progress.reduces_in_progress += 1,
                TaskState::Done { .. } => {
                    progress.output_bytes += record.stats.output_bytes;
                    progress.spills += record.stats.spills;
                }
                TaskState::Idle => {}
            }
        }
        for record in self.maps.iter().chain(&self.reduces) {
            progress.timeouts += u64::from(record.timeouts);
            progress.failures += u64::from(record.failures);
            progress.late_completions += u64::from(record.late_completions);
        }
        progress
    }
}

/// The task to hand out next in `records`: the first idle one, else the in-progress one that
/// timed out longest ago. The flag says whether it timed out.
fn pick(records: &[TaskRecord], now_ms: u64, timeout_ms: u64) -> Option<(usize, bool)> {
    if let Some(index) = records
        .iter()
        .position(|r| matches!(r.state, TaskState::Idle))
    {
        return Some((index, false));
    }
    records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r.state {
            TaskState::InProgress { started_at_ms, .. }
                if now_ms >= started_at_ms.saturating_add(timeout_ms) =>
            {
                Some((started_at_ms, i))
            }
            _ => None,
        })
        .min()
        .map(|(_, i)| (i, true))
}

/// Starts a new attempt of `record` on `worker`; returns the attempt number.
fn start(record: &mut TaskRecord, worker: WorkerId, now_ms: u64, timed_out: bool) -> u32 {
    assert!(!record.is_done(), "starting a done task");
    if timed_out {
        record.timeouts += 1;
    }
    record.attempts = record
        .attempts
        .checked_add(1)
        .expect("attempt counter overflow");
    record.state = TaskState::InProgress {
        worker,
        attempt: record.attempts,
        started_at_ms: now_ms,
    };
    record.attempts
}

/// `message` cut to [`TASK_ERROR_BYTES_MAX`] bytes (at a character
/// boundary, marked with `…`): what a failure record keeps, and all a worker
/// sends (a client's frames are bounded).
pub(crate) fn truncate_message(message: &str) -> String {
    if message.len() <= TASK_ERROR_BYTES_MAX {
        return message.to_string();
    }
    let mut end = TASK_ERROR_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn splits(n: usize) -> Vec<MapSplit> {
        (0..n)
            .map(|i| MapSplit {
                path: format!("in-{i}"),
                start: 0,
                end: 100 + i as u64,
            })
            .collect()
    }

    fn table(maps: usize, reduces: u32) -> TaskTable {
        let config = TableConfig {
            reduce_tasks: reduces,
            task_timeout_ms: 1000,
            task_failures_max: 3,
        };
        TaskTable::new(config, splits(maps)).unwrap()
    }

    fn map_of(a: Assignment) -> MapTask {
        match a {
            Assignment::Map(task) => task,
            other => panic!("expected a map task, got {other:?}"),
        }
    }

    fn reduce_of(a: Assignment) -> ReduceTask {
        match a {
            Assignment::Reduce(task) => task,
            other => panic!("expected a reduce task, got {other:?}"),
        }
    }

    const W1: WorkerId = WorkerId(1);
    const W2: WorkerId = WorkerId(2);

    // Proves maps are handed out first, workers wait while maps run, and reduces follow.
    #[test]
    fn maps_first_then_wait_then_reduces_then_exit() {
        let mut t = table(2, 2);
        let m0 = map_of(t.assign(W1, 0));
        let m1 = map_of(t.assign(W2, 0));
        assert_eq!((m0.task, m0.attempt, m1.task), (0, 1, 1));
        assert_eq!(m0.reduce_tasks, 2);
        assert_eq!(t.assign(W1, 10), Assignment::Wait);
        assert_eq!(t.next_deadline_ms(), Some(1000));
        assert_eq!(
            t.complete(TaskId::Map(0), 1, TaskStats::default(), 20),
            Completion::Accepted
        );
        assert_eq!(
            t.assign(W1, 30),
            Assignment::Wait,
            "no reduce before all maps"
        );
        assert_eq!(
            t.complete(TaskId::Map(1), 1, TaskStats::default(), 40),
            Completion::Accepted
        );
        let r0 = reduce_of(t.assign(W1, 50));
        assert_eq!(
            (r0.task, r0.attempt, r0.map_attempts.clone()),
            (0, 1, vec![1, 1])
        );
        let r1 = reduce_of(t.assign(W2, 50));
        assert_eq!(r1.task, 1);
        assert_eq!(t.assign(W1, 60), Assignment::Wait);
        t.complete(TaskId::Reduce(0), 1, TaskStats::default(), 70);
        assert_eq!(t.status(), JobStatus::Running);
        t.complete(TaskId::Reduce(1), 1, TaskStats::default(), 80);
        assert_eq!(t.status(), JobStatus::Done);
        assert_eq!(t.assign(W1, 90), Assignment::Exit);
    }

    // Proves a timed-out task is reassigned with a new attempt, only the first completion
    // counts, and reduces read the accepted attempt's files.
    #[test]
    fn timeout_reassigns_and_first_completion_wins() {
        let mut t = table(1, 1);
        let first = map_of(t.assign(W1, 0));
        assert_eq!(t.assign(W2, 999), Assignment::Wait, "not yet timed out");
        let second = map_of(t.assign(W2, 1000));
        assert_eq!((first.attempt, second.attempt), (1, 2));
        assert_eq!(t.progress().timeouts, 1);
        // The stale first attempt finishes first: it is accepted.
        assert_eq!(
            t.complete(TaskId::Map(0), 1, TaskStats::default(), 1100),
            Completion::Accepted
        );
        assert_eq!(
            t.complete(TaskId::Map(0), 2, TaskStats::default(), 1200),
            Completion::Late
        );
        assert_eq!(
            t.complete(TaskId::Map(0), 1, TaskStats::default(), 1300),
            Completion::Late
        );
        assert_eq!(t.progress().late_completions, 2);
        assert_eq!(reduce_of(t.assign(W1, 1400)).map_attempts, vec![1]);
    }

    // Proves completions for unknown tasks and never-issued attempts change nothing.
    #[test]
    fn unknown_completions_are_rejected() {
        let mut t = table(1, 1);
        map_of(t.assign(W1, 0));
        let before = t.clone();
        let stats = TaskStats::default();
        assert_eq!(
            t.complete(TaskId::Map(5), 1, stats, 1),
            Completion::UnknownTask
        );
        assert_eq!(
            t.complete(TaskId::Map(0), 2, stats, 1),
            Completion::UnknownAttempt
        );
        assert_eq!(
            t.complete(TaskId::Map(0), 0, stats, 1),
            Completion::UnknownAttempt
        );
        assert_eq!(
            t.complete(TaskId::Reduce(0), 1, stats, 1),
            Completion::UnknownAttempt
        );
        assert_eq!(t.fail(TaskId::Reduce(3), 1, "x"), Failure::Unknown);
        assert_eq!(t, before);
    }

    // Proves a failure makes the task idle for an immediate retry, a stale failure does not,
    // and the failure limit fails the job.
    #[test]
    fn failures_retry_then_fail_the_job() {
        let mut t = table(1, 1);
        let a1 = map_of(t.assign(W1, 0));
        assert_eq!(
            t.fail(TaskId::Map(0), a1.attempt, "disk full"),
            Failure::Retry
        );
        let a2 = map_of(t.assign(W2, 1));
        assert_eq!(a2.attempt, 2);
        assert_eq!(t.fail(TaskId::Map(0), 1, "late news"), Failure::Stale);
        assert!(matches!(
            t.record(TaskId::Map(0)).unwrap().state,
            TaskState::InProgress { attempt: 2, .. }
        ));
        assert_eq!(
            t.fail(TaskId::Map(0), 2, "disk still full"),
            Failure::JobFailed
        );
        match t.status() {
            JobStatus::Failed {
                task,
                failures,
                last_error,
            } => {
                assert_eq!(task, TaskId::Map(0));
                assert_eq!(failures, 3);
                assert_eq!(last_error, "disk still full");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(t.assign(W1, 2), Assignment::Exit);
    }

    // Proves long failure messages are bounded.
    #[test]
    fn failure_messages_are_truncated() {
        let mut t = table(1, 1);
        let a = map_of(t.assign(W1, 0));
        t.fail(TaskId::Map(0), a.attempt, &"é".repeat(4000));
        let message = t
            .record(TaskId::Map(0))
            .unwrap()
            .last_error
            .clone()
            .unwrap();
        assert!(message.len() <= TASK_ERROR_BYTES_MAX + '…'.len_utf8());
    }

    // Proves recovery resets in-progress tasks, keeps attempt counters, and still accepts an
    // old attempt's completion.
    #[test]
    fn reset_in_progress_keeps_attempt_numbers() {
        let mut t = table(2, 1);
        map_of(t.assign(W1, 0));
        map_of(t.assign(W2, 0));
        t.complete(TaskId::Map(1), 1, TaskStats::default(), 5);
        assert_eq!(t.reset_in_progress(), vec![TaskId::Map(0)]);
        let again = map_of(t.assign(WorkerId(9), 0));
        assert_eq!((again.task, again.attempt), (0, 2));
        assert_eq!(
            t.complete(TaskId::Map(0), 1, TaskStats::default(), 6),
            Completion::Accepted
        );
    }

    // Proves invalid configurations and inconsistent parts are rejected.
    #[test]
    fn invalid_tables_are_rejected() {
        let bad = |config: TableConfig, n: usize| TaskTable::new(config, splits(n)).is_err();
        assert!(bad(
            TableConfig {
                reduce_tasks: 0,
                ..TableConfig::default()
            },
            1
        ));
        assert!(bad(
            TableConfig {
                reduce_tasks: REDUCE_TASKS_MAX + 1,
                ..TableConfig::default()
            },
            1
        ));
        assert!(bad(
            TableConfig {
                task_timeout_ms: 0,
                ..TableConfig::default()
            },
            1
        ));
        assert!(bad(TableConfig::default(), 0));
        let mut parts = table(2, 2).to_parts();
        parts.reduces[0].attempts = 1;
        parts.reduces[0].state = TaskState::InProgress {
            worker: W1,
            attempt: 1,
            started_at_ms: 0,
        };
        assert!(
            TaskTable::from_parts(parts).is_err(),
            "reduce started before maps done"
        );
        let mut parts = table(2, 2).to_parts();
        parts.maps[0].state = TaskState::Done {
            attempt: 1,
            finished_at_ms: 0,
        };
        assert!(
            TaskTable::from_parts(parts).is_err(),
            "attempt never issued"
        );
    }

    // Proves random interleavings of assignments, completions, failures, timeouts and restarts
    // keep the table's invariants, survive serialization, and always finish the job.
    #[test]
    fn random_schedules_keep_invariants() {
        for seed in 0..200u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let maps = rng.random_range(1..6);
            let reduces = rng.random_range(1..5);
            let config = TableConfig {
                reduce_tasks: reduces,
                task_timeout_ms: 100,
                task_failures_max: 1000,
            };
            let mut t = TaskTable::new(config, splits(maps)).unwrap();
            let mut now = 0u64;
            let mut running: Vec<(TaskId, u32)> = Vec::new();
            let mut accepted: Vec<TaskId> = Vec::new();
            let mut steps = 0;
            while t.status() == JobStatus::Running {
                steps += 1;
                assert!(steps < 100_000, "seed {seed}: job never finished");
                now += rng.random_range(0..40);
                match rng.random_range(0..10) {
                    0..=3 => match t.assign(WorkerId(rng.random_range(0..4)), now) {
                        Assignment::Map(m) => {
                            assert!(!accepted.contains(&TaskId::Map(m.task)), "seed {seed}");
                            running.push((TaskId::Map(m.task), m.attempt));
                        }
                        Assignment::Reduce(r) => {
                            assert_eq!(
                                accepted
                                    .iter()
                                    .filter(|t| matches!(t, TaskId::Map(_)))
                                    .count(),
                                maps,
                                "seed {seed}: reduce before maps done"
                            );
                            assert_eq!(r.map_attempts.len(), maps);
                            running.push((TaskId::Reduce(r.task), r.attempt));
                        }
                        Assignment::Wait => assert!(
                            t.next_deadline_ms().is_some_and(|d| d > now),
                            "seed {seed}: wait with nothing pending"
                        ),
                        Assignment::Exit => panic!("seed {seed}: exit while running"),
                    },
                    4..=6 if !running.is_empty() => {
                        let (task, attempt) =
                            running.swap_remove(rng.random_range(0..running.len()));
                        let outcome = t.complete(task, attempt, TaskStats::default(), now);
                        let first = !accepted.contains(&task);
                        assert_eq!(
                            outcome == Completion::Accepted,
                            first,
                            "seed {seed}: {task} {outcome:?}"
                        );
                        if first {
                            accepted.push(task);
                        }
                    }
                    7 if !running.is_empty() => {
                        let (task, attempt) =
                            running.swap_remove(rng.random_range(0..running.len()));
                        t.fail(task, attempt, "injected");
                    }
                    8 => {
                        let bytes = postcard::to_allocvec(&t).unwrap();
                        let back: TaskTable = postcard::from_bytes(&bytes).unwrap();
                        assert_eq!(back, t, "seed {seed}: serde round trip");
                        if rng.random_bool(0.2) {
                            t.reset_in_progress();
                        }
                    }
                    _ => {}
                }
                let p = t.progress();
                assert_eq!(
                    p.maps_done as usize,
                    accepted
                        .iter()
                        .filter(|t| matches!(t, TaskId::Map(_)))
                        .count()
                );
                assert_eq!(
                    p.reduces_done as usize,
                    accepted
                        .iter()
                        .filter(|t| matches!(t, TaskId::Reduce(_)))
                        .count()
                );
            }
            assert_eq!(t.status(), JobStatus::Done, "seed {seed}");
            assert_eq!(accepted.len(), maps + reduces as usize, "seed {seed}");
        }
    }
}

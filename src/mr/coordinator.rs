//! The coordinator driver: the pure [`TaskTable`] behind an RPC server, its state durable in a
//! store.
//!
//! What it owns: the job's table (under a mutex), its durable copy (records in an
//! [`MrStorage`], layout in `job_store.rs`), the clock (tokio's, so tests may pause it) and the
//! answers to workers. It does not run tasks and never reads input or intermediate files; it
//! checks that the output directory is writable, plans the splits and, once the job is done,
//! removes the intermediate and temporary files.
//!
//! Durability (the table's contract): every change the table makes is committed to the store
//! — one commit, while the table's lock is held, so commits happen in the order of the changes
//! — before the coordinator answers the call that caused it: an assignment is durable before
//! the worker hears of it, a completion before it is acknowledged or lets a reduce task start.
//! A failed commit is fatal (fail-stop): the coordinator refuses every call from then on and
//! [`Coordinator::run`] returns the error; restarting re-reads the durable state.
//!
//! Restart: [`Coordinator::open`] on a store that holds a job compares the job's spec (inputs,
//! output directory, R, split size, app flag) and the freshly planned splits with the stored
//! ones — any difference is [`MrError::JobMismatch`] — then calls
//! [`TaskTable::reset_in_progress`] (committing the reset records): tasks that were running
//! are handed out again, and the first completion of any attempt, old or new, is accepted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::error::MrError;
use super::executor::{check_writable, remove_intermediates};
use super::job_store::{self, JobSpec, StoredJob};
use super::map_task::{TEMP_PREFIX, output_file_name};
use super::protocol::{
    APP_NAME_BYTES_MAX, CompleteTask, FailTask, JobDirs, JobOutcome, ReportReply, RequestTask,
    TaskReply,
};
use super::split::plan_splits;
use super::table::{
    Assignment, Completion, Failure, JobStatus, Progress, TableConfig, TaskId, TaskStats,
    TaskTable, TaskTableParts, WorkerId,
};
use crate::net::Endpoint;
use crate::storage::{MrStorage, WriteBatch};

/// Largest value accepted for one field of a worker's [`TaskStats`]; larger values are clamped
/// so sums over all tasks cannot overflow.
pub const TASK_STAT_VALUE_MAX: u64 = 1 << 48;

/// Configuration of a coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// The input files (passed to map as given; workers resolve relative paths in their own
    /// working directory).
    pub inputs: Vec<PathBuf>,
    /// Directory of the outputs `mr-out-<r>`; intermediates go to its `.mr-intermediate`.
    pub output_dir: PathBuf,
    /// Number of reduce tasks, R.
    pub reduce_tasks: u32,
    /// Files larger than this are split into several map tasks at line boundaries.
    pub split_bytes: u64,
    /// The application the job runs; `None` binds the job to the application of the first
    /// worker that asks (durably).
    pub app: Option<String>,
    /// A task in progress this long is handed to the next worker that asks.
    pub task_timeout_ms: u64,
    /// The job fails once one task has reported this many failures.
    pub task_failures_max: u32,
    /// How long a task request is held while nothing can be handed out, before answering
    /// `Wait` (a long poll: a waiting worker hears of new work at once).
    pub wait_long_poll_ms: u64,
    /// After the job is over, how long [`Coordinator::run`] keeps answering workers (so they
    /// hear `Exit`) before it returns, unless every worker it has seen was told already.
    pub exit_linger_ms: u64,
    /// Most distinct workers remembered for the linger rule; past it the coordinator lingers
    /// the whole `exit_linger_ms`.
    pub workers_tracked_max: usize,
    /// Most map tasks a job may have.
    pub map_tasks_max: usize,
}

impl CoordinatorConfig {
    /// Defaults: R = 10, 16 MiB splits, 10 s task timeout, 4 failures per task, 1 s long poll,
    /// 1 s linger, 4096 tracked workers, 100 000 map tasks, application bound by the first
    /// worker.
    pub fn new(inputs: Vec<PathBuf>, output_dir: impl Into<PathBuf>) -> Self {
        CoordinatorConfig {
            inputs,
            output_dir: output_dir.into(),
            reduce_tasks: 10,
            split_bytes: 16 << 20,
            app: None,
            task_timeout_ms: 10_000,
            task_failures_max: 4,
            wait_long_poll_ms: 1000,
            exit_linger_ms: 1000,
            workers_tracked_max: 4096,
            map_tasks_max: 100_000,
        }
    }
}

/// How [`Coordinator::open`] found the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobStart {
    /// A new job was created in the store.
    Created,
    /// The store held this job; it resumes.
    Resumed {
        /// Progress as read back (after resetting in-progress tasks).
        progress: Progress,
        /// Tasks that were in progress and were made idle again.
        reset_tasks: usize,
    },
}

/// What a finished job did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    /// Final counters of the task table (over all runs of the job).
    pub progress: Progress,
    /// Time from [`Coordinator::open`] to the end of [`Coordinator::run`] (this run only).
    pub elapsed: Duration,
    /// The output files `mr-out-0` … `mr-out-<R-1>`.
    pub outputs: Vec<PathBuf>,
}

/// The coordinator of one job. Cheap to clone (clones share the job).
pub struct Coordinator<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Coordinator<S> {
    fn clone(&self) -> Self {
        Coordinator {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    store: S,
    config: CoordinatorConfig,
    dirs: JobDirs,
    output_dir: PathBuf,
    intermediate_dir: PathBuf,
    start: Instant,
    state: Mutex<State>,
    /// Woken after every change of `state`.
    changed: Notify,
    progress: watch::Sender<Progress>,
}

struct State {
    table: TaskTable,
    /// The job's application, once known.
    app: Option<String>,
    /// Set when a commit failed: the coordinator refuses everything from then on.
    fatal: Option<String>,
    /// Workers that asked for a task (up to `workers_tracked_max`).
    workers_seen: BTreeSet<WorkerId>,
    /// Workers told to exit.
    workers_told_exit: BTreeSet<WorkerId>,
    /// More workers asked than `workers_tracked_max`.
    workers_untracked: bool,
}

/// What one assignment attempt under the lock produced.
enum Assigned {
    Reply(TaskReply),
    /// Nothing now; the earliest in-progress deadline (table time), if any.
    Wait(Option<u64>),
}

fn path_string(path: &Path) -> Result<String, MrError> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| MrError::NonUtf8Path(path.to_path_buf()))
}

impl<S: MrStorage + 'static> Coordinator<S> {
    /// Opens the job of `config` in `store`: creates it (one commit) when the store holds no
    /// job, or resumes the stored job after checking it is the same job. Checks the output
    /// directory is writable and plans the splits first, so a missing input or a bad output
    /// directory fails before anything is written. Blocking (file system and store).
    pub fn open(store: S, config: CoordinatorConfig) -> Result<(Self, JobStart), MrError> {
        let table_config = TableConfig {
            reduce_tasks: config.reduce_tasks,
            task_timeout_ms: config.task_timeout_ms,
            task_failures_max: config.task_failures_max,
        };
        if config.split_bytes == 0 {
            return Err(MrError::Config("split_bytes must be positive".into()));
        }
        if config.workers_tracked_max == 0 {
            return Err(MrError::Config(
                "workers_tracked_max must be positive".into(),
            ));
        }
        if let Some(app) = &config.app {
            check_app_name(app)?;
        }
        let splits = plan_splits(&config.inputs, config.split_bytes)?;
        if splits.len() > config.map_tasks_max {
            return Err(MrError::Config(format!(
                "the inputs make {} map tasks, more than map_tasks_max ({}); raise the split size",
                splits.len(),
                config.map_tasks_max
            )));
        }
        let output_dir = &config.output_dir;
        std::fs::create_dir_all(output_dir)
            .map_err(|e| MrError::io("create output directory", output_dir, e))?;
        let output_dir = std::fs::canonicalize(output_dir)
            .map_err(|e| MrError::io("resolve output directory", output_dir, e))?;
        let intermediate_dir = output_dir.join(".mr-intermediate");
        check_writable(&output_dir)?;
        check_writable(&intermediate_dir)?;
        let spec = JobSpec {
            inputs: config
                .inputs
                .iter()
                .map(|p| path_string(p))
                .collect::<Result<_, _>>()?,
            output_dir: path_string(&output_dir)?,
            reduce_tasks: config.reduce_tasks,
            split_bytes: config.split_bytes,
            app: config.app.clone(),
        };

        let (job_id, table, app, start) = match job_store::load(&store)? {
            None => {
                let table = TaskTable::new(table_config, splits.clone())?;
                let job = StoredJob {
                    job_id: rand::random(),
                    spec,
                    splits,
                };
                job_store::create(&store, &job, &table)?;
                tracing::info!(
                    job_id = job.job_id,
                    map_tasks = table.map_tasks(),
                    reduce_tasks = table.reduce_tasks(),
                    "job created"
                );
                (job.job_id, table, config.app.clone(), JobStart::Created)
            }
            Some(loaded) => {
                if let Some(differences) = loaded.job.spec.differences(&spec) {
                    return Err(MrError::JobMismatch { differences });
                }
                if loaded.job.splits != splits {
                    return Err(MrError::JobMismatch {
                        differences: "the input files changed since the job started \
                                      (their splits differ)"
                            .into(),
                    });
                }
                let parts = TaskTableParts {
                    config: table_config,
                    splits: loaded.job.splits,
                    maps: loaded.maps,
                    reduces: loaded.reduces,
                };
                let mut table =
                    TaskTable::from_parts(parts).map_err(|e| MrError::StateCorrupt {
                        record: "task table".into(),
                        reason: e.to_string(),
                    })?;
                let reset = table.reset_in_progress();
                if !reset.is_empty() {
                    let mut batch = WriteBatch::with_capacity(reset.len());
                    for &task in &reset {
                        job_store::put_task(&mut batch, &table, task);
                    }
                    store.commit(batch)?;
                }
                let progress = table.progress();
                tracing::info!(
                    job_id = loaded.job.job_id,
                    ?progress,
                    reset = reset.len(),
                    "job resumed"
                );
                let app = config.app.clone().or(loaded.bound_app);
                (
                    loaded.job.job_id,
                    table,
                    app,
                    JobStart::Resumed {
                        progress,
                        reset_tasks: reset.len(),
                    },
                )
            }
        };
        let dirs = JobDirs {
            job_id,
            output_dir: path_string(&output_dir)?,
            intermediate_dir: path_string(&intermediate_dir)?,
        };
        let (progress, _) = watch::channel(table.progress());
        let inner = Inner {
            store,
            config,
            dirs,
            output_dir,
            intermediate_dir,
            start: Instant::now(),
            state: Mutex::new(State {
                table,
                app,
                fatal: None,
                workers_seen: BTreeSet::new(),
                workers_told_exit: BTreeSet::new(),
                workers_untracked: false,
            }),
            changed: Notify::new(),
            progress,
        };
        Ok((
            Coordinator {
                inner: Arc::new(inner),
            },
            start,
        ))
    }

    /// The job's id and directories (what workers are sent).
    pub fn job(&self) -> &JobDirs {
        &self.inner.dirs
    }

    /// The table's counters now.
    pub fn progress(&self) -> Progress {
        self.inner.lock().table.progress()
    }

    /// A receiver of the table's counters, updated after every durable change.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.inner.progress.subscribe()
    }

    /// Registers the coordinator's handlers ([`RequestTask`], [`CompleteTask`], [`FailTask`])
    /// on `endpoint`.
    pub fn register(&self, endpoint: &Endpoint) -> Result<(), MrError> {
        let me = self.clone();
        endpoint.register(move |_from, request: RequestTask| {
            let me = me.clone();
            async move { me.request_task(request).await }
        })?;
        let me = self.clone();
        endpoint.register(move |_from, report: CompleteTask| {
            let me = me.clone();
            async move { me.complete_task(report).await }
        })?;
        let me = self.clone();
        endpoint.register(move |_from, report: FailTask| {
            let me = me.clone();
            async move { me.fail_task(report).await }
        })?;
        Ok(())
    }

    /// Answers a worker's request: a task (durably assigned first), `Exit` once the job is
    /// over, a refusal for a worker of another application. While nothing can be handed out
    /// the request is held up to `wait_long_poll_ms`, then answered `Wait`.
    pub async fn request_task(&self, request: RequestTask) -> TaskReply {
        if request.app.len() > APP_NAME_BYTES_MAX {
            return TaskReply::Refused {
                reason: format!("application name longer than {APP_NAME_BYTES_MAX} bytes"),
            };
        }
        let long_poll = Duration::from_millis(self.inner.config.wait_long_poll_ms);
        let poll_deadline = Instant::now() + long_poll;
        let request = Arc::new(request);
        loop {
            let mut changed = pin!(self.inner.changed.notified());
            changed.as_mut().enable();
            let inner = self.inner.clone();
            let asked = request.clone();
            let assigned = match tokio::task::spawn_blocking(move || inner.assign(&asked)).await {
                Ok(assigned) => assigned,
                Err(error) => {
                    return TaskReply::Refused {
                        reason: format!("coordinator internal error: {error}"),
                    };
                }
            };
            let next_deadline_ms = match assigned {
                Assigned::Reply(reply) => return reply,
                Assigned::Wait(deadline) => deadline,
            };
            let now = Instant::now();
            if now >= poll_deadline {
                let retry_after_ms = if long_poll.is_zero() { 100 } else { 0 };
                return TaskReply::Wait { retry_after_ms };
            }
            let mut wake = poll_deadline;
            if let Some(deadline_ms) = next_deadline_ms {
                wake = wake.min(self.inner.start + Duration::from_millis(deadline_ms));
            }
            tokio::select! {
                biased;
                () = changed => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Records a completion report (durably, before answering).
    pub async fn complete_task(&self, report: CompleteTask) -> ReportReply {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.complete(report))
            .await
            .unwrap_or_else(|error| ReportReply::Refused {
                reason: format!("coordinator internal error: {error}"),
            })
    }

    /// Records a failure report (durably, before answering).
    pub async fn fail_task(&self, report: FailTask) -> ReportReply {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.fail(report))
            .await
            .unwrap_or_else(|error| ReportReply::Refused {
                reason: format!("coordinator internal error: {error}"),
            })
    }

    /// Waits until the job is over, lingers so that workers hear `Exit`, removes intermediate
    /// and temporary files, and returns the report — once every `mr-out-<r>` is in place.
    /// Errors: [`MrError::JobFailed`] when a task failed too often, the storage error that
    /// stopped the coordinator, or [`MrError::OutputMissing`].
    pub async fn run(&self) -> Result<JobReport, MrError> {
        let inner = &self.inner;
        let outcome = loop {
            let mut changed = pin!(inner.changed.notified());
            changed.as_mut().enable();
            {
                let state = inner.lock();
                if let Some(fatal) = &state.fatal {
                    return Err(MrError::Stopped(fatal.clone()));
                }
                match state.table.status() {
                    JobStatus::Running => {}
                    JobStatus::Done => break JobOutcome::Done,
                    JobStatus::Failed {
                        task,
                        failures,
                        last_error,
                    } => {
                        break JobOutcome::Failed {
                            task,
                            failures,
                            last_error,
                        };
                    }
                }
            }
            changed.await;
        };
        self.linger().await;
        let table = inner.lock().table.clone();
        let (output_dir, intermediate_dir) =
            (inner.output_dir.clone(), inner.intermediate_dir.clone());
        tokio::task::spawn_blocking(move || {
            remove_temp_files(&intermediate_dir);
            remove_intermediates(&table, &intermediate_dir);
            remove_temp_files(&output_dir);
        })
        .await
        .map_err(|e| MrError::Config(format!("cleanup task failed: {e}")))?;
        match outcome {
            JobOutcome::Failed {
                task,
                failures,
                last_error,
            } => Err(MrError::JobFailed {
                task,
                failures,
                last_error,
            }),
            JobOutcome::Done => {
                let progress = inner.lock().table.progress();
                let outputs: Vec<PathBuf> = (0..progress.reduce_tasks)
                    .map(|r| inner.output_dir.join(output_file_name(r)))
                    .collect();
                if let Some(missing) = outputs.iter().find(|p| !p.is_file()) {
                    return Err(MrError::OutputMissing(missing.clone()));
                }
                Ok(JobReport {
                    progress,
                    elapsed: inner.start.elapsed(),
                    outputs,
                })
            }
        }
    }

    /// Keeps answering for up to `exit_linger_ms`, returning early once every worker seen was
    /// told to exit.
    async fn linger(&self) {
        let inner = &self.inner;
        let deadline = Instant::now() + Duration::from_millis(inner.config.exit_linger_ms);
        loop {
            let mut changed = pin!(inner.changed.notified());
            changed.as_mut().enable();
            {
                let state = inner.lock();
                if !state.workers_untracked
                    && state.workers_seen.is_subset(&state.workers_told_exit)
                {
                    return;
                }
            }
            tokio::select! {
                biased;
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

fn check_app_name(app: &str) -> Result<(), MrError> {
    let known = super::apps::APP_NAMES
        .iter()
        .chain(super::test_apps::TEST_APP_NAMES);
    if known.clone().any(|name| *name == app) {
        Ok(())
    } else {
        Err(MrError::UnknownApp {
            name: app.to_string(),
            known: super::apps::APP_NAMES.join(", "),
        })
    }
}

fn clamp_stats(stats: TaskStats) -> TaskStats {
    let clamp = |v: u64| v.min(TASK_STAT_VALUE_MAX);
    TaskStats {
        input_bytes: clamp(stats.input_bytes),
        input_records: clamp(stats.input_records),
        output_bytes: clamp(stats.output_bytes),
        output_records: clamp(stats.output_records),
        spills: clamp(stats.spills),
    }
}

impl<S: MrStorage> Inner<S> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("coordinator state lock poisoned: a handler broke an invariant")
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Commits `batch`; on failure the coordinator stops (fail-stop) and the error is returned
    /// as the reason for refusing.
    fn commit(&self, state: &mut State, batch: WriteBatch) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.store.commit(batch) {
            Ok(()) => {
                self.progress.send_replace(state.table.progress());
                Ok(())
            }
            Err(error) => {
                let reason = format!("cannot persist the job state: {error}");
                tracing::error!(%error, "cannot persist the job state; stopping");
                state.fatal = Some(reason.clone());
                Err(reason)
            }
        }
    }

    fn assign(&self, request: &RequestTask) -> Assigned {
        let mut state = self.lock();
        let reply = self.assign_locked(&mut state, request);
        drop(state);
        if matches!(reply, Assigned::Reply(TaskReply::Exit { .. })) {
            self.changed.notify_waiters();
        }
        reply
    }

    fn assign_locked(&self, state: &mut State, request: &RequestTask) -> Assigned {
        if let Some(fatal) = &state.fatal {
            return Assigned::Reply(TaskReply::Refused {
                reason: format!("coordinator stopped: {fatal}"),
            });
        }
        let mut batch = WriteBatch::new();
        match &state.app {
            Some(app) if *app != request.app => {
                tracing::warn!(worker = request.worker.0, worker_app = %request.app, job_app = %app, "worker of another application refused");
                return Assigned::Reply(TaskReply::Refused {
                    reason: format!(
                        "this job runs application {app:?}, the worker runs {:?}",
                        request.app
                    ),
                });
            }
            Some(_) => {}
            None => job_store::put_app(&mut batch, &request.app),
        }
        if state.workers_seen.len() < self.config.workers_tracked_max
            || state.workers_seen.contains(&request.worker)
        {
            state.workers_seen.insert(request.worker);
        } else {
            state.workers_untracked = true;
        }
        let now = self.now_ms();
        let assignment = state.table.assign(request.worker, now);
        let reply = match assignment {
            Assignment::Map(task) => {
                job_store::put_task(&mut batch, &state.table, TaskId::Map(task.task));
                TaskReply::Map {
                    job: self.dirs.clone(),
                    task,
                }
            }
            Assignment::Reduce(task) => {
                job_store::put_task(&mut batch, &state.table, TaskId::Reduce(task.task));
                TaskReply::Reduce {
                    job: self.dirs.clone(),
                    task,
                }
            }
            Assignment::Exit => {
                state.workers_told_exit.insert(request.worker);
                let outcome = match state.table.status() {
                    JobStatus::Failed {
                        task,
                        failures,
                        last_error,
                    } => JobOutcome::Failed {
                        task,
                        failures,
                        last_error,
                    },
                    _ => JobOutcome::Done,
                };
                TaskReply::Exit { outcome }
            }
            Assignment::Wait => {
                let deadline = state.table.next_deadline_ms();
                if let Err(reason) = self.commit(state, batch) {
                    return Assigned::Reply(TaskReply::Refused {
                        reason: format!("coordinator stopped: {reason}"),
                    });
                }
                if state.app.is_none() {
                    state.app = Some(request.app.clone());
                }
                return Assigned::Wait(deadline);
            }
        };
        // Durable before the worker hears of it.
        if let Err(reason) = self.commit(state, batch) {
            return Assigned::Reply(TaskReply::Refused {
                reason: format!("coordinator stopped: {reason}"),
            });
        }
        if state.app.is_none() {
            state.app = Some(request.app.clone());
        }
        if let TaskReply::Map { task, .. } = &reply {
            tracing::debug!(
                worker = request.worker.0,
                task = task.task,
                attempt = task.attempt,
                "map task assigned"
            );
        }
        if let TaskReply::Reduce { task, .. } = &reply {
            tracing::debug!(
                worker = request.worker.0,
                task = task.task,
                attempt = task.attempt,
                "reduce task assigned"
            );
        }
        Assigned::Reply(reply)
    }

    fn complete(&self, report: CompleteTask) -> ReportReply {
        let mut state = self.lock();
        if let Some(fatal) = &state.fatal {
            return ReportReply::Refused {
                reason: format!("coordinator stopped: {fatal}"),
            };
        }
        if report.job_id != self.dirs.job_id {
            return ReportReply::Ignored {
                reason: format!(
                    "report for job {:#x}; this coordinator runs job {:#x}",
                    report.job_id, self.dirs.job_id
                ),
            };
        }
        let now = self.now_ms();
        let outcome =
            state
                .table
                .complete(report.task, report.attempt, clamp_stats(report.stats), now);
        let reply = match outcome {
            Completion::Accepted => ReportReply::Recorded,
            Completion::Late => ReportReply::Ignored {
                reason: "the task was already done".into(),
            },
            Completion::UnknownTask | Completion::UnknownAttempt => {
                return ReportReply::Ignored {
                    reason: format!("unknown task or attempt: {outcome:?}"),
                };
            }
        };
        let mut batch = WriteBatch::with_capacity(1);
        job_store::put_task(&mut batch, &state.table, report.task);
        // Durable before it is acknowledged or lets a reduce task start.
        if let Err(reason) = self.commit(&mut state, batch) {
            return ReportReply::Refused {
                reason: format!("coordinator stopped: {reason}"),
            };
        }
        if outcome == Completion::Accepted {
            tracing::info!(task = %report.task, attempt = report.attempt, worker = report.worker.0, "task done");
        }
        drop(state);
        self.changed.notify_waiters();
        reply
    }

    fn fail(&self, report: FailTask) -> ReportReply {
        let mut state = self.lock();
        if let Some(fatal) = &state.fatal {
            return ReportReply::Refused {
                reason: format!("coordinator stopped: {fatal}"),
            };
        }
        if report.job_id != self.dirs.job_id {
            return ReportReply::Ignored {
                reason: "report for another job".into(),
            };
        }
        let outcome = state.table.fail(report.task, report.attempt, &report.error);
        if outcome == Failure::Unknown {
            return ReportReply::Ignored {
                reason: "unknown task or attempt".into(),
            };
        }
        tracing::warn!(task = %report.task, attempt = report.attempt, worker = report.worker.0, error = %report.error, ?outcome, "task failed");
        let mut batch = WriteBatch::with_capacity(1);
        job_store::put_task(&mut batch, &state.table, report.task);
        if let Err(reason) = self.commit(&mut state, batch) {
            return ReportReply::Refused {
                reason: format!("coordinator stopped: {reason}"),
            };
        }
        drop(state);
        self.changed.notify_waiters();
        ReportReply::Recorded
    }
}

/// Removes leftover temporary files (`.mr-tmp-*`) of crashed or stale attempts from `dir`.
/// Failures only cost disk space, so they are logged.
fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %e, "cannot remove temporary file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::table::TaskState;
    use crate::storage::{MemDisk, MemStore};

    /// Two small inputs and an output directory in a temporary directory.
    struct Fixture {
        dir: tempfile::TempDir,
        inputs: Vec<PathBuf>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let inputs: Vec<PathBuf> = (0..2)
                .map(|i| {
                    let path = dir.path().join(format!("in-{i}.txt"));
                    std::fs::write(&path, format!("alpha beta {i}\n")).unwrap();
                    path
                })
                .collect();
            Fixture { dir, inputs }
        }

        fn config(&self) -> CoordinatorConfig {
            let mut config =
                CoordinatorConfig::new(self.inputs.clone(), self.dir.path().join("out"));
            config.reduce_tasks = 2;
            config.wait_long_poll_ms = 0;
            config.exit_linger_ms = 0;
            config
        }

        fn open(
            &self,
            disk: &MemDisk,
            config: CoordinatorConfig,
        ) -> Result<(Coordinator<MemStore>, JobStart), MrError> {
            Coordinator::open(MemStore::open(disk).unwrap(), config)
        }
    }

    fn ask(worker: u64, app: &str) -> RequestTask {
        RequestTask {
            worker: WorkerId(worker),
            app: app.into(),
        }
    }

    fn done(job: &JobDirs, task: TaskId, attempt: u32) -> CompleteTask {
        CompleteTask {
            job_id: job.job_id,
            worker: WorkerId(1),
            task,
            attempt,
            stats: TaskStats::default(),
        }
    }

    fn map_of(reply: TaskReply) -> crate::mr::MapTask {
        match reply {
            TaskReply::Map { task, .. } => task,
            other => panic!("expected a map task, got {other:?}"),
        }
    }

    // Proves an assignment is durable when the worker hears of it: a crash right after it
    // finds the attempt, resets it, and never reuses its number; an acknowledged completion
    // survives the crash too.
    #[tokio::test]
    async fn assignments_and_completions_are_durable_before_the_reply() {
        let fixture = Fixture::new();
        let disk = MemDisk::new();
        let (coordinator, start) = fixture.open(&disk, fixture.config()).unwrap();
        assert_eq!(start, JobStart::Created);
        let first = map_of(coordinator.request_task(ask(1, "wc")).await);
        let second = map_of(coordinator.request_task(ask(2, "wc")).await);
        assert_eq!((first.task, first.attempt, second.task), (0, 1, 1));
        let job = coordinator.job().clone();
        assert_eq!(
            coordinator
                .complete_task(done(&job, TaskId::Map(1), 1))
                .await,
            ReportReply::Recorded
        );

        // Crash: the durable image is all a restarted coordinator sees.
        let (restarted, start) = fixture.open(&disk.fork(), fixture.config()).unwrap();
        match start {
            JobStart::Resumed {
                progress,
                reset_tasks,
            } => {
                assert_eq!(reset_tasks, 1, "map 0 was in progress");
                assert_eq!(progress.maps_done, 1, "map 1's completion was acknowledged");
            }
            other => panic!("expected a resumed job, got {other:?}"),
        }
        assert_eq!(restarted.job(), &job, "same job id and directories");
        let again = map_of(restarted.request_task(ask(3, "wc")).await);
        assert_eq!(
            (again.task, again.attempt),
            (0, 2),
            "attempt 1 is never reused"
        );
        // The old attempt's late report is still accepted first.
        assert_eq!(
            restarted.complete_task(done(&job, TaskId::Map(0), 1)).await,
            ReportReply::Recorded
        );
        let record = restarted
            .inner
            .lock()
            .table
            .record(TaskId::Map(0))
            .cloned()
            .unwrap();
        assert!(matches!(record.state, TaskState::Done { attempt: 1, .. }));
    }

    // Proves the first worker binds the application durably and workers of another
    // application are refused, before and after a restart; a named application is enforced
    // from the start.
    #[tokio::test]
    async fn workers_of_another_application_are_refused() {
        let fixture = Fixture::new();
        let disk = MemDisk::new();
        let (coordinator, _) = fixture.open(&disk, fixture.config()).unwrap();
        map_of(coordinator.request_task(ask(1, "indexer")).await);
        let refused = |reply: TaskReply| match reply {
            TaskReply::Refused { reason } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let reason = refused(coordinator.request_task(ask(2, "wc")).await);
        assert!(
            reason.contains("\"indexer\"") && reason.contains("\"wc\""),
            "{reason}"
        );
        let (restarted, _) = fixture.open(&disk.fork(), fixture.config()).unwrap();
        refused(restarted.request_task(ask(2, "wc")).await);
        map_of(restarted.request_task(ask(3, "indexer")).await);

        let named = Fixture::new();
        let mut config = named.config();
        config.app = Some("wc".into());
        let (coordinator, _) = named.open(&MemDisk::new(), config.clone()).unwrap();
        refused(coordinator.request_task(ask(1, "indexer")).await);
        refused(
            coordinator
                .request_task(ask(1, &"x".repeat(APP_NAME_BYTES_MAX + 1)))
                .await,
        );
        config.app = Some("nonsense".into());
        assert!(matches!(
            named.open(&MemDisk::new(), config),
            Err(MrError::UnknownApp { .. })
        ));
    }

    // Proves a restart with another spec, or after the inputs changed, is a clear error that
    // names the difference, and leaves the stored job intact.
    #[tokio::test]
    async fn a_different_job_on_the_same_state_is_refused() {
        let fixture = Fixture::new();
        let disk = MemDisk::new();
        drop(fixture.open(&disk, fixture.config()).unwrap());
        let mismatch = |config: CoordinatorConfig| match fixture.open(&disk, config) {
            Err(MrError::JobMismatch { differences }) => differences,
            Err(other) => panic!("expected JobMismatch, got {other}"),
            Ok(_) => panic!("expected JobMismatch, got a coordinator"),
        };
        let mut config = fixture.config();
        config.reduce_tasks = 3;
        let text = mismatch(config);
        assert!(
            text.contains("reduce tasks 2 (stored) vs 3 (given)"),
            "{text}"
        );
        let mut config = fixture.config();
        config.inputs.reverse();
        assert!(mismatch(config).contains("inputs"));
        let mut config = fixture.config();
        config.app = Some("wc".into());
        assert!(mismatch(config).contains("application"));
        std::fs::write(&fixture.inputs[0], "now a different length\n").unwrap();
        assert!(mismatch(fixture.config()).contains("changed"));
    }

    // Proves reports for another job, unknown tasks and attempts change nothing, and huge
    // statistics are clamped so progress sums cannot overflow.
    #[tokio::test]
    async fn bad_reports_are_ignored_and_stats_clamped() {
        let fixture = Fixture::new();
        let (coordinator, _) = fixture.open(&MemDisk::new(), fixture.config()).unwrap();
        let task = map_of(coordinator.request_task(ask(1, "wc")).await);
        let job = coordinator.job().clone();
        let mut other_job = done(&job, TaskId::Map(task.task), 1);
        other_job.job_id ^= 1;
        for report in [
            other_job,
            done(&job, TaskId::Map(9), 1),
            done(&job, TaskId::Map(task.task), 7),
        ] {
            assert!(matches!(
                coordinator.complete_task(report).await,
                ReportReply::Ignored { .. }
            ));
        }
        assert_eq!(coordinator.progress().maps_done, 0);
        let mut huge = done(&job, TaskId::Map(task.task), 1);
        huge.stats.output_bytes = u64::MAX;
        assert_eq!(coordinator.complete_task(huge).await, ReportReply::Recorded);
        assert_eq!(
            coordinator.progress().intermediate_bytes,
            TASK_STAT_VALUE_MAX
        );
    }

    // Proves a held (long-polled) request is answered as soon as a completion makes work
    // available, and that run() ends once the job is done and every worker was told to exit.
    #[tokio::test]
    async fn long_poll_wakes_on_completion_and_run_ends_after_exit() {
        let fixture = Fixture::new();
        let mut config = fixture.config();
        config.inputs.truncate(1);
        config.reduce_tasks = 1;
        config.wait_long_poll_ms = 60_000;
        config.exit_linger_ms = 60_000;
        let (coordinator, _) = fixture.open(&MemDisk::new(), config).unwrap();
        let job = coordinator.job().clone();
        let map = map_of(coordinator.request_task(ask(1, "wc")).await);
        let waiting = tokio::spawn({
            let coordinator = coordinator.clone();
            async move { coordinator.request_task(ask(2, "wc")).await }
        });
        let runner = tokio::spawn({
            let coordinator = coordinator.clone();
            async move { coordinator.run().await }
        });
        // Map output for the reduce task, written as a worker would.
        let exec = crate::mr::ExecConfig::new(&job.output_dir);
        crate::mr::run_map(&crate::mr::WordCount, &map, &exec).unwrap();
        coordinator
            .complete_task(done(&job, TaskId::Map(0), 1))
            .await;
        let hang_guard = Duration::from_secs(20);
        let reduce = match tokio::time::timeout(hang_guard, waiting)
            .await
            .unwrap()
            .unwrap()
        {
            TaskReply::Reduce { task, .. } => task,
            other => panic!("expected the reduce task, got {other:?}"),
        };
        crate::mr::run_reduce(&crate::mr::WordCount, &reduce, &exec).unwrap();
        coordinator
            .complete_task(done(&job, TaskId::Reduce(0), 1))
            .await;
        for worker in [1, 2] {
            assert!(matches!(
                coordinator.request_task(ask(worker, "wc")).await,
                TaskReply::Exit {
                    outcome: JobOutcome::Done
                }
            ));
        }
        let report = tokio::time::timeout(hang_guard, runner)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            report.outputs,
            vec![PathBuf::from(&job.output_dir).join("mr-out-0")]
        );
        assert_eq!(
            std::fs::read_to_string(&report.outputs[0]).unwrap(),
            "alpha 1\nbeta 1\n"
        );
        assert!(
            !Path::new(&job.intermediate_dir).exists(),
            "intermediates removed"
        );
    }

    // Proves a restarted coordinator of a finished job whose output was deleted reports the
    // missing file instead of claiming success.
    #[tokio::test]
    async fn finished_job_with_a_missing_output_is_an_error() {
        let fixture = Fixture::new();
        let disk = MemDisk::new();
        let mut config = fixture.config();
        config.inputs.truncate(1);
        config.reduce_tasks = 1;
        let (coordinator, _) = fixture.open(&disk, config.clone()).unwrap();
        let job = coordinator.job().clone();
        let exec = crate::mr::ExecConfig::new(&job.output_dir);
        let map = map_of(coordinator.request_task(ask(1, "wc")).await);
        crate::mr::run_map(&crate::mr::WordCount, &map, &exec).unwrap();
        coordinator
            .complete_task(done(&job, TaskId::Map(0), 1))
            .await;
        let TaskReply::Reduce { task, .. } = coordinator.request_task(ask(1, "wc")).await else {
            panic!("expected the reduce task");
        };
        crate::mr::run_reduce(&crate::mr::WordCount, &task, &exec).unwrap();
        coordinator
            .complete_task(done(&job, TaskId::Reduce(0), 1))
            .await;
        coordinator.run().await.unwrap();
        let (restarted, _) = fixture.open(&disk.fork(), config.clone()).unwrap();
        restarted.run().await.unwrap();
        std::fs::remove_file(PathBuf::from(&job.output_dir).join("mr-out-0")).unwrap();
        let (restarted, _) = fixture.open(&disk.fork(), config).unwrap();
        assert!(matches!(
            restarted.run().await,
            Err(MrError::OutputMissing(_))
        ));
    }
}

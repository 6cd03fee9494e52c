//! The in-process executor: a task table and W worker threads in one process.
//!
//! This is the driver of the pure [`TaskTable`] for jobs that run inside one process (tests, and
//! `raftkv mr run`): the clock is an `Instant` taken at the start, workers call [`run_map`] and
//! [`run_reduce`] directly, and a condition variable wakes waiting workers when a task completes
//! or the earliest in-progress task times out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::app::App;
use super::config::ExecConfig;
use super::error::MrError;
use super::map_task::{TEMP_PREFIX, intermediate_file_name, output_file_name, run_map};
use super::reduce_task::run_reduce;
use super::split::plan_splits_balanced;
use super::table::{
    Assignment, Completion, JobStatus, Progress, TableConfig, TaskId, TaskTable, WorkerId,
};

/// Most worker threads one in-process job may run.
pub const WORKERS_MAX: usize = 1024;

/// Configuration of an in-process job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobConfig {
    /// Task table settings: R, the task timeout, the failure limit.
    pub table: TableConfig,
    /// Number of worker threads, W (1..=[`WORKERS_MAX`]).
    pub workers: usize,
    /// Files larger than this are split at line boundaries into map tasks of equal size, at
    /// most this size, as many as a multiple of `workers` (see [`plan_splits_balanced`]).
    pub split_bytes: u64,
    /// Directories and memory budgets of task execution.
    pub exec: ExecConfig,
    /// Keep the intermediate files after a successful job (they are deleted by default).
    pub keep_intermediates: bool,
}

impl JobConfig {
    /// Defaults: R = 10, 10 s task timeout, 2 workers, 16 MiB splits, [`ExecConfig::new`].
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        JobConfig {
            table: TableConfig::default(),
            workers: 2,
            split_bytes: 16 << 20,
            exec: ExecConfig::new(output_dir),
            keep_intermediates: false,
        }
    }
}

/// What a finished job did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSummary {
    /// Final counters of the task table.
    pub progress: Progress,
    /// Wall-clock time of the whole job, planning included.
    pub elapsed: Duration,
    /// The output files `mr-out-0` … `mr-out-<R-1>`.
    pub outputs: Vec<PathBuf>,
}

/// Runs a job with `config.workers` threads all running `app`. See [`run_job_with`].
pub fn run_job(
    app: Arc<dyn App>,
    inputs: &[PathBuf],
    config: &JobConfig,
) -> Result<JobSummary, MrError> {
    let apps = vec![app; config.workers];
    run_job_with(&apps, inputs, config, &|_| {})
}

struct Shared {
    table: Mutex<TaskTable>,
    changed: Condvar,
    start: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TaskTable> {
        self.table
            .lock()
            .expect("task table lock poisoned: a worker broke an invariant")
    }
}

/// Runs a job in this process: plans the map tasks from `inputs`, then runs one worker thread
/// per element of `apps` (worker `i` runs `apps[i]`, so tests can give each worker its own
/// identity; `apps.len()` must equal `config.workers`). `on_progress` is called after every
/// task completion or failure. Returns when every `mr-out-<r>` is in `config.exec.output_dir`,
/// or with [`MrError::JobFailed`] when a task failed `task_failures_max` times (outputs of
/// reduce tasks that finished before may then exist). Intermediate files are deleted either
/// way unless `config.keep_intermediates`.
pub fn run_job_with(
    apps: &[Arc<dyn App>],
    inputs: &[PathBuf],
    config: &JobConfig,
    on_progress: &(dyn Fn(&Progress) + Sync),
) -> Result<JobSummary, MrError> {
    if config.workers == 0 || config.workers > WORKERS_MAX {
        return Err(MrError::Config(format!(
            "workers must be in 1..={WORKERS_MAX}, got {}",
            config.workers
        )));
    }
    if apps.len() != config.workers {
        return Err(MrError::Config(format!(
            "{} applications for {} workers",
            apps.len(),
            config.workers
        )));
    }
    if let Some(other) = apps.iter().find(|app| app.name() != apps[0].name()) {
        return Err(MrError::Config(format!(
            "all workers must run one application, got {:?} and {:?}",
            apps[0].name(),
            other.name()
        )));
    }
    config.exec.validate()?;
    let start = Instant::now();
    let splits = plan_splits_balanced(inputs, config.split_bytes, config.workers)?;
    let table = TaskTable::new(config.table.clone(), splits)?;
    check_writable(&config.exec.output_dir)?;
    check_writable(&config.exec.intermediate_dir)?;
    tracing::info!(
        map_tasks = table.map_tasks(),
        reduce_tasks = table.reduce_tasks(),
        workers = config.workers,
        "job started"
    );
    let shared = Shared {
        table: Mutex::new(table),
        changed: Condvar::new(),
        start,
    };
    std::thread::scope(|scope| {
        for (i, app) in apps.iter().enumerate() {
            let shared = &shared;
            let exec = &config.exec;
            std::thread::Builder::new()
                .name(format!("mr-worker-{i}"))
                .spawn_scoped(scope, move || {
                    worker_loop(WorkerId(i as u64), app.as_ref(), shared, exec, on_progress)
                })
                .map_err(|e| MrError::io("spawn a worker thread for", &exec.output_dir, e))?;
        }
        Ok::<(), MrError>(())
    })?;
    let table = shared.table.into_inner().expect("task table lock poisoned");
    if !config.keep_intermediates {
        remove_intermediates(&table, &config.exec.intermediate_dir);
    }
    match table.status() {
        JobStatus::Done => {}
        JobStatus::Failed {
            task,
            failures,
            last_error,
        } => {
            return Err(MrError::JobFailed {
                task,
                failures,
                last_error,
            });
        }
        JobStatus::Running => panic!("all workers exited while the job is running"),
    }
    let outputs = (0..table.reduce_tasks())
        .map(|r| config.exec.output_dir.join(output_file_name(r)))
        .collect();
    let summary = JobSummary {
        progress: table.progress(),
        elapsed: start.elapsed(),
        outputs,
    };
    tracing::info!(elapsed_ms = summary.elapsed.as_millis() as u64, progress = ?summary.progress, "job done");
    Ok(summary)
}

/// One worker: ask for a task, run it, report, until told to exit.
fn worker_loop(
    worker: WorkerId,
    app: &dyn App,
    shared: &Shared,
    exec: &ExecConfig,
    on_progress: &(dyn Fn(&Progress) + Sync),
) {
    loop {
        let assignment = {
            let mut table = shared.lock();
            loop {
                let now = shared.now_ms();
                match table.assign(worker, now) {
                    Assignment::Wait => {
                        let deadline = table
                            .next_deadline_ms()
                            .expect("the table says wait only while a task is in progress");
                        let wait = Duration::from_millis(deadline.saturating_sub(now).max(1));
                        table = shared
                            .changed
                            .wait_timeout(table, wait)
                            .expect("task table lock poisoned")
                            .0;
                    }
                    other => break other,
                }
            }
        };
        let (task, attempt, result) = match assignment {
            Assignment::Exit => {
                shared.changed.notify_all();
                return;
            }
            Assignment::Wait => unreachable!("handled above"),
            Assignment::Map(map) => (TaskId::Map(map.task), map.attempt, run_map(app, &map, exec)),
            Assignment::Reduce(reduce) => (
                TaskId::Reduce(reduce.task),
                reduce.attempt,
                run_reduce(app, &reduce, exec),
            ),
        };
        let progress = {
            let mut table = shared.lock();
            let now = shared.now_ms();
            match result {
                Ok(stats) => {
                    let outcome = table.complete(task, attempt, stats, now);
                    if outcome != Completion::Accepted {
                        tracing::debug!(%task, attempt, ?outcome, "completion not accepted");
                    }
                }
                Err(error) => {
                    tracing::warn!(%task, attempt, %error, "task failed");
                    table.fail(task, attempt, &error.to_string());
                }
            }
            table.progress()
        };
        shared.changed.notify_all();
        on_progress(&progress);
    }
}

/// Fails early, with the directory's name, if files cannot be created in `dir`.
pub(crate) fn check_writable(dir: &Path) -> Result<(), MrError> {
    std::fs::create_dir_all(dir).map_err(|e| MrError::io("create directory", dir, e))?;
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| MrError::io("create files in", dir, e))?;
    Ok(())
}

/// Deletes every intermediate file any attempt of this job may have written, then the
/// directory if it is empty. Failures only cost disk space, so they are logged, not returned.
pub(crate) fn remove_intermediates(table: &TaskTable, dir: &Path) {
    for map in 0..table.map_tasks() {
        let attempts = table
            .record(TaskId::Map(map))
            .map_or(0, |record| record.attempts);
        for attempt in 1..=attempts {
            let path = dir.join(intermediate_file_name(map, attempt));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), %e, "cannot remove intermediate file")
                }
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

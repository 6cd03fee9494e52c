//! The worker driver: asks the coordinator for tasks over RPC, runs them, reports.
//!
//! What it owns: the loop and its retries. Tasks run with [`run_map`] / [`run_reduce`] on a
//! blocking thread, in the directories the coordinator sends with each task and with this
//! worker's own memory budgets ([`WorkerConfig::exec`]). A task's files are renamed into place
//! (and fsynced when `exec.sync_files`) before the completion is reported.
//!
//! The coordinator is "gone" when no call gets through for `coordinator_gone_ms` (calls are
//! retried with exponential backoff meanwhile, so a coordinator restart shorter than that is
//! survived). A worker that had reached the coordinator then ends with
//! [`WorkerExit::CoordinatorGone`] (the lab's rule: the coordinator exits when the job is done);
//! one that never reached it fails with [`MrError::CoordinatorUnreachable`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::app::App;
use super::config::ExecConfig;
use super::error::MrError;
use super::map_task::run_map;
use super::protocol::{
    CompleteTask, FailTask, JobDirs, JobOutcome, ReportReply, RequestTask, TaskReply,
};
use super::reduce_task::run_reduce;
use super::table::{TaskId, TaskStats, WorkerId};
use crate::NodeId;
use crate::net::{Endpoint, NetError, RemoteFault, Rpc};

/// Configuration of a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// This worker's id (unique among the job's workers; random per process).
    pub worker: WorkerId,
    /// The coordinator's node id on the endpoint's network.
    pub coordinator: NodeId,
    /// Memory budgets and file syncing for tasks; the directories are replaced by the job's.
    pub exec: ExecConfig,
    /// Timeout of one call; must exceed the coordinator's long poll.
    pub call_timeout_ms: u64,
    /// No call getting through for this long means the coordinator is gone.
    pub coordinator_gone_ms: u64,
    /// First pause before retrying a failed call (doubles up to `retry_backoff_ms_max`).
    pub retry_backoff_ms_min: u64,
    /// Longest pause between retries.
    pub retry_backoff_ms_max: u64,
    /// Longest pause the coordinator may ask for with `Wait`.
    pub wait_ms_max: u64,
}

impl WorkerConfig {
    /// Defaults: 10 s call timeout, gone after 10 s without a reply, backoff 50 ms to 1 s,
    /// waits of at most 1 s, [`ExecConfig::new`] budgets.
    pub fn new(worker: WorkerId, coordinator: NodeId) -> Self {
        WorkerConfig {
            worker,
            coordinator,
            exec: ExecConfig::new("."),
            call_timeout_ms: 10_000,
            coordinator_gone_ms: 10_000,
            retry_backoff_ms_min: 50,
            retry_backoff_ms_max: 1000,
            wait_ms_max: 1000,
        }
    }

    fn validate(&self) -> Result<(), MrError> {
        if self.call_timeout_ms == 0 {
            return Err(MrError::Config("call_timeout_ms must be positive".into()));
        }
        if self.retry_backoff_ms_min == 0 || self.retry_backoff_ms_min > self.retry_backoff_ms_max {
            return Err(MrError::Config(
                "need 0 < retry_backoff_ms_min <= retry_backoff_ms_max".into(),
            ));
        }
        self.exec.validate()
    }
}

/// Why a worker stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerExit {
    /// The coordinator said the job is done.
    JobDone,
    /// The coordinator stopped answering after having answered before.
    CoordinatorGone,
}

/// What a worker did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Tasks run to completion and reported.
    pub tasks_completed: u64,
    /// Tasks that failed and were reported.
    pub tasks_failed: u64,
    /// Why it stopped.
    pub exit: WorkerExit,
}

/// Runs the worker loop of `app` against the coordinator at `config.coordinator` until the
/// job is done or the coordinator is gone.
///
/// Errors: [`MrError::Refused`] (the job runs another application, or the coordinator
/// stopped), [`MrError::JobFailed`] (the coordinator abandoned the job),
/// [`MrError::CoordinatorUnreachable`], [`MrError::Net`] for a peer that is not a coordinator of
/// this protocol version, [`MrError::Config`].
pub async fn run_worker(
    endpoint: &Endpoint,
    app: Arc<dyn App>,
    config: &WorkerConfig,
) -> Result<WorkerSummary, MrError> {
    config.validate()?;
    let mut caller = Caller {
        endpoint,
        config,
        reached: false,
    };
    let mut summary = WorkerSummary {
        tasks_completed: 0,
        tasks_failed: 0,
        exit: WorkerExit::JobDone,
    };
    let request = RequestTask {
        worker: config.worker,
        app: app.name().to_string(),
    };
    loop {
        let Some(reply) = caller.call(&request).await? else {
            summary.exit = WorkerExit::CoordinatorGone;
            return Ok(summary);
        };
        let (job, task, attempt, result) = match reply {
            TaskReply::Map { job, task } => {
                let exec = exec_for(&config.exec, &job);
                let (id, attempt) = (TaskId::Map(task.task), task.attempt);
                let app = app.clone();
                tracing::debug!(task = %id, attempt, "running");
                let result =
                    tokio::task::spawn_blocking(move || run_map(app.as_ref(), &task, &exec)).await;
                (job, id, attempt, result)
            }
            TaskReply::Reduce { job, task } => {
                let exec = exec_for(&config.exec, &job);
                let (id, attempt) = (TaskId::Reduce(task.task), task.attempt);
                let app = app.clone();
                tracing::debug!(task = %id, attempt, "running");
                let result =
                    tokio::task::spawn_blocking(move || run_reduce(app.as_ref(), &task, &exec))
                        .await;
                (job, id, attempt, result)
            }
            TaskReply::Wait { retry_after_ms } => {
                tokio::time::sleep(Duration::from_millis(
                    retry_after_ms.min(config.wait_ms_max),
                ))
                .await;
                continue;
            }
            TaskReply::Exit {
                outcome: JobOutcome::Done,
            } => {
                summary.exit = WorkerExit::JobDone;
                return Ok(summary);
            }
            TaskReply::Exit {
                outcome:
                    JobOutcome::Failed {
                        task,
                        failures,
                        last_error,
                    },
            } => {
                return Err(MrError::JobFailed {
                    task,
                    failures,
                    last_error,
                });
            }
            TaskReply::Refused { reason } => return Err(MrError::Refused { reason }),
        };
        let result: Result<TaskStats, String> = match result {
            Ok(Ok(stats)) => Ok(stats),
            Ok(Err(error)) => Err(error.to_string()),
            Err(join) => Err(format!("task thread failed: {join}")),
        };
        let reply = match result {
            Ok(stats) => {
                summary.tasks_completed += 1;
                let report = CompleteTask {
                    job_id: job.job_id,
                    worker: config.worker,
                    task,
                    attempt,
                    stats,
                };
                caller.call(&report).await?
            }
            Err(error) => {
                summary.tasks_failed += 1;
                tracing::warn!(%task, attempt, %error, "task failed");
                let report = FailTask {
                    job_id: job.job_id,
                    worker: config.worker,
                    task,
                    attempt,
                    error: super::table::truncate_message(&error),
                };
                caller.call(&report).await?
            }
        };
        match reply {
            None => {
                summary.exit = WorkerExit::CoordinatorGone;
                return Ok(summary);
            }
            Some(ReportReply::Recorded) => {}
            Some(ReportReply::Ignored { reason }) => {
                tracing::debug!(%task, attempt, %reason, "report ignored");
            }
            Some(ReportReply::Refused { reason }) => return Err(MrError::Refused { reason }),
        }
    }
}

/// The worker's execution settings with the job's directories.
fn exec_for(exec: &ExecConfig, job: &JobDirs) -> ExecConfig {
    ExecConfig {
        output_dir: PathBuf::from(&job.output_dir),
        intermediate_dir: PathBuf::from(&job.intermediate_dir),
        ..exec.clone()
    }
}

/// Calls the coordinator with retries.
struct Caller<'a> {
    endpoint: &'a Endpoint,
    config: &'a WorkerConfig,
    /// Whether any call got a reply.
    reached: bool,
}

impl Caller<'_> {
    /// Calls until a reply arrives (`Some`) or the coordinator is gone (`None`, or
    /// [`MrError::CoordinatorUnreachable`] if it never answered). Safe because every request
    /// of the protocol may be repeated.
    async fn call<R: Rpc + Clone>(&mut self, request: &R) -> Result<Option<R::Reply>, MrError> {
        let config = self.config;
        let started = Instant::now();
        let gone = Duration::from_millis(config.coordinator_gone_ms);
        let mut backoff = Duration::from_millis(config.retry_backoff_ms_min);
        let timeout = Duration::from_millis(config.call_timeout_ms);
        loop {
            let error = match self
                .endpoint
                .call_timeout(config.coordinator, request, timeout)
                .await
            {
                Ok(reply) => {
                    self.reached = true;
                    return Ok(Some(reply));
                }
                Err(error) => error,
            };
            match &error {
                NetError::NoReply { .. }
                | NetError::Unreachable(_)
                | NetError::QueueFull(_)
                | NetError::Refused {
                    fault: RemoteFault::ShuttingDown,
                    ..
                } => {}
                _ => return Err(MrError::Net(error)),
            }
            let waited = started.elapsed();
            if waited >= gone {
                if self.reached {
                    tracing::info!(%error, "the coordinator is gone");
                    return Ok(None);
                }
                return Err(MrError::CoordinatorUnreachable {
                    node: config.coordinator,
                    waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    last_error: error.to_string(),
                });
            }
            tracing::debug!(%error, ?backoff, "call to the coordinator failed; retrying");
            tokio::time::sleep(backoff.min(gone - waited)).await;
            backoff = (backoff * 2).min(Duration::from_millis(config.retry_backoff_ms_max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::protocol::COORDINATOR_NODE_ID;
    use crate::mr::{Coordinator, CoordinatorConfig, WordCount};
    use crate::net::sim::{SimConfig, SimNetwork};
    use crate::storage::{MemDisk, MemStore};

    fn inputs(dir: &std::path::Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let path = dir.join(format!("in-{i}.txt"));
                std::fs::write(&path, format!("apple banana {}\n", "apple ".repeat(i))).unwrap();
                path
            })
            .collect()
    }

    fn worker_config(id: u64) -> WorkerConfig {
        let mut config = WorkerConfig::new(WorkerId(id), COORDINATOR_NODE_ID);
        config.exec.sync_files = false;
        config.call_timeout_ms = 2000;
        config.coordinator_gone_ms = 500;
        config
    }

    // Proves two workers and a coordinator over the simulated network finish a job: each
    // worker hears that the job is done, every task completed exactly once, the output is
    // right.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_finish_a_job_over_the_simulated_network() {
        let dir = tempfile::tempdir().unwrap();
        let network = SimNetwork::new(SimConfig::new(1));
        let server = network.add_node(COORDINATOR_NODE_ID).unwrap();
        let mut config = CoordinatorConfig::new(inputs(dir.path(), 3), dir.path().join("out"));
        config.reduce_tasks = 2;
        let store = MemStore::open(&MemDisk::new()).unwrap();
        let (coordinator, _) = Coordinator::open(store, config).unwrap();
        coordinator.register(&server).unwrap();
        let running = tokio::spawn({
            let coordinator = coordinator.clone();
            async move { coordinator.run().await }
        });
        let workers: Vec<_> = (1..=2)
            .map(|id| {
                let endpoint = network.add_client();
                tokio::spawn(async move {
                    run_worker(&endpoint, Arc::new(WordCount), &worker_config(id)).await
                })
            })
            .collect();
        let mut completed = 0;
        for worker in workers {
            let summary = worker.await.unwrap().unwrap();
            assert_eq!(summary.exit, WorkerExit::JobDone);
            assert_eq!(summary.tasks_failed, 0);
            completed += summary.tasks_completed;
        }
        assert_eq!(completed, 3 + 2, "each task ran once");
        let report = running.await.unwrap().unwrap();
        let mut lines: Vec<String> = report
            .outputs
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        lines.sort();
        assert_eq!(lines, ["apple 6", "banana 3"]);
    }

    // Proves a worker that had reached the coordinator ends with CoordinatorGone (not an
    // error) once the coordinator stops answering, and one that never reached it fails with
    // CoordinatorUnreachable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coordinator_gone_versus_never_reached() {
        let dir = tempfile::tempdir().unwrap();
        let network = SimNetwork::new(SimConfig::new(2));
        let server = network.add_node(COORDINATOR_NODE_ID).unwrap();
        let mut config = CoordinatorConfig::new(inputs(dir.path(), 2), dir.path().join("out"));
        config.wait_long_poll_ms = 50;
        let store = MemStore::open(&MemDisk::new()).unwrap();
        let (coordinator, _) = Coordinator::open(store, config).unwrap();
        coordinator.register(&server).unwrap();
        // Another worker holds map 0 and never finishes it, so the job cannot end.
        let held = coordinator
            .request_task(RequestTask {
                worker: WorkerId(99),
                app: "wc".into(),
            })
            .await;
        assert!(matches!(held, TaskReply::Map { .. }), "{held:?}");
        let mut progress = coordinator.subscribe();
        let endpoint = network.add_client();
        let worker = tokio::spawn(async move {
            run_worker(&endpoint, Arc::new(WordCount), &worker_config(1)).await
        });
        // Once the worker's map 1 is done it only waits; then the coordinator dies.
        progress.wait_for(|p| p.maps_done == 1).await.unwrap();
        network.crash(COORDINATOR_NODE_ID);
        let summary = worker.await.unwrap().unwrap();
        assert_eq!(summary.exit, WorkerExit::CoordinatorGone);
        assert_eq!(summary.tasks_completed, 1);

        let endpoint = network.add_client();
        match run_worker(&endpoint, Arc::new(WordCount), &worker_config(2)).await {
            Err(MrError::CoordinatorUnreachable { node, .. }) => {
                assert_eq!(node, COORDINATOR_NODE_ID)
            }
            other => panic!("expected CoordinatorUnreachable, got {other:?}"),
        }
    }
}

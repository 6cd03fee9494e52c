//! The driver task: the one place where a Raft core meets storage, the
//! network and the clock. See the [module docs](super) for the loop and its
//! guarantees.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, trace, warn};

/// A storage commit at least this long is logged and counted
/// ([`Metrics::slow_commits`]).
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

use super::config::NodeConfig;
use super::error::NodeError;
use super::types::{Apply, CommittedEntry, Metrics, RaftEnvelope, Status, StopReason};
use crate::NodeId;
use crate::net::{Endpoint, Inbox};
use crate::raft::{
    Entry, EntryKind, MessageBody, PersistToken, ProposeError, RaftCore, ReadState, Ready,
    SnapshotError, TransferError,
};
use crate::storage::{GroupId, RaftLogStorage, StorageError, WriteBatch};

/// A proposal waiting for the driver.
pub(super) struct Proposal {
    pub(super) data: Bytes,
    pub(super) reply: oneshot::Sender<Result<(u64, u64), ProposeError>>,
}

/// A control request waiting for the driver.
pub(super) enum Control {
    ReadIndex {
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Snapshot {
        index: u64,
        data: Bytes,
        reply: oneshot::Sender<Result<(), SnapshotError>>,
    },
    TransferLeader {
        to: NodeId,
        reply: oneshot::Sender<Result<(), TransferError>>,
    },
}

/// The node's status, published by the driver and read by the handles.
pub(super) type Shared = watch::Sender<Status>;

/// The receiving ends the driver owns.
pub(super) struct Inputs {
    pub(super) inbox: Inbox<RaftEnvelope>,
    pub(super) proposals: mpsc::Receiver<Proposal>,
    pub(super) control: mpsc::Receiver<Control>,
    pub(super) stop: watch::Receiver<bool>,
}

/// Marks the status as stopped when the task ends, including by a panic.
struct StopGuard {
    shared: Arc<Shared>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.shared.send_if_modified(|status| {
            if status.stopped.is_none() {
                status.stopped = Some(StopReason::Panicked);
                true
            } else {
                false
            }
        });
    }
}

/// Builds the write batch for a Ready's persistence step, in the order the
/// contract gives (snapshot, truncation, entries, hard state), taking the
/// entries out of `ready`. `entry` reads the core's log, for the defensive
/// case of a truncation nothing else in the batch covers. Returns the batch
/// and the number of entries it appends.
pub(super) fn persist_batch(
    group: GroupId,
    ready: &mut Ready,
    entry: impl FnOnce(u64) -> Option<Entry>,
) -> (WriteBatch, u64) {
    let mut batch = WriteBatch::with_capacity(4);
    if let Some(snapshot) = &ready.snapshot {
        // Keeps the stored entries after the snapshot when the stored log
        // has the snapshot's last entry with its term, otherwise drops the
        // whole log (Figure 13, rules 6 and 7), as the core did.
        batch.install_snapshot(group, snapshot.meta, snapshot.data.clone());
    }
    if let Some(from) = ready.log_truncate_from {
        // The stored suffix from `from` is stale. An append starting at or
        // before it replaces it. A snapshot reaching `from - 1` or beyond
        // drops it: the stored entry at the snapshot's index is either gone
        // (the truncation point is at or below it) and so cannot match the
        // snapshot's term (log matching), or the log is discarded (rule 7).
        let by_append = ready.entries.first().is_some_and(|e| e.index <= from);
        let by_snapshot = ready
            .snapshot
            .as_ref()
            .is_some_and(|s| s.meta.last_included_index + 1 >= from);
        if !by_append && !by_snapshot {
            // Not produced by the core today; kept so that any Ready is
            // persisted exactly: re-appending the entry before the stale
            // suffix deletes every stored entry after it.
            let previous = entry(from - 1).unwrap_or_else(|| {
                panic!("truncation from {from} with no entry before it and no snapshot covering it")
            });
            batch.append(group, vec![previous]);
        }
    }
    let entries = std::mem::take(&mut ready.entries);
    let count = entries.len() as u64;
    if !entries.is_empty() {
        batch.append(group, entries);
    }
    if let Some(hard_state) = ready.hard_state {
        batch.set_hard_state(group, hard_state);
    }
    (batch, count)
}

/// What woke the driver up.
enum Input {
    Stop(StopReason),
    Control(Control),
    Tick,
    Delivered,
    ApplyClosed,
    Message(NodeId, RaftEnvelope),
    Proposal(Proposal),
    Flushed(Option<Flushed>),
    CommitDeferred,
}

/// Outcome of waiting for the next input.
enum Event {
    Stop(StopReason),
    Continue,
}

/// After a commit: the stored log must end where the committed Ready's log
/// ended (a broken storage invariant otherwise: panic).
fn check_stored_last<S: RaftLogStorage + ?Sized>(
    storage: &S,
    group: GroupId,
    id: NodeId,
    expected_last: u64,
) -> Result<(), StorageError> {
    let stored_last = storage.last_index(group)?;
    assert_eq!(
        stored_last, expected_last,
        "node {id}: the stored log does not end where the committed Ready's log ended"
    );
    Ok(())
}

/// A `Ready`'s write batch handed to the node's storage thread, with the
/// index the stored log must end at once it is committed.
struct FlushJob {
    batch: WriteBatch,
    expected_last: u64,
}

/// The storage thread's answer for `jobs` consecutive jobs committed
/// together (one commit, one flush).
struct Flushed {
    jobs: usize,
    result: Result<(), StorageError>,
}

/// Jobs one commit takes together at most, and the payload bytes after
/// which it takes no more.
const MERGE_JOBS_MAX: usize = 64;
const MERGE_BYTES_MAX: u64 = 4 << 20;

/// The node's storage thread (`NodeConfig::storage_thread`): commits the
/// batches it is sent in order, every batch queued at that moment in one
/// commit (group commit across `Ready`s), and answers each in order.
struct StorageThread {
    jobs: Option<std::sync::mpsc::Sender<FlushJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StorageThread {
    fn start<S: RaftLogStorage + 'static>(
        storage: Arc<S>,
        id: NodeId,
        group: GroupId,
        flushed: mpsc::UnboundedSender<Flushed>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<FlushJob>();
        let thread = std::thread::Builder::new()
            .name(format!("raft-storage-{id}"))
            .spawn(move || {
                let mut held: Option<FlushJob> = None;
                loop {
                    let first = match held.take() {
                        Some(job) => job,
                        None => match queue.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        },
                    };
                    let mut expected_last = first.expected_last;
                    let mut bytes = first.batch.payload_bytes();
                    let mut merged = vec![first];
                    while merged.len() < MERGE_JOBS_MAX {
                        let Ok(next) = queue.try_recv() else { break };
                        let next_bytes = next.batch.payload_bytes();
                        if bytes + next_bytes > MERGE_BYTES_MAX {
                            // Next time: a merge never grows past the bound.
                            held = Some(next);
                            break;
                        }
                        bytes += next_bytes;
                        expected_last = next.expected_last;
                        merged.push(next);
                    }
                    let jobs = merged.len();
                    let result = if jobs == 1 {
                        let job = merged.pop().expect("one job");
                        storage.commit(job.batch)
                    } else {
                        let mut batch = WriteBatch::new();
                        for job in &merged {
                            batch.extend(job.batch.clone());
                        }
                        match storage.commit(batch) {
                            Ok(()) => Ok(()),
                            // Refused as a whole (a limit of the store, say):
                            // one by one, up to the first that fails.
                            Err(_) => merged
                                .into_iter()
                                .try_for_each(|job| storage.commit(job.batch)),
                        }
                    };
                    let result = result
                        .and_then(|()| check_stored_last(&*storage, group, id, expected_last));
                    let failed = result.is_err();
                    // The driver is gone (stopping): nobody to tell.
                    let _ = flushed.send(Flushed { jobs, result });
                    if failed {
                        // Fail-stop: nothing queued behind a failed commit may
                        // reach the disk (it may build on what failed).
                        return;
                    }
                }
            })?;
        Ok(StorageThread {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }
}

/// A `Ready` handed to the storage thread and not yet durable.
struct InFlight {
    /// From `advance_unpersisted`; `None` only until the Ready is advanced.
    token: Option<PersistToken>,
    /// Messages that may leave only once the Ready is durable.
    messages: Vec<crate::raft::Message>,
    installs_snapshot: bool,
    /// Whether a job went to the storage thread for this Ready (a Ready with
    /// nothing to write waits for the jobs before it).
    job: bool,
    started: std::time::Instant,
}

/// The next answer of the storage thread (`None`: it died). Never completes
/// without a storage thread.
async fn recv_flushed(flushed: &mut Option<mpsc::UnboundedReceiver<Flushed>>) -> Option<Flushed> {
    match flushed {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// `Ready`s in flight at most; then the driver waits for the disk.
const IN_FLIGHT_MAX: usize = 256;

impl Drop for StorageThread {
    fn drop(&mut self) {
        // Waits for the jobs already queued (after a failed commit, for none:
        // the thread has ended), so the storage handle is released only
        // after them. A panic of the thread is not raised here; it is when
        // the driver finds the thread gone while waiting for an answer.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One node's driver: owns its core, its storage handle, its endpoint and
/// the sending end of the apply channel.
pub(super) struct Driver<S> {
    core: RaftCore,
    storage: Arc<S>,
    /// Commits go to this thread when `NodeConfig::storage_thread` is set;
    /// the driver then goes on while they run (asynchronous persistence).
    storage_thread: Option<StorageThread>,
    /// The storage thread's answers.
    flushed: Option<mpsc::UnboundedReceiver<Flushed>>,
    /// Readies whose persistence runs on the storage thread, oldest first.
    in_flight: VecDeque<InFlight>,
    /// `NodeConfig::async_persistence` without a storage thread: where the
    /// driver answers its own inline commits.
    answers_to_self: Option<mpsc::UnboundedSender<Flushed>>,
    /// Its jobs not yet committed (lost if the node stops first, like the
    /// unflushed writes of a crash).
    deferred: VecDeque<FlushJob>,
    group: GroupId,
    config: NodeConfig,
    endpoint: Endpoint,
    apply: mpsc::Sender<Apply>,
    /// Apply items taken from Readies and not yet in the channel.
    to_apply: VecDeque<Apply>,
    apply_receiver_gone: bool,
    /// Read-index requests handed to the core, by context.
    reads: BTreeMap<u64, oneshot::Sender<Result<u64, NodeError>>>,
    next_read_context: u64,
    shared: Arc<Shared>,
    metrics: Metrics,
    /// Commits run under `block_in_place` (multi-thread runtime and configured so).
    block_in_place: bool,
}

impl<S: RaftLogStorage + 'static> Driver<S> {
    pub(super) fn new(
        core: RaftCore,
        storage: S,
        config: NodeConfig,
        endpoint: Endpoint,
        apply: mpsc::Sender<Apply>,
        shared: Arc<Shared>,
    ) -> Self {
        let multi_thread = matches!(
            tokio::runtime::Handle::current().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );
        let storage = Arc::new(storage);
        let (storage_thread, mut flushed) = if config.storage_thread {
            let (sender, receiver) = mpsc::unbounded_channel();
            match StorageThread::start(storage.clone(), core.id(), config.group, sender) {
                Ok(thread) => (Some(thread), Some(receiver)),
                Err(error) => {
                    warn!(id = core.id(), %error, "cannot start the storage thread; committing inline");
                    (None, None)
                }
            }
        } else {
            (None, None)
        };
        let answers_to_self = if storage_thread.is_none() && config.async_persistence {
            let (sender, receiver) = mpsc::unbounded_channel();
            flushed = Some(receiver);
            Some(sender)
        } else {
            None
        };
        Driver {
            core,
            storage,
            storage_thread,
            flushed,
            in_flight: VecDeque::new(),
            answers_to_self,
            deferred: VecDeque::new(),
            group: config.group,
            block_in_place: multi_thread && config.block_in_place_for_storage,
            config,
            endpoint,
            apply,
            to_apply: VecDeque::new(),
            apply_receiver_gone: false,
            reads: BTreeMap::new(),
            next_read_context: 0,
            shared,
            metrics: Metrics::default(),
        }
    }

    /// Runs until stopped. The storage handle is dropped when this returns,
    /// so once the task has finished this node writes nothing more.
    pub(super) async fn run(mut self, mut inputs: Inputs) {
        let _guard = StopGuard {
            shared: self.shared.clone(),
        };
        let reason = self.run_loop(&mut inputs).await;
        match &reason {
            StopReason::StorageFailed(message) => {
                error!(id = self.core.id(), group = self.group, %message, "raft node stopped: storage failed");
            }
            reason => debug!(
                id = self.core.id(),
                group = self.group,
                ?reason,
                "raft node stopped"
            ),
        }
        self.publish_status(Some(reason));
    }

    async fn run_loop(&mut self, inputs: &mut Inputs) -> StopReason {
        let period = Duration::from_millis(self.config.tick_interval_ms);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first Ready (e.g. a snapshot to hand to the service after a restart).
        if let Err(error) = self.handle_readies().await {
            return StopReason::StorageFailed(error.to_string());
        }
        self.publish_status(None);
        loop {
            self.offer_applies();
            let paused = !self.to_apply.is_empty();
            match self.wait(inputs, &mut ticker, paused).await {
                Event::Stop(reason) => return reason,
                Event::Continue => {}
            }
            // Group commit: everything already queued goes into the same Ready.
            if let Err(error) = self.drain(inputs, paused) {
                return StopReason::StorageFailed(error.to_string());
            }
            if let Err(error) = self.handle_readies().await {
                return StopReason::StorageFailed(error.to_string());
            }
            self.publish_status(None);
        }
    }

    /// Waits for one input and feeds it to the core. `biased` keeps the
    /// order deterministic (no random branch choice) and puts ticks before
    /// the message and proposal floods so time never starves.
    async fn wait(
        &mut self,
        inputs: &mut Inputs,
        ticker: &mut tokio::time::Interval,
        paused: bool,
    ) -> Event {
        let can_deliver = paused && !self.apply_receiver_gone;
        // The disk is this far behind: take no new work until it catches up.
        let paused = paused || self.in_flight.len() >= IN_FLIGHT_MAX;
        let awaiting_disk = !self.in_flight.is_empty();
        let input = tokio::select! {
            biased;
            changed = inputs.stop.changed() => {
                // A dropped sender means every handle is gone.
                Input::Stop(match changed {
                    Ok(()) => StopReason::Shutdown,
                    Err(_) => StopReason::HandlesDropped,
                })
            }
            control = inputs.control.recv() => match control {
                Some(control) => Input::Control(control),
                None => Input::Stop(StopReason::HandlesDropped),
            },
            flushed = recv_flushed(&mut self.flushed), if awaiting_disk => Input::Flushed(flushed),
            _ = ticker.tick(), if !paused => Input::Tick,
            () = std::future::ready(()), if !self.deferred.is_empty() => Input::CommitDeferred,
            permit = self.apply.reserve(), if can_deliver => match permit {
                Ok(permit) => {
                    let item = self.to_apply.pop_front().expect("paused with an empty apply queue");
                    permit.send(item);
                    Input::Delivered
                }
                Err(_) => Input::ApplyClosed,
            },
            message = inputs.inbox.recv(), if !paused => match message {
                Some((from, envelope)) => Input::Message(from, envelope),
                None => Input::Stop(StopReason::TransportClosed),
            },
            proposal = inputs.proposals.recv(), if !paused => match proposal {
                Some(proposal) => Input::Proposal(proposal),
                None => Input::Stop(StopReason::HandlesDropped),
            },
        };
        match input {
            Input::Stop(reason) => return Event::Stop(reason),
            Input::Control(control) => self.on_control(control),
            Input::Tick => {
                self.metrics.ticks += 1;
                self.core.tick();
            }
            Input::Delivered => {}
            Input::ApplyClosed => self.apply_receiver_dropped(),
            Input::Message(from, envelope) => self.on_message(from, envelope),
            Input::Proposal(proposal) => self.on_proposal(proposal),
            Input::Flushed(flushed) => {
                if let Err(error) = self.on_flushed(flushed) {
                    return Event::Stop(StopReason::StorageFailed(error.to_string()));
                }
            }
            Input::CommitDeferred => {
                if let Err(error) = self.commit_deferred().await {
                    return Event::Stop(StopReason::StorageFailed(error.to_string()));
                }
            }
        }
        Event::Continue
    }

    /// `NodeConfig::async_persistence` without a thread: commits the jobs
    /// waiting since earlier turns, in order, and answers each like the
    /// storage thread.
    async fn commit_deferred(&mut self) -> Result<(), StorageError> {
        while let Some(job) = self.deferred.pop_front() {
            self.commit(job.batch).await?;
            check_stored_last(
                &*self.storage,
                self.group,
                self.core.id(),
                job.expected_last,
            )?;
            if let Some(answers) = &self.answers_to_self {
                let _ = answers.send(Flushed {
                    jobs: 1,
                    result: Ok(()),
                });
            }
        }
        Ok(())
    }

    /// The storage thread committed the oldest `jobs` jobs in flight: the
    /// Readies up to the last of them are durable; send what they held back.
    fn on_flushed(&mut self, flushed: Option<Flushed>) -> Result<(), StorageError> {
        let Some(Flushed { jobs, result }) = flushed else {
            // The thread died: only a panic inside a commit ends it.
            self.raise_storage_thread_panic();
        };
        result?;
        self.metrics.flushes += 1;
        // When the oldest Ready of this answer was handed over.
        let mut oldest = None;
        let mut left = jobs;
        while left > 0 || self.in_flight.front().is_some_and(|f| !f.job) {
            let done = self
                .in_flight
                .pop_front()
                .expect("invariant: an answer for a job in flight");
            if done.job {
                left -= 1;
            }
            if done.installs_snapshot {
                self.metrics.snapshots_installed += 1;
            }
            oldest = oldest.or(Some(done.started));
            for message in done.messages {
                self.send(message);
            }
            self.core.persisted(
                done.token
                    .expect("invariant: a Ready in flight was advanced"),
            );
        }
        let took = oldest.map(|started: std::time::Instant| started.elapsed());
        if let Some(took) = took.filter(|took| *took >= SLOW_COMMIT) {
            // Like etcd's "slow fdatasync" (including the wait behind earlier
            // flushes): the disk, not Raft, is the bottleneck.
            self.metrics.slow_commits += 1;
            warn!(
                id = self.core.id(),
                took_ms = took.as_millis() as u64,
                "slow storage commit (disk contention or a slow device)"
            );
        }
        Ok(())
    }

    /// Feeds every input already queued to the core, at most
    /// `inputs_per_ready_max` of them.
    fn drain(&mut self, inputs: &mut Inputs, paused: bool) -> Result<(), StorageError> {
        let mut budget = self.config.inputs_per_ready_max;
        let paused = paused || self.in_flight.len() >= IN_FLIGHT_MAX;
        while budget > 0 {
            let mut progressed = false;
            if !self.in_flight.is_empty() {
                if let Some(flushed) = self.flushed.as_mut() {
                    match flushed.try_recv() {
                        Ok(flushed) => {
                            self.on_flushed(Some(flushed))?;
                            budget -= 1;
                            progressed = true;
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => self.on_flushed(None)?,
                        Err(mpsc::error::TryRecvError::Empty) => {}
                    }
                }
            }
            if let Ok(control) = inputs.control.try_recv() {
                self.on_control(control);
                budget -= 1;
                progressed = true;
            }
            if !paused {
                if budget > 0 {
                    if let Some((from, envelope)) = inputs.inbox.try_recv() {
                        self.on_message(from, envelope);
                        budget -= 1;
                        progressed = true;
                    }
                }
                if budget > 0 {
                    if let Ok(proposal) = inputs.proposals.try_recv() {
                        self.on_proposal(proposal);
                        budget -= 1;
                        progressed = true;
                    }
                }
            }
            if !progressed {
                break;
            }
        }
        Ok(())
    }

    fn on_message(&mut self, from: NodeId, envelope: RaftEnvelope) {
        self.metrics.messages_received += 1;
        if envelope.group != self.group {
            self.metrics.messages_rejected += 1;
            warn!(
                id = self.core.id(),
                from,
                group = envelope.group,
                expected = self.group,
                "raft message for another group dropped"
            );
            return;
        }
        if envelope.message.from != from {
            self.metrics.messages_rejected += 1;
            warn!(
                id = self.core.id(),
                from,
                claimed = envelope.message.from,
                "raft message with a forged sender dropped"
            );
            return;
        }
        if let Err(error) = self.core.step(envelope.message) {
            self.metrics.messages_rejected += 1;
            warn!(id = self.core.id(), from, %error, "raft message refused");
        }
    }

    fn on_proposal(&mut self, proposal: Proposal) {
        let result = self.core.propose(proposal.data);
        if result.is_ok() {
            self.metrics.proposals_accepted += 1;
        }
        // The proposer may have given up waiting; nothing to do then.
        let _ = proposal.reply.send(result);
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::ReadIndex { reply } => {
                let context = self.next_read_context;
                self.next_read_context += 1;
                match self.core.read_index(context) {
                    Ok(()) => {
                        self.reads.insert(context, reply);
                    }
                    Err(error) => {
                        let _ = reply.send(Err(error.into()));
                    }
                }
            }
            Control::Snapshot { index, data, reply } => {
                let _ = reply.send(self.core.snapshot(index, data));
            }
            Control::TransferLeader { to, reply } => {
                let _ = reply.send(self.core.transfer_leader(to));
            }
        }
    }

    /// Hands every pending `Ready` through the contract: persist, send,
    /// queue for applying, answer reads, advance.
    async fn handle_readies(&mut self) -> Result<(), StorageError> {
        while self.core.has_ready() && self.in_flight.len() < IN_FLIGHT_MAX {
            let ready = self.core.ready();
            self.handle_ready(ready).await?;
        }
        Ok(())
    }

    async fn handle_ready(&mut self, mut ready: Ready) -> Result<(), StorageError> {
        self.metrics.readies += 1;
        // A snapshot both to persist and to apply came from a leader (the
        // service's own is not applied back; a restart's is not persisted).
        let installs_snapshot = ready.snapshot.is_some() && ready.snapshot_to_apply.is_some();
        // 1. Persist: one batch, one flush. A leader's appends and
        //    heartbeats may leave first (see the `Ready` contract and
        //    `NodeConfig::send_appends_before_persist`): they promise nothing
        //    about this node's disk, and followers then flush in parallel
        //    with the leader.
        let batch = self.persist_batch(&mut ready);
        let waits = !batch.is_empty() || !self.in_flight.is_empty();
        if self.config.send_appends_before_persist && waits && ready.hard_state.is_none() {
            let (early, late): (Vec<_>, Vec<_>) = std::mem::take(&mut ready.messages)
                .into_iter()
                .partition(|message| message.may_precede_persistence());
            ready.messages = late;
            for message in early {
                self.send(message);
            }
        }
        // A node not leading, with nothing on the storage thread, flushes
        // inline (a snapshot to persist, a large write, excepted): it only
        // waits for the flush, and the hand-over to the thread and back
        // costs two thread wake-ups on the path of every commit (see
        // `NodeConfig::followers_flush_inline`). With Readies in flight it
        // queues behind them, so batches reach the store in order.
        let inline = self.config.followers_flush_inline
            && !self.core.is_leader()
            && self.in_flight.is_empty()
            && ready.snapshot.is_none();
        let jobs = self
            .storage_thread
            .as_ref()
            .and_then(|thread| thread.jobs.clone());
        let asynchronous = if !inline && (jobs.is_some() || self.answers_to_self.is_some()) {
            // 1+2 on the storage thread: the batch goes there and this Ready's
            // other messages wait for it (or, with nothing to write, for the
            // Readies still in flight, whose state they may report) in
            // `in_flight`; the driver goes on meanwhile.
            let job = !batch.is_empty();
            if job {
                let expected_last = self.core.last_index();
                if let Some(jobs) = jobs {
                    if jobs
                        .send(FlushJob {
                            batch,
                            expected_last,
                        })
                        .is_err()
                    {
                        self.raise_storage_thread_panic();
                    }
                } else {
                    // `NodeConfig::async_persistence` without a thread: the
                    // job waits for a later turn of the loop (`commit_deferred`),
                    // its answer comes through the channel like the thread's.
                    self.deferred.push_back(FlushJob {
                        batch,
                        expected_last,
                    });
                }
            }
            let messages = std::mem::take(&mut ready.messages);
            if job || !self.in_flight.is_empty() {
                self.in_flight.push_back(InFlight {
                    token: None,
                    messages,
                    installs_snapshot,
                    job,
                    started: std::time::Instant::now(),
                });
                true
            } else {
                for message in messages {
                    self.send(message);
                }
                false
            }
        } else {
            if !batch.is_empty() {
                self.commit(batch).await?;
                self.metrics.flushes += 1;
                if installs_snapshot {
                    self.metrics.snapshots_installed += 1;
                }
                let expected_last = self.core.last_index();
                check_stored_last(&*self.storage, self.group, self.core.id(), expected_last)?;
            }
            // 2. Send the rest, only now that the Ready is durable.
            for message in std::mem::take(&mut ready.messages) {
                self.send(message);
            }
            false
        };
        // 3. Queue what the service must apply, and answer reads.
        if let Some(snapshot) = ready.snapshot_to_apply.take() {
            self.to_apply.push_back(Apply::Snapshot {
                index: snapshot.meta.last_included_index,
                term: snapshot.meta.last_included_term,
                data: snapshot.data,
            });
        }
        let committed = std::mem::take(&mut ready.committed_entries);
        if !committed.is_empty() {
            self.metrics.entries_applied += committed.len() as u64;
            let entries = committed
                .into_iter()
                .map(|entry| CommittedEntry {
                    index: entry.index,
                    term: entry.term,
                    data: match entry.kind {
                        EntryKind::Normal => Some(entry.data),
                        EntryKind::Noop => None,
                    },
                })
                .collect();
            self.to_apply.push_back(Apply::Entries(entries));
        }
        for read in std::mem::take(&mut ready.read_states) {
            self.answer_read(read);
        }
        // 4. Advance.
        if asynchronous {
            let token = self.core.advance_unpersisted(ready);
            self.in_flight
                .back_mut()
                .expect("invariant: an asynchronous Ready is in flight")
                .token = Some(token);
        } else {
            self.core.advance(ready);
        }
        self.offer_applies();
        Ok(())
    }

    /// Builds the write batch for a Ready's persistence step.
    fn persist_batch(&mut self, ready: &mut Ready) -> WriteBatch {
        let core = &self.core;
        let (batch, entries) = persist_batch(self.group, ready, |index| core.entry(index).cloned());
        self.metrics.entries_persisted += entries;
        batch
    }

    /// Commits inline (no storage thread).
    async fn commit(&mut self, batch: WriteBatch) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let result = if self.block_in_place {
            tokio::task::block_in_place(|| self.storage.commit(batch))
        } else {
            self.storage.commit(batch)
        };
        let took = started.elapsed();
        if took >= SLOW_COMMIT {
            // Like etcd's "slow fdatasync": the disk, not Raft, is the bottleneck.
            self.metrics.slow_commits += 1;
            warn!(
                id = self.core.id(),
                took_ms = took.as_millis() as u64,
                "slow storage commit (disk contention or a slow device)"
            );
        }
        result
    }

    /// Joins the storage thread, which has died, and re-raises its panic
    /// (a storage invariant broke) on the driver task.
    fn raise_storage_thread_panic(&mut self) -> ! {
        let thread = self
            .storage_thread
            .as_mut()
            .and_then(|storage| storage.thread.take())
            .expect("invariant: only a driver with a storage thread commits on it");
        match thread.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => panic!("invariant: the storage thread ended without answering a commit"),
        }
    }

    fn send(&mut self, message: crate::raft::Message) {
        if let MessageBody::Append { entries, .. } = &message.body {
            if !entries.is_empty() {
                self.metrics.append_messages_sent += 1;
                self.metrics.append_entries_sent += entries.len() as u64;
            }
        }
        let to = message.to;
        let envelope = RaftEnvelope {
            group: self.group,
            message,
        };
        self.metrics.messages_sent += 1;
        if let Err(error) = self.endpoint.send(to, &envelope) {
            // Raft retransmits; a lost message only costs time.
            self.metrics.send_failures += 1;
            trace!(id = self.core.id(), to, %error, "raft message not sent");
        }
    }

    fn answer_read(&mut self, read: ReadState) {
        let Some(reply) = self.reads.remove(&read.context) else {
            panic!(
                "node {}: read state for unknown context {}",
                self.core.id(),
                read.context
            );
        };
        let _ = reply.send(read.result.map_err(NodeError::from));
    }

    /// Moves queued apply items into the channel while it has room.
    fn offer_applies(&mut self) {
        while let Some(item) = self.to_apply.pop_front() {
            if self.apply_receiver_gone {
                continue;
            }
            match self.apply.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.to_apply.push_front(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => self.apply_receiver_dropped(),
            }
        }
    }

    fn apply_receiver_dropped(&mut self) {
        if !self.apply_receiver_gone {
            warn!(
                id = self.core.id(),
                "apply receiver dropped: committed entries are discarded from now on"
            );
        }
        self.apply_receiver_gone = true;
        self.to_apply.clear();
    }

    /// Publishes the status; watchers are woken only when something other
    /// than the counters changed.
    fn publish_status(&self, stopped: Option<StopReason>) {
        let core = &self.core;
        let metrics = self.metrics;
        self.shared.send_if_modified(|status| {
            let before = (
                status.term,
                status.role,
                status.leader,
                status.commit_index,
                status.applied_index,
                status.last_index,
                status.snapshot_index,
            );
            status.term = core.term();
            status.role = core.role();
            status.leader = core.leader();
            status.commit_index = core.commit_index();
            status.applied_index = core.applied_index();
            status.last_index = core.last_index();
            status.snapshot_index = core.snapshot_meta().last_included_index;
            status.metrics = metrics;
            let after = (
                status.term,
                status.role,
                status.leader,
                status.commit_index,
                status.applied_index,
                status.last_index,
                status.snapshot_index,
            );
            let stopping = stopped.is_some() && status.stopped.is_none();
            if stopping {
                status.stopped = stopped.clone();
            }
            before != after || stopping
        });
    }
}

#[cfg(test)]
mod tests {
    //! The write batch of a Ready leaves storage holding exactly the core's log.

    use bytes::Bytes;

    use super::persist_batch;
    use crate::raft::{Entry, EntryKind, HardState, Ready, Snapshot, SnapshotMeta};
    use crate::storage::{MemDisk, MemStore, RaftLogStorage, Storage};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            data: Bytes::from(format!("{index}/{term}")),
        }
    }

    fn stored(store: &MemStore) -> Vec<(u64, u64)> {
        let first = store.first_index(0).unwrap();
        let last = store.last_index(0).unwrap();
        store
            .entries(0, first, last + 1, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    /// A store holding entries 1..=8 of term 1 and hard state term 1.
    fn store_with_stale_suffix() -> MemStore {
        let store = MemStore::open(&MemDisk::new()).unwrap();
        let mut ready = Ready {
            entries: (1..=8).map(|i| entry(i, 1)).collect(),
            hard_state: Some(HardState {
                term: 1,
                voted_for: None,
            }),
            ..Ready::default()
        };
        let (batch, count) = persist_batch(0, &mut ready, |_| None);
        assert_eq!(count, 8);
        store.commit(batch).unwrap();
        store
    }

    // A conflicting suffix is replaced by the entries appended from the truncation point.
    #[test]
    fn truncation_replaced_by_append() {
        let store = store_with_stale_suffix();
        let mut ready = Ready {
            log_truncate_from: Some(5),
            entries: vec![entry(5, 2), entry(6, 2)],
            ..Ready::default()
        };
        let (batch, _) = persist_batch(0, &mut ready, |_| None);
        store.commit(batch).unwrap();
        assert_eq!(
            stored(&store),
            vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
        );
    }

    // A truncation at 5 followed, in the same Ready, by a leader's snapshot at 6 (rule 6 in the core's new log) leaves only the entries after 6.
    #[test]
    fn truncation_covered_by_installed_snapshot() {
        let store = store_with_stale_suffix();
        let mut ready = Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    last_included_index: 6,
                    last_included_term: 2,
                },
                data: Bytes::from_static(b"state"),
            }),
            log_truncate_from: Some(5),
            entries: vec![entry(7, 2), entry(8, 2)],
            ..Ready::default()
        };
        let (batch, _) = persist_batch(0, &mut ready, |_| None);
        store.commit(batch).unwrap();
        assert_eq!(store.first_index(0).unwrap(), 7);
        assert_eq!(stored(&store), vec![(7, 2), (8, 2)]);
    }

    // A snapshot that does not match the log (rule 7) with nothing after it empties the log.
    #[test]
    fn mismatching_snapshot_discards_the_log() {
        let store = store_with_stale_suffix();
        let mut ready = Ready {
            snapshot: Some(Snapshot {
                meta: SnapshotMeta {
                    last_included_index: 6,
                    last_included_term: 3,
                },
                data: Bytes::from_static(b"state"),
            }),
            log_truncate_from: Some(7),
            ..Ready::default()
        };
        let (batch, _) = persist_batch(0, &mut ready, |_| None);
        store.commit(batch).unwrap();
        assert_eq!(store.last_index(0).unwrap(), 6);
        assert_eq!(stored(&store), vec![]);
    }

    // A truncation nothing else covers re-appends the entry before it, deleting the stale suffix.
    #[test]
    fn uncovered_truncation_reappends_the_previous_entry() {
        let store = store_with_stale_suffix();
        let mut ready = Ready {
            log_truncate_from: Some(6),
            ..Ready::default()
        };
        let (batch, count) = persist_batch(0, &mut ready, |index| Some(entry(index, 1)));
        assert_eq!(count, 0);
        store.commit(batch).unwrap();
        assert_eq!(stored(&store), vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    }

    // ----- the storage thread ------------------------------------------

    use std::sync::{Arc, Mutex, mpsc as std_mpsc};

    use super::{FlushJob, StorageThread};
    use crate::raft::HardState as Hs;
    use crate::storage::{GroupId, Limits, StorageError, WriteBatch};

    /// A MemStore whose first commit waits for a signal, so that later jobs
    /// queue up behind it as they do behind a slow fsync.
    struct Gated {
        inner: MemStore,
        entered: Mutex<Option<std_mpsc::Sender<()>>>,
        release: Mutex<Option<std_mpsc::Receiver<()>>>,
    }

    impl Storage for Gated {
        fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
            let entered = self.entered.lock().unwrap().take();
            if let Some(entered) = entered {
                entered.send(()).unwrap();
                let release = self.release.lock().unwrap().take().unwrap();
                release.recv().unwrap();
            }
            self.inner.commit(batch)
        }
    }

    impl RaftLogStorage for Gated {
        fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
            self.inner.groups()
        }
        fn hard_state(&self, group: GroupId) -> Result<Hs, StorageError> {
            self.inner.hard_state(group)
        }
        fn first_index(&self, group: GroupId) -> Result<u64, StorageError> {
            self.inner.first_index(group)
        }
        fn last_index(&self, group: GroupId) -> Result<u64, StorageError> {
            self.inner.last_index(group)
        }
        fn term(&self, group: GroupId, index: u64) -> Result<u64, StorageError> {
            self.inner.term(group, index)
        }
        fn entries(
            &self,
            group: GroupId,
            lo: u64,
            hi: u64,
            bytes_max: u64,
        ) -> Result<Vec<Entry>, StorageError> {
            self.inner.entries(group, lo, hi, bytes_max)
        }
        fn snapshot_meta(&self, group: GroupId) -> Result<SnapshotMeta, StorageError> {
            self.inner.snapshot_meta(group)
        }
        fn snapshot(&self, group: GroupId) -> Result<(SnapshotMeta, Bytes), StorageError> {
            self.inner.snapshot(group)
        }
        fn raft_state_bytes(&self, group: GroupId) -> Result<u64, StorageError> {
            self.inner.raft_state_bytes(group)
        }
    }

    type Gate = (std_mpsc::Receiver<()>, std_mpsc::Sender<()>);

    fn gated(limits: Limits) -> (Arc<Gated>, Gate) {
        let (entered_tx, entered_rx) = std_mpsc::channel();
        let (release_tx, release_rx) = std_mpsc::channel();
        let store = Gated {
            inner: MemStore::open_with(&MemDisk::new(), limits).unwrap(),
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
        };
        (Arc::new(store), (entered_rx, release_tx))
    }

    /// A storage thread on a gated store, its first job (a hard state)
    /// inside its commit until `release` is sent.
    struct Stalled {
        store: Arc<Gated>,
        thread: StorageThread,
        jobs: std_mpsc::Sender<FlushJob>,
        flushed_rx: tokio::sync::mpsc::UnboundedReceiver<super::Flushed>,
        release: std_mpsc::Sender<()>,
    }

    fn stalled(limits: Limits) -> Stalled {
        let (store, (entered, release)) = gated(limits);
        let (flushed_tx, flushed_rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = StorageThread::start(store.clone(), 1, 0, flushed_tx).unwrap();
        let jobs = thread.jobs.clone().unwrap();
        jobs.send(hard_state_job(1, 0)).unwrap();
        entered.recv().unwrap();
        Stalled {
            store,
            thread,
            jobs,
            flushed_rx,
            release,
        }
    }

    impl Stalled {
        /// Queues a job behind the held one.
        fn queue(&self, batch: WriteBatch, expected_last: u64) {
            self.jobs
                .send(FlushJob {
                    batch,
                    expected_last,
                })
                .unwrap();
        }

        /// Lets the held commit finish (it succeeds) and returns the answer
        /// for what the thread committed next.
        fn release_and_next(&mut self) -> super::Flushed {
            self.release.send(()).unwrap();
            assert!(self.flushed_rx.blocking_recv().unwrap().result.is_ok());
            self.flushed_rx.blocking_recv().unwrap()
        }

        /// Closes the queue and joins the thread (after the jobs it still
        /// takes); returns the store and the answers not yet read.
        fn join(
            self,
        ) -> (
            Arc<Gated>,
            tokio::sync::mpsc::UnboundedReceiver<super::Flushed>,
        ) {
            drop(self.jobs);
            drop(self.thread);
            (self.store, self.flushed_rx)
        }
    }

    fn hard_state_job(term: u64, expected_last: u64) -> FlushJob {
        let mut batch = WriteBatch::new();
        batch.set_hard_state(
            0,
            Hs {
                term,
                voted_for: None,
            },
        );
        FlushJob {
            batch,
            expected_last,
        }
    }

    /// Nothing queued behind a failed commit reaches the disk: it may build
    /// on what failed (here the snapshot the store refused).
    #[test]
    fn jobs_behind_a_failed_commit_are_not_committed() {
        let limits = Limits {
            snapshot_bytes_max: 16,
            ..Limits::default()
        };
        let mut stalled = stalled(limits);
        // Queued behind the first: entries, a snapshot too large for the
        // store, a later hard state.
        let mut entries = WriteBatch::new();
        entries.append(0, vec![entry(1, 1), entry(2, 1)]);
        stalled.queue(entries, 2);
        let mut snapshot = WriteBatch::new();
        let meta = SnapshotMeta {
            last_included_index: 2,
            last_included_term: 1,
        };
        snapshot.install_snapshot(0, meta, Bytes::from(vec![0u8; 64]));
        stalled.queue(snapshot, 2);
        let failed = stalled.release_and_next();
        assert!(failed.result.is_err(), "the snapshot is refused");
        // Sent before the driver saw the failure.
        let _ = stalled.jobs.send(hard_state_job(9, 0));
        let (store, mut flushed_rx) = stalled.join();
        assert_eq!(store.hard_state(0).unwrap().term, 1);
        assert!(
            flushed_rx.blocking_recv().is_none(),
            "no answer after the failure"
        );
    }

    /// Readies that each fit the store's batch limit but not together are
    /// committed one by one instead of failing merged.
    #[test]
    fn a_merge_the_store_refuses_is_committed_job_by_job() {
        let limits = Limits {
            batch_bytes_max: 1 << 20,
            ..Limits::default()
        };
        let mut stalled = stalled(limits);
        let big = |index| Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: Bytes::from(vec![7u8; 600 << 10]),
        };
        for index in 1..=2 {
            let mut batch = WriteBatch::new();
            batch.append(0, vec![big(index)]);
            stalled.queue(batch, index);
        }
        let merged = stalled.release_and_next();
        let (store, _) = stalled.join();
        assert_eq!(merged.jobs, 2, "both were taken together");
        assert!(merged.result.is_ok(), "{:?}", merged.result);
        assert_eq!(store.last_index(0).unwrap(), 2);
    }
}

//! [`RaftNode`]: the handle the embedding service uses.

use std::sync::Arc;

use bytes::Bytes;
use rand::SeedableRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::config::NodeConfig;
use super::error::{NodeError, StartError};
use super::task::{Control, Driver, Inputs, Proposal, Shared};
use super::types::{Apply, Metrics, RaftEnvelope, Status};
use crate::NodeId;
use crate::net::Endpoint;
use crate::raft::{PersistedState, RaftCore, Role, Snapshot};
use crate::storage::{GroupId, RaftLogStorage, StorageError};

/// A running Raft node: a driver task owning a [`RaftCore`], its storage
/// and its endpoint. Cheap to clone; all clones control the same node.
///
/// See the [module docs](super) for the driver's loop, the durability and
/// shutdown guarantees, and backpressure.
#[derive(Clone, Debug)]
pub struct RaftNode {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    id: NodeId,
    group: GroupId,
    proposals: mpsc::Sender<Proposal>,
    control: mpsc::Sender<Control>,
    stop: watch::Sender<bool>,
    shared: Arc<Shared>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

/// Reads what `storage` holds for `group` into the form the core restarts from.
pub fn load_persisted<S: RaftLogStorage + ?Sized>(
    storage: &S,
    group: GroupId,
) -> Result<PersistedState, StorageError> {
    let hard_state = storage.hard_state(group)?;
    let (meta, data) = storage.snapshot(group)?;
    let first = storage.first_index(group)?;
    let last = storage.last_index(group)?;
    let entries = if last >= first {
        storage.entries(group, first, last + 1, u64::MAX)?
    } else {
        Vec::new()
    };
    let snapshot = (meta.last_included_index > 0).then_some(Snapshot { meta, data });
    Ok(PersistedState {
        hard_state,
        snapshot,
        entries,
    })
}

impl RaftNode {
    /// Starts node `id` of the cluster `voters`: reads the group's persisted
    /// state from `storage` (hard state, snapshot, log; empty for a new
    /// node), opens the Raft inbox on `endpoint` and spawns the driver task
    /// on the current tokio runtime (call it inside one).
    ///
    /// Returns the handle and the receiving end of the apply channel, which
    /// delivers committed entries and snapshots in log order (see [`Apply`]).
    /// After a restart from a snapshot, the first item is that snapshot; the
    /// committed entries after it are delivered again as the node learns the
    /// commit index anew, so the service must make applying idempotent by
    /// index (skip indexes it has already applied, e.g. when its own state is
    /// durable). A leader learns the commit index only by committing an entry
    /// of its own term and elections append none, so after a whole-cluster
    /// restart those entries come back with the next proposal, or with a
    /// [`read_index`](Self::read_index), which appends a no-op when needed.
    pub fn start<S: RaftLogStorage + 'static>(
        id: NodeId,
        voters: &[NodeId],
        config: NodeConfig,
        storage: S,
        endpoint: Endpoint,
    ) -> Result<(RaftNode, mpsc::Receiver<Apply>), StartError> {
        config.validate()?;
        let persisted = load_persisted(&storage, config.group)?;
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.rng_seed);
        let core = RaftCore::new(id, voters, config.raft.clone(), persisted, rng)?;
        let inbox = endpoint.inbox::<RaftEnvelope>(config.inbox_capacity_messages)?;
        let (proposal_sender, proposals) = mpsc::channel(config.proposal_queue_max);
        let (control_sender, control) = mpsc::channel(config.control_queue_max);
        let (apply_sender, apply) = mpsc::channel(config.apply_channel_items_max);
        let (stop_sender, stop) = watch::channel(false);
        let shared: Arc<Shared> = Arc::new(watch::Sender::new(Status {
            id,
            group: config.group,
            term: core.term(),
            role: core.role(),
            leader: core.leader(),
            commit_index: core.commit_index(),
            applied_index: core.applied_index(),
            last_index: core.last_index(),
            snapshot_index: core.snapshot_meta().last_included_index,
            stopped: None,
            metrics: Metrics::default(),
        }));
        let group = config.group;
        let driver = Driver::new(
            core,
            storage,
            config,
            endpoint,
            apply_sender,
            shared.clone(),
        );
        let inputs = Inputs {
            inbox,
            proposals,
            control,
            stop,
        };
        let task = tokio::spawn(driver.run(inputs));
        let node = RaftNode {
            inner: Arc::new(Handle {
                id,
                group,
                proposals: proposal_sender,
                control: control_sender,
                stop: stop_sender,
                shared,
                task: tokio::sync::Mutex::new(Some(task)),
            }),
        };
        Ok((node, apply))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// This node's Raft group.
    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    /// Proposes a command. On the leader, returns the `(index, term)` the
    /// entry will have if it commits, once the core has appended it (not once
    /// it is durable or committed). The service learns the outcome from the
    /// apply channel: an entry at `index` with the same `term` is this
    /// command; another term means it was lost.
    ///
    /// Errors: [`NodeError::Propose`] (`NotLeader { leader_hint }`,
    /// `TransferInProgress`, `EntryTooLarge`, `UncommittedFull`),
    /// [`NodeError::Stopped`]. Waits for room when `proposal_queue_max`
    /// proposals are queued.
    pub async fn propose(&self, data: Bytes) -> Result<(u64, u64), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .proposals
            .send(Proposal { data, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// `(current term, whether this node believes it is the leader)`, as of
    /// the driver's last step.
    pub fn state(&self) -> (u64, bool) {
        let status = self.inner.shared.borrow();
        (status.term, status.role == Role::Leader)
    }

    /// The node's full status as of the driver's last step.
    pub fn status(&self) -> Status {
        self.inner.shared.borrow().clone()
    }

    /// A receiver of the node's status, marked changed whenever anything
    /// but the [`Metrics`] changes (term, role, leader, indexes, stop).
    /// Lets a caller wait for a condition without polling:
    /// `node.subscribe().wait_for(|s| s.role == Role::Leader).await`.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.inner.shared.subscribe()
    }

    /// Linearizable read (ReadIndex): resolves to an index once a quorum has
    /// confirmed this node leads. A read that starts after this call returns
    /// is linearizable if the service serves it from its state once it has
    /// applied at least that index.
    ///
    /// Errors: [`NodeError::ReadIndex`] (`NotLeader`, `TooManyPending`),
    /// [`NodeError::ReadLost`] (leadership lost while waiting),
    /// [`NodeError::Stopped`]. A leader cut off from the quorum answers
    /// `ReadLost` once it steps down (after an election timeout).
    pub async fn read_index(&self) -> Result<u64, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.control(Control::ReadIndex { reply }).await?;
        answer.await.map_err(|_| NodeError::Stopped)?
    }

    /// Hands the service's snapshot, covering every entry through `index`
    /// (which the service has applied), to Raft. Returns once the core has
    /// taken it; the driver persists it together with the log compaction in
    /// its next write batch, atomically.
    ///
    /// Errors: [`NodeError::Snapshot`] (`Stale` when the log is already
    /// compacted that far, e.g. by a leader's snapshot: harmless;
    /// `NotApplied`; `TooLarge`), [`NodeError::Stopped`]. Served even while
    /// the apply channel is full, so a service may call it from its apply loop.
    pub async fn snapshot(&self, index: u64, data: Bytes) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.control(Control::Snapshot { index, data, reply })
            .await?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// Asks the leader to hand leadership to `to` (returns once the transfer
    /// has started; watch [`state`](Self::state) for the outcome).
    ///
    /// Errors: [`NodeError::Transfer`] (`NotLeader`, `UnknownNode`),
    /// [`NodeError::Stopped`].
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        let (reply, answer) = oneshot::channel();
        self.control(Control::TransferLeader { to, reply }).await?;
        Ok(answer.await.map_err(|_| NodeError::Stopped)??)
    }

    /// Stops the driver and waits until it has stopped. Once this returns,
    /// the task has ended and dropped its storage handle: this instance
    /// writes nothing more, so a new node may be started on the same
    /// storage. The apply channel is closed (items already in it can still
    /// be read); pending proposals and reads fail with
    /// [`NodeError::Stopped`]. Idempotent; concurrent calls all wait.
    ///
    /// # Panics
    /// Re-raises a panic of the driver task (a broken internal invariant).
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let mut task = self.inner.task.lock().await;
        if let Some(handle) = task.take() {
            if let Err(error) = handle.await {
                if error.is_panic() {
                    std::panic::resume_unwind(error.into_panic());
                }
            }
        }
    }

    async fn control(&self, control: Control) -> Result<(), NodeError> {
        self.inner
            .control
            .send(control)
            .await
            .map_err(|_| NodeError::Stopped)
    }
}

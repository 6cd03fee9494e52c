//! The replicated state machine layer: a service hands operations to
//! [`Rsm::submit`], which returns each operation's output once the operation
//! is committed by a majority and applied, or an error when it cannot tell.
//!
//! A service implements [`StateMachine`] (how to encode, apply, snapshot and
//! restore its commands and state); [`Rsm`] runs one [`RaftNode`] and one
//! apply task that feeds committed entries to the state machine, answers the
//! submitters, serves linearizable reads ([`Rsm::read`], ReadIndex: no log
//! write) and snapshots the state machine when the persisted Raft state
//! passes [`RsmConfig::maxraftstate_bytes`].
//!
//! # How a submission is matched to its outcome
//! [`RaftNode::propose`] returns the `(index, term)` the entry gets. Raft's
//! log matching property says an entry applied at `index` with that `term`
//! *is* the proposed entry, so no operation id is stored in the log: the
//! submitter waits for `index` to be applied and gets the output if the term
//! matches, [`SubmitError::LeadershipLost`] otherwise. The apply task also
//! fails every waiter once this node stops leading the term its entry was
//! proposed in (the entry may still commit under the next leader: the error
//! means "unknown outcome", like a lost reply).
//!
//! # Guarantees
//! - **Never a wrong result**: `Ok(output)` is the output of this very
//!   operation, applied once, at its place in the log.
//! - **Never a hang**: every submit and read ends within
//!   [`RsmConfig::submit_timeout`] (plus one scheduling round), and at once
//!   when the node stops.
//! - **Durability**: an output is returned only after the entry is committed,
//!   i.e. durable on a majority (the driver's persist-before-send contract).
//! - **Determinism**: every replica applies the same entries in the same
//!   order; an entry that does not decode is skipped by all of them alike.
//! - **Restart**: the state machine starts empty; the driver hands it the
//!   persisted snapshot, then the committed entries after it.
//! - **Bounded memory**: waiters are bounded by the driver's proposal queue
//!   and uncommitted-bytes limit; outputs of entries applied before their
//!   submitter registered are kept in a ring of
//!   [`RsmConfig::early_outputs_max`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::NodeId;
use crate::net::Endpoint;
use crate::raft::{
    Apply, CommittedEntry, NodeConfig, NodeError, ProposeError, RaftNode, ReadIndexError, Role,
    SnapshotError, StartError, Status,
};
use crate::storage::{RaftLogStorage, raft_entry_persisted_bytes};

#[cfg(test)]
mod tests;

/// Fixed part of the persisted Raft state (hard state and log base records)
/// added to the entry bytes when estimating it against `maxraftstate_bytes`.
const RAFT_STATE_FIXED_BYTES: u64 = 128;

/// A deterministic state machine replicated through Raft.
///
/// Every replica applies the same commands in the same order, so `apply`
/// must depend only on the state and the command (no clock, no randomness,
/// no I/O whose result can differ between replicas).
pub trait StateMachine: Send + 'static {
    /// An operation, as submitted and as stored in a log entry.
    type Command: Send + 'static;
    /// What applying a command returns to its submitter.
    type Output: Send + 'static;

    /// Encodes a command into the bytes of a log entry.
    fn encode_command(command: &Self::Command) -> Bytes;
    /// Decodes a log entry. An entry that does not decode is skipped by every
    /// replica (and its submitter gets [`SubmitError::Undecodable`]).
    fn decode_command(data: &[u8]) -> Result<Self::Command, CodecError>;
    /// Applies the command committed at `index` and returns its output.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Output;
    /// The whole state, encoded; [`restore`](Self::restore) must rebuild it.
    fn snapshot(&self) -> Bytes;
    /// Replaces the whole state with a snapshot made by
    /// [`snapshot`](Self::snapshot) (on this node or another one). An error
    /// stops the replica: it cannot go on from an unknown state.
    fn restore(&mut self, data: &[u8]) -> Result<(), CodecError>;
}

/// A command or a snapshot could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {what}: {reason}")]
pub struct CodecError {
    /// What was being decoded ("command", "snapshot").
    pub what: &'static str,
    /// Why it failed.
    pub reason: String,
}

impl CodecError {
    /// A decoding failure of `what`, for `reason`.
    pub fn new(what: &'static str, reason: impl std::fmt::Display) -> Self {
        CodecError {
            what,
            reason: reason.to_string(),
        }
    }
}

/// Settings of an [`Rsm`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsmConfig {
    /// The Raft node's settings.
    pub node: NodeConfig,
    /// Snapshot the state machine once the persisted Raft state (log and
    /// hard state, without the snapshot) is estimated to reach this many
    /// bytes; `None` never snapshots (the log grows without bound). The
    /// estimate counts the applied entries since the last snapshot with the
    /// store's exact per-entry size ([`raft_entry_persisted_bytes`]).
    pub maxraftstate_bytes: Option<u64>,
    /// A submit or read that has no outcome after this long returns
    /// [`SubmitError::Timeout`]. Default 2 s.
    pub submit_timeout: Duration,
    /// Outputs of entries this node proposed that were applied before their
    /// submitter registered (a race the apply task wins only rarely), kept
    /// until claimed. Default 4096.
    pub early_outputs_max: usize,
}

impl Default for RsmConfig {
    fn default() -> Self {
        RsmConfig {
            node: NodeConfig::default(),
            maxraftstate_bytes: None,
            submit_timeout: Duration::from_secs(2),
            early_outputs_max: 4096,
        }
    }
}

/// Why a submit or read has no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// This node is not the leader; nothing was appended. Try `leader_hint`.
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The node this one believes leads, if it knows one.
        leader_hint: Option<NodeId>,
    },
    /// The command was appended, but this node lost leadership (or the entry
    /// at its index turned out to be another one) before it was applied. It
    /// may or may not take effect.
    #[error("leadership lost before the command was applied (leader hint {leader_hint:?})")]
    LeadershipLost {
        /// The node this one believes leads now, if it knows one.
        leader_hint: Option<NodeId>,
    },
    /// No outcome within the submit timeout; a command may or may not take effect.
    #[error("no outcome within the submit timeout")]
    Timeout,
    /// The leader is overloaded (too many uncommitted bytes or pending reads,
    /// or a leadership transfer is under way); nothing was appended. Retry later.
    #[error("the leader is busy; retry later")]
    Busy,
    /// The command is larger than the node accepts; nothing was appended.
    #[error("command of {bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded size of the command.
        bytes: u64,
        /// The limit (`entry_bytes_max`).
        max: u64,
    },
    /// The committed entry did not decode, so no replica applied it.
    #[error("the committed entry did not decode and was skipped")]
    Undecodable,
    /// The node has stopped (shut down, storage failed, bad snapshot).
    #[error("the replicated state machine has stopped")]
    Stopped,
}

/// Why [`Rsm::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RsmStartError {
    /// The Raft node could not start.
    #[error(transparent)]
    Node(#[from] StartError),
    /// `early_outputs_max` is zero.
    #[error("early_outputs_max must be at least 1")]
    EarlyOutputsZero,
    /// `maxraftstate_bytes` is zero.
    #[error("maxraftstate_bytes must be at least 1 when set")]
    MaxRaftStateZero,
}

fn from_node_error(error: NodeError, status: &Status) -> SubmitError {
    if let Some(leader_hint) = error.not_leader() {
        return match error {
            NodeError::ReadLost(_) => SubmitError::LeadershipLost { leader_hint },
            _ => SubmitError::NotLeader { leader_hint },
        };
    }
    match error {
        NodeError::Propose(ProposeError::EntryTooLarge { bytes, max }) => {
            SubmitError::TooLarge { bytes, max }
        }
        NodeError::Propose(
            ProposeError::UncommittedFull { .. } | ProposeError::TransferInProgress,
        )
        | NodeError::ReadIndex(ReadIndexError::TooManyPending { .. }) => SubmitError::Busy,
        NodeError::Stopped => SubmitError::Stopped,
        other => {
            tracing::warn!(error = %other, node = status.id, "rsm: unexpected node error");
            SubmitError::LeadershipLost {
                leader_hint: status.leader,
            }
        }
    }
}

/// A waiter for the entry proposed at some index.
struct Waiter<O> {
    term: u64,
    reply: oneshot::Sender<Result<O, SubmitError>>,
}

/// State shared by submitters and the apply task.
struct Waiters<O> {
    /// Index → the submitter waiting for it.
    pending: BTreeMap<u64, Waiter<O>>,
    /// `(index, term, output)` of entries applied while this node led and no
    /// submitter waited for them yet, oldest first.
    early: VecDeque<(u64, u64, Result<O, SubmitError>)>,
    /// Highest index applied to the state machine.
    applied_index: u64,
    /// Set once the apply task has ended; no waiter is registered after it.
    stopped: bool,
}

struct Inner<M: StateMachine> {
    node: RaftNode,
    config: RsmConfig,
    machine: Mutex<M>,
    waiters: Mutex<Waiters<M::Output>>,
    /// Highest index applied to the state machine (readers wait on it).
    applied: watch::Sender<u64>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

/// A replicated state machine: one Raft node plus the state machine `M` it
/// applies to. Cheap to clone; all clones drive the same replica.
pub struct Rsm<M: StateMachine> {
    inner: Arc<Inner<M>>,
}

impl<M: StateMachine> Clone for Rsm<M> {
    fn clone(&self) -> Self {
        Rsm {
            inner: self.inner.clone(),
        }
    }
}

impl<M: StateMachine> std::fmt::Debug for Rsm<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rsm")
            .field("node", &self.inner.node.id())
            .field("applied", &*self.inner.applied.borrow())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks is a broken invariant that has
    // already been reported; the data is still usable for shutting down.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<M: StateMachine> Rsm<M> {
    /// Starts replica `id` of the cluster `voters` with the state machine
    /// `machine` (empty: the persisted snapshot and log are replayed into it),
    /// on `storage` and `endpoint` (see [`RaftNode::start`]). Call it inside
    /// a tokio runtime.
    pub fn start<S: RaftLogStorage + 'static>(
        id: NodeId,
        voters: &[NodeId],
        config: RsmConfig,
        storage: S,
        endpoint: Endpoint,
        machine: M,
    ) -> Result<Rsm<M>, RsmStartError> {
        if config.early_outputs_max == 0 {
            return Err(RsmStartError::EarlyOutputsZero);
        }
        if config.maxraftstate_bytes == Some(0) {
            return Err(RsmStartError::MaxRaftStateZero);
        }
        let (node, applies) = RaftNode::start(id, voters, config.node.clone(), storage, endpoint)?;
        let inner = Arc::new(Inner {
            node,
            config,
            machine: Mutex::new(machine),
            waiters: Mutex::new(Waiters {
                pending: BTreeMap::new(),
                early: VecDeque::new(),
                applied_index: 0,
                stopped: false,
            }),
            applied: watch::Sender::new(0),
            task: tokio::sync::Mutex::new(None),
        });
        let status = inner.node.subscribe();
        let task = tokio::spawn(apply_loop(inner.clone(), applies, status));
        *inner
            .task
            .try_lock()
            .expect("nobody else holds the task lock yet") = Some(task);
        Ok(Rsm { inner })
    }

    /// The Raft node under this replica (status, leadership transfer).
    pub fn node(&self) -> &RaftNode {
        &self.inner.node
    }

    /// This replica's settings.
    pub fn config(&self) -> &RsmConfig {
        &self.inner.config
    }

    /// Highest log index applied to the state machine.
    pub fn applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// Waits until this replica has applied `index` (without a timeout).
    /// Errors with [`SubmitError::Stopped`] if it stops first.
    pub async fn wait_applied(&self, index: u64) -> Result<(), SubmitError> {
        let mut applied = self.inner.applied.subscribe();
        loop {
            if lock(&self.inner.waiters).stopped {
                return Err(SubmitError::Stopped);
            }
            if *applied.borrow_and_update() >= index {
                return Ok(());
            }
            if applied.changed().await.is_err() {
                return Err(SubmitError::Stopped);
            }
        }
    }

    /// Replicates `command` and returns its output once it is committed and
    /// applied. Errors say whether the command may still take effect
    /// ([`SubmitError::LeadershipLost`], [`SubmitError::Timeout`]) or surely
    /// does not (the others).
    pub async fn submit(&self, command: &M::Command) -> Result<M::Output, SubmitError> {
        let deadline = Instant::now() + self.inner.config.submit_timeout;
        let data = M::encode_command(command);
        let proposed = tokio::time::timeout_at(deadline, self.inner.node.propose(data)).await;
        let (index, term) = match proposed {
            Err(_elapsed) => return Err(SubmitError::Timeout),
            Ok(Err(error)) => return Err(from_node_error(error, &self.inner.node.status())),
            Ok(Ok(position)) => position,
        };
        let answer = {
            let mut waiters = lock(&self.inner.waiters);
            if let Some(at) = waiters.early.iter().position(|(i, _, _)| *i == index) {
                let (_, applied_term, output) = waiters.early.remove(at).expect("position found");
                return if applied_term == term {
                    output
                } else {
                    Err(self.lost())
                };
            }
            if waiters.stopped {
                return Err(SubmitError::Stopped);
            }
            if waiters.applied_index >= index {
                // Applied already, while this node did not lead: another entry.
                return Err(self.lost());
            }
            // Registered after the apply task saw this node lose the term?
            // Then nobody would fail this waiter: fail it here. (Checked
            // under the lock, so either this check or the apply task sees it.)
            if self.inner.node.state() != (term, true) {
                return Err(self.lost());
            }
            let (reply, answer) = oneshot::channel();
            if let Some(old) = waiters.pending.insert(index, Waiter { term, reply }) {
                // A waiter of an earlier term whose entry was overwritten.
                let _ = old.reply.send(Err(self.lost()));
            }
            answer
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_closed)) => Err(SubmitError::Stopped),
            Err(_elapsed) => {
                let mut waiters = lock(&self.inner.waiters);
                if waiters.pending.get(&index).is_some_and(|w| w.term == term) {
                    waiters.pending.remove(&index);
                }
                Err(SubmitError::Timeout)
            }
        }
    }

    /// Linearizable read: runs `read` on the state machine once this node has
    /// confirmed with a quorum that it still leads (ReadIndex; no log write
    /// unless the leader has not committed an entry of its term yet) and has
    /// applied everything committed before the call.
    pub async fn read<R>(&self, read: impl FnOnce(&M) -> R) -> Result<R, SubmitError> {
        let deadline = Instant::now() + self.inner.config.submit_timeout;
        let index = match tokio::time::timeout_at(deadline, self.inner.node.read_index()).await {
            Err(_elapsed) => return Err(SubmitError::Timeout),
            Ok(Err(error)) => return Err(from_node_error(error, &self.inner.node.status())),
            Ok(Ok(index)) => index,
        };
        let mut applied = self.inner.applied.subscribe();
        match tokio::time::timeout_at(deadline, applied.wait_for(|&a| a >= index)).await {
            Err(_elapsed) => return Err(SubmitError::Timeout),
            Ok(Err(_closed)) => return Err(SubmitError::Stopped),
            Ok(Ok(_)) => {}
        }
        if lock(&self.inner.waiters).stopped {
            return Err(SubmitError::Stopped);
        }
        let machine = lock(&self.inner.machine);
        Ok(read(&machine))
    }

    /// Runs `read` on this replica's state as it is now, without asking the
    /// quorum: may be stale (a follower's, or a deposed leader's, state).
    pub fn read_local<R>(&self, read: impl FnOnce(&M) -> R) -> R {
        let machine = lock(&self.inner.machine);
        read(&machine)
    }

    /// Stops the Raft node and the apply task and waits for both. Every
    /// submit and read still waiting returns [`SubmitError::Stopped`] (or the
    /// outcome it already had). Idempotent.
    pub async fn shutdown(&self) {
        self.inner.node.shutdown().await;
        let task = self.inner.task.lock().await.take();
        if let Some(task) = task {
            if let Err(error) = task.await {
                if error.is_panic() {
                    std::panic::resume_unwind(error.into_panic());
                }
            }
        }
    }

    fn lost(&self) -> SubmitError {
        SubmitError::LeadershipLost {
            leader_hint: self.inner.node.status().leader,
        }
    }
}

/// Feeds committed entries and snapshots to the state machine, answers the
/// waiters, fails them when leadership is lost, and snapshots.
async fn apply_loop<M: StateMachine>(
    inner: Arc<Inner<M>>,
    mut applies: mpsc::Receiver<Apply>,
    mut status: watch::Receiver<Status>,
) {
    let mut state = ApplyState {
        bytes_since_snapshot: 0,
        led_term: None,
    };
    let mut status_open = true;
    let mut failed = false;
    loop {
        tokio::select! {
            biased;
            item = applies.recv() => match item {
                None => break,
                Some(Apply::Entries(entries)) => apply_entries(&inner, &mut state, entries).await,
                Some(Apply::Snapshot { index, data, .. }) => {
                    if !restore(&inner, &mut state, index, &data) {
                        failed = true;
                        break;
                    }
                }
            },
            changed = status.changed(), if status_open => {
                if changed.is_err() {
                    status_open = false;
                    continue;
                }
                let now = status.borrow_and_update().clone();
                leadership_changed(&inner, &mut state, &now);
            }
        }
    }
    {
        let mut waiters = lock(&inner.waiters);
        waiters.stopped = true;
        for (_, waiter) in std::mem::take(&mut waiters.pending) {
            let _ = waiter.reply.send(Err(SubmitError::Stopped));
        }
        waiters.early.clear();
    }
    // Wake readers so they see `stopped`.
    inner.applied.send_modify(|_| {});
    if failed {
        inner.node.shutdown().await;
    }
}

/// `(index, term, outcome)` of one applied entry; no outcome for a no-op.
type Applied<O> = (u64, u64, Option<Result<O, SubmitError>>);

struct ApplyState {
    /// Estimated persisted bytes of the entries applied since the last snapshot.
    bytes_since_snapshot: u64,
    /// The term this node leads, as of the last status change seen.
    led_term: Option<u64>,
}

/// Fails every waiter whose entry was proposed in a term this node no longer leads.
fn leadership_changed<M: StateMachine>(inner: &Inner<M>, state: &mut ApplyState, now: &Status) {
    let led = (now.role == Role::Leader && now.stopped.is_none()).then_some(now.term);
    if led == state.led_term {
        return;
    }
    state.led_term = led;
    let mut waiters = lock(&inner.waiters);
    let lost: Vec<u64> = waiters
        .pending
        .iter()
        .filter(|(_, waiter)| Some(waiter.term) != led)
        .map(|(&index, _)| index)
        .collect();
    for index in lost {
        let waiter = waiters.pending.remove(&index).expect("listed above");
        let _ = waiter.reply.send(Err(SubmitError::LeadershipLost {
            leader_hint: now.leader,
        }));
    }
    if led.is_none() {
        waiters.early.clear();
    }
}

async fn apply_entries<M: StateMachine>(
    inner: &Inner<M>,
    state: &mut ApplyState,
    entries: Vec<CommittedEntry>,
) {
    let mut outcomes: Vec<Applied<M::Output>> = Vec::with_capacity(entries.len());
    let mut snapshot: Option<(u64, Bytes)> = None;
    let mut applied = *inner.applied.borrow();
    {
        let mut machine = lock(&inner.machine);
        for entry in entries {
            if entry.index <= applied {
                // Re-delivered after a restart, or covered by a snapshot.
                continue;
            }
            assert_eq!(
                entry.index,
                applied + 1,
                "the driver hands entries in order without gaps"
            );
            let data_len = entry.data.as_ref().map_or(0, Bytes::len);
            let outcome = entry.data.map(|data| match M::decode_command(&data) {
                Ok(command) => Ok(machine.apply(entry.index, command)),
                Err(error) => {
                    tracing::error!(index = entry.index, %error, "rsm: skipping an undecodable entry");
                    Err(SubmitError::Undecodable)
                }
            });
            applied = entry.index;
            outcomes.push((entry.index, entry.term, outcome));
            state.bytes_since_snapshot += raft_entry_persisted_bytes(data_len);
            if let Some(max) = inner.config.maxraftstate_bytes {
                if RAFT_STATE_FIXED_BYTES + state.bytes_since_snapshot >= max {
                    snapshot = Some((entry.index, machine.snapshot()));
                    state.bytes_since_snapshot = 0;
                }
            }
        }
    }
    if outcomes.is_empty() {
        return;
    }
    let leading = inner.node.state();
    inner.applied.send_replace(applied);
    {
        let mut waiters = lock(&inner.waiters);
        waiters.applied_index = applied;
        for (index, term, outcome) in outcomes {
            match waiters.pending.remove(&index) {
                Some(waiter) => {
                    let result = match outcome {
                        Some(result) if waiter.term == term => result,
                        _ => Err(SubmitError::LeadershipLost {
                            leader_hint: inner.node.status().leader,
                        }),
                    };
                    let _ = waiter.reply.send(result);
                }
                None => {
                    if let Some(result) = outcome {
                        if leading == (term, true) {
                            if waiters.early.len() == inner.config.early_outputs_max {
                                waiters.early.pop_front();
                            }
                            waiters.early.push_back((index, term, result));
                        }
                    }
                }
            }
        }
    }
    if let Some((index, data)) = snapshot {
        match inner.node.snapshot(index, data).await {
            Ok(()) | Err(NodeError::Stopped) => {}
            // A leader's snapshot already covers it.
            Err(NodeError::Snapshot(SnapshotError::Stale { .. })) => {}
            Err(error) => tracing::error!(index, %error, "rsm: snapshot refused"),
        }
    }
}

/// Replaces the state machine with a snapshot; false when it does not decode
/// (the replica then stops).
fn restore<M: StateMachine>(
    inner: &Inner<M>,
    state: &mut ApplyState,
    index: u64,
    data: &[u8],
) -> bool {
    if let Err(error) = lock(&inner.machine).restore(data) {
        tracing::error!(index, %error, "rsm: cannot restore the snapshot; stopping the replica");
        return false;
    }
    state.bytes_since_snapshot = 0;
    inner.applied.send_replace(index);
    let mut waiters = lock(&inner.waiters);
    waiters.applied_index = index;
    let covered: Vec<u64> = waiters.pending.range(..=index).map(|(&i, _)| i).collect();
    for covered_index in covered {
        let waiter = waiters
            .pending
            .remove(&covered_index)
            .expect("listed above");
        let _ = waiter.reply.send(Err(SubmitError::LeadershipLost {
            leader_hint: inner.node.status().leader,
        }));
    }
    true
}

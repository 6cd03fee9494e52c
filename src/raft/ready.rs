//! The core's output: a batch of work for the driver, with the durability
//! contract that makes Raft safe.
//!
//! # Contract (persist before send)
//!
//! For each `Ready` returned by [`RaftCore::ready`](crate::raft::RaftCore::ready),
//! the driver must, in this order:
//!
//! 1. **Persist**, durably (fsync/flush), and atomically as one write batch:
//!    [`snapshot`](Ready::snapshot) (with its log compaction), then
//!    [`log_truncate_from`](Ready::log_truncate_from), then
//!    [`entries`](Ready::entries), then [`hard_state`](Ready::hard_state).
//!    Atomicity matters for the snapshot and its truncation (a snapshot stored
//!    next to a stale conflicting suffix would break log matching); doing the
//!    whole batch atomically is simplest and is what the simulation models.
//! 2. **Send** [`messages`](Ready::messages) — only after step 1 is durable:
//!    a vote or an append acknowledgement promises that its hard state and
//!    entries survive a crash. One exception: when the Ready has no
//!    [`hard_state`](Ready::hard_state), the messages for which
//!    [`Message::may_precede_persistence`] holds (a leader's appends and
//!    heartbeats) may be sent before or during step 1. They depend on no
//!    durable state of the sender: the core counts the leader's own log
//!    towards a commit only up to what [`advance`](crate::raft::RaftCore::advance)
//!    reported persisted (Ongaro's thesis §10.2.1), so followers flush in
//!    parallel with the leader and a commit still needs a majority of
//!    durable copies.
//! 3. **Apply**: hand [`snapshot_to_apply`](Ready::snapshot_to_apply), then
//!    [`committed_entries`](Ready::committed_entries) in order, to the service,
//!    and answer [`read_states`](Ready::read_states). Entries in
//!    `committed_entries` may have been persisted by this very Ready, so this
//!    too comes after step 1.
//! 4. Call [`RaftCore::advance`](crate::raft::RaftCore::advance) with the Ready.
//!
//! Between `ready()` and `advance()` the driver must not call any other
//! input method of the core (the core asserts this); inputs arriving
//! meanwhile wait in the driver's queues, which is what makes group commit
//! (one flush for a batch of inputs) natural. A crash anywhere before step 1
//! completes loses the Ready entirely, which is safe: nothing of it has left
//! the node.

use super::message::Message;
use super::types::{Entry, HardState, Snapshot};
use crate::NodeId;

/// The answer to one [`read_index`](crate::raft::RaftCore::read_index) request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The context the caller passed to `read_index`.
    pub context: u64,
    /// `Ok(index)`: the read is linearizable once the service has applied
    /// `index`. `Err`: leadership was lost before the read was confirmed.
    pub result: Result<u64, ReadLost>,
}

/// A read-index request was dropped because the leader lost its leadership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("leadership lost before the read was confirmed (leader hint {leader_hint:?})")]
pub struct ReadLost {
    /// The node believed to be leader now, if known.
    pub leader_hint: Option<NodeId>,
}

/// A batch of work for the driver; see the module docs for the contract.
#[derive(Debug, Default)]
pub struct Ready {
    /// Sequence number tying this Ready to its `advance`.
    pub(crate) number: u64,
    /// Persist (step 1, last): the new hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// Persist (step 1, first): store this snapshot, replacing the previous
    /// one, and delete every log entry with index ≤
    /// `snapshot.meta.last_included_index`. Set when the service made a
    /// snapshot (see [`RaftCore::snapshot`](crate::raft::RaftCore::snapshot))
    /// or a leader's snapshot was installed.
    pub snapshot: Option<Snapshot>,
    /// Persist (step 1, second): delete every stored log entry with index ≥
    /// this (a conflicting suffix, or the whole log when an installed
    /// snapshot does not match it). Deleting entries that do not exist is fine.
    pub log_truncate_from: Option<u64>,
    /// Persist (step 1, third): append these entries; they are contiguous and
    /// follow the last stored entry once the steps above are done.
    pub entries: Vec<Entry>,
    /// Send (step 2), only after step 1 is durable. Delivery may fail,
    /// duplicate or reorder; Raft tolerates it.
    pub messages: Vec<Message>,
    /// Apply (step 3, first): the service must replace its state with this
    /// snapshot. Set when a leader's snapshot was installed, and in the first
    /// Ready after restarting from a persisted snapshot.
    pub snapshot_to_apply: Option<Snapshot>,
    /// Apply (step 3): committed entries, in index order, continuing from the
    /// last applied entry (or from `snapshot_to_apply`). `Noop` entries keep
    /// their index and must be skipped by the service.
    pub committed_entries: Vec<Entry>,
    /// Answer (step 3): results of read-index requests.
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// True when the Ready carries nothing to persist.
    pub fn is_persist_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.log_truncate_from.is_none()
            && self.entries.is_empty()
    }
}

//! Plain data types of the Raft log, shared by the protocol core, the driver
//! and the storage engine. No behaviour lives here.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::NodeId;

/// What a log entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A command proposed by the service; `data` is opaque to Raft.
    Normal,
    /// An empty entry a leader appends to commit an entry of its own term.
    Noop,
}

/// One Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, starting at 1.
    pub index: u64,
    /// Term of the leader that created the entry.
    pub term: u64,
    /// What the entry carries.
    pub kind: EntryKind,
    /// The service's command bytes (empty for [`EntryKind::Noop`]).
    pub data: Bytes,
}

/// The state Raft must persist before answering any message (§5, Figure 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// Latest term this node has seen.
    pub term: u64,
    /// Candidate that received this node's vote in `term`, if any.
    pub voted_for: Option<NodeId>,
}

/// Where a snapshot sits in the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Index of the last entry the snapshot replaces (0 = no snapshot).
    pub last_included_index: u64,
    /// Term of that entry.
    pub last_included_term: u64,
}

/// A snapshot of the service's state: where it sits in the log and the
/// service's opaque bytes. `data` is reference-counted, so cloning is cheap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Position of the snapshot in the log.
    pub meta: SnapshotMeta,
    /// The service's state as of `meta.last_included_index`, opaque to Raft.
    pub data: Bytes,
}

/// Everything a node persisted, handed back to the core on restart
/// ([`RaftCore::new`](crate::raft::RaftCore::new)). A brand-new node passes
/// `PersistedState::default()`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistedState {
    /// The last persisted hard state.
    pub hard_state: HardState,
    /// The last persisted snapshot, if any.
    pub snapshot: Option<Snapshot>,
    /// Every persisted log entry after the snapshot, in index order.
    pub entries: Vec<Entry>,
}

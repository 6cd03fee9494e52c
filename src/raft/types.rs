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

//! Typed errors of the Raft core's input methods.

use thiserror::Error;

use super::config::ConfigError;
use crate::NodeId;

/// Why [`RaftCore::new`](crate::raft::RaftCore::new) refused to build a core.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NewError {
    /// The configuration is invalid.
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    /// This node is not in the list of voters.
    #[error("node {id} is not one of the voters")]
    SelfNotVoter {
        /// This node's id.
        id: NodeId,
    },
    /// A voter appears twice in the list.
    #[error("voter {id} is listed twice")]
    DuplicateVoter {
        /// The repeated id.
        id: NodeId,
    },
    /// The persisted state handed back on restart is inconsistent (corrupted storage).
    #[error("persisted state is inconsistent: {reason}")]
    PersistedState {
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a proposal was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProposeError {
    /// This node is not the leader; try `leader_hint` if known.
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The node this one believes is leader.
        leader_hint: Option<NodeId>,
    },
    /// The leader is handing leadership over and accepts no proposals meanwhile.
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// The command exceeds `entry_bytes_max`.
    #[error("entry of {bytes} bytes exceeds entry_bytes_max ({max})")]
    EntryTooLarge {
        /// Size of the refused command.
        bytes: u64,
        /// The configured limit.
        max: u64,
    },
    /// Too many uncommitted bytes (`uncommitted_bytes_max`); retry later.
    #[error("uncommitted entries exceed uncommitted_bytes_max ({max})")]
    UncommittedFull {
        /// The configured limit.
        max: u64,
    },
}

/// Why a read-index request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReadIndexError {
    /// This node is not the leader; try `leader_hint` if known.
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The node this one believes is leader.
        leader_hint: Option<NodeId>,
    },
    /// `read_index_pending_max` requests are already waiting.
    #[error("too many pending read-index requests (max {max})")]
    TooManyPending {
        /// The configured limit.
        max: usize,
    },
}

/// Why a leadership transfer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TransferError {
    /// Only the leader can transfer leadership.
    #[error("not the leader (leader hint {leader_hint:?})")]
    NotLeader {
        /// The node this one believes is leader.
        leader_hint: Option<NodeId>,
    },
    /// The target is not a voter of this cluster.
    #[error("node {id} is not a voter")]
    UnknownNode {
        /// The requested target.
        id: NodeId,
    },
}

/// Why a service snapshot was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SnapshotError {
    /// The log is already compacted to `snapshot_index` ≥ `index`; nothing to do.
    #[error("snapshot at {index} is not newer than the current one at {snapshot_index}")]
    Stale {
        /// The index offered.
        index: u64,
        /// The current snapshot's last included index.
        snapshot_index: u64,
    },
    /// The snapshot claims entries the core has not handed to the service yet.
    #[error("snapshot at {index} is above the applied index {applied}")]
    NotApplied {
        /// The index offered.
        index: u64,
        /// The highest index handed out for applying.
        applied: u64,
    },
    /// The data exceeds `snapshot_bytes_max`.
    #[error("snapshot of {bytes} bytes exceeds snapshot_bytes_max ({max})")]
    TooLarge {
        /// Size of the data.
        bytes: u64,
        /// The configured limit.
        max: u64,
    },
}

/// Why a received message was dropped. The core's state is unchanged by a
/// dropped message; the driver should log the error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StepError {
    /// The message is addressed to another node.
    #[error("message for node {to} delivered to node {id}")]
    WrongRecipient {
        /// The addressee.
        to: NodeId,
        /// This node.
        id: NodeId,
    },
    /// The sender is not a voter of this cluster (or is this node itself).
    #[error("message from unknown node {from}")]
    UnknownSender {
        /// The claimed sender.
        from: NodeId,
    },
    /// The message contradicts itself (e.g. entries not contiguous).
    #[error("malformed {kind} message from {from}: {reason}")]
    Malformed {
        /// The sender.
        from: NodeId,
        /// Which message kind.
        kind: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The message would overwrite a committed entry: another node broke the protocol.
    #[error("message from {from} conflicts with committed entry {index}")]
    CommittedConflict {
        /// The sender.
        from: NodeId,
        /// The committed index it contradicts.
        index: u64,
    },
    /// A second leader claims this leader's term: another node broke the protocol.
    #[error("node {from} acts as leader in term {term}, which this node leads")]
    SecondLeader {
        /// The sender.
        from: NodeId,
        /// The term.
        term: u64,
    },
}

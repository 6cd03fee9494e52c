//! Typed errors of the node driver.

use thiserror::Error;

use super::config::NodeConfigError;
use crate::NodeId;
use crate::net::NetError;
use crate::raft::{NewError, ProposeError, ReadIndexError, ReadLost, SnapshotError, TransferError};
use crate::storage::StorageError;

/// Why [`RaftNode::start`](super::RaftNode::start) failed.
#[derive(Debug, Error)]
pub enum StartError {
    /// The node configuration is invalid.
    #[error("invalid node config: {0}")]
    Config(#[from] NodeConfigError),
    /// Reading the persisted Raft state failed.
    #[error("reading persisted raft state: {0}")]
    Storage(#[from] StorageError),
    /// The core refused to start (bad voters, inconsistent persisted state).
    #[error("raft core: {0}")]
    Core(#[from] NewError),
    /// The transport refused to open the Raft inbox (kind already taken, shut down).
    #[error("opening the raft inbox: {0}")]
    Net(#[from] NetError),
}

/// Why a request to a running node failed. Expected outcomes such as
/// "not the leader" are values here, never panics.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeError {
    /// The proposal was refused (not the leader, transfer in progress, too large, too many uncommitted bytes).
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// The read-index request was refused (not the leader, too many pending).
    #[error(transparent)]
    ReadIndex(#[from] ReadIndexError),
    /// The read-index request was accepted, but leadership was lost before it was confirmed.
    #[error(transparent)]
    ReadLost(#[from] ReadLost),
    /// The leadership transfer was refused.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The service snapshot was refused (stale, not applied, too large).
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The node has stopped (shut down, storage failure, transport closed); see `Status::stopped`.
    #[error("the raft node has stopped")]
    Stopped,
}

impl NodeError {
    /// `Some(hint)` when the request failed because this node is not (or is
    /// no longer) the leader; `hint` is the node it believes leads, if known.
    pub fn not_leader(&self) -> Option<Option<NodeId>> {
        match self {
            NodeError::Propose(ProposeError::NotLeader { leader_hint })
            | NodeError::ReadIndex(ReadIndexError::NotLeader { leader_hint })
            | NodeError::Transfer(TransferError::NotLeader { leader_hint })
            | NodeError::ReadLost(ReadLost { leader_hint }) => Some(*leader_hint),
            _ => None,
        }
    }
}

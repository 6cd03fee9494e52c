//! What the driver hands to the service (apply channel items), what it
//! reports (status and counters), and the Raft message envelope on the wire.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::net::{Kind, MessageRole};
use crate::raft::{Message, Role};
use crate::storage::GroupId;

/// One committed log entry handed to the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedEntry {
    /// Index of the entry in the log.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// The command proposed by the service, or `None` for an entry Raft
    /// appended for itself (a no-op a new leader commits before answering
    /// read-index requests). A `None` entry carries no command but still
    /// occupies its index: the service applies nothing and advances its
    /// applied index to `index`, so indexes stay contiguous.
    pub data: Option<Bytes>,
}

/// An item of the apply channel. Items arrive in log order: the indexes of
/// consecutive `Entries` items are contiguous, and a `Snapshot` replaces the
/// service's state with the state as of its `index`; entries after it follow
/// from `index + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Committed entries with consecutive indexes, at least one.
    Entries(Vec<CommittedEntry>),
    /// Replace the service's state with this snapshot: sent after a leader's
    /// snapshot was installed, and as the first item after a restart from a
    /// persisted snapshot.
    Snapshot {
        /// Last log index the snapshot covers.
        index: u64,
        /// Term of that entry.
        term: u64,
        /// The service's state, as it handed it to [`RaftNode::snapshot`](super::RaftNode::snapshot) on some node.
        data: Bytes,
    },
}

/// Why the driver stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// [`RaftNode::shutdown`](super::RaftNode::shutdown) was called.
    Shutdown,
    /// Every `RaftNode` handle was dropped.
    HandlesDropped,
    /// The transport closed the Raft inbox (it shut down, or the simulated node crashed).
    TransportClosed,
    /// A storage commit failed; the node stops rather than run on an unknown
    /// durable state (fail-stop). Reopen the storage and start a new node.
    StorageFailed(String),
    /// The driver panicked on a broken invariant; `shutdown` re-raises the panic.
    Panicked,
}

/// Counters of the driver's work since it started, for monitoring and for
/// measuring batching (entries per flush, entries per append).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metrics {
    /// `Ready`s handled.
    pub readies: u64,
    /// Storage commits (each one flush).
    pub flushes: u64,
    /// Log entries written by those commits.
    pub entries_persisted: u64,
    /// Append messages carrying at least one entry sent.
    pub append_messages_sent: u64,
    /// Entries carried by those append messages.
    pub append_entries_sent: u64,
    /// Raft messages handed to the transport.
    pub messages_sent: u64,
    /// Raft messages the transport refused (queue full, shut down).
    pub send_failures: u64,
    /// Raft messages received.
    pub messages_received: u64,
    /// Received messages dropped: wrong group, forged sender, or refused by the core.
    pub messages_rejected: u64,
    /// Proposals the core accepted.
    pub proposals_accepted: u64,
    /// Committed entries handed to the apply channel.
    pub entries_applied: u64,
    /// Snapshots received from a leader (InstallSnapshot) and installed;
    /// neither the node's own snapshots nor the one a restart starts from.
    pub snapshots_installed: u64,
    /// Ticks given to the core.
    pub ticks: u64,
    /// Storage commits that took at least 100 ms (each also logged as a warning).
    pub slow_commits: u64,
}

impl Metrics {
    /// Average entries per storage flush (0 when nothing was flushed).
    pub fn entries_per_flush(&self) -> f64 {
        ratio(self.entries_persisted, self.flushes)
    }

    /// Average entries per append message carrying entries.
    pub fn entries_per_append(&self) -> f64 {
        ratio(self.append_entries_sent, self.append_messages_sent)
    }
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

/// A node's state as of the end of the driver's last step.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Its Raft group.
    pub group: GroupId,
    /// Current term.
    pub term: u64,
    /// Current role.
    pub role: Role,
    /// Leader of the current term, if known.
    pub leader: Option<NodeId>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index handed towards the service (queued in the driver or in
    /// the apply channel; the service may not have read it yet).
    pub applied_index: u64,
    /// Index of the last log entry.
    pub last_index: u64,
    /// Last index covered by the latest snapshot.
    pub snapshot_index: u64,
    /// Set once the driver has stopped, with the reason.
    pub stopped: Option<StopReason>,
    /// Work counters.
    pub metrics: Metrics,
}

/// A Raft message on the wire: the core's [`Message`] tagged with its group.
/// One node (one Raft group) per [`Endpoint`](crate::net::Endpoint): the
/// driver owns the endpoint's inbox of this kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftEnvelope {
    /// The group the message belongs to; others are dropped.
    pub group: GroupId,
    /// The message.
    pub message: Message,
}

impl crate::net::Message for RaftEnvelope {
    /// Version 2: log entries of the replicated KV service may carry batches
    /// (`kv::BATCH_FORMAT`), which a version-1 node could not decode and would
    /// skip, so its state would diverge; nodes of the two versions refuse
    /// each other's Raft messages instead (upgrade every node of a cluster).
    const KIND: Kind = Kind::new(0x0100, 2);

    fn encoded_bytes_hint(&self) -> usize {
        self.message.encoded_bytes_hint()
    }

    /// Responses are counted by the simulated network like replies, so the
    /// lab's RPC counts compare with the reference's call-based Raft.
    fn role(&self) -> MessageRole {
        if self.message.is_response() {
            MessageRole::Response
        } else {
            MessageRole::Request
        }
    }
}

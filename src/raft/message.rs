//! The messages Raft peers exchange. They are plain serde types: the driver
//! encodes them (postcard) and sends them through the transport; the core
//! never sees bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::types::{Entry, SnapshotMeta};
use crate::NodeId;

/// One message between two Raft peers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient.
    pub to: NodeId,
    /// The sender's current term, except for pre-votes, which carry the term
    /// the sender would campaign in, and granted pre-vote responses, which
    /// echo that term.
    pub term: u64,
    /// What the message says.
    pub body: MessageBody,
}

/// Outcome of an append at a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendOutcome {
    /// The follower's log matches the leader's up to `match_index`.
    Success {
        /// Last index known to match the leader's log.
        match_index: u64,
    },
    /// The follower does not have an entry matching `prev_log_index`/`prev_log_term`.
    Conflict {
        /// `prev_log_index` of the rejected append (lets the leader ignore stale rejections).
        rejected_index: u64,
        /// First index the leader should try next (fast backup hint, §5.3).
        conflict_index: u64,
        /// Term of the follower's entry at `rejected_index`, if it has one.
        conflict_term: Option<u64>,
    },
}

/// The body of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Would you vote for me in `term`? Does not change anybody's term.
    PreVote {
        /// Index of the sender's last log entry.
        last_log_index: u64,
        /// Term of the sender's last log entry.
        last_log_term: u64,
    },
    /// Answer to [`MessageBody::PreVote`].
    PreVoteResponse {
        /// Whether the pre-vote is granted.
        granted: bool,
    },
    /// RequestVote (§5.2).
    Vote {
        /// Index of the candidate's last log entry.
        last_log_index: u64,
        /// Term of the candidate's last log entry.
        last_log_term: u64,
        /// The election was started by a leadership transfer: receivers
        /// disregard their leader lease.
        leadership_transfer: bool,
    },
    /// Answer to [`MessageBody::Vote`].
    VoteResponse {
        /// Whether the vote is granted.
        granted: bool,
    },
    /// AppendEntries with entries (§5.3); an empty one probes the follower's log.
    Append {
        /// Index of the entry preceding `entries`.
        prev_log_index: u64,
        /// Term of that entry.
        prev_log_term: u64,
        /// Entries to append, with consecutive indexes from `prev_log_index + 1`.
        entries: Vec<Entry>,
        /// The leader's commit index.
        leader_commit: u64,
    },
    /// Answer to [`MessageBody::Append`].
    AppendResponse {
        /// Whether and how far the follower's log now matches.
        outcome: AppendOutcome,
    },
    /// Heartbeat: keeps the leader's authority, carries a commit index and a
    /// read-index round number.
    Heartbeat {
        /// Commit index the follower may adopt (never above what it has acknowledged).
        leader_commit: u64,
        /// Read-index round the follower echoes back.
        read_round: u64,
    },
    /// Answer to [`MessageBody::Heartbeat`]; also a stale-term notice to an old leader.
    HeartbeatResponse {
        /// The echoed read-index round.
        read_round: u64,
    },
    /// One chunk of a snapshot (§7).
    InstallSnapshot {
        /// Where the snapshot sits in the log.
        meta: SnapshotMeta,
        /// Size of the whole snapshot data, in bytes.
        total_bytes: u64,
        /// Byte offset of this chunk in the snapshot data.
        offset: u64,
        /// The chunk.
        data: Bytes,
        /// This is the last chunk.
        done: bool,
    },
    /// Answer to [`MessageBody::InstallSnapshot`].
    InstallSnapshotResponse {
        /// Which snapshot this answers.
        last_included_index: u64,
        /// Offset of the next chunk the follower expects.
        next_offset: u64,
        /// The follower has installed the snapshot (or already had everything it covers).
        done: bool,
    },
    /// Leadership transfer: start an election now, ignoring pre-vote and leases.
    TimeoutNow,
}

impl Message {
    /// True for responses, false for requests (useful when counting RPCs the way the labs do).
    pub fn is_response(&self) -> bool {
        matches!(
            self.body,
            MessageBody::PreVoteResponse { .. }
                | MessageBody::VoteResponse { .. }
                | MessageBody::AppendResponse { .. }
                | MessageBody::HeartbeatResponse { .. }
                | MessageBody::InstallSnapshotResponse { .. }
        )
    }

    /// True for the messages a driver may send before the `Ready` that
    /// produced them is durable, provided that Ready changes no hard state: a
    /// leader's appends and heartbeats (Ongaro's thesis §10.2.1). They carry
    /// entries and a commit index but promise nothing about the sender's own
    /// disk — the leader counts itself towards a commit only once its entries
    /// are persisted — so followers can flush in parallel with the leader.
    pub fn may_precede_persistence(&self) -> bool {
        matches!(
            self.body,
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
        )
    }

    /// About how many bytes the message takes encoded (an estimate from
    /// above for the fixed fields; exact sizing is not needed).
    pub(crate) fn encoded_bytes_hint(&self) -> usize {
        /// Fixed fields of a message, and of an entry, varint-encoded at most.
        const HEADER_BYTES: usize = 64;
        const ENTRY_HEADER_BYTES: usize = 24;
        match &self.body {
            MessageBody::Append { entries, .. } => entries.iter().fold(HEADER_BYTES, |bytes, e| {
                bytes + ENTRY_HEADER_BYTES + e.data.len()
            }),
            MessageBody::InstallSnapshot { data, .. } => HEADER_BYTES + data.len(),
            _ => HEADER_BYTES,
        }
    }
}

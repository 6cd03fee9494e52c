//! Tunables of the node driver (queues, tick period), on top of the core's
//! [`Config`].

use thiserror::Error;

use crate::raft::{Config, ConfigError};
use crate::storage::GroupId;

/// Configuration of one [`RaftNode`](super::RaftNode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The protocol core's configuration (timeouts in ticks, message limits).
    pub raft: Config,
    /// The Raft group this node belongs to: its key space in storage, and the
    /// group id carried by (and checked on) every message. Default 0.
    pub group: GroupId,
    /// Period of the core's logical clock, in milliseconds. The core's
    /// defaults (election timeout 30–60 ticks, heartbeat every 10 ticks) are
    /// chosen for 10 ms. Default 10.
    pub tick_interval_ms: u64,
    /// Seed of the core's random generator (randomized election timeouts).
    /// Give every node (and every restart) a different seed. Default 0.
    pub rng_seed: u64,
    /// Proposals waiting for the driver; [`RaftNode::propose`] waits for room
    /// when the queue is full. Default 4096.
    ///
    /// [`RaftNode::propose`]: super::RaftNode::propose
    pub proposal_queue_max: usize,
    /// Control requests (read index, snapshot, transfer) waiting for the
    /// driver; callers wait for room when full. Default 1024.
    pub control_queue_max: usize,
    /// Raft messages received and not yet handled; more are dropped by the
    /// transport (Raft retransmits). Default 4096.
    pub inbox_capacity_messages: usize,
    /// Items (batches of committed entries, snapshots) in the apply channel.
    /// While it is full the driver pauses: it still serves control requests
    /// and finishes the work already started, but stops ticking, receiving
    /// messages and taking proposals until the service reads. Default 64.
    pub apply_channel_items_max: usize,
    /// Most inputs (messages, proposals, control requests) gathered into one
    /// `Ready`, i.e. the largest group commit. Default 8192.
    pub inputs_per_ready_max: usize,
    /// On a multi-thread tokio runtime, run each storage commit under
    /// `tokio::task::block_in_place` so a flush does not stall the other tasks
    /// of the worker thread. Ignored on a current-thread runtime, where
    /// commits run inline (which keeps simulations deterministic). Set it to
    /// false for storage whose commits never wait for a disk (`MemStore`).
    /// Default true.
    pub block_in_place_for_storage: bool,
    /// Send a leader's appends and heartbeats before its own flush of the
    /// same `Ready` completes, when that Ready changes no hard state (Ongaro's
    /// thesis §10.2.1; see [`Message::may_precede_persistence`]). Followers
    /// then write in parallel with the leader, so a commit waits for about one
    /// flush instead of two; safety is unchanged, since the leader counts
    /// itself towards a commit only once its entries are durable. `false`
    /// keeps the strict order (flush, then send). Default true.
    ///
    /// [`Message::may_precede_persistence`]: crate::raft::Message::may_precede_persistence
    pub send_appends_before_persist: bool,
    /// Run storage commits on a dedicated OS thread of this node and persist
    /// asynchronously ([`RaftCore::advance_unpersisted`]): the driver hands
    /// each `Ready`'s batch over and goes on taking inputs and `Ready`s; the
    /// thread commits every batch queued at that moment as one (group commit
    /// across `Ready`s), and each `Ready`'s messages leave only once it is
    /// durable, so the persist-before-send contract holds. For real servers
    /// on a current-thread runtime, where a flush would otherwise stall every
    /// task. (A follower still flushes inline while nothing is in flight:
    /// `followers_flush_inline`.) Off by default: simulations need commits
    /// inline to stay deterministic. Takes precedence over
    /// `block_in_place_for_storage`.
    ///
    /// [`RaftCore::advance_unpersisted`]: crate::raft::RaftCore::advance_unpersisted
    pub storage_thread: bool,
    /// With `storage_thread` (or `async_persistence`), a node that is not
    /// leading and has no `Ready` in flight commits its `Ready` inline on the
    /// driver task (under `block_in_place` when that applies), then sends its
    /// messages.
    /// A follower has little to overlap with its flush (its acknowledgements
    /// wait for it; clients it only redirects), while the hand-over costs two
    /// thread wake-ups on the path of every commit: on a 2-vCPU VM with three
    /// nodes this gave +13 % puts/s at 64 clients and +15 % at 1. On a
    /// current-thread runtime the flush stalls the node's other tasks
    /// (its transport, status requests) for its duration. A Ready that
    /// persists a snapshot (a large write) still goes to the thread. A leader
    /// always hands over, so it keeps taking proposals during its flush; a
    /// node that stops leading with Readies in flight goes on queueing behind
    /// them until they are durable, so batches reach the store in order.
    /// Default true.
    pub followers_flush_inline: bool,
    /// Persist asynchronously ([`RaftCore::advance_unpersisted`]) also
    /// without a storage thread: each Ready's batch waits for a later turn
    /// of the driver's loop (and is lost if the node stops first, like the
    /// unflushed writes of a crash), is committed inline then, and answered
    /// through the same channel as the thread's, so the driver keeps Readies
    /// in flight and holds their messages exactly as with the thread,
    /// deterministically. For tests of that path on a paused clock;
    /// `storage_thread` implies it. Default false.
    ///
    /// [`RaftCore::advance_unpersisted`]: crate::raft::RaftCore::advance_unpersisted
    pub async_persistence: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            raft: Config::default(),
            group: 0,
            tick_interval_ms: 10,
            rng_seed: 0,
            proposal_queue_max: 4096,
            control_queue_max: 1024,
            inbox_capacity_messages: 4096,
            apply_channel_items_max: 64,
            inputs_per_ready_max: 8192,
            block_in_place_for_storage: true,
            send_appends_before_persist: true,
            storage_thread: false,
            followers_flush_inline: true,
            async_persistence: false,
        }
    }
}

/// Why a [`NodeConfig`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NodeConfigError {
    /// The core's configuration is invalid.
    #[error("invalid raft config: {0}")]
    Raft(#[from] ConfigError),
    /// A count, capacity or period is zero.
    #[error("{field} must be at least 1")]
    LimitZero {
        /// Name of the offending field.
        field: &'static str,
    },
}

impl NodeConfig {
    /// Checks every field, including the core's configuration.
    pub fn validate(&self) -> Result<(), NodeConfigError> {
        self.raft.validate()?;
        let nonzero: [(&'static str, u64); 6] = [
            ("tick_interval_ms", self.tick_interval_ms),
            ("proposal_queue_max", self.proposal_queue_max as u64),
            ("control_queue_max", self.control_queue_max as u64),
            (
                "inbox_capacity_messages",
                self.inbox_capacity_messages as u64,
            ),
            (
                "apply_channel_items_max",
                self.apply_channel_items_max as u64,
            ),
            ("inputs_per_ready_max", self.inputs_per_ready_max as u64),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(NodeConfigError::LimitZero { field });
            }
        }
        Ok(())
    }
}

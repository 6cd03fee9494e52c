//! The node driver: runs one [`RaftCore`](crate::raft::RaftCore) on tokio
//! with real storage, a real transport and a real clock. This is the only
//! part of `raft/` that uses tokio; it reaches storage only through
//! [`RaftLogStorage`](crate::storage::RaftLogStorage) (so it runs on sled's
//! `Store` and on `MemStore` alike) and the network only through an
//! [`Endpoint`](crate::net::Endpoint) (simulated or TCP).
//!
//! # The loop
//!
//! One task per node. Each turn it waits for one input — a tick from a
//! `tokio::time::interval` (`tick_interval_ms`), a received message, a
//! proposal, a control request (read index, snapshot, leadership transfer)
//! or a stop — feeds it to the core, then **drains every input already
//! queued** (at most `inputs_per_ready_max`) into the core as well, and only
//! then takes `Ready`s. That is group commit: however many proposals and
//! acknowledgements arrived meanwhile, they cost one flush. For each
//! `Ready`, in the order of its contract:
//!
//! 1. **persist** — one [`WriteBatch`](crate::storage::WriteBatch) holding
//!    the snapshot (with the log compaction or discard it implies), the
//!    truncation of a conflicting suffix, the new entries and the hard
//!    state, committed atomically with one flush; the stored log's last index
//!    is read back and asserted equal to the core's;
//! 2. **send** the messages, only now that they are backed by durable state
//!    (votes, acknowledgements). A leader counts its own new entries toward
//!    commit only at step 4, so they too are durable first;
//! 3. **queue for the service**: the snapshot to apply and the committed
//!    entries go to the apply queue; read-index results answer their callers;
//! 4. **advance** the core.
//!
//! Storage commits run inline on the driver task (under
//! `tokio::task::block_in_place` on a multi-thread runtime when
//! `block_in_place_for_storage` is set), so a current-thread runtime with a
//! paused clock replays a seed exactly. A failed commit stops the node
//! (fail-stop: [`StopReason::StorageFailed`]). A received message that is
//! malformed, for another group, with a forged sender, or refused by the
//! core is logged, counted in [`Metrics::messages_rejected`] and dropped —
//! never a panic.
//!
//! # Applying
//!
//! The apply channel (capacity `apply_channel_items_max` items) carries
//! [`Apply`] items in log order: batches of [`CommittedEntry`] (one per
//! `Ready`, bounded by the core's `apply_batch_bytes_max`) and snapshots.
//! Entries Raft appended for itself (no-ops) arrive with `data: None` so the
//! service can keep its applied index contiguous.
//!
//! # Backpressure
//!
//! Every queue is bounded. `propose` waits while `proposal_queue_max`
//! proposals are queued; control requests likewise (`control_queue_max`);
//! the transport drops Raft messages beyond `inbox_capacity_messages` (Raft
//! retransmits). When the service does not keep up and the apply channel is
//! full, the driver **pauses**: it stops ticking, receiving messages and
//! taking proposals (so the node looks slow to its peers, and a paused leader
//! may be replaced), but it keeps serving control requests — a service may
//! call [`RaftNode::snapshot`] from its apply loop without deadlocking — and
//! resumes as soon as the channel has room. The core's
//! `uncommitted_bytes_max` bounds what a leader accepts ahead of commit.
//!
//! # Shutdown
//!
//! [`RaftNode::shutdown`] signals the task and waits for it to end. The
//! task checks the signal between inputs, never in the middle of a `Ready`,
//! and owns the only storage handle the driver uses; when `shutdown` returns
//! the task has finished and dropped that handle, so this instance performs
//! no further storage writes and a new node may reopen the same storage (as
//! the labs' crash-and-restart does). The apply channel closes, pending
//! requests fail with [`NodeError::Stopped`]. The node also stops by itself
//! when its transport closes the inbox, when every handle is dropped, or
//! when storage fails; [`Status::stopped`] says why.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use raftkv::net::sim::{SimConfig, SimNetwork};
//! use raftkv::raft::{Apply, NodeConfig, RaftNode, Role};
//! use raftkv::storage::{MemDisk, MemStore};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let network = SimNetwork::new(SimConfig::new(1));
//! let store = MemStore::open(&MemDisk::new())?;
//! // A one-node cluster elects itself after an election timeout.
//! let (node, mut applied) = RaftNode::start(1, &[1], NodeConfig::default(), store, network.add_node(1)?)?;
//! node.subscribe().wait_for(|status| status.role == Role::Leader).await?;
//! let (index, _term) = node.propose(Bytes::from_static(b"x")).await?;
//! match applied.recv().await {
//!     Some(Apply::Entries(entries)) => assert_eq!(entries[0].index, index),
//!     other => panic!("unexpected {other:?}"),
//! }
//! assert_eq!(node.read_index().await?, index);
//! node.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod node;
mod task;
mod types;

pub use config::{NodeConfig, NodeConfigError};
pub use error::{NodeError, StartError};
pub use node::{RaftNode, load_persisted};
pub use types::{Apply, CommittedEntry, Metrics, RaftEnvelope, Status, StopReason};

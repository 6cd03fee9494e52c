//! Raft consensus: a pure, deterministic protocol core (no clocks, threads,
//! sockets or disk) and the driver that performs its I/O.
//!
//! Invariant: nothing under `raft/` except the driver (`raft/driver/`)
//! imports tokio, and nothing under `raft/` imports sled.
//!
//! # The core
//!
//! [`RaftCore`] is a sans-I/O state machine in the style of etcd-raft's
//! `RawNode`. Its inputs are [`tick`](RaftCore::tick),
//! [`step`](RaftCore::step) (a received [`Message`]),
//! [`propose`](RaftCore::propose), [`read_index`](RaftCore::read_index),
//! [`transfer_leader`](RaftCore::transfer_leader) and
//! [`snapshot`](RaftCore::snapshot) (the service hands over its snapshot).
//! Its output is a [`Ready`]: what to persist, what to send (only after
//! persisting), what to apply. A driver loops:
//!
//! ```
//! use bytes::Bytes;
//! use rand::SeedableRng;
//! use raftkv::raft::{Config, PersistedState, RaftCore};
//!
//! // A one-node cluster elects itself and commits a proposal.
//! let rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
//! let mut core = RaftCore::new(1, &[1], Config::default(), PersistedState::default(), rng)?;
//! let mut applied = Vec::new();
//! for _ in 0..100 {
//!     core.tick();
//!     if core.is_leader() && applied.is_empty() && core.last_index() == 0 {
//!         core.propose(Bytes::from_static(b"x"))?;
//!     }
//!     while core.has_ready() {
//!         let ready = core.ready();
//!         // 1. persist ready.snapshot, log_truncate_from, entries, hard_state (one atomic flush)
//!         // 2. send ready.messages
//!         // 3. apply ready.snapshot_to_apply, ready.committed_entries; answer ready.read_states
//!         applied.extend(ready.committed_entries.iter().map(|e| e.data.clone()));
//!         core.advance(ready);
//!     }
//! }
//! assert_eq!(applied, vec![Bytes::from_static(b"x")]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The core keeps the log suffix after the latest snapshot in memory, so the
//! service bounds the core's memory by snapshotting regularly.
//!
//! # The driver
//!
//! [`RaftNode`] runs a core on tokio over any
//! [`RaftLogStorage`](crate::storage::RaftLogStorage) and an
//! [`Endpoint`](crate::net::Endpoint), with group commit and an apply
//! channel; see the [`driver`] module.

mod config;
mod core;
pub mod driver;
mod error;
mod log;
mod message;
mod progress;
mod ready;
mod types;

#[cfg(test)]
mod core_tests;

pub use config::{Config, ConfigError};
pub use core::{PersistToken, RaftCore, Role, TERM_INDEX_MAX};
pub use driver::{
    Apply, CommittedEntry, Metrics, NodeConfig, NodeConfigError, NodeError, RaftEnvelope, RaftNode,
    StartError, Status, StopReason,
};
pub use error::{NewError, ProposeError, ReadIndexError, SnapshotError, StepError, TransferError};
pub use message::{AppendOutcome, Message, MessageBody};
pub use ready::{ReadLost, ReadState, Ready};
pub use types::{Entry, EntryKind, HardState, PersistedState, Snapshot, SnapshotMeta};

//! Raft consensus: a pure, deterministic protocol core (no clocks, threads,
//! sockets or disk) and the driver that performs its I/O.
//!
//! Invariant: nothing under `raft/` except the driver imports sled or tokio.

mod types;

pub use types::{Entry, EntryKind, HardState, SnapshotMeta};

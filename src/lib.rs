//! raftkv: an embeddable replicated storage engine.
//!
//! raftkv gives an application durable, replicated state: a sled-backed
//! persister ([`storage`]), a Raft implementation with a pure protocol core
//! ([`raft`]), a transport with a simulated faulty network and TCP ([`net`]),
//! a versioned key/value service ([`kv`]) with a linearizability checker
//! ([`check`]), and a MapReduce framework ([`mr`]).
//!
//! See `ARCHITECTURE.md` for the codemap and the invariants between modules.
#![deny(missing_docs)]

pub mod check;
pub mod kv;
pub mod mr;
pub mod net;
pub mod raft;
pub mod rsm;
pub mod storage;

/// Identifier of a node (a server process) in a cluster.
pub type NodeId = u64;

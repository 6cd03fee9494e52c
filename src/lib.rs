//! raftkv: an embeddable replicated storage engine.
//!
//! raftkv gives an application durable, replicated state: a persister on
//! its own write-ahead log or on sled ([`storage`]), a Raft implementation with a pure protocol core
//! ([`raft`]), a transport with a simulated faulty network and TCP ([`net`]),
//! a versioned key/value service ([`kv`]) with a linearizability checker
//! ([`check`]), and a MapReduce framework ([`mr`]).
//!
//! See `ARCHITECTURE.md` for the codemap and the invariants between modules.
//!
//! # Embedding a replicated state machine
//!
//! An application gets replicated, durable state in four steps; the program
//! at the end of this section does all of them (it is
//! `examples/embedded_cluster.rs`, and `cargo test` compiles and runs it).
//!
//! 1. **Describe the state machine.** Implement [`rsm::StateMachine`]: a
//!    `Command` type (what goes into the log), how to encode and decode it,
//!    `apply` (deterministic: same commands in the same order give the same
//!    state on every replica), and `snapshot`/`restore` of the whole state.
//! 2. **Give each node a store and a transport.** [`storage::Store::open`]
//!    opens (or creates) a node's data directory;
//!    [`net::tcp::TcpTransport`] connects the nodes (the simulated network,
//!    [`net::sim::SimNetwork`], does the same in tests).
//! 3. **Start a replica per node** with [`rsm::Rsm::start`]. Set
//!    [`rsm::RsmConfig::maxraftstate_bytes`] to snapshot the state machine and
//!    compact the log once it reaches that size. A replica restarted on the
//!    same directory replays its snapshot and log.
//! 4. **Submit and read.** [`rsm::Rsm::submit`] returns a command's output
//!    once a majority has it durably and it was applied; a follower answers
//!    [`rsm::SubmitError::NotLeader`] with a hint. [`rsm::Rsm::read`] is a
//!    linearizable read that writes nothing to the log (ReadIndex);
//!    [`rsm::Rsm::read_local`] reads a replica's own, possibly stale, copy.
//!
//! The key/value service ([`kv::RaftKvServer`]) is this same recipe with
//! [`kv::KvStateMachine`]; the `raftkv server` command runs it.
//!
//! ```rust
#![doc = include_str!("../examples/embedded_cluster.rs")]
//! ```
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

//! Versioned key/value service: the state machine, the Clerk (with its
//! ErrMaybe rule), the lock built on it, the RPC on the net layer and the
//! single-node server. Everything but `rpc` and `server` is pure or
//! transport-independent: servers (single-node on a store, replicated on
//! Raft) and transports (simulated, TCP) plug in from the outside.
//!
//! - [`types`]: the wire types ([`KvCommand`], [`KvReply`], [`KvError`]), the
//!   size limits and the command encoding carried by Raft log entries.
//! - [`state_machine`]: the Lab 2 rules as one pure function ([`apply`]),
//!   the [`VersionedMap`] trait and the in-memory [`MemoryKv`].
//! - [`clerk`]: the [`Clerk`] over any [`KvRpc`] transport.
//! - [`lock`]: a [`Lock`] (optionally with a lease) over any [`KvClient`].
//! - [`rpc`]: the request kind and reply type on the net layer, and
//!   [`EndpointRpc`], the [`KvRpc`] over a [`crate::net::Endpoint`].
//! - [`server`]: the single-node [`KvServer`] with group commit.
//! - [`replicated`]: the [`RaftKvServer`], the same service replicated on Raft.
//! - [`status`]: the status RPC of a replica ([`StatusRequest`] →
//!   [`NodeStatus`]), what `raftkv status` shows.
//!
//! This module must not touch sockets, files or sled directly: `rpc` and
//! `server` go through [`crate::net::Endpoint`] and the storage traits.
//! Time is tokio time.

pub mod clerk;
pub mod lock;
pub mod replicated;
pub mod rpc;
pub mod server;
pub mod state_machine;
pub mod status;
pub mod types;

pub use clerk::{Clerk, ClerkConfig, ClerkConfigError, KvClient, KvRpc, NoReply};
pub use lock::{FencingToken, Lock, LockConfig, LockError, LockGrant, LockRecord, OWNER_BYTES_MAX};
pub use replicated::{
    BATCH_BYTES_MAX, BATCH_COMMANDS_MAX, BATCH_FORMAT, KV_ENTRY_BYTES_MAX_DEFAULT,
    KV_SNAPSHOT_FORMAT, KvLogCommand, KvLogReply, KvStateMachine, RaftKvConfig, RaftKvError,
    RaftKvServer,
};
pub use rpc::{EndpointRpc, KV_REQUEST_KIND, KvResponse, ServerUnavailable};
pub use server::{KvServer, KvServerConfig, KvServerError, KvServerStats};
pub use state_machine::{Applied, MemoryKv, VersionedMap, apply, execute};
pub use status::{
    KV_STATUS_KIND, NodeCounters, NodeRole, NodeStatus, StatusRequest, fetch_status, serve_status,
};
pub use types::{
    COMMAND_BYTES_MAX, COMMAND_FORMAT, DecodeError, KEY_BYTES_MAX, KvCommand, KvError, KvReply,
    REPLY_BYTES_MAX, REPLY_FORMAT, SizeLimitedField, VALUE_BYTES_MAX, Version, Versioned,
};

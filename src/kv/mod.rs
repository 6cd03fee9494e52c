//! Versioned key/value service: the state machine, the Clerk (with its
//! ErrMaybe rule) and the lock built on it. Everything here is pure or
//! transport-independent: servers (single-node on sled, replicated on Raft)
//! and transports (simulated, TCP) plug in from the outside.
//!
//! - [`types`]: the wire types ([`KvCommand`], [`KvReply`], [`KvError`]), the
//!   size limits and the command encoding carried by Raft log entries.
//! - [`state_machine`]: the Lab 2 rules as one pure function ([`apply`]),
//!   the [`VersionedMap`] trait and the in-memory [`MemoryKv`].
//! - [`clerk`]: the [`Clerk`] over any [`KvRpc`] transport.
//! - [`lock`]: a [`Lock`] (optionally with a lease) over any [`KvClient`].
//!
//! This module must not touch sockets, files or sled; time is tokio time.

pub mod clerk;
pub mod lock;
pub mod state_machine;
pub mod types;

pub use clerk::{Clerk, ClerkConfig, ClerkConfigError, KvClient, KvRpc, NoReply};
pub use lock::{FencingToken, Lock, LockConfig, LockError, LockGrant, LockRecord, OWNER_BYTES_MAX};
pub use state_machine::{Applied, MemoryKv, VersionedMap, apply, execute};
pub use types::{
    COMMAND_BYTES_MAX, COMMAND_FORMAT, DecodeError, KEY_BYTES_MAX, KvCommand, KvError, KvReply,
    REPLY_BYTES_MAX, REPLY_FORMAT, SizeLimitedField, VALUE_BYTES_MAX, Version, Versioned,
};

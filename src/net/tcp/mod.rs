//! The TCP transport: one listen address per node, a handshake on every
//! connection, length-delimited postcard frames (see [`crate::net::wire`]).
//!
//! Connections are one-directional in use: node A sends its requests and
//! one-way messages to B on the connection A opened to B, and B answers on
//! that same connection. So one-way messages from A to B are written by one
//! task, in order; after a connection loss the messages still queued go out
//! on the next connection, those already written may be lost, none is sent
//! twice. A node without a listen address (a client such as a command-line
//! Clerk) can call servers; servers cannot call it.
//!
//! Bounds and what happens at each (all in [`TcpConfig`]):
//! - outbound queue per peer (`outbound_queue_frames_max`): when full, a
//!   one-way message is dropped (`send` returns [`NetError::QueueFull`] and
//!   it is counted in [`TcpStats::messages_dropped`]; Raft tolerates lost
//!   messages) and a call fails at once with [`NetError::QueueFull`];
//! - while a peer is unreachable (its last connection attempt failed, the
//!   link waits out its backoff) calls fail at once with
//!   [`NetError::Unreachable`] and one-way messages are dropped; reconnect
//!   attempts back off exponentially from `reconnect_backoff_min` to
//!   `reconnect_backoff_max`;
//! - frame size (`frame_bytes_max`, default 16 MiB; 256 bytes during the
//!   handshake): a larger incoming frame, garbage, a truncated frame or a
//!   protocol violation closes that connection with a logged warning; the
//!   node keeps serving every other connection;
//! - handshake (`handshake_timeout`): a peer that does not complete it in
//!   time is dropped; a wrong magic, protocol version or cluster id is
//!   refused and logged;
//! - requests handled at once per inbound connection
//!   (`inbound_calls_per_connection_max`): beyond it the connection is not
//!   read until one finishes; inbound connections (`inbound_connections_max`).
//!
//! Optional busy polling ([`TcpConfig::busy_poll`], [`BusyPoll`]) keeps the
//! runtime thread polling its sockets for a window after every frame instead
//! of sleeping, trading a busy CPU for the wake-up of each hop.
//!
//! [`NetError`]: crate::net::NetError
//! [`NetError::QueueFull`]: crate::net::NetError::QueueFull
//! [`NetError::Unreachable`]: crate::net::NetError::Unreachable

mod busy_poll;
mod config;
mod inbound;
mod outbound;
mod transport;

pub use busy_poll::{BusyPoll, BusyPollStats};
pub use config::{BUSY_POLL_WINDOW_MAX, TcpConfig};
pub use transport::{TcpStats, TcpTransport};

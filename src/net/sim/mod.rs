//! The simulated network: the reference course's "labrpc" network, in
//! process, driven by one seed.
//!
//! Every random choice (delays, drops, reordering, how long a cut link takes
//! to report "no reply") comes from one ChaCha generator seeded by
//! [`SimConfig::seed`], drawn when a request or message is sent. All waiting
//! uses tokio's clock, so under a paused clock (`#[tokio::test(start_paused =
//! true)]`, current-thread runtime) seconds of protocol time take
//! milliseconds and the same seed gives the same schedule, provided the code
//! under test draws no unseeded randomness itself (beware `tokio::select!`
//! without `biased;`).
//!
//! Faults, with the reference numbers:
//! - unreliable mode: each request or one-way message first waits 0–26 ms;
//!   10 % of them are dropped; 10 % of replies are dropped;
//! - long reordering: 600 of 900 replies are held back
//!   200 ms + rand(0..1 + rand(0..2000)) ms;
//! - a disabled link or a missing (crashed) node never answers: the call
//!   reports "no reply" after 0–7000 ms with long delays on, else 0–100 ms;
//! - a crash deletes the node's incarnation: handlers stop, replies still in
//!   flight are suppressed, its inboxes close; a restart creates a fresh
//!   incarnation with a new endpoint;
//! - counters: RPCs received per node, total RPCs and bytes (request
//!   payloads plus delivered reply payloads); a one-way message counts as one
//!   RPC, unless it is a [`crate::net::MessageRole::Response`], which is
//!   counted like a reply (its bytes, once delivered).
//!
//! One-way messages go through the same link state, unreliable delay and
//! drops and counters as requests, but by default stay in order per (sender,
//! receiver): a message is delivered no earlier than the one sent before it.
//! Long reordering applies to replies only, as in the reference.
//! [`SimNetwork::set_unordered_messages`] delivers each one-way message on its
//! own instead, like a labrpc call (its own unreliable delay; response-like
//! messages held back under long reordering), which is how a protocol built
//! on one-way messages meets the reference's reordering.
//!
//! Links are directed and addressed by node id; a client (a Clerk) is a node
//! too (see [`SimNetwork::add_client`]), so cutting one client's link to one
//! server is `set_link`. Links of a node id survive its crash and restart.

mod network;
mod node;

pub use network::{CLIENT_ID_BASE, SimConfig, SimEvent, SimNetwork, SimOutcome};

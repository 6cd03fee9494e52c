//! Transport and request/response RPC between nodes: a simulated faulty
//! network for deterministic tests, and TCP for real clusters.
//!
//! Two layers:
//! - [`Transport`], object safe and byte level: `call` (request → reply or
//!   [`NetError`]), `send` (one-way, in order per peer), `register` (a raw
//!   handler per [`Kind`]), `open_inbox` (one-way messages of a kind).
//!   Implemented by the simulated network ([`sim`]) and by TCP ([`tcp`]).
//! - [`Endpoint`], typed, over `Arc<dyn Transport>`: request types implement
//!   [`Rpc`], one-way types implement [`Message`]; both are serde types
//!   encoded with postcard. Code written against `Endpoint` runs unchanged on
//!   both networks.
//!
//! ```
//! use raftkv::net::{Endpoint, Kind, Rpc, sim::{SimConfig, SimNetwork}};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Echo(String);
//! impl Rpc for Echo {
//!     const KIND: Kind = Kind::new(0xf000, 1);
//!     type Reply = String;
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), raftkv::net::NetError> {
//! let network = SimNetwork::new(SimConfig::new(7));
//! let server: Endpoint = network.add_node(1)?;
//! server.register(|_from, Echo(text): Echo| async move { text })?;
//! let client = network.add_client();
//! let reply = client.call(1, &Echo("hi".into())).await?;
//! assert_eq!(reply, "hi");
//! # Ok(())
//! # }
//! ```
//!
//! This module owns sockets and the simulated network; it knows nothing of
//! Raft, KV or MapReduce, and touches neither disk nor sled.

mod dispatch;
mod endpoint;
mod error;
mod kind;
pub mod sim;
pub mod tcp;
mod transport;
pub mod wire;

pub use endpoint::{Endpoint, INBOX_CAPACITY_MESSAGES_DEFAULT, Inbox, Message, Rpc};
pub use error::{NetError, RemoteFault};
pub use kind::{Kind, PROTOCOL_VERSION};
pub use transport::{CallFuture, HandlerFuture, MessageRole, RawHandler, RawInbox, Transport};

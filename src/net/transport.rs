//! The object-safe, byte-level transport interface that both the simulated
//! network and TCP implement.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::NodeId;
use crate::net::{Kind, NetError, RemoteFault};

/// What a raw handler produces: the encoded reply, or a fault sent back
/// instead of a reply.
pub type HandlerFuture = BoxFuture<'static, Result<Bytes, RemoteFault>>;

/// A byte-level request handler: `(caller, encoded request) -> encoded reply`.
pub type RawHandler = Arc<dyn Fn(NodeId, Bytes) -> HandlerFuture + Send + Sync>;

/// What [`Transport::call`] returns: the encoded reply or an error.
pub type CallFuture = BoxFuture<'static, Result<Bytes, NetError>>;

/// A byte-level message transport between nodes.
///
/// Contract shared by every implementation (and checked by the behaviour
/// suite in `tests/net_behaviour.rs`):
/// - `call` sends the request when it is invoked (not when the future is first
///   polled); the future resolves to the reply, or to
///   [`NetError::NoReply`] when no reply arrives (the request may or may not
///   have run), or to another error meaning the request was not executed.
/// - `send` is fire-and-forget. `Ok(())` means accepted for transmission, not
///   delivered. One-way messages from one node to another are delivered in the
///   order they were sent, with possible losses, never duplicated.
/// - Each kind id has at most one handler or one inbox per node.
/// - After `shutdown` (or a simulated crash) every call and send fails with
///   [`NetError::Shutdown`], handlers stop being invoked and inboxes close.
pub trait Transport: Send + Sync + 'static {
    /// The id of the node this transport belongs to.
    fn local_id(&self) -> NodeId;

    /// Sends a request of `kind` to `to` and waits for its reply, at most
    /// `timeout` (or the transport's default call timeout when `None`).
    fn call(&self, to: NodeId, kind: Kind, payload: Bytes, timeout: Option<Duration>)
    -> CallFuture;

    /// Sends a one-way message of `kind` to `to`. `role` only matters to the
    /// simulated network's counters (see [`MessageRole`]).
    fn send(
        &self,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        role: MessageRole,
    ) -> Result<(), NetError>;

    /// Registers the handler for requests of `kind`.
    fn register(&self, kind: Kind, handler: RawHandler) -> Result<(), NetError>;

    /// Opens the inbox receiving one-way messages of `kind`; when it holds
    /// `capacity_messages` undelivered messages, further ones are dropped.
    fn open_inbox(&self, kind: Kind, capacity_messages: usize) -> Result<RawInbox, NetError>;

    /// Stops the transport: closes listeners and connections, fails pending
    /// calls, stops handlers. Resolves once everything has stopped.
    fn shutdown(&self) -> BoxFuture<'static, ()>;
}

/// Whether a one-way message starts an exchange or answers one.
///
/// The reference network counts a call as one RPC and counts its reply's
/// bytes only when delivered. A protocol built on one-way messages (Raft's
/// `AppendEntries` and its response) marks answers as `Response` so the
/// simulated network counts them the same way: bytes when delivered, not as
/// an RPC, not in the receiver's RPC count. Faults apply to both alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageRole {
    /// Starts an exchange (or stands alone): counted as one RPC.
    Request,
    /// Answers an earlier message: counted like a reply.
    Response,
}

/// The receiving side of one-way messages of one kind: `(sender, payload)`.
#[derive(Debug)]
pub struct RawInbox {
    pub(crate) receiver: mpsc::Receiver<(NodeId, Bytes)>,
}

impl RawInbox {
    /// Waits for the next message; `None` once the transport has shut down.
    pub async fn recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.receiver.recv().await
    }

    /// Returns the next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<(NodeId, Bytes)> {
        self.receiver.try_recv().ok()
    }
}

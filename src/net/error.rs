//! Errors of the net layer.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::net::Kind;

/// Why a remote node refused a request it did receive (sent back in place of
/// a reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteFault {
    /// The remote node has no handler for this message kind.
    UnknownKind,
    /// The remote node handles this kind id with another schema version.
    VersionMismatch {
        /// The schema version the remote node handles.
        supported: u16,
    },
    /// The remote handler could not decode the request payload.
    BadRequest,
    /// The remote handler's reply could not be encoded or was larger than a frame.
    BadReply,
    /// The remote node is shutting down.
    ShuttingDown,
}

impl std::fmt::Display for RemoteFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteFault::UnknownKind => write!(f, "no handler for this kind"),
            RemoteFault::VersionMismatch { supported } => {
                write!(f, "kind version mismatch (remote handles v{supported})")
            }
            RemoteFault::BadRequest => write!(f, "request payload could not be decoded"),
            RemoteFault::BadReply => write!(f, "reply could not be encoded or was too large"),
            RemoteFault::ShuttingDown => write!(f, "node is shutting down"),
        }
    }
}

/// Errors of calls, one-way sends and transport set-up.
///
/// Only [`NetError::NoReply`] leaves the outcome open: with every other
/// variant returned by a call, the request was definitely not executed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NetError {
    /// No reply arrived (timeout, lost request, lost reply, crashed or cut-off
    /// peer): the request may or may not have been executed.
    #[error("no reply from node {to}")]
    NoReply {
        /// The node that was called.
        to: NodeId,
    },
    /// No address is known for the node, so nothing was sent.
    #[error("unknown peer: node {0}")]
    UnknownPeer(NodeId),
    /// The node cannot be reached right now (its last connection attempt
    /// failed; reconnecting with backoff), so nothing was sent.
    #[error("node {0} is unreachable (reconnecting)")]
    Unreachable(NodeId),
    /// The bounded outbound queue to the node is full, so nothing was sent.
    #[error("outbound queue to node {0} is full")]
    QueueFull(NodeId),
    /// This endpoint was shut down (or crashed, in the simulation).
    #[error("endpoint is shut down")]
    Shutdown,
    /// The remote node received the request and refused it.
    #[error("node {to} refused {kind}: {fault}")]
    Refused {
        /// The node that was called.
        to: NodeId,
        /// The kind of the refused request.
        kind: Kind,
        /// Why it was refused.
        fault: RemoteFault,
    },
    /// A handler or an inbox is already registered for this kind id.
    #[error("a handler or inbox is already registered for {0}")]
    AlreadyRegistered(Kind),
    /// A message is larger than the frame size limit, so nothing was sent.
    #[error("message of {bytes} bytes exceeds the frame limit of {bytes_max} bytes")]
    TooLarge {
        /// Size of the encoded frame.
        bytes: usize,
        /// The configured limit.
        bytes_max: usize,
    },
    /// Encoding a message with postcard failed.
    #[error("cannot encode {kind}: {message}")]
    Encode {
        /// The kind being encoded.
        kind: Kind,
        /// The encoder's error.
        message: String,
    },
    /// A reply could not be decoded into the expected type.
    #[error("cannot decode reply to {kind} from node {from}: {message}")]
    Decode {
        /// The kind of the request whose reply failed to decode.
        kind: Kind,
        /// The node that sent the reply.
        from: NodeId,
        /// The decoder's error.
        message: String,
    },
    /// In the simulation: a live node with this id already exists.
    #[error("node {0} already exists")]
    NodeExists(NodeId),
    /// The transport's configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An I/O error while setting up the transport (e.g. binding the listener).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

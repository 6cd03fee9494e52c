//! Message kinds and the wire protocol version.

use serde::{Deserialize, Serialize};

/// Version of the net layer's own wire format (frame header and handshake).
///
/// Bump it whenever the layout of [`crate::net::wire`] changes: peers with a
/// different version refuse each other at the handshake.
pub const PROTOCOL_VERSION: u16 = 1;

/// The type of a message on the wire: an id naming the message type and the
/// version of that type's schema.
///
/// Every frame carries its kind. A node that receives a kind it has no
/// handler for answers [`crate::net::RemoteFault::UnknownKind`]; one whose
/// handler has another schema version answers
/// [`crate::net::RemoteFault::VersionMismatch`], so a changed message type is
/// detected instead of being mis-decoded.
///
/// Id ranges by module, to keep kinds unique: `0x01xx` raft, `0x02xx` kv,
/// `0x03xx` mr, `0x04xx` sharded kv, `0xf0xx` tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Kind {
    /// Which message type this is.
    pub id: u16,
    /// The schema version of that message type.
    pub version: u16,
}

impl Kind {
    /// A kind with the given id and schema version.
    pub const fn new(id: u16, version: u16) -> Self {
        Kind { id, version }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kind {:#06x} v{}", self.id, self.version)
    }
}

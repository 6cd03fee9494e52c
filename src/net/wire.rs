//! The TCP wire format: a handshake, then length-delimited frames.
//!
//! Every frame on a connection is a big-endian `u32` length followed by that
//! many bytes (tokio-util's `LengthDelimitedCodec`, bounded by a maximum
//! frame size). The first frame each way is the handshake: the connecting
//! side sends a [`Hello`], the accepting side answers a [`HelloReply`]. Both
//! start with [`MAGIC`] and [`PROTOCOL_VERSION`], so garbage and other
//! versions are recognised before anything else is decoded. Every later frame
//! is a [`Frame`]: a postcard [`FrameHeader`] (protocol version, kind, frame
//! type, call id) followed by the raw payload bytes.
//!
//! The decoders here take untrusted bytes: they return [`WireError`] for
//! anything malformed and never panic (checked by proptest in
//! `tests/net_wire.rs` and by the cargo-fuzz target in `fuzz/`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::NodeId;
use crate::net::{Kind, PROTOCOL_VERSION, RemoteFault};

/// The first bytes of every handshake message.
pub const MAGIC: [u8; 8] = *b"raftkvNT";

/// Largest handshake frame accepted, in bytes: an unauthenticated peer
/// cannot make the node reserve more than this.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = 256;

/// Errors decoding bytes received from the network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The handshake does not start with [`MAGIC`]: not a raftkv peer.
    #[error("bad magic: not a raftkv peer")]
    BadMagic,
    /// The peer speaks another protocol version.
    #[error("protocol version {got} (this node speaks {PROTOCOL_VERSION})")]
    ProtocolVersion {
        /// The version the peer sent.
        got: u16,
    },
    /// The bytes are not a valid message.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's error.
        message: String,
    },
}

/// Whether the connecting side is a cluster member or an outside client
/// (such as a command-line Clerk, which has no listen address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A cluster member.
    Member,
    /// A client that only calls.
    Client,
}

/// Sent by the connecting side first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The sender's protocol version.
    pub protocol_version: u16,
    /// The cluster the sender belongs to.
    pub cluster_id: u64,
    /// The sender's node id; handlers see it as the caller.
    pub node_id: NodeId,
    /// Member or client.
    pub role: Role,
}

/// Why a handshake was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The peer belongs to another cluster.
    WrongCluster {
        /// The accepting node's cluster id.
        expected: u64,
    },
    /// The peer speaks another protocol version.
    WrongProtocolVersion {
        /// The accepting node's protocol version.
        supported: u16,
    },
}

/// The accepting side's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The accepting node's protocol version.
    pub protocol_version: u16,
    /// The accepting node's cluster id.
    pub cluster_id: u64,
    /// The accepting node's id.
    pub node_id: NodeId,
    /// `None` when accepted, else why not.
    pub refused: Option<RefuseReason>,
}

/// What every handshake message starts with, whatever its version.
#[derive(Serialize, Deserialize)]
struct Prefix {
    magic: [u8; 8],
    protocol_version: u16,
}

fn check_prefix(bytes: &[u8]) -> Result<(), WireError> {
    let (prefix, _) = postcard::take_from_bytes::<Prefix>(bytes).map_err(|_| {
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            WireError::BadMagic
        } else {
            WireError::Malformed {
                what: "handshake",
                message: "truncated prefix".into(),
            }
        }
    })?;
    if prefix.magic != MAGIC {
        return Err(WireError::BadMagic);
    }
    if prefix.protocol_version != PROTOCOL_VERSION {
        return Err(WireError::ProtocolVersion {
            got: prefix.protocol_version,
        });
    }
    Ok(())
}

fn malformed(what: &'static str) -> impl FnOnce(String) -> WireError {
    move |message| WireError::Malformed { what, message }
}

/// Decodes exactly one `T` from `bytes` (postcard): trailing bytes are an
/// error, as are bytes that do not decode. A message is one value; bytes
/// after it mean a peer that encodes something else.
pub fn decode_exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|error| error.to_string())?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(format!("{} trailing bytes", rest.len()))
    }
}

/// Encodes a value of this module's plain types; they always encode.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("wire types have no fallible serde impls")
}

impl Hello {
    /// A hello of this node's protocol version.
    pub fn new(cluster_id: u64, node_id: NodeId, role: Role) -> Self {
        Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            cluster_id,
            node_id,
            role,
        }
    }

    /// Encodes the hello.
    pub fn encode(&self) -> Bytes {
        Bytes::from(encode(self))
    }

    /// Decodes a hello; checks the magic and the protocol version first.
    pub fn decode(bytes: &[u8]) -> Result<Hello, WireError> {
        check_prefix(bytes)?;
        decode_exact(bytes).map_err(malformed("hello"))
    }
}

impl HelloReply {
    /// A reply of this node's protocol version.
    pub fn new(cluster_id: u64, node_id: NodeId, refused: Option<RefuseReason>) -> Self {
        HelloReply {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            cluster_id,
            node_id,
            refused,
        }
    }

    /// Encodes the reply.
    pub fn encode(&self) -> Bytes {
        Bytes::from(encode(self))
    }

    /// Decodes a reply; checks the magic and the protocol version first.
    pub fn decode(bytes: &[u8]) -> Result<HelloReply, WireError> {
        check_prefix(bytes)?;
        decode_exact(bytes).map_err(malformed("hello reply"))
    }
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameType {
    /// A request; answered by a `Reply` or `Refused` with the same call id.
    Request,
    /// The reply to the request with the same call id.
    Reply,
    /// The request with the same call id was refused.
    Refused(RemoteFault),
    /// A one-way message (call id 0).
    OneWay,
}

/// The header of every frame after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameHeader {
    /// Always [`PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The message kind (for a reply: the request's kind).
    pub kind: Kind,
    /// What the frame is.
    pub frame_type: FrameType,
    /// Matches a reply to its request; unique per connection direction.
    pub call_id: u64,
}

/// A decoded frame: header and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// The payload: an encoded message (empty for `Refused`).
    pub payload: Bytes,
}

impl Frame {
    /// A frame of this node's protocol version.
    pub fn new(kind: Kind, frame_type: FrameType, call_id: u64, payload: Bytes) -> Self {
        let header = FrameHeader {
            protocol_version: PROTOCOL_VERSION,
            kind,
            frame_type,
            call_id,
        };
        Frame { header, payload }
    }

    /// Encodes header and payload (without the length prefix).
    pub fn encode(&self) -> Bytes {
        let mut bytes = encode(&self.header);
        bytes.extend_from_slice(&self.payload);
        Bytes::from(bytes)
    }

    /// Decodes a frame (without its length prefix); the payload shares
    /// `bytes`' buffer.
    pub fn decode(bytes: Bytes) -> Result<Frame, WireError> {
        let (header, rest) = postcard::take_from_bytes::<FrameHeader>(&bytes)
            .map_err(|error| malformed("frame header")(error.to_string()))?;
        if header.protocol_version != PROTOCOL_VERSION {
            return Err(WireError::ProtocolVersion {
                got: header.protocol_version,
            });
        }
        let payload = bytes.slice(bytes.len() - rest.len()..);
        Ok(Frame { header, payload })
    }
}

/// The length-delimited codec of the wire: `u32` big-endian length prefix,
/// frames above `frame_bytes_max` rejected before any buffer is reserved
/// for them.
pub fn codec(frame_bytes_max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(frame_bytes_max)
        .new_codec()
}

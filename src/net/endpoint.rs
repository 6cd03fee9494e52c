//! The typed layer: serde message types encoded with postcard, on top of any
//! [`Transport`].

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::NodeId;
use crate::net::transport::{MessageRole, RawHandler, RawInbox, Transport};
use crate::net::{Kind, NetError, RemoteFault, wire};

/// A request type: sent with [`Endpoint::call`], answered with a
/// [`Rpc::Reply`] by the handler registered with [`Endpoint::register`].
pub trait Rpc: Serialize + DeserializeOwned + Send + 'static {
    /// The kind carried by frames of this request type and of its replies.
    const KIND: Kind;
    /// The reply type.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// A one-way message type: sent with [`Endpoint::send`], received from an
/// [`Inbox`] opened with [`Endpoint::inbox`].
pub trait Message: Serialize + DeserializeOwned + Send + 'static {
    /// The kind carried by frames of this message type.
    const KIND: Kind;

    /// Whether this message answers an earlier one (see [`MessageRole`]);
    /// by default every message is a [`MessageRole::Request`].
    fn role(&self) -> MessageRole {
        MessageRole::Request
    }

    /// About how many bytes the encoded message takes: the encoder reserves
    /// that much up front instead of growing its buffer step by step. A hint
    /// only; 0 (the default) starts small.
    fn encoded_bytes_hint(&self) -> usize {
        0
    }
}

/// Bytes the encoder reserves at most from a hint.
const ENCODE_RESERVE_BYTES_MAX: usize = 1 << 20;

/// postcard output into a `Vec` reserved up front.
struct ReservedVec(Vec<u8>);

impl postcard::ser_flavors::Flavor for ReservedVec {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Default inbox capacity, in messages, for callers without a better bound.
pub const INBOX_CAPACITY_MESSAGES_DEFAULT: usize = 4096;

/// A node's typed handle on the network, over either transport.
///
/// Cheap to clone. Code written against `Endpoint` (a Raft driver, a KV
/// server, a Clerk) runs unchanged on the simulated network and over TCP.
#[derive(Clone)]
pub struct Endpoint {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("id", &self.id()).finish()
    }
}

/// Encodes `value` with postcard into a buffer of `reserve` bytes up front
/// (capped at [`ENCODE_RESERVE_BYTES_MAX`]; it grows past that as needed).
fn encode<T: Serialize>(kind: Kind, value: &T, reserve: usize) -> Result<Bytes, NetError> {
    let buffer = Vec::with_capacity(reserve.min(ENCODE_RESERVE_BYTES_MAX));
    postcard::serialize_with_flavor(value, ReservedVec(buffer))
        .map(Bytes::from)
        .map_err(|error| NetError::Encode {
            kind,
            message: error.to_string(),
        })
}

/// Encodes a message, reserving its [`Message::encoded_bytes_hint`].
fn encode_message<M: Message>(message: &M) -> Result<Bytes, NetError> {
    encode(M::KIND, message, message.encoded_bytes_hint())
}

impl Endpoint {
    /// Wraps a transport.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Endpoint { transport }
    }

    /// The id of this node.
    pub fn id(&self) -> NodeId {
        self.transport.local_id()
    }

    /// The underlying byte-level transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Calls `to` with `request` and waits for the reply, at most the
    /// transport's default call timeout.
    ///
    /// The request is sent when `call` is invoked; the returned future only
    /// waits. [`NetError::NoReply`] means the request may or may not have run.
    pub fn call<R: Rpc>(
        &self,
        to: NodeId,
        request: &R,
    ) -> impl Future<Output = Result<R::Reply, NetError>> + Send + use<R> {
        self.call_inner(to, request, None)
    }

    /// Like [`Endpoint::call`] with an explicit timeout.
    pub fn call_timeout<R: Rpc>(
        &self,
        to: NodeId,
        request: &R,
        timeout: Duration,
    ) -> impl Future<Output = Result<R::Reply, NetError>> + Send + use<R> {
        self.call_inner(to, request, Some(timeout))
    }

    fn call_inner<R: Rpc>(
        &self,
        to: NodeId,
        request: &R,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<R::Reply, NetError>> + Send + use<R> {
        let sent = encode(R::KIND, request, 0)
            .map(|payload| self.transport.call(to, R::KIND, payload, timeout));
        async move {
            let reply = sent?.await?;
            wire::decode_exact::<R::Reply>(&reply).map_err(|message| NetError::Decode {
                kind: R::KIND,
                from: to,
                message,
            })
        }
    }

    /// Sends a one-way message to `to`. `Ok(())` means accepted for
    /// transmission, not delivered; messages to one peer arrive in order.
    pub fn send<M: Message>(&self, to: NodeId, message: &M) -> Result<(), NetError> {
        let payload = encode_message(message)?;
        self.transport.send(to, M::KIND, payload, message.role())
    }

    /// Registers the handler answering requests of type `R`:
    /// `handler(caller, request)` returns the reply.
    ///
    /// Each request runs in its own task; a request that does not decode is
    /// answered with [`RemoteFault::BadRequest`] without calling `handler`.
    pub fn register<R, F, Fut>(&self, handler: F) -> Result<(), NetError>
    where
        R: Rpc,
        F: Fn(NodeId, R) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R::Reply> + Send + 'static,
    {
        let raw: RawHandler =
            Arc::new(
                move |from, payload: Bytes| match wire::decode_exact::<R>(&payload) {
                    Ok(request) => {
                        let reply = handler(from, request);
                        Box::pin(async move {
                            let reply = reply.await;
                            postcard::to_allocvec(&reply)
                                .map(Bytes::from)
                                .map_err(|error| {
                                    tracing::error!(kind = %R::KIND, %error, "cannot encode reply");
                                    RemoteFault::BadReply
                                })
                        })
                    }
                    Err(error) => {
                        tracing::warn!(from, kind = %R::KIND, %error, "undecodable request");
                        Box::pin(std::future::ready(Err(RemoteFault::BadRequest)))
                    }
                },
            );
        self.transport.register(R::KIND, raw)
    }

    /// Opens the inbox of one-way messages of type `M`. When it holds
    /// `capacity_messages` unread messages, new ones are dropped (and logged).
    /// The kind stays taken for the life of the transport, even after the
    /// `Inbox` is dropped (its messages are then dropped).
    pub fn inbox<M: Message>(&self, capacity_messages: usize) -> Result<Inbox<M>, NetError> {
        let raw = self.transport.open_inbox(M::KIND, capacity_messages)?;
        Ok(Inbox {
            raw,
            message: PhantomData,
        })
    }

    /// Shuts the transport down (see [`Transport::shutdown`]).
    pub async fn shutdown(&self) {
        self.transport.shutdown().await
    }
}

/// The receiving side of one-way messages of type `M`, in order per sender.
#[derive(Debug)]
pub struct Inbox<M> {
    raw: RawInbox,
    message: PhantomData<fn() -> M>,
}

impl<M: Message> Inbox<M> {
    fn decode(from: NodeId, payload: &[u8]) -> Option<M> {
        match wire::decode_exact::<M>(payload) {
            Ok(message) => Some(message),
            Err(error) => {
                tracing::warn!(from, kind = %M::KIND, %error, "undecodable one-way message dropped");
                None
            }
        }
    }

    /// Waits for the next message `(sender, message)`; `None` once the
    /// transport has shut down. Undecodable messages are logged and skipped.
    pub async fn recv(&mut self) -> Option<(NodeId, M)> {
        loop {
            let (from, payload) = self.raw.recv().await?;
            if let Some(message) = Self::decode(from, &payload) {
                return Some((from, message));
            }
        }
    }

    /// Returns the next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<(NodeId, M)> {
        loop {
            let (from, payload) = self.raw.try_recv()?;
            if let Some(message) = Self::decode(from, &payload) {
                return Some((from, message));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sized {
        items: Vec<Bytes>,
        hint: usize,
    }

    impl Message for Sized {
        const KIND: Kind = Kind::new(0xfff0, 1);

        fn encoded_bytes_hint(&self) -> usize {
            self.hint
        }
    }

    /// A hint changes only the buffer's reservation, never the encoding:
    /// too small, exact, too large and absurd hints give postcard's bytes.
    #[test]
    fn the_size_hint_does_not_change_the_encoding() {
        for hint in [0, 1, 40, 5_000, usize::MAX] {
            let message = Sized {
                items: (0..20u8).map(|i| Bytes::from(vec![i; 100])).collect(),
                hint,
            };
            let encoded = encode_message(&message).expect("encodes");
            assert_eq!(
                encoded.as_ref(),
                postcard::to_allocvec(&message).expect("encodes").as_slice()
            );
            let decoded: Sized = postcard::from_bytes(&encoded).expect("decodes");
            assert_eq!(decoded, message);
        }
    }
}

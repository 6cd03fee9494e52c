//! Accepting connections: the handshake and serving requests and one-way
//! messages from one peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, Stream, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::NodeId;
use crate::net::tcp::transport::{Counters, Inner};
use crate::net::wire::{
    self, Frame, FrameType, HANDSHAKE_FRAME_BYTES_MAX, Hello, HelloReply, RefuseReason, Role,
    WireError,
};
use crate::net::{Kind, PROTOCOL_VERSION, RemoteFault};

/// Logs a warning about an inbound connection unless this second's share
/// ([`INBOUND_WARNINGS_PER_SECOND`](super::transport::INBOUND_WARNINGS_PER_SECOND))
/// is used up.
macro_rules! warn_limited {
    ($inner:expr, $($arg:tt)*) => {
        if $inner.inbound_warnings.allow($inner.config.node_id) {
            tracing::warn!($($arg)*);
        }
    };
}

/// The inbound connection limits: connections in their handshake, then
/// clients' and members' connections apart (so a flood of clients cannot
/// lock the cluster's own links out).
struct Slots {
    handshakes: Arc<Semaphore>,
    clients: Arc<Semaphore>,
    members: Arc<Semaphore>,
    /// Each member's newest inbound connection (its number, and how to end
    /// it): a member keeps one link to us, so a new one from the same id
    /// supersedes the old, which a silently dead peer would otherwise leave
    /// holding a member slot for good.
    newest_member: Mutex<HashMap<NodeId, (u64, CancellationToken)>>,
    next_connection: AtomicU64,
}

/// A connection admitted past the handshake: its role's slot, and for a
/// member the token that ends it once a newer connection supersedes it.
struct Admitted {
    hello: Hello,
    _slot: OwnedSemaphorePermit,
    superseded: Option<(u64, CancellationToken)>,
}

/// Accepts connections until shutdown; dropping the listener on exit closes
/// the port.
pub(super) async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let config = &inner.config;
    let slots = Arc::new(Slots {
        handshakes: Arc::new(Semaphore::new(config.inbound_connections_max)),
        clients: Arc::new(Semaphore::new(config.inbound_connections_max)),
        members: Arc::new(Semaphore::new(config.member_connections_max)),
        newest_member: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(0),
    });
    loop {
        let accepted = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Err(error) => {
                // Typically out of file descriptors: wait instead of spinning.
                tracing::warn!(node = inner.config.node_id, %error, "accept failed");
                tokio::select! {
                    biased;
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep(inner.config.reconnect_backoff_min) => {}
                }
            }
            Ok((stream, address)) => match slots.handshakes.clone().try_acquire_owned() {
                Ok(permit) => inner.spawn(serve_inbound(
                    inner.clone(),
                    stream,
                    address,
                    slots.clone(),
                    permit,
                )),
                Err(_) => {
                    warn_limited!(inner, node = inner.config.node_id, %address, "too many connections in their handshake; closing");
                    Counters::bump(&inner.counters.handshakes_refused);
                }
            },
        }
    }
}

type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
type Writer = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

/// Reads and checks the peer's hello, takes a slot of its role and answers
/// it. `None` when refused (already logged); a peer whose role has no slot
/// left is closed before any accepting reply.
async fn handshake(
    inner: &Inner,
    slots: &Slots,
    reader: &mut Reader,
    writer: &mut Writer,
    address: SocketAddr,
) -> Option<Admitted> {
    let node = inner.config.node_id;
    let bytes = match reader.next().await {
        None => {
            tracing::debug!(node, %address, "closed before the handshake");
            return None;
        }
        Some(Err(error)) => {
            warn_limited!(inner, node, %address, %error, "bad handshake frame; closing");
            return None;
        }
        Some(Ok(bytes)) => bytes,
    };
    let refuse = match Hello::decode(&bytes) {
        Ok(hello) if hello.cluster_id == inner.config.cluster_id => {
            // A member's newer connection first ends its older one, then
            // waits (within the handshake's time) for a slot, which the
            // older one frees as it ends; a client gets a free slot or none.
            let superseded = (hello.role == Role::Member).then(|| {
                let number = slots.next_connection.fetch_add(1, Ordering::Relaxed);
                let token = inner.shutdown.child_token();
                let older = slots
                    .newest_member
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .insert(hello.node_id, (number, token.clone()));
                if let Some((_, older)) = older {
                    older.cancel();
                }
                (number, token)
            });
            let slot = match hello.role {
                Role::Member => slots.members.clone().acquire_owned().await.ok(),
                Role::Client => slots.clients.clone().try_acquire_owned().ok(),
            };
            let Some(slot) = slot else {
                warn_limited!(inner, node, peer = hello.node_id, role = ?hello.role, %address, "too many inbound connections of this role; closing");
                return None;
            };
            let reply = HelloReply::new(inner.config.cluster_id, node, None);
            if let Err(error) = writer.send(reply.encode()).await {
                tracing::debug!(node, %address, %error, "peer left during the handshake");
                return None;
            }
            return Some(Admitted {
                hello,
                _slot: slot,
                superseded,
            });
        }
        Ok(hello) => {
            warn_limited!(
                inner,
                node, %address, peer = hello.node_id, cluster = hello.cluster_id,
                "refusing a peer of another cluster"
            );
            RefuseReason::WrongCluster {
                expected: inner.config.cluster_id,
            }
        }
        Err(WireError::ProtocolVersion { got }) => {
            warn_limited!(inner, node, %address, version = got, "refusing a peer of another protocol version");
            RefuseReason::WrongProtocolVersion {
                supported: PROTOCOL_VERSION,
            }
        }
        Err(error) => {
            warn_limited!(inner, node, %address, %error, "bad hello; closing");
            return None;
        }
    };
    // Best effort: tell the peer why, so its operator sees it in its log.
    let _ = writer
        .send(HelloReply::new(inner.config.cluster_id, node, Some(refuse)).encode())
        .await;
    None
}

/// Encodes the reply (or refusal) to call `call_id`.
fn reply_frame(
    inner: &Inner,
    kind: Kind,
    call_id: u64,
    result: Result<Bytes, RemoteFault>,
) -> Bytes {
    let refused =
        |fault| Frame::new(kind, FrameType::Refused(fault), call_id, Bytes::new()).encode();
    match result {
        Ok(payload) => {
            match inner.encode_frame(&Frame::new(kind, FrameType::Reply, call_id, payload)) {
                Ok(frame) => frame,
                Err(error) => {
                    tracing::error!(node = inner.config.node_id, %kind, %error, "reply too large");
                    refused(RemoteFault::BadReply)
                }
            }
        }
        Err(fault) => refused(fault),
    }
}

/// Serves one inbound connection until it closes, fails or the transport
/// shuts down.
async fn serve_inbound(
    inner: Arc<Inner>,
    stream: TcpStream,
    address: SocketAddr,
    slots: Arc<Slots>,
    handshake_slot: OwnedSemaphorePermit,
) {
    let config = &inner.config;
    let node = config.node_id;
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, wire::codec(HANDSHAKE_FRAME_BYTES_MAX));
    let mut writer = super::frame_writer(write, config);
    let hello = tokio::select! {
        biased;
        () = inner.shutdown.cancelled() => return,
        hello = tokio::time::timeout(config.handshake_timeout, handshake(&inner, &slots, &mut reader, &mut writer, address)) => hello,
    };
    let admitted = match hello {
        Ok(Some(admitted)) => admitted,
        Ok(None) => {
            Counters::bump(&inner.counters.handshakes_refused);
            return;
        }
        Err(_) => {
            warn_limited!(inner, node, %address, "handshake timed out; closing");
            Counters::bump(&inner.counters.handshakes_refused);
            return;
        }
    };
    drop(handshake_slot);
    let (peer, role) = (admitted.hello.node_id, admitted.hello.role);
    let frame_bytes_max = match role {
        Role::Member => config.frame_bytes_max,
        Role::Client => config.client_frame_bytes_max.min(config.frame_bytes_max),
    };
    let superseded = admitted
        .superseded
        .as_ref()
        .map_or_else(CancellationToken::new, |(_, token)| token.clone());
    reader.decoder_mut().set_max_frame_length(frame_bytes_max);
    tracing::debug!(node, peer, ?role, %address, "accepted a connection");

    // The calls being served, polled by this task: a call costs no task of
    // its own, its reply is written here, and dropping the set when the
    // connection ends stops the handlers still running. (So a handler that
    // panics, which only a broken invariant does, ends its connection.)
    let mut running = FuturesUnordered::new();
    let calls_max = config.inbound_calls_per_connection_max;
    let ended = loop {
        tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => return,
            () = superseded.cancelled() => break Ended::Superseded,
            // Read every request buffered first (their handlers then start
            // together); back-pressure: stop reading while too many calls run.
            next = reader.next(), if running.len() < calls_max => {
                let bytes = match next {
                    None => break Ended::Closed,
                    Some(Err(error)) => break Ended::BadInput(format!("read: {error}")),
                    Some(Ok(bytes)) => bytes,
                };
                inner.frame_received();
                let frame = match Frame::decode(bytes.freeze()) {
                    Ok(frame) => frame,
                    Err(error) => break Ended::BadInput(format!("bad frame: {error}")),
                };
                let header = frame.header;
                match header.frame_type {
                    FrameType::Request => {
                        let handled = inner.dispatch.handle(peer, header.kind, frame.payload);
                        running.push(async move {
                            let result = match handled {
                                Err(fault) => Err(fault),
                                Ok(handler) => handler.await,
                            };
                            (header.kind, header.call_id, result)
                        });
                    }
                    FrameType::OneWay => {
                        let _ = inner.dispatch.deliver(peer, header.kind, frame.payload);
                    }
                    FrameType::Reply | FrameType::Refused(_) => {
                        break Ended::BadInput(
                            "protocol violation: reply on an inbound connection".into(),
                        );
                    }
                }
            }
            // Then write every reply ready by now, in one flush. A peer that
            // does not read can hold this up: shutdown still ends it.
            Some((kind, call_id, result)) = running.next(), if !running.is_empty() => {
                let first = reply_frame(&inner, kind, call_id, result);
                let written = tokio::select! {
                    biased;
                    () = inner.shutdown.cancelled() => return,
                    written = write_replies(&inner, &mut writer, &mut running, first) => written,
                };
                if let Err(error) = written {
                    break Ended::Write(error);
                }
            }
        }
    };
    match ended {
        Ended::Closed => tracing::debug!(node, peer, %address, "peer closed the connection"),
        Ended::BadInput(error) => {
            warn_limited!(inner, node, peer, %address, %error, "closing the connection");
            Counters::bump(&inner.counters.connections_closed_bad_input);
        }
        Ended::Write(error) => tracing::debug!(node, peer, %address, %error, "connection ended"),
        Ended::Superseded => {
            tracing::debug!(node, peer, %address, "superseded by the member's newer connection");
        }
    }
    if let Some((number, _)) = admitted.superseded {
        let mut newest = slots
            .newest_member
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if newest
            .get(&peer)
            .is_some_and(|(newest, _)| *newest == number)
        {
            newest.remove(&peer);
        }
    }
}

/// Writes `first` and every other reply ready now (at most a queue's
/// worth), then flushes them in one write. Polling `running` here without
/// the connection task's waker is safe: the task's next turn polls it again
/// with the waker.
async fn write_replies<S>(
    inner: &Inner,
    writer: &mut FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    running: &mut S,
    first: Bytes,
) -> Result<(), String>
where
    S: Stream<Item = (Kind, u64, Result<Bytes, RemoteFault>)> + Unpin,
{
    let mut frame = first;
    for _ in 0..inner.config.outbound_queue_frames_max {
        writer
            .feed(frame)
            .await
            .map_err(|error| format!("write: {error}"))?;
        match running.next().now_or_never() {
            Some(Some((kind, call_id, result))) => {
                frame = reply_frame(inner, kind, call_id, result);
            }
            _ => break,
        }
    }
    SinkExt::<Bytes>::flush(writer)
        .await
        .map_err(|error| format!("write: {error}"))
}

/// Why an inbound connection stopped being served.
enum Ended {
    /// The peer closed it.
    Closed,
    /// The peer sent something unreadable or out of protocol.
    BadInput(String),
    /// Writing a reply failed.
    Write(String),
    /// The same member opened a newer connection.
    Superseded,
}

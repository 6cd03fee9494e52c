//! The link to one peer: its bounded queue, its pending calls and the task
//! that connects, handshakes, writes requests and reads replies, and
//! reconnects with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::NodeId;
use crate::net::NetError;
use crate::net::tcp::transport::{Counters, Inner};
use crate::net::wire::{
    self, Frame, FrameType, HANDSHAKE_FRAME_BYTES_MAX, Hello, HelloReply, Role,
};

/// Where the link's connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkState {
    /// Connecting (or connected is not known yet): frames wait in the queue.
    Connecting,
    /// Connected and handshaken.
    Connected,
    /// The last attempt failed; waiting out the backoff. Calls fail fast.
    Backoff,
}

/// An encoded frame waiting to be written.
pub(super) struct Outgoing {
    /// The call id for a request, `None` for a one-way message.
    call_id: Option<u64>,
    frame: Bytes,
}

/// Where the outcome of a queued call arrives.
pub(super) type ReplyReceiver = oneshot::Receiver<Result<Bytes, NetError>>;

struct PendingCall {
    reply: oneshot::Sender<Result<Bytes, NetError>>,
    /// Written to a connection: if that connection is lost, the outcome is
    /// unknown (no reply); if not written, it was never sent.
    written: bool,
}

/// The link to one peer.
pub(super) struct PeerLink {
    peer: NodeId,
    queue: mpsc::Sender<Outgoing>,
    pending: Mutex<HashMap<u64, PendingCall>>,
    state: AtomicU8,
}

/// Removes a pending call when the caller stops waiting.
pub(super) struct ForgetOnDrop {
    link: Arc<PeerLink>,
    call_id: u64,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.link.pending().remove(&self.call_id);
    }
}

impl PeerLink {
    pub(super) fn new(
        peer: NodeId,
        queue_frames_max: usize,
    ) -> (Arc<PeerLink>, mpsc::Receiver<Outgoing>) {
        let (queue, receiver) = mpsc::channel(queue_frames_max);
        let link = PeerLink {
            peer,
            queue,
            pending: Mutex::new(HashMap::new()),
            state: AtomicU8::new(0),
        };
        (Arc::new(link), receiver)
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u64, PendingCall>> {
        // The table stays consistent whatever panicked while holding it.
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(super) fn state(&self) -> LinkState {
        match self.state.load(Ordering::Acquire) {
            0 => LinkState::Connecting,
            1 => LinkState::Connected,
            _ => LinkState::Backoff,
        }
    }

    fn set_state(&self, state: LinkState) {
        let value = match state {
            LinkState::Connecting => 0,
            LinkState::Connected => 1,
            LinkState::Backoff => 2,
        };
        self.state.store(value, Ordering::Release);
    }

    /// Queues a request frame; the receiver gets its outcome.
    pub(super) fn enqueue_call(
        &self,
        call_id: u64,
        frame: Bytes,
    ) -> Result<ReplyReceiver, NetError> {
        let (reply, receiver) = oneshot::channel();
        // Registered before queueing, so that a fast reply finds it.
        self.pending().insert(
            call_id,
            PendingCall {
                reply,
                written: false,
            },
        );
        match self.queue.try_send(Outgoing {
            call_id: Some(call_id),
            frame,
        }) {
            Ok(()) => Ok(receiver),
            Err(error) => {
                self.pending().remove(&call_id);
                Err(match error {
                    mpsc::error::TrySendError::Full(_) => NetError::QueueFull(self.peer),
                    mpsc::error::TrySendError::Closed(_) => NetError::Shutdown,
                })
            }
        }
    }

    /// Queues a one-way message frame.
    pub(super) fn enqueue_message(&self, frame: Bytes) -> Result<(), NetError> {
        self.queue
            .try_send(Outgoing {
                call_id: None,
                frame,
            })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => NetError::QueueFull(self.peer),
                mpsc::error::TrySendError::Closed(_) => NetError::Shutdown,
            })
    }

    pub(super) fn forget_on_drop(self: &Arc<Self>, call_id: u64) -> ForgetOnDrop {
        ForgetOnDrop {
            link: self.clone(),
            call_id,
        }
    }

    fn complete(&self, call_id: u64, result: Result<Bytes, NetError>) {
        // A reply to a forgotten call (timed out) is dropped here.
        if let Some(call) = self.pending().remove(&call_id) {
            let _ = call.reply.send(result);
        }
    }

    fn mark_written(&self, call_id: Option<u64>) {
        if let Some(call_id) = call_id {
            if let Some(call) = self.pending().get_mut(&call_id) {
                call.written = true;
            }
        }
    }

    /// Fails the pending calls for which `which(written)` holds.
    pub(super) fn fail_pending(&self, which: impl Fn(bool) -> bool, error: NetError) {
        let failed: Vec<PendingCall> = {
            let mut pending = self.pending();
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, call)| which(call.written))
                .map(|(&id, _)| id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        for call in failed {
            let _ = call.reply.send(Err(error.clone()));
        }
    }

    /// Empties the queue: its calls fail with `error` (they were never
    /// sent), its one-way messages are dropped.
    fn drain_queue(&self, queue: &mut mpsc::Receiver<Outgoing>, inner: &Inner, error: NetError) {
        while let Ok(outgoing) = queue.try_recv() {
            match outgoing.call_id {
                Some(call_id) => self.complete(call_id, Err(error.clone())),
                None => Counters::bump(&inner.counters.messages_dropped),
            }
        }
    }
}

struct Connection {
    reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    writer: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
}

/// Why a connection ended.
enum End {
    /// The transport is shutting down.
    Stop,
    /// The connection failed; reconnect.
    Lost(String),
}

/// Opens a connection to `peer` and performs the handshake.
async fn connect(inner: &Inner, peer: NodeId) -> Result<Connection, String> {
    let config = &inner.config;
    let address = inner
        .address_of(peer)
        .ok_or_else(|| "no address known".to_string())?;
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connect to {address} timed out"))?
        .map_err(|error| format!("connect to {address}: {error}"))?;
    stream
        .set_nodelay(true)
        .map_err(|error| format!("set_nodelay: {error}"))?;
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, wire::codec(HANDSHAKE_FRAME_BYTES_MAX));
    let mut writer = super::frame_writer(write, config);
    let role = if config.listen_address.is_some() {
        Role::Member
    } else {
        Role::Client
    };
    let handshake = async {
        writer
            .send(Hello::new(config.cluster_id, config.node_id, role).encode())
            .await
            .map_err(|error| format!("sending hello: {error}"))?;
        let bytes = match reader.next().await {
            None => return Err("closed during the handshake".to_string()),
            Some(Err(error)) => return Err(format!("reading the hello reply: {error}")),
            Some(Ok(bytes)) => bytes,
        };
        let reply =
            HelloReply::decode(&bytes).map_err(|error| format!("bad hello reply: {error}"))?;
        if let Some(reason) = reply.refused {
            return Err(format!("refused by {address}: {reason:?}"));
        }
        if reply.cluster_id != config.cluster_id {
            return Err(format!(
                "{address} is in cluster {} (expected {})",
                reply.cluster_id, config.cluster_id
            ));
        }
        if reply.node_id != peer {
            return Err(format!(
                "{address} is node {} (expected {peer})",
                reply.node_id
            ));
        }
        Ok(())
    };
    tokio::time::timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| format!("handshake with {address} timed out"))??;
    reader
        .decoder_mut()
        .set_max_frame_length(config.frame_bytes_max);
    Ok(Connection { reader, writer })
}

/// Writes queued frames and reads replies until the connection ends.
async fn serve(
    inner: &Inner,
    link: &PeerLink,
    connection: Connection,
    queue: &mut mpsc::Receiver<Outgoing>,
) -> End {
    let Connection {
        mut reader,
        mut writer,
    } = connection;
    let peer = link.peer;
    let read = async {
        loop {
            let bytes = match reader.next().await {
                None => return End::Lost("closed by the peer".into()),
                Some(Err(error)) => return End::Lost(format!("read: {error}")),
                Some(Ok(bytes)) => bytes,
            };
            inner.frame_received();
            let frame = match Frame::decode(bytes.freeze()) {
                Ok(frame) => frame,
                Err(error) => {
                    Counters::bump(&inner.counters.connections_closed_bad_input);
                    return End::Lost(format!("bad frame: {error}"));
                }
            };
            let header = frame.header;
            match header.frame_type {
                FrameType::Reply => link.complete(header.call_id, Ok(frame.payload)),
                FrameType::Refused(fault) => link.complete(
                    header.call_id,
                    Err(NetError::Refused {
                        to: peer,
                        kind: header.kind,
                        fault,
                    }),
                ),
                FrameType::Request | FrameType::OneWay => {
                    Counters::bump(&inner.counters.connections_closed_bad_input);
                    return End::Lost(
                        "protocol violation: request on an outbound connection".into(),
                    );
                }
            }
        }
    };
    let write = async {
        loop {
            let Some(first) = queue.recv().await else {
                return End::Stop;
            };
            link.mark_written(first.call_id);
            if let Err(error) = writer.feed(first.frame).await {
                return End::Lost(format!("write: {error}"));
            }
            // Batch what else is waiting into one flush, at most a queue's worth.
            for _ in 1..inner.config.outbound_queue_frames_max {
                let Ok(next) = queue.try_recv() else { break };
                link.mark_written(next.call_id);
                if let Err(error) = writer.feed(next.frame).await {
                    return End::Lost(format!("write: {error}"));
                }
            }
            if let Err(error) = SinkExt::<Bytes>::flush(&mut writer).await {
                return End::Lost(format!("write: {error}"));
            }
        }
    };
    tokio::select! {
        biased;
        () = inner.shutdown.cancelled() => End::Stop,
        end = read => end,
        end = write => end,
    }
}

/// The life of a link: connect, serve, reconnect with backoff, until the
/// transport shuts down.
pub(super) async fn run_link(
    inner: Arc<Inner>,
    link: Arc<PeerLink>,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    let config = &inner.config;
    let peer = link.peer;
    let mut backoff = config.reconnect_backoff_min;
    loop {
        link.set_state(LinkState::Connecting);
        let attempt = tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break,
            attempt = connect(&inner, peer) => attempt,
        };
        let wait = match attempt {
            Err(error) => {
                tracing::warn!(node = config.node_id, peer, %error, ?backoff, "cannot connect; backing off");
                link.set_state(LinkState::Backoff);
                link.drain_queue(&mut queue, &inner, NetError::Unreachable(peer));
                Some(backoff)
            }
            Ok(connection) => {
                tracing::debug!(node = config.node_id, peer, "connected");
                link.set_state(LinkState::Connected);
                let connected_at = Instant::now();
                let end = serve(&inner, &link, connection, &mut queue).await;
                // Requests already written may or may not have run.
                link.fail_pending(|written| written, NetError::NoReply { to: peer });
                match end {
                    End::Stop => break,
                    End::Lost(reason) => {
                        tracing::warn!(node = config.node_id, peer, %reason, "connection lost");
                    }
                }
                link.set_state(LinkState::Connecting);
                // A connection that lived long resets the backoff and
                // reconnects at once; a short-lived one keeps backing off, so
                // a peer that accepts and drops cannot make us spin.
                if connected_at.elapsed() >= config.reconnect_backoff_max {
                    backoff = config.reconnect_backoff_min;
                    None
                } else {
                    Some(backoff)
                }
            }
        };
        if let Some(wait) = wait {
            tokio::select! {
                biased;
                () = inner.shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(config.reconnect_backoff_max);
        }
    }
    link.set_state(LinkState::Backoff);
    queue.close();
    link.drain_queue(&mut queue, &inner, NetError::Shutdown);
    link.fail_pending(|_| true, NetError::Shutdown);
}

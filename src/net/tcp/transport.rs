//! The TCP transport handle and its shared state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::NodeId;
use crate::net::dispatch::Dispatch;
use crate::net::endpoint::Endpoint;
use crate::net::tcp::TcpConfig;
use crate::net::tcp::busy_poll::BusyPoll;
use crate::net::tcp::idle_poll::{CpuLatencyRequest, IdlePoll};
use crate::net::tcp::inbound::accept_loop;
use crate::net::tcp::outbound::{LinkState, PeerLink, ReplyReceiver};
use crate::net::transport::{CallFuture, MessageRole, RawHandler, RawInbox, Transport};
use crate::net::wire::{Frame, FrameType};
use crate::net::{Kind, NetError};

/// Counters of a TCP transport, for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Inbound connections closed at the handshake: garbage, wrong magic,
    /// protocol version or cluster id, timeout, too many connections.
    pub handshakes_refused: u64,
    /// Connections closed after the handshake for bad input: oversized,
    /// truncated or undecodable frames, protocol violations.
    pub connections_closed_bad_input: u64,
    /// One-way messages dropped by this node before sending (full queue,
    /// unreachable peer).
    pub messages_dropped: u64,
    /// One-way messages received but dropped because no inbox could take
    /// them (none open for the kind, version mismatch, full).
    pub messages_undelivered: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) handshakes_refused: AtomicU64,
    pub(super) connections_closed_bad_input: AtomicU64,
    pub(super) messages_dropped: AtomicU64,
}

impl Counters {
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// State shared by the handle and every task of one transport.
pub(super) struct Inner {
    pub(super) config: TcpConfig,
    pub(super) dispatch: Dispatch,
    pub(super) shutdown: CancellationToken,
    pub(super) tasks: TaskTracker,
    pub(super) runtime: Handle,
    pub(super) counters: Counters,
    /// The busy poller, when configured: told of every frame received.
    pub(super) busy_poll: Option<BusyPoll>,
    /// The idle poller, when configured: told of every frame received.
    pub(super) idle_poll: Option<IdlePoll>,
    /// Bounds the warnings about inbound connections (bad input, full).
    pub(super) inbound_warnings: WarnLimiter,
    addresses: Mutex<HashMap<NodeId, SocketAddr>>,
    links: Mutex<HashMap<NodeId, Arc<PeerLink>>>,
    next_call_id: AtomicU64,
    local_address: Option<SocketAddr>,
}

/// Warnings about inbound connections logged per second at most; the rest
/// are counted and reported in one line when the next second's first one
/// comes (a flood of garbage connections must not flood the log).
pub(super) const INBOUND_WARNINGS_PER_SECOND: u32 = 10;

/// Rate limit of the inbound warnings ([`INBOUND_WARNINGS_PER_SECOND`]).
#[derive(Debug)]
pub(super) struct WarnLimiter {
    /// Start of the current second, warnings logged and suppressed in it.
    state: Mutex<(std::time::Instant, u32, u64)>,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter {
            state: Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }
}

impl WarnLimiter {
    /// Whether one more warning may be logged now (else it is counted).
    pub(super) fn allow(&self, node: NodeId) -> bool {
        let mut state = lock(&self.state);
        if state.0.elapsed() >= std::time::Duration::from_secs(1) {
            if state.2 > 0 {
                tracing::warn!(
                    node,
                    suppressed = state.2,
                    "more inbound connection warnings were suppressed"
                );
            }
            *state = (std::time::Instant::now(), 0, 0);
        }
        if state.1 < INBOUND_WARNINGS_PER_SECOND {
            state.1 += 1;
            true
        } else {
            state.2 += 1;
            false
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent whatever panicked while holding them.
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Inner {
    /// A frame arrived: tell the pollers that are configured.
    pub(super) fn frame_received(&self) {
        if let Some(poll) = &self.busy_poll {
            poll.touch();
        }
        if let Some(poll) = &self.idle_poll {
            poll.touch();
        }
    }

    pub(super) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.runtime);
    }

    pub(super) fn address_of(&self, peer: NodeId) -> Option<SocketAddr> {
        lock(&self.addresses).get(&peer).copied()
    }

    /// The link to `peer`, started on first use.
    fn link(self: &Arc<Self>, peer: NodeId) -> Result<Arc<PeerLink>, NetError> {
        let mut links = lock(&self.links);
        if let Some(link) = links.get(&peer) {
            return Ok(link.clone());
        }
        if self.shutdown.is_cancelled() {
            return Err(NetError::Shutdown);
        }
        if self.address_of(peer).is_none() {
            return Err(NetError::UnknownPeer(peer));
        }
        let (link, queue) = PeerLink::new(peer, self.config.outbound_queue_frames_max);
        links.insert(peer, link.clone());
        self.spawn(crate::net::tcp::outbound::run_link(
            self.clone(),
            link.clone(),
            queue,
        ));
        Ok(link)
    }

    /// Encodes a frame, refusing one above the frame limit.
    pub(super) fn encode_frame(&self, frame: &Frame) -> Result<Bytes, NetError> {
        let bytes = frame.encode();
        if bytes.len() > self.config.frame_bytes_max {
            return Err(NetError::TooLarge {
                bytes: bytes.len(),
                bytes_max: self.config.frame_bytes_max,
            });
        }
        Ok(bytes)
    }

    /// The synchronous part of a remote call: queue the request.
    fn start_call(
        self: &Arc<Self>,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
    ) -> Result<(Arc<PeerLink>, u64, ReplyReceiver), NetError> {
        let link = self.link(to)?;
        if link.state() == LinkState::Backoff {
            return Err(NetError::Unreachable(to));
        }
        let call_id = self.next_call_id.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode_frame(&Frame::new(kind, FrameType::Request, call_id, payload))?;
        let reply = link.enqueue_call(call_id, frame)?;
        Ok((link, call_id, reply))
    }

    /// A call to this node itself: runs the handler in its own task.
    fn call_local(self: &Arc<Self>, kind: Kind, payload: Bytes, timeout: Duration) -> CallFuture {
        let me = self.config.node_id;
        let handler = match self.dispatch.handle(me, kind, payload) {
            Ok(handler) => handler,
            Err(fault) => {
                return Box::pin(std::future::ready(Err(NetError::Refused {
                    to: me,
                    kind,
                    fault,
                })));
            }
        };
        let (done, reply) = oneshot::channel();
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {}
                result = handler => {
                    let _ = done.send(result);
                }
            }
        });
        Box::pin(async move {
            match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(Ok(reply))) => Ok(reply),
                Ok(Ok(Err(fault))) => Err(NetError::Refused {
                    to: me,
                    kind,
                    fault,
                }),
                Ok(Err(_)) | Err(_) => Err(NetError::NoReply { to: me }),
            }
        })
    }
}

/// A node's TCP transport. Cheap to clone; when the last clone (including
/// those inside endpoints) is dropped, it shuts down in the background.
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
    _drop_guard: Arc<DropGuard>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node_id", &self.inner.config.node_id)
            .field("local_address", &self.inner.local_address)
            .finish()
    }
}

impl TcpTransport {
    /// Validates `config`, binds the listen address (if any) and starts
    /// accepting connections.
    pub async fn start(config: TcpConfig) -> Result<TcpTransport, NetError> {
        config.validate()?;
        if config.busy_poll.is_some()
            && Handle::current().runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread
        {
            return Err(NetError::Config(
                "busy_poll needs a current-thread runtime".into(),
            ));
        }
        // Open the latency device first: without access, fail before binding.
        let latency_request = match config.idle_poll {
            Some(_) => Some(CpuLatencyRequest::open(&config.idle_poll_device)?),
            None => None,
        };
        let listener = match config.listen_address {
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| NetError::Io {
                            context: format!("cannot listen on {address}"),
                            source: Arc::new(source),
                        })?,
                )
            }
            None => None,
        };
        let local_address = match &listener {
            Some(listener) => Some(listener.local_addr().map_err(|source| NetError::Io {
                context: "cannot read the listen address".into(),
                source: Arc::new(source),
            })?),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let config_busy_poll = config.busy_poll;
        let config_idle_poll = config.idle_poll;
        let inner = Arc::new(Inner {
            addresses: Mutex::new(
                config
                    .peers
                    .iter()
                    .map(|(&id, &address)| (id, address))
                    .collect(),
            ),
            config,
            dispatch: Dispatch::default(),
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
            runtime: Handle::current(),
            counters: Counters::default(),
            busy_poll: config_busy_poll.map(BusyPoll::new),
            idle_poll: config_idle_poll.map(IdlePoll::new),
            inbound_warnings: WarnLimiter::default(),
            links: Mutex::new(HashMap::new()),
            next_call_id: AtomicU64::new(1),
            local_address,
        });
        if let Some(poll) = &inner.busy_poll {
            inner.spawn(poll.clone().run(shutdown.clone()));
        }
        if let (Some(poll), Some(request)) = (&inner.idle_poll, latency_request) {
            inner.spawn(poll.clone().run(request, shutdown.clone()));
        }
        if let Some(listener) = listener {
            tracing::info!(node = inner.config.node_id, address = ?local_address, "listening");
            inner.spawn(accept_loop(inner.clone(), listener));
        }
        Ok(TcpTransport {
            inner,
            _drop_guard: Arc::new(shutdown.drop_guard()),
        })
    }

    /// The busy poller ([`TcpConfig::busy_poll`]), to switch it off and on.
    pub fn busy_poll(&self) -> Option<&BusyPoll> {
        self.inner.busy_poll.as_ref()
    }

    /// The idle poller ([`TcpConfig::idle_poll`]), for its counters.
    pub fn idle_poll(&self) -> Option<&IdlePoll> {
        self.inner.idle_poll.as_ref()
    }

    /// The address actually bound (with the real port when configured with
    /// port 0); `None` for a client.
    pub fn local_address(&self) -> Option<SocketAddr> {
        self.inner.local_address
    }

    /// Sets or changes where `peer` listens; used from the next connection
    /// attempt on.
    pub fn set_peer_address(&self, peer: NodeId, address: SocketAddr) {
        lock(&self.inner.addresses).insert(peer, address);
    }

    /// A typed endpoint over this transport.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(Arc::new(self.clone()))
    }

    /// The transport's counters.
    pub fn stats(&self) -> TcpStats {
        let counters = &self.inner.counters;
        TcpStats {
            handshakes_refused: counters.handshakes_refused.load(Ordering::Relaxed),
            connections_closed_bad_input: counters
                .connections_closed_bad_input
                .load(Ordering::Relaxed),
            messages_dropped: counters.messages_dropped.load(Ordering::Relaxed),
            messages_undelivered: self.inner.dispatch.undelivered(),
        }
    }
}

impl Transport for TcpTransport {
    fn local_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    fn call(
        &self,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> CallFuture {
        let inner = &self.inner;
        let timeout = timeout.unwrap_or(inner.config.call_timeout);
        if inner.shutdown.is_cancelled() {
            return Box::pin(std::future::ready(Err(NetError::Shutdown)));
        }
        if to == inner.config.node_id {
            return inner.call_local(kind, payload, timeout);
        }
        let started = inner.start_call(to, kind, payload);
        Box::pin(async move {
            let (link, call_id, reply) = started?;
            // Forget the call if this future is dropped or times out, so the
            // pending table stays bounded by the calls being awaited.
            let _forget = link.forget_on_drop(call_id);
            match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) | Err(_) => Err(NetError::NoReply { to }),
            }
        })
    }

    fn send(
        &self,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        _role: MessageRole,
    ) -> Result<(), NetError> {
        let inner = &self.inner;
        if inner.shutdown.is_cancelled() {
            return Err(NetError::Shutdown);
        }
        if to == inner.config.node_id {
            let _ = inner.dispatch.deliver(to, kind, payload);
            return Ok(());
        }
        let link = inner.link(to)?;
        if link.state() == LinkState::Backoff {
            Counters::bump(&inner.counters.messages_dropped);
            return Err(NetError::Unreachable(to));
        }
        let frame = inner.encode_frame(&Frame::new(kind, FrameType::OneWay, 0, payload))?;
        link.enqueue_message(frame).inspect_err(|error| {
            if matches!(error, NetError::QueueFull(_)) {
                Counters::bump(&inner.counters.messages_dropped);
                tracing::debug!(to, %kind, "outbound queue full: one-way message dropped");
            }
        })
    }

    fn register(&self, kind: Kind, handler: RawHandler) -> Result<(), NetError> {
        self.inner.dispatch.register(kind, handler)
    }

    fn open_inbox(&self, kind: Kind, capacity_messages: usize) -> Result<RawInbox, NetError> {
        self.inner.dispatch.open_inbox(kind, capacity_messages)
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.shutdown.cancel();
            inner.dispatch.close();
            inner.tasks.close();
            inner.tasks.wait().await;
            let links: Vec<Arc<PeerLink>> =
                lock(&inner.links).drain().map(|(_, link)| link).collect();
            for link in links {
                link.fail_pending(|_| true, NetError::Shutdown);
            }
            tracing::info!(node = inner.config.node_id, "transport shut down");
        })
    }
}

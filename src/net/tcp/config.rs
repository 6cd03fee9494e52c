//! Configuration of a TCP transport.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::NodeId;
use crate::net::NetError;

/// Configuration of one node's TCP transport. Every bound is a named field.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Peers with another cluster id are refused at the handshake.
    pub cluster_id: u64,
    /// This node's id, sent in the handshake (handlers see it as the caller).
    pub node_id: NodeId,
    /// Address to listen on (`127.0.0.1:0` in tests). `None` makes a client
    /// that only calls out, such as a command-line Clerk.
    pub listen_address: Option<SocketAddr>,
    /// Where each peer listens. More can be added with
    /// [`crate::net::tcp::TcpTransport::set_peer_address`].
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Largest frame sent or accepted after the handshake, in bytes. A larger
    /// incoming frame closes its connection; a larger outgoing message fails
    /// with [`NetError::TooLarge`].
    pub frame_bytes_max: usize,
    /// Largest frame accepted from a client ([`Role::Client`](crate::net::wire::Role)
    /// in its hello) after the handshake (or `frame_bytes_max`, if that is
    /// smaller). A reader
    /// reserves a frame's length as soon as its prefix arrives, so this bounds
    /// what each client connection can pin. Default 2 MiB: a client's
    /// requests are small (a key/value command is at most about 1 MiB).
    pub client_frame_bytes_max: usize,
    /// Frames waiting to be written to one peer (and replies waiting on one
    /// inbound connection). When full, one-way messages are dropped and calls
    /// fail at once with [`NetError::QueueFull`].
    pub outbound_queue_frames_max: usize,
    /// Frames queued for one connection are gathered into one write up to
    /// this many bytes (then written, and gathering goes on). Bounds the
    /// connection's write buffer to this plus one frame. Default 64 KiB:
    /// a burst of a few hundred small requests or replies leaves in one
    /// write, so the peer sees it at once (with tokio-util's 8 KiB a
    /// 64-client burst of puts left in two writes and became two log entries).
    pub write_buffer_bytes: usize,
    /// Requests of one inbound connection being handled at once; beyond it
    /// the connection is not read until one finishes (back-pressure).
    pub inbound_calls_per_connection_max: usize,
    /// Inbound connections of clients open at once, and, separately,
    /// connections still in their handshake; more are closed. Members'
    /// connections count against [`member_connections_max`](Self::member_connections_max)
    /// instead, so clients cannot crowd the cluster's own links out.
    pub inbound_connections_max: usize,
    /// Inbound connections of cluster members ([`Role::Member`](crate::net::wire::Role)
    /// in their hello) open at once. A member's newer connection ends its
    /// older one (a member keeps one link to each peer, and one that died
    /// silently must not hold a slot for good); a member beyond the limit
    /// waits for a slot within the handshake's time. Default 64.
    pub member_connections_max: usize,
    /// Time allowed to open a TCP connection.
    pub connect_timeout: Duration,
    /// Time allowed for the handshake, either side (defeats slow-loris peers).
    pub handshake_timeout: Duration,
    /// Default call timeout, when the caller gives none.
    pub call_timeout: Duration,
    /// First wait before reconnecting to a peer after a failed attempt.
    pub reconnect_backoff_min: Duration,
    /// Longest wait between reconnect attempts (the backoff doubles up to it).
    pub reconnect_backoff_max: Duration,
    /// Busy polling: after every frame received, keep the runtime thread
    /// polling its sockets for this long instead of sleeping (see
    /// [`BusyPoll`](super::BusyPoll)); `None` (the default) never polls.
    /// At most [`BUSY_POLL_WINDOW_MAX`], and only on a current-thread
    /// runtime ([`TcpTransport::start`](super::TcpTransport::start) refuses
    /// it on another: there a polling worker does not poll the sockets).
    pub busy_poll: Option<Duration>,
    /// Idle polling: after every frame received, ask the kernel to keep idle
    /// CPUs polling instead of halting for this long (a CPU latency request
    /// of 0 µs on [`idle_poll_device`](Self::idle_poll_device); see
    /// [`IdlePoll`](super::IdlePoll)); `None` (the default) never asks.
    /// Machine-wide while held (until a window passes without a frame), and
    /// needs write access to the device. At most [`IDLE_POLL_WINDOW_MAX`];
    /// any runtime.
    pub idle_poll: Option<Duration>,
    /// The CPU latency QoS device [`idle_poll`](Self::idle_poll) writes to
    /// ([`CPU_LATENCY_DEVICE`](super::CPU_LATENCY_DEVICE), `/dev/cpu_dma_latency`,
    /// by default).
    pub idle_poll_device: std::path::PathBuf,
}

/// Longest busy-polling window [`TcpConfig::busy_poll`] accepts: well under
/// a Raft heartbeat interval (100 ms by default), so a node whose only
/// traffic is heartbeats still sleeps most of the time.
pub const BUSY_POLL_WINDOW_MAX: Duration = Duration::from_millis(10);

/// Longest idle-polling window [`TcpConfig::idle_poll`] accepts: half a
/// Raft heartbeat interval (100 ms by default), so a node whose only
/// traffic is heartbeats releases the request between them (it is held up
/// to two windows after a frame).
pub const IDLE_POLL_WINDOW_MAX: Duration = Duration::from_millis(50);

impl TcpConfig {
    /// A cluster member listening on `listen_address`, with default bounds.
    pub fn member(cluster_id: u64, node_id: NodeId, listen_address: SocketAddr) -> Self {
        TcpConfig {
            listen_address: Some(listen_address),
            ..TcpConfig::client(cluster_id, node_id)
        }
    }

    /// A client that only calls out, with default bounds.
    pub fn client(cluster_id: u64, node_id: NodeId) -> Self {
        TcpConfig {
            cluster_id,
            node_id,
            listen_address: None,
            peers: BTreeMap::new(),
            frame_bytes_max: 16 * 1024 * 1024,
            client_frame_bytes_max: 2 * 1024 * 1024,
            outbound_queue_frames_max: 1024,
            write_buffer_bytes: 64 * 1024,
            inbound_calls_per_connection_max: 256,
            inbound_connections_max: 1024,
            member_connections_max: 64,
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            busy_poll: None,
            idle_poll: None,
            idle_poll_device: super::CPU_LATENCY_DEVICE.into(),
        }
    }

    /// Checks the bounds are usable.
    pub fn validate(&self) -> Result<(), NetError> {
        let fail = |message: &str| Err(NetError::Config(message.into()));
        if self.frame_bytes_max < crate::net::wire::HANDSHAKE_FRAME_BYTES_MAX {
            return fail("frame_bytes_max is smaller than a handshake");
        }
        if self.frame_bytes_max > u32::MAX as usize {
            return fail("frame_bytes_max does not fit the u32 length prefix");
        }
        if self.client_frame_bytes_max < crate::net::wire::HANDSHAKE_FRAME_BYTES_MAX {
            return fail("client_frame_bytes_max is smaller than a handshake");
        }
        if self.write_buffer_bytes == 0 || self.write_buffer_bytes > 16 * 1024 * 1024 {
            return fail("write_buffer_bytes must be between 1 and 16 MiB");
        }
        if self.outbound_queue_frames_max == 0 {
            return fail("outbound_queue_frames_max must be at least 1");
        }
        if self.inbound_calls_per_connection_max == 0 {
            return fail("inbound_calls_per_connection_max must be at least 1");
        }
        if self.inbound_connections_max == 0 || self.member_connections_max == 0 {
            return fail("inbound_connections_max and member_connections_max must be at least 1");
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_min > self.reconnect_backoff_max
        {
            return fail("need 0 < reconnect_backoff_min <= reconnect_backoff_max");
        }
        if self
            .busy_poll
            .is_some_and(|window| window.is_zero() || window > BUSY_POLL_WINDOW_MAX)
        {
            return fail("busy_poll must be a window of more than 0 and at most 10 ms");
        }
        if self
            .idle_poll
            .is_some_and(|window| window.is_zero() || window > IDLE_POLL_WINDOW_MAX)
        {
            return fail("idle_poll must be a window of more than 0 and at most 50 ms");
        }
        Ok(())
    }
}

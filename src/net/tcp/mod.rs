//! The TCP transport: one listen address per node, a handshake on every
//! connection, length-delimited postcard frames (see [`crate::net::wire`]).
//!
//! Connections are one-directional in use: node A sends its requests and
//! one-way messages to B on the connection A opened to B, and B answers on
//! that same connection. So one-way messages from A to B are written by one
//! task, in order; after a connection loss the messages still queued go out
//! on the next connection, those already written may be lost, none is sent
//! twice. A node without a listen address (a client such as a command-line
//! Clerk) can call servers; servers cannot call it.
//!
//! Bounds and what happens at each (all in [`TcpConfig`]):
//! - outbound queue per peer (`outbound_queue_frames_max`): when full, a
//!   one-way message is dropped (`send` returns [`NetError::QueueFull`] and
//!   it is counted in [`TcpStats::messages_dropped`]; Raft tolerates lost
//!   messages) and a call fails at once with [`NetError::QueueFull`];
//! - while a peer is unreachable (its last connection attempt failed, the
//!   link waits out its backoff) calls fail at once with
//!   [`NetError::Unreachable`] and one-way messages are dropped; reconnect
//!   attempts back off exponentially from `reconnect_backoff_min` to
//!   `reconnect_backoff_max`;
//! - frame size (`frame_bytes_max`, default 16 MiB; `client_frame_bytes_max`,
//!   default 2 MiB, from a client; 256 bytes during the
//!   handshake): a larger incoming frame, garbage, a truncated frame or a
//!   protocol violation closes that connection with a logged warning; the
//!   node keeps serving every other connection;
//! - handshake (`handshake_timeout`): a peer that does not complete it in
//!   time is dropped; a wrong magic, protocol version or cluster id is
//!   refused and logged;
//! - requests handled at once per inbound connection
//!   (`inbound_calls_per_connection_max`): beyond it the connection is not
//!   read until one finishes; inbound connections: `inbound_connections_max`
//!   in their handshake and as many clients, `member_connections_max`
//!   members apart, so a flood of clients cannot lock the cluster's own links
//!   out; a member's newer connection ends its older one. Warnings about
//!   inbound connections are rate-limited.
//!
//! Optional busy polling ([`TcpConfig::busy_poll`], [`BusyPoll`]) keeps the
//! runtime thread polling its sockets for a window after every frame instead
//! of sleeping, trading a busy CPU for the wake-up of each hop. Optional
//! idle polling ([`TcpConfig::idle_poll`], [`IdlePoll`]) asks the kernel to
//! keep idle CPUs polling for a window after every frame (a machine-wide CPU
//! latency request), so no hop's wake-up waits for a halted CPU.
//!
//! [`NetError`]: crate::net::NetError
//! [`NetError::QueueFull`]: crate::net::NetError::QueueFull
//! [`NetError::Unreachable`]: crate::net::NetError::Unreachable

mod activity;
mod busy_poll;
mod config;
mod idle_poll;
mod inbound;
mod outbound;
mod transport;

/// The framed writer of one connection: frames up to `frame_bytes_max`,
/// gathered into writes of up to `write_buffer_bytes` (see
/// [`TcpConfig::write_buffer_bytes`]).
fn frame_writer<W: tokio::io::AsyncWrite>(
    io: W,
    config: &TcpConfig,
) -> tokio_util::codec::FramedWrite<W, tokio_util::codec::LengthDelimitedCodec> {
    let mut writer =
        tokio_util::codec::FramedWrite::new(io, crate::net::wire::codec(config.frame_bytes_max));
    writer.set_backpressure_boundary(config.write_buffer_bytes);
    writer
}

pub use busy_poll::{BusyPoll, BusyPollStats};
pub use config::{BUSY_POLL_WINDOW_MAX, IDLE_POLL_WINDOW_MAX, TcpConfig};
pub use idle_poll::{CPU_LATENCY_DEVICE, IdlePoll, IdlePollStats};
pub use transport::{TcpStats, TcpTransport};

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use futures::SinkExt;

    use super::*;

    // A flood of bad connections logs at most a second's share of warnings;
    // the rest are only counted.
    #[test]
    fn inbound_warnings_are_rate_limited() {
        let started = std::time::Instant::now();
        let limiter = transport::WarnLimiter::default();
        let allowed = (0..1000).filter(|_| limiter.allow(1)).count();
        // One second's share per second begun (a slow machine may span two).
        let share = transport::INBOUND_WARNINGS_PER_SECOND as usize;
        let seconds = started.elapsed().as_secs() as usize + 1;
        assert!(
            allowed >= share && allowed <= share * seconds,
            "{allowed} warnings in {seconds} s"
        );
    }

    /// Takes every write whole and counts them.
    #[derive(Default)]
    struct CountingWriter {
        writes: usize,
        bytes: usize,
    }

    impl tokio::io::AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            self.bytes += buf.len();
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// How many writes a burst of `frames` frames of `size` bytes takes.
    async fn writes_for_burst(config: &TcpConfig, frames: usize, size: usize) -> (usize, usize) {
        let mut writer = frame_writer(CountingWriter::default(), config);
        for _ in 0..frames {
            writer
                .feed(Bytes::from(vec![7u8; size]))
                .await
                .expect("feed");
        }
        SinkExt::<Bytes>::flush(&mut writer).await.expect("flush");
        let io = writer.into_inner();
        (io.writes, io.bytes)
    }

    // A burst of 64 put-sized frames (≈ 11 KB) leaves in one write with the
    // default buffer, and in several once it exceeds the configured bound.
    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_within_the_write_buffer_leaves_in_one_write() {
        let config = TcpConfig::client(1, 1);
        let (writes, bytes) = writes_for_burst(&config, 64, 170).await;
        assert_eq!(bytes, 64 * (4 + 170), "every frame with its length prefix");
        assert_eq!(writes, 1, "one write for the whole burst");

        let small = TcpConfig {
            write_buffer_bytes: 4096,
            ..TcpConfig::client(1, 1)
        };
        let (writes, bytes) = writes_for_burst(&small, 64, 170).await;
        assert_eq!(bytes, 64 * (4 + 170));
        assert!(
            writes >= 2,
            "a 4 KiB bound splits an 11 KB burst: {writes} writes"
        );

        let mut bad = TcpConfig::client(1, 1);
        bad.write_buffer_bytes = 0;
        assert!(bad.validate().is_err());
    }
}

//! The TCP transport against bad and hostile peers (garbage, oversized,
//! truncated and malformed frames, wrong cluster or protocol version,
//! slow-loris), and its bounds: queue full, frame size, reconnect, shutdown.
//! After each bad peer the node must still answer a good client.

mod net_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use net_support::{CLUSTER_ID, Cluster, Echo, EchoReply, Seq, serve_echo};
use raftkv::NodeId;
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::net::wire::{self, Frame, FrameType, Hello, HelloReply, RefuseReason, Role};
use raftkv::net::{
    Endpoint, Kind, Message, MessageRole, NetError, PROTOCOL_VERSION, RemoteFault, Rpc, Transport,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Generous bound on waiting for the server to react, so a broken server
/// fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

async fn server_with(
    adjust: impl Fn(TcpConfig) -> TcpConfig,
) -> (TcpTransport, Endpoint, SocketAddr) {
    let config = adjust(TcpConfig::member(
        CLUSTER_ID,
        1,
        "127.0.0.1:0".parse().expect("address"),
    ));
    let transport = TcpTransport::start(config).await.expect("server starts");
    let endpoint = transport.endpoint();
    serve_echo(&endpoint);
    let address = transport.local_address().expect("listens");
    (transport, endpoint, address)
}

async fn good_client(address: SocketAddr) -> Endpoint {
    let mut config = TcpConfig::client(CLUSTER_ID, 500);
    config.peers.insert(1, address);
    TcpTransport::start(config)
        .await
        .expect("client starts")
        .endpoint()
}

/// Asserts the node at `address` still answers a well-behaved client.
async fn assert_still_serves(address: SocketAddr) {
    let client = good_client(address).await;
    let reply = client
        .call(
            1,
            &Echo {
                seq: 42,
                body: vec![1; 128],
            },
        )
        .await
        .expect("the node still answers");
    assert_eq!(reply.seq, 42);
}

/// Makes `calls` echo calls to node 1 in turn, each answered with its own sequence number.
async fn echo_calls(endpoint: &Endpoint, calls: u64) {
    for seq in 0..calls {
        let reply = endpoint
            .call(
                1,
                &Echo {
                    seq,
                    body: vec![7; 64],
                },
            )
            .await
            .expect("echo");
        assert_eq!(reply.seq, seq);
    }
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buffer = [0u8; 1024];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
    received
}

fn length_prefixed(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Connects and completes a valid handshake as client `node_id`.
async fn handshaken(address: SocketAddr, node_id: NodeId) -> TcpStream {
    handshaken_as(address, node_id, Role::Client).await
}

/// Connects and sends a valid hello as node `node_id` in `role`.
async fn hello_sent(address: SocketAddr, node_id: NodeId, role: Role) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(&length_prefixed(
            &Hello::new(CLUSTER_ID, node_id, role).encode(),
        ))
        .await
        .expect("hello");
    stream
}

/// Connects and completes a valid handshake as node `node_id` in `role`.
async fn handshaken_as(address: SocketAddr, node_id: NodeId, role: Role) -> TcpStream {
    let stream = hello_sent(address, node_id, role).await;
    let mut framed = Framed::new(stream, wire::codec(wire::HANDSHAKE_FRAME_BYTES_MAX));
    let reply = framed.next().await.expect("a reply").expect("a frame");
    let reply = HelloReply::decode(&reply).expect("a hello reply");
    assert_eq!((reply.refused, reply.node_id), (None, 1));
    let parts = framed.into_parts();
    assert!(parts.read_buf.is_empty(), "nothing after the hello reply");
    parts.io
}

/// Sends `hello` and returns the decoded refusal, after the server closed.
async fn refused_hello(address: SocketAddr, hello: &[u8]) -> HelloReply {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(&length_prefixed(hello))
        .await
        .expect("hello");
    let received = read_until_closed(&mut stream).await;
    assert!(received.len() > 4, "a refusal arrives before the close");
    HelloReply::decode(&received[4..]).expect("a hello reply")
}

// Proves random garbage and a non-raftkv handshake are dropped at the handshake while the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_at_the_handshake() {
    let (server, _endpoint, address) = server_with(|config| config).await;
    let seed = 31;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut garbage = vec![0u8; 4096];
    rng.fill_bytes(&mut garbage);
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let _ = stream.write_all(&garbage).await;
    assert!(
        read_until_closed(&mut stream).await.is_empty(),
        "seed {seed}: no answer to garbage"
    );
    // A well-framed handshake with a wrong magic gets no answer either.
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(&length_prefixed(b"GET / HTTP/1.1\r\n\r\n"))
        .await
        .expect("write");
    assert!(read_until_closed(&mut stream).await.is_empty());
    assert_eq!(server.stats().handshakes_refused, 2);
    assert_still_serves(address).await;
}

/// Echo call `seq` with `body_len` bytes to the server at `address`, from a
/// new cluster member (node 2) whose only peer it is.
async fn member_echo(
    address: SocketAddr,
    seq: u64,
    body_len: usize,
) -> Result<EchoReply, NetError> {
    let mut config = TcpConfig::member(CLUSTER_ID, 2, "127.0.0.1:0".parse().expect("address"));
    config.peers.insert(1, address);
    let member = TcpTransport::start(config)
        .await
        .expect("member starts")
        .endpoint();
    member
        .call(
            1,
            &Echo {
                seq,
                body: vec![1; body_len],
            },
        )
        .await
}

// Proves clients holding every client slot lock neither the node up nor the cluster's members out: members have slots of their own, and a client beyond the limit is closed before any accepting reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_filling_their_slots_cannot_crowd_members_out() {
    let (server, _endpoint, address) = server_with(|mut config| {
        config.inbound_connections_max = 3;
        config
    })
    .await;
    let mut held = Vec::new();
    for id in 0..3 {
        held.push(handshaken(address, 600 + id).await);
    }
    // A fourth client is closed without an accepting reply.
    let mut extra = hello_sent(address, 700, Role::Client).await;
    assert!(read_until_closed(&mut extra).await.is_empty(), "no reply");
    assert_eq!(server.stats().handshakes_refused, 1, "the fourth client");
    let reply = member_echo(address, 7, 64)
        .await
        .expect("a member still gets in");
    assert_eq!(reply.seq, 7);
    drop(held);
}

// Proves a member's newer connection supersedes its older one (a member keeps one link; a silently dead one must not hold a member slot for good), while other members' connections stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_newer_connection_supersedes_its_older_one() {
    let (_server, _endpoint, address) = server_with(|mut config| {
        config.member_connections_max = 2;
        config.handshake_timeout = Duration::from_millis(500);
        config
    })
    .await;
    let mut first = handshaken_as(address, 2, Role::Member).await;
    let mut other = handshaken_as(address, 3, Role::Member).await;
    let _second = handshaken_as(address, 2, Role::Member).await;
    read_until_closed(&mut first).await;
    // Node 3's connection is still open: a read times out instead of ending.
    let mut buffer = [0u8; 1];
    let still_open =
        tokio::time::timeout(Duration::from_millis(200), other.read(&mut buffer)).await;
    assert!(
        still_open.is_err(),
        "node 3's connection ended: {still_open:?}"
    );
    // Both member slots are held (nodes 2 and 3): another member id waits for
    // one until its handshake times out, and gets no accepting reply.
    let mut third = hello_sent(address, 4, Role::Member).await;
    assert!(read_until_closed(&mut third).await.is_empty(), "no reply");
}

// Proves a client's frames are bounded by client_frame_bytes_max, a member's by frame_bytes_max: a client cannot make the node reserve a member-sized frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_frames_have_their_own_smaller_limit() {
    let (server, _endpoint, address) = server_with(|mut config| {
        config.client_frame_bytes_max = 1024;
        config
    })
    .await;
    let mut stream = handshaken(address, 600).await;
    stream
        .write_all(&2048u32.to_be_bytes())
        .await
        .expect("write");
    read_until_closed(&mut stream).await;
    assert_eq!(server.stats().connections_closed_bad_input, 1);
    let reply = member_echo(address, 8, 4096)
        .await
        .expect("a member's larger frame");
    assert_eq!((reply.seq, reply.body.len()), (8, 4096));
    assert_eq!(server.stats().connections_closed_bad_input, 1);
}

// Proves oversized length prefixes close the connection, before and after the handshake, without reserving the claimed size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_closes_the_connection() {
    let (server, _endpoint, address) = server_with(|config| config).await;
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream
        .write_all(&(wire::HANDSHAKE_FRAME_BYTES_MAX as u32 + 1).to_be_bytes())
        .await
        .expect("write");
    read_until_closed(&mut stream).await;
    assert_eq!(server.stats().handshakes_refused, 1);

    let mut stream = handshaken(address, 600).await;
    stream
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .expect("write");
    read_until_closed(&mut stream).await;
    assert_eq!(server.stats().connections_closed_bad_input, 1);
    assert_still_serves(address).await;
}

// Proves a frame cut short by the peer closing, and a frame that does not decode, close only that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_malformed_frames_close_the_connection() {
    let (server, _endpoint, address) = server_with(|config| config).await;
    let mut stream = handshaken(address, 600).await;
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0u8; 10]);
    stream.write_all(&truncated).await.expect("write");
    stream.shutdown().await.expect("half close");
    read_until_closed(&mut stream).await;

    let mut stream = handshaken(address, 601).await;
    stream
        .write_all(&length_prefixed(&[0xff, 0xff, 0xff]))
        .await
        .expect("write");
    read_until_closed(&mut stream).await;

    // A reply frame sent to a server is a protocol violation.
    let mut stream = handshaken(address, 602).await;
    let reply = Frame::new(Echo::KIND, FrameType::Reply, 1, Bytes::new()).encode();
    stream
        .write_all(&length_prefixed(&reply))
        .await
        .expect("write");
    read_until_closed(&mut stream).await;

    assert_eq!(server.stats().connections_closed_bad_input, 3);
    assert_still_serves(address).await;
}

// Proves a peer of another cluster is refused with the reason, both raw and through a transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_cluster_id_is_refused() {
    let (server, _endpoint, address) = server_with(|config| config).await;
    let reply = refused_hello(
        address,
        &Hello::new(CLUSTER_ID + 1, 700, Role::Member).encode(),
    )
    .await;
    assert_eq!(
        reply.refused,
        Some(RefuseReason::WrongCluster {
            expected: CLUSTER_ID
        })
    );

    let mut config = TcpConfig::client(CLUSTER_ID + 1, 701);
    config.peers.insert(1, address);
    // No second attempt during the test, so the refusal count is exact.
    config.reconnect_backoff_min = Duration::from_secs(60);
    config.reconnect_backoff_max = Duration::from_secs(60);
    let stranger = TcpTransport::start(config)
        .await
        .expect("client starts")
        .endpoint();
    let result = stranger
        .call(
            1,
            &Echo {
                seq: 0,
                body: vec![],
            },
        )
        .await;
    assert!(
        matches!(result, Err(NetError::Unreachable(1))),
        "got {result:?}"
    );
    assert_eq!(server.stats().handshakes_refused, 2);
    assert_still_serves(address).await;
}

// Proves a peer speaking another protocol version is refused with the version this node supports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_version_is_refused() {
    let (server, _endpoint, address) = server_with(|config| config).await;
    let mut hello = Hello::new(CLUSTER_ID, 700, Role::Member);
    hello.protocol_version = PROTOCOL_VERSION + 1;
    let reply = refused_hello(address, &postcard::to_allocvec(&hello).expect("encode")).await;
    assert_eq!(
        reply.refused,
        Some(RefuseReason::WrongProtocolVersion {
            supported: PROTOCOL_VERSION
        })
    );
    assert_eq!(server.stats().handshakes_refused, 1);
    assert_still_serves(address).await;
}

// Proves slow-loris peers that never finish the handshake are dropped after the timeout and do not block good clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_peers_are_dropped_after_the_handshake_timeout() {
    let (server, _endpoint, address) = server_with(|mut config| {
        config.handshake_timeout = Duration::from_secs(1);
        config
    })
    .await;
    let mut loris = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(&[0, 0])
            .await
            .expect("half a length prefix");
        loris.push(stream);
    }
    assert_still_serves(address).await;
    for stream in &mut loris {
        read_until_closed(stream).await;
    }
    assert_eq!(server.stats().handshakes_refused, 20);
}

// Proves a full outbound queue drops one-way messages and fails calls at once with QueueFull.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_messages_and_fails_calls_fast() {
    // A peer that accepts connections but never answers the handshake.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut config = TcpConfig::client(CLUSTER_ID, 800);
    config
        .peers
        .insert(1, silent.local_addr().expect("address"));
    config.outbound_queue_frames_max = 4;
    config.handshake_timeout = Duration::from_secs(60);
    let transport = TcpTransport::start(config).await.expect("client starts");
    let endpoint = transport.endpoint();
    for seq in 0..4 {
        endpoint.send(1, &Seq(seq)).expect("fits in the queue");
    }
    assert!(matches!(
        endpoint.send(1, &Seq(4)),
        Err(NetError::QueueFull(1))
    ));
    let call = endpoint.call(
        1,
        &Echo {
            seq: 0,
            body: vec![],
        },
    );
    assert!(matches!(call.await, Err(NetError::QueueFull(1))));
    assert_eq!(transport.stats().messages_dropped, 1);
    drop(silent);
}

/// A request whose reply is `0` repeated `len` times.
#[derive(Serialize, Deserialize)]
struct Grow(u32);

impl Rpc for Grow {
    const KIND: Kind = Kind::new(0xf010, 1);
    type Reply = Vec<u8>;
}

/// A one-way message of any size.
#[derive(Serialize, Deserialize)]
struct Blob(Vec<u8>);

impl Message for Blob {
    const KIND: Kind = Kind::new(0xf011, 1);
}

// Proves messages above the frame limit are refused before sending, and a too-large reply comes back as a typed refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_above_the_limit_are_refused() {
    let cluster = Cluster::tcp_with(1, |mut config| {
        config.frame_bytes_max = 1024;
        config
    })
    .await;
    let server = &cluster.servers[0];
    serve_echo(server);
    server
        .register(|_, Grow(len): Grow| async move { vec![0u8; len as usize] })
        .expect("register");
    let result = cluster
        .client
        .call(
            1,
            &Echo {
                seq: 0,
                body: vec![0; 2000],
            },
        )
        .await;
    assert!(
        matches!(
            result,
            Err(NetError::TooLarge {
                bytes_max: 1024,
                ..
            })
        ),
        "got {result:?}"
    );
    let result = cluster.client.send(1, &Blob(vec![0; 2000]));
    assert!(
        matches!(
            result,
            Err(NetError::TooLarge {
                bytes_max: 1024,
                ..
            })
        ),
        "got {result:?}"
    );
    let result = cluster.client.call(1, &Grow(5000)).await;
    assert!(
        matches!(
            result,
            Err(NetError::Refused {
                fault: RemoteFault::BadReply,
                ..
            })
        ),
        "got {result:?}"
    );
    assert_eq!(
        cluster
            .client
            .call(1, &Grow(10))
            .await
            .expect("small reply"),
        vec![0u8; 10]
    );
}

// Proves a client reconnects to a restarted peer at a new address, failing fast while the peer is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_peer_restarts() {
    let fast_backoff = |mut config: TcpConfig| {
        config.reconnect_backoff_min = Duration::from_millis(10);
        config.reconnect_backoff_max = Duration::from_millis(100);
        config
    };
    let (server, _endpoint, address) = server_with(fast_backoff).await;
    let mut config = fast_backoff(TcpConfig::client(CLUSTER_ID, 900));
    config.peers.insert(1, address);
    let client_transport = TcpTransport::start(config).await.expect("client starts");
    let client = client_transport.endpoint();
    assert!(
        client
            .call(
                1,
                &Echo {
                    seq: 1,
                    body: vec![]
                }
            )
            .await
            .is_ok()
    );
    server.endpoint().shutdown().await;

    // Down: calls end quickly with a definite error, never hang until the timeout.
    let mut saw_unreachable = false;
    for _ in 0..20 {
        match client
            .call_timeout(
                1,
                &Echo {
                    seq: 2,
                    body: vec![],
                },
                PATIENCE,
            )
            .await
        {
            Err(NetError::Unreachable(1)) => {
                saw_unreachable = true;
                break;
            }
            Err(NetError::NoReply { to: 1 }) => {}
            other => panic!("a shut-down peer answered: {other:?}"),
        }
    }
    assert!(saw_unreachable, "the link noticed the peer is down");

    let (_restarted, _endpoint, new_address) = server_with(fast_backoff).await;
    client_transport.set_peer_address(1, new_address);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match client
            .call(
                1,
                &Echo {
                    seq: 3,
                    body: vec![],
                },
            )
            .await
        {
            Ok(reply) => {
                assert_eq!(reply.seq, 3);
                break;
            }
            Err(NetError::Unreachable(1)) if attempts < 200 => {
                // Clerk-style retry while the link waits out its backoff.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("attempt {attempts}: {other:?}"),
        }
    }
}

// Proves shutdown closes the listener and open connections and fails later calls with Shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_listener_and_connections() {
    let (server, endpoint, address) = server_with(|config| config).await;
    let mut open = handshaken(address, 600).await;
    let client = good_client(address).await;
    assert!(
        client
            .call(
                1,
                &Echo {
                    seq: 1,
                    body: vec![]
                }
            )
            .await
            .is_ok()
    );
    endpoint.shutdown().await;
    read_until_closed(&mut open).await;
    assert!(
        TcpStream::connect(address).await.is_err(),
        "the listener is closed"
    );
    assert!(matches!(
        endpoint
            .call(
                1,
                &Echo {
                    seq: 1,
                    body: vec![]
                }
            )
            .await,
        Err(NetError::Shutdown)
    ));
    assert!(matches!(
        server.send(2, Seq::KIND, Bytes::new(), MessageRole::Request),
        Err(NetError::Shutdown)
    ));
    assert!(matches!(
        client
            .call(
                1,
                &Echo {
                    seq: 1,
                    body: vec![]
                }
            )
            .await,
        Err(NetError::NoReply { .. } | NetError::Unreachable(1))
    ));
}

// Proves unknown peers and a peer answering with another node id are errors, not hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_and_wrong_node_id_are_errors() {
    let (_server, _endpoint, address) = server_with(|config| config).await;
    let mut config = TcpConfig::client(CLUSTER_ID, 901);
    config.peers.insert(2, address); // node 1 listens there, not node 2
    let client = TcpTransport::start(config)
        .await
        .expect("client starts")
        .endpoint();
    assert!(matches!(
        client
            .call(
                7,
                &Echo {
                    seq: 0,
                    body: vec![]
                }
            )
            .await,
        Err(NetError::UnknownPeer(7))
    ));
    assert!(matches!(
        client.send(7, &Seq(0)),
        Err(NetError::UnknownPeer(7))
    ));
    let result = client
        .call(
            2,
            &Echo {
                seq: 0,
                body: vec![],
            },
        )
        .await;
    assert!(
        matches!(result, Err(NetError::Unreachable(2))),
        "got {result:?}"
    );
}

// Proves a bad configuration is rejected with a typed error instead of starting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_rejected() {
    let mut config = TcpConfig::client(CLUSTER_ID, 1);
    config.outbound_queue_frames_max = 0;
    assert!(matches!(
        TcpTransport::start(config).await,
        Err(NetError::Config(_))
    ));
    // Busy polling needs a current-thread runtime (this one has two workers).
    let mut config = TcpConfig::client(CLUSTER_ID, 1);
    config.busy_poll = Some(Duration::from_millis(1));
    assert!(matches!(
        TcpTransport::start(config).await,
        Err(NetError::Config(_))
    ));
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = TcpConfig::member(CLUSTER_ID, 1, taken.local_addr().expect("address"));
    assert!(matches!(
        TcpTransport::start(config).await,
        Err(NetError::Io { .. })
    ));
}

/// A call whose handler waits for the test to release it.
#[derive(Serialize, Deserialize)]
struct Held(u32);

impl Rpc for Held {
    const KIND: Kind = Kind::new(0xf012, 1);
    type Reply = u32;
}

/// What the `Held` handlers have done so far.
#[derive(Clone, Copy, Debug, Default)]
struct HeldCounts {
    running: usize,
    most_running: usize,
    finished: usize,
    dropped_unfinished: usize,
}

/// Counts a handler out when it ends, finished or dropped.
struct Running {
    counts: tokio::sync::watch::Sender<HeldCounts>,
    finished: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        let finished = self.finished;
        self.counts.send_modify(|counts| {
            counts.running -= 1;
            if finished {
                counts.finished += 1;
            } else {
                counts.dropped_unfinished += 1;
            }
        });
    }
}

/// Waits (at most [`PATIENCE`]) until the `Held` counts meet `condition`.
async fn wait_for(
    seen: &tokio::sync::watch::Receiver<HeldCounts>,
    what: &str,
    condition: impl Fn(&HeldCounts) -> bool,
) -> HeldCounts {
    let mut seen = seen.clone();
    let counts = tokio::time::timeout(PATIENCE, seen.wait_for(condition))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("counts kept");
    *counts
}

// Proves an inbound connection runs at most `inbound_calls_per_connection_max` calls at once (it
// stops reading until one finishes, and then serves the rest), and that the calls still running
// when the connection closes are stopped with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_calls_are_bounded_per_connection_and_stopped_with_it() {
    let (counts, seen) = tokio::sync::watch::channel(HeldCounts::default());
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (server, endpoint, address) = server_with(|mut config| {
        config.inbound_calls_per_connection_max = 2;
        config
    })
    .await;
    let handler_gate = gate.clone();
    endpoint
        .register(move |_, Held(n): Held| {
            let (counts, gate) = (counts.clone(), handler_gate.clone());
            async move {
                counts.send_modify(|c| {
                    c.running += 1;
                    c.most_running = c.most_running.max(c.running);
                });
                let mut running = Running {
                    counts,
                    finished: false,
                };
                gate.acquire().await.expect("gate open").forget();
                running.finished = true;
                n
            }
        })
        .expect("register");
    // Five calls on one connection: two run, the others wait unread.
    let client = good_client(address).await;
    let calls: Vec<_> = (0..5)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.call(1, &Held(n)).await })
        })
        .collect();
    wait_for(&seen, "two calls running", |c| c.running == 2).await;
    // Released one at a time, each lets exactly one more in.
    for finished in 1..=3 {
        gate.add_permits(1);
        let counts = match finished {
            1 => wait_for(&seen, "1 finished", |c| c.finished == 1 && c.running == 2).await,
            2 => wait_for(&seen, "2 finished", |c| c.finished == 2 && c.running == 2).await,
            _ => wait_for(&seen, "3 finished", |c| c.finished == 3 && c.running == 2).await,
        };
        assert_eq!(counts.most_running, 2, "{counts:?}");
    }
    gate.add_permits(2);
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.expect("caller task").expect("answered"));
    }
    replies.sort_unstable();
    assert_eq!(replies, vec![0, 1, 2, 3, 4]);
    let counts = wait_for(&seen, "all finished", |c| c.finished == 5).await;
    assert_eq!((counts.most_running, counts.dropped_unfinished), (2, 0));

    // A call still running when its connection closes is stopped.
    let closing = good_client(address).await;
    let call = {
        let closing = closing.clone();
        tokio::spawn(async move { closing.call(1, &Held(9)).await })
    };
    wait_for(&seen, "the held call running", |c| c.running == 1).await;
    closing.shutdown().await;
    let counts = wait_for(&seen, "the held call stopped", |c| c.running == 0).await;
    assert_eq!((counts.finished, counts.dropped_unfinished), (5, 1));
    assert!(call.await.expect("caller task").is_err());
    assert_still_serves(address).await;
    drop(server);
}

// Proves a peer that asks for more than the socket buffers hold and never reads the replies
// cannot hold up shutdown: the connection's blocked write ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_connection_whose_peer_does_not_read() {
    let (server, endpoint, address) = server_with(|config| config).await;
    endpoint
        .register(|_, Grow(len): Grow| async move { vec![0u8; len as usize] })
        .expect("register");
    let mut stream = handshaken(address, 600).await;
    // 64 replies of 1 MiB: far more than loopback socket buffers take.
    let mut requests = Vec::new();
    for call_id in 0..64u64 {
        let payload = postcard::to_allocvec(&Grow(1 << 20)).expect("encode");
        let frame = Frame::new(Grow::KIND, FrameType::Request, call_id, payload.into()).encode();
        requests.extend_from_slice(&length_prefixed(&frame));
    }
    stream.write_all(&requests).await.expect("requests");
    // The server is writing replies once the first bytes arrive; from now on
    // nothing more is read, so its write blocks on a full socket.
    let mut first = [0u8; 4];
    stream.read_exact(&mut first).await.expect("a reply starts");
    tokio::time::timeout(PATIENCE, server.endpoint().shutdown())
        .await
        .expect("shutdown finishes with a peer that does not read");
    drop(stream);
}

// Proves busy polling ([`TcpConfig::busy_poll`]) on both sides changes nothing a caller sees,
// polls while frames come in (inbound requests on the server, replies on the client), goes to
// sleep once they stop, and ends with the transport; bad windows are configuration errors.
// (Busy polling runs on current-thread runtimes only; a multi-thread one refuses it, see
// `invalid_configuration_is_rejected`.)
#[tokio::test(flavor = "current_thread")]
async fn busy_polling_serves_calls_and_sleeps_when_idle() {
    let window = Duration::from_millis(5);
    for bad in [Duration::ZERO, Duration::from_millis(11)] {
        let mut config = TcpConfig::client(CLUSTER_ID, 1);
        config.busy_poll = Some(bad);
        assert!(
            matches!(TcpTransport::start(config).await, Err(NetError::Config(_))),
            "window {bad:?} must be refused"
        );
    }
    let (server, _endpoint, address) = server_with(|mut config| {
        config.busy_poll = Some(window);
        config
    })
    .await;
    let mut config = TcpConfig::client(CLUSTER_ID, 500);
    config.peers.insert(1, address);
    config.busy_poll = Some(window);
    let client = TcpTransport::start(config).await.expect("client starts");
    let (server_poll, client_poll) = (
        server.busy_poll().expect("configured").clone(),
        client.busy_poll().expect("configured").clone(),
    );
    assert_eq!(server_poll.window(), window);
    assert!(
        server_poll.is_enabled(),
        "a configured poller starts enabled"
    );

    // Both pollers sleep once the start-up window has passed without frames.
    let parked = |poll: &raftkv::net::tcp::BusyPoll, at_least: u64| {
        let poll = poll.clone();
        async move {
            tokio::time::timeout(PATIENCE, async {
                while poll.stats().parks < at_least {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .expect("the poller sleeps when no frame comes");
        }
    };
    parked(&server_poll, 1).await;
    parked(&client_poll, 1).await;
    let (server_before, client_before) = (server_poll.stats(), client_poll.stats());

    let endpoint = client.endpoint();
    echo_calls(&endpoint, 50).await;
    let (server_after, client_after) = (server_poll.stats(), client_poll.stats());
    assert!(
        server_after.spins > server_before.spins,
        "requests woke the server's poller: {server_before:?} → {server_after:?}"
    );
    assert!(
        client_after.spins > client_before.spins,
        "replies woke the client's poller: {client_before:?} → {client_after:?}"
    );
    // Idle again: both go back to sleep.
    parked(&server_poll, server_after.parks + 1).await;
    parked(&client_poll, client_after.parks + 1).await;

    // Switched off, frames no longer make it poll.
    server_poll.set_enabled(false);
    let off = server_poll.stats();
    assert_still_serves(address).await;
    assert_eq!(
        server_poll.stats().spins,
        off.spins,
        "disabled, it does not poll"
    );

    tokio::time::timeout(PATIENCE, async {
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
    .expect("the pollers end with their transports");
}

/// The requests written to a stand-in CPU latency device, in order (the kernel reads each as a
/// native-endian i32 of µs).
fn latency_requests(path: &std::path::Path) -> Vec<i32> {
    std::fs::read(path)
        .expect("read the stand-in device")
        .chunks(4)
        .map(|bytes| i32::from_ne_bytes(bytes.try_into().expect("whole requests")))
        .collect()
}

// Proves idle polling ([`TcpConfig::idle_poll`]) holds a CPU latency request of 0 µs while frames
// flow and releases it once none came for a window, without changing what callers see; that the
// window's bounds are checked; and that a device it cannot open fails the start with an error
// naming the device. A regular file stands in for /dev/cpu_dma_latency (the CLI tests use the
// real one).
#[tokio::test]
async fn idle_polling_holds_the_latency_request_while_frames_flow() {
    let window = Duration::from_millis(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let device = dir.path().join("cpu_dma_latency");
    std::fs::write(&device, b"").expect("create the stand-in device");
    for bad in [Duration::ZERO, Duration::from_millis(51)] {
        let mut config = TcpConfig::client(CLUSTER_ID, 1);
        config.idle_poll = Some(bad);
        config.idle_poll_device = device.clone();
        assert!(
            matches!(TcpTransport::start(config).await, Err(NetError::Config(_))),
            "window {bad:?} must be refused"
        );
    }
    let mut config = TcpConfig::client(CLUSTER_ID, 1);
    config.idle_poll = Some(window);
    config.idle_poll_device = dir.path().join("missing");
    let error = TcpTransport::start(config)
        .await
        .expect_err("no device, no start");
    assert!(
        matches!(error, NetError::Io { .. }) && error.to_string().contains("missing"),
        "{error}"
    );

    let server_device = device.clone();
    let (server, _endpoint, address) = server_with(move |mut config| {
        config.idle_poll = Some(window);
        config.idle_poll_device = server_device.clone();
        config
    })
    .await;
    let poll = server.idle_poll().expect("configured").clone();
    assert_eq!(poll.window(), window);
    assert!(!poll.stats().held, "no frame yet, nothing held");
    assert!(latency_requests(&device).is_empty());

    let mut config = TcpConfig::client(CLUSTER_ID, 500);
    config.peers.insert(1, address);
    let client = TcpTransport::start(config).await.expect("client starts");
    let endpoint = client.endpoint();
    echo_calls(&endpoint, 50).await;
    let during = poll.stats();
    assert!(during.holds >= 1, "frames took the request: {during:?}");
    // Released once a window passes without frames: within two windows of the last frame, and
    // well within a second (50 windows) however slow the machine.
    tokio::time::timeout(Duration::from_secs(1), async {
        while poll.stats().held {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the request is released when frames stop");
    let requests = latency_requests(&device);
    assert!(
        !requests.is_empty() && requests.len() % 2 == 0,
        "{requests:?}"
    );
    for pair in requests.chunks(2) {
        assert_eq!(pair, [0, i32::MAX], "hold, then release: {requests:?}");
    }
    assert_eq!(requests.len() as u64, 2 * poll.stats().holds);
    assert_eq!(poll.stats().failures, 0);

    tokio::time::timeout(PATIENCE, async {
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
    .expect("the poller ends with its transport");
}

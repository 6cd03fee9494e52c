//! One behaviour suite, run against both transports: every scenario is a
//! generic function over a [`Cluster`], instantiated once on the simulated
//! network (under tokio's paused clock) and once over TCP loopback.

mod net_support;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use net_support::{Cluster, Echo, Hang, Seq, serve_echo, serve_hang};
use raftkv::net::{Kind, NetError, RemoteFault, Rpc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Runs `$scenario` on both transports.
macro_rules! on_both_transports {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(start_paused = true)]
            async fn sim() {
                super::$scenario(super::Cluster::sim(3, 1)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tcp() {
                super::$scenario(super::Cluster::tcp(3).await).await;
            }
        }
    )*};
}

on_both_transports!(
    calls_return_replies_and_caller_ids,
    refusals_are_typed,
    timeout_reports_no_reply,
    one_way_messages_arrive_in_order,
    crash_during_calls_reports_no_reply,
    concurrent_calls_get_their_own_replies,
);

// Proves a reply reaches its caller intact, with the caller's id seen by the handler.
async fn calls_return_replies_and_caller_ids(cluster: Cluster) {
    for server in &cluster.servers {
        serve_echo(server);
    }
    for (index, server) in cluster.servers.iter().enumerate() {
        let body = vec![index as u8; 128];
        let reply = cluster
            .client
            .call(
                server.id(),
                &Echo {
                    seq: 7,
                    body: body.clone(),
                },
            )
            .await
            .expect("reply");
        assert_eq!(
            (reply.seq, reply.body, reply.from, reply.server),
            (7, body, cluster.client.id(), server.id())
        );
    }
    // Servers call each other too, and a node can call itself.
    let (first, second) = (&cluster.servers[0], &cluster.servers[1]);
    let reply = first
        .call(
            second.id(),
            &Echo {
                seq: 1,
                body: vec![],
            },
        )
        .await
        .expect("member to member");
    assert_eq!((reply.from, reply.server), (first.id(), second.id()));
    let reply = first
        .call(
            first.id(),
            &Echo {
                seq: 2,
                body: vec![],
            },
        )
        .await
        .expect("self call");
    assert_eq!((reply.from, reply.server), (first.id(), first.id()));
}

/// Same id as [`Echo`], another schema version.
#[derive(Serialize, Deserialize)]
struct EchoV2 {
    seq: u64,
}

impl Rpc for EchoV2 {
    const KIND: Kind = Kind::new(Echo::KIND.id, 2);
    type Reply = ();
}

/// A kind no node handles.
#[derive(Serialize, Deserialize)]
struct Unhandled;

impl Rpc for Unhandled {
    const KIND: Kind = Kind::new(0xf0ff, 1);
    type Reply = ();
}

// Proves unknown kinds, other schema versions and undecodable requests come back as typed refusals.
async fn refusals_are_typed(cluster: Cluster) {
    let server = &cluster.servers[0];
    serve_echo(server);
    let to = server.id();
    match cluster.client.call(to, &Unhandled).await {
        Err(NetError::Refused {
            fault: RemoteFault::UnknownKind,
            kind,
            to: refused_by,
        }) => {
            assert_eq!((kind, refused_by), (Unhandled::KIND, to));
        }
        other => panic!("expected UnknownKind, got {other:?}"),
    }
    match cluster.client.call(to, &EchoV2 { seq: 1 }).await {
        Err(NetError::Refused {
            fault: RemoteFault::VersionMismatch { supported: 1 },
            ..
        }) => {}
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    // Raw bytes that are not an `Echo` (a truncated varint) reach the typed handler.
    let raw =
        cluster
            .client
            .transport()
            .call(to, Echo::KIND, bytes::Bytes::from_static(&[0xff]), None);
    match raw.await {
        Err(NetError::Refused {
            fault: RemoteFault::BadRequest,
            ..
        }) => {}
        other => panic!("expected BadRequest, got {other:?}"),
    }
    // Registering a kind twice is refused.
    assert!(server.inbox::<Seq>(8).is_ok());
    assert!(matches!(
        server.inbox::<Seq>(8),
        Err(NetError::AlreadyRegistered(_))
    ));
}

// Proves a call whose handler never answers reports NoReply once its timeout has passed, not before.
async fn timeout_reports_no_reply(cluster: Cluster) {
    let server = &cluster.servers[0];
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    serve_hang(server, started, Arc::new(Notify::new()));
    let timeout = Duration::from_millis(300);
    let begin = Instant::now();
    let result = cluster
        .client
        .call_timeout(server.id(), &Hang, timeout)
        .await;
    assert!(
        matches!(result, Err(NetError::NoReply { to }) if to == server.id()),
        "got {result:?}"
    );
    assert!(
        begin.elapsed() >= timeout,
        "NoReply after {:?}, before the timeout",
        begin.elapsed()
    );
    assert!(started_rx.try_recv().is_ok(), "the handler ran");
}

// Proves one-way messages from one sender arrive complete and in sending order on a reliable network.
async fn one_way_messages_arrive_in_order(cluster: Cluster) {
    const MESSAGES: u64 = 1000;
    let receiver = &cluster.servers[0];
    let mut inbox = receiver.inbox::<Seq>(2 * MESSAGES as usize).expect("inbox");
    let senders = [&cluster.client, &cluster.servers[1]];
    for seq in 0..MESSAGES {
        for sender in senders {
            sender.send(receiver.id(), &Seq(seq)).expect("queued");
        }
    }
    let mut next = [0u64; 2];
    while next.iter().any(|&n| n < MESSAGES) {
        let (from, Seq(seq)) = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("messages keep arriving")
            .expect("inbox open");
        let sender = senders
            .iter()
            .position(|s| s.id() == from)
            .expect("known sender");
        assert_eq!(seq, next[sender], "message from {from} out of order");
        next[sender] += 1;
    }
}

// Proves a crash of the callee while calls are running ends them with NoReply, and the crashed node stays silent.
async fn crash_during_calls_reports_no_reply(cluster: Cluster) {
    let victim = &cluster.servers[0];
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    serve_hang(victim, started, Arc::new(Notify::new()));
    let mut inbox = victim.inbox::<Seq>(8).expect("inbox");
    let timeout = Duration::from_secs(30);
    let calls: Vec<_> = (0..4)
        .map(|_| cluster.client.call_timeout(victim.id(), &Hang, timeout))
        .collect();
    let calls = tokio::spawn(join_all(calls));
    for _ in 0..4 {
        started_rx.recv().await.expect("handler started");
    }
    let begin = Instant::now();
    cluster.crash(victim.id()).await;
    for result in calls.await.expect("join") {
        assert!(
            matches!(result, Err(NetError::NoReply { .. })),
            "got {result:?}"
        );
    }
    assert!(
        begin.elapsed() < timeout,
        "the crash, not the timeout, ended the calls"
    );
    assert!(
        inbox.recv().await.is_none(),
        "the crashed node's inbox is closed"
    );
    assert!(matches!(
        victim.call(cluster.servers[1].id(), &Hang).await,
        Err(NetError::Shutdown)
    ));
    assert!(matches!(
        victim.send(cluster.servers[1].id(), &Seq(1)),
        Err(NetError::Shutdown)
    ));
    // The others keep working.
    serve_echo(&cluster.servers[1]);
    let reply = cluster
        .client
        .call(
            cluster.servers[1].id(),
            &Echo {
                seq: 3,
                body: vec![],
            },
        )
        .await;
    assert_eq!(reply.expect("survivor answers").seq, 3);
}

// Proves many concurrent calls from several callers to several servers each get their own reply.
async fn concurrent_calls_get_their_own_replies(cluster: Cluster) {
    for server in &cluster.servers {
        serve_echo(server);
    }
    let callers = [cluster.client.clone(), cluster.servers[0].clone()];
    let mut tasks = Vec::new();
    for task in 0..64u64 {
        let caller = callers[task as usize % callers.len()].clone();
        let servers: Vec<_> = cluster.servers.iter().map(|s| s.id()).collect();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let seq = task * 1000 + round;
                let to = servers[(seq % servers.len() as u64) as usize];
                let body = seq.to_le_bytes().repeat(16);
                let reply = caller
                    .call(
                        to,
                        &Echo {
                            seq,
                            body: body.clone(),
                        },
                    )
                    .await
                    .expect("reply");
                assert_eq!(
                    (reply.seq, reply.body, reply.server, reply.from),
                    (seq, body, to, caller.id())
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("caller task");
    }
}

//! Fidelity of the simulated network to the reference "labrpc": measured
//! drop rates and delay distributions within statistical bounds, cut links,
//! crashes, counters, partitions and seed determinism. All under tokio's
//! paused clock: seconds of protocol time take milliseconds.

mod net_support;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use net_support::{Echo, EchoReply, Hang, Seq, serve_echo, serve_hang};
use raftkv::NodeId;
use raftkv::net::sim::{CLIENT_ID_BASE, SimConfig, SimEvent, SimNetwork, SimOutcome};
use raftkv::net::{Endpoint, Kind, Message, MessageRole, NetError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Sends `calls` Echo calls from `client` to `to` at the same instant and
/// returns each outcome with the time it took, in whole milliseconds.
async fn timed_calls(
    client: &Endpoint,
    to: NodeId,
    calls: u64,
) -> Vec<(Result<EchoReply, NetError>, u64)> {
    let begin = Instant::now();
    let futures = (0..calls).map(|seq| {
        let call = client.call(to, &Echo { seq, body: vec![] });
        async move {
            let result = call.await;
            (result, begin.elapsed().as_millis() as u64)
        }
    });
    join_all(futures).await
}

fn mean(values: &[u64]) -> f64 {
    values.iter().sum::<u64>() as f64 / values.len() as f64
}

// Proves unreliable mode drops 10 % of requests and 10 % of replies and delays each request by 0–26 ms, uniformly.
#[tokio::test(start_paused = true)]
async fn unreliable_mode_matches_reference_rates_and_delays() {
    const CALLS: u64 = 20_000;
    let seed = 11;
    let network = SimNetwork::new(SimConfig::new(seed));
    let server = network.add_node(1).expect("node");
    serve_echo(&server);
    let client = network.add_client();
    network.set_reliable(false);
    let outcomes = timed_calls(&client, 1, CALLS).await;

    let dispatched = network.rpc_count(1);
    let replied: Vec<u64> = outcomes
        .iter()
        .filter(|(result, _)| result.is_ok())
        .map(|&(_, ms)| ms)
        .collect();
    let request_drop_rate = 1.0 - dispatched as f64 / CALLS as f64;
    let reply_drop_rate = 1.0 - replied.len() as f64 / dispatched as f64;
    // 5 standard deviations of a binomial fraction at p = 0.1: about ±0.011.
    assert!(
        (0.089..=0.111).contains(&request_drop_rate),
        "seed {seed}: request drop rate {request_drop_rate}"
    );
    assert!(
        (0.088..=0.112).contains(&reply_drop_rate),
        "seed {seed}: reply drop rate {reply_drop_rate}"
    );
    for (result, _) in &outcomes {
        assert!(
            matches!(result, Ok(_) | Err(NetError::NoReply { to: 1 })),
            "seed {seed}: {result:?}"
        );
    }

    // A reply takes exactly the request's delay: uniform over 0..=26 ms.
    let mut histogram = [0u64; 27];
    for &ms in &replied {
        assert!(ms <= 26, "seed {seed}: reply after {ms} ms");
        histogram[ms as usize] += 1;
    }
    let expected = replied.len() as f64 / 27.0;
    for (ms, &count) in histogram.iter().enumerate() {
        // About 600 per bin, standard deviation about 24: ±25 % is 6 deviations.
        assert!(
            (count as f64 - expected).abs() < 0.25 * expected,
            "seed {seed}: {count} replies at {ms} ms"
        );
    }
    let mean_ms = mean(&replied);
    assert!(
        (12.7..=13.3).contains(&mean_ms),
        "seed {seed}: mean delay {mean_ms} ms"
    );
    assert_eq!(network.total_rpcs(), CALLS);
}

// Proves long reordering holds back 600 of 900 replies by 200 ms + rand(0..1+rand(0..2000)) ms.
#[tokio::test(start_paused = true)]
async fn long_reordering_matches_reference_distribution() {
    const CALLS: u64 = 9_000;
    let seed = 12;
    let network = SimNetwork::new(SimConfig::new(seed));
    serve_echo(&network.add_node(1).expect("node"));
    let client = network.add_client();
    network.set_long_reordering(true);
    let outcomes = timed_calls(&client, 1, CALLS).await;
    let mut held: Vec<u64> = Vec::new();
    for (result, ms) in &outcomes {
        assert!(
            result.is_ok(),
            "seed {seed}: reliable mode loses nothing: {result:?}"
        );
        match ms {
            0 => {}
            200..2200 => held.push(ms - 200),
            _ => panic!("seed {seed}: reply after {ms} ms"),
        }
    }
    let held_rate = held.len() as f64 / CALLS as f64;
    assert!(
        (0.65..=0.683).contains(&held_rate),
        "seed {seed}: held back {held_rate}"
    );
    // E[rand(0..1+rand(0..2000))] = 499.75, standard error about 4.3 ms.
    let mean_extra = mean(&held);
    assert!(
        (475.0..=525.0).contains(&mean_extra),
        "seed {seed}: mean extra {mean_extra} ms"
    );
    // The nested draw makes long delays rare: P(extra > 1000) = (1 - ln 2) / 2 ≈ 0.153.
    let over_1000 = held.iter().filter(|&&ms| ms > 1000).count() as f64 / held.len() as f64;
    assert!(
        (0.13..=0.18).contains(&over_1000),
        "seed {seed}: share above 1000 ms {over_1000}"
    );
}

// Proves a cut link or a missing node reports NoReply after 0–100 ms, or 0–7000 ms with long delays, uniformly.
#[tokio::test(start_paused = true)]
async fn cut_links_report_no_reply_after_short_or_long_delays() {
    const CALLS: u64 = 4_000;
    let seed = 13;
    let network = SimNetwork::new(SimConfig::new(seed));
    serve_echo(&network.add_node(1).expect("node"));
    let client = network.add_client();
    network.set_link(client.id(), 1, false);
    for (long_delays, to, bound_ms, mean_range) in [
        (false, 1, 100, 47.0..=52.0),
        (true, 1, 7000, 3380.0..=3620.0),
        (false, 99, 100, 47.0..=52.0),
    ] {
        network.set_long_delays(long_delays);
        let outcomes = timed_calls(&client, to, CALLS).await;
        let waits: Vec<u64> = outcomes.iter().map(|&(_, ms)| ms).collect();
        for (result, ms) in &outcomes {
            assert!(
                matches!(result, Err(NetError::NoReply { .. })),
                "seed {seed}: {result:?}"
            );
            assert!(
                *ms < bound_ms,
                "seed {seed}: NoReply after {ms} ms (bound {bound_ms})"
            );
        }
        let mean_ms = mean(&waits);
        assert!(
            mean_range.contains(&mean_ms),
            "seed {seed}: long {long_delays}: mean wait {mean_ms} ms"
        );
    }
    assert_eq!(network.rpc_count(1), 0, "nothing crossed the cut link");
    assert_eq!(network.total_rpcs(), 3 * CALLS);
}

// Proves a crash suppresses replies of running handlers (noticed at the reference's 100 ms check) and a restart is a fresh incarnation.
#[tokio::test(start_paused = true)]
async fn crash_suppresses_in_flight_replies_and_restart_is_fresh() {
    let network = SimNetwork::new(SimConfig::new(14));
    let server = network.add_node(1).expect("node");
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    serve_hang(&server, started, release.clone());
    let client = network.add_client();
    let call = client.call(1, &Hang);
    started_rx.recv().await.expect("handler started");
    let dispatched_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(230)).await;
    network.crash(1);
    release.notify_waiters();
    assert!(matches!(call.await, Err(NetError::NoReply { to: 1 })));
    assert_eq!(
        dispatched_at.elapsed(),
        Duration::from_millis(300),
        "noticed at the next 100 ms check"
    );
    assert!(!network.is_live(1));
    assert!(matches!(
        server.register(|_, _: Echo| async { unreachable!() }),
        Err(NetError::Shutdown)
    ));

    // While crashed, the node does not answer; after a restart, only the new endpoint works.
    assert!(matches!(
        client
            .call(
                1,
                &Echo {
                    seq: 0,
                    body: vec![]
                }
            )
            .await,
        Err(NetError::NoReply { to: 1 })
    ));
    let restarted = network.restart(1);
    serve_echo(&restarted);
    let reply = client
        .call(
            1,
            &Echo {
                seq: 5,
                body: vec![],
            },
        )
        .await
        .expect("fresh incarnation answers");
    assert_eq!(reply.seq, 5);
    assert!(
        matches!(server.send(2, &Seq(0)), Err(NetError::Shutdown)),
        "the old endpoint stays dead"
    );
    assert!(matches!(network.add_node(1), Err(NetError::NodeExists(1))));
}

// Proves a reply is suppressed when the caller's link is cut while the handler runs.
#[tokio::test(start_paused = true)]
async fn link_cut_during_a_call_suppresses_its_reply() {
    let network = SimNetwork::new(SimConfig::new(15));
    let server = network.add_node(1).expect("node");
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    serve_hang(&server, started, release.clone());
    let client = network.add_client();
    let call = client.call(1, &Hang);
    started_rx.recv().await.expect("handler started");
    network.set_link(client.id(), 1, false);
    release.notify_waiters();
    assert!(matches!(call.await, Err(NetError::NoReply { to: 1 })));
    assert_eq!(network.rpc_count(1), 1, "the request did arrive");
}

// Proves the counters: RPCs per receiver and in total, bytes = request payloads + delivered reply payloads.
#[tokio::test(start_paused = true)]
async fn counters_count_rpcs_and_bytes_like_the_reference() {
    let network = SimNetwork::new(SimConfig::new(16));
    let server = network.add_node(1).expect("node");
    serve_echo(&server);
    let _inbox = server.inbox::<Seq>(16).expect("inbox");
    let client = network.add_client();
    let request = Echo {
        seq: 1,
        body: vec![7; 5000],
    };
    let reply = client.call(1, &request).await.expect("reply");
    let request_bytes = postcard::to_allocvec(&request).expect("encode").len() as u64;
    let reply_bytes = postcard::to_allocvec(&reply).expect("encode").len() as u64;
    assert_eq!(network.total_bytes(), request_bytes + reply_bytes);
    client.send(1, &Seq(9)).expect("sent");
    let message_bytes = postcard::to_allocvec(&Seq(9)).expect("encode").len() as u64;
    assert_eq!((network.rpc_count(1), network.total_rpcs()), (2, 2));
    // A request over a cut link counts in the totals only; no reply bytes.
    network.set_link(client.id(), 1, false);
    assert!(client.call(1, &request).await.is_err());
    assert_eq!((network.rpc_count(1), network.total_rpcs()), (2, 3));
    assert_eq!(
        network.total_bytes(),
        2 * request_bytes + reply_bytes + message_bytes
    );
    assert_eq!(network.rpc_count(client.id()), 0);

    // A one-way response is counted like a reply: bytes when delivered, no RPC.
    network.heal();
    let _answers = client.inbox::<Answer>(4).expect("inbox");
    server
        .send(client.id(), &Answer(vec![1; 100]))
        .expect("sent");
    let answer_bytes = postcard::to_allocvec(&Answer(vec![1; 100]))
        .expect("encode")
        .len() as u64;
    assert_eq!(
        (network.rpc_count(client.id()), network.total_rpcs()),
        (0, 3)
    );
    let total_bytes = 2 * request_bytes + reply_bytes + message_bytes + answer_bytes;
    assert_eq!(network.total_bytes(), total_bytes);
    network.set_link(1, client.id(), false);
    server
        .send(client.id(), &Answer(vec![1; 100]))
        .expect("sent");
    assert_eq!(
        network.total_bytes(),
        total_bytes,
        "a lost response adds no bytes"
    );
}

/// A one-way message answering an earlier one.
#[derive(serde::Serialize, serde::Deserialize)]
struct Answer(Vec<u8>);

impl Message for Answer {
    const KIND: Kind = Kind::new(0xf020, 1);

    fn role(&self) -> MessageRole {
        MessageRole::Response
    }
}

// Proves partitions, per-direction links, disconnect/connect and a client's own link, as the reference's ends allow.
#[tokio::test(start_paused = true)]
async fn partitions_and_per_client_links() {
    let network = SimNetwork::new(SimConfig::new(17));
    let nodes: Vec<Endpoint> = (1..=3)
        .map(|id| network.add_node(id).expect("node"))
        .collect();
    nodes.iter().for_each(serve_echo);
    let (clerk_a, clerk_b) = (network.add_client(), network.add_client());
    assert_eq!(
        (clerk_a.id(), clerk_b.id()),
        (CLIENT_ID_BASE, CLIENT_ID_BASE + 1)
    );
    let reaches = |from: &Endpoint, to: NodeId| {
        let call = from.call(
            to,
            &Echo {
                seq: 0,
                body: vec![],
            },
        );
        async move { call.await.is_ok() }
    };
    network.partition(&[&[1, 2, clerk_a.id()], &[3, clerk_b.id()]]);
    assert!(
        reaches(&nodes[0], 2).await && reaches(&clerk_a, 1).await && reaches(&clerk_b, 3).await
    );
    assert!(
        !reaches(&nodes[0], 3).await && !reaches(&nodes[2], 1).await && !reaches(&clerk_b, 1).await
    );
    network.heal();
    assert!(reaches(&nodes[0], 3).await && reaches(&clerk_b, 1).await);
    network.set_link(1, 2, false);
    assert!(
        !reaches(&nodes[0], 2).await && reaches(&nodes[1], 1).await,
        "links are directed"
    );
    network.heal();
    network.disconnect(2);
    assert!(
        !reaches(&nodes[0], 2).await && !reaches(&nodes[1], 3).await && !reaches(&clerk_a, 2).await
    );
    assert!(
        reaches(&nodes[0], 3).await && reaches(&nodes[1], 2).await,
        "others and self unaffected"
    );
    network.connect(2);
    assert!(reaches(&nodes[0], 2).await && reaches(&clerk_a, 2).await);
    network.set_connected(clerk_a.id(), 3, false);
    assert!(
        !reaches(&clerk_a, 3).await && reaches(&clerk_b, 3).await,
        "one clerk's link alone is cut"
    );
}

// Proves one-way messages on an unreliable network lose about 10 % but never arrive out of order.
#[tokio::test(start_paused = true)]
async fn one_way_messages_stay_in_order_on_an_unreliable_network() {
    const MESSAGES: u64 = 5000;
    let seed = 18;
    let network = SimNetwork::new(SimConfig::new(seed));
    let receiver = network.add_node(1).expect("node");
    let mut inbox = receiver.inbox::<Seq>(MESSAGES as usize).expect("inbox");
    let sender = network.add_node(2).expect("node");
    network.set_reliable(false);
    for seq in 0..MESSAGES {
        sender.send(1, &Seq(seq)).expect("queued");
        if seq % 50 == 0 {
            // Spread the sends over time so delays overlap with later sends.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut received = Vec::new();
    while let Some((from, Seq(seq))) = inbox.try_recv() {
        assert_eq!(from, 2);
        received.push(seq);
    }
    assert!(
        received.windows(2).all(|pair| pair[0] < pair[1]),
        "seed {seed}: reordered"
    );
    let loss = 1.0 - received.len() as f64 / MESSAGES as f64;
    assert!((0.085..=0.115).contains(&loss), "seed {seed}: loss {loss}");
    assert_eq!(network.rpc_count(1), received.len() as u64);
}

// Proves that with unordered messages each one-way message travels on its own, like a labrpc
// call: on an unreliable network later messages overtake earlier ones (same ~10 % loss), and
// under long reordering about 600 of 900 response-like messages are held back at least 200 ms,
// while requests are not.
#[tokio::test(start_paused = true)]
async fn unordered_messages_reorder_like_labrpc_calls() {
    const MESSAGES: u64 = 5000;
    let seed = 19;
    let network = SimNetwork::new(SimConfig::new(seed));
    network.set_unordered_messages(true);
    let receiver = network.add_node(1).expect("node");
    let mut inbox = receiver.inbox::<Seq>(MESSAGES as usize).expect("inbox");
    let sender = network.add_node(2).expect("node");
    network.set_reliable(false);
    for seq in 0..MESSAGES {
        sender.send(1, &Seq(seq)).expect("queued");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut received = Vec::new();
    while let Some((_, Seq(seq))) = inbox.try_recv() {
        received.push(seq);
    }
    // A message is overtaken when a later-sent one arrived before it.
    let mut latest = 0;
    let mut overtaken = 0;
    for &seq in &received {
        if seq < latest {
            overtaken += 1;
        }
        latest = latest.max(seq);
    }
    assert!(
        overtaken > received.len() / 2,
        "seed {seed}: only {overtaken} of {} messages overtaken",
        received.len()
    );
    let loss = 1.0 - received.len() as f64 / MESSAGES as f64;
    assert!((0.085..=0.115).contains(&loss), "seed {seed}: loss {loss}");

    // Long reordering, reliable: requests arrive at once, responses mostly late.
    network.set_reliable(true);
    network.set_long_reordering(true);
    let mut answers = receiver.inbox::<Answer>(MESSAGES as usize).expect("inbox");
    let mut requests = 0;
    for seq in 0..900 {
        sender.send(1, &Seq(seq)).expect("queued");
        sender.send(1, &Answer(vec![])).expect("queued");
    }
    while inbox.try_recv().is_some() {
        requests += 1;
    }
    let mut prompt = 0;
    while answers.try_recv().is_some() {
        prompt += 1;
    }
    assert_eq!(requests, 900, "seed {seed}: requests are not held back");
    tokio::time::sleep(Duration::from_millis(199)).await;
    while answers.try_recv().is_some() {
        prompt += 1;
    }
    assert!(
        (240..=360).contains(&prompt),
        "seed {seed}: {prompt} of 900 responses arrived within 199 ms (expected ~300)"
    );
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let mut late = 0;
    while answers.try_recv().is_some() {
        late += 1;
    }
    assert_eq!(prompt + late, 900, "seed {seed}: every response arrives");
}

// Proves a typed inbox skips undecodable payloads and keeps delivering.
#[tokio::test(start_paused = true)]
async fn inbox_skips_undecodable_messages() {
    let network = SimNetwork::new(SimConfig::new(19));
    let receiver = network.add_node(1).expect("node");
    let mut inbox = receiver.inbox::<Seq>(8).expect("inbox");
    let sender = network.add_node(2).expect("node");
    let garbage = bytes::Bytes::from_static(&[0xff; 11]);
    let raw = sender.transport();
    raw.send(1, <Seq as Message>::KIND, garbage, MessageRole::Request)
        .expect("sent");
    sender.send(1, &Seq(4)).expect("sent");
    assert_eq!(inbox.recv().await, Some((2, Seq(4))));
}

/// Runs a busy, faulty scenario in a fresh paused runtime and returns the
/// network's trace and what the callers saw.
fn run_scenario(seed: u64) -> (Vec<SimEvent>, Vec<String>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut config = SimConfig::new(seed);
        config.trace_events_max = 100_000;
        let network = SimNetwork::new(config);
        let begin = Instant::now();
        let nodes: Vec<Endpoint> = (1..=3)
            .map(|id| network.add_node(id).expect("node"))
            .collect();
        nodes.iter().for_each(serve_echo);
        let inboxes: Vec<_> = nodes
            .iter()
            .map(|node| node.inbox::<Seq>(10_000).expect("inbox"))
            .collect();
        network.set_reliable(false);
        network.set_long_reordering(true);
        network.set_long_delays(true);
        let mut callers = Vec::new();
        for node in nodes.clone() {
            callers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                for round in 0..40u64 {
                    let to = (node.id() + round) % 3 + 1;
                    let _ = node.send(to, &Seq(round));
                    let result = node
                        .call(
                            to,
                            &Echo {
                                seq: round,
                                body: vec![0; 10],
                            },
                        )
                        .await;
                    let at = begin.elapsed();
                    seen.push(format!(
                        "{}->{to} #{round}: {:?} at {at:?}",
                        node.id(),
                        result.map(|r| r.seq)
                    ));
                }
                seen
            }));
        }
        // A test-side partitioner drawing from its own seeded generator.
        let mut partitioner = ChaCha8Rng::seed_from_u64(seed ^ 0xabcdef);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(
                1000 + partitioner.random_range(0..200),
            ))
            .await;
            let sides: Vec<bool> = (0..3).map(|_| partitioner.random_bool(0.5)).collect();
            let side = |wanted: bool| -> Vec<NodeId> {
                (1..=3)
                    .filter(|&id| sides[id as usize - 1] == wanted)
                    .collect()
            };
            let (left, right) = (side(true), side(false));
            network.partition(&[&left, &right]);
        }
        let mut seen = Vec::new();
        for caller in callers {
            seen.extend(caller.await.expect("caller"));
        }
        drop(inboxes);
        (network.trace(), seen)
    })
}

// Proves the same seed gives the identical trace and results, and another seed a different one.
#[test]
fn same_seed_gives_the_same_schedule() {
    let seed = 20;
    let (trace, seen) = run_scenario(seed);
    let (trace_again, seen_again) = run_scenario(seed);
    assert!(
        trace.len() > 300,
        "seed {seed}: a busy trace ({} events)",
        trace.len()
    );
    for outcome in [
        SimOutcome::RequestDropped,
        SimOutcome::ReplyDropped,
        SimOutcome::CallUnreachable,
        SimOutcome::MessageDelivered,
    ] {
        assert!(
            trace.iter().any(|event| event.outcome == outcome),
            "seed {seed}: no {outcome:?} in the trace"
        );
    }
    assert!(
        trace == trace_again,
        "seed {seed}: traces differ; replay with `run_scenario({seed})`"
    );
    assert!(
        seen == seen_again,
        "seed {seed}: results differ; replay with `run_scenario({seed})`"
    );
    let (other_trace, _) = run_scenario(seed + 1);
    assert!(
        trace != other_trace,
        "seeds {seed} and {} give the same trace",
        seed + 1
    );
}

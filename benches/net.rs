//! TCP loopback request/response benchmark: round trips per second and
//! p50/p99 latency with 1 and 64 concurrent callers, 128-byte payloads.
//!
//! Criterion measures the time per round trip (its `thrpt` line is round
//! trips per second); every call's latency is also recorded in an
//! hdrhistogram and p50/p99 are printed after each case.
//!
//! Run: `cargo bench --bench net` (quicker: append
//! `-- --warm-up-time 1 --measurement-time 3`).

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::net::{Endpoint, Kind, Rpc};
use serde::{Deserialize, Serialize};

const CLUSTER_ID: u64 = 1;
const PAYLOAD_BYTES: usize = 128;

/// A request answered with a payload of the same size.
#[derive(Serialize, Deserialize)]
struct Ping(Vec<u8>);

impl Rpc for Ping {
    const KIND: Kind = Kind::new(0xf100, 1);
    type Reply = Vec<u8>;
}

/// A server (node 1) and a client on loopback.
async fn pair() -> (TcpTransport, Endpoint) {
    let server = TcpTransport::start(TcpConfig::member(
        CLUSTER_ID,
        1,
        "127.0.0.1:0".parse().expect("address"),
    ))
    .await
    .expect("server");
    server
        .endpoint()
        .register(|_, Ping(payload): Ping| async move { payload })
        .expect("register");
    let mut config = TcpConfig::client(CLUSTER_ID, 2);
    config
        .peers
        .insert(1, server.local_address().expect("listening"));
    let client = TcpTransport::start(config)
        .await
        .expect("client")
        .endpoint();
    // Connect before measuring.
    client
        .call(1, &Ping(vec![0; PAYLOAD_BYTES]))
        .await
        .expect("first call");
    (server, client)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Runs `calls` round trips spread over `callers` tasks; records each
/// latency in microseconds; returns the wall time.
async fn round_trips(
    client: &Endpoint,
    callers: u64,
    calls: u64,
    histogram: &Arc<Mutex<Histogram<u64>>>,
) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let share = calls / callers + u64::from(caller < calls % callers);
        let (client, histogram) = (client.clone(), histogram.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = new_histogram();
            for _ in 0..share {
                let begin = Instant::now();
                let reply = client
                    .call(1, &Ping(vec![7; PAYLOAD_BYTES]))
                    .await
                    .expect("round trip");
                local.saturating_record(begin.elapsed().as_micros() as u64);
                black_box(reply);
            }
            histogram
                .lock()
                .expect("histogram lock")
                .add(&local)
                .expect("same bounds");
        }));
    }
    for task in tasks {
        task.await.expect("caller task");
    }
    started.elapsed()
}

fn tcp_round_trips(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_server, client) = runtime.block_on(pair());
    let mut group = c.benchmark_group("net/tcp_loopback_128B");
    group.throughput(Throughput::Elements(1));
    for callers in [1u64, 64] {
        let histogram = Arc::new(Mutex::new(new_histogram()));
        let mut calls_total = 0u64;
        let mut time_total = Duration::ZERO;
        group.bench_function(format!("{callers}_callers"), |b| {
            b.iter_custom(|iters| {
                let elapsed = runtime.block_on(round_trips(&client, callers, iters, &histogram));
                calls_total += iters;
                time_total += elapsed;
                elapsed
            })
        });
        let histogram = histogram.lock().expect("histogram lock");
        println!(
            "net/tcp_loopback_128B/{callers}_callers: {:.0} round trips/s, p50 {} us, p99 {} us ({} calls recorded)",
            calls_total as f64 / time_total.as_secs_f64(),
            histogram.value_at_quantile(0.50),
            histogram.value_at_quantile(0.99),
            histogram.len(),
        );
    }
    group.finish();
}

criterion_group!(benches, tcp_round_trips);
criterion_main!(benches);

//! Single-node key/value server over TCP loopback: durable puts/s and gets/s
//! with 1 and 64 clients, 128-byte values.
//!
//! The server is the real `KvServer` on a sled `Store` in a temporary
//! directory with the default flush mode (every acknowledged Put is flushed
//! before its reply; concurrent Puts share a flush through group commit).
//! Each client has its own TCP connection and Clerk and works on its own
//! key, so Puts never conflict: a Put at the key's current version, a Get of
//! the key. Criterion's `thrpt` line is operations per second; p50/p99
//! latencies (hdrhistogram, µs) and the server's puts per flush are printed
//! after each case.
//!
//! Run: `cargo bench --bench kv` (quicker: append
//! `-- --warm-up-time 1 --measurement-time 3`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hdrhistogram::Histogram;
use raftkv::kv::{Clerk, ClerkConfig, EndpointRpc, KvServer, KvServerConfig};
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::storage::Store;

const CLUSTER_ID: u64 = 1;
const VALUE_BYTES: usize = 128;
const CLIENTS_MAX: usize = 64;

/// One client: its clerk, its key and the key's current version.
struct Client {
    clerk: Clerk<EndpointRpc>,
    key: String,
    version: AtomicU64,
}

/// The server (node 1) and `CLIENTS_MAX` clients, each on its own connection.
async fn setup(dir: &std::path::Path) -> (TcpTransport, KvServer, Vec<Arc<Client>>) {
    let server_transport = TcpTransport::start(TcpConfig::member(
        CLUSTER_ID,
        1,
        "127.0.0.1:0".parse().expect("address"),
    ))
    .await
    .expect("server transport");
    let store = Store::open(dir).expect("store");
    let server = KvServer::start(
        &server_transport.endpoint(),
        store,
        KvServerConfig::default(),
    )
    .expect("server");
    let address = server_transport.local_address().expect("listening");
    let mut clients = Vec::new();
    for index in 0..CLIENTS_MAX {
        let mut config = TcpConfig::client(CLUSTER_ID, 1000 + index as u64);
        config.peers.insert(1, address);
        let transport = TcpTransport::start(config).await.expect("client transport");
        let rpc = EndpointRpc::new(transport.endpoint(), Duration::from_secs(5));
        let clerk = Clerk::new(rpc, vec![1], ClerkConfig::default()).expect("clerk");
        let key = format!("bench-key-{index}");
        // Create the key (and the connection) before measuring.
        clerk
            .put(&key, Bytes::from(vec![0; VALUE_BYTES]), 0)
            .await
            .expect("create key");
        clients.push(Arc::new(Client {
            clerk,
            key,
            version: AtomicU64::new(1),
        }));
    }
    (server_transport, server, clients)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Put,
    Get,
}

/// Runs `operations` spread over the first `clients` clients; records each
/// latency in microseconds; returns the wall time.
async fn run(
    clients: &[Arc<Client>],
    operation: Operation,
    operations: u64,
    histogram: &Arc<Mutex<Histogram<u64>>>,
) -> Duration {
    let started = Instant::now();
    let count = clients.len() as u64;
    let mut tasks = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let share = operations / count + u64::from((index as u64) < operations % count);
        let (client, histogram) = (client.clone(), histogram.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = new_histogram();
            let value = Bytes::from(vec![7; VALUE_BYTES]);
            for _ in 0..share {
                let begin = Instant::now();
                match operation {
                    Operation::Put => {
                        let version = client.version.load(Ordering::Relaxed);
                        client
                            .clerk
                            .put(&client.key, value.clone(), version)
                            .await
                            .expect("uncontended put");
                        client.version.store(version + 1, Ordering::Relaxed);
                    }
                    Operation::Get => {
                        let found = client.clerk.get(&client.key).await.expect("get");
                        std::hint::black_box(found);
                    }
                }
                local.saturating_record(begin.elapsed().as_micros() as u64);
            }
            histogram
                .lock()
                .expect("histogram lock")
                .add(&local)
                .expect("same bounds");
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    started.elapsed()
}

fn kv_server(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_transport, server, clients) = runtime.block_on(setup(dir.path()));
    let mut group = c.benchmark_group("kv/tcp_loopback_128B");
    group.throughput(Throughput::Elements(1));
    for operation in [Operation::Put, Operation::Get] {
        for count in [1usize, CLIENTS_MAX] {
            let histogram = Arc::new(Mutex::new(new_histogram()));
            let mut operations_total = 0u64;
            let mut time_total = Duration::ZERO;
            let before = server.stats();
            let name = format!("{operation:?}s_{count}_clients").to_lowercase();
            group.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let elapsed =
                        runtime.block_on(run(&clients[..count], operation, iters, &histogram));
                    operations_total += iters;
                    time_total += elapsed;
                    elapsed
                })
            });
            let after = server.stats();
            let histogram = histogram.lock().expect("histogram lock");
            let flushes = after.commits - before.commits;
            let per_flush = match operation {
                Operation::Put => format!(
                    ", {:.1} puts per flush",
                    (after.installs - before.installs) as f64 / flushes.max(1) as f64
                ),
                Operation::Get => String::new(),
            };
            println!(
                "kv/tcp_loopback_128B/{name}: {:.0} ops/s, p50 {} us, p99 {} us{per_flush} ({} ops recorded)",
                operations_total as f64 / time_total.as_secs_f64(),
                histogram.value_at_quantile(0.50),
                histogram.value_at_quantile(0.99),
                histogram.len(),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, kv_server);
criterion_main!(benches);

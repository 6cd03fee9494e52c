//! Raft commit throughput and latency: a 3-node cluster of real node
//! drivers in one process, with (a) in-memory `MemStore`s and (b) sled
//! `Store`s flushing on every commit, and 1 or 64 concurrent proposers.
//!
//! Each proposer loops: propose a 16-byte command on the leader, wait until
//! the leader's service has applied it, repeat. Latency is propose → applied
//! on the leader (commit plus apply). The network is the simulated one in
//! reliable mode with zero delay: a send encodes the message (postcard) and
//! hands it straight to the receiver's inbox, the most direct path through
//! the real `Endpoint`/`Transport` interfaces. Batching is read from the
//! drivers' counters: entries per flush and entries per append message.
//!
//! Runtimes (all three by default; `--runtime R` picks one): `current`,
//! everything on one current-thread runtime; `per-node`, one current-thread
//! runtime on its own OS thread per node (proposers next to the leader);
//! `multi`, one work-stealing runtime with 2 workers.
//!
//! Run: `cargo bench --bench raft` (`-- --seconds S` sets the measured
//! time per case, default 5; `--runtime current|per-node|multi`; `--only mem|sled` one store
//! (`sled` also runs `sled-strict`, the baseline without the leader's
//! parallel flush);
//! `--snapshot-every N` the service's snapshot period, default 10,000
//! entries, 0 = never).
//! `cargo test --benches` runs each case for a moment as a smoke test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use raftkv::NodeId;
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::raft::{Apply, Metrics, NodeConfig, NodeError, RaftNode, Role};
use raftkv::storage::{MemDisk, MemStore, RaftLogStorage, Store};
use tokio::sync::{Notify, mpsc};

const VOTERS: [NodeId; 3] = [1, 2, 3];
const COMMAND_BYTES: usize = 16;
/// Default snapshot period of the bench's service, in entries.
const SNAPSHOT_EVERY_ENTRIES_DEFAULT: u64 = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StoreKind {
    Memory,
    Sled,
    /// Sled with `send_appends_before_persist` off: the baseline for the
    /// leader's parallel flush (flush, then send, on every node).
    SledStrict,
}

/// What the leader's service tells the proposers: per proposer, the
/// highest sequence number applied, and a wake-up.
struct Applied {
    sequence: Vec<AtomicU64>,
    notify: Vec<Notify>,
}

/// The service of one node: reads its apply channel; on the leader it
/// wakes the proposer whose command was applied. Like a real service it
/// snapshots regularly (every `snapshot_every` entries, 0 = never), which
/// lets Raft compact its log in memory and in storage.
async fn service(
    node: RaftNode,
    mut applied: mpsc::Receiver<Apply>,
    waiters: Arc<Applied>,
    snapshot_every: u64,
) {
    while let Some(item) = applied.recv().await {
        if let Apply::Entries(entries) = item {
            let last = entries.last().map_or(0, |e| e.index);
            let first = entries.first().map_or(0, |e| e.index);
            if snapshot_every > 0 && last / snapshot_every > (first - 1) / snapshot_every {
                // The bench's state machine has no state worth keeping.
                let _ = node.snapshot(last, Bytes::from_static(b"bench")).await;
            }
            for entry in entries {
                let Some(data) = entry.data else { continue };
                let proposer = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let sequence = u64::from_le_bytes(data[4..12].try_into().expect("8 bytes"));
                waiters.sequence[proposer].fetch_max(sequence, Ordering::Release);
                waiters.notify[proposer].notify_one();
            }
        }
    }
}

struct Cluster {
    nodes: Vec<RaftNode>,
    waiters: Vec<Arc<Applied>>,
    /// The runtime each node's driver and service run on.
    handles: Vec<tokio::runtime::Handle>,
    /// Declared before the directories: stopped first.
    _runtimes: Vec<NodeRuntime>,
    _dirs: Vec<tempfile::TempDir>,
}

fn start_node<S: RaftLogStorage + 'static>(
    runtime: &tokio::runtime::Handle,
    net: &SimNetwork,
    id: NodeId,
    storage: S,
    kind: StoreKind,
    proposers: usize,
    snapshot_every: u64,
) -> (RaftNode, Arc<Applied>) {
    let config = NodeConfig {
        rng_seed: id,
        // Sled commits wait for the disk; MemStore's never do.
        block_in_place_for_storage: kind != StoreKind::Memory,
        send_appends_before_persist: kind != StoreKind::SledStrict,
        ..NodeConfig::default()
    };
    let endpoint = net.add_node(id).expect("adding a node");
    // The driver task runs on the node's runtime.
    let _entered = runtime.enter();
    let (node, applied) =
        RaftNode::start(id, &VOTERS, config, storage, endpoint).expect("starting a node");
    let waiters = Arc::new(Applied {
        sequence: (0..proposers).map(|_| AtomicU64::new(0)).collect(),
        notify: (0..proposers).map(|_| Notify::new()).collect(),
    });
    runtime.spawn(service(
        node.clone(),
        applied,
        waiters.clone(),
        snapshot_every,
    ));
    (node, waiters)
}

/// A current-thread runtime on its own OS thread, for one node.
struct NodeRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeRuntime {
    fn start(name: String) -> NodeRuntime {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("node runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })
            .expect("node thread");
        NodeRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn cluster(
    kind: StoreKind,
    proposers: usize,
    snapshot_every: u64,
    runtime_per_node: bool,
) -> Cluster {
    let net = SimNetwork::new(SimConfig::new(1));
    let mut nodes = Vec::new();
    let mut waiters = Vec::new();
    let mut dirs = Vec::new();
    let mut runtimes = Vec::new();
    let mut handles = Vec::new();
    for id in VOTERS {
        let handle = if runtime_per_node {
            let runtime = NodeRuntime::start(format!("node-{id}"));
            let handle = runtime.handle.clone();
            runtimes.push(runtime);
            handle
        } else {
            tokio::runtime::Handle::current()
        };
        let (node, applied) = match kind {
            StoreKind::Memory => {
                let store = MemStore::open(&MemDisk::new()).expect("memory store");
                start_node(&handle, &net, id, store, kind, proposers, snapshot_every)
            }
            StoreKind::Sled | StoreKind::SledStrict => {
                let dir = tempfile::tempdir().expect("temp dir");
                let store = Store::open(dir.path()).expect("sled store");
                dirs.push(dir);
                start_node(&handle, &net, id, store, kind, proposers, snapshot_every)
            }
        };
        nodes.push(node);
        waiters.push(applied);
        handles.push(handle);
    }
    Cluster {
        nodes,
        waiters,
        handles,
        _runtimes: runtimes,
        _dirs: dirs,
    }
}

impl Cluster {
    /// Waits (on status changes) for a leader; returns its position.
    async fn leader(&self) -> usize {
        loop {
            if let Some(position) = self.nodes.iter().position(|n| n.state().1) {
                return position;
            }
            let mut changes: Vec<_> = self.nodes.iter().map(|n| n.subscribe()).collect();
            let waits = changes.iter_mut().map(|c| Box::pin(c.changed()));
            let _ = futures::future::select_all(waits).await;
        }
    }
}

struct Outcome {
    commits: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    leader: Metrics,
    followers: Metrics,
}

/// One proposer: propose, wait until applied on the leader, repeat.
async fn proposer(
    me: usize,
    node: RaftNode,
    waiters: Arc<Applied>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> (u64, Histogram<u64>) {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let mut commits = 0;
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        sequence += 1;
        let mut command = Vec::with_capacity(COMMAND_BYTES);
        command.extend_from_slice(&(me as u32).to_le_bytes());
        command.extend_from_slice(&sequence.to_le_bytes());
        command.resize(COMMAND_BYTES, 0);
        let begin = Instant::now();
        match node.propose(Bytes::from(command)).await {
            Ok(_) => {}
            Err(NodeError::Stopped) => break,
            Err(error) => panic!("proposal refused: {error} (leadership changed during the bench)"),
        }
        while waiters.sequence[me].load(Ordering::Acquire) < sequence {
            waiters.notify[me].notified().await;
        }
        if measuring.load(Ordering::Relaxed) {
            commits += 1;
            latency
                .record(begin.elapsed().as_nanos() as u64)
                .expect("latency in range");
        }
    }
    (commits, latency)
}

fn sum(metrics: impl Iterator<Item = Metrics>) -> Metrics {
    metrics.fold(Metrics::default(), |mut total, m| {
        total.flushes += m.flushes;
        total.entries_persisted += m.entries_persisted;
        total.append_messages_sent += m.append_messages_sent;
        total.append_entries_sent += m.append_entries_sent;
        total.readies += m.readies;
        total
    })
}

fn delta(after: Metrics, before: Metrics) -> Metrics {
    Metrics {
        flushes: after.flushes - before.flushes,
        entries_persisted: after.entries_persisted - before.entries_persisted,
        append_messages_sent: after.append_messages_sent - before.append_messages_sent,
        append_entries_sent: after.append_entries_sent - before.append_entries_sent,
        readies: after.readies - before.readies,
        ..Metrics::default()
    }
}

struct Case {
    kind: StoreKind,
    proposers: usize,
    warm_up: Duration,
    measure: Duration,
    snapshot_every: u64,
    runtime_per_node: bool,
}

async fn run_case(case: Case) -> Outcome {
    let Case {
        kind,
        proposers,
        warm_up,
        measure,
        snapshot_every,
        runtime_per_node,
    } = case;
    let cluster = cluster(kind, proposers, snapshot_every, runtime_per_node).await;
    let leader = cluster.leader().await;
    let node = cluster.nodes[leader].clone();
    let waiters = cluster.waiters[leader].clone();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..proposers)
        .map(|me| {
            // Proposers run next to the leader, like the clients of its service.
            cluster.handles[leader].spawn(proposer(
                me,
                node.clone(),
                waiters.clone(),
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(warm_up).await;
    let leader_before = cluster.nodes[leader].status().metrics;
    let followers_before = sum((0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.nodes[i].status().metrics));
    measuring.store(true, Ordering::Relaxed);
    let begin = Instant::now();
    tokio::time::sleep(measure).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = begin.elapsed();
    let leader_after = cluster.nodes[leader].status().metrics;
    let followers_after = sum((0..3)
        .filter(|&i| i != leader)
        .map(|i| cluster.nodes[i].status().metrics));
    stop.store(true, Ordering::Relaxed);
    let mut commits = 0;
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for task in tasks {
        let (count, histogram) = task.await.expect("proposer");
        commits += count;
        latency.add(histogram).expect("histograms add");
    }
    assert!(
        cluster
            .nodes
            .iter()
            .all(|n| n.status().role != Role::Leader || n.id() == node.id()),
        "leadership changed during the bench"
    );
    for node in &cluster.nodes {
        node.shutdown().await;
    }
    Outcome {
        commits,
        elapsed,
        latency,
        leader: delta(leader_after, leader_before),
        followers: delta(followers_after, followers_before),
    }
}

fn argument(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    // `cargo test --benches` passes `--test`: run each case briefly.
    let smoke = std::env::args().any(|a| a == "--test");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: f64 = argument("--seconds")
        .map(|s| s.parse().expect("--seconds takes a number"))
        .unwrap_or(5.0);
    let (warm_up, measure) = if smoke {
        (Duration::from_millis(200), Duration::from_millis(300))
    } else {
        (Duration::from_secs(1), Duration::from_secs_f64(seconds))
    };
    let runtimes: Vec<String> = match argument("--runtime") {
        Some(kind) => vec![kind],
        None => ["current", "per-node", "multi"].map(String::from).to_vec(),
    };
    let only = argument("--only");
    let snapshot_every: u64 = argument("--snapshot-every")
        .map(|s| {
            s.parse()
                .expect("--snapshot-every takes a number of entries")
        })
        .unwrap_or(SNAPSHOT_EVERY_ENTRIES_DEFAULT);
    println!(
        "raft bench: 3 nodes in one process, {COMMAND_BYTES}-byte commands, snapshot every \
         {snapshot_every} entries, {:.1} s per case after {:.1} s warm-up",
        measure.as_secs_f64(),
        warm_up.as_secs_f64()
    );
    println!(
        "{:<9} {:<11} {:>9} {:>10} {:>9} {:>9} {:>12} {:>12} {:>10}",
        "runtime",
        "store",
        "proposers",
        "commits/s",
        "p50 us",
        "p99 us",
        "leader e/fl",
        "follower e/fl",
        "e/append"
    );
    for runtime_kind in &runtimes {
        let runtime_per_node = runtime_kind == "per-node";
        let runtime = match runtime_kind.as_str() {
            // One thread for everything.
            "current" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            // One thread per node (the bench itself on the main thread).
            "per-node" => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            // A work-stealing runtime with 2 workers for everything.
            "multi" => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
            other => panic!("--runtime current|per-node|multi, not {other}"),
        }
        .expect("tokio runtime");
        for kind in [StoreKind::Memory, StoreKind::Sled, StoreKind::SledStrict] {
            let name = match kind {
                StoreKind::Memory => "mem",
                StoreKind::Sled => "sled",
                StoreKind::SledStrict => "sled-strict",
            };
            if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
                continue;
            }
            for proposers in [1, 64] {
                let outcome = runtime.block_on(run_case(Case {
                    kind,
                    proposers,
                    warm_up,
                    measure,
                    snapshot_every,
                    runtime_per_node,
                }));
                let rate = outcome.commits as f64 / outcome.elapsed.as_secs_f64();
                println!(
                    "{:<9} {:<11} {:>9} {:>10.0} {:>9.1} {:>9.1} {:>12.1} {:>12.1} {:>10.1}",
                    runtime_kind,
                    name,
                    proposers,
                    rate,
                    outcome.latency.value_at_quantile(0.50) as f64 / 1000.0,
                    outcome.latency.value_at_quantile(0.99) as f64 / 1000.0,
                    outcome.leader.entries_per_flush(),
                    outcome.followers.entries_per_flush(),
                    outcome.leader.entries_per_append(),
                );
            }
        }
    }
}

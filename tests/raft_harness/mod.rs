//! The Lab 3 test harness (the reference's `config.go`), over the real node
//! driver: each server is a [`RaftNode`] on a sled [`Store`] in its own temp
//! directory, talking through one seeded [`SimNetwork`] with long delays on,
//! under tokio's paused clock. A crash cuts the server's links, crashes its
//! network incarnation and shuts its driver down (after which that instance
//! writes nothing more), then closes its store; a restart opens a fresh node
//! on the same directory. Every server's applied entries feed one checker
//! (the reference's applier): the same value at each index on every server,
//! applied in order, snapshots consistent with what was applied.
//!
//! Seeds: each scenario has a default seed derived from its name;
//! `RAFTKV_LAB_SEED=S` overrides it. A failing scenario prints its seed and
//! the command that replays it.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use raftkv::NodeId;
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::raft::{Apply, NodeConfig, NodeError, RaftNode, SnapshotError};
use raftkv::storage::{RaftLogStorage, Store};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

/// The reference's election timeout: the unit of the scenarios' waits.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
/// The service snapshots after every this many entries (index + 1 divisible by it).
pub const SNAPSHOT_INTERVAL: u64 = 10;
/// Largest persisted Raft state allowed in the snapshot scenarios, in bytes.
pub const RAFT_STATE_BYTES_MAX: u64 = 2000;
/// The Raft group the servers use.
const GROUP: u64 = 0;

/// A value at a log index as a server applied it: a command, or `None` for a
/// Raft no-op.
type Value = Option<Bytes>;

fn show(value: &Value) -> String {
    match value {
        None => "no-op".to_string(),
        Some(bytes) if bytes.len() == 8 => {
            format!(
                "{}",
                u64::from_le_bytes(bytes[..].try_into().expect("8 bytes"))
            )
        }
        Some(bytes) => format!("<{} bytes>", bytes.len()),
    }
}

/// A command of the scenarios: an integer, 8 bytes little-endian.
pub fn int(value: u64) -> Bytes {
    Bytes::copy_from_slice(&value.to_le_bytes())
}

/// The reference's applier checks, over every server.
#[derive(Default)]
struct Checker {
    /// Per server: index → value applied (kept across restarts, like the reference).
    logs: Vec<BTreeMap<u64, Value>>,
    /// Per server: the index the current incarnation must apply next.
    next_index: Vec<u64>,
    max_index: u64,
    error: Option<String>,
}

impl Checker {
    fn new(servers: usize) -> Self {
        Checker {
            logs: vec![BTreeMap::new(); servers],
            next_index: vec![1; servers],
            max_index: 0,
            error: None,
        }
    }

    fn fail(&mut self, message: String) {
        if self.error.is_none() {
            self.error = Some(message);
        }
    }

    /// Records that `server` applied `value` at `index`.
    fn apply(&mut self, server: usize, index: u64, value: Value) {
        if index != self.next_index[server] {
            let expected = self.next_index[server];
            self.fail(format!(
                "server {server} apply out of order: expected index {expected}, got {index}"
            ));
        }
        for (other, log) in self.logs.iter().enumerate() {
            if let Some(old) = log.get(&index) {
                if *old != value {
                    let message = format!(
                        "commit index={index} server={server} {} != server={other} {}",
                        show(&value),
                        show(old)
                    );
                    self.fail(message);
                    break;
                }
            }
        }
        self.logs[server].insert(index, value);
        self.next_index[server] = index + 1;
        self.max_index = self.max_index.max(index);
    }

    /// The service's snapshot of `server` through `index`: the index and
    /// every value applied up to it.
    fn snapshot_data(&mut self, server: usize, index: u64) -> Option<Bytes> {
        let mut values: Vec<Value> = Vec::with_capacity(index as usize);
        for i in 1..=index {
            match self.logs[server].get(&i) {
                Some(value) => values.push(value.clone()),
                None => {
                    self.fail(format!(
                        "server {server} snapshots through {index} without having applied {i}"
                    ));
                    return None;
                }
            }
        }
        let encoded: (u64, Vec<Option<Vec<u8>>>) = (
            index,
            values.into_iter().map(|v| v.map(|b| b.to_vec())).collect(),
        );
        Some(Bytes::from(
            postcard::to_allocvec(&encoded).expect("encoding a snapshot"),
        ))
    }

    /// `server` replaces its state with a snapshot through `index`.
    fn ingest_snapshot(&mut self, server: usize, index: u64, data: &[u8]) {
        let decoded: Result<(u64, Vec<Option<Vec<u8>>>), _> = postcard::from_bytes(data);
        let Ok((snapshot_index, values)) = decoded else {
            self.fail(format!(
                "server {server}: snapshot at {index} does not decode"
            ));
            return;
        };
        if snapshot_index != index || values.len() as u64 != index {
            self.fail(format!(
                "server {server}: snapshot handed at index {index} holds index {snapshot_index} with {} values",
                values.len()
            ));
            return;
        }
        let mut log = BTreeMap::new();
        for (position, value) in values.into_iter().enumerate() {
            let i = position as u64 + 1;
            let value: Value = value.map(Bytes::from);
            for (other, other_log) in self.logs.iter().enumerate() {
                if let Some(old) = other_log.get(&i) {
                    if *old != value {
                        let message = format!(
                            "snapshot of server {server} has {} at index {i}, server {other} applied {}",
                            show(&value),
                            show(old)
                        );
                        self.fail(message);
                        return;
                    }
                }
            }
            log.insert(i, value);
        }
        self.logs[server] = log;
        self.next_index[server] = index + 1;
        self.max_index = self.max_index.max(index);
    }

    fn n_committed(&self, index: u64) -> Result<(usize, Value), String> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let mut count = 0;
        let mut value: Value = None;
        for log in &self.logs {
            if let Some(v) = log.get(&index) {
                if count > 0 && *v != value {
                    return Err(format!(
                        "committed values do not match: index {index}, {}, {}",
                        show(&value),
                        show(v)
                    ));
                }
                count += 1;
                value = v.clone();
            }
        }
        Ok((count, value))
    }
}

/// Options of a lab cluster.
#[derive(Clone, Copy, Debug)]
pub struct LabOptions {
    /// Number of servers.
    pub servers: usize,
    /// Unreliable network (delays, drops) from the start.
    pub unreliable: bool,
    /// The service snapshots every `SNAPSHOT_INTERVAL` entries.
    pub snapshots: bool,
}

impl LabOptions {
    /// `servers` servers on a reliable network, no snapshots.
    pub fn new(servers: usize) -> Self {
        LabOptions {
            servers,
            unreliable: false,
            snapshots: false,
        }
    }
}

struct ClusterInner {
    n: usize,
    net: SimNetwork,
    nodes: Mutex<Vec<Option<RaftNode>>>,
    connected: Mutex<Vec<bool>>,
    checker: Mutex<Checker>,
    rng: Mutex<ChaCha8Rng>,
}

/// The part of the lab that concurrent clients share (the reference's
/// `cfg` methods that only read): proposals, agreement, leader checks.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Server index (0-based, as in the reference) to node id.
pub fn id(server: usize) -> NodeId {
    server as NodeId + 1
}

impl Cluster {
    /// Number of servers.
    pub fn n(&self) -> usize {
        self.inner.n
    }

    /// The simulated network.
    pub fn net(&self) -> &SimNetwork {
        &self.inner.net
    }

    /// A random number from the scenario's seeded generator.
    pub fn rand(&self) -> u64 {
        lock(&self.inner.rng).random()
    }

    /// A random number below `bound`.
    pub fn rand_below(&self, bound: u64) -> u64 {
        lock(&self.inner.rng).random_range(0..bound)
    }

    /// The live node of `server`, if any.
    pub fn node(&self, server: usize) -> Option<RaftNode> {
        lock(&self.inner.nodes)[server].clone()
    }

    /// Whether `server` is connected.
    pub fn is_connected(&self, server: usize) -> bool {
        lock(&self.inner.connected)[server]
    }

    /// Panics with the first error the checker found.
    pub fn check_errors(&self) {
        if let Some(error) = &lock(&self.inner.checker).error {
            panic!("apply checker: {error}");
        }
    }

    /// Re-enables the links between `server` and every connected server.
    pub fn connect(&self, server: usize) {
        let mut connected = lock(&self.inner.connected);
        connected[server] = true;
        for other in 0..self.inner.n {
            if other != server && connected[other] {
                self.inner.net.set_connected(id(server), id(other), true);
            }
        }
    }

    /// Cuts every link of `server`.
    pub fn disconnect(&self, server: usize) {
        let mut connected = lock(&self.inner.connected);
        connected[server] = false;
        for other in 0..self.inner.n {
            if other != server {
                self.inner.net.set_connected(id(server), id(other), false);
            }
        }
    }

    /// The reference's `Start`: proposes on `server` if it is live.
    /// `Some((index, term))` when it accepted as leader.
    pub async fn start_command(&self, server: usize, command: Bytes) -> Option<(u64, u64)> {
        let node = self.node(server)?;
        node.propose(command).await.ok()
    }

    /// The reference's Starts issued back to back: every proposal is queued
    /// on `server`, in order, before any answer is awaited (the reference's
    /// Start returns without waiting for the network, so its consecutive
    /// Starts reach Raft together). Answers in the same order.
    pub async fn start_commands_back_to_back(
        &self,
        server: usize,
        commands: Vec<Bytes>,
    ) -> Vec<Option<(u64, u64)>> {
        let Some(node) = self.node(server) else {
            return vec![None; commands.len()];
        };
        let mut pending = Vec::with_capacity(commands.len());
        for command in commands {
            // One poll queues the proposal (unconstrained: tokio's
            // cooperative budget could otherwise refuse the channel).
            let mut proposal = Box::pin(tokio::task::unconstrained(node.propose(command)));
            if let std::task::Poll::Ready(answer) = futures::poll!(proposal.as_mut()) {
                pending.push(futures::future::Either::Left(std::future::ready(answer)));
            } else {
                pending.push(futures::future::Either::Right(proposal));
            }
        }
        futures::future::join_all(pending)
            .await
            .into_iter()
            .map(Result::ok)
            .collect()
    }

    /// The reference's `GetState` of a live server.
    pub fn state(&self, server: usize) -> Option<(u64, bool)> {
        self.node(server).map(|node| node.state())
    }

    /// How many servers applied `index`, and the value (panics if they differ).
    pub fn n_committed(&self, index: u64) -> (usize, Value) {
        match lock(&self.inner.checker).n_committed(index) {
            Ok(result) => result,
            Err(error) => panic!("{error}"),
        }
    }

    /// Highest index any server applied.
    pub fn max_index(&self) -> u64 {
        lock(&self.inner.checker).max_index
    }

    /// Checks that exactly one connected server leads its latest term and
    /// returns it; waits up to 10 rounds of about half a second (5 s).
    pub async fn check_one_leader(&self) -> usize {
        for _ in 0..10 {
            let ms = 450 + self.rand_below(100);
            sleep(Duration::from_millis(ms)).await;
            let mut leaders: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for server in 0..self.n() {
                if self.is_connected(server) {
                    if let Some((term, true)) = self.state(server) {
                        leaders.entry(term).or_default().push(server);
                    }
                }
            }
            for (term, servers) in &leaders {
                assert!(
                    servers.len() <= 1,
                    "term {term} has {} (>1) leaders: {servers:?}",
                    servers.len()
                );
            }
            if let Some((_, servers)) = leaders.iter().next_back() {
                return servers[0];
            }
        }
        panic!("expected one leader, got none");
    }

    /// Checks that every connected server has the same term and returns it.
    pub fn check_terms(&self) -> u64 {
        let mut term = None;
        for server in 0..self.n() {
            if self.is_connected(server) {
                let (server_term, _) = self.state(server).expect("connected server is live");
                match term {
                    None => term = Some(server_term),
                    Some(t) => assert_eq!(t, server_term, "servers disagree on term"),
                }
            }
        }
        term.expect("no connected server")
    }

    /// Checks that no connected server thinks it is the leader.
    pub fn check_no_leader(&self) {
        for server in 0..self.n() {
            if self.is_connected(server) {
                if let Some((_, true)) = self.state(server) {
                    panic!(
                        "expected no leader among connected servers, but {server} claims to be leader"
                    );
                }
            }
        }
    }

    /// The reference's `one`: submits `command` until some leader accepts it
    /// and `expected` servers applied it at that index; retries for up to
    /// 10 s when `retry`. Returns the index.
    pub async fn one(&self, command: Bytes, expected: usize, retry: bool) -> u64 {
        let begin = Instant::now();
        let mut starts = 0;
        while begin.elapsed() < Duration::from_secs(10) {
            let mut index = None;
            for _ in 0..self.n() {
                starts = (starts + 1) % self.n();
                if self.is_connected(starts) {
                    if let Some((i, _)) = self.start_command(starts, command.clone()).await {
                        index = Some(i);
                        break;
                    }
                }
            }
            if let Some(index) = index {
                let waited = Instant::now();
                while waited.elapsed() < Duration::from_secs(2) {
                    let (count, value) = self.n_committed(index);
                    if count > 0 && count >= expected && value.as_ref() == Some(&command) {
                        return index;
                    }
                    sleep(Duration::from_millis(20)).await;
                }
                assert!(
                    retry,
                    "one({}) failed to reach agreement",
                    show(&Some(command.clone()))
                );
            } else {
                sleep(Duration::from_millis(50)).await;
            }
        }
        panic!(
            "one({}) failed to reach agreement within 10 s",
            show(&Some(command))
        );
    }

    /// The reference's `wait`: waits for `expected` servers to apply `index`;
    /// `None` when some server moved past `start_term` (if given).
    pub async fn wait(
        &self,
        index: u64,
        expected: usize,
        start_term: Option<u64>,
    ) -> Option<Value> {
        let mut pause = Duration::from_millis(10);
        for _ in 0..30 {
            let (count, _) = self.n_committed(index);
            if count >= expected {
                break;
            }
            sleep(pause).await;
            if pause < Duration::from_secs(1) {
                pause *= 2;
            }
            if let Some(start_term) = start_term {
                for server in 0..self.n() {
                    if let Some((term, _)) = self.state(server) {
                        if term > start_term {
                            return None;
                        }
                    }
                }
            }
        }
        let (count, value) = self.n_committed(index);
        assert!(
            count >= expected,
            "only {count} decided for index {index}; wanted {expected}"
        );
        Some(value)
    }

    /// RPCs received by all servers so far.
    pub fn rpc_total(&self) -> u64 {
        (0..self.n())
            .map(|server| self.inner.net.rpc_count(id(server)))
            .sum()
    }

    /// Bytes sent so far (requests plus delivered replies).
    pub fn bytes_total(&self) -> u64 {
        self.inner.net.total_bytes()
    }
}

/// One live server's resources besides its node.
struct Server {
    store: Store,
    applier: JoinHandle<()>,
}

/// A lab cluster: the shared [`Cluster`] plus the servers' directories and
/// stores, crash and restart.
pub struct Lab {
    cluster: Cluster,
    name: &'static str,
    seed: u64,
    options: LabOptions,
    dirs: Vec<tempfile::TempDir>,
    servers: Vec<Option<Server>>,
    incarnations: Vec<u64>,
    /// Persisted Raft state of crashed servers, measured when they stopped.
    crashed_state_bytes: Vec<u64>,
    finished: bool,
    begin: Instant,
}

impl std::ops::Deref for Lab {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

/// Seed of a scenario: `RAFTKV_LAB_SEED` or a hash of its name.
fn scenario_seed(name: &str) -> u64 {
    if let Ok(text) = std::env::var("RAFTKV_LAB_SEED") {
        return text
            .parse()
            .unwrap_or_else(|_| panic!("RAFTKV_LAB_SEED={text} is not a number"));
    }
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Lab {
    /// Starts a cluster for scenario `name` (the test's function name, used
    /// in the replay command) with every server up and connected.
    pub async fn new(name: &'static str, options: LabOptions) -> Lab {
        let seed = scenario_seed(name);
        let n = options.servers;
        let net = SimNetwork::new(SimConfig::new(seed));
        net.set_long_delays(true);
        // Raft's messages are one-way; delivered each on its own they meet
        // the reordering labrpc gives RPCs (unreliable delays, long
        // reordering of responses).
        net.set_unordered_messages(true);
        net.set_reliable(!options.unreliable);
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                n,
                net,
                nodes: Mutex::new(vec![None; n]),
                connected: Mutex::new(vec![false; n]),
                checker: Mutex::new(Checker::new(n)),
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed)),
            }),
        };
        let dirs = (0..n)
            .map(|_| tempfile::tempdir().expect("creating a temp directory"))
            .collect();
        let mut lab = Lab {
            cluster,
            name,
            seed,
            options,
            dirs,
            servers: (0..n).map(|_| None).collect(),
            incarnations: vec![0; n],
            crashed_state_bytes: vec![0; n],
            finished: false,
            begin: Instant::now(),
        };
        for server in 0..n {
            lab.start(server).await;
        }
        for server in 0..n {
            lab.connect(server);
        }
        lab
    }

    /// The scenario's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The reference's `start1`: (re)starts `server` from its directory,
    /// crashing the running instance first. The new instance is
    /// disconnected until [`Cluster::connect`].
    pub async fn start(&mut self, server: usize) {
        self.crash(server).await;
        self.incarnations[server] += 1;
        let store = Store::open(self.dirs[server].path()).expect("opening the server's store");
        let rng_seed = self.seed ^ (id(server) << 48) ^ self.incarnations[server];
        let config = NodeConfig {
            rng_seed,
            // About half the incarnations persist asynchronously, as `raftkv
            // server` does with its storage thread (deterministically here):
            // clusters mix both ways. Of those, about half flush inline while
            // following (the server's default), the others queue every flush.
            async_persistence: (rng_seed >> 1) & 1 == 1,
            followers_flush_inline: (rng_seed >> 2) & 1 == 1,
            ..NodeConfig::default()
        };
        let voters: Vec<NodeId> = (0..self.n()).map(id).collect();
        let endpoint = self.cluster.inner.net.restart(id(server));
        let (node, applied) = RaftNode::start(id(server), &voters, config, store.clone(), endpoint)
            .expect("starting a raft node");
        lock(&self.cluster.inner.checker).next_index[server] = 1;
        let applier = tokio::spawn(applier(
            self.cluster.clone(),
            server,
            node.clone(),
            applied,
            self.options.snapshots,
        ));
        lock(&self.cluster.inner.nodes)[server] = Some(node);
        self.servers[server] = Some(Server { store, applier });
    }

    /// The reference's `crash1`: cuts `server` off, crashes its network
    /// incarnation, shuts its driver down and closes its store. Nothing
    /// happens to a server that is already down.
    pub async fn crash(&mut self, server: usize) {
        self.disconnect(server);
        let node = lock(&self.cluster.inner.nodes)[server].take();
        let Some(node) = node else {
            return;
        };
        self.cluster.inner.net.crash(id(server));
        node.shutdown().await;
        let resources = self.servers[server]
            .take()
            .expect("a live node has its resources");
        // The applier ends once it has read what the closed channel still held.
        if let Err(error) = resources.applier.await {
            std::panic::resume_unwind(error.into_panic());
        }
        self.crashed_state_bytes[server] = resources
            .store
            .raft_state_bytes(GROUP)
            .expect("measuring the raft state");
        drop(resources.store);
        self.check_errors();
    }

    /// The reference's `LogSize`: the largest persisted Raft state (without
    /// the snapshot) over every server, live or crashed.
    pub fn raft_state_bytes_max(&self) -> u64 {
        (0..self.n())
            .map(|server| match &self.servers[server] {
                Some(resources) => resources
                    .store
                    .raft_state_bytes(GROUP)
                    .expect("measuring the raft state"),
                None => self.crashed_state_bytes[server],
            })
            .max()
            .unwrap_or(0)
    }

    /// Whether `server` is up.
    pub fn is_live(&self, server: usize) -> bool {
        self.servers[server].is_some()
    }

    /// Shuts every server down and checks the applier found no error. Every
    /// scenario ends with it.
    pub async fn finish(mut self) {
        for server in 0..self.n() {
            self.crash(server).await;
        }
        self.check_errors();
        self.finished = true;
        // Like the reference's summary line (shown with --nocapture).
        let restarts: u64 = self.incarnations.iter().map(|i| i - 1).sum();
        eprintln!(
            "{}: passed, {:.1} s virtual, {} peers, {} rpcs, {} bytes, max index {}, {restarts} restarts",
            self.name,
            self.begin.elapsed().as_secs_f64(),
            self.n(),
            self.net().total_rpcs(),
            self.bytes_total(),
            self.max_index(),
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.finished {
            eprintln!(
                "lab scenario {} failed with seed {}; replay: RAFTKV_LAB_SEED={} cargo test --release --test raft_lab3 {} -- --exact",
                self.name, self.seed, self.seed, self.name
            );
        }
    }
}

/// The reference's applier (with snapshots: `applierSnap`) for one server
/// incarnation: checks every applied entry and snapshots every
/// `SNAPSHOT_INTERVAL` entries when asked to.
async fn applier(
    cluster: Cluster,
    server: usize,
    node: RaftNode,
    mut applied: mpsc::Receiver<Apply>,
    snapshots: bool,
) {
    while let Some(item) = applied.recv().await {
        match item {
            Apply::Entries(entries) => {
                for entry in entries {
                    let snapshot = {
                        let mut checker = lock(&cluster.inner.checker);
                        checker.apply(server, entry.index, entry.data);
                        if snapshots && (entry.index + 1) % SNAPSHOT_INTERVAL == 0 {
                            checker.snapshot_data(server, entry.index)
                        } else {
                            None
                        }
                    };
                    if let Some(data) = snapshot {
                        match node.snapshot(entry.index, data).await {
                            Ok(()) | Err(NodeError::Stopped) => {}
                            // A leader's snapshot may already cover it.
                            Err(NodeError::Snapshot(SnapshotError::Stale { .. })) => {}
                            Err(error) => lock(&cluster.inner.checker).fail(format!(
                                "server {server}: snapshot at {} refused: {error}",
                                entry.index
                            )),
                        }
                    }
                }
            }
            Apply::Snapshot { index, data, .. } => {
                lock(&cluster.inner.checker).ingest_snapshot(server, index, &data);
            }
        }
    }
}

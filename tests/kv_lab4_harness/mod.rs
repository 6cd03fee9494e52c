//! The Lab 4 harness (the reference's tester group plus the `rsm` and
//! `kvraft` test configs), shared by `tests/rsm_lab4.rs` and
//! `tests/kv_lab4.rs`.
//!
//! A [`Group`] runs `n` replicas — an `Rsm<M>` or a `RaftKvServer`, anything
//! implementing [`Replica`] — each on a sled [`Store`] in its own temp
//! directory, over one seeded [`SimNetwork`] with long delays on, under
//! tokio's paused clock. Crash and restart follow the Lab 3 harness: a crash
//! cuts every link of the server, crashes its network incarnation and shuts
//! the replica down (after which that instance writes nothing more), measures
//! its persisted Raft state and snapshot and closes the store; a restart
//! opens a fresh replica on the same directory. Links are recomputed from
//! one table (partition side per server, crashed or cut servers, the servers
//! each client may reach), so a restarted server rejoins its side of a
//! partition and a clerk made for one side never reaches the other.
//!
//! Seeds: each scenario's seed is a hash of its name, or `RAFTKV_LAB_SEED`;
//! it drives the network, the Raft nodes' timers, the partitioner and the
//! clients. A scenario that fails prints its seed and the command that
//! replays it.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use raftkv::NodeId;
use raftkv::check::{CheckConfig, CheckOutcome, Operation, Recorder, check_history};
use raftkv::kv::{Clerk, ClerkConfig, EndpointRpc, KvCommand, KvError, KvReply, RaftKvConfig};
use raftkv::kv::{RaftKvServer, Version, Versioned};
use raftkv::net::Endpoint;
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::raft::RaftNode;
use raftkv::rsm::{Rsm, RsmConfig, StateMachine};
use raftkv::storage::{RaftLogStorage, Store};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// The reference's election timeout: the unit of the scenarios' waits.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(1000);
/// Per-call timeout of the clerks' `EndpointRpc`: a call to a cut-off
/// server reports "no reply" after this long instead of the long-delay
/// network's 0–7 s, so the clerk moves on.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// The Raft group every replica uses.
const GROUP: u64 = 0;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Server index (0-based, as in the reference) to node id.
pub fn id(server: usize) -> NodeId {
    server as NodeId + 1
}

/// Awaits a spawned task, re-raising its panic in the test.
pub async fn join<T>(handle: JoinHandle<T>) -> T {
    match handle.await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// A temporary directory for a store: on the tmpfs `/dev/shm` when there is
/// one. Every Raft write batch is still flushed; on a tmpfs the fsync under
/// the flush costs almost nothing, which keeps thousands of durable puts per
/// scenario within the time budget. (On-disk durability is the storage
/// tests' business; here a crash is a shutdown and a reopen.)
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("creating a temp directory")
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

/// A running scenario: its name and seed. Dropped without
/// [`Scenario::finish`] (a failed assertion), it prints the replay command.
pub struct Scenario {
    test_file: &'static str,
    name: &'static str,
    seed: u64,
    begin: Instant,
    finished: bool,
}

impl Scenario {
    /// Scenario `name` (the test's function name) of the test binary `test_file`.
    pub fn new(test_file: &'static str, name: &'static str) -> Scenario {
        Scenario {
            test_file,
            name,
            seed: scenario_seed(name),
            begin: Instant::now(),
            finished: false,
        }
    }

    /// The scenario's seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Context for assertion messages: name and seed.
    pub fn at(&self) -> String {
        format!("{} (seed {})", self.name, self.seed)
    }

    /// Virtual time since the scenario began.
    pub fn elapsed(&self) -> Duration {
        self.begin.elapsed()
    }

    /// Marks the scenario passed and prints its summary line (shown with
    /// `--nocapture`).
    pub fn finish(mut self, summary: &str) {
        self.finished = true;
        eprintln!(
            "{}: passed, {:.1} s virtual, {summary}",
            self.name,
            self.begin.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if !self.finished {
            eprintln!(
                "lab scenario {} failed with seed {}; replay: RAFTKV_LAB_SEED={} cargo test --release --test {} {} -- --exact",
                self.name, self.seed, self.seed, self.test_file, self.name
            );
        }
    }
}

/// A replica the [`Group`] can start, inspect and stop.
pub trait Replica: Clone + 'static {
    /// What every replica of the group is started with.
    type Config: Clone;
    /// Starts replica `id` of `voters` on `store` and `endpoint`.
    fn start(
        id: NodeId,
        voters: &[NodeId],
        config: &Self::Config,
        rng_seed: u64,
        store: Store,
        endpoint: Endpoint,
    ) -> Self;
    /// The replica's Raft node.
    fn node(&self) -> &RaftNode;
    /// Stops the replica; once it returns, it writes nothing more.
    fn shutdown(&self) -> impl Future<Output = ()>;
}

impl<M: StateMachine + Default> Replica for Rsm<M> {
    type Config = RsmConfig;

    fn start(
        id: NodeId,
        voters: &[NodeId],
        config: &RsmConfig,
        rng_seed: u64,
        store: Store,
        endpoint: Endpoint,
    ) -> Self {
        let mut config = config.clone();
        config.node.rng_seed = rng_seed;
        config.node.async_persistence = async_persistence(rng_seed);
        config.node.followers_flush_inline = followers_flush_inline(rng_seed);
        Rsm::start(id, voters, config, store, endpoint, M::default()).expect("starting an rsm")
    }

    fn node(&self) -> &RaftNode {
        Rsm::node(self)
    }

    fn shutdown(&self) -> impl Future<Output = ()> {
        Rsm::shutdown(self)
    }
}

/// Whether a replica (one incarnation of one server) persists
/// asynchronously, as `raftkv server` does with its storage thread, but
/// deterministically: about half of them, drawn from its seed, so clusters
/// mix both ways.
fn async_persistence(rng_seed: u64) -> bool {
    (rng_seed >> 1) & 1 == 1
}

/// Whether such a replica flushes inline while it follows (the server's
/// default) or queues every flush: about half of them, from another bit.
fn followers_flush_inline(rng_seed: u64) -> bool {
    (rng_seed >> 2) & 1 == 1
}

impl Replica for RaftKvServer {
    type Config = RaftKvConfig;

    fn start(
        id: NodeId,
        voters: &[NodeId],
        config: &RaftKvConfig,
        rng_seed: u64,
        store: Store,
        endpoint: Endpoint,
    ) -> Self {
        let mut config = config.clone();
        config.rsm.node.rng_seed = rng_seed;
        config.rsm.node.async_persistence = async_persistence(rng_seed);
        config.rsm.node.followers_flush_inline = followers_flush_inline(rng_seed);
        RaftKvServer::start(id, voters, config, store, endpoint).expect("starting a kv server")
    }

    fn node(&self) -> &RaftNode {
        self.rsm().node()
    }

    fn shutdown(&self) -> impl Future<Output = ()> {
        RaftKvServer::shutdown(self)
    }
}

/// Who may talk to whom; every change recomputes every link.
struct Links {
    /// Partition side of each server; servers on different sides are cut.
    side: Vec<u8>,
    /// Servers cut from everything (crashed, or disconnected by the scenario).
    cut: Vec<bool>,
    /// Client node id → the servers it may reach.
    clients: BTreeMap<NodeId, Vec<bool>>,
}

/// The network and the link table, shared with the partitioner task.
pub struct Topology {
    net: SimNetwork,
    links: Mutex<Links>,
    rng: Mutex<ChaCha8Rng>,
}

impl Topology {
    fn n(&self) -> usize {
        lock(&self.links).side.len()
    }

    fn apply(&self, links: &Links) {
        let n = links.side.len();
        for a in 0..n {
            for b in 0..n {
                if a != b {
                    let enabled = !links.cut[a] && !links.cut[b] && links.side[a] == links.side[b];
                    self.net.set_link(id(a), id(b), enabled);
                }
            }
        }
        for (&client, allowed) in &links.clients {
            for (server, &reach) in allowed.iter().enumerate() {
                let enabled = reach && !links.cut[server];
                self.net.set_connected(client, id(server), enabled);
            }
        }
    }

    fn update(&self, change: impl FnOnce(&mut Links)) {
        let mut links = lock(&self.links);
        change(&mut links);
        self.apply(&links);
    }

    /// The reference's `Partition(p1, p2)`: servers in `p1` talk among
    /// themselves, `p2` likewise, none across. Clients are not affected.
    pub fn partition(&self, p1: &[usize], p2: &[usize]) {
        self.update(|links| {
            for &server in p1 {
                links.side[server] = 0;
            }
            for &server in p2 {
                links.side[server] = 1;
            }
        });
    }

    /// The reference's `ConnectAll`: no partition, every server connected.
    pub fn connect_all(&self) {
        self.update(|links| {
            links.side.iter_mut().for_each(|side| *side = 0);
            links.cut.iter_mut().for_each(|cut| *cut = false);
        });
    }

    /// Cuts every link of `server`.
    pub fn disconnect(&self, server: usize) {
        self.update(|links| links.cut[server] = true);
    }

    /// Restores the links of `server` (to its partition side).
    pub fn connect(&self, server: usize) {
        self.update(|links| links.cut[server] = false);
    }

    /// A random number below `bound` from the scenario's generator.
    pub fn rand_below(&self, bound: u64) -> u64 {
        lock(&self.rng).random_range(0..bound)
    }

    /// A generator for one client, drawn from the scenario's generator.
    pub fn client_rng(&self) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(lock(&self.rng).random())
    }

    /// The reference's partitioner: each server on one of two sides, 50/50,
    /// re-drawn every election timeout + 0–199 ms, until `stop` is cancelled
    /// (which ends the current pause at once).
    pub async fn partitioner(self: Arc<Self>, stop: CancellationToken) {
        let n = self.n();
        while !stop.is_cancelled() {
            let sides: Vec<u8> = (0..n).map(|_| self.rand_below(2) as u8).collect();
            self.update(|links| links.side = sides);
            let pause = ELECTION_TIMEOUT + Duration::from_millis(self.rand_below(200));
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = sleep(pause) => {}
            }
        }
    }
}

/// One live server: its replica and its store.
struct Live<R> {
    replica: R,
    store: Store,
}

/// A group of `n` replicas over one simulated network (see the module docs).
pub struct Group<R: Replica> {
    topology: Arc<Topology>,
    seed: u64,
    config: R::Config,
    dirs: Vec<tempfile::TempDir>,
    servers: Vec<Option<Live<R>>>,
    incarnations: Vec<u64>,
    /// (persisted Raft state, snapshot) bytes of each server when it last crashed.
    crashed_sizes: Vec<(u64, u64)>,
}

impl<R: Replica> Group<R> {
    /// Starts `n` replicas with `config`, all connected, on a reliable
    /// network with long delays on.
    pub async fn new(seed: u64, n: usize, config: R::Config) -> Group<R> {
        let net = SimNetwork::new(SimConfig::new(seed));
        net.set_long_delays(true);
        // Raft's messages are one-way; delivered each on its own they meet
        // the reordering labrpc gives RPCs (as in the Lab 3 harness).
        net.set_unordered_messages(true);
        let topology = Arc::new(Topology {
            net,
            links: Mutex::new(Links {
                side: vec![0; n],
                cut: vec![true; n],
                clients: BTreeMap::new(),
            }),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed)),
        });
        let mut group = Group {
            topology,
            seed,
            config,
            dirs: (0..n).map(|_| scratch_dir()).collect(),
            servers: (0..n).map(|_| None).collect(),
            incarnations: vec![0; n],
            crashed_sizes: vec![(0, 0); n],
        };
        for server in 0..n {
            group.start(server);
        }
        group.topology.connect_all();
        group
    }

    /// Number of servers.
    pub fn n(&self) -> usize {
        self.servers.len()
    }

    /// Node ids of every server, in server order.
    pub fn voters(&self) -> Vec<NodeId> {
        (0..self.n()).map(id).collect()
    }

    /// The simulated network.
    pub fn net(&self) -> &SimNetwork {
        &self.topology.net
    }

    /// The link table (partitions, cuts), shareable with a spawned task.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The replica of `server`, if it is up.
    pub fn replica(&self, server: usize) -> Option<R> {
        self.servers[server]
            .as_ref()
            .map(|live| live.replica.clone())
    }

    /// The replica of `server`; panics if it is down.
    pub fn up(&self, server: usize) -> R {
        self.replica(server)
            .unwrap_or_else(|| panic!("server {server} is down"))
    }

    /// The store of `server`, if it is up.
    pub fn store(&self, server: usize) -> Option<Store> {
        self.servers[server].as_ref().map(|live| live.store.clone())
    }

    /// Whether `server` is up.
    pub fn is_up(&self, server: usize) -> bool {
        self.servers[server].is_some()
    }

    /// The live server that leads the highest term, if any claims to lead.
    pub fn leader(&self) -> Option<usize> {
        (0..self.n())
            .filter_map(|server| {
                let (term, leading) = self.replica(server)?.node().state();
                leading.then_some((term, server))
            })
            .max()
            .map(|(_, server)| server)
    }

    /// Waits (virtual time) up to 10 election timeouts for a leader.
    pub async fn wait_leader(&self) -> usize {
        let deadline = Instant::now() + 10 * ELECTION_TIMEOUT;
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reference's `MakePartition(leader)`: a majority of n/2 + 1
    /// servers without `leader`, and the rest with it.
    pub fn make_partition(&self, leader: usize) -> (Vec<usize>, Vec<usize>) {
        let n = self.n();
        let majority: Vec<usize> = (1..n).map(|k| (leader + k) % n).take(n / 2 + 1).collect();
        let minority = (0..n).filter(|s| !majority.contains(s)).collect();
        (majority, minority)
    }

    /// See [`Topology::partition`].
    pub fn partition(&self, p1: &[usize], p2: &[usize]) {
        self.topology.partition(p1, p2);
    }

    /// See [`Topology::connect_all`]. Crashed servers stay cut off.
    pub fn connect_all(&self) {
        self.topology.connect_all();
        for server in 0..self.n() {
            if !self.is_up(server) {
                self.topology.disconnect(server);
            }
        }
    }

    /// See [`Topology::disconnect`].
    pub fn disconnect(&self, server: usize) {
        self.topology.disconnect(server);
    }

    /// See [`Topology::connect`].
    pub fn connect(&self, server: usize) {
        self.topology.connect(server);
    }

    /// A client endpoint that reaches only the servers in `reach` (all of
    /// them when `None`): the reference's `MakeClerkTo`.
    pub fn client_endpoint(&self, reach: Option<&[usize]>) -> Endpoint {
        let endpoint = self.topology.net.add_client();
        let n = self.n();
        let allowed = (0..n)
            .map(|server| reach.is_none_or(|servers| servers.contains(&server)))
            .collect();
        self.topology.update(|links| {
            links.clients.insert(endpoint.id(), allowed);
        });
        endpoint
    }

    /// Lets client `client` reach every server again.
    pub fn client_connect_all(&self, client: NodeId) {
        let n = self.n();
        self.topology.update(|links| {
            links.clients.insert(client, vec![true; n]);
        });
    }

    /// Starts `server` on its directory (it must be down); it rejoins its
    /// partition side at once unless cut.
    pub fn start(&mut self, server: usize) {
        assert!(!self.is_up(server), "server {server} is already up");
        self.incarnations[server] += 1;
        let store = Store::open(self.dirs[server].path()).expect("opening the server's store");
        let rng_seed = self.seed ^ (id(server) << 48) ^ self.incarnations[server];
        let endpoint = self.topology.net.restart(id(server));
        let replica = R::start(
            id(server),
            &self.voters(),
            &self.config,
            rng_seed,
            store.clone(),
            endpoint,
        );
        self.servers[server] = Some(Live { replica, store });
        self.topology.connect(server);
    }

    /// The reference's `ShutdownServer`: cuts `server` off, crashes its
    /// network incarnation, stops the replica, records its persisted sizes
    /// and closes its store. Nothing happens to a server that is down.
    pub async fn crash(&mut self, server: usize) {
        self.topology.disconnect(server);
        let Some(live) = self.servers[server].take() else {
            return;
        };
        self.topology.net.crash(id(server));
        live.replica.shutdown().await;
        self.crashed_sizes[server] = sizes(&live.store);
        drop(live);
    }

    /// Crashes every server.
    pub async fn crash_all(&mut self) {
        for server in 0..self.n() {
            self.crash(server).await;
        }
    }

    /// Starts every server that is down.
    pub fn start_all(&mut self) {
        for server in 0..self.n() {
            if !self.is_up(server) {
                self.start(server);
            }
        }
    }

    /// The reference's `LogSize`: the largest persisted Raft state (log and
    /// hard state, without the snapshot) over every server, up or crashed.
    pub fn raft_state_bytes_max(&self) -> u64 {
        self.sizes().map(|(raft, _)| raft).max().unwrap_or(0)
    }

    /// The reference's `SnapshotSize`: the largest snapshot over every server.
    pub fn snapshot_bytes_max(&self) -> u64 {
        self.sizes()
            .map(|(_, snapshot)| snapshot)
            .max()
            .unwrap_or(0)
    }

    fn sizes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.n()).map(|server| match &self.servers[server] {
            Some(live) => sizes(&live.store),
            None => self.crashed_sizes[server],
        })
    }

    /// Restarts made so far (over every server).
    pub fn restarts(&self) -> u64 {
        self.incarnations.iter().map(|i| i - 1).sum()
    }

    /// Stops every server. Every scenario ends with it.
    pub async fn shutdown(&mut self) {
        self.crash_all().await;
    }
}

/// (persisted Raft state, snapshot data) bytes of a store.
fn sizes(store: &Store) -> (u64, u64) {
    let raft = store
        .raft_state_bytes(GROUP)
        .expect("measuring the raft state");
    let (_, snapshot) = store.snapshot(GROUP).expect("reading the snapshot");
    (raft, snapshot.len() as u64)
}

// ----- the key/value side -----------------------------------------------------

/// A clerk whose every operation is recorded in the scenario's history.
pub struct TestClerk {
    clerk: Clerk<EndpointRpc>,
    recorder: Recorder,
    client: u64,
}

impl TestClerk {
    /// A clerk over `endpoint` talking to `servers`, recording as `client`.
    pub fn new(endpoint: Endpoint, servers: Vec<NodeId>, recorder: Recorder, client: u64) -> Self {
        let rpc = EndpointRpc::new(endpoint, CALL_TIMEOUT);
        let clerk = Clerk::new(rpc, servers, ClerkConfig::default()).expect("clerk config");
        TestClerk {
            clerk,
            recorder,
            client,
        }
    }

    /// The clerk's node id on the network.
    pub fn node_id(&self) -> NodeId {
        self.clerk.transport().endpoint().id()
    }

    /// A recorded Put.
    pub async fn put(&self, key: &str, value: &str, version: Version) -> Result<(), KvError> {
        let value = bytes::Bytes::copy_from_slice(value.as_bytes());
        let command = KvCommand::Put {
            key: key.to_owned(),
            value: value.clone(),
            version,
        };
        let pending = self.recorder.begin(self.client, command);
        let result = self.clerk.put(key, value, version).await;
        pending.finish(KvReply::Put(result.clone()));
        result
    }

    /// A recorded Get.
    pub async fn get(&self, key: &str) -> Result<Versioned, KvError> {
        let pending = self.recorder.begin(
            self.client,
            KvCommand::Get {
                key: key.to_owned(),
            },
        );
        let result = self.clerk.get(key).await;
        pending.finish(KvReply::Get(result.clone()));
        result
    }
}

/// A key/value lab: a [`Group`] of `RaftKvServer`s, one history recorder
/// for every clerk, and the scenario.
pub struct KvLab {
    pub scenario: Scenario,
    pub group: Group<RaftKvServer>,
    pub recorder: Recorder,
    next_client: u64,
}

impl std::ops::Deref for KvLab {
    type Target = Group<RaftKvServer>;
    fn deref(&self) -> &Self::Target {
        &self.group
    }
}

impl std::ops::DerefMut for KvLab {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.group
    }
}

impl KvLab {
    /// Starts `servers` key/value servers for scenario `name`, with
    /// snapshots at `maxraftstate_bytes` (None: never).
    pub async fn new(name: &'static str, servers: usize, maxraftstate_bytes: Option<u64>) -> Self {
        let scenario = Scenario::new("kv_lab4", name);
        let mut config = RaftKvConfig::default();
        config.rsm.maxraftstate_bytes = maxraftstate_bytes;
        let group = Group::new(scenario.seed(), servers, config).await;
        KvLab {
            scenario,
            group,
            recorder: Recorder::new(),
            next_client: 0,
        }
    }

    /// Context for assertion messages.
    pub fn at(&self) -> String {
        self.scenario.at()
    }

    /// A recorded clerk reaching the servers in `reach` (all when `None`).
    pub fn clerk(&mut self, reach: Option<&[usize]>) -> TestClerk {
        let endpoint = self.group.client_endpoint(reach);
        let client = self.next_client;
        self.next_client += 1;
        TestClerk::new(endpoint, self.group.voters(), self.recorder.clone(), client)
    }

    /// Checks the whole recorded history for linearizability.
    pub fn check_linearizable(&self) {
        let history: Vec<Operation> = self.recorder.history();
        let outcome =
            check_history(&history, &CheckConfig::default()).expect("well-formed history");
        assert_eq!(
            outcome,
            CheckOutcome::Ok,
            "{}: history of {} operations is not linearizable: {outcome}",
            self.at(),
            history.len()
        );
    }

    /// Stops every server and marks the scenario passed.
    pub async fn finish(mut self, summary: &str) {
        self.group.shutdown().await;
        let latencies: Vec<u64> = self
            .recorder
            .history()
            .iter()
            .filter_map(|op| Some(op.completion.as_ref()?.return_ns - op.call_ns))
            .collect();
        let mean_ms = latencies.iter().sum::<u64>() as f64 / latencies.len().max(1) as f64 / 1e6;
        let max_ms = latencies.iter().max().copied().unwrap_or(0) as f64 / 1e6;
        let summary = format!(
            "{} servers, {} rpcs, {} operations (mean {mean_ms:.1} ms, max {max_ms:.0} ms virtual), {} restarts; {summary}",
            self.group.n(),
            self.group.net().total_rpcs(),
            self.recorder.len(),
            self.group.restarts()
        );
        self.scenario.finish(&summary);
    }
}

//! The Lab 2 scenarios against the real single-node `KvServer` on a sled
//! `Store` in a temporary directory, over the simulated network (seeded, on
//! tokio's paused clock), with `Clerk<EndpointRpc>` clients. Histories are
//! checked with the linearizability checker.
//!
//! The network's faults replay exactly from the seed; the server's disk I/O
//! runs in real time (it holds the virtual clock while it runs), so how
//! requests group into batches can differ between runs of one seed.
//! Replay one seed: `KV_TEST_SEED=N cargo test --release --test kv_server_sim NAME`.
//!
//! The many-clients memory scenario is in `tests/kv_server_memory.rs` (it
//! needs its own counting allocator).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use raftkv::NodeId;
use raftkv::check::{CheckConfig, CheckOutcome, Operation, Recorder, check_history};
use raftkv::kv::{
    Clerk, ClerkConfig, EndpointRpc, KEY_BYTES_MAX, KvCommand, KvError, KvReply, KvServer,
    KvServerConfig, Lock, LockConfig, LockError, LockRecord, Versioned,
};
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::storage::Store;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;
use tokio::time::Instant;

/// The server's node id.
const SERVER: NodeId = 1;
/// Per-call timeout of the clients' `EndpointRpc`.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("KV_TEST_SEED") {
        Ok(seed) => vec![seed.parse().expect("KV_TEST_SEED must be a u64")],
        Err(_) => defaults.to_vec(),
    }
}

/// How to replay a failing seed of `test`.
fn replay(seed: u64, test: &str) -> String {
    format!(
        "seed {seed} (replay: KV_TEST_SEED={seed} cargo test --release --test kv_server_sim {test})"
    )
}

fn bytes(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn versioned(value: &str, version: u64) -> Versioned {
    Versioned {
        value: bytes(value),
        version,
    }
}

/// One simulated network with the server (node 1) on a store in a tempdir.
struct Harness {
    network: SimNetwork,
    dir: TempDir,
    server: Option<KvServer>,
}

impl Harness {
    fn new(seed: u64) -> Self {
        let mut harness = Harness {
            network: SimNetwork::new(SimConfig::new(seed)),
            dir: tempfile::tempdir().expect("tempdir"),
            server: None,
        };
        harness.start();
        harness
    }

    /// Starts (or restarts) the server node on a freshly opened store.
    fn start(&mut self) {
        assert!(self.server.is_none(), "server already running");
        let store = Store::open(self.dir.path()).expect("open store");
        let endpoint = self.network.restart(SERVER);
        self.server =
            Some(KvServer::start(&endpoint, store, KvServerConfig::default()).expect("start"));
    }

    /// Crashes the server node: it vanishes from the network at once, then
    /// its committer finishes the batch in hand and releases the store.
    async fn crash(&mut self) {
        self.network.crash(SERVER);
        self.server.take().expect("server running").shutdown().await;
    }

    fn server(&self) -> &KvServer {
        self.server.as_ref().expect("server running")
    }

    fn clerk(&self) -> Clerk<EndpointRpc> {
        let rpc = EndpointRpc::new(self.network.add_client(), CALL_TIMEOUT);
        Clerk::new(rpc, vec![SERVER], ClerkConfig::default()).expect("clerk")
    }
}

fn assert_linearizable(history: &[Operation], context: &str) {
    let outcome = check_history(history, &CheckConfig::default()).expect("well-formed history");
    assert_eq!(outcome, CheckOutcome::Ok, "{context}: {outcome}");
}

// Through the real server on a reliable network, every Lab 2 rule holds, values and versions read
// back, and each operation costs exactly one RPC.
#[tokio::test(start_paused = true)]
async fn reliable_put_rules_read_back() {
    for seed in seeds(&[1]) {
        let harness = Harness::new(seed);
        let clerk = harness.clerk();
        let at = replay(seed, "reliable_put_rules_read_back");
        assert_eq!(clerk.get("k").await, Err(KvError::NoKey), "{at}");
        assert_eq!(
            clerk.put("k", bytes("a"), 1).await,
            Err(KvError::NoKey),
            "{at}"
        );
        assert_eq!(clerk.get("k").await, Err(KvError::NoKey), "{at}");
        assert_eq!(clerk.put("k", bytes("a"), 0).await, Ok(()), "{at}");
        assert_eq!(clerk.get("k").await, Ok(versioned("a", 1)), "{at}");
        assert_eq!(
            clerk.put("k", bytes("b"), 0).await,
            Err(KvError::Version),
            "{at}"
        );
        assert_eq!(
            clerk.put("k", bytes("b"), 2).await,
            Err(KvError::Version),
            "{at}"
        );
        assert_eq!(clerk.put("k", bytes("b"), 1).await, Ok(()), "{at}");
        assert_eq!(clerk.get("k").await, Ok(versioned("b", 2)), "{at}");
        assert_eq!(clerk.put("k", Bytes::new(), 2).await, Ok(()), "{at}");
        assert_eq!(clerk.get("k").await, Ok(versioned("", 3)), "{at}");
        assert_eq!(clerk.put("other", bytes("x"), 0).await, Ok(()), "{at}");
        assert_eq!(clerk.get("other").await, Ok(versioned("x", 1)), "{at}");
        assert_eq!(clerk.get("k").await, Ok(versioned("", 3)), "{at}");
        // Oversized keys are refused by the clerk before anything is sent.
        let long_key = "k".repeat(KEY_BYTES_MAX + 1);
        assert!(matches!(
            clerk.get(&long_key).await,
            Err(KvError::TooLarge { .. })
        ));
        assert_eq!(harness.network.rpc_count(SERVER), 14, "{at}");
        let stats = harness.server().stats();
        assert_eq!((stats.puts, stats.gets, stats.installs), (7, 7, 4), "{at}");
        assert_eq!(
            stats.commits, 4,
            "{at}: one flush per install, none for reads"
        );
    }
}

/// Runs `clients` clerks on key "k" until `run_for` of virtual time has
/// passed: each reads the key, then puts a new value at the version read,
/// pausing 1–3 ms (seeded) between operations. Returns the number of OK
/// puts and the history.
async fn get_put_clients(
    harness: &Harness,
    seed: u64,
    clients: u64,
    run_for: Duration,
) -> (u64, Vec<Operation>) {
    let recorder = Recorder::new();
    let ok_puts = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + run_for;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let clerk = harness.clerk();
        let recorder = recorder.clone();
        let ok_puts = ok_puts.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (client << 32));
        tasks.spawn(async move {
            let mut step = 0u64;
            while Instant::now() < deadline {
                step += 1;
                let pending = recorder.begin(client, KvCommand::Get { key: "k".into() });
                let read = clerk.get("k").await;
                pending.finish(KvReply::Get(read.clone()));
                let version = read.map_or(0, |found| found.version);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..=3))).await;
                let value = bytes(&format!("{client}.{step}"));
                let command = KvCommand::Put {
                    key: "k".into(),
                    value: value.clone(),
                    version,
                };
                let pending = recorder.begin(client, command);
                let result = clerk.put("k", value, version).await;
                if result.is_ok() {
                    ok_puts.fetch_add(1, Ordering::Relaxed);
                }
                pending.finish(KvReply::Put(result));
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..=3))).await;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("client task");
    }
    (ok_puts.load(Ordering::Relaxed), recorder.history())
}

// 10 clients for 1 s (virtual) on one key, reliable: final version = number of OK puts (no lost
// update), no ErrMaybe, and the history is linearizable.
#[tokio::test(start_paused = true)]
async fn concurrent_reliable_clients() {
    for seed in seeds(&[11, 12]) {
        let at = replay(seed, "concurrent_reliable_clients");
        let harness = Harness::new(seed);
        let (ok_puts, history) = get_put_clients(&harness, seed, 10, Duration::from_secs(1)).await;
        assert!(ok_puts > 100, "{at}: only {ok_puts} OK puts");
        let final_version = harness.clerk().get("k").await.expect("k exists").version;
        assert_eq!(final_version, ok_puts, "{at}");
        assert!(
            history.iter().all(|op| !matches!(
                &op.completion,
                Some(c) if c.output == KvReply::Put(Err(KvError::Maybe))
            )),
            "{at}: ErrMaybe on a reliable network"
        );
        assert_linearizable(&history, &at);
    }
}

// 64 clients putting to their own keys at once share flushes (group commit): far fewer commits
// than installs, and every value is durable at its final version.
#[tokio::test(start_paused = true)]
async fn concurrent_puts_share_flushes() {
    const CLIENTS: u64 = 64;
    const PUTS: u64 = 20;
    for seed in seeds(&[13]) {
        let at = replay(seed, "concurrent_puts_share_flushes");
        let mut harness = Harness::new(seed);
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..CLIENTS {
            let clerk = harness.clerk();
            tasks.spawn(async move {
                for version in 0..PUTS {
                    let value = bytes(&format!("{client}.{version}"));
                    clerk
                        .put(&format!("key-{client}"), value, version)
                        .await
                        .expect("put on an uncontended key");
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("client task");
        }
        let stats = harness.server().stats();
        assert_eq!(stats.installs, CLIENTS * PUTS, "{at}");
        assert!(
            stats.commits * 8 <= stats.installs,
            "{at}: {} commits for {} installs",
            stats.commits,
            stats.installs
        );
        // Everything acknowledged is on disk: reopen and read back.
        harness.crash().await;
        harness.start();
        let clerk = harness.clerk();
        for client in 0..CLIENTS {
            let expected = versioned(&format!("{client}.{}", PUTS - 1), PUTS);
            assert_eq!(
                clerk.get(&format!("key-{client}")).await,
                Ok(expected),
                "{at}"
            );
        }
    }
}

// Lab scenario "unreliable", 100 rounds of retried puts on the unreliable network: a put that
// ends in ErrMaybe really was applied (its retry finds ErrVersion and the first value), a retried
// put that ends in ErrVersion was applied exactly once, ErrMaybe is seen, and the history is
// linearizable.
#[tokio::test(start_paused = true)]
async fn unreliable_retried_puts() {
    for seed in seeds(&[21, 22]) {
        let at = replay(seed, "unreliable_retried_puts");
        let harness = Harness::new(seed);
        harness.network.set_reliable(false);
        let clerk = harness.clerk();
        let recorder = Recorder::new();
        let mut maybes = 0;
        let mut retried_then_version = 0;
        for round in 0..100u64 {
            for attempt in 0u64.. {
                let value = bytes(&attempt.to_string());
                let command = KvCommand::Put {
                    key: "k".into(),
                    value: value.clone(),
                    version: round,
                };
                let pending = recorder.begin(0, command);
                let result = clerk.put("k", value, round).await;
                pending.finish(KvReply::Put(result.clone()));
                match result {
                    Err(KvError::Maybe) => {
                        maybes += 1;
                        continue;
                    }
                    Ok(()) => assert_eq!(attempt, 0, "{at} round {round}: a retry applied again"),
                    Err(KvError::Version) => {
                        assert!(attempt > 0, "{at} round {round}: first put got ErrVersion");
                        retried_then_version += 1;
                    }
                    other => panic!("{at} round {round}: unexpected {other:?}"),
                }
                break;
            }
            let pending = recorder.begin(0, KvCommand::Get { key: "k".into() });
            let read = clerk.get("k").await;
            pending.finish(KvReply::Get(read.clone()));
            // Applied exactly once per round, by the first attempt.
            assert_eq!(read, Ok(versioned("0", round + 1)), "{at} round {round}");
        }
        assert!(maybes >= 1, "{at}: no ErrMaybe in 100 rounds");
        assert!(
            retried_then_version >= 1,
            "{at}: no retried put ended in ErrVersion"
        );
        assert_linearizable(&recorder.history(), &at);
    }
}

/// The lab's lock client loop: acquire, check "l0" reads "", write own id,
/// sleep 10 ms, write "" back, release; until `stop`. Returns acquisitions.
async fn lock_client(
    me: usize,
    clerk: Clerk<EndpointRpc>,
    holder: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    at: String,
) -> u64 {
    const FREE: usize = usize::MAX;
    let clerk = Arc::new(clerk);
    // Fixed owner ids keep a seed's run free of unseeded randomness.
    let lock = Lock::with_owner(
        clerk.clone(),
        "l",
        format!("client-{me}"),
        LockConfig::default(),
    )
    .expect("owner id");
    let mut acquisitions = 0;
    while !stop.load(Ordering::Relaxed) {
        lock.acquire().await.expect("acquire");
        let previous = holder.swap(me, Ordering::SeqCst);
        assert_eq!(
            previous, FREE,
            "{at}: {me} acquired while {previous} holds the lock"
        );
        let current = clerk.get("l0").await.expect("l0 exists");
        assert!(
            current.value.is_empty(),
            "{at}: {me} found l0 = {:?}",
            current.value
        );
        let put = clerk
            .put("l0", bytes(&me.to_string()), current.version)
            .await;
        assert!(matches!(put, Ok(()) | Err(KvError::Maybe)), "{at}: {put:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let put = clerk.put("l0", Bytes::new(), current.version + 1).await;
        assert!(matches!(put, Ok(()) | Err(KvError::Maybe)), "{at}: {put:?}");
        assert_eq!(holder.swap(FREE, Ordering::SeqCst), me, "{at}");
        lock.release().await.expect("release");
        acquisitions += 1;
    }
    acquisitions
}

async fn run_lock_scenario(clients: usize, reliable: bool, seed: u64, at: &str) {
    let harness = Harness::new(seed);
    harness
        .clerk()
        .put("l0", Bytes::new(), 0)
        .await
        .expect("create l0");
    harness.network.set_reliable(reliable);
    let holder = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for me in 0..clients {
        let context = format!("{at}, {clients} clients, reliable {reliable}");
        tasks.spawn(lock_client(
            me,
            harness.clerk(),
            holder.clone(),
            stop.clone(),
            context,
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    // A client that panics while holding the lock leaves the others waiting
    // forever: surface its panic instead of hanging (virtual time is cheap).
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(60), tasks.join_next())
        .await
        .unwrap_or_else(|_| panic!("{at}: lock clients stuck for 60 s after stop"))
    {
        match joined {
            Ok(acquisitions) => total += acquisitions,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    // Each acquisition holds the lock for >= 10 ms: at most 200 fit in 2 s (plus the last round).
    assert!(
        total >= 10 && total <= 200 + clients as u64,
        "{at}: {total} acquisitions with {clients} clients, reliable {reliable}"
    );
}

// Lock with 1 client, reliable and unreliable, 2 s: never two holders, "l0" reads "" after acquire.
#[tokio::test(start_paused = true)]
async fn lock_one_client() {
    for seed in seeds(&[31]) {
        let at = replay(seed, "lock_one_client");
        run_lock_scenario(1, true, seed, &at).await;
        run_lock_scenario(1, false, seed, &at).await;
    }
}

// Lock with 10 clients, reliable and unreliable, 2 s: never two holders, "l0" reads "" after acquire.
#[tokio::test(start_paused = true)]
async fn lock_ten_clients() {
    for seed in seeds(&[41]) {
        let at = replay(seed, "lock_ten_clients");
        run_lock_scenario(10, true, seed, &at).await;
        run_lock_scenario(10, false, seed, &at).await;
    }
}

// A leased lock whose holder stops is taken over only after a full lease (as the waiter measures
// it), never while the holder's grant is valid; the new fencing token is larger; the old holder
// learns it lost the lock. Reliable and unreliable.
#[tokio::test(start_paused = true)]
async fn lease_lock_taken_over_after_holder_stops() {
    for (seed, reliable) in [(51, true), (52, false)] {
        let at = replay(seed, "lease_lock_taken_over_after_holder_stops");
        let harness = Harness::new(seed);
        harness.network.set_reliable(reliable);
        let config = LockConfig {
            lease: Some(Duration::from_millis(500)),
            ..LockConfig::default()
        };
        let a = Lock::with_owner(harness.clerk(), "lease", "a", config).expect("owner id");
        let b = Lock::with_owner(harness.clerk(), "lease", "b", config).expect("owner id");
        let a_grant = a.acquire().await.expect("a acquires");
        let a_valid_until = a_grant.valid_until.expect("a leased grant expires");
        // `a` stops here: no renew, no release.
        let waiting_since = Instant::now();
        let b_grant = b.acquire().await.expect("b takes over");
        let taken_at = Instant::now();
        assert!(
            taken_at - waiting_since >= Duration::from_millis(500),
            "{at}: taken over after {:?}",
            taken_at - waiting_since
        );
        assert!(
            a_valid_until <= taken_at,
            "{at}: a's grant outlived the takeover"
        );
        assert!(b_grant.token > a_grant.token, "{at}");
        assert!(
            matches!(a.renew(&a_grant).await, Err(LockError::Lost { .. })),
            "{at}: the stopped holder still thinks it holds the lock"
        );
        // The old holder's release does not free the new holder's lock.
        a.release().await.expect("release");
        let stored = b.client().get("lease").await.expect("lock key");
        let record = LockRecord::decode(&stored.value).expect("a lock record");
        assert_eq!(record.owner, "b", "{at}: lock key lost b's record");
    }
}

// Values and versions survive a restart on disk: put, stop the server, reopen the store, read back;
// the versions continue where they were (stale versions still get ErrVersion).
#[tokio::test(start_paused = true)]
async fn restart_serves_the_same_data() {
    for seed in seeds(&[61]) {
        let at = replay(seed, "restart_serves_the_same_data");
        let mut harness = Harness::new(seed);
        let clerk = harness.clerk();
        for (key, puts) in [("a", 1u64), ("b", 3), ("c", 7)] {
            for version in 0..puts {
                let value = bytes(&format!("{key}{version}"));
                clerk.put(key, value, version).await.expect("put");
            }
        }
        harness.crash().await;
        // While the server is down, a clerk with a deadline gets no answer.
        let impatient = Clerk::new(
            EndpointRpc::new(harness.network.add_client(), CALL_TIMEOUT),
            vec![SERVER],
            ClerkConfig {
                deadline: Some(Duration::from_secs(1)),
                ..ClerkConfig::default()
            },
        )
        .expect("clerk");
        assert!(
            matches!(impatient.get("a").await, Err(KvError::Timeout { .. })),
            "{at}"
        );
        harness.start();
        let clerk = harness.clerk();
        assert_eq!(clerk.get("a").await, Ok(versioned("a0", 1)), "{at}");
        assert_eq!(clerk.get("b").await, Ok(versioned("b2", 3)), "{at}");
        assert_eq!(clerk.get("c").await, Ok(versioned("c6", 7)), "{at}");
        assert_eq!(clerk.get("d").await, Err(KvError::NoKey), "{at}");
        assert_eq!(
            clerk.put("c", bytes("x"), 6).await,
            Err(KvError::Version),
            "{at}"
        );
        assert_eq!(clerk.put("c", bytes("c7"), 7).await, Ok(()), "{at}");
        assert_eq!(clerk.get("c").await, Ok(versioned("c7", 8)), "{at}");
    }
}

// Clients keep working while the server crashes and restarts on its data directory: operations
// in flight or sent during the outage are retried until the server is back, nothing acknowledged
// is lost, and the whole history stays linearizable.
#[tokio::test(start_paused = true)]
async fn server_crash_while_clients_retry() {
    for seed in seeds(&[71, 72]) {
        let at = replay(seed, "server_crash_while_clients_retry");
        let mut harness = Harness::new(seed);
        let clerks: Vec<_> = (0..5).map(|_| harness.clerk()).collect();
        let recorder = Recorder::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut tasks = tokio::task::JoinSet::new();
        for (client, clerk) in clerks.into_iter().enumerate() {
            let recorder = recorder.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((client as u64) << 32));
            tasks.spawn(async move {
                let client = client as u64;
                let mut step = 0;
                while Instant::now() < deadline {
                    step += 1;
                    let key = format!("k{}", rng.random_range(0..3));
                    let pending = recorder.begin(client, KvCommand::Get { key: key.clone() });
                    let read = clerk.get(&key).await;
                    pending.finish(KvReply::Get(read.clone()));
                    let version = read.map_or(0, |found| found.version);
                    let value = bytes(&format!("{client}.{step}"));
                    let command = KvCommand::Put {
                        key: key.clone(),
                        value: value.clone(),
                        version,
                    };
                    let pending = recorder.begin(client, command);
                    let result = clerk.put(&key, value, version).await;
                    pending.finish(KvReply::Put(result));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1..=5))).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        harness.crash().await;
        let crashed_at = recorder.history().len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        harness.start();
        while let Some(joined) = tasks.join_next().await {
            joined.expect("client task");
        }
        let history = recorder.history();
        assert!(
            crashed_at > 50,
            "{at}: only {crashed_at} operations before the crash"
        );
        let outage = Duration::from_millis(400).as_nanos() as u64;
        assert!(
            history.iter().any(|op| op
                .completion
                .as_ref()
                .is_some_and(|c| c.return_ns - op.call_ns > outage)),
            "{at}: no operation waited out the outage"
        );
        assert_linearizable(&history, &at);
    }
}

//! The Clerk (ErrMaybe rule, retries, leader search, deadline) and the lock
//! (plain and leased) over an in-memory fake cluster whose network drops
//! requests and replies deterministically from a seed, on tokio's paused clock.
//! Histories of concurrent runs are checked with the linearizability checker.
//!
//! Seeded: each test runs a fixed list of seeds; a failure prints the seed.
//! Replay one seed: `KV_TEST_SEED=N cargo test --release --test kv_clerk_lock NAME`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use raftkv::NodeId;
use raftkv::check::{CheckConfig, CheckOutcome, Recorder, check_history};
use raftkv::kv::{
    Clerk, ClerkConfig, ClerkConfigError, FencingToken, KEY_BYTES_MAX, KvClient, KvCommand,
    KvError, KvReply, KvRpc, Lock, LockConfig, LockError, MemoryKv, NoReply, VALUE_BYTES_MAX,
    Versioned,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

/// What happened to one RPC in the fake network.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fate {
    /// The request never reached the server.
    RequestDropped,
    /// The server executed it and replied, but the reply was lost.
    ReplyDropped(KvReply),
    /// The reply reached the client.
    Delivered(KvReply),
}

#[derive(Clone, Debug)]
struct CallRecord {
    server: NodeId,
    request: KvCommand,
    fate: Fate,
}

/// Fault settings of the fake network.
#[derive(Clone, Copy, Debug)]
struct Faults {
    request_drop_percent: u32,
    reply_drop_percent: u32,
    /// Each call takes 0..=delay_ms_max ms before it is handled.
    delay_ms_max: u64,
}

const RELIABLE: Faults = Faults {
    request_drop_percent: 0,
    reply_drop_percent: 0,
    delay_ms_max: 0,
};

/// The lab's unreliable network: 0–26 ms delay, 10 % of requests and 10 % of replies lost.
const UNRELIABLE: Faults = Faults {
    request_drop_percent: 10,
    reply_drop_percent: 10,
    delay_ms_max: 26,
};

/// Most RPCs one test may send through a fake cluster.
const LOG_ENTRIES_MAX: usize = 2_000_000;

/// Servers sharing one MemoryKv; only the leader (if set) executes requests.
struct FakeCluster {
    inner: Mutex<ClusterState>,
}

struct ClusterState {
    kv: MemoryKv,
    rng: ChaCha8Rng,
    faults: Faults,
    /// `Some(id)`: other servers answer ErrWrongLeader with this hint.
    leader: Option<NodeId>,
    /// Servers that answer ErrWrongLeader without a hint.
    leaderless: bool,
    /// `Some(id)`: server `id` executes its next request, then answers that it
    /// lost leadership (the request may take effect), once.
    loses_leadership: Option<NodeId>,
    /// Percentage of Gets answered from the state before the last Put (a deliberate bug).
    stale_read_percent: u32,
    previous: MemoryKv,
    log: Vec<CallRecord>,
}

impl FakeCluster {
    fn new(seed: u64, faults: Faults) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(ClusterState {
                kv: MemoryKv::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
                faults,
                leader: None,
                leaderless: false,
                loses_leadership: None,
                stale_read_percent: 0,
                previous: MemoryKv::new(),
                log: Vec::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.inner.lock().unwrap()
    }

    fn log(&self) -> Vec<CallRecord> {
        self.state().log.clone()
    }

    fn log_len(&self) -> usize {
        self.state().log.len()
    }

    fn value(&self, key: &str) -> Option<Versioned> {
        self.state().kv.get(key).cloned()
    }
}

impl KvRpc for FakeCluster {
    async fn call(&self, server: NodeId, request: &KvCommand) -> Result<KvReply, NoReply> {
        let (delay_ms, drop_request, drop_reply) = {
            let mut state = self.state();
            let faults = state.faults;
            let delay_ms = state.rng.random_range(0..=faults.delay_ms_max);
            let drop_request = state.rng.random_range(0..100) < faults.request_drop_percent;
            let drop_reply = state.rng.random_range(0..100) < faults.reply_drop_percent;
            (delay_ms, drop_request, drop_reply)
        };
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let mut state = self.state();
        // Bounds memory if a broken test keeps a client retrying forever.
        assert!(
            state.log.len() < LOG_ENTRIES_MAX,
            "fake network log overflow"
        );
        let record = |state: &mut ClusterState, fate: Fate| {
            state.log.push(CallRecord {
                server,
                request: request.clone(),
                fate,
            })
        };
        if drop_request {
            record(&mut state, Fate::RequestDropped);
            return Err(NoReply);
        }
        let reply = if state.loses_leadership == Some(server) {
            state.loses_leadership = None;
            state.kv.apply(request);
            KvReply::Put(Err(KvError::LeadershipLost {
                leader_hint: state.leader,
            }))
        } else if state.leaderless {
            KvReply::Put(Err(KvError::WrongLeader { leader_hint: None }))
        } else if state.leader.is_some_and(|leader| leader != server) {
            KvReply::Put(Err(KvError::WrongLeader {
                leader_hint: state.leader,
            }))
        } else {
            let stale = matches!(request, KvCommand::Get { .. })
                && state.rng.random_range(0..100) < state.stale_read_percent;
            if stale {
                state.previous.apply(request)
            } else {
                if matches!(request, KvCommand::Put { .. }) && state.stale_read_percent > 0 {
                    state.previous = state.kv.clone();
                }
                state.kv.apply(request)
            }
        };
        let reply = match (request, reply) {
            (
                KvCommand::Get { .. },
                KvReply::Put(Err(
                    wrong @ (KvError::WrongLeader { .. } | KvError::LeadershipLost { .. }),
                )),
            ) => KvReply::Get(Err(wrong)),
            (_, reply) => reply,
        };
        if drop_reply {
            record(&mut state, Fate::ReplyDropped(reply));
            return Err(NoReply);
        }
        record(&mut state, Fate::Delivered(reply.clone()));
        Ok(reply)
    }
}

fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("KV_TEST_SEED") {
        Ok(seed) => vec![seed.parse().expect("KV_TEST_SEED must be a u64")],
        Err(_) => defaults.to_vec(),
    }
}

fn clerk(cluster: &Arc<FakeCluster>, servers: Vec<NodeId>) -> Clerk<Arc<FakeCluster>> {
    Clerk::new(cluster.clone(), servers, ClerkConfig::default()).expect("valid clerk config")
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

// Through a Clerk on a reliable network, every Lab 2 rule holds and values and versions read back.
#[tokio::test(start_paused = true)]
async fn reliable_put_rules_read_back() {
    let cluster = FakeCluster::new(1, RELIABLE);
    let clerk = clerk(&cluster, vec![0]);
    assert_eq!(clerk.get("k").await, Err(KvError::NoKey));
    assert_eq!(clerk.put("k", bytes("a"), 1).await, Err(KvError::NoKey));
    assert_eq!(clerk.put("k", bytes("a"), 0).await, Ok(()));
    assert_eq!(clerk.get("k").await, Ok(versioned("a", 1)));
    assert_eq!(clerk.put("k", bytes("b"), 0).await, Err(KvError::Version));
    assert_eq!(clerk.put("k", bytes("b"), 2).await, Err(KvError::Version));
    assert_eq!(clerk.put("k", bytes("b"), 1).await, Ok(()));
    assert_eq!(clerk.get("k").await, Ok(versioned("b", 2)));
    assert_eq!(
        cluster.log_len(),
        8,
        "a reliable network needs one RPC per operation"
    );
}

// Oversized keys and values fail with TooLarge before anything is sent; bad configs are rejected.
#[tokio::test(start_paused = true)]
async fn clerk_rejects_bad_input_without_sending() {
    let cluster = FakeCluster::new(1, RELIABLE);
    let clerk = clerk(&cluster, vec![0]);
    let long_key = "k".repeat(KEY_BYTES_MAX + 1);
    assert!(matches!(
        clerk.get(&long_key).await,
        Err(KvError::TooLarge { .. })
    ));
    let big = Bytes::from(vec![0u8; VALUE_BYTES_MAX + 1]);
    assert!(matches!(
        clerk.put("k", big, 0).await,
        Err(KvError::TooLarge { .. })
    ));
    assert_eq!(cluster.log_len(), 0);
    let no_servers = Clerk::new(cluster.clone(), vec![], ClerkConfig::default());
    assert_eq!(no_servers.err(), Some(ClerkConfigError::NoServers));
    let zero = ClerkConfig {
        retry_backoff_min: Duration::ZERO,
        ..ClerkConfig::default()
    };
    assert_eq!(
        Clerk::new(cluster.clone(), vec![0], zero).err(),
        Some(ClerkConfigError::ZeroBackoff)
    );
}

/// What the lab rule says a Put returns, given the fates of its RPCs: ErrVersion
/// becomes ErrMaybe when an earlier RPC may have been executed as far as the
/// clerk can tell (no reply came back; an ErrWrongLeader reply says it was not).
fn expected_put_result(calls: &[CallRecord]) -> Result<(), KvError> {
    assert!(
        calls.iter().all(|call| call.request == calls[0].request),
        "the clerk re-sends the same request"
    );
    let Some(Fate::Delivered(KvReply::Put(result))) = calls.last().map(|c| &c.fate) else {
        panic!("the clerk returned without a delivered reply: {calls:?}");
    };
    let maybe_executed_before = calls[..calls.len() - 1].iter().any(|call| {
        !matches!(
            call.fate,
            Fate::Delivered(KvReply::Put(Err(KvError::WrongLeader { .. })))
        )
    });
    match result {
        Err(KvError::Version) if maybe_executed_before => Err(KvError::Maybe),
        other => other.clone(),
    }
}

/// How many of these RPCs were executed and installed the value.
fn applied(calls: &[CallRecord]) -> usize {
    calls
        .iter()
        .filter(|call| {
            matches!(
                call.fate,
                Fate::Delivered(KvReply::Put(Ok(()))) | Fate::ReplyDropped(KvReply::Put(Ok(())))
            )
        })
        .count()
}

// On the unreliable network (lab scenario, 100 rounds): a Put returns ErrMaybe exactly when the
// rule says, a retried put that ends in ErrVersion really was applied once, and ErrMaybe is seen.
#[tokio::test(start_paused = true)]
async fn err_maybe_exactly_when_the_rule_says() {
    for seed in seeds(&[1, 2, 3, 4, 5]) {
        let cluster = FakeCluster::new(seed, UNRELIABLE);
        let clerk = clerk(&cluster, vec![0]);
        let recorder = Recorder::new();
        let mut maybes = 0;
        let mut retried_version = 0;
        for round in 0..100u64 {
            let mut applied_this_round = 0;
            for attempt in 0.. {
                let before = cluster.log_len();
                let command = KvCommand::Put {
                    key: "k".into(),
                    value: bytes("0"),
                    version: round,
                };
                let pending = recorder.begin(1, command);
                let result = clerk.put("k", bytes("0"), round).await;
                pending.finish(KvReply::Put(result.clone()));
                let calls = &cluster.log()[before..];
                assert_eq!(
                    result,
                    expected_put_result(calls),
                    "seed {seed} round {round}"
                );
                applied_this_round += applied(calls);
                if result == Err(KvError::Maybe) {
                    maybes += 1;
                    continue;
                }
                if attempt > 0 {
                    // A put retried after ErrMaybe can only find its own earlier success.
                    assert_eq!(result, Err(KvError::Version), "seed {seed} round {round}");
                    retried_version += 1;
                } else {
                    assert_eq!(result, Ok(()), "seed {seed} round {round}");
                }
                break;
            }
            assert_eq!(
                applied_this_round, 1,
                "seed {seed} round {round}: applied once"
            );
            let pending = recorder.begin(1, KvCommand::Get { key: "k".into() });
            let read = clerk.get("k").await;
            pending.finish(KvReply::Get(read.clone()));
            assert_eq!(
                read,
                Ok(versioned("0", round + 1)),
                "seed {seed} round {round}"
            );
        }
        assert!(maybes >= 1, "seed {seed}: no ErrMaybe in 100 rounds");
        assert!(
            retried_version >= 1,
            "seed {seed}: no retried put ended in ErrVersion"
        );
        let outcome = check_history(&recorder.history(), &CheckConfig::default()).unwrap();
        assert_eq!(outcome, CheckOutcome::Ok, "seed {seed}");
    }
}

// A stale Put whose first RPC gets ErrVersion returns ErrVersion, on any network.
#[tokio::test(start_paused = true)]
async fn stale_put_is_err_version_only_on_the_first_rpc() {
    for seed in seeds(&[11, 12, 13]) {
        let cluster = FakeCluster::new(seed, UNRELIABLE);
        let clerk = clerk(&cluster, vec![0]);
        while clerk.put("k", bytes("a"), 0).await == Err(KvError::Maybe) {}
        let (mut versions, mut maybes) = (0, 0);
        for _ in 0..200 {
            let before = cluster.log_len();
            let result = clerk.put("k", bytes("b"), 0).await;
            let calls = &cluster.log()[before..];
            assert_eq!(result, expected_put_result(calls), "seed {seed}");
            assert_eq!(applied(calls), 0, "seed {seed}: a stale put applied");
            match result {
                Err(KvError::Version) => versions += 1,
                Err(KvError::Maybe) => maybes += 1,
                other => panic!("seed {seed}: stale put returned {other:?}"),
            }
        }
        assert!(
            versions > 0 && maybes > 0,
            "seed {seed}: {versions} ErrVersion, {maybes} ErrMaybe"
        );
    }
}

// The Clerk follows ErrWrongLeader hints, remembers the leader, and rotates when there is no hint.
#[tokio::test(start_paused = true)]
async fn clerk_finds_and_remembers_the_leader() {
    let cluster = FakeCluster::new(7, RELIABLE);
    cluster.state().leader = Some(12);
    let clerk = clerk(&cluster, vec![10, 11, 12]);
    assert_eq!(clerk.put("k", bytes("a"), 0).await, Ok(()));
    let servers: Vec<NodeId> = cluster.log().iter().map(|c| c.server).collect();
    assert_eq!(servers, vec![10, 12], "followed the hint");
    assert_eq!(clerk.leader(), 12);
    assert_eq!(clerk.get("k").await, Ok(versioned("a", 1)));
    assert_eq!(
        cluster.log_len(),
        3,
        "went straight to the remembered leader"
    );
    // The first RPC went to a non-leader that did nothing with it (ErrWrongLeader), so the
    // leader's ErrVersion is the put's true outcome.
    cluster.state().log.clear();
    cluster.state().leader = Some(10);
    assert_eq!(clerk.put("k", bytes("b"), 0).await, Err(KvError::Version));
    let servers: Vec<NodeId> = cluster.log().iter().map(|c| c.server).collect();
    assert_eq!(servers, vec![12, 10], "followed the hint");
    // A leader that appended the put and then lost leadership: the resend's ErrVersion may be
    // the put's own doing, so ErrMaybe — and here it was applied.
    cluster.state().log.clear();
    cluster.state().loses_leadership = Some(10);
    cluster.state().leader = Some(11);
    assert_eq!(clerk.put("k", bytes("c"), 1).await, Err(KvError::Maybe));
    assert_eq!(clerk.get("k").await, Ok(versioned("c", 2)));
    let servers: Vec<NodeId> = cluster.log().iter().map(|c| c.server).collect();
    assert_eq!(
        servers,
        vec![10, 11, 11],
        "followed the hint after the loss"
    );
    // Without hints the clerk tries each server in turn.
    cluster.state().log.clear();
    cluster.state().leader = None;
    cluster.state().leaderless = true;
    let config = ClerkConfig {
        deadline: Some(Duration::from_millis(100)),
        ..ClerkConfig::default()
    };
    let hintless = Clerk::new(cluster.clone(), vec![10, 11, 12], config).unwrap();
    assert!(matches!(
        hintless.get("k").await,
        Err(KvError::Timeout { .. })
    ));
    let servers: Vec<NodeId> = cluster.log().iter().map(|c| c.server).take(4).collect();
    assert_eq!(servers, vec![10, 11, 12, 10]);
}

// With a deadline, a Clerk on a dead network gives up with Timeout at the deadline, backing off
// between rounds (a spinning clerk would send unboundedly many RPCs in that virtual time).
#[tokio::test(start_paused = true)]
async fn deadline_bounds_retries_with_backoff() {
    let dead = Faults {
        request_drop_percent: 100,
        reply_drop_percent: 0,
        delay_ms_max: 0,
    };
    let cluster = FakeCluster::new(3, dead);
    let config = ClerkConfig {
        retry_backoff_min: Duration::from_millis(10),
        retry_backoff_max: Duration::from_secs(1),
        deadline: Some(Duration::from_secs(10)),
    };
    let clerk = Clerk::new(cluster.clone(), vec![0], config).unwrap();
    let start = Instant::now();
    let result = clerk.put("k", bytes("a"), 0).await;
    let elapsed = start.elapsed();
    let sent = cluster.log_len() as u64;
    assert_eq!(result, Err(KvError::Timeout { attempts: sent }));
    assert_eq!(elapsed, Duration::from_secs(10));
    // Backoff 10, 20, …, 640 ms (1.27 s in 7 rounds), then 1 s per round: 16 rounds in 10 s.
    assert_eq!(sent, 16);
    // Without a deadline the clerk keeps going until the network heals.
    let clerk = Clerk::new(cluster.clone(), vec![0], ClerkConfig::default()).unwrap();
    let healer = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            cluster.state().faults = RELIABLE;
        })
    };
    assert_eq!(clerk.put("k", bytes("a"), 0).await, Ok(()));
    assert!(start.elapsed() >= Duration::from_secs(70));
    healer.await.unwrap();
}

/// Runs `clients` clerks for one virtual second putting and reading one key;
/// returns the number of OK puts and the recorded history.
async fn concurrent_clients(
    cluster: &Arc<FakeCluster>,
    clients: u64,
) -> (u64, Vec<raftkv::check::Operation>) {
    let recorder = Recorder::new();
    let ok_puts = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let clerk = clerk(cluster, vec![0]);
        let recorder = recorder.clone();
        let ok_puts = ok_puts.clone();
        tasks.push(tokio::spawn(async move {
            let mut step = 0u64;
            while Instant::now() < deadline {
                step += 1;
                let pending = recorder.begin(client, KvCommand::Get { key: "k".into() });
                let read = clerk.get("k").await;
                pending.finish(KvReply::Get(read.clone()));
                let version = read.map_or(0, |found| found.version);
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
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    (ok_puts.load(Ordering::Relaxed), recorder.history())
}

// 10 clients for 1 s on one key, reliable: final version = number of OK puts; linearizable.
#[tokio::test(start_paused = true)]
async fn concurrent_reliable_clients_are_linearizable() {
    let faults = Faults {
        delay_ms_max: 5,
        ..RELIABLE
    };
    for seed in seeds(&[21, 22]) {
        let cluster = FakeCluster::new(seed, faults);
        let (ok_puts, history) = concurrent_clients(&cluster, 10).await;
        assert!(ok_puts > 10, "seed {seed}: only {ok_puts} OK puts");
        assert_eq!(cluster.value("k").unwrap().version, ok_puts, "seed {seed}");
        let outcome = check_history(&history, &CheckConfig::default()).unwrap();
        assert_eq!(outcome, CheckOutcome::Ok, "seed {seed}: {outcome}");
    }
}

// 10 clients for 1 s on one key over the unreliable network: the history is linearizable.
#[tokio::test(start_paused = true)]
async fn concurrent_unreliable_clients_are_linearizable() {
    for seed in seeds(&[31, 32]) {
        let cluster = FakeCluster::new(seed, UNRELIABLE);
        let (_, history) = concurrent_clients(&cluster, 10).await;
        let maybes = history
            .iter()
            .filter(|op| {
                matches!(&op.completion, Some(c) if c.output == KvReply::Put(Err(KvError::Maybe)))
            })
            .count();
        assert!(maybes > 0, "seed {seed}: no ErrMaybe");
        let outcome = check_history(&history, &CheckConfig::default()).unwrap();
        assert_eq!(outcome, CheckOutcome::Ok, "seed {seed}: {outcome}");
    }
}

// A server that sometimes serves stale reads is caught by the checker, with the offending read reported.
#[tokio::test(start_paused = true)]
async fn checker_catches_a_stale_read_server() {
    for seed in seeds(&[41, 42]) {
        let cluster = FakeCluster::new(
            seed,
            Faults {
                delay_ms_max: 5,
                ..RELIABLE
            },
        );
        cluster.state().stale_read_percent = 20;
        let (_, history) = concurrent_clients(&cluster, 4).await;
        let outcome = check_history(&history, &CheckConfig::default()).unwrap();
        let CheckOutcome::Illegal(report) = outcome else {
            panic!("seed {seed}: stale reads not detected: {outcome}");
        };
        assert_eq!(report.key, "k");
        assert!(
            report
                .blocked
                .iter()
                .any(|b| matches!(b.operation.operation.input, KvCommand::Get { .. })),
            "seed {seed}: {report}"
        );
    }
}

/// The lab's lock client loop: acquire, check "l0" reads "", write own id,
/// sleep 10 ms, write "" back, release; until `stop`. Returns acquisitions.
async fn lock_client(
    me: usize,
    cluster: Arc<FakeCluster>,
    holder: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> u64 {
    const FREE: usize = usize::MAX;
    let clerk = Arc::new(clerk(&cluster, vec![0]));
    let lock = Lock::with_owner(
        clerk.clone(),
        "l",
        format!("client-{me}"),
        LockConfig::default(),
    )
    .unwrap();
    let mut acquisitions = 0;
    while !stop.load(Ordering::Relaxed) {
        lock.acquire().await.unwrap();
        let previous = holder.swap(me, Ordering::SeqCst);
        assert_eq!(
            previous, FREE,
            "seed {seed}: {me} acquired while {previous} holds the lock"
        );
        let current = clerk.get("l0").await.unwrap();
        assert!(
            current.value.is_empty(),
            "seed {seed}: {me} found l0 = {:?}",
            current.value
        );
        let put = clerk
            .put("l0", bytes(&me.to_string()), current.version)
            .await;
        assert!(
            matches!(put, Ok(()) | Err(KvError::Maybe)),
            "seed {seed}: {put:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let put = clerk.put("l0", Bytes::new(), current.version + 1).await;
        assert!(
            matches!(put, Ok(()) | Err(KvError::Maybe)),
            "seed {seed}: {put:?}"
        );
        assert_eq!(holder.swap(FREE, Ordering::SeqCst), me, "seed {seed}");
        lock.release().await.unwrap();
        acquisitions += 1;
    }
    acquisitions
}

async fn run_lock_scenario(clients: usize, faults: Faults, seed: u64) {
    let cluster = FakeCluster::new(seed, faults);
    clerk(&cluster, vec![0])
        .put("l0", Bytes::new(), 0)
        .await
        .unwrap();
    let holder = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for me in 0..clients {
        tasks.spawn(lock_client(
            me,
            cluster.clone(),
            holder.clone(),
            stop.clone(),
            seed,
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    // A client that panics while holding the lock leaves the others waiting
    // forever: surface its panic instead of hanging (virtual time is cheap).
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(60), tasks.join_next())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: lock clients stuck for 60 s after stop"))
    {
        match joined {
            Ok(acquisitions) => total += acquisitions,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    // Each acquisition holds the lock for ≥ 10 ms: at most 200 fit in 2 s (plus the last round).
    assert!(
        total >= 10 && total <= 200 + clients as u64,
        "seed {seed}: {total} acquisitions"
    );
}

// Lock with 1 client, reliable and unreliable: never two holders, "l0" reads "" after acquire.
#[tokio::test(start_paused = true)]
async fn lock_one_client() {
    for seed in seeds(&[51, 52]) {
        run_lock_scenario(1, RELIABLE, seed).await;
        run_lock_scenario(1, UNRELIABLE, seed).await;
    }
}

// Lock with 10 clients, reliable and unreliable: never two holders, "l0" reads "" after acquire.
#[tokio::test(start_paused = true)]
async fn lock_ten_clients() {
    for seed in seeds(&[61, 62]) {
        run_lock_scenario(
            10,
            Faults {
                delay_ms_max: 3,
                ..RELIABLE
            },
            seed,
        )
        .await;
        run_lock_scenario(10, UNRELIABLE, seed).await;
    }
}

fn lease_config(lease_ms: u64) -> LockConfig {
    LockConfig {
        lease: Some(Duration::from_millis(lease_ms)),
        ..LockConfig::default()
    }
}

/// A resource that only accepts writes carrying the largest token it has seen.
#[derive(Default)]
struct FencedResource {
    highest: Option<FencingToken>,
}

impl FencedResource {
    fn write(&mut self, token: FencingToken) -> bool {
        if self.highest.is_some_and(|highest| token < highest) {
            return false;
        }
        self.highest = Some(token);
        true
    }
}

// A holder that stops (never releases) loses a leased lock only after a full lease as measured by
// the waiter; its grant expires no later than that; the new token is larger and fences it off.
#[tokio::test(start_paused = true)]
async fn lease_is_taken_over_after_the_holder_stops() {
    for (seed, faults) in [(71, RELIABLE), (72, UNRELIABLE)] {
        let cluster = FakeCluster::new(seed, faults);
        let a =
            Lock::with_owner(clerk(&cluster, vec![0]), "lease", "a", lease_config(1_000)).unwrap();
        let b =
            Lock::with_owner(clerk(&cluster, vec![0]), "lease", "b", lease_config(1_000)).unwrap();
        let a_grant = a.acquire().await.unwrap();
        let a_valid_until = a_grant.valid_until.expect("a leased grant has an expiry");
        let mut resource = FencedResource::default();
        assert!(resource.write(a_grant.token));
        // `a` stops here: no renew, no release.
        let waiting_since = Instant::now();
        let b_grant = b.acquire().await.unwrap();
        let taken_at = Instant::now();
        assert!(
            taken_at - waiting_since >= Duration::from_secs(1),
            "seed {seed}: taken over after {:?}",
            taken_at - waiting_since
        );
        assert!(
            a_valid_until <= taken_at,
            "seed {seed}: a's grant outlived the takeover"
        );
        assert!(b_grant.token > a_grant.token, "seed {seed}");
        assert!(resource.write(b_grant.token));
        assert!(
            !resource.write(a_grant.token),
            "seed {seed}: stale holder not fenced"
        );
        // `a` finds out when it tries to renew.
        assert!(
            matches!(a.renew(&a_grant).await, Err(LockError::Lost { .. })),
            "seed {seed}"
        );
        // And its release does not free b's lock.
        a.release().await.unwrap();
        let record = b.client().get("lease").await.unwrap();
        assert!(
            String::from_utf8_lossy(&record.value).contains("\"b\""),
            "seed {seed}"
        );
    }
}

// A holder that keeps renewing keeps the lock; a waiter takes over only a full lease after the
// last renewal, and never while the holder's grant is valid.
#[tokio::test(start_paused = true)]
async fn renewing_holder_keeps_its_lease() {
    for (seed, faults) in [(81, RELIABLE), (82, UNRELIABLE)] {
        let cluster = FakeCluster::new(seed, faults);
        let a =
            Lock::with_owner(clerk(&cluster, vec![0]), "lease", "a", lease_config(1_000)).unwrap();
        let b =
            Lock::with_owner(clerk(&cluster, vec![0]), "lease", "b", lease_config(1_000)).unwrap();
        let first = a.acquire().await.unwrap();
        let waiter = tokio::spawn(async move {
            let grant = b.acquire().await.unwrap();
            (grant, Instant::now())
        });
        let mut grant = first;
        let mut last_renewal_sent = Instant::now();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                !waiter.is_finished(),
                "seed {seed}: taken over while renewing"
            );
            last_renewal_sent = Instant::now();
            grant = a.renew(&grant).await.unwrap();
            assert_eq!(
                grant.token, first.token,
                "seed {seed}: renew keeps the token"
            );
        }
        let (b_grant, taken_at) = waiter.await.unwrap();
        assert!(
            taken_at - last_renewal_sent >= Duration::from_secs(1),
            "seed {seed}"
        );
        assert!(grant.valid_until.unwrap() <= taken_at, "seed {seed}");
        assert!(b_grant.token > first.token, "seed {seed}");
    }
}

// An instance with the same owner id can release (or re-acquire) what another acquired; other
// owners cannot, and a lock key with a foreign value is reported as corrupt.
#[tokio::test(start_paused = true)]
async fn release_by_owner_id_and_corrupt_values() {
    let cluster = FakeCluster::new(91, RELIABLE);
    let first = Lock::with_owner(
        clerk(&cluster, vec![0]),
        "l",
        "script",
        LockConfig::default(),
    )
    .unwrap();
    let grant = first.acquire().await.unwrap();
    assert_eq!(grant.valid_until, None);
    let other = Lock::with_owner(
        clerk(&cluster, vec![0]),
        "l",
        "other",
        LockConfig::default(),
    )
    .unwrap();
    other.release().await.unwrap();
    assert!(
        !cluster.value("l").unwrap().value.is_empty(),
        "released by a non-owner"
    );
    let again = Lock::with_owner(
        clerk(&cluster, vec![0]),
        "l",
        "script",
        LockConfig::default(),
    )
    .unwrap();
    assert_eq!(
        again.acquire().await.unwrap().token,
        grant.token,
        "re-acquire by the same owner"
    );
    again.release().await.unwrap();
    assert!(cluster.value("l").unwrap().value.is_empty());
    let next = other.acquire().await.unwrap();
    assert!(next.token > grant.token);
    assert!(matches!(
        Lock::with_owner(clerk(&cluster, vec![0]), "l", "", LockConfig::default()),
        Err(LockError::BadOwner { len: 0 })
    ));
    // Re-acquiring a leased lock one already holds rewrites the record, so the lease start is known.
    let leased = Lock::with_owner(
        clerk(&cluster, vec![0]),
        "leased",
        "script",
        lease_config(500),
    )
    .unwrap();
    let first = leased.acquire().await.unwrap();
    let again = leased.acquire().await.unwrap();
    assert!(again.token > first.token);
    assert!(again.valid_until.unwrap() >= first.valid_until.unwrap());
    let clerk = clerk(&cluster, vec![0]);
    clerk.put("junk", bytes("not json"), 0).await.unwrap();
    let lock = Lock::new(&clerk, "junk", LockConfig::default());
    assert!(matches!(
        lock.acquire().await,
        Err(LockError::Corrupt { .. })
    ));
    assert!(matches!(
        lock.renew(&next).await,
        Err(LockError::NoLease { .. })
    ));
}

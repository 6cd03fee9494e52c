//! Every Lab 4B/4C scenario of the key/value service on Raft (the
//! reference's `kvraft` tests), through `RaftKvServer`s on sled stores over
//! the simulated network with long delays, with recorded `Clerk`s, on
//! tokio's paused clock. Every history is checked for linearizability; the
//! numeric bounds are the reference's.
//!
//! The 4B scenarios run with snapshots off (the snapshot must stay empty),
//! the 4C ones with maxraftstate 1000 bytes (the persisted Raft state must
//! stay within 8 × 1000 bytes after every iteration).
//!
//! The simulated network adds no delay to a reliable call, so an operation
//! takes no virtual time there; each client pauses 1–5 ms (seeded) between
//! operations, which bounds how many operations fit in the scenario's 1 s.
//!
//! `cargo test --release --test kv_lab4` runs them; `RAFTKV_LAB_SEED=S`
//! replays one scenario with seed S (a failure prints the exact command).

mod kv_lab4_harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kv_lab4_harness::{ELECTION_TIMEOUT, KvLab, TestClerk, join};
use raftkv::kv::{KvError, Version, Versioned};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;

/// The lab's maxraftstate for the 4C scenarios, in bytes.
const MAXRAFTSTATE: u64 = 1000;
/// Iterations of a generic scenario (the reference's NITER).
const ITERATIONS: usize = 3;
/// How long clients put in one iteration (the reference's T).
const CLIENTS_RUN: Duration = Duration::from_secs(1);
/// Keys of the random-keys scenarios (the reference's NKEYS).
const RANDOM_KEYS: usize = 100;

/// A generic scenario (the reference's `MakeTest` arguments).
#[derive(Clone, Copy, Debug)]
struct Spec {
    clients: usize,
    servers: usize,
    unreliable: bool,
    crash: bool,
    partitions: bool,
    random_keys: bool,
    maxraftstate: Option<u64>,
}

impl Spec {
    fn new(clients: usize, servers: usize) -> Spec {
        Spec {
            clients,
            servers,
            unreliable: false,
            crash: false,
            partitions: false,
            random_keys: false,
            maxraftstate: None,
        }
    }

    fn unreliable(self) -> Spec {
        Spec {
            unreliable: true,
            ..self
        }
    }

    fn crash(self) -> Spec {
        Spec {
            crash: true,
            ..self
        }
    }

    fn partitions(self) -> Spec {
        Spec {
            partitions: true,
            ..self
        }
    }

    fn random_keys(self) -> Spec {
        Spec {
            random_keys: true,
            ..self
        }
    }

    fn snapshots(self) -> Spec {
        Spec {
            maxraftstate: Some(MAXRAFTSTATE),
            ..self
        }
    }
}

/// Per key: Puts that returned OK and Puts that returned ErrMaybe.
#[derive(Clone, Copy, Debug, Default)]
struct PutCounts {
    ok: u64,
    maybe: u64,
}

/// The reference's `OneClientPut`: until `done`, puts a fresh value at the
/// version it believes current on one of `keys`; after a Put that is not
/// OK it reads the key to learn the version. Pauses 1–5 ms between
/// operations. Returns its Put counts per key.
async fn one_client_put(
    client: usize,
    clerk: TestClerk,
    keys: Arc<Vec<String>>,
    random_keys: bool,
    mut rng: ChaCha8Rng,
    done: Arc<AtomicBool>,
) -> BTreeMap<String, PutCounts> {
    let mut versions: BTreeMap<&str, Version> = BTreeMap::new();
    let mut counts: BTreeMap<String, PutCounts> = BTreeMap::new();
    let mut step = 0u64;
    while !done.load(Ordering::Relaxed) {
        step += 1;
        let key = if random_keys {
            &keys[rng.random_range(0..keys.len())]
        } else {
            &keys[0]
        };
        let version = versions.get(key.as_str()).copied().unwrap_or(0);
        let value = format!("{client}.{step}");
        let result = clerk.put(key, &value, version).await;
        let count = counts.entry(key.clone()).or_default();
        match result {
            Ok(()) => {
                count.ok += 1;
                versions.insert(key, version + 1);
            }
            Err(error) => {
                if error == KvError::Maybe {
                    count.maybe += 1;
                }
                let known = match clerk.get(key).await {
                    Ok(found) => found.version,
                    Err(KvError::NoKey) => 0,
                    Err(other) => panic!("client {client}: get {key} failed: {other}"),
                };
                versions.insert(key, known);
            }
        }
        sleep(Duration::from_millis(rng.random_range(1..=5))).await;
    }
    counts
}

/// The reference's `GenericTest`: `ITERATIONS` times, clients put for 1 s
/// (with the partitioner re-drawing partitions from 100 ms in, if asked);
/// then heal, crash and restart every server (if asked), check each key's
/// final version against the clients' counts and the persisted sizes
/// against maxraftstate. Finally the whole history must be linearizable.
async fn generic(name: &'static str, spec: Spec) {
    let mut lab = KvLab::new(name, spec.servers, spec.maxraftstate).await;
    let at = lab.at();
    lab.net().set_reliable(!spec.unreliable);
    let keys: Arc<Vec<String>> = Arc::new(if spec.random_keys {
        (0..RANDOM_KEYS).map(|k| format!("k{k}")).collect()
    } else {
        vec!["k".to_string()]
    });
    // Without faults while clients run, no Put can take effect without
    // its client hearing OK: the final version is exactly the OK count.
    let exact = !spec.unreliable && !spec.partitions;
    let checker = lab.clerk(None);
    let mut totals: BTreeMap<String, PutCounts> = BTreeMap::new();
    for iteration in 0..ITERATIONS {
        let done = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..spec.clients)
            .map(|client| {
                let clerk = lab.clerk(None);
                let rng = lab.topology().client_rng();
                tokio::spawn(one_client_put(
                    client,
                    clerk,
                    keys.clone(),
                    spec.random_keys,
                    rng,
                    done.clone(),
                ))
            })
            .collect();
        let stop_partitioner = CancellationToken::new();
        let partitioner = if spec.partitions {
            // Let the clients run without interruption for a while first.
            sleep(Duration::from_millis(100)).await;
            let topology = lab.topology().clone();
            let task = tokio::spawn(topology.partitioner(stop_partitioner.clone()));
            sleep(CLIENTS_RUN - Duration::from_millis(100)).await;
            Some(task)
        } else {
            sleep(CLIENTS_RUN).await;
            None
        };
        done.store(true, Ordering::Relaxed);
        for client in clients {
            for (key, counts) in join(client).await {
                let total = totals.entry(key).or_default();
                total.ok += counts.ok;
                total.maybe += counts.maybe;
            }
        }
        if let Some(partitioner) = partitioner {
            stop_partitioner.cancel();
            join(partitioner).await;
            // A request may still sit in a minority; it returns once that
            // server learns of a new term.
            lab.connect_all();
            sleep(ELECTION_TIMEOUT).await;
        }
        if spec.crash {
            lab.crash_all().await;
            sleep(ELECTION_TIMEOUT).await;
            lab.start_all();
        }
        for (key, counts) in &totals {
            let version = checker.get(key).await.map_or_else(
                |error| panic!("{at}: final get of {key} failed: {error}"),
                |found| found.version,
            );
            if exact {
                assert_eq!(
                    version, counts.ok,
                    "{at}: iteration {iteration}: key {key} at version {version}, clients saw {} OK puts",
                    counts.ok
                );
            } else {
                assert!(
                    counts.ok <= version && version <= counts.ok + counts.maybe,
                    "{at}: iteration {iteration}: key {key} at version {version}, clients saw {} OK and {} ErrMaybe puts",
                    counts.ok,
                    counts.maybe
                );
            }
        }
        check_sizes(&lab, spec.maxraftstate, iteration);
    }
    lab.check_linearizable();
    let (ok, maybe) = totals
        .values()
        .fold((0, 0), |(ok, maybe), c| (ok + c.ok, maybe + c.maybe));
    let summary = format!(
        "{} clients, {ok} OK puts, {maybe} ErrMaybe, raft state max {} bytes",
        spec.clients,
        lab.raft_state_bytes_max()
    );
    lab.finish(&summary).await;
}

/// With maxraftstate the persisted Raft state stays within 8 × maxraftstate;
/// without, no server made a snapshot.
fn check_sizes(lab: &KvLab, maxraftstate: Option<u64>, iteration: usize) {
    match maxraftstate {
        Some(max) => {
            let size = lab.raft_state_bytes_max();
            assert!(
                size <= 8 * max,
                "{}: iteration {iteration}: logs were not trimmed ({size} > 8 * {max})",
                lab.at()
            );
        }
        None => {
            let size = lab.snapshot_bytes_max();
            assert_eq!(
                size,
                0,
                "{}: iteration {iteration}: snapshot of {size} bytes with snapshots off",
                lab.at()
            );
        }
    }
}

/// The reference's `PutAtLeastOnce`: puts `value` at `version` until a Put
/// returns OK or ErrMaybe; returns the version after it.
async fn put_at_least_once(clerk: &TestClerk, key: &str, value: &str, version: Version) -> Version {
    let mut version = version;
    loop {
        match clerk.put(key, value, version).await {
            Ok(()) | Err(KvError::Maybe) => return version + 1,
            // Someone else's (or an earlier copy of ours) took this version.
            Err(KvError::Version) => version += 1,
            Err(other) => panic!("put {key} at {version}: {other}"),
        }
    }
}

/// The reference's `CheckGet`.
async fn check_get(clerk: &TestClerk, at: &str, key: &str, value: &str, version: Version) {
    let got = clerk.get(key).await;
    let expected = Versioned {
        value: bytes::Bytes::copy_from_slice(value.as_bytes()),
        version,
    };
    assert_eq!(got, Ok(expected), "{at}: get {key}");
}

// ----- 4B: the service without snapshots --------------------------------------

// Proves one client's puts on 5 servers all apply: final version = OK puts; linearizable.
#[tokio::test(start_paused = true)]
async fn basic_4b() {
    generic("basic_4b", Spec::new(1, 5)).await;
}

// Proves 5 concurrent clients on one key lose no update: final version = OK puts; linearizable.
#[tokio::test(start_paused = true)]
async fn concurrent_4b() {
    generic("concurrent_4b", Spec::new(5, 5)).await;
}

// Proves 5 clients on the unreliable network: OK ≤ final version ≤ OK + ErrMaybe; linearizable.
#[tokio::test(start_paused = true)]
async fn unreliable_4b() {
    generic("unreliable_4b", Spec::new(5, 5).unreliable()).await;
}

// Proves one client under partitions re-drawn every ~1 s keeps a consistent, linearizable history.
#[tokio::test(start_paused = true)]
async fn many_partitions_one_client_4b() {
    generic(
        "many_partitions_one_client_4b",
        Spec::new(1, 5).partitions(),
    )
    .await;
}

// Proves 5 clients under partitions re-drawn every ~1 s keep a consistent, linearizable history.
#[tokio::test(start_paused = true)]
async fn many_partitions_many_clients_4b() {
    generic(
        "many_partitions_many_clients_4b",
        Spec::new(5, 5).partitions(),
    )
    .await;
}

// Proves every acknowledged put survives a crash of all servers each iteration (one client).
#[tokio::test(start_paused = true)]
async fn persist_one_client_4b() {
    generic("persist_one_client_4b", Spec::new(1, 5).crash()).await;
}

// Proves every acknowledged put survives a crash of all servers each iteration (5 clients).
#[tokio::test(start_paused = true)]
async fn persist_concurrent_4b() {
    generic("persist_concurrent_4b", Spec::new(5, 5).crash()).await;
}

// Proves crashes of all servers on the unreliable network keep the history linearizable.
#[tokio::test(start_paused = true)]
async fn persist_concurrent_unreliable_4b() {
    generic(
        "persist_concurrent_unreliable_4b",
        Spec::new(5, 5).unreliable().crash(),
    )
    .await;
}

// Proves crashes of all servers plus random partitions keep the history linearizable.
#[tokio::test(start_paused = true)]
async fn persist_partition_4b() {
    generic("persist_partition_4b", Spec::new(5, 5).crash().partitions()).await;
}

// Proves crashes, partitions and the unreliable network together keep the history linearizable.
#[tokio::test(start_paused = true)]
async fn persist_partition_unreliable_4b() {
    generic(
        "persist_partition_unreliable_4b",
        Spec::new(5, 5).unreliable().crash().partitions(),
    )
    .await;
}

// Proves 15 clients on 7 servers over 100 random keys, unreliable, with crashes and partitions:
// every key's final version within its clients' counts, and the history linearizable.
#[tokio::test(start_paused = true)]
async fn persist_partition_unreliable_linearizable_4b() {
    generic(
        "persist_partition_unreliable_linearizable_4b",
        Spec::new(15, 7)
            .unreliable()
            .crash()
            .partitions()
            .random_keys(),
    )
    .await;
}

/// The reference's speed test: 1000 sequential puts by one client on 3
/// servers within 33 s (at least 3 operations per 100 ms heartbeat).
async fn speed(name: &'static str, maxraftstate: Option<u64>) {
    const PUTS: u64 = 1000;
    const HEARTBEAT: Duration = Duration::from_millis(100);
    const OPS_PER_HEARTBEAT: u32 = 3;
    let mut lab = KvLab::new(name, 3, maxraftstate).await;
    let at = lab.at();
    let clerk = lab.clerk(None);
    // Wait until the first operation completes: a leader is elected and serving.
    assert_eq!(clerk.get("x").await, Err(KvError::NoKey), "{at}");
    let begin = Instant::now();
    let wall = std::time::Instant::now();
    for i in 0..PUTS {
        let put = clerk.put("k", &i.to_string(), i).await;
        assert_eq!(put, Ok(()), "{at}: put {i}");
    }
    let took = begin.elapsed();
    let wall = wall.elapsed();
    check_get(&clerk, &at, "k", &(PUTS - 1).to_string(), PUTS).await;
    let per_op_max = HEARTBEAT / OPS_PER_HEARTBEAT;
    assert!(
        took <= per_op_max * PUTS as u32,
        "{at}: operations completed too slowly: {:?}/op > {per_op_max:?}/op",
        took / PUTS as u32
    );
    check_sizes(&lab, maxraftstate, 0);
    lab.check_linearizable();
    let per_heartbeat = if took.is_zero() {
        "unbounded".to_string()
    } else {
        format!(
            "{:.0}",
            PUTS as f64 / (took.as_secs_f64() / HEARTBEAT.as_secs_f64())
        )
    };
    lab.finish(&format!(
        "{PUTS} puts in {took:?} virtual ({per_heartbeat} ops per 100 ms), {wall:?} real"
    ))
    .await;
}

// Proves 1000 sequential puts finish within 33 s: commits do not wait for heartbeats.
#[tokio::test(start_paused = true)]
async fn speed_4b() {
    speed("speed_4b", None).await;
}

// Proves a minority cannot complete a Put or a Get, the majority goes on meanwhile, and after
// healing the minority's Put (and Get) complete within 3 s; the history is linearizable.
#[tokio::test(start_paused = true)]
async fn one_partition_4b() {
    let mut lab = KvLab::new("one_partition_4b", 5, None).await;
    let at = lab.at();
    let clerk = lab.clerk(None);
    let ver0 = put_at_least_once(&clerk, "1", "13", 0).await;
    let leader = lab.wait_leader().await;
    let (majority, minority) = lab.make_partition(leader);
    lab.partition(&majority, &minority);
    let ckp1 = lab.clerk(Some(&majority));
    let ckp2a = lab.clerk(Some(&minority));
    let ckp2b = lab.clerk(Some(&minority));
    let (ckp2a_id, ckp2b_id) = (ckp2a.node_id(), ckp2b.node_id());

    let ver1 = put_at_least_once(&ckp1, "1", "14", ver0).await;
    check_get(&ckp1, &at, "1", "14", ver1).await;

    // No progress in the minority.
    let put = tokio::spawn(async move { ckp2a.put("1", "15", ver1).await });
    let get = tokio::spawn(async move { ckp2b.get("1").await });
    sleep(Duration::from_secs(1)).await;
    assert!(!put.is_finished(), "{at}: Put in minority completed");
    assert!(!get.is_finished(), "{at}: Get in minority completed");
    check_get(&ckp1, &at, "1", "14", ver1).await;
    let ver2 = put_at_least_once(&ckp1, "1", "16", ver1).await;
    check_get(&ckp1, &at, "1", "16", ver2).await;

    // Completion after heal.
    lab.connect_all();
    lab.client_connect_all(ckp2a_id);
    lab.client_connect_all(ckp2b_id);
    sleep(ELECTION_TIMEOUT).await;
    let bound = Duration::from_secs(3);
    let put = timeout(bound, join(put))
        .await
        .unwrap_or_else(|_| panic!("{at}: Put did not complete within 3 s of healing"));
    // Its version was taken by "16" meanwhile, and its first RPC went to
    // the minority: the clerk cannot tell whether it applied.
    assert!(
        matches!(put, Err(KvError::Maybe | KvError::Version)),
        "{at}: minority put returned {put:?}"
    );
    let got = timeout(bound, join(get))
        .await
        .unwrap_or_else(|_| panic!("{at}: Get did not complete within 3 s of healing"));
    assert!(got.is_ok(), "{at}: minority get returned {got:?}");
    check_get(&clerk, &at, "1", "16", ver2).await;
    lab.check_linearizable();
    lab.finish("one partition").await;
}

// ----- 4C: the service with snapshots (maxraftstate 1000) ------------------------

// Proves a server cut off during 50 puts catches up through InstallSnapshot (its driver installed
// a leader's snapshot, and the leader's log no longer held the entries it missed), the majority's
// log stays within 8 × maxraftstate, and every value is read back.
#[tokio::test(start_paused = true)]
async fn snapshot_rpc_4c() {
    let mut lab = KvLab::new("snapshot_rpc_4c", 3, Some(MAXRAFTSTATE)).await;
    let at = lab.at();
    let clerk = lab.clerk(None);
    let ver_a = put_at_least_once(&clerk, "a", "A", 0).await;
    check_get(&clerk, &at, "a", "A", ver_a).await;

    // A bunch of puts into the majority partition.
    lab.partition(&[0, 1], &[2]);
    let mut ver_b = 0;
    {
        let ck1 = lab.clerk(Some(&[0, 1]));
        for i in 0..50 {
            ver_b = put_at_least_once(&ck1, "b", &i.to_string(), ver_b).await;
        }
        sleep(ELECTION_TIMEOUT).await;
        ver_b = put_at_least_once(&ck1, "b", "B", ver_b).await;
    }
    // The majority has thrown away most of its log.
    check_sizes(&lab, Some(MAXRAFTSTATE), 0);

    // Now a majority that needs the lagging server 2: it must catch up.
    let lagging = lab.up(2).rsm().node().status();
    let installed_before = lagging.metrics.snapshots_installed;
    let first_index_0 = lab.up(0).rsm().node().status().snapshot_index + 1;
    assert!(
        first_index_0 > lagging.last_index + 1,
        "{at}: server 0's log still starts at {first_index_0}, server 2 ends at {}: no snapshot needed",
        lagging.last_index
    );
    lab.partition(&[0, 2], &[1]);
    let ver_c;
    {
        let ck1 = lab.clerk(Some(&[0, 2]));
        ver_c = put_at_least_once(&ck1, "c", "C", 0).await;
        let ver_d = put_at_least_once(&ck1, "d", "D", 0).await;
        check_get(&ck1, &at, "a", "A", ver_a).await;
        check_get(&ck1, &at, "b", "B", ver_b).await;
        check_get(&ck1, &at, "c", "C", ver_c).await;
        check_get(&ck1, &at, "d", "D", ver_d).await;
    }
    let caught_up = lab.up(2).rsm().node().status();
    assert!(
        caught_up.metrics.snapshots_installed > installed_before,
        "{at}: server 2 caught up without installing a snapshot"
    );
    assert!(
        caught_up.snapshot_index >= first_index_0 - 1,
        "{at}: server 2's snapshot ends at {}, before server 0's ({})",
        caught_up.snapshot_index,
        first_index_0 - 1
    );

    // Now everybody.
    lab.connect_all();
    let ver_e = put_at_least_once(&clerk, "e", "E", 0).await;
    check_get(&clerk, &at, "c", "C", ver_c).await;
    check_get(&clerk, &at, "e", "E", ver_e).await;
    check_get(&clerk, &at, "a", "A", ver_a).await;
    check_sizes(&lab, Some(MAXRAFTSTATE), 1);
    lab.check_linearizable();
    lab.finish("snapshot catch-up").await;
}

// Proves 400 puts and gets on one key keep every snapshot within 500 bytes (snapshots hold the
// state, not the history).
#[tokio::test(start_paused = true)]
async fn snapshot_size_4c() {
    const SNAPSHOT_BYTES_MAX: u64 = 500;
    let mut lab = KvLab::new("snapshot_size_4c", 3, Some(MAXRAFTSTATE)).await;
    let at = lab.at();
    let clerk = lab.clerk(None);
    let mut version = 0;
    for _ in 0..200 {
        assert_eq!(clerk.put("x", "0", version).await, Ok(()), "{at}");
        check_get(&clerk, &at, "x", "0", version + 1).await;
        assert_eq!(clerk.put("x", "1", version + 1).await, Ok(()), "{at}");
        check_get(&clerk, &at, "x", "1", version + 2).await;
        version += 2;
    }
    // Check that the servers made snapshots and they are small.
    check_sizes(&lab, Some(MAXRAFTSTATE), 0);
    let size = lab.snapshot_bytes_max();
    assert!(size > 0, "{at}: no server made a snapshot");
    assert!(
        size <= SNAPSHOT_BYTES_MAX,
        "{at}: snapshot too large ({size} > {SNAPSHOT_BYTES_MAX})"
    );
    lab.check_linearizable();
    lab.finish(&format!("snapshot {size} bytes")).await;
}

// Proves 1000 sequential puts finish within 33 s with snapshots on.
#[tokio::test(start_paused = true)]
async fn speed_4c() {
    speed("speed_4c", Some(MAXRAFTSTATE)).await;
}

// The rest of the 4B matrix with snapshots on (the lab runs these only without): the same
// checks, plus the persisted Raft state within 8 × maxraftstate after every iteration.

// Proves basic_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn basic_snapshots_4c() {
    generic("basic_snapshots_4c", Spec::new(1, 5).snapshots()).await;
}

// Proves concurrent_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn concurrent_snapshots_4c() {
    generic("concurrent_snapshots_4c", Spec::new(5, 5).snapshots()).await;
}

// Proves many_partitions_one_client_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn many_partitions_one_client_snapshots_4c() {
    generic(
        "many_partitions_one_client_snapshots_4c",
        Spec::new(1, 5).partitions().snapshots(),
    )
    .await;
}

// Proves many_partitions_many_clients_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn many_partitions_many_clients_snapshots_4c() {
    generic(
        "many_partitions_many_clients_snapshots_4c",
        Spec::new(5, 5).partitions().snapshots(),
    )
    .await;
}

// Proves persist_concurrent_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn persist_concurrent_snapshots_4c() {
    generic(
        "persist_concurrent_snapshots_4c",
        Spec::new(5, 5).crash().snapshots(),
    )
    .await;
}

// Proves persist_partition_4b's checks hold with snapshots on.
#[tokio::test(start_paused = true)]
async fn persist_partition_snapshots_4c() {
    generic(
        "persist_partition_snapshots_4c",
        Spec::new(5, 5).crash().partitions().snapshots(),
    )
    .await;
}

// Proves one client's puts survive crashes of all servers, restarting from snapshots.
#[tokio::test(start_paused = true)]
async fn snapshot_recover_4c() {
    generic("snapshot_recover_4c", Spec::new(1, 5).crash().snapshots()).await;
}

// Proves 20 clients' puts survive crashes of all servers, restarting from snapshots.
#[tokio::test(start_paused = true)]
async fn snapshot_recover_many_clients_4c() {
    generic(
        "snapshot_recover_many_clients_4c",
        Spec::new(20, 5).crash().snapshots(),
    )
    .await;
}

// Proves snapshots on the unreliable network keep the history linearizable and the log bounded.
#[tokio::test(start_paused = true)]
async fn snapshot_unreliable_4c() {
    generic(
        "snapshot_unreliable_4c",
        Spec::new(5, 5).unreliable().snapshots(),
    )
    .await;
}

// Proves snapshots plus crashes on the unreliable network keep the history linearizable.
#[tokio::test(start_paused = true)]
async fn snapshot_unreliable_recover_4c() {
    generic(
        "snapshot_unreliable_recover_4c",
        Spec::new(5, 5).unreliable().crash().snapshots(),
    )
    .await;
}

// Proves snapshots plus crashes and partitions on the unreliable network keep the history linearizable.
#[tokio::test(start_paused = true)]
async fn snapshot_unreliable_recover_concurrent_partition_4c() {
    generic(
        "snapshot_unreliable_recover_concurrent_partition_4c",
        Spec::new(5, 5)
            .unreliable()
            .crash()
            .partitions()
            .snapshots(),
    )
    .await;
}

// Proves the 15-client, 7-server, 100-random-key scenario with snapshots, crashes, partitions and
// the unreliable network: per-key versions within the clients' counts, history linearizable.
#[tokio::test(start_paused = true)]
async fn snapshot_unreliable_recover_concurrent_partition_linearizable_4c() {
    generic(
        "snapshot_unreliable_recover_concurrent_partition_linearizable_4c",
        Spec::new(15, 7)
            .unreliable()
            .crash()
            .partitions()
            .random_keys()
            .snapshots(),
    )
    .await;
}

//! Every Lab 4A/4C scenario of the replicated state machine layer (the
//! reference's `rsm` tests), through `Rsm<Counter>` replicas on sled stores
//! over the simulated network with long delays, on tokio's paused clock. The
//! numeric bounds are the reference's.
//!
//! The replicas run with a 30 s submit timeout (the reference's Submit has
//! none), so a submission that returns early does so because the layer saw
//! its outcome or lost leadership, never because a timer ran out.
//!
//! `cargo test --release --test rsm_lab4` runs them; `RAFTKV_LAB_SEED=S`
//! replays one scenario with seed S (a failure prints the exact command).

mod kv_lab4_harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kv_lab4_harness::{ELECTION_TIMEOUT, Group, Scenario, join};
use raftkv::rsm::{CodecError, Rsm, RsmConfig, StateMachine, SubmitError};
use tokio::time::{Instant, sleep, timeout};

/// The reference's NSRV.
const SERVERS: usize = 3;
/// The reference's NSEC: how long `one` keeps trying.
const ONE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command of the test service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Adds one to the counter.
    Inc,
    /// Changes nothing (the reference's Null).
    Null,
}

/// The reference's test service: a counter. Every command returns the
/// counter after it was applied.
#[derive(Debug, Default)]
struct Counter {
    n: u64,
}

impl StateMachine for Counter {
    type Command = Op;
    type Output = u64;

    fn encode_command(command: &Op) -> Bytes {
        Bytes::from_static(match command {
            Op::Inc => b"i",
            Op::Null => b"n",
        })
    }

    fn decode_command(data: &[u8]) -> Result<Op, CodecError> {
        match data {
            b"i" => Ok(Op::Inc),
            b"n" => Ok(Op::Null),
            other => Err(CodecError::new("counter op", format!("{other:?}"))),
        }
    }

    fn apply(&mut self, _index: u64, command: Op) -> u64 {
        if command == Op::Inc {
            self.n += 1;
        }
        self.n
    }

    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.n.to_le_bytes())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), CodecError> {
        let bytes: [u8; 8] = data
            .try_into()
            .map_err(|_| CodecError::new("counter snapshot", "not 8 bytes"))?;
        self.n = u64::from_le_bytes(bytes);
        Ok(())
    }
}

/// The reference's rsm test config: three counter replicas.
struct Lab {
    scenario: Scenario,
    group: Group<Rsm<Counter>>,
    /// The server that last accepted a submission (where `one` starts).
    leader: usize,
}

impl Lab {
    async fn new(name: &'static str, maxraftstate_bytes: Option<u64>) -> Lab {
        let scenario = Scenario::new("rsm_lab4", name);
        let config = RsmConfig {
            maxraftstate_bytes,
            submit_timeout: Duration::from_secs(30),
            ..RsmConfig::default()
        };
        let group = Group::new(scenario.seed(), SERVERS, config).await;
        Lab {
            scenario,
            group,
            leader: 0,
        }
    }

    fn at(&self) -> String {
        self.scenario.at()
    }

    /// The reference's `oneIncPartition`/`oneNull`: submits `op` to every
    /// server in `servers` in turn, starting at the last leader, until one
    /// applies it; gives up (panics) after 10 s.
    async fn one_in(&mut self, op: Op, servers: &[usize]) -> u64 {
        let begin = Instant::now();
        while begin.elapsed() < ONE_TIMEOUT {
            for k in 0..SERVERS {
                let server = (self.leader + k) % SERVERS;
                if !servers.contains(&server) {
                    continue;
                }
                let Some(rsm) = self.group.replica(server) else {
                    continue;
                };
                if let Ok(output) = rsm.submit(&op).await {
                    self.leader = server;
                    return output;
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
        panic!("{}: one({op:?}) took too long", self.at());
    }

    /// `one_in` over every server.
    async fn one(&mut self, op: Op) -> u64 {
        let all: Vec<usize> = (0..SERVERS).collect();
        self.one_in(op, &all).await
    }

    /// How many live servers' counters read `value`.
    fn count_value(&self, value: u64) -> usize {
        (0..SERVERS)
            .filter_map(|server| self.group.replica(server))
            .filter(|rsm| rsm.read_local(|counter| counter.n) == value)
            .count()
    }

    /// The reference's `checkCounter`: waits (10 ms doubling up to 1 s, 30
    /// rounds) until `servers` replicas have applied the counter `value`.
    async fn check_counter(&self, value: u64, servers: usize) {
        let mut pause = Duration::from_millis(10);
        let mut count = 0;
        for _ in 0..30 {
            count = self.count_value(value);
            if count >= servers {
                return;
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
        panic!(
            "{}: checkCounter: only {count} servers have {value} instead of {servers}",
            self.at()
        );
    }

    /// The reference's `disconnectLeader`: cuts the current leader off and
    /// returns it.
    async fn disconnect_leader(&mut self) -> usize {
        let leader = self.group.wait_leader().await;
        self.group.disconnect(leader);
        leader
    }

    /// The reference's group `Shutdown` + `StartServers`, with `pause` in
    /// between.
    async fn restart_all(&mut self, pause: Duration) {
        self.group.crash_all().await;
        sleep(pause).await;
        self.group.start_all();
    }

    async fn finish(mut self) {
        self.group.shutdown().await;
        let summary = format!(
            "{} servers, {} rpcs, {} restarts",
            SERVERS,
            self.group.net().total_rpcs(),
            self.group.restarts()
        );
        self.scenario.finish(&summary);
    }
}

// Proves 10 sequential increments each return the next count and every replica applies each one.
#[tokio::test(start_paused = true)]
async fn basic_4a() {
    let mut lab = Lab::new("basic_4a", None).await;
    for i in 1..=10u64 {
        let n = lab.one(Op::Inc).await;
        assert_eq!(n, i, "{}: expected {i} instead of {n}", lab.at());
        lab.check_counter(n, SERVERS).await;
    }
    lab.finish().await;
}

// Proves 50 concurrent submissions all apply exactly once (the counter reaches 50 on every replica,
// and the 50 outputs are 1..=50, each submitter getting its own entry's output).
#[tokio::test(start_paused = true)]
async fn concurrent_4a() {
    let mut lab = Lab::new("concurrent_4a", None).await;
    let leader = lab.group.wait_leader().await;
    lab.leader = leader;
    let submits: Vec<_> = (0..50)
        .map(|_| {
            let rsm = lab.group.up(leader);
            tokio::spawn(async move { rsm.submit(&Op::Inc).await })
        })
        .collect();
    let mut outputs = Vec::new();
    for submit in submits {
        match join(submit).await {
            Ok(n) => outputs.push(n),
            // The leader did not change on this reliable network; any failure is a bug.
            Err(error) => panic!("{}: concurrent submit failed: {error}", lab.at()),
        }
    }
    outputs.sort_unstable();
    assert_eq!(outputs, (1..=50).collect::<Vec<u64>>(), "{}", lab.at());
    lab.check_counter(50, SERVERS).await;
    lab.finish().await;
}

// Proves increments continue after the leader is cut off, and the old leader catches up on rejoining.
#[tokio::test(start_paused = true)]
async fn leader_failure_4a() {
    let mut lab = Lab::new("leader_failure_4a", None).await;
    let n = lab.one(Op::Inc).await;
    lab.check_counter(n, SERVERS).await;
    let old = lab.disconnect_leader().await;
    let n = lab.one(Op::Inc).await;
    assert_eq!(n, 2, "{}", lab.at());
    lab.check_counter(n, SERVERS - 1).await;
    lab.group.connect(old);
    lab.check_counter(n, SERVERS).await;
    lab.finish().await;
}

// Proves a leader moved into a minority applies none of 100 submissions while the majority commits,
// and by 1 s after healing every one of them has returned LeadershipLost, none with a result; all
// replicas then agree on the majority's count. (Ours return before the healing: the old leader steps
// down after an election timeout without a quorum and fails its waiters; the run prints how many.)
#[tokio::test(start_paused = true)]
async fn leader_partition_4a() {
    const SUBMISSIONS: usize = 100;
    let mut lab = Lab::new("leader_partition_4a", None).await;
    let n = lab.one(Op::Inc).await;
    lab.check_counter(n, SERVERS).await;
    let old = lab.group.wait_leader().await;
    let (majority, minority) = lab.group.make_partition(old);
    lab.group.partition(&majority, &minority);
    let succeeded = Arc::new(AtomicUsize::new(0));
    let returned = Arc::new(AtomicUsize::new(0));
    let submits: Vec<_> = (0..SUBMISSIONS)
        .map(|_| {
            let rsm = lab.group.up(old);
            let (succeeded, returned) = (succeeded.clone(), returned.clone());
            tokio::spawn(async move {
                let outcome = rsm.submit(&Op::Inc).await;
                if outcome.is_ok() {
                    succeeded.fetch_add(1, Ordering::SeqCst);
                }
                returned.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        })
        .collect();
    let majority_n = lab.one_in(Op::Inc, &majority).await;
    assert_eq!(majority_n, n + 1, "{}", lab.at());
    sleep(ELECTION_TIMEOUT).await;
    assert_eq!(
        succeeded.load(Ordering::SeqCst),
        0,
        "{}: a submission succeeded in the minority",
        lab.at()
    );
    // The old leader may already have stepped down (it stops leading after
    // an election timeout without a quorum), failing its waiters early.
    let returned_before_heal = returned.load(Ordering::SeqCst);
    lab.group.connect_all();
    let healed = Instant::now();
    for submit in submits {
        let left = Duration::from_secs(1).saturating_sub(healed.elapsed());
        let outcome = timeout(left, join(submit)).await.unwrap_or_else(|_| {
            panic!(
                "{}: a submission did not return within 1 s of healing",
                lab.at()
            )
        });
        assert!(
            matches!(outcome, Err(SubmitError::LeadershipLost { .. })),
            "{}: a minority submission returned {outcome:?}",
            lab.at()
        );
    }
    lab.check_counter(majority_n, SERVERS).await;
    eprintln!(
        "{}: {returned_before_heal} of {SUBMISSIONS} minority submissions had returned before healing",
        lab.at()
    );
    lab.finish().await;
}

// Proves a restart of every replica replays the log to the same count (100), and the service goes
// on from there (the next increment returns 101 on every replica).
#[tokio::test(start_paused = true)]
async fn restart_replay_4a() {
    const INCREMENTS: u64 = 100;
    let mut lab = Lab::new("restart_replay_4a", None).await;
    for i in 1..=INCREMENTS {
        let n = lab.one(Op::Inc).await;
        assert_eq!(n, i, "{}", lab.at());
    }
    lab.check_counter(INCREMENTS, SERVERS).await;
    lab.restart_all(Duration::from_secs(1)).await;
    // Elections append no entry, so the replay completes with the first
    // entry the new leader commits: this one, which must count 101.
    let n = lab.one(Op::Inc).await;
    assert_eq!(n, INCREMENTS + 1, "{}", lab.at());
    sleep(Duration::from_secs(1)).await;
    lab.check_counter(n, SERVERS).await;
    lab.finish().await;
}

/// Submits 100 Nulls at the leader concurrently, shuts every server down
/// while they are in flight, and checks each submission returns within 11 s
/// (the reference's NSEC + 1) with a legal outcome.
async fn shutdown_with_inflight(lab: &mut Lab) {
    const SUBMISSIONS: usize = 100;
    let leader = lab.group.wait_leader().await;
    let returned = Arc::new(AtomicUsize::new(0));
    let submits: Vec<_> = (0..SUBMISSIONS)
        .map(|_| {
            let rsm = lab.group.up(leader);
            let returned = returned.clone();
            tokio::spawn(async move {
                let outcome = rsm.submit(&Op::Null).await;
                returned.fetch_add(1, Ordering::SeqCst);
                outcome
            })
        })
        .collect();
    // Let every submission reach the leader's driver, then shut down.
    tokio::task::yield_now().await;
    let in_flight = SUBMISSIONS - returned.load(Ordering::SeqCst);
    assert!(
        in_flight > 0,
        "{}: no submission was in flight at the shutdown",
        lab.at()
    );
    let shutdown = Instant::now();
    lab.group.crash_all().await;
    for submit in submits {
        let left = Duration::from_secs(11).saturating_sub(shutdown.elapsed());
        let outcome = timeout(left, join(submit))
            .await
            .unwrap_or_else(|_| panic!("{}: a submission did not stop after shutdown", lab.at()));
        assert!(
            matches!(
                outcome,
                Ok(_) | Err(SubmitError::Stopped | SubmitError::LeadershipLost { .. })
            ),
            "{}: a submission returned {outcome:?}",
            lab.at()
        );
    }
    eprintln!(
        "{}: {in_flight} submissions in flight at the shutdown, all returned after {:?}",
        lab.at(),
        shutdown.elapsed()
    );
}

// Proves every submission in flight when all servers shut down returns within 11 s.
#[tokio::test(start_paused = true)]
async fn shutdown_4a() {
    let mut lab = Lab::new("shutdown_4a", None).await;
    shutdown_with_inflight(&mut lab).await;
    lab.finish().await;
}

// Proves submissions cut short by a shutdown are not confused with those after a restart: 100
// increments, restart, one more returns 101, 100 Nulls in flight at a second shutdown all return
// within 11 s, and after restarting again every replica agrees on the count of the next increment.
#[tokio::test(start_paused = true)]
async fn restart_submit_4a() {
    const INCREMENTS: u64 = 100;
    let mut lab = Lab::new("restart_submit_4a", None).await;
    for i in 1..=INCREMENTS {
        let n = lab.one(Op::Inc).await;
        assert_eq!(n, i, "{}", lab.at());
    }
    lab.restart_all(Duration::from_secs(1)).await;
    let n = lab.one(Op::Inc).await;
    assert_eq!(n, INCREMENTS + 1, "{}", lab.at());
    shutdown_with_inflight(&mut lab).await;
    lab.group.start_all();
    let n = lab.one(Op::Inc).await;
    assert_eq!(
        n,
        INCREMENTS + 2,
        "{}: Nulls must not change the count",
        lab.at()
    );
    lab.check_counter(n, SERVERS).await;
    lab.finish().await;
}

// Proves with maxraftstate 1000 the persisted Raft state stays <= 2000 bytes after 100 increments,
// and a restart of every replica restores from the snapshot (the next increment returns 101 everywhere).
#[tokio::test(start_paused = true)]
async fn snapshot_4c() {
    const INCREMENTS: u64 = 100;
    const MAXRAFTSTATE: u64 = 1000;
    let mut lab = Lab::new("snapshot_4c", Some(MAXRAFTSTATE)).await;
    for _ in 0..INCREMENTS {
        lab.one(Op::Inc).await;
    }
    lab.check_counter(INCREMENTS, SERVERS).await;
    let size = lab.group.raft_state_bytes_max();
    assert!(
        size <= 2 * MAXRAFTSTATE,
        "{}: logs were not trimmed ({size} > 2 * {MAXRAFTSTATE})",
        lab.at()
    );
    let snapshot = lab.group.snapshot_bytes_max();
    assert!(snapshot > 0, "{}: no replica made a snapshot", lab.at());
    lab.restart_all(Duration::ZERO).await;
    let n = lab.one(Op::Inc).await;
    assert_eq!(n, INCREMENTS + 1, "{}", lab.at());
    lab.check_counter(n, SERVERS).await;
    lab.finish().await;
}

//! Every Lab 3 scenario of the reference course (3A election, 3B agreement,
//! 3C persistence, 3D snapshots), ported from its Raft tests, through the
//! real node driver on sled stores over the simulated network with long
//! delays, on tokio's paused clock. The numeric bounds are the reference's.
//!
//! `cargo test --release --test raft_lab3` runs them; `RAFTKV_LAB_SEED=S`
//! replays one scenario with seed S (a failure prints the exact command).

mod raft_harness;

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use raft_harness::{
    Cluster, ELECTION_TIMEOUT, Lab, LabOptions, RAFT_STATE_BYTES_MAX, SNAPSHOT_INTERVAL, int,
};
use tokio::time::sleep;

fn unreliable(servers: usize) -> LabOptions {
    LabOptions {
        unreliable: true,
        ..LabOptions::new(servers)
    }
}

/// Awaits a spawned task, re-raising its panic in the test.
async fn join<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match handle.await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

// ----- 3A: leader election --------------------------------------------------

// Proves a leader is elected, all agree on a term ≥ 1, and the term stays put while nothing fails.
#[tokio::test(start_paused = true)]
async fn initial_election_3a() {
    let lab = Lab::new("initial_election_3a", LabOptions::new(3)).await;
    lab.check_one_leader().await;
    sleep(Duration::from_millis(50)).await;
    let term1 = lab.check_terms();
    assert!(term1 >= 1, "term is {term1}, but should be at least 1");
    sleep(2 * ELECTION_TIMEOUT).await;
    let term2 = lab.check_terms();
    assert_eq!(
        term1, term2,
        "term changed even though there were no failures"
    );
    lab.check_one_leader().await;
    lab.finish().await;
}

// Proves a new leader is elected when the leader is cut off, and no leader exists without a majority.
#[tokio::test(start_paused = true)]
async fn re_election_3a() {
    let lab = Lab::new("re_election_3a", LabOptions::new(3)).await;
    let n = lab.n();
    let leader1 = lab.check_one_leader().await;
    // If the leader disconnects, a new one should be elected.
    lab.disconnect(leader1);
    lab.check_one_leader().await;
    // The old leader rejoining must not disturb the new leader.
    lab.connect(leader1);
    let leader2 = lab.check_one_leader().await;
    // No quorum: no new leader.
    lab.disconnect(leader2);
    lab.disconnect((leader2 + 1) % n);
    sleep(2 * ELECTION_TIMEOUT).await;
    lab.check_no_leader();
    // A quorum arises: it elects a leader.
    lab.connect((leader2 + 1) % n);
    lab.check_one_leader().await;
    // Rejoining the last node must not prevent a leader.
    lab.connect(leader2);
    lab.check_one_leader().await;
    lab.finish().await;
}

// Proves 7 servers keep exactly one leader through 9 rounds of cutting 3 random servers off.
#[tokio::test(start_paused = true)]
async fn many_elections_3a() {
    let lab = Lab::new("many_elections_3a", LabOptions::new(7)).await;
    let n = lab.n() as u64;
    lab.check_one_leader().await;
    for _ in 1..10 {
        let cut = [
            lab.rand_below(n) as usize,
            lab.rand_below(n) as usize,
            lab.rand_below(n) as usize,
        ];
        for &server in &cut {
            lab.disconnect(server);
        }
        // Either the current leader should still be alive, or the remaining four should elect one.
        lab.check_one_leader().await;
        for &server in &cut {
            lab.connect(server);
        }
    }
    lab.check_one_leader().await;
    lab.finish().await;
}

// ----- 3B: log agreement ----------------------------------------------------

// Proves nothing commits before a proposal and three proposals commit at indexes 1, 2, 3.
#[tokio::test(start_paused = true)]
async fn basic_agree_3b() {
    let lab = Lab::new("basic_agree_3b", LabOptions::new(3)).await;
    let n = lab.n();
    for index in 1..=3u64 {
        let (count, _) = lab.n_committed(index);
        assert_eq!(count, 0, "some have committed before Start()");
        let x = lab.one(int(index * 100), n, false).await;
        assert_eq!(x, index, "got index {x} but expected {index}");
    }
    lab.finish().await;
}

// Proves each command's bytes cross the network about once per follower (≤ 3 × 50,000 + 50,000 bytes).
#[tokio::test(start_paused = true)]
async fn rpc_bytes_3b() {
    let lab = Lab::new("rpc_bytes_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(99), n, false).await;
    let bytes0 = lab.bytes_total();
    let mut sent = 0u64;
    for index in 2..12u64 {
        let command: Bytes = (0..5000)
            .map(|_| b'a' + lab.rand_below(26) as u8)
            .collect::<Vec<u8>>()
            .into();
        sent += command.len() as u64;
        let x = lab.one(command, n, false).await;
        assert_eq!(x, index, "got index {x} but expected {index}");
    }
    let got = lab.bytes_total() - bytes0;
    let expected = n as u64 * sent;
    assert!(
        got <= expected + 50_000,
        "too many RPC bytes; got {got}, expected at most {}",
        expected + 50_000
    );
    lab.finish().await;
}

// Proves agreement continues with one follower cut off, and nothing commits with only one of three.
#[tokio::test(start_paused = true)]
async fn follower_failure_3b() {
    let lab = Lab::new("follower_failure_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(101), n, false).await;
    // Disconnect one follower from the network.
    let leader1 = lab.check_one_leader().await;
    lab.disconnect((leader1 + 1) % n);
    // The leader and the remaining follower should be able to agree despite the disconnected follower.
    lab.one(int(102), n - 1, false).await;
    sleep(ELECTION_TIMEOUT).await;
    lab.one(int(103), n - 1, false).await;
    // Disconnect the remaining follower.
    let leader2 = lab.check_one_leader().await;
    lab.disconnect((leader2 + 1) % n);
    lab.disconnect((leader2 + 2) % n);
    // Submit a command.
    let (index, _) = lab
        .start_command(leader2, int(104))
        .await
        .expect("leader rejected Start()");
    assert_eq!(index, 4, "expected index 4, got {index}");
    sleep(2 * ELECTION_TIMEOUT).await;
    // Check that the command did not commit.
    let (count, _) = lab.n_committed(index);
    assert_eq!(count, 0, "{count} committed but no majority");
    lab.finish().await;
}

// Proves agreement continues after the leader is cut off, and nothing commits after the next one is too.
#[tokio::test(start_paused = true)]
async fn leader_failure_3b() {
    let lab = Lab::new("leader_failure_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(101), n, false).await;
    // Disconnect the first leader.
    let leader1 = lab.check_one_leader().await;
    lab.disconnect(leader1);
    // The remaining followers should elect a new leader.
    lab.one(int(102), n - 1, false).await;
    sleep(ELECTION_TIMEOUT).await;
    lab.one(int(103), n - 1, false).await;
    // Disconnect the new leader.
    let leader2 = lab.check_one_leader().await;
    lab.disconnect(leader2);
    // Submit a command to each server.
    for server in 0..n {
        lab.start_command(server, int(104)).await;
    }
    sleep(2 * ELECTION_TIMEOUT).await;
    // Check that the command did not commit.
    let (count, _) = lab.n_committed(4);
    assert_eq!(count, 0, "{count} committed but no majority");
    lab.finish().await;
}

// Proves a follower that missed entries while cut off catches up when it rejoins.
#[tokio::test(start_paused = true)]
async fn fail_agree_3b() {
    let lab = Lab::new("fail_agree_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(101), n, false).await;
    // Disconnect one follower from the network.
    let leader = lab.check_one_leader().await;
    lab.disconnect((leader + 1) % n);
    // The leader and the remaining follower should be able to agree despite the disconnected follower.
    lab.one(int(102), n - 1, false).await;
    lab.one(int(103), n - 1, false).await;
    sleep(ELECTION_TIMEOUT).await;
    lab.one(int(104), n - 1, false).await;
    lab.one(int(105), n - 1, false).await;
    // Re-connect.
    lab.connect((leader + 1) % n);
    // The full set of servers should preserve previous agreements, and be able to agree on new commands.
    lab.one(int(106), n, true).await;
    sleep(ELECTION_TIMEOUT).await;
    lab.one(int(107), n, true).await;
    lab.finish().await;
}

// Proves nothing commits without a majority of five, and commits resume after healing.
#[tokio::test(start_paused = true)]
async fn fail_no_agree_3b() {
    let lab = Lab::new("fail_no_agree_3b", LabOptions::new(5)).await;
    let n = lab.n();
    lab.one(int(10), n, false).await;
    // 3 of 5 followers disconnect.
    let leader = lab.check_one_leader().await;
    lab.disconnect((leader + 1) % n);
    lab.disconnect((leader + 2) % n);
    lab.disconnect((leader + 3) % n);
    let (index, _) = lab
        .start_command(leader, int(20))
        .await
        .expect("leader rejected Start()");
    assert_eq!(index, 2, "expected index 2, got {index}");
    sleep(2 * ELECTION_TIMEOUT).await;
    let (count, _) = lab.n_committed(index);
    assert_eq!(count, 0, "{count} committed but no majority");
    // Repair.
    lab.connect((leader + 1) % n);
    lab.connect((leader + 2) % n);
    lab.connect((leader + 3) % n);
    // The disconnected majority may have chosen a leader from among their own ranks, forgetting index 2.
    let leader2 = lab.check_one_leader().await;
    let (index2, _) = lab
        .start_command(leader2, int(30))
        .await
        .expect("leader2 rejected Start()");
    assert!((2..=3).contains(&index2), "unexpected index {index2}");
    lab.one(int(1000), n, true).await;
    lab.finish().await;
}

// Proves five concurrent proposals in one term all commit.
#[tokio::test(start_paused = true)]
async fn concurrent_starts_3b() {
    let lab = Lab::new("concurrent_starts_3b", LabOptions::new(3)).await;
    let n = lab.n();
    let mut success = false;
    'attempts: for attempt in 0..5 {
        if attempt > 0 {
            // Give the solution some time to settle.
            sleep(Duration::from_secs(3)).await;
        }
        let leader = lab.check_one_leader().await;
        let Some((_, term)) = lab.start_command(leader, int(1)).await else {
            // Leader moved on really quickly.
            continue;
        };
        let starts = (0..5u64).map(|i| {
            let cluster: Cluster = (*lab).clone();
            async move {
                match cluster.start_command(leader, int(100 + i)).await {
                    Some((index, t)) if t == term => Some(index),
                    _ => None,
                }
            }
        });
        let indexes: Vec<u64> = join_all(starts).await.into_iter().flatten().collect();
        for server in 0..n {
            if let Some((t, _)) = lab.state(server) {
                if t != term {
                    // Term changed: can't expect low RPC counts.
                    continue 'attempts;
                }
            }
        }
        let mut commands = Vec::new();
        for index in indexes {
            match lab.wait(index, n, Some(term)).await {
                Some(Some(value)) => commands.push(value),
                Some(None) => panic!("value at index {index} is a no-op"),
                // Peers have moved on to later terms, so we can't expect all starts to have succeeded.
                None => continue 'attempts,
            }
        }
        for i in 0..5u64 {
            assert!(
                commands.contains(&int(100 + i)),
                "command {} missing in {commands:?}",
                100 + i
            );
        }
        success = true;
        break;
    }
    assert!(success, "term changed too often");
    lab.finish().await;
}

// Proves a cut-off old leader with uncommitted entries rejoins and converges on the majority's log.
#[tokio::test(start_paused = true)]
async fn rejoin_3b() {
    let lab = Lab::new("rejoin_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(101), n, true).await;
    // The leader network failure.
    let leader1 = lab.check_one_leader().await;
    lab.disconnect(leader1);
    // Make the old leader try to agree on some entries.
    lab.start_command(leader1, int(102)).await;
    lab.start_command(leader1, int(103)).await;
    lab.start_command(leader1, int(104)).await;
    // The new leader commits, also for index 2.
    lab.one(int(103), 2, true).await;
    // The new leader's network failure.
    let leader2 = lab.check_one_leader().await;
    lab.disconnect(leader2);
    // The old leader connected again.
    lab.connect(leader1);
    lab.one(int(104), 2, true).await;
    // All together now.
    lab.connect(leader2);
    lab.one(int(105), n, true).await;
    lab.finish().await;
}

// Proves a leader quickly backs up followers' divergent logs after 50-entry bursts across partitions.
#[tokio::test(start_paused = true)]
async fn backup_3b() {
    let lab = Lab::new("backup_3b", LabOptions::new(5)).await;
    let n = lab.n();
    lab.one(int(lab.rand()), n, true).await;
    // Put the leader and one follower in a partition.
    let leader1 = lab.check_one_leader().await;
    lab.disconnect((leader1 + 2) % n);
    lab.disconnect((leader1 + 3) % n);
    lab.disconnect((leader1 + 4) % n);
    // Submit lots of commands that won't commit.
    for _ in 0..50 {
        lab.start_command(leader1, int(lab.rand())).await;
    }
    sleep(ELECTION_TIMEOUT / 2).await;
    lab.disconnect(leader1);
    lab.disconnect((leader1 + 1) % n);
    // Allow the other partition to recover.
    lab.connect((leader1 + 2) % n);
    lab.connect((leader1 + 3) % n);
    lab.connect((leader1 + 4) % n);
    // Lots of successful commands to the new group.
    for _ in 0..50 {
        lab.one(int(lab.rand()), 3, true).await;
    }
    // Now another partitioned leader and one follower.
    let leader2 = lab.check_one_leader().await;
    let mut other = (leader1 + 2) % n;
    if leader2 == other {
        other = (leader2 + 1) % n;
    }
    lab.disconnect(other);
    // Lots more commands that won't commit.
    for _ in 0..50 {
        lab.start_command(leader2, int(lab.rand())).await;
    }
    sleep(ELECTION_TIMEOUT / 2).await;
    // Bring the original leader back to life.
    for server in 0..n {
        lab.disconnect(server);
    }
    lab.connect(leader1);
    lab.connect((leader1 + 1) % n);
    lab.connect(other);
    // Lots of successful commands to the new group.
    for _ in 0..50 {
        lab.one(int(lab.rand()), 3, true).await;
    }
    // Now everyone.
    for server in 0..n {
        lab.connect(server);
    }
    lab.one(int(lab.rand()), n, true).await;
    lab.finish().await;
}

// Proves the RPC counts: an election takes 1–30, 10 proposals ≤ 42, one idle second ≤ 60.
#[tokio::test(start_paused = true)]
async fn count_3b() {
    let lab = Lab::new("count_3b", LabOptions::new(3)).await;
    let n = lab.n();
    lab.check_one_leader().await;
    let total1 = lab.rpc_total();
    assert!(
        (1..=30).contains(&total1),
        "too many or few RPCs ({total1}) to elect initial leader"
    );
    let mut success = false;
    let mut total2 = 0;
    let mut agreement = 0;
    'attempts: for attempt in 0..5 {
        if attempt > 0 {
            // Give the solution some time to settle.
            sleep(Duration::from_secs(3)).await;
        }
        let leader = lab.check_one_leader().await;
        let total1 = lab.rpc_total();
        let iters = 10u64;
        let Some((start_index, term)) = lab.start_command(leader, int(1)).await else {
            // Leader moved on really quickly.
            continue;
        };
        let commands: Vec<u64> = (1..iters + 2).map(|_| lab.rand()).collect();
        let answers = lab
            .start_commands_back_to_back(leader, commands.iter().map(|&x| int(x)).collect())
            .await;
        for (i, answer) in (1..).zip(answers) {
            let Some((index, t)) = answer else {
                // No longer the leader, so the term has changed.
                continue 'attempts;
            };
            if t != term {
                // Term changed while starting.
                continue 'attempts;
            }
            assert_eq!(start_index + i, index, "Start() failed");
        }
        for i in 1..iters + 1 {
            match lab.wait(start_index + i, n, Some(term)).await {
                Some(value) => assert_eq!(
                    value,
                    Some(int(commands[(i - 1) as usize])),
                    "wrong value committed for index {}",
                    start_index + i
                ),
                // The term changed: try again.
                None => continue 'attempts,
            }
        }
        for server in 0..n {
            if let Some((t, _)) = lab.state(server) {
                if t != term {
                    // Term changed: can't expect low RPC counts. Need to keep going to update total2.
                    continue 'attempts;
                }
            }
        }
        total2 = lab.rpc_total();
        let used = total2 - total1;
        agreement = used;
        assert!(
            used <= (iters + 1 + 3) * 3,
            "too many RPCs ({used}) for {iters} entries"
        );
        success = true;
        break;
    }
    assert!(success, "term changed too often");
    sleep(ELECTION_TIMEOUT).await;
    let total3 = lab.rpc_total();
    eprintln!(
        "count_3b: election {total1} RPCs, 11 agreements {agreement} RPCs, 1 s idle {} RPCs",
        total3 - total2
    );
    assert!(
        total3 - total2 <= 3 * 20,
        "too many RPCs ({}) for 1 second of idleness",
        total3 - total2
    );
    lab.finish().await;
}

// ----- 3C: persistence ------------------------------------------------------

// Proves committed entries survive restarts of all servers, of the leader and of a follower.
#[tokio::test(start_paused = true)]
async fn persist1_3c() {
    let mut lab = Lab::new("persist1_3c", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(11), n, true).await;
    // Crash and re-start all.
    for server in 0..n {
        lab.start(server).await;
    }
    for server in 0..n {
        lab.disconnect(server);
        lab.connect(server);
    }
    lab.one(int(12), n, true).await;
    let leader1 = lab.check_one_leader().await;
    lab.disconnect(leader1);
    lab.start(leader1).await;
    lab.connect(leader1);
    lab.one(int(13), n, true).await;
    let leader2 = lab.check_one_leader().await;
    lab.disconnect(leader2);
    lab.one(int(14), n - 1, true).await;
    lab.start(leader2).await;
    lab.connect(leader2);
    // Wait for leader2 to join before killing i3.
    lab.wait(4, n, None).await;
    let i3 = (lab.check_one_leader().await + 1) % n;
    lab.disconnect(i3);
    lab.one(int(15), n - 1, true).await;
    lab.start(i3).await;
    lab.connect(i3);
    lab.one(int(16), n, true).await;
    lab.finish().await;
}

// Proves committed entries survive rounds of crashing and restarting followers and leaders of five.
#[tokio::test(start_paused = true)]
async fn persist2_3c() {
    let mut lab = Lab::new("persist2_3c", LabOptions::new(5)).await;
    let n = lab.n();
    let mut index = 1;
    for _ in 0..5 {
        lab.one(int(10 + index), n, true).await;
        index += 1;
        let leader1 = lab.check_one_leader().await;
        lab.disconnect((leader1 + 1) % n);
        lab.disconnect((leader1 + 2) % n);
        lab.one(int(10 + index), n - 2, true).await;
        index += 1;
        lab.disconnect(leader1);
        lab.disconnect((leader1 + 3) % n);
        lab.disconnect((leader1 + 4) % n);
        lab.start((leader1 + 1) % n).await;
        lab.start((leader1 + 2) % n).await;
        lab.connect((leader1 + 1) % n);
        lab.connect((leader1 + 2) % n);
        sleep(ELECTION_TIMEOUT).await;
        lab.start((leader1 + 3) % n).await;
        lab.connect((leader1 + 3) % n);
        lab.one(int(10 + index), n - 2, true).await;
        index += 1;
        lab.connect((leader1 + 4) % n);
        lab.connect(leader1);
    }
    lab.one(int(1000), n, true).await;
    lab.finish().await;
}

// Proves a restarted majority built from a crashed leader and a lagging follower keeps every commit.
#[tokio::test(start_paused = true)]
async fn persist3_3c() {
    let mut lab = Lab::new("persist3_3c", LabOptions::new(3)).await;
    let n = lab.n();
    lab.one(int(101), 3, true).await;
    let leader = lab.check_one_leader().await;
    lab.disconnect((leader + 2) % n);
    lab.one(int(102), 2, true).await;
    lab.crash(leader).await;
    lab.crash((leader + 1) % n).await;
    lab.connect((leader + 2) % n);
    lab.start(leader).await;
    lab.connect(leader);
    lab.one(int(103), 2, true).await;
    lab.start((leader + 1) % n).await;
    lab.connect((leader + 1) % n);
    lab.one(int(104), n, true).await;
    lab.finish().await;
}

/// Restarts one random crashed server when fewer than 3 are up (Figure 8 helper).
async fn figure8_revive(lab: &mut Lab, up: &mut usize) {
    if *up < 3 {
        let server = lab.rand_below(lab.n() as u64) as usize;
        if !lab.is_live(server) {
            lab.start(server).await;
            lab.connect(server);
            *up += 1;
        }
    }
}

/// Sleeps like the reference's Figure 8 rounds: mostly under 13 ms, one time in ten up to half an election timeout.
async fn figure8_pause(lab: &Lab) {
    let ms = if lab.rand_below(1000) < 100 {
        lab.rand_below(ELECTION_TIMEOUT.as_millis() as u64 / 2)
    } else {
        lab.rand_below(13)
    };
    sleep(Duration::from_millis(ms)).await;
}

// Proves Figure 8 of the paper cannot happen: 1000 rounds crashing whichever server accepted a proposal.
#[tokio::test(start_paused = true)]
async fn figure8_3c() {
    let mut lab = Lab::new("figure8_3c", LabOptions::new(5)).await;
    let n = lab.n();
    lab.one(int(lab.rand()), 1, true).await;
    let mut up = n;
    for _ in 0..1000 {
        let mut leader = None;
        for server in 0..n {
            if lab.is_live(server) && lab.start_command(server, int(lab.rand())).await.is_some() {
                leader = Some(server);
            }
        }
        figure8_pause(&lab).await;
        if let Some(leader) = leader {
            lab.crash(leader).await;
            up -= 1;
        }
        figure8_revive(&mut lab, &mut up).await;
    }
    for server in 0..n {
        if !lab.is_live(server) {
            lab.start(server).await;
            lab.connect(server);
        }
    }
    lab.one(int(lab.rand()), n, true).await;
    lab.finish().await;
}

// Proves 50 rounds of concurrent proposals all commit on the unreliable network.
#[tokio::test(start_paused = true)]
async fn unreliable_agree_3c() {
    let lab = Lab::new("unreliable_agree_3c", unreliable(5)).await;
    let n = lab.n();
    let mut clients = Vec::new();
    for iteration in 1..50u64 {
        for j in 0..4u64 {
            let cluster: Cluster = (*lab).clone();
            clients.push(tokio::spawn(async move {
                cluster.one(int(100 * iteration + j), 1, true).await;
            }));
        }
        lab.one(int(iteration), 1, true).await;
    }
    lab.net().set_reliable(true);
    for client in clients {
        join(client).await;
    }
    lab.one(int(100), n, true).await;
    lab.finish().await;
}

// Proves Figure 8 safety on the unreliable network with disconnects and, from round 200, long reordering.
#[tokio::test(start_paused = true)]
async fn figure8_unreliable_3c() {
    let lab = Lab::new("figure8_unreliable_3c", unreliable(5)).await;
    let n = lab.n();
    lab.one(int(lab.rand_below(10_000)), 1, true).await;
    let mut up = n;
    for iteration in 0..1000 {
        if iteration == 200 {
            lab.net().set_long_reordering(true);
        }
        let mut leader = None;
        for server in 0..n {
            let accepted = lab
                .start_command(server, int(lab.rand_below(10_000)))
                .await
                .is_some();
            if accepted && lab.is_connected(server) {
                leader = Some(server);
            }
        }
        figure8_pause(&lab).await;
        if let Some(leader) = leader {
            if lab.rand_below(1000) < ELECTION_TIMEOUT.as_millis() as u64 / 2 {
                lab.disconnect(leader);
                up -= 1;
            }
        }
        if up < 3 {
            let server = lab.rand_below(n as u64) as usize;
            if !lab.is_connected(server) {
                lab.connect(server);
                up += 1;
            }
        }
    }
    for server in 0..n {
        if !lab.is_connected(server) {
            lab.connect(server);
        }
    }
    lab.one(int(lab.rand_below(10_000)), n, true).await;
    lab.finish().await;
}

/// Shortest virtual time of one churn client round.
const CLIENT_ROUND_MIN: Duration = Duration::from_millis(10);

/// A churn client: proposes random values to every live server and
/// returns the values it saw committed.
async fn churn_client(
    cluster: Cluster,
    me: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u64> {
    let mut values = Vec::new();
    while !*stop.borrow() {
        // The reference's network takes real time for every round trip; the
        // simulated reliable one takes none, so a value that commits at once
        // would let a client spin without virtual time passing. Each round
        // takes at least CLIENT_ROUND_MIN of virtual time.
        let round_start = tokio::time::Instant::now();
        let x = cluster.rand();
        let mut index = None;
        for server in 0..cluster.n() {
            if let Some((i, _)) = cluster.start_command(server, int(x)).await {
                index = Some(i);
            }
        }
        match index {
            Some(index) => {
                // Maybe leader will commit our value, maybe not. But don't wait forever.
                for pause in [10u64, 20, 50, 100, 200] {
                    let (count, value) = cluster.n_committed(index);
                    if count > 0 {
                        if value == Some(int(x)) {
                            values.push(x);
                        }
                        break;
                    }
                    sleep(Duration::from_millis(pause)).await;
                }
            }
            None => sleep(Duration::from_millis(79 + me * 17)).await,
        }
        tokio::time::sleep_until(round_start + CLIENT_ROUND_MIN).await;
    }
    values
}

/// The reference's churn: clients propose while servers are cut, crashed
/// and restarted for 20 rounds of 700 ms; afterwards all commit the same log
/// and every value a client saw committed is in it.
async fn churn(name: &'static str, options: LabOptions) {
    let mut lab = Lab::new(name, options).await;
    let n = lab.n();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let clients: Vec<_> = (0..3u64)
        .map(|me| tokio::spawn(churn_client((*lab).clone(), me, stopped.clone())))
        .collect();
    for _ in 0..20 {
        if lab.rand_below(1000) < 200 {
            let server = lab.rand_below(n as u64) as usize;
            lab.disconnect(server);
        }
        if lab.rand_below(1000) < 500 {
            let server = lab.rand_below(n as u64) as usize;
            if !lab.is_live(server) {
                lab.start(server).await;
            }
            lab.connect(server);
        }
        if lab.rand_below(1000) < 200 {
            let server = lab.rand_below(n as u64) as usize;
            if lab.is_live(server) {
                lab.crash(server).await;
            }
        }
        // Make crash/restart cycles long enough that the servers' state is
        // written to storage, and short enough that each crash/restart cycle
        // exercises the cases where not everything was written.
        sleep(ELECTION_TIMEOUT * 7 / 10).await;
    }
    sleep(ELECTION_TIMEOUT).await;
    lab.net().set_reliable(true);
    for server in 0..n {
        if !lab.is_live(server) {
            lab.start(server).await;
        }
        lab.connect(server);
    }
    stop.send(true).expect("clients listen");
    let mut values = Vec::new();
    for client in clients {
        values.extend(join(client).await);
    }
    sleep(ELECTION_TIMEOUT).await;
    let last_index = lab.one(int(lab.rand()), n, true).await;
    let mut really = Vec::new();
    for index in 1..=last_index {
        match lab.wait(index, n, None).await {
            Some(Some(bytes)) if bytes.len() == 8 => {
                really.push(u64::from_le_bytes(bytes[..].try_into().expect("8 bytes")));
            }
            Some(value) => panic!("unexpected value {value:?} at index {index}"),
            None => unreachable!("wait without a start term always returns a value"),
        }
    }
    for value in &values {
        assert!(
            really.contains(value),
            "didn't find a value ({value}) in the final log"
        );
    }
    assert!(!values.is_empty(), "the clients saw nothing committed");
    lab.finish().await;
}

// Proves churn on the reliable network loses no value a client saw committed.
#[tokio::test(start_paused = true)]
async fn reliable_churn_3c() {
    churn("reliable_churn_3c", LabOptions::new(5)).await;
}

// Proves churn on the unreliable network loses no value a client saw committed.
#[tokio::test(start_paused = true)]
async fn unreliable_churn_3c() {
    churn("unreliable_churn_3c", unreliable(5)).await;
}

// ----- 3D: snapshots --------------------------------------------------------

/// The reference's `snapcommon`: 30 rounds of a victim (cut off or crashed)
/// plus 5–14 proposals, the service snapshotting every 10 entries; the
/// persisted Raft state stays ≤ 2000 bytes after every round.
async fn snapshot_common(name: &'static str, disconnect: bool, reliable: bool, crash: bool) {
    let options = LabOptions {
        unreliable: !reliable,
        snapshots: true,
        ..LabOptions::new(3)
    };
    let mut lab = Lab::new(name, options).await;
    let n = lab.n();
    lab.one(int(lab.rand()), n, true).await;
    let mut leader1 = lab.check_one_leader().await;
    let mut size_max = 0;
    for round in 0..30 {
        let mut victim = (leader1 + 1) % n;
        let mut sender = leader1;
        if round % 3 == 1 {
            sender = (leader1 + 1) % n;
            victim = leader1;
        }
        if disconnect {
            lab.disconnect(victim);
            lab.one(int(lab.rand()), n - 1, true).await;
        }
        if crash {
            lab.crash(victim).await;
            lab.one(int(lab.rand()), n - 1, true).await;
        }
        // Perhaps send enough to get a snapshot.
        let count = SNAPSHOT_INTERVAL / 2 + lab.rand_below(SNAPSHOT_INTERVAL);
        for _ in 0..count {
            lab.start_command(sender, int(lab.rand())).await;
        }
        // Let the applier threads catch up with the proposals.
        if !disconnect && !crash {
            // Make sure all followers have caught up, so that an
            // InstallSnapshot is not required for the basic scenario.
            lab.one(int(lab.rand()), n, true).await;
        } else {
            lab.one(int(lab.rand()), n - 1, true).await;
        }
        let size = lab.raft_state_bytes_max();
        size_max = size_max.max(size);
        assert!(
            size <= RAFT_STATE_BYTES_MAX,
            "log size too large: {size} bytes after round {round}"
        );
        if disconnect {
            // Reconnect a follower, who may need a snapshot.
            lab.connect(victim);
            lab.one(int(lab.rand()), n, true).await;
            leader1 = lab.check_one_leader().await;
        }
        if crash {
            lab.start(victim).await;
            lab.connect(victim);
            lab.one(int(lab.rand()), n, true).await;
            leader1 = lab.check_one_leader().await;
        }
    }
    eprintln!("{name}: largest persisted raft state {size_max} bytes");
    lab.finish().await;
}

// Proves the service's snapshots compact the log (≤ 2000 bytes) with every follower up.
#[tokio::test(start_paused = true)]
async fn snapshot_basic_3d() {
    snapshot_common("snapshot_basic_3d", false, true, false).await;
}

// Proves a reconnected follower catches up through InstallSnapshot.
#[tokio::test(start_paused = true)]
async fn snapshot_install_3d() {
    snapshot_common("snapshot_install_3d", true, true, false).await;
}

// Proves InstallSnapshot catch-up on the unreliable network.
#[tokio::test(start_paused = true)]
async fn snapshot_install_unreliable_3d() {
    snapshot_common("snapshot_install_unreliable_3d", true, false, false).await;
}

// Proves a crashed follower restarts from its snapshot and catches up.
#[tokio::test(start_paused = true)]
async fn snapshot_install_crash_3d() {
    snapshot_common("snapshot_install_crash_3d", false, true, true).await;
}

// Proves crash-restart catch-up with snapshots on the unreliable network.
#[tokio::test(start_paused = true)]
async fn snapshot_install_uncrash_3d() {
    snapshot_common("snapshot_install_uncrash_3d", false, false, true).await;
}

// Proves restarting every server repeatedly keeps indexes increasing, state restored from snapshots.
#[tokio::test(start_paused = true)]
async fn snapshot_all_crash_3d() {
    let options = LabOptions {
        snapshots: true,
        ..LabOptions::new(3)
    };
    let mut lab = Lab::new("snapshot_all_crash_3d", options).await;
    let n = lab.n();
    lab.one(int(lab.rand()), n, true).await;
    for _ in 0..5 {
        // Perhaps enough to get a snapshot.
        let count = SNAPSHOT_INTERVAL / 2 + lab.rand_below(SNAPSHOT_INTERVAL);
        for _ in 0..count {
            lab.one(int(lab.rand()), n, true).await;
        }
        let index1 = lab.one(int(lab.rand()), n, true).await;
        // Crash all.
        for server in 0..n {
            lab.crash(server).await;
        }
        // Revive all.
        for server in 0..n {
            lab.start(server).await;
            lab.connect(server);
        }
        let index2 = lab.one(int(lab.rand()), n, true).await;
        assert!(index2 > index1, "index decreased from {index1} to {index2}");
    }
    lab.finish().await;
}

// Proves a restart from a snapshot, then a write, then another restart keeps the state.
#[tokio::test(start_paused = true)]
async fn snapshot_init_3d() {
    let options = LabOptions {
        snapshots: true,
        ..LabOptions::new(3)
    };
    let mut lab = Lab::new("snapshot_init_3d", options).await;
    let n = lab.n();
    lab.one(int(lab.rand()), n, true).await;
    // Enough ops to make a snapshot.
    for _ in 0..=SNAPSHOT_INTERVAL {
        lab.one(int(lab.rand()), n, true).await;
    }
    for _ in 0..2 {
        // Crash all, then revive all.
        for server in 0..n {
            lab.crash(server).await;
        }
        for server in 0..n {
            lab.start(server).await;
            lab.connect(server);
        }
        // A single op, to get something written back to storage (and, in
        // the second round, to trigger a potential bug after the restart).
        lab.one(int(lab.rand()), n, true).await;
    }
    lab.finish().await;
}

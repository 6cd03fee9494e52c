//! Unit tests of the RSM layer on in-memory stores and the simulated
//! network (paused clock). The Lab 4 RSM scenarios live in `tests/`.

use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::net::sim::{SimConfig, SimNetwork};
use crate::storage::{MemDisk, MemStore, RaftLogStorage};

/// A counter: `Add(n)` returns the new total; the snapshot is the total.
#[derive(Default)]
struct Counter {
    total: u64,
    applied: Vec<u64>,
}

impl StateMachine for Counter {
    type Command = u64;
    type Output = u64;

    fn encode_command(command: &u64) -> Bytes {
        Bytes::copy_from_slice(&command.to_le_bytes())
    }

    fn decode_command(data: &[u8]) -> Result<u64, CodecError> {
        let bytes: [u8; 8] = data
            .try_into()
            .map_err(|_| CodecError::new("command", format!("{} bytes, not 8", data.len())))?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn apply(&mut self, index: u64, command: u64) -> u64 {
        self.applied.push(index);
        self.total += command;
        self.total
    }

    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.total.to_le_bytes())
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.total = Self::decode_command(data)?;
        self.applied.clear();
        Ok(())
    }
}

fn config(id: u64, maxraftstate_bytes: Option<u64>) -> RsmConfig {
    let mut config = RsmConfig {
        maxraftstate_bytes,
        ..RsmConfig::default()
    };
    config.node.rng_seed = id;
    config
}

async fn leader_of(replicas: &[Rsm<Counter>]) -> usize {
    loop {
        if let Some(at) = replicas.iter().position(|r| r.node().state().1) {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// Sequential submissions return the running totals in order, and a
// follower's submission is refused with NotLeader and a hint once known.
#[tokio::test(start_paused = true)]
async fn submit_returns_outputs_in_order_and_followers_refuse() {
    let net = SimNetwork::new(SimConfig::new(7));
    let voters = [1, 2, 3];
    let replicas: Vec<Rsm<Counter>> = voters
        .iter()
        .map(|&id| {
            let store = MemStore::open(&MemDisk::new()).unwrap();
            Rsm::start(
                id,
                &voters,
                config(id, None),
                store,
                net.restart(id),
                Counter::default(),
            )
            .unwrap()
        })
        .collect();
    let leader = leader_of(&replicas).await;
    for i in 1..=10u64 {
        assert_eq!(replicas[leader].submit(&1).await, Ok(i));
    }
    let follower = (leader + 1) % 3;
    match replicas[follower].submit(&1).await {
        Err(SubmitError::NotLeader { leader_hint }) => {
            assert_eq!(leader_hint, Some(voters[leader]));
        }
        other => panic!("a follower accepted a submission: {other:?}"),
    }
    assert_eq!(replicas[leader].read(|c| c.total).await, Ok(10));
    for replica in &replicas {
        replica.shutdown().await;
    }
}

// A replica restarted on its store replays snapshot + log to the same total,
// and with a small maxraftstate the persisted log stays bounded.
#[tokio::test(start_paused = true)]
async fn restart_replays_and_snapshots_bound_the_log() {
    let net = SimNetwork::new(SimConfig::new(9));
    let disk = MemDisk::new();
    let store = MemStore::open(&disk).unwrap();
    let rsm = Rsm::start(
        1,
        &[1],
        config(1, Some(1000)),
        store.clone(),
        net.restart(1),
        Counter::default(),
    )
    .unwrap();
    leader_of(std::slice::from_ref(&rsm)).await;
    for i in 1..=200u64 {
        assert_eq!(rsm.submit(&2).await, Ok(2 * i));
    }
    let state_bytes = store.raft_state_bytes(0).unwrap();
    assert!(state_bytes <= 2000, "raft state of {state_bytes} bytes");
    assert!(store.snapshot(0).unwrap().0.last_included_index > 0);
    rsm.shutdown().await;
    assert_eq!(rsm.submit(&1).await, Err(SubmitError::Stopped));
    drop(store);

    net.crash(1);
    let store = MemStore::open(&disk.fork()).unwrap();
    let rsm = Rsm::start(
        1,
        &[1],
        config(1, Some(1000)),
        store,
        net.restart(1),
        Counter::default(),
    )
    .unwrap();
    leader_of(std::slice::from_ref(&rsm)).await;
    assert_eq!(rsm.read(|c| c.total).await, Ok(400));
    assert_eq!(rsm.submit(&1).await, Ok(401));
    rsm.shutdown().await;
}

// Shutdown with submissions in flight ends every one of them, with Stopped
// or a real outcome, and none hangs.
#[tokio::test(start_paused = true)]
async fn shutdown_ends_inflight_submissions() {
    let net = SimNetwork::new(SimConfig::new(11));
    let voters = [1, 2, 3];
    let replicas: Vec<Rsm<Counter>> = voters
        .iter()
        .map(|&id| {
            let store = MemStore::open(&MemDisk::new()).unwrap();
            Rsm::start(
                id,
                &voters,
                config(id, None),
                store,
                net.restart(id),
                Counter::default(),
            )
            .unwrap()
        })
        .collect();
    let leader = leader_of(&replicas).await;
    // Cut the leader off so nothing commits, then submit and shut down.
    net.disconnect(voters[leader]);
    let submits: Vec<_> = (0..20)
        .map(|_| {
            let rsm = replicas[leader].clone();
            tokio::spawn(async move { rsm.submit(&1).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    replicas[leader].shutdown().await;
    for submit in submits {
        let outcome = submit.await.unwrap();
        assert!(
            matches!(
                outcome,
                Err(SubmitError::Stopped | SubmitError::LeadershipLost { .. })
            ),
            "{outcome:?}"
        );
    }
    for replica in &replicas {
        replica.shutdown().await;
    }
}

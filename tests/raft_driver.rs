//! The node driver's own guarantees, beyond the Lab 3 scenarios: shutdown
//! (no further writes, storage released, channel closed), bad network input,
//! backpressure from a slow service, group commit, read index, leadership
//! transfer, restart from a snapshot, fail-stop on storage errors, a
//! multi-thread runtime with sled, acknowledgements held until the
//! storage thread's flush finishes, and a deposed leader's flushes kept in
//! order when it starts flushing inline as a follower. In-memory stores and the simulated
//! network on tokio's paused clock unless said otherwise.

use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use raftkv::NodeId;
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::net::{Endpoint, Message as _, MessageRole};
use raftkv::raft::{
    Apply, Entry, EntryKind, Message, MessageBody, NodeConfig, NodeError, ProposeError,
    RaftEnvelope, RaftNode, ReadIndexError, Role, StopReason,
};
use raftkv::storage::{Limits, MemDisk, MemStore, RaftLogStorage, Store, StoreConfig};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// A cluster of in-memory nodes with ids 1..=n.
struct Cluster {
    net: SimNetwork,
    voters: Vec<NodeId>,
    disks: Vec<MemDisk>,
    nodes: Vec<Option<RaftNode>>,
    applies: Vec<Option<mpsc::Receiver<Apply>>>,
}

fn config(id: NodeId) -> NodeConfig {
    NodeConfig {
        rng_seed: 1000 + id,
        ..NodeConfig::default()
    }
}

impl Cluster {
    fn new(seed: u64, n: u64) -> Cluster {
        let net = SimNetwork::new(SimConfig::new(seed));
        let voters: Vec<NodeId> = (1..=n).collect();
        let mut cluster = Cluster {
            net,
            voters: voters.clone(),
            disks: voters.iter().map(|_| MemDisk::new()).collect(),
            nodes: voters.iter().map(|_| None).collect(),
            applies: voters.iter().map(|_| None).collect(),
        };
        for &id in &voters {
            cluster.start(id, config(id));
        }
        cluster
    }

    fn start(&mut self, id: NodeId, config: NodeConfig) {
        let slot = (id - 1) as usize;
        let store = MemStore::open(&self.disks[slot]).expect("opening the memory store");
        let endpoint = self.net.restart(id);
        let (node, applied) =
            RaftNode::start(id, &self.voters, config, store, endpoint).expect("starting a node");
        self.nodes[slot] = Some(node);
        self.applies[slot] = Some(applied);
    }

    fn node(&self, id: NodeId) -> &RaftNode {
        self.nodes[(id - 1) as usize].as_ref().expect("node is up")
    }

    async fn leader(&self) -> NodeId {
        for _ in 0..500 {
            let leaders: Vec<NodeId> = self
                .nodes
                .iter()
                .flatten()
                .filter(|node| node.state().1)
                .map(|node| node.id())
                .collect();
            if let [leader] = leaders[..] {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no single leader within 5 s");
    }

    /// Reads the apply channel of `id` until it has applied `index`; returns
    /// every item read.
    async fn applied_through(&mut self, id: NodeId, index: u64) -> Vec<Apply> {
        let receiver = self.applies[(id - 1) as usize]
            .as_mut()
            .expect("node is up");
        let mut items = Vec::new();
        let mut last = 0;
        while last < index {
            let item = timeout(Duration::from_secs(10), receiver.recv())
                .await
                .expect("applied within 10 s")
                .expect("apply channel open");
            last = match &item {
                Apply::Entries(entries) => entries.last().expect("non-empty batch").index,
                Apply::Snapshot { index, .. } => *index,
            };
            items.push(item);
        }
        items
    }

    async fn shutdown(&mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            node.shutdown().await;
        }
    }
}

fn entries_of(items: &[Apply]) -> Vec<(u64, Option<Bytes>)> {
    items
        .iter()
        .flat_map(|item| match item {
            Apply::Entries(entries) => entries
                .iter()
                .map(|e| (e.index, e.data.clone()))
                .collect::<Vec<_>>(),
            Apply::Snapshot { .. } => Vec::new(),
        })
        .collect()
}

fn command(i: u64) -> Bytes {
    Bytes::from(format!("command {i}"))
}

// Proves shutdown stops the task for good: storage released (reopens at once), no writes afterwards, channel closed, requests fail with Stopped.
#[tokio::test(start_paused = true)]
async fn shutdown_releases_storage_and_stops_everything() {
    let mut cluster = Cluster::new(1, 3);
    let leader = cluster.leader().await;
    let (index, _) = cluster.node(leader).propose(command(1)).await.unwrap();
    cluster.applied_through(leader, index).await;
    let node = cluster.node(leader).clone();
    node.shutdown().await;
    assert_eq!(node.status().stopped, Some(StopReason::Shutdown));
    // The driver dropped its store: the disk is free to reopen right away,
    // and stays exactly as it was while time passes.
    let slot = (leader - 1) as usize;
    let image = cluster.disks[slot].fork();
    let size = cluster.disks[slot].size_bytes();
    let reopened = MemStore::open(&cluster.disks[slot]).expect("storage released by shutdown");
    drop(reopened);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(cluster.disks[slot].size_bytes(), size);
    let store = MemStore::open(&image).unwrap();
    assert_eq!(store.last_index(0).unwrap(), index);
    // The apply channel closes once drained; requests fail.
    let receiver = cluster.applies[slot].as_mut().unwrap();
    while receiver.recv().await.is_some() {}
    assert_eq!(node.propose(command(2)).await, Err(NodeError::Stopped));
    assert_eq!(node.read_index().await, Err(NodeError::Stopped));
    assert_eq!(
        node.snapshot(1, Bytes::new()).await,
        Err(NodeError::Stopped)
    );
    // Idempotent.
    node.shutdown().await;
    cluster.shutdown().await;
}

// Proves garbage, foreign-group, forged and malformed messages are counted and dropped, and the cluster keeps committing.
#[tokio::test(start_paused = true)]
async fn bad_network_input_is_dropped_without_panic() {
    let net = SimNetwork::new(SimConfig::new(2));
    let voters = [1, 2, 3];
    let mut nodes = Vec::new();
    let mut applies = Vec::new();
    for id in [1, 2] {
        let store = MemStore::open(&MemDisk::new()).unwrap();
        let (node, applied) =
            RaftNode::start(id, &voters, config(id), store, net.add_node(id).unwrap()).unwrap();
        nodes.push(node);
        applies.push(applied);
    }
    // Voter 3 is an attacker speaking with a legitimate id.
    let attacker: Endpoint = net.add_node(3).unwrap();
    let leader = loop {
        if let Some(node) = nodes.iter().find(|n| n.state().1) {
            break node.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let target = leader.id();
    let term = leader.state().0;
    let before = leader.status().metrics.messages_rejected;
    let envelope = |group, message: Message| RaftEnvelope { group, message };
    let heartbeat = |from, to| Message {
        from,
        to,
        term,
        body: MessageBody::Heartbeat {
            leader_commit: 0,
            read_round: 0,
        },
    };
    // Undecodable bytes: dropped by the inbox (not even counted as received).
    attacker
        .transport()
        .send(
            target,
            RaftEnvelope::KIND,
            Bytes::from_static(b"\xff\xff\xff garbage"),
            MessageRole::Request,
        )
        .unwrap();
    // Another group.
    attacker
        .send(target, &envelope(7, heartbeat(3, target)))
        .unwrap();
    // A forged sender (claims to be the other node).
    let other = 3 - target;
    attacker
        .send(target, &envelope(0, heartbeat(other, target)))
        .unwrap();
    // Addressed to someone else.
    attacker
        .send(target, &envelope(0, heartbeat(3, other)))
        .unwrap();
    // Entries that are not contiguous.
    let entry = |index| Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from_static(b"x"),
    };
    let malformed = Message {
        from: 3,
        to: target,
        term,
        body: MessageBody::Append {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![entry(1), entry(5)],
            leader_commit: 0,
        },
    };
    attacker.send(target, &envelope(0, malformed)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rejected = leader.status().metrics.messages_rejected - before;
    assert_eq!(rejected, 4, "four decodable bad messages refused");
    // Still leading and committing.
    assert!(leader.state().1);
    let (index, _) = leader.propose(command(1)).await.unwrap();
    let receiver = &mut applies[(target - 1) as usize];
    let item = timeout(Duration::from_secs(5), receiver.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entries_of(&[item]), vec![(index, Some(command(1)))]);
    for node in nodes {
        node.shutdown().await;
    }
}

// Proves a full apply channel pauses ticks, messages and proposals but still serves snapshots, and everything resumes in order once the service reads.
#[tokio::test(start_paused = true)]
async fn full_apply_channel_pauses_the_driver() {
    let store = MemStore::open(&MemDisk::new()).unwrap();
    let net = SimNetwork::new(SimConfig::new(3));
    let config = NodeConfig {
        apply_channel_items_max: 1,
        ..config(1)
    };
    let (node, mut applied) =
        RaftNode::start(1, &[1], config, store, net.add_node(1).unwrap()).unwrap();
    node.subscribe()
        .wait_for(|s| s.role == Role::Leader)
        .await
        .unwrap();
    // Entry 1 fills the channel, entry 2 waits in the driver: paused.
    node.propose(command(1)).await.unwrap();
    node.propose(command(2)).await.unwrap();
    node.subscribe()
        .wait_for(|s| s.applied_index == 2)
        .await
        .unwrap();
    let ticks = node.status().metrics.ticks;
    let third = tokio::spawn({
        let node = node.clone();
        async move { node.propose(command(3)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!third.is_finished(), "a paused driver took a proposal");
    assert_eq!(node.status().metrics.ticks, ticks, "a paused driver ticked");
    // Control requests are served while paused: a service may snapshot from its apply loop.
    node.snapshot(1, Bytes::from_static(b"state at 1"))
        .await
        .unwrap();
    // Reading resumes the driver.
    let mut items = vec![applied.recv().await.unwrap()];
    let (index, _) = third.await.unwrap().unwrap();
    assert_eq!(index, 3);
    while entries_of(&items).len() < 3 {
        items.push(applied.recv().await.unwrap());
    }
    assert_eq!(
        entries_of(&items),
        vec![
            (1, Some(command(1))),
            (2, Some(command(2))),
            (3, Some(command(3)))
        ]
    );
    assert!(node.status().metrics.ticks > ticks);
    assert_eq!(node.status().snapshot_index, 1);
    node.shutdown().await;
}

// Proves group commit: 200 proposals queued together cost the leader one flush and one append per follower, and apply in order everywhere.
#[tokio::test(start_paused = true)]
async fn queued_proposals_share_one_flush() {
    let mut cluster = Cluster::new(4, 3);
    let leader = cluster.leader().await;
    let node = cluster.node(leader).clone();
    let before = node.status().metrics;
    // Queue all 200, in order, before the driver runs: one poll each
    // (unconstrained: tokio's cooperative budget would otherwise refuse
    // the channel after 128 operations in one poll of the test).
    let mut pending = Vec::new();
    for i in 0..200 {
        let mut proposal = Box::pin(tokio::task::unconstrained(node.propose(command(i))));
        assert!(futures::poll!(proposal.as_mut()).is_pending());
        pending.push(proposal);
    }
    let answers: Vec<(u64, u64)> = join_all(pending)
        .await
        .into_iter()
        .map(|a| a.unwrap())
        .collect();
    let first = answers[0].0;
    for (i, (index, _)) in answers.iter().enumerate() {
        assert_eq!(*index, first + i as u64, "proposals keep their order");
    }
    let last = answers[199].0;
    let expected: Vec<_> = (0..200).map(|i| (first + i, Some(command(i)))).collect();
    for id in 1..=3 {
        let items = cluster.applied_through(id, last).await;
        let applied: Vec<_> = entries_of(&items)
            .into_iter()
            .filter(|(index, _)| *index >= first)
            .collect();
        assert_eq!(
            applied, expected,
            "node {id} applied the proposals in order"
        );
    }
    let after = node.status().metrics;
    assert_eq!(after.entries_persisted - before.entries_persisted, 200);
    assert_eq!(after.flushes - before.flushes, 1, "one flush for the batch");
    assert_eq!(
        after.append_messages_sent - before.append_messages_sent,
        2,
        "one append per follower"
    );
    assert_eq!(after.append_entries_sent - before.append_entries_sent, 400);
    cluster.shutdown().await;
}

// Proves read_index answers on the leader with an index covering its commits, redirects on a follower, and reports lost leadership.
#[tokio::test(start_paused = true)]
async fn read_index_on_leader_follower_and_lost_leader() {
    let mut cluster = Cluster::new(5, 3);
    let leader = cluster.leader().await;
    let (index, _) = cluster.node(leader).propose(command(1)).await.unwrap();
    cluster.applied_through(leader, index).await;
    let read = cluster.node(leader).read_index().await.unwrap();
    assert!(read >= index, "read index {read} below committed {index}");
    let follower = (leader % 3) + 1;
    let error = cluster.node(follower).read_index().await.unwrap_err();
    assert_eq!(
        error,
        NodeError::ReadIndex(ReadIndexError::NotLeader {
            leader_hint: Some(leader)
        })
    );
    assert_eq!(error.not_leader(), Some(Some(leader)));
    // Cut the leader off: a read it accepts can never be confirmed; it
    // fails once check-quorum makes the leader step down.
    cluster.net.disconnect(leader);
    let pending = cluster.node(leader).read_index();
    let error = timeout(Duration::from_secs(5), pending)
        .await
        .expect("answered within 5 s")
        .unwrap_err();
    assert!(error.not_leader().is_some(), "unexpected {error:?}");
    cluster.shutdown().await;
}

// Proves transfer_leader hands leadership to the chosen follower, and the old leader refuses proposals with a hint.
#[tokio::test(start_paused = true)]
async fn transfer_leader_moves_leadership() {
    let mut cluster = Cluster::new(6, 3);
    let leader = cluster.leader().await;
    let target = (leader % 3) + 1;
    cluster.node(leader).transfer_leader(target).await.unwrap();
    timeout(
        Duration::from_secs(5),
        cluster
            .node(target)
            .subscribe()
            .wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("transfer within 5 s")
    .unwrap();
    cluster
        .node(leader)
        .subscribe()
        .wait_for(|s| s.leader == Some(target))
        .await
        .unwrap();
    let error = cluster.node(leader).propose(command(1)).await.unwrap_err();
    assert_eq!(
        error,
        NodeError::Propose(ProposeError::NotLeader {
            leader_hint: Some(target)
        })
    );
    cluster.shutdown().await;
}

// Proves a restarted node hands its persisted snapshot to the service first, then re-applies the committed entries after it.
#[tokio::test(start_paused = true)]
async fn restart_delivers_snapshot_then_entries() {
    let mut cluster = Cluster::new(7, 3);
    let leader = cluster.leader().await;
    let mut last = 0;
    for i in 1..=20 {
        last = cluster.node(leader).propose(command(i)).await.unwrap().0;
    }
    for id in 1..=3 {
        cluster.applied_through(id, last).await;
        cluster
            .node(id)
            .snapshot(10, Bytes::from_static(b"state through 10"))
            .await
            .unwrap();
    }
    // Wait until every node has made the snapshot durable, then crash all
    // (a crash keeps exactly what was committed to the disk).
    for id in 1..=3 {
        let store = cluster.node(id).clone();
        store
            .subscribe()
            .wait_for(|s| s.snapshot_index == 10)
            .await
            .unwrap();
    }
    cluster.shutdown().await;
    for slot in 0..3 {
        cluster.disks[slot] = cluster.disks[slot].fork();
    }
    for id in 1..=3 {
        cluster.start(id, config(id));
    }
    // Entries 11..=20 are committed, but a new leader learns that only by
    // committing an entry of its own term: a read-index request makes it
    // append a no-op, which every node then applies as `data: None`.
    let leader = cluster.leader().await;
    let read = cluster.node(leader).read_index().await.unwrap();
    assert_eq!(read, 21, "the no-op follows the 20 entries");
    for id in 1..=3 {
        let items = cluster.applied_through(id, read).await;
        assert_eq!(
            items[0],
            Apply::Snapshot {
                index: 10,
                term: items_term(&items),
                data: Bytes::from_static(b"state through 10"),
            },
            "node {id} starts from its snapshot"
        );
        let mut expected: Vec<_> = (11..=20).map(|i| (i, Some(command(i)))).collect();
        expected.push((21, None));
        assert_eq!(
            entries_of(&items[1..]),
            expected,
            "node {id} re-applies after the snapshot, then the no-op"
        );
    }
    cluster.shutdown().await;
}

// Proves `Metrics::snapshots_installed` counts a leader's snapshot installed by a lagging follower, once, and neither a node's own snapshots nor the one a restart starts from.
#[tokio::test(start_paused = true)]
async fn snapshots_installed_counts_only_leader_snapshots() {
    let mut cluster = Cluster::new(17, 3);
    let leader = cluster.leader().await;
    let lagging = cluster
        .voters
        .iter()
        .copied()
        .find(|&id| id != leader)
        .unwrap();
    cluster.net.disconnect(lagging);
    let mut last = 0;
    for i in 1..=20 {
        last = cluster.node(leader).propose(command(i)).await.unwrap().0;
    }
    for id in cluster.voters.clone() {
        if id != lagging {
            cluster.applied_through(id, last).await;
            cluster
                .node(id)
                .snapshot(last, Bytes::from_static(b"state through 20"))
                .await
                .unwrap();
        }
    }
    cluster.net.connect(lagging);
    let items = cluster.applied_through(lagging, last).await;
    assert!(
        matches!(items[0], Apply::Snapshot { index: 20, .. }),
        "the lagging follower catches up from the leader's snapshot: {items:?}"
    );
    for id in cluster.voters.clone() {
        let installed = cluster.node(id).status().metrics.snapshots_installed;
        let expected = u64::from(id == lagging);
        assert_eq!(installed, expected, "node {id}");
    }
    // A restart hands the persisted snapshot to the service: not an install.
    cluster.shutdown().await;
    for slot in 0..3 {
        cluster.disks[slot] = cluster.disks[slot].fork();
    }
    for id in 1..=3 {
        cluster.start(id, config(id));
    }
    for id in 1..=3 {
        let items = cluster.applied_through(id, 20).await;
        assert!(matches!(items[0], Apply::Snapshot { index: 20, .. }));
        assert_eq!(cluster.node(id).status().metrics.snapshots_installed, 0);
    }
    cluster.shutdown().await;
}

fn items_term(items: &[Apply]) -> u64 {
    match &items[0] {
        Apply::Snapshot { term, .. } => *term,
        Apply::Entries(_) => 0,
    }
}

// Proves a failing storage commit stops the node (fail-stop) with StorageFailed instead of panicking or running on.
#[tokio::test(start_paused = true)]
async fn storage_failure_stops_the_node() {
    let limits = Limits {
        entry_bytes_max: 16,
        ..Limits::default()
    };
    let store = MemStore::open_with(&MemDisk::new(), limits).unwrap();
    let net = SimNetwork::new(SimConfig::new(8));
    let (node, mut applied) =
        RaftNode::start(1, &[1], config(1), store, net.add_node(1).unwrap()).unwrap();
    let mut status = node.subscribe();
    status.wait_for(|s| s.role == Role::Leader).await.unwrap();
    // The core accepts it, the store refuses to write it.
    node.propose(Bytes::from(vec![7u8; 100])).await.unwrap();
    let stopped = status
        .wait_for(|s| s.stopped.is_some())
        .await
        .unwrap()
        .stopped
        .clone();
    assert!(
        matches!(stopped, Some(StopReason::StorageFailed(_))),
        "stopped with {stopped:?}"
    );
    assert_eq!(
        applied.recv().await,
        None,
        "nothing applied, channel closed"
    );
    assert_eq!(node.propose(command(1)).await, Err(NodeError::Stopped));
    node.shutdown().await;
}

// Proves the node stops by itself when its transport goes away (a simulated crash).
#[tokio::test(start_paused = true)]
async fn transport_closing_stops_the_node() {
    let mut cluster = Cluster::new(9, 3);
    let leader = cluster.leader().await;
    cluster.net.crash(leader);
    let stopped = cluster
        .node(leader)
        .subscribe()
        .wait_for(|s| s.stopped.is_some())
        .await
        .unwrap()
        .stopped
        .clone();
    assert_eq!(stopped, Some(StopReason::TransportClosed));
    cluster.shutdown().await;
}

// Proves the driver works on a multi-thread runtime with sled stores (commits under block_in_place), in real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_runtime_with_sled_stores() {
    sled_cluster_commits_50_and_releases_storage(false).await;
}

// The same on a current-thread runtime with storage threads
// (`NodeConfig::storage_thread`, what `raftkv server` runs: a leader's
// commits on the thread, a follower's inline while none is in flight).
#[tokio::test]
async fn storage_threads_with_sled_stores() {
    sled_cluster_commits_50_and_releases_storage(true).await;
}

async fn sled_cluster_commits_50_and_releases_storage(storage_thread: bool) {
    let config = |id| NodeConfig {
        storage_thread,
        ..config(id)
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let net = SimNetwork::new(SimConfig::new(10));
    let voters = [1, 2, 3];
    let mut nodes = Vec::new();
    let mut applies = Vec::new();
    for id in 1..=3u64 {
        let store = Store::open(dirs[(id - 1) as usize].path()).unwrap();
        let (node, applied) =
            RaftNode::start(id, &voters, config(id), store, net.add_node(id).unwrap()).unwrap();
        nodes.push(node);
        applies.push(applied);
    }
    let logs = timeout(Duration::from_secs(60), async {
        // Wait for a leader through status changes (no polling).
        let mut changes: Vec<_> = nodes.iter().map(|n| n.subscribe()).collect();
        let leader = loop {
            if let Some(node) = nodes.iter().find(|n| n.state().1) {
                break node.clone();
            }
            let waits = changes.iter_mut().map(|c| Box::pin(c.changed()));
            futures::future::select_all(waits).await.0.unwrap();
        };
        let answers: Vec<(u64, u64)> = join_all((0..50).map(|i| leader.propose(command(i))))
            .await
            .into_iter()
            .map(|a| a.expect("a fresh leader accepts 50 queued proposals"))
            .collect();
        let last = answers[49].0;
        let mut logs = Vec::new();
        for receiver in &mut applies {
            let mut log = Vec::new();
            while log.last().is_none_or(|(index, _)| *index < last) {
                match receiver.recv().await.expect("channel open") {
                    Apply::Entries(entries) => {
                        log.extend(entries.into_iter().map(|e| (e.index, e.data)))
                    }
                    Apply::Snapshot { .. } => panic!("no snapshot was made"),
                }
            }
            log.truncate(last as usize);
            logs.push(log);
        }
        (answers, logs)
    })
    .await
    .expect("a multi-thread cluster commits 50 entries within 60 s");
    let (answers, logs) = logs;
    assert_eq!(logs[0], logs[1]);
    assert_eq!(logs[1], logs[2]);
    // Unless leadership changed on the real clock meanwhile, the commands
    // are at the indexes the leader gave.
    let term = answers[0].1;
    if nodes.iter().all(|n| n.state().0 == term) {
        for (i, (index, _)) in answers.iter().enumerate() {
            assert_eq!(
                logs[0][(*index - 1) as usize],
                (*index, Some(command(i as u64)))
            );
        }
    }
    for node in &nodes {
        node.shutdown().await;
    }
    for dir in &dirs {
        // Storage released: the directory reopens at once (no waiting for the lock).
        let config = StoreConfig {
            lock_timeout_ms: 0,
            ..StoreConfig::default()
        };
        let store = Store::open_with(dir.path(), &config).expect("released by shutdown");
        assert!(store.last_index(0).unwrap() >= 50);
    }
}

/// A `MemStore` that runs a hook before every commit: to break a storage
/// invariant (panic) or to hold a flush open (wait for the test).
#[derive(Clone)]
struct HookedStore {
    inner: MemStore,
    before_commit: std::sync::Arc<dyn Fn() + Send + Sync>,
}

impl HookedStore {
    fn new(before_commit: impl Fn() + Send + Sync + 'static) -> HookedStore {
        HookedStore {
            inner: MemStore::open(&MemDisk::new()).unwrap(),
            before_commit: std::sync::Arc::new(before_commit),
        }
    }
}

/// A [`HookedStore`] whose commits, while `armed`, wait inside the store
/// (each announced on `entered`) until the test sends on `release`: a flush
/// that has not finished yet.
struct HeldFlushes {
    store: HookedStore,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    entered: mpsc::UnboundedReceiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

fn held_flushes(armed: bool) -> HeldFlushes {
    let (entered_tx, entered) = mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(armed));
    let hook_armed = armed.clone();
    let release_rx = std::sync::Mutex::new(release_rx);
    let store = HookedStore::new(move || {
        if hook_armed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = entered_tx.send(());
            release_rx
                .lock()
                .unwrap()
                .recv()
                .expect("the test releases every held commit");
        }
    });
    HeldFlushes {
        store,
        armed,
        entered,
        release,
    }
}

/// A message of group 0 from `from` to node 2 (the tests that play node 2's
/// peers).
fn to_node_2(from: NodeId, term: u64, body: MessageBody) -> RaftEnvelope {
    RaftEnvelope {
        group: 0,
        message: Message {
            from,
            to: 2,
            term,
            body,
        },
    }
}

/// Starts node 2 of voters 1–3 on `store`, with election timeouts too long
/// to fire (the test plays the other nodes and decides when it campaigns);
/// keep the apply receiver for as long as the node runs.
fn start_node_2_without_timeouts(
    net: &SimNetwork,
    mut config: NodeConfig,
    store: &HookedStore,
) -> (RaftNode, mpsc::Receiver<Apply>) {
    config.raft.election_timeout_ticks_min = 100_000;
    config.raft.election_timeout_ticks_max = 200_000;
    RaftNode::start(
        2,
        &[1, 2, 3],
        config,
        store.clone(),
        net.add_node(2).unwrap(),
    )
    .unwrap()
}

const STORAGE_PANIC: &str = "storage invariant broken (test)";

impl raftkv::storage::Storage for HookedStore {
    fn commit(
        &self,
        batch: raftkv::storage::WriteBatch,
    ) -> Result<(), raftkv::storage::StorageError> {
        (self.before_commit)();
        self.inner.commit(batch)
    }
}

impl RaftLogStorage for HookedStore {
    fn groups(&self) -> Result<Vec<u64>, raftkv::storage::StorageError> {
        self.inner.groups()
    }
    fn hard_state(
        &self,
        group: u64,
    ) -> Result<raftkv::raft::HardState, raftkv::storage::StorageError> {
        self.inner.hard_state(group)
    }
    fn first_index(&self, group: u64) -> Result<u64, raftkv::storage::StorageError> {
        self.inner.first_index(group)
    }
    fn last_index(&self, group: u64) -> Result<u64, raftkv::storage::StorageError> {
        self.inner.last_index(group)
    }
    fn term(&self, group: u64, index: u64) -> Result<u64, raftkv::storage::StorageError> {
        self.inner.term(group, index)
    }
    fn entries(
        &self,
        group: u64,
        lo: u64,
        hi: u64,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, raftkv::storage::StorageError> {
        self.inner.entries(group, lo, hi, bytes_max)
    }
    fn snapshot_meta(
        &self,
        group: u64,
    ) -> Result<raftkv::raft::SnapshotMeta, raftkv::storage::StorageError> {
        self.inner.snapshot_meta(group)
    }
    fn snapshot(
        &self,
        group: u64,
    ) -> Result<(raftkv::raft::SnapshotMeta, Bytes), raftkv::storage::StorageError> {
        self.inner.snapshot(group)
    }
    fn raft_state_bytes(&self, group: u64) -> Result<u64, raftkv::storage::StorageError> {
        self.inner.raft_state_bytes(group)
    }
}

// A panic inside a commit on the storage thread (a broken storage
// invariant) stops the node, and `shutdown` re-raises that very panic.
#[tokio::test]
async fn a_storage_thread_panic_reaches_shutdown() {
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = {
        let armed = armed.clone();
        HookedStore::new(move || {
            if armed.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("{STORAGE_PANIC}");
            }
        })
    };
    let net = SimNetwork::new(SimConfig::new(12));
    let config = NodeConfig {
        storage_thread: true,
        ..config(1)
    };
    let (node, _applied) =
        RaftNode::start(1, &[1], config, store, net.add_node(1).unwrap()).unwrap();
    let mut status = node.subscribe();
    timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("a single node leads within 10 s")
    .unwrap();
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = node.propose(command(1)).await;
    let stopped = timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.stopped.is_some()),
    )
    .await
    .expect("the node stops within 10 s")
    .unwrap()
    .stopped
    .clone();
    assert_eq!(stopped, Some(StopReason::Panicked));
    let shutdown = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(node.shutdown()));
    let payload = shutdown
        .await
        .expect_err("shutdown re-raises the driver's panic");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert_eq!(message, STORAGE_PANIC);
}

// With asynchronous persistence on the storage thread (the server's mode), a
// follower's acknowledgement of entries and of a new term stays in the node
// while their flush is unfinished, however long that takes, and leaves once
// the store has them: the durability contract at the driver's level, with
// the window between hand-over and flush held wide open. (Real time: the
// storage thread is an OS thread.)
#[tokio::test]
async fn acknowledgements_wait_for_the_storage_thread_flush() {
    let HeldFlushes {
        store,
        armed,
        mut entered,
        release,
    } = held_flushes(true);
    let net = SimNetwork::new(SimConfig::new(21));
    // Every flush on the thread, none inline: this follower stands for a
    // node whose Readies queue there (a leader, or one that just stopped
    // leading); `a_deposed_leader_flushes_behind_its_readies_in_flight`
    // covers the switch between the two.
    let config = NodeConfig {
        storage_thread: true,
        followers_flush_inline: false,
        ..config(2)
    };
    // Node 2 must not campaign while the test plays node 1, its leader.
    let (node, _applied) = start_node_2_without_timeouts(&net, config, &store);
    let leader = net.add_node(1).unwrap();
    let mut leader_inbox = leader.inbox::<RaftEnvelope>(64).unwrap();
    let append = |prev: u64, index: u64| {
        to_node_2(
            1,
            1,
            MessageBody::Append {
                prev_log_index: prev,
                prev_log_term: if prev == 0 { 0 } else { 1 },
                entries: vec![Entry {
                    index,
                    term: 1,
                    kind: EntryKind::Normal,
                    data: command(index),
                }],
                leader_commit: 0,
            },
        )
    };
    let mut status = node.subscribe();
    // A new term and entry 1: the flush is held. Behind it, a duplicate of
    // that append (its Ready writes nothing, but its acknowledgement reports
    // entry 1) and entry 2 (a second flush).
    leader.send(2, &append(0, 1)).unwrap();
    timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the flush starts within 10 s")
        .unwrap();
    leader.send(2, &append(0, 1)).unwrap();
    // Handled in a turn of its own (the status value always holds the
    // counters of the last turn, but announces only watched fields).
    timeout(Duration::from_secs(10), async {
        while node.status().metrics.messages_received < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the duplicate handled within 10 s");
    leader.send(2, &append(1, 2)).unwrap();
    // Entry 2 moves the last index, a watched field: the notification
    // comes after the turn that handled it.
    let handled = timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.metrics.messages_received >= 3),
    )
    .await
    .expect("the three appends handled within 10 s")
    .unwrap()
    .metrics;
    assert_eq!(
        handled.messages_sent, 0,
        "an acknowledgement left before its flush finished"
    );
    assert_eq!(
        store.hard_state(0).unwrap().term,
        0,
        "the flush is still held"
    );
    assert!(leader_inbox.try_recv().is_none());
    // Each acknowledgement the leader receives must be backed by the store.
    async fn next_ack(inbox: &mut raftkv::net::Inbox<RaftEnvelope>, store: &HookedStore) -> u64 {
        let (from, envelope) = timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("acknowledged within 10 s")
            .unwrap();
        assert_eq!(from, 2);
        let MessageBody::AppendResponse {
            outcome: raftkv::raft::AppendOutcome::Success { match_index },
        } = envelope.message.body
        else {
            panic!("unexpected message {envelope:?}");
        };
        assert_eq!(envelope.message.term, 1);
        assert_eq!(store.hard_state(0).unwrap().term, 1);
        assert!(
            store.last_index(0).unwrap() >= match_index,
            "entry {match_index} acknowledged before it was stored"
        );
        match_index
    }
    // The first flush finishes; the second is held in turn. Entry 1's
    // acknowledgements (the append's and the duplicate's) leave, entry 2's
    // does not: the turn that sent the first two sent nothing else.
    release.send(()).unwrap();
    assert_eq!(next_ack(&mut leader_inbox, &store).await, 1);
    assert_eq!(next_ack(&mut leader_inbox, &store).await, 1);
    timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the second flush starts within 10 s")
        .unwrap();
    assert_eq!(node.status().metrics.messages_sent, 2);
    assert_eq!(store.last_index(0).unwrap(), 1);
    armed.store(false, std::sync::atomic::Ordering::SeqCst);
    release.send(()).unwrap();
    assert_eq!(next_ack(&mut leader_inbox, &store).await, 2);
    node.shutdown().await;
}

/// The next message `inbox` receives that `wanted` picks, skipping others.
async fn next_message<T>(
    inbox: &mut raftkv::net::Inbox<RaftEnvelope>,
    what: &str,
    wanted: impl Fn(&Message) -> Option<T>,
) -> T {
    timeout(Duration::from_secs(10), async {
        loop {
            let (_, envelope) = inbox.recv().await.expect("inbox open");
            if let Some(found) = wanted(&envelope.message) {
                return found;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within 10 s"))
}

// A follower flushes inline only with nothing in flight on its storage thread
// (`NodeConfig::followers_flush_inline`). Here node 2 leads, its first entry's
// flush is held on the thread, and a newer leader's append deposes it and
// overwrites that entry: the overwrite must queue behind the held flush, not
// reach the store inline past it (two commits at once, and the stale entry
// landing last), and its acknowledgement must wait for both. Real time: the
// storage thread is an OS thread, and the inline commit would block a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_flushes_behind_its_readies_in_flight() {
    let HeldFlushes {
        store,
        armed,
        mut entered,
        release,
    } = held_flushes(false);
    let net = SimNetwork::new(SimConfig::new(22));
    let config = NodeConfig {
        storage_thread: true,
        ..config(2)
    };
    // Node 2 campaigns only when told to (TimeoutNow).
    assert!(config.followers_flush_inline, "the default under test");
    let (node, _applied) = start_node_2_without_timeouts(&net, config, &store);
    let one = net.add_node(1).unwrap();
    let mut one_inbox = one.inbox::<RaftEnvelope>(64).unwrap();
    let three = net.add_node(3).unwrap();
    let mut three_inbox = three.inbox::<RaftEnvelope>(64).unwrap();
    let entry = |index: u64, term: u64| Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: command(index * 10 + term),
    };
    let success = |message: &Message| match message.body {
        MessageBody::AppendResponse {
            outcome: raftkv::raft::AppendOutcome::Success { match_index },
        } => Some((message.term, match_index)),
        _ => None,
    };

    // Term 1: node 1 leads and node 2 follows (flushing inline).
    let append = MessageBody::Append {
        prev_log_index: 0,
        prev_log_term: 0,
        entries: vec![entry(1, 1)],
        leader_commit: 0,
    };
    one.send(2, &to_node_2(1, 1, append)).unwrap();
    assert_eq!(
        next_message(&mut one_inbox, "ack of entry 1", success).await,
        (1, 1)
    );
    // Term 2: node 1 hands over, node 2 asks for votes and gets node 1's.
    one.send(2, &to_node_2(1, 1, MessageBody::TimeoutNow))
        .unwrap();
    let vote_term = next_message(&mut one_inbox, "vote request", |m| {
        matches!(m.body, MessageBody::Vote { .. }).then_some(m.term)
    })
    .await;
    assert_eq!(vote_term, 2);
    // From now on every flush is held until released.
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    one.send(
        2,
        &to_node_2(1, 2, MessageBody::VoteResponse { granted: true }),
    )
    .unwrap();
    // Leading, node 2 appends a proposal at index 2 and hands its flush to
    // the thread, where it is held.
    let mut status = node.subscribe();
    timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("node 2 leads within 10 s")
    .unwrap();
    let proposed = {
        let node = node.clone();
        tokio::spawn(async move { node.propose(command(22)).await })
    };
    timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the new leader's flush starts within 10 s")
        .unwrap();
    let proposed = timeout(Duration::from_secs(10), proposed)
        .await
        .expect("the proposal answered within 10 s");
    assert_eq!(
        proposed.unwrap().expect("the leader takes the proposal"),
        (2, 2)
    );
    // Term 3: node 3 leads and overwrites index 2.
    let overwrite = MessageBody::Append {
        prev_log_index: 1,
        prev_log_term: 1,
        entries: vec![entry(2, 3)],
        leader_commit: 1,
    };
    three.send(2, &to_node_2(3, 3, overwrite)).unwrap();
    // The driver handles it (and publishes term 3) without a second commit
    // entering the store while the first is held.
    tokio::select! {
        seen = timeout(Duration::from_secs(10), status.wait_for(|s| s.term == 3)) => {
            seen.expect("node 2 sees term 3 within 10 s").unwrap();
        }
        _ = entered.recv() => panic!("a second commit reached the store while the first was held"),
    }
    assert_eq!(node.status().role, Role::Follower);
    let before = node.status().metrics;
    // The held flush finishes, then the overwrite's is held in turn.
    release.send(()).unwrap();
    timeout(Duration::from_secs(10), entered.recv())
        .await
        .expect("the overwrite's flush follows within 10 s")
        .unwrap();
    assert_eq!(store.term(0, 2).unwrap(), 2, "the held entry landed first");
    // Once the driver has taken the first flush's answer, nothing has left:
    // the acknowledgement waits for the overwrite's flush.
    timeout(Duration::from_secs(10), async {
        while node.status().metrics.flushes == before.flushes {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first flush's answer handled within 10 s");
    assert_eq!(
        node.status().metrics.messages_sent,
        before.messages_sent,
        "an acknowledgement left before the overwrite was stored"
    );
    armed.store(false, std::sync::atomic::Ordering::SeqCst);
    release.send(()).unwrap();
    let (term, match_index) = next_message(&mut three_inbox, "ack of the overwrite", success).await;
    assert_eq!((term, match_index), (3, 2));
    assert_eq!(store.hard_state(0).unwrap().term, 3);
    assert_eq!(
        store.term(0, 2).unwrap(),
        3,
        "acknowledged before the overwrite was stored"
    );
    node.shutdown().await;
}

//! Deterministic simulation of the Raft core: N cores, a seeded faulty
//! network (drops, duplicates, delays, reordering, partitions including
//! one-way and bridge ones), crashes at any point of the Ready cycle with an
//! in-memory durable image, proposals, reads, transfers and service
//! snapshots. Safety is checked after every step; after healing, a new
//! proposal must commit everywhere within a bounded number of ticks.
//!
//! `cargo test --release --test raft_sim` runs the default seeds;
//! `RAFTKV_SIM_SEEDS=N` runs N seeds, `RAFTKV_SIM_SEED=S` replays one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use raftkv::NodeId;
use raftkv::raft::{
    AppendOutcome, Config, Entry, EntryKind, HardState, Message, MessageBody, PersistToken,
    PersistedState, RaftCore, Ready, Snapshot,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DEFAULT_SEEDS: u64 = 1000;
/// Ticks of chaos before healing.
const CHAOS_TICKS: u64 = 1_500;
/// Longest delay of a held-back message (many election timeouts).
const LONG_DELAY_TICKS: u64 = 200;
/// Ticks the healed cluster has to commit a new proposal everywhere.
const LIVENESS_TICKS: u64 = 1_500;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    if hash == 0 {
        hash = 0xcbf2_9ce4_8422_2325;
    }
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn chain(previous: u64, entry: &Entry) -> u64 {
    let mut h = fnv(previous, &entry.index.to_le_bytes());
    h = fnv(h, &entry.term.to_le_bytes());
    h = fnv(h, &[entry.kind as u8]);
    fnv(h, &entry.data)
}

/// What a node has made durable; a crash keeps exactly this.
#[derive(Default, Clone)]
struct Durable {
    hard_state: HardState,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
}

/// The replicated service: the applied index and a hash chain of everything applied.
#[derive(Default, Clone, Copy)]
struct Service {
    applied: u64,
    chain: u64,
}

/// A Ready whose persistence is still in flight (asynchronous persistence,
/// what the driver does with a storage thread): lost if the node crashes.
struct Unflushed {
    persist: Persist,
    /// Messages that may leave only once it is durable.
    messages: Vec<Message>,
    token: Option<PersistToken>,
    /// The term before its first entry when it was taken; `None` when its
    /// entries were registered already (they left the node).
    previous_term: Option<u64>,
}

/// The persistence step of a Ready.
#[derive(Default)]
struct Persist {
    snapshot: Option<Snapshot>,
    log_truncate_from: Option<u64>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
}

impl Persist {
    fn take(ready: &mut Ready) -> Persist {
        Persist {
            snapshot: ready.snapshot.take(),
            log_truncate_from: ready.log_truncate_from.take(),
            entries: std::mem::take(&mut ready.entries),
            hard_state: ready.hard_state.take(),
        }
    }

    fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.log_truncate_from.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
    }
}

struct Node {
    id: NodeId,
    core: Option<RaftCore>,
    /// Readies handed to the (simulated) storage thread, oldest first.
    unflushed: VecDeque<Unflushed>,
    durable: Durable,
    service: Service,
    seen_commit: u64,
    incarnation: u64,
    /// Pending read requests: context → lowest acceptable read index.
    reads: BTreeMap<u64, u64>,
    next_context: u64,
}

/// Global knowledge used by the safety checks.
#[derive(Default)]
struct Oracle {
    /// (index, term) → (kind, data, previous term) of every entry ever persisted.
    positions: BTreeMap<(u64, u64), (EntryKind, Bytes, u64)>,
    /// index → (term, chain hash after it) of every entry ever applied.
    applied: BTreeMap<u64, (u64, u64)>,
    /// index → term of every entry ever seen committed.
    committed: BTreeMap<u64, u64>,
    /// term → its leader.
    leaders: BTreeMap<u64, NodeId>,
    max_commit: u64,
}

#[derive(Clone, Copy)]
struct Faults {
    drop: f64,
    duplicate: f64,
    delay_max: u64,
    /// Probability that a message is held back for up to `LONG_DELAY_TICKS`.
    long_delay: f64,
    crash: f64,
    crash_in_ready: f64,
    restart: f64,
    partition: f64,
    skip_tick: f64,
}

/// What a run exercised, to show the simulation is not vacuous.
#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    committed: u64,
    terms: u64,
    crashes: u64,
    snapshots_installed: u64,
    service_snapshots: u64,
    /// Readies persisted after later Readies were taken (asynchronous runs).
    delayed_persists: u64,
    reads_confirmed: u64,
    truncations: u64,
    messages: u64,
    requests: u64,
}

impl Stats {
    fn add(&mut self, other: Stats) {
        self.committed += other.committed;
        self.terms += other.terms;
        self.crashes += other.crashes;
        self.snapshots_installed += other.snapshots_installed;
        self.delayed_persists += other.delayed_persists;
        self.service_snapshots += other.service_snapshots;
        self.reads_confirmed += other.reads_confirmed;
        self.truncations += other.truncations;
        self.messages += other.messages;
        self.requests += other.requests;
    }
}

struct InFlight {
    deliver_at: u64,
    message: Message,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    config: Config,
    voters: Vec<NodeId>,
    nodes: Vec<Node>,
    oracle: Oracle,
    network: Vec<InFlight>,
    /// Directional links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    now: u64,
    faults: Faults,
    proposals: u64,
    stats: Stats,
    /// Persist like a driver with a storage thread: Readies are advanced at
    /// once and made durable later, in order, some at a time.
    asynchronous: bool,
    /// Flush every Ready in flight before taking the next (after healing).
    flush_all: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = [1, 3, 3, 3, 5, 5, 7][rng.random_range(0..7)];
        let heartbeat = rng.random_range(2..=4);
        let election_min = heartbeat * 3 + rng.random_range(0..4);
        let both = rng.random_bool(0.7);
        let config = Config {
            election_timeout_ticks_min: election_min,
            election_timeout_ticks_max: election_min * 2,
            heartbeat_interval_ticks: heartbeat,
            pre_vote: both || rng.random_bool(0.5),
            check_quorum: both || rng.random_bool(0.5),
            append_entries_max: rng.random_range(1..=8),
            append_bytes_max: rng.random_range(64..=256),
            append_inflight_max: rng.random_range(1..=4),
            entry_bytes_max: 64,
            uncommitted_bytes_max: 4096,
            snapshot_chunk_bytes_max: rng.random_range(8..=64),
            snapshot_bytes_max: 4096,
            apply_batch_bytes_max: rng.random_range(16..=256),
            read_index_pending_max: 64,
            transfer_timeout_ticks: election_min,
        };
        config.validate().expect("sim config is valid");
        let calm = rng.random_bool(0.2);
        let faults = Faults {
            drop: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.2)
            },
            duplicate: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.1)
            },
            delay_max: rng.random_range(0..=if calm { 1 } else { 6 }),
            long_delay: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.03)
            },
            crash: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.01)
            },
            crash_in_ready: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.01)
            },
            restart: rng.random_range(0.02..0.1),
            partition: if calm {
                0.0
            } else {
                rng.random_range(0.0..0.03)
            },
            skip_tick: rng.random_range(0.0..0.1),
        };
        Sim::build(seed, rng, size, config, faults)
    }

    fn build(seed: u64, rng: ChaCha8Rng, size: u64, config: Config, faults: Faults) -> Self {
        let voters: Vec<NodeId> = (1..=size).collect();
        let mut sim = Sim {
            seed,
            rng,
            config,
            voters: voters.clone(),
            nodes: Vec::new(),
            oracle: Oracle::default(),
            network: Vec::new(),
            cut: BTreeSet::new(),
            now: 0,
            faults,
            proposals: 0,
            stats: Stats::default(),
            // Half the seeds of each test (drawn from the seed, not the
            // generator, so the others replay as before).
            asynchronous: (seed / 2) % 2 == 1,
            flush_all: false,
        };
        for id in voters {
            sim.nodes.push(Node {
                id,
                core: None,
                unflushed: VecDeque::new(),
                durable: Durable::default(),
                service: Service::default(),
                seen_commit: 0,
                incarnation: 0,
                reads: BTreeMap::new(),
                next_context: 0,
            });
            sim.restart(id as usize - 1);
        }
        sim
    }

    fn restart(&mut self, slot: usize) {
        let node = &mut self.nodes[slot];
        assert!(node.core.is_none(), "restarting a live node");
        node.incarnation += 1;
        let rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (node.id << 40) ^ (node.incarnation << 20) ^ 0x5eed,
        );
        let persisted = PersistedState {
            hard_state: node.durable.hard_state,
            snapshot: node.durable.snapshot.clone(),
            entries: node.durable.entries.clone(),
        };
        let core = RaftCore::new(node.id, &self.voters, self.config.clone(), persisted, rng)
            .expect("restart from a durable image");
        node.seen_commit = core.commit_index();
        node.service = Service::default();
        node.reads.clear();
        node.core = Some(core);
    }

    fn crash(&mut self, slot: usize) {
        self.stats.crashes += 1;
        self.nodes[slot].core = None;
        // What the storage thread had not flushed is lost.
        self.nodes[slot].unflushed.clear();
        self.nodes[slot].reads.clear();
    }

    /// The state a message reports is durable on its sender when it leaves:
    /// its term and vote, the entries an append response acknowledges, the
    /// snapshot an install response acknowledges.
    fn check_durable_before_send(&self, m: &Message) {
        let d = &self.nodes[m.from as usize - 1].durable;
        if matches!(
            m.body,
            MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { .. }
        ) {
            return;
        }
        assert!(
            d.hard_state.term >= m.term,
            "node {} sends {:?} in term {} with durable term {}",
            m.from,
            m.body,
            m.term,
            d.hard_state.term
        );
        let covers = |index: u64| {
            index == 0
                || d.snapshot
                    .as_ref()
                    .is_some_and(|s| s.meta.last_included_index >= index)
                || d.entries.last().is_some_and(|e| e.index >= index)
        };
        match &m.body {
            MessageBody::VoteResponse { granted: true } => assert!(
                d.hard_state.term > m.term || d.hard_state.voted_for == Some(m.to),
                "node {} grants its vote to {} in term {} before it is durable",
                m.from,
                m.to,
                m.term
            ),
            MessageBody::Vote { .. } => assert!(
                d.hard_state.term > m.term || d.hard_state.voted_for == Some(m.from),
                "node {} asks for votes in term {} before its own vote is durable",
                m.from,
                m.term
            ),
            MessageBody::AppendResponse {
                outcome: AppendOutcome::Success { match_index },
            } => assert!(
                covers(*match_index),
                "node {} acknowledges {} before it is durable",
                m.from,
                match_index
            ),
            MessageBody::InstallSnapshotResponse {
                last_included_index,
                done: true,
                ..
            } => assert!(
                covers(*last_included_index),
                "node {} acknowledges snapshot {} before it is durable",
                m.from,
                last_included_index
            ),
            _ => {}
        }
    }

    /// An index a leader commits is durable (with its term) on a majority.
    fn check_commit_durable(&self, index: u64, term: u64) {
        let copies = self
            .nodes
            .iter()
            .filter(|n| {
                let d = &n.durable;
                d.snapshot
                    .as_ref()
                    .is_some_and(|s| s.meta.last_included_index >= index)
                    || d.entries.iter().any(|e| e.index == index && e.term == term)
            })
            .count();
        assert!(
            copies > self.nodes.len() / 2,
            "index {index} (term {term}) committed with {copies} durable copies"
        );
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&s| self.nodes[s].core.is_some())
            .collect()
    }

    fn leader_slot(&self) -> Option<usize> {
        let live = self.live();
        live.into_iter()
            .filter(|&s| self.nodes[s].core.as_ref().is_some_and(|c| c.is_leader()))
            .max_by_key(|&s| self.nodes[s].core.as_ref().map(|c| c.term()))
    }

    // ----- the network ---------------------------------------------------

    fn send(&mut self, message: Message) {
        self.check_durable_before_send(&message);
        self.stats.messages += 1;
        if !message.is_response() {
            self.stats.requests += 1;
        }
        if self.rng.random_bool(self.faults.drop) {
            return;
        }
        let copies = if self.rng.random_bool(self.faults.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.random_bool(self.faults.long_delay) {
                self.rng.random_range(0..=LONG_DELAY_TICKS)
            } else {
                self.rng.random_range(0..=self.faults.delay_max)
            };
            self.network.push(InFlight {
                deliver_at: self.now + delay,
                message: message.clone(),
            });
        }
    }

    fn deliver_due(&mut self) {
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.network.len() {
            if self.network[index].deliver_at <= self.now {
                due.push(self.network.swap_remove(index).message);
            } else {
                index += 1;
            }
        }
        due.shuffle(&mut self.rng);
        for message in due {
            if self.cut.contains(&(message.from, message.to)) {
                continue;
            }
            let slot = message.to as usize - 1;
            let Some(core) = self.nodes[slot].core.as_mut() else {
                continue;
            };
            if let Err(error) = core.step(message.clone()) {
                panic!("honest message rejected: {error} ({message:?})");
            }
            self.check();
            if self.rng.random_bool(0.3) {
                self.process_ready(slot);
            }
        }
    }

    fn change_partition(&mut self) {
        self.cut.clear();
        let n = self.voters.len();
        if n == 1 {
            return;
        }
        let mut ids = self.voters.clone();
        ids.shuffle(&mut self.rng);
        match self.rng.random_range(0..5) {
            0 => {} // healed
            1 => {
                // Two sides.
                let split = self.rng.random_range(1..n);
                for &a in &ids[..split] {
                    for &b in &ids[split..] {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
            2 => {
                // Bridge: ids[0] talks to both sides, the sides not to each other.
                let split = self.rng.random_range(1..n.max(2)).max(1);
                let (left, right) = ids[1..].split_at((split - 1).min(n - 1));
                for &a in left {
                    for &b in right {
                        self.cut.insert((a, b));
                        self.cut.insert((b, a));
                    }
                }
            }
            3 => {
                // Random one-way cuts.
                for &a in &ids {
                    for &b in &ids {
                        if a != b && self.rng.random_bool(0.3) {
                            self.cut.insert((a, b));
                        }
                    }
                }
            }
            _ => {
                // Isolate one node.
                for &b in &ids[1..] {
                    self.cut.insert((ids[0], b));
                    self.cut.insert((b, ids[0]));
                }
            }
        }
    }

    // ----- the Ready cycle -----------------------------------------------

    fn process_ready(&mut self, slot: usize) {
        if self.asynchronous {
            return self.process_ready_async(slot);
        }
        let crash_point = if self.rng.random_bool(self.faults.crash_in_ready) {
            Some(self.rng.random_range(0..3))
        } else {
            None
        };
        let Some(core) = self.nodes[slot].core.as_mut() else {
            return;
        };
        if !core.has_ready() {
            return;
        }
        let mut ready = core.ready();
        let registered = self.send_early(slot, &mut ready);
        if crash_point == Some(0) {
            // Nothing of this Ready reached the disk; a leader's appends may
            // have reached the network.
            return self.crash(slot);
        }
        if !registered {
            self.register_entries(slot, &ready);
        }
        let persist = Persist::take(&mut ready);
        self.persist(slot, &persist);
        if crash_point == Some(1) {
            return self.crash(slot);
        }
        for message in std::mem::take(&mut ready.messages) {
            self.send(message);
        }
        if crash_point == Some(2) {
            return self.crash(slot);
        }
        self.apply(slot, &ready);
        self.nodes[slot].core.as_mut().expect("live").advance(ready);
        self.check();
    }

    /// The driver with a storage thread: first the storage thread finishes
    /// some of the Readies in flight (in order), then the next Ready is
    /// taken, its early messages sent, its persistence queued behind the
    /// others with the rest of its messages, its entries applied, and the
    /// core advanced before anything of it is durable.
    fn process_ready_async(&mut self, slot: usize) {
        if self.nodes[slot].core.is_none() {
            return;
        }
        let waiting = self.nodes[slot].unflushed.len();
        if waiting > 0 && (self.flush_all || self.rng.random_bool(0.5)) {
            let count = if self.flush_all {
                waiting
            } else {
                self.rng.random_range(1..=waiting)
            };
            for _ in 0..count {
                let done = self.nodes[slot]
                    .unflushed
                    .pop_front()
                    .expect("a Ready in flight");
                if !self.nodes[slot].unflushed.is_empty() || count < waiting {
                    self.stats.delayed_persists += 1;
                }
                if let Some(previous_term) = done.previous_term {
                    // The entries exist now that they are durable (a node that
                    // crashes before may reuse their positions: nobody saw
                    // them, not even its own disk).
                    self.register(slot, &done.persist.entries, previous_term);
                }
                self.persist(slot, &done.persist);
                for message in done.messages {
                    self.send(message);
                }
                let core = self.nodes[slot].core.as_mut().expect("live");
                core.persisted(done.token.expect("advanced"));
                self.check();
            }
        }
        if self.rng.random_bool(self.faults.crash_in_ready) {
            return self.crash(slot);
        }
        let core = self.nodes[slot].core.as_mut().expect("live");
        if !core.has_ready() {
            return;
        }
        let mut ready = core.ready();
        let previous_term = Some(self.previous_term(slot, &ready.entries));
        let previous_term = previous_term.filter(|_| !self.send_early(slot, &mut ready));
        let persist = Persist::take(&mut ready);
        let messages = std::mem::take(&mut ready.messages);
        let queued = !persist.is_empty() || !self.nodes[slot].unflushed.is_empty();
        if queued {
            self.nodes[slot].unflushed.push_back(Unflushed {
                persist,
                messages,
                token: None,
                previous_term,
            });
        } else {
            for message in messages {
                self.send(message);
            }
        }
        self.apply(slot, &ready);
        let core = self.nodes[slot].core.as_mut().expect("live");
        let token = core.advance_unpersisted(ready);
        if queued {
            self.nodes[slot].unflushed.back_mut().expect("queued").token = Some(token);
        } else {
            // Nothing in flight and nothing to write: durable already.
            core.persisted(token);
        }
        self.check();
    }

    /// Like the driver: a leader's appends and heartbeats leave before its
    /// own flush when the Ready changes no hard state. Whether any left (then
    /// the Ready's entries are registered: they exist once they leave).
    fn send_early(&mut self, slot: usize, ready: &mut Ready) -> bool {
        if ready.hard_state.is_some() {
            return false;
        }
        let (early, late): (Vec<_>, Vec<_>) = std::mem::take(&mut ready.messages)
            .into_iter()
            .partition(|message| message.may_precede_persistence());
        ready.messages = late;
        if early.is_empty() {
            return false;
        }
        self.register_entries(slot, ready);
        for message in early {
            self.send(message);
        }
        true
    }

    /// Log matching: an (index, term) pair fixes the entry and its predecessor's term.
    fn register_entries(&mut self, slot: usize, ready: &Ready) {
        let previous_term = self.previous_term(slot, &ready.entries);
        self.register(slot, &ready.entries, previous_term);
    }

    /// The term of the entry before `entries` in the node's log now.
    fn previous_term(&self, slot: usize, entries: &[Entry]) -> u64 {
        let core = self.nodes[slot].core.as_ref().expect("live");
        entries.first().map_or(0, |first| {
            core.entry_term(first.index - 1)
                .expect("entry before the unpersisted ones is known")
        })
    }

    /// Records entries that exist (durable, or sent), `previous_term` being
    /// the term before the first.
    fn register(&mut self, slot: usize, entries: &[Entry], mut previous_term: u64) {
        for entry in entries {
            let value = (entry.kind, entry.data.clone(), previous_term);
            let known = self
                .oracle
                .positions
                .entry((entry.index, entry.term))
                .or_insert_with(|| value.clone());
            assert_eq!(
                *known, value,
                "log matching violated at index {} term {} on node {}",
                entry.index, entry.term, self.nodes[slot].id
            );
            previous_term = entry.term;
        }
    }

    fn persist(&mut self, slot: usize, ready: &Persist) {
        let durable = &mut self.nodes[slot].durable;
        if let Some(snapshot) = &ready.snapshot {
            let index = snapshot.meta.last_included_index;
            durable.entries.retain(|e| e.index > index);
            durable.snapshot = Some(snapshot.clone());
        }
        if let Some(from) = ready.log_truncate_from {
            self.stats.truncations += 1;
            durable.entries.retain(|e| e.index < from);
        }
        for entry in &ready.entries {
            let expected = durable.entries.last().map_or_else(
                || {
                    durable
                        .snapshot
                        .as_ref()
                        .map_or(0, |s| s.meta.last_included_index)
                },
                |e| e.index,
            ) + 1;
            assert_eq!(
                entry.index, expected,
                "Ready entries do not follow the stored log"
            );
            durable.entries.push(entry.clone());
        }
        if let Some(hard_state) = ready.hard_state {
            let old = durable.hard_state;
            assert!(hard_state.term >= old.term, "durable term went backwards");
            if hard_state.term == old.term && old.voted_for.is_some() {
                assert_eq!(
                    hard_state.voted_for, old.voted_for,
                    "two votes in term {}",
                    old.term
                );
            }
            durable.hard_state = hard_state;
        }
    }

    /// State-machine safety: every node applies the same entry at each index.
    fn apply(&mut self, slot: usize, ready: &Ready) {
        let node = &mut self.nodes[slot];
        if let Some(snapshot) = &ready.snapshot_to_apply {
            self.stats.snapshots_installed += 1;
            let index = u64::from_le_bytes(snapshot.data[..8].try_into().expect("8 bytes"));
            let hash = u64::from_le_bytes(snapshot.data[8..16].try_into().expect("8 bytes"));
            assert_eq!(
                index, snapshot.meta.last_included_index,
                "snapshot data/meta mismatch"
            );
            let (_, expected) = self.oracle.applied[&index];
            assert_eq!(
                hash, expected,
                "snapshot at {index} holds a different state"
            );
            node.service = Service {
                applied: index,
                chain: hash,
            };
        }
        for entry in &ready.committed_entries {
            assert_eq!(
                entry.index,
                node.service.applied + 1,
                "node {} applied out of order",
                node.id
            );
            let hash = chain(node.service.chain, entry);
            let known = *self
                .oracle
                .applied
                .entry(entry.index)
                .or_insert((entry.term, hash));
            assert_eq!(
                known,
                (entry.term, hash),
                "state machine safety violated at index {} on node {}",
                entry.index,
                node.id
            );
            node.service = Service {
                applied: entry.index,
                chain: hash,
            };
        }
        for read in &ready.read_states {
            let Some(minimum) = node.reads.remove(&read.context) else {
                panic!("unknown read context {} on node {}", read.context, node.id);
            };
            if let Ok(index) = read.result {
                self.stats.reads_confirmed += 1;
                assert!(
                    index >= minimum,
                    "stale read on node {}: index {index} < {minimum} committed before the read",
                    node.id
                );
            }
        }
    }

    // ----- safety checks after every step ------------------------------------

    fn check(&mut self) {
        let mut new_commits = Vec::new();
        for node in &mut self.nodes {
            let Some(core) = node.core.as_ref() else {
                continue;
            };
            let id = node.id;
            // Monotonic commit (per incarnation) and the committed record.
            let commit = core.commit_index();
            let seen = node.seen_commit;
            assert!(
                commit >= seen,
                "commit index of node {id} went back from {seen} to {commit}"
            );
            for index in seen + 1..=commit {
                if let Some(term) = core.entry_term(index) {
                    let known = *self.oracle.committed.entry(index).or_insert(term);
                    assert_eq!(
                        known, term,
                        "two different entries committed at index {index}"
                    );
                }
            }
            if core.is_leader() && commit > seen {
                if let Some(term) = core.entry_term(commit) {
                    new_commits.push((commit, term));
                }
            }
            node.seen_commit = commit;
            self.oracle.max_commit = self.oracle.max_commit.max(commit);
            // Election safety and leader completeness.
            if core.is_leader() {
                let term = core.term();
                let first = !self.oracle.leaders.contains_key(&term);
                let leader = *self.oracle.leaders.entry(term).or_insert(id);
                assert_eq!(leader, id, "two leaders in term {term}");
                if first {
                    let from = core.snapshot_meta().last_included_index;
                    for (&index, &entry_term) in self.oracle.committed.range(from + 1..) {
                        assert_eq!(
                            core.entry_term(index),
                            Some(entry_term),
                            "leader {id} of term {term} lacks committed entry {index}"
                        );
                    }
                }
            }
        }
        // What a node counts as its own durable log is on its disk.
        for node in &self.nodes {
            let Some(core) = node.core.as_ref() else {
                continue;
            };
            let persisted = core.persisted_index();
            let d = &node.durable;
            let snapshot = d
                .snapshot
                .as_ref()
                .map_or(0, |s| s.meta.last_included_index);
            if persisted > snapshot.max(core.snapshot_meta().last_included_index) {
                let durable_term = d
                    .entries
                    .iter()
                    .find(|e| e.index == persisted)
                    .map(|e| e.term);
                assert_eq!(
                    durable_term,
                    core.entry_term(persisted),
                    "node {} counts {} as durable; its durable log ends at {:?}",
                    node.id,
                    persisted,
                    d.entries.last().map(|e| (e.index, e.term))
                );
            }
        }
        for (index, term) in new_commits {
            self.check_commit_durable(index, term);
        }
    }

    // ----- workload --------------------------------------------------------

    fn propose(&mut self, slot: usize) -> Option<(u64, u64)> {
        self.proposals += 1;
        let size = self.rng.random_range(0..=48);
        let mut data = format!("s{}p{}:", self.seed, self.proposals).into_bytes();
        data.resize(data.len().max(size), b'.');
        let core = self.nodes[slot].core.as_mut()?;
        core.propose(Bytes::from(data)).ok()
    }

    fn read(&mut self, slot: usize) {
        let minimum = self.oracle.max_commit;
        let node = &mut self.nodes[slot];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        node.next_context += 1;
        if core.read_index(node.next_context).is_ok() {
            node.reads.insert(node.next_context, minimum);
        }
    }

    fn service_snapshot(&mut self, slot: usize) {
        let padding = self.rng.random_range(0..200);
        let node = &mut self.nodes[slot];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        let service = node.service;
        if service.applied < core.snapshot_meta().last_included_index + 3 {
            return;
        }
        let mut data = Vec::with_capacity(16 + padding);
        data.extend_from_slice(&service.applied.to_le_bytes());
        data.extend_from_slice(&service.chain.to_le_bytes());
        data.resize(16 + padding, 0xab);
        core.snapshot(service.applied, Bytes::from(data))
            .expect("snapshot of applied state");
        self.stats.service_snapshots += 1;
    }

    fn tick_all(&mut self, skip: f64) {
        for slot in self.live() {
            if self.rng.random_bool(skip) {
                continue;
            }
            self.nodes[slot].core.as_mut().expect("live").tick();
            self.check();
        }
    }

    fn chaos_tick(&mut self) {
        self.now += 1;
        self.tick_all(self.faults.skip_tick);
        self.deliver_due();
        let live = self.live();
        if !live.is_empty() {
            let slot = live[self.rng.random_range(0..live.len())];
            if self.rng.random_bool(0.4) {
                for _ in 0..self.rng.random_range(1..=4) {
                    self.propose(slot);
                }
                self.check();
            }
            if self.rng.random_bool(0.2) {
                self.read(slot);
                self.check();
            }
            if self.rng.random_bool(0.1) {
                self.service_snapshot(slot);
                self.check();
            }
            if self.rng.random_bool(0.01) {
                let to = self.voters[self.rng.random_range(0..self.voters.len())];
                if let Some(core) = self.nodes[slot].core.as_mut() {
                    let _ = core.transfer_leader(to);
                }
                self.check();
            }
            if self.rng.random_bool(self.faults.crash) {
                self.crash(slot);
            }
        }
        let dead: Vec<usize> = (0..self.nodes.len())
            .filter(|&s| self.nodes[s].core.is_none())
            .collect();
        for slot in dead {
            if self.rng.random_bool(self.faults.restart) {
                self.restart(slot);
                self.check();
            }
        }
        if self.rng.random_bool(self.faults.partition) {
            self.change_partition();
        }
        for slot in self.live() {
            if self.rng.random_bool(0.7) {
                self.process_ready(slot);
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.flush_all = true;
        self.faults = Faults {
            drop: 0.0,
            duplicate: 0.0,
            delay_max: 1,
            long_delay: 0.0,
            crash: 0.0,
            crash_in_ready: 0.0,
            restart: 1.0,
            partition: 0.0,
            skip_tick: 0.0,
        };
        for slot in 0..self.nodes.len() {
            if self.nodes[slot].core.is_none() {
                self.restart(slot);
            }
        }
    }

    /// After healing, a new proposal must commit and be applied everywhere.
    fn require_progress(&mut self) {
        let mut pending: Option<(u64, u64, u64)> = None; // (index, term, proposed at)
        let start = self.now;
        while self.now < start + LIVENESS_TICKS {
            self.now += 1;
            self.tick_all(0.0);
            self.deliver_due();
            for slot in self.live() {
                self.process_ready(slot);
            }
            if let Some((index, term, _)) = pending {
                let done = self.nodes.iter().all(|n| n.service.applied >= index);
                let lost = self
                    .oracle
                    .applied
                    .get(&index)
                    .is_some_and(|&(t, _)| t != term);
                if done && !lost {
                    return;
                }
                if lost {
                    pending = None;
                }
            }
            let stale = pending.is_some_and(|(_, _, at)| {
                self.now > at + 4 * self.config.election_timeout_ticks_max
            });
            if pending.is_none() || stale {
                if let Some(slot) = self.leader_slot() {
                    if let Some((index, term)) = self.propose(slot) {
                        pending = Some((index, term, self.now));
                    }
                }
            }
        }
        let states: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                let c = n.core.as_ref().expect("healed");
                format!(
                    "node {} role {:?} term {} commit {} applied {} last {}",
                    n.id,
                    c.role(),
                    c.term(),
                    c.commit_index(),
                    n.service.applied,
                    c.last_index()
                )
            })
            .collect();
        panic!(
            "no progress within {LIVENESS_TICKS} ticks after healing (pending {pending:?}): {states:#?}"
        );
    }

    fn run(&mut self) -> Stats {
        for _ in 0..CHAOS_TICKS {
            self.chaos_tick();
        }
        self.heal();
        self.require_progress();
        self.stats.committed = self.oracle.max_commit;
        self.stats.terms = self.oracle.leaders.len() as u64;
        self.stats
    }
}

fn run_seed(seed: u64) -> Result<Stats, String> {
    let result = catch_unwind(AssertUnwindSafe(|| Sim::new(seed).run()));
    result.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".to_string())
    })
}

fn run_seeds(seeds: impl Iterator<Item = u64>) {
    let mut total = Stats::default();
    let mut runs = 0;
    for seed in seeds {
        match run_seed(seed) {
            Ok(stats) => total.add(stats),
            Err(message) => panic!(
                "raft simulation failed for seed {seed}: {message}\n\
                 replay: RAFTKV_SIM_SEED={seed} cargo test --release --test raft_sim"
            ),
        }
        runs += 1;
    }
    eprintln!("{runs} seeds passed; totals: {total:?}");
    if runs >= 8 {
        assert!(
            total.delayed_persists > 0,
            "no run persisted a Ready after a later one was taken: {total:?}"
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be an unsigned integer, got {v:?}"))
    })
}

/// Which seeds this run covers, split into two halves run by two tests in parallel.
fn seeds(half: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("RAFTKV_SIM_SEED") {
        return if half == 0 { vec![seed] } else { Vec::new() };
    }
    let count = env_u64("RAFTKV_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    (0..count).filter(|s| s % 2 == half).collect()
}

// Safety holds and progress resumes after healing for the even seeds.
#[test]
fn simulation_even_seeds() {
    run_seeds(seeds(0).into_iter());
}

// Safety holds and progress resumes after healing for the odd seeds.
#[test]
fn simulation_odd_seeds() {
    run_seeds(seeds(1).into_iter());
}

/// One tick of a calm cluster: tick everyone, deliver, run every Ready.
fn calm_tick(sim: &mut Sim) {
    sim.now += 1;
    sim.tick_all(0.0);
    sim.deliver_due();
    for slot in sim.live() {
        sim.process_ready(slot);
    }
}

// With the default config at 10 ms ticks, the core meets the labs' numeric
// bounds on a calm 3-node network: a leader within 5 s, an election in 1–30
// RPCs, 12 agreements started without waiting in ≤ 42 RPCs, ≤ 60 messages
// in 1 s idle, and at most 10 heartbeats per second per peer.
#[test]
fn default_config_meets_lab_count_bounds() {
    for seed in 0..20 {
        let faults = Faults {
            drop: 0.0,
            duplicate: 0.0,
            delay_max: 0,
            long_delay: 0.0,
            crash: 0.0,
            crash_in_ready: 0.0,
            restart: 0.0,
            partition: 0.0,
            skip_tick: 0.0,
        };
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sim = Sim::build(seed, rng, 3, Config::default(), faults);
        while sim.leader_slot().is_none() {
            calm_tick(&mut sim);
            assert!(sim.now <= 500, "seed {seed}: no leader within 5 s");
        }
        let election = sim.stats.requests;
        assert!(
            (1..=30).contains(&election),
            "seed {seed}: election used {election} RPCs"
        );
        for _ in 0..50 {
            calm_tick(&mut sim);
        }
        let leader = sim.leader_slot().expect("stable leader");
        let before = sim.stats.requests;
        // Like the lab: 1 + 11 proposals started without waiting, here one
        // per tick so each goes out in its own Ready (no driver batching).
        let mut last = 0;
        for round in 1..=12 {
            let (index, _) = sim.propose(leader).expect("leader accepts");
            assert_eq!(index, round, "seed {seed}: proposal landed at {index}");
            last = index;
            calm_tick(&mut sim);
        }
        let start = sim.now;
        while !sim.nodes.iter().all(|n| n.service.applied >= last) {
            calm_tick(&mut sim);
            assert!(sim.now < start + 100, "seed {seed}: agreement stuck");
        }
        let agreement = sim.stats.requests - before;
        assert!(
            agreement <= 42,
            "seed {seed}: 12 agreements used {agreement} RPCs"
        );
        let before = (sim.stats.requests, sim.stats.messages);
        let heartbeats_before = sim.stats.requests;
        for _ in 0..100 {
            calm_tick(&mut sim);
        }
        let idle = sim.stats.messages - before.1;
        assert!(idle <= 60, "seed {seed}: 1 s idle used {idle} messages");
        let per_peer = (sim.stats.requests - heartbeats_before) / 2;
        assert!(
            per_peer <= 10,
            "seed {seed}: {per_peer} heartbeats per second per peer"
        );
        assert_eq!(
            sim.leader_slot(),
            Some(leader),
            "seed {seed}: leadership changed while calm"
        );
    }
}

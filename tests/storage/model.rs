//! Model test: random batches and reopens applied to a store and to a plain
//! BTreeMap model written independently from the engine; after every step
//! the store's whole observable state, and every error, must match the model.
//!
//! Seeded: the seed is `PROPTEST_RNG_SEED` or a fixed default, and every
//! failure message says how to replay it.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError};
use raftkv::raft::{Entry, EntryKind, HardState, SnapshotMeta};
use raftkv::storage::{GroupId, Storage, StorageError, VersionedValue, WriteBatch};

use super::{Dump, GroupDump, Harness, MemHarness, SledHarness, WalHarness, dump};

const DEFAULT_SEED: u64 = 0x5eed_2024;

fn seed() -> u64 {
    std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed()),
        ..Config::default()
    }
}

fn replay_hint() -> String {
    format!(
        "seed {}; replay with PROPTEST_RNG_SEED={} cargo test --release --test storage model",
        seed(),
        seed()
    )
}

/// One write, with positions relative to the group's state when it runs.
#[derive(Clone, Debug)]
enum ModelOp {
    HardState {
        group: GroupId,
        term: u64,
        voted_for: Option<u64>,
    },
    /// Appends `count` entries starting at `last_index + 1 + start`.
    Append {
        group: GroupId,
        start: i64,
        count: u64,
        term_bump: u64,
        data: u8,
    },
    /// Compacts through `last_index - back`.
    Compact {
        group: GroupId,
        back: i64,
    },
    /// Snapshot at `last_index + offset`, with the log's term there when `matching`.
    Snapshot {
        group: GroupId,
        offset: i64,
        matching: bool,
        data: u8,
    },
    KvPut {
        ns: u64,
        key: u8,
        value: u8,
        version: u64,
    },
    KvDelete {
        ns: u64,
        key: u8,
    },
    SetApplied {
        ns: u64,
        index: u64,
    },
    ReplaceAll {
        ns: u64,
        entries: Vec<(u8, u8, u64)>,
        applied: u64,
    },
    MrPut {
        key: u8,
        value: u8,
    },
    MrDelete {
        key: u8,
    },
}

#[derive(Clone, Debug)]
enum Transition {
    Commit(Vec<ModelOp>),
    Reopen,
}

fn op() -> impl Strategy<Value = ModelOp> {
    let group = 0u64..3;
    prop_oneof![
        1 => (group.clone(), 0u64..6, proptest::option::of(0u64..4))
            .prop_map(|(group, term, voted_for)| ModelOp::HardState { group, term, voted_for }),
        4 => (group.clone(), -4i64..=1, 0u64..5, 0u64..2, any::<u8>())
            .prop_map(|(group, start, count, term_bump, data)| ModelOp::Append { group, start, count, term_bump, data }),
        1 => (group.clone(), -1i64..6).prop_map(|(group, back)| ModelOp::Compact { group, back }),
        1 => (group, -4i64..4, any::<bool>(), any::<u8>())
            .prop_map(|(group, offset, matching, data)| ModelOp::Snapshot { group, offset, matching, data }),
        2 => (0u64..2, 0u8..6, any::<u8>(), 0u64..4)
            .prop_map(|(ns, key, value, version)| ModelOp::KvPut { ns, key, value, version }),
        1 => (0u64..2, 0u8..6).prop_map(|(ns, key)| ModelOp::KvDelete { ns, key }),
        1 => (0u64..2, 0u64..30).prop_map(|(ns, index)| ModelOp::SetApplied { ns, index }),
        1 => (0u64..2, vec((0u8..6, any::<u8>(), 0u64..4), 0..4), 0u64..30)
            .prop_map(|(ns, entries, applied)| ModelOp::ReplaceAll { ns, entries, applied }),
        1 => (0u8..5, any::<u8>()).prop_map(|(key, value)| ModelOp::MrPut { key, value }),
        1 => (0u8..5).prop_map(|key| ModelOp::MrDelete { key }),
    ]
}

fn transition() -> impl Strategy<Value = Transition> {
    prop_oneof![
        6 => vec(op(), 1..5).prop_map(Transition::Commit),
        1 => Just(Transition::Reopen),
    ]
}

fn kv_key(key: u8) -> Bytes {
    Bytes::from(format!("key{key}"))
}

fn mr_key(key: u8) -> Bytes {
    Bytes::from(format!(
        "{}/{key}",
        if key % 2 == 0 { "map" } else { "reduce" }
    ))
}

fn bytes_of(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add(i as u8))
            .collect::<Vec<u8>>(),
    )
}

#[derive(Clone, Debug, Default)]
struct GroupModel {
    exists: bool,
    hard_state: HardState,
    base: (u64, u64),
    log: BTreeMap<u64, Entry>,
    snapshot: Option<(SnapshotMeta, Bytes)>,
}

impl GroupModel {
    fn last(&self) -> (u64, u64) {
        self.log
            .values()
            .next_back()
            .map_or(self.base, |e| (e.index, e.term))
    }

    fn term(&self, index: u64) -> u64 {
        if index == self.base.0 {
            self.base.1
        } else {
            self.log[&index].term
        }
    }
}

#[derive(Clone, Debug, Default)]
struct NamespaceModel {
    applied: Option<u64>,
    map: BTreeMap<Bytes, VersionedValue>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    groups: BTreeMap<GroupId, GroupModel>,
    kv: BTreeMap<u64, NamespaceModel>,
    mr: BTreeMap<Bytes, Bytes>,
}

/// What a write turns into: the concrete write for the store, or the kind of
/// error the model expects.
impl Model {
    /// Applies one op to the model and adds the concrete write to `batch`;
    /// `Err(kind)` when the store must reject the batch with that error kind.
    fn apply(&mut self, op: &ModelOp, batch: &mut WriteBatch) -> Result<(), &'static str> {
        match op {
            ModelOp::HardState {
                group,
                term,
                voted_for,
            } => {
                let hard_state = HardState {
                    term: *term,
                    voted_for: *voted_for,
                };
                batch.set_hard_state(*group, hard_state);
                let g = self.groups.entry(*group).or_default();
                g.hard_state = hard_state;
                g.exists = true;
            }
            ModelOp::Append {
                group,
                start,
                count,
                term_bump,
                data,
            } => {
                let g = self.groups.entry(*group).or_default();
                let (last, last_term) = g.last();
                let first = (last as i64 + 1 + start).max(0) as u64;
                let term = (last_term + term_bump).max(1);
                let new: Vec<Entry> = (first..first + count)
                    .map(|index| Entry {
                        index,
                        term,
                        kind: if index % 3 == 0 {
                            EntryKind::Noop
                        } else {
                            EntryKind::Normal
                        },
                        data: bytes_of(*data, (index % 4) as usize * 3),
                    })
                    .collect();
                batch.append(*group, new.clone());
                if new.is_empty() {
                    return Ok(());
                }
                if first == 0 {
                    return Err("BadEntries");
                }
                if first <= g.base.0 {
                    return Err("Compacted");
                }
                if first > last + 1 {
                    return Err("LogGap");
                }
                g.log.split_off(&first);
                g.log.extend(new.into_iter().map(|e| (e.index, e)));
                g.exists = true;
            }
            ModelOp::Compact { group, back } => {
                let g = self.groups.entry(*group).or_default();
                let through = (g.last().0 as i64 - back).max(0) as u64;
                batch.compact(*group, through);
                if through <= g.base.0 {
                    return Ok(());
                }
                if through > g.last().0 {
                    return Err("Unavailable");
                }
                let term = g.term(through);
                g.log = g.log.split_off(&(through + 1));
                g.base = (through, term);
                g.exists = true;
            }
            ModelOp::Snapshot {
                group,
                offset,
                matching,
                data,
            } => {
                let g = self.groups.entry(*group).or_default();
                let (last, last_term) = g.last();
                let index = (last as i64 + offset).max(0) as u64;
                let in_log = index >= g.base.0 && index <= last;
                let term = if *matching && in_log {
                    g.term(index)
                } else {
                    last_term + 1
                };
                let meta = SnapshotMeta {
                    last_included_index: index,
                    last_included_term: term,
                };
                let data = bytes_of(*data, 5);
                batch.install_snapshot(*group, meta, data.clone());
                if index == 0 {
                    return Err("InvalidArgument");
                }
                if index < g.base.0 {
                    return Err("StaleSnapshot");
                }
                if in_log && g.term(index) == term {
                    g.log = g.log.split_off(&(index + 1));
                } else {
                    g.log.clear();
                }
                g.base = (index, term);
                g.snapshot = Some((meta, data));
                g.exists = true;
            }
            ModelOp::KvPut {
                ns,
                key,
                value,
                version,
            } => {
                let value = VersionedValue {
                    value: bytes_of(*value, 3),
                    version: *version,
                };
                batch.kv_put(*ns, kv_key(*key), value.value.clone(), *version);
                self.kv
                    .entry(*ns)
                    .or_default()
                    .map
                    .insert(kv_key(*key), value);
            }
            ModelOp::KvDelete { ns, key } => {
                batch.kv_delete(*ns, kv_key(*key));
                self.kv.entry(*ns).or_default().map.remove(&kv_key(*key));
            }
            ModelOp::SetApplied { ns, index } => {
                batch.set_applied_index(*ns, *index);
                self.kv.entry(*ns).or_default().applied = Some(*index);
            }
            ModelOp::ReplaceAll {
                ns,
                entries,
                applied,
            } => {
                let entries: Vec<(Bytes, VersionedValue)> = entries
                    .iter()
                    .map(|(k, v, version)| {
                        (
                            kv_key(*k),
                            VersionedValue {
                                value: bytes_of(*v, 2),
                                version: *version,
                            },
                        )
                    })
                    .collect();
                batch.kv_replace_all(*ns, entries.clone(), *applied);
                let namespace = self.kv.entry(*ns).or_default();
                namespace.map = entries.into_iter().collect();
                namespace.applied = Some(*applied);
            }
            ModelOp::MrPut { key, value } => {
                batch.mr_put(mr_key(*key), bytes_of(*value, 4));
                self.mr.insert(mr_key(*key), bytes_of(*value, 4));
            }
            ModelOp::MrDelete { key } => {
                batch.mr_delete(mr_key(*key));
                self.mr.remove(&mr_key(*key));
            }
        }
        Ok(())
    }

    fn dump(&self) -> Dump {
        let groups = self
            .groups
            .iter()
            .filter(|(_, g)| g.exists)
            .map(|(id, g)| {
                let dump = GroupDump {
                    hard_state: g.hard_state,
                    first_index: g.base.0 + 1,
                    last_index: g.last().0,
                    prev_term: g.base.1,
                    entries: g.log.values().cloned().collect(),
                    snapshot: g.snapshot.clone().unwrap_or_default(),
                };
                (*id, dump)
            })
            .collect();
        let kv = self
            .kv
            .iter()
            .filter(|(_, n)| n.applied.is_some() || !n.map.is_empty())
            .map(|(ns, n)| {
                (
                    *ns,
                    n.applied.unwrap_or(0),
                    n.map.clone().into_iter().collect(),
                )
            })
            .collect();
        let mr = self.mr.clone().into_iter().collect();
        Dump { groups, kv, mr }
    }
}

fn error_kind(error: &StorageError) -> &'static str {
    match error {
        StorageError::BadEntries { .. } => "BadEntries",
        StorageError::Compacted { .. } => "Compacted",
        StorageError::LogGap { .. } => "LogGap",
        StorageError::Unavailable { .. } => "Unavailable",
        StorageError::StaleSnapshot { .. } => "StaleSnapshot",
        StorageError::InvalidArgument(_) => "InvalidArgument",
        _ => "other",
    }
}

fn run<H: Harness>(mut harness: H, transitions: Vec<Transition>) -> Result<(), TestCaseError> {
    let mut store = harness.open();
    let mut model = Model::default();
    for (step, transition) in transitions.into_iter().enumerate() {
        match transition {
            Transition::Reopen => store = harness.reopen(store),
            Transition::Commit(ops) => {
                let mut next = model.clone();
                let mut batch = WriteBatch::new();
                let mut expected = Ok(());
                for op in &ops {
                    if let Err(kind) = next.apply(op, &mut batch) {
                        expected = Err(kind);
                        break;
                    }
                }
                let got = store.commit(batch).map_err(|e| error_kind(&e));
                prop_assert_eq!(
                    got,
                    expected,
                    "step {}: commit of {:?}; {}",
                    step,
                    ops,
                    replay_hint()
                );
                if expected.is_ok() {
                    model = next;
                }
            }
        }
        prop_assert_eq!(
            dump(&store),
            model.dump(),
            "after step {}; {}",
            step,
            replay_hint()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]
    #[test]
    fn mem_store_matches_the_model(transitions in vec(transition(), 1..40)) {
        run(MemHarness::default(), transitions)?;
    }
}

proptest! {
    #![proptest_config(config(32))]
    #[test]
    fn sled_store_matches_the_model(transitions in vec(transition(), 1..40)) {
        run(SledHarness::default(), transitions)?;
    }
}

proptest! {
    #![proptest_config(config(64))]
    #[test]
    fn wal_store_matches_the_model(transitions in vec(transition(), 1..40)) {
        // Small checkpoints: the runs cross several, reopening in between.
        let harness = WalHarness { checkpoint_bytes: 512, ..WalHarness::default() };
        run(harness, transitions)?;
    }
}

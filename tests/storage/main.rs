//! Storage engine tests: one conformance suite run against both stores, a
//! model test against BTreeMaps, a SIGKILL crash test, bad-input tests and
//! tests of `raftkv inspect`. One test binary keeps link time down.

mod bad_input;
mod conformance;
mod crash;
mod inspect_cli;
mod model;

use bytes::Bytes;
use raftkv::raft::{Entry, EntryKind, HardState, SnapshotMeta};
use raftkv::storage::{
    GroupId, Limits, MemDisk, MemStore, NodeStorage, StateMachineId, Store, StoreConfig,
    StoreEngine, VersionedValue,
};

/// Opens and reopens one kind of store for the conformance suite.
pub trait Harness {
    /// The store under test.
    type S: NodeStorage;
    /// Opens the store (fresh on the first call) with `limits`.
    fn open_with(&mut self, limits: Limits) -> Self::S;
    /// Opens the store with default limits.
    fn open(&mut self) -> Self::S {
        self.open_with(Limits::default())
    }
    /// Stops `store` and opens the same durable state again.
    fn reopen(&mut self, store: Self::S) -> Self::S;
}

/// A sled [`Store`] in a temporary directory.
pub struct SledHarness {
    pub dir: tempfile::TempDir,
}

impl Default for SledHarness {
    fn default() -> SledHarness {
        SledHarness {
            dir: tempfile::tempdir().expect("create a temporary directory"),
        }
    }
}

impl Harness for SledHarness {
    type S = Store;
    fn open_with(&mut self, limits: Limits) -> Store {
        let config = StoreConfig {
            limits,
            ..StoreConfig::default()
        };
        Store::open_with(self.dir.path(), &config).expect("open the sled store")
    }
    fn reopen(&mut self, store: Store) -> Store {
        drop(store);
        self.open()
    }
}

/// A write-ahead-log [`Store`] in a temporary directory; `checkpoint_bytes`
/// small enough that the suite's tests cross checkpoints.
pub struct WalHarness {
    pub dir: tempfile::TempDir,
    pub checkpoint_bytes: u64,
}

impl Default for WalHarness {
    fn default() -> WalHarness {
        WalHarness {
            dir: tempfile::tempdir().expect("create a temporary directory"),
            checkpoint_bytes: 4096,
        }
    }
}

impl WalHarness {
    pub fn config(&self, limits: Limits) -> StoreConfig {
        StoreConfig {
            limits,
            engine: StoreEngine::Wal,
            wal_checkpoint_bytes: self.checkpoint_bytes,
            ..StoreConfig::default()
        }
    }
}

impl Harness for WalHarness {
    type S = Store;
    fn open_with(&mut self, limits: Limits) -> Store {
        let store =
            Store::open_with(self.dir.path(), &self.config(limits)).expect("open the wal store");
        assert_eq!(store.engine(), StoreEngine::Wal);
        store
    }
    fn reopen(&mut self, store: Store) -> Store {
        drop(store);
        self.open()
    }
}

/// A [`MemStore`]; reopening simulates a crash by forking the disk, and keeps
/// the dead instance alive to show it cannot reach the new one.
pub struct MemHarness {
    pub disk: MemDisk,
    pub dead: Vec<MemStore>,
}

impl Default for MemHarness {
    fn default() -> MemHarness {
        MemHarness {
            disk: MemDisk::new(),
            dead: Vec::new(),
        }
    }
}

impl Harness for MemHarness {
    type S = MemStore;
    fn open_with(&mut self, limits: Limits) -> MemStore {
        MemStore::open_with(&self.disk, limits).expect("open the memory store")
    }
    fn reopen(&mut self, store: MemStore) -> MemStore {
        self.disk = self.disk.fork();
        self.dead.push(store);
        self.open()
    }
}

/// An entry whose data is derived from its index and term.
pub fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("cmd-{index}-{term}")),
    }
}

/// Consecutive entries `first..=last`, all of `term`.
pub fn entries(first: u64, last: u64, term: u64) -> Vec<Entry> {
    (first..=last).map(|index| entry(index, term)).collect()
}

/// Everything observable about one Raft group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDump {
    pub hard_state: HardState,
    pub first_index: u64,
    pub last_index: u64,
    pub prev_term: u64,
    pub entries: Vec<Entry>,
    pub snapshot: (SnapshotMeta, Bytes),
}

/// A KV namespace: id, applied index and all entries in key order.
pub type NamespaceDump = (StateMachineId, u64, Vec<(Bytes, VersionedValue)>);

/// Everything observable in a store, for comparing two stores or a store
/// with a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dump {
    pub groups: Vec<(GroupId, GroupDump)>,
    pub kv: Vec<NamespaceDump>,
    pub mr: Vec<(Bytes, Bytes)>,
}

pub fn dump<S: NodeStorage>(store: &S) -> Dump {
    let groups = store
        .groups()
        .unwrap()
        .into_iter()
        .map(|group| {
            let first_index = store.first_index(group).unwrap();
            let last_index = store.last_index(group).unwrap();
            let group_dump = GroupDump {
                hard_state: store.hard_state(group).unwrap(),
                first_index,
                last_index,
                prev_term: store.term(group, first_index - 1).unwrap(),
                entries: store
                    .entries(group, first_index, last_index + 1, u64::MAX)
                    .unwrap(),
                snapshot: store.snapshot(group).unwrap(),
            };
            (group, group_dump)
        })
        .collect();
    let kv = store
        .kv_namespaces()
        .unwrap()
        .into_iter()
        .map(|ns| {
            (
                ns,
                store.applied_index(ns).unwrap(),
                store.kv_scan(ns, None, usize::MAX).unwrap(),
            )
        })
        .collect();
    let mr = store.mr_scan_prefix(b"", usize::MAX).unwrap();
    Dump { groups, kv, mr }
}

//! One conformance suite, run against both [`Store`] (sled) and [`MemStore`]:
//! every function below takes a [`Harness`] and is instantiated for both by
//! the macro at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use raftkv::raft::{HardState, SnapshotMeta};
use raftkv::storage::{
    KvStorage, Limits, MemDisk, MemStore, MrStorage, NodeStorage, RaftLogStorage, Storage,
    StorageError, VersionedValue, WriteBatch,
};

use super::{Harness, dump, entries, entry};

const G: u64 = 1;

fn snap(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        last_included_index: index,
        last_included_term: term,
    }
}

fn vv(value: &'static str, version: u64) -> VersionedValue {
    VersionedValue {
        value: Bytes::from_static(value.as_bytes()),
        version,
    }
}

pub fn empty_store_reads_as_defaults<H: Harness>(h: &mut H) {
    // A fresh store reports empty logs, no snapshot, empty maps and no records.
    let store = h.open();
    let check = |store: &H::S| {
        assert!(store.groups().unwrap().is_empty());
        assert_eq!(store.hard_state(G).unwrap(), HardState::default());
        assert_eq!(store.first_index(G).unwrap(), 1);
        assert_eq!(store.last_index(G).unwrap(), 0);
        assert_eq!(store.term(G, 0).unwrap(), 0);
        assert!(matches!(
            store.term(G, 1),
            Err(StorageError::Unavailable {
                index: 1,
                last_index: 0,
                ..
            })
        ));
        assert!(store.entries(G, 1, 1, u64::MAX).unwrap().is_empty());
        assert_eq!(
            store.snapshot(G).unwrap(),
            (SnapshotMeta::default(), Bytes::new())
        );
        assert_eq!(store.kv_get(0, b"k").unwrap(), None);
        assert_eq!(store.applied_index(0).unwrap(), 0);
        assert!(store.kv_namespaces().unwrap().is_empty());
        assert_eq!(store.kv_key_count(0).unwrap(), 0);
        assert_eq!(store.mr_get(b"k").unwrap(), None);
        assert_eq!(store.mr_record_count().unwrap(), 0);
        store.commit(WriteBatch::new()).unwrap();
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn appended_entries_survive_reopen<H: Harness>(h: &mut H) {
    // Appended entries read back identically, before and after a reopen.
    let store = h.open();
    store.append(G, &entries(1, 3, 1)).unwrap();
    store.append(G, &entries(4, 6, 2)).unwrap();
    let mut expected = entries(1, 3, 1);
    expected.extend(entries(4, 6, 2));
    let store = h.reopen(store);
    assert_eq!(store.groups().unwrap(), vec![G]);
    assert_eq!(store.first_index(G).unwrap(), 1);
    assert_eq!(store.last_index(G).unwrap(), 6);
    assert_eq!(store.entries(G, 1, 7, u64::MAX).unwrap(), expected);
    assert_eq!(
        store.entries(G, 3, 5, u64::MAX).unwrap(),
        expected[2..4].to_vec()
    );
    for e in &expected {
        assert_eq!(store.term(G, e.index).unwrap(), e.term);
    }
}

pub fn append_truncates_the_conflicting_suffix<H: Harness>(h: &mut H) {
    // An append starting inside the log replaces everything from its first index on.
    let store = h.open();
    store.append(G, &entries(1, 5, 1)).unwrap();
    store.append(G, &entries(3, 4, 2)).unwrap();
    let mut expected = entries(1, 2, 1);
    expected.extend(entries(3, 4, 2));
    let check = |store: &H::S| {
        assert_eq!(store.last_index(G).unwrap(), 4);
        assert_eq!(store.term(G, 4).unwrap(), 2);
        assert!(matches!(
            store.term(G, 5),
            Err(StorageError::Unavailable { .. })
        ));
        assert_eq!(store.entries(G, 1, 5, u64::MAX).unwrap(), expected);
        assert!(matches!(
            store.entries(G, 1, 6, u64::MAX),
            Err(StorageError::Unavailable { .. })
        ));
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn invalid_appends_are_rejected_without_change<H: Harness>(h: &mut H) {
    // Gaps, non-consecutive entries, index or term 0 and appends into the compacted prefix are typed errors that change nothing.
    let store = h.open();
    store.append(G, &entries(1, 4, 1)).unwrap();
    let before = dump(&store);
    assert!(matches!(
        store.append(G, &entries(6, 7, 1)),
        Err(StorageError::LogGap {
            index: 6,
            last_index: 4,
            ..
        })
    ));
    let mut holey = entries(5, 6, 1);
    holey[1].index = 7;
    assert!(matches!(
        store.append(G, &holey),
        Err(StorageError::BadEntries { .. })
    ));
    assert!(matches!(
        store.append(G, &[entry(5, 0)]),
        Err(StorageError::BadEntries { .. })
    ));
    assert!(matches!(
        store.append(G, &[entry(0, 1)]),
        Err(StorageError::BadEntries { .. })
    ));
    assert_eq!(dump(&store), before);
    store.compact(G, 2).unwrap();
    assert!(matches!(
        store.append(G, &entries(2, 3, 2)),
        Err(StorageError::Compacted {
            index: 2,
            first_index: 3,
            ..
        })
    ));
    store.append(G, &[]).unwrap();
    assert_eq!(store.last_index(G).unwrap(), 4);
}

pub fn entries_respects_bounds_and_bytes_max<H: Harness>(h: &mut H) {
    // entries() stops at bytes_max but returns at least one entry, and rejects out-of-range bounds.
    let store = h.open();
    store.append(G, &entries(1, 9, 1)).unwrap(); // equal-sized data: "cmd-N-1"
    let size = entry(1, 1).data.len() as u64;
    assert_eq!(store.entries(G, 1, 10, 2 * size).unwrap().len(), 2);
    assert_eq!(store.entries(G, 1, 10, 2 * size + 1).unwrap().len(), 2);
    assert_eq!(store.entries(G, 1, 10, 3 * size).unwrap().len(), 3);
    assert_eq!(store.entries(G, 4, 10, 0).unwrap(), vec![entry(4, 1)]);
    assert!(store.entries(G, 5, 5, 0).unwrap().is_empty());
    assert!(matches!(
        store.entries(G, 0, 3, u64::MAX),
        Err(StorageError::Compacted { .. })
    ));
    assert!(matches!(
        store.entries(G, 1, 11, u64::MAX),
        Err(StorageError::Unavailable { .. })
    ));
    assert!(matches!(
        store.entries(G, 5, 4, u64::MAX),
        Err(StorageError::InvalidArgument(_))
    ));
}

pub fn compaction_discards_the_prefix_and_keeps_its_term<H: Harness>(h: &mut H) {
    // compact(i) drops entries through i, still answers term(i), and is a no-op below the base.
    let store = h.open();
    store.append(G, &entries(1, 5, 1)).unwrap();
    store.append(G, &entries(6, 10, 2)).unwrap();
    let bytes_before = store.raft_state_bytes(G).unwrap();
    store.compact(G, 6).unwrap();
    store.compact(G, 3).unwrap();
    assert!(matches!(
        store.compact(G, 11),
        Err(StorageError::Unavailable { index: 11, .. })
    ));
    let check = |store: &H::S| {
        assert_eq!(store.first_index(G).unwrap(), 7);
        assert_eq!(store.last_index(G).unwrap(), 10);
        assert_eq!(store.term(G, 6).unwrap(), 2);
        assert!(matches!(
            store.term(G, 5),
            Err(StorageError::Compacted {
                index: 5,
                first_index: 7,
                ..
            })
        ));
        assert!(matches!(
            store.entries(G, 6, 8, u64::MAX),
            Err(StorageError::Compacted { .. })
        ));
        assert_eq!(
            store.entries(G, 7, 11, u64::MAX).unwrap(),
            entries(7, 10, 2)
        );
        assert_eq!(store.snapshot_meta(G).unwrap(), SnapshotMeta::default());
        assert!(store.raft_state_bytes(G).unwrap() < bytes_before);
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
    // Compacting the whole log leaves an empty log after the base.
    store.compact(G, 10).unwrap();
    let store = h.reopen(store);
    assert_eq!(
        (store.first_index(G).unwrap(), store.last_index(G).unwrap()),
        (11, 10)
    );
    assert_eq!(store.term(G, 10).unwrap(), 2);
    store.append(G, &entries(11, 11, 3)).unwrap();
    assert_eq!(
        store.entries(G, 11, 12, u64::MAX).unwrap(),
        entries(11, 11, 3)
    );
}

pub fn compacting_a_long_log_purges_it_over_later_commits<H: Harness>(h: &mut H) {
    // Compacting 5,000 entries only moves the base; the stale entries are deleted at most
    // max(64, 2 x appended) per later commit, a reopen mid-purge reads the same log, and
    // raft_state_bytes counts only the live log throughout.
    let store = h.open();
    for first in (1..=5000).step_by(500) {
        store.append(G, &entries(first, first + 499, 1)).unwrap();
    }
    store.append(G, &entries(5001, 5010, 2)).unwrap();
    let live_bytes = |store: &H::S| store.raft_state_bytes(G).unwrap();
    let full = live_bytes(&store);
    store.compact(G, 5000).unwrap();
    let after_compaction = live_bytes(&store);
    assert!(
        after_compaction < full / 100,
        "{after_compaction} of {full}"
    );
    let check = |store: &H::S, last: u64| {
        assert_eq!(store.first_index(G).unwrap(), 5001);
        assert_eq!(store.last_index(G).unwrap(), last);
        assert_eq!(store.term(G, 5000).unwrap(), 1);
        assert!(matches!(
            store.term(G, 4000),
            Err(StorageError::Compacted {
                first_index: 5001,
                ..
            })
        ));
        assert!(matches!(
            store.entries(G, 1, 5, u64::MAX),
            Err(StorageError::Compacted { .. })
        ));
        assert_eq!(
            store.entries(G, 5001, 5011, u64::MAX).unwrap(),
            entries(5001, 5010, 2)
        );
    };
    check(&store, 5010);
    // One more commit purges part of the stale prefix; reopen in the middle of the purge.
    store
        .set_hard_state(
            G,
            HardState {
                term: 2,
                voted_for: Some(1),
            },
        )
        .unwrap();
    let before_reopen = live_bytes(&store);
    let store = h.reopen(store);
    check(&store, 5010);
    assert_eq!(live_bytes(&store), before_reopen);
    // Appends keep working and keep purging; a later compaction of the new entries too.
    for index in 5011..=5020 {
        store.append(G, &entries(index, index, 2)).unwrap();
    }
    store.compact(G, 5010).unwrap();
    let store = h.reopen(store);
    assert_eq!(store.first_index(G).unwrap(), 5011);
    assert_eq!(
        store.entries(G, 5011, 5021, u64::MAX).unwrap(),
        entries(5011, 5020, 2)
    );
    // A snapshot that discards the log leaves nothing stale readable either.
    store
        .install_snapshot(G, snap(9000, 3), Bytes::from_static(b"state"))
        .unwrap();
    let store = h.reopen(store);
    assert_eq!(
        (store.first_index(G).unwrap(), store.last_index(G).unwrap()),
        (9001, 9000)
    );
    store.append(G, &entries(9001, 9002, 3)).unwrap();
    assert_eq!(
        store.entries(G, 9001, 9003, u64::MAX).unwrap(),
        entries(9001, 9002, 3)
    );
}

pub fn snapshot_keeps_a_matching_suffix<H: Harness>(h: &mut H) {
    // A snapshot whose last entry matches the log keeps the entries after it.
    let store = h.open();
    store.append(G, &entries(1, 10, 1)).unwrap();
    let data = Bytes::from_static(b"state at 6");
    store.install_snapshot(G, snap(6, 1), data.clone()).unwrap();
    let check = |store: &H::S| {
        assert_eq!(store.first_index(G).unwrap(), 7);
        assert_eq!(store.last_index(G).unwrap(), 10);
        assert_eq!(store.term(G, 6).unwrap(), 1);
        assert_eq!(
            store.entries(G, 7, 11, u64::MAX).unwrap(),
            entries(7, 10, 1)
        );
        assert_eq!(store.snapshot(G).unwrap(), (snap(6, 1), data.clone()));
        assert_eq!(store.snapshot_meta(G).unwrap(), snap(6, 1));
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn snapshot_discards_a_conflicting_or_shorter_log<H: Harness>(h: &mut H) {
    // A snapshot whose last entry is missing or has another term discards the whole log.
    let store = h.open();
    store.append(G, &entries(1, 5, 1)).unwrap();
    store
        .install_snapshot(G, snap(3, 2), Bytes::from_static(b"a"))
        .unwrap();
    assert_eq!(store.first_index(G).unwrap(), 4);
    assert_eq!(store.last_index(G).unwrap(), 3);
    assert_eq!(store.term(G, 3).unwrap(), 2);
    store.append(G, &entries(4, 5, 2)).unwrap();
    store
        .install_snapshot(G, snap(20, 3), Bytes::from_static(b"b"))
        .unwrap();
    let check = |store: &H::S| {
        assert_eq!(store.first_index(G).unwrap(), 21);
        assert_eq!(store.last_index(G).unwrap(), 20);
        assert_eq!(store.term(G, 20).unwrap(), 3);
        assert!(store.entries(G, 21, 21, u64::MAX).unwrap().is_empty());
        assert_eq!(
            store.snapshot(G).unwrap(),
            (snap(20, 3), Bytes::from_static(b"b"))
        );
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn stale_and_empty_snapshots_are_rejected<H: Harness>(h: &mut H) {
    // A snapshot below the compacted prefix, or at index 0, is an error that changes nothing.
    let store = h.open();
    store.append(G, &entries(1, 8, 1)).unwrap();
    store
        .install_snapshot(G, snap(6, 1), Bytes::from_static(b"x"))
        .unwrap();
    let before = dump(&store);
    assert!(matches!(
        store.install_snapshot(G, snap(4, 1), Bytes::new()),
        Err(StorageError::StaleSnapshot {
            index: 4,
            compacted_index: 6,
            ..
        })
    ));
    assert!(matches!(
        store.install_snapshot(G, snap(0, 0), Bytes::new()),
        Err(StorageError::InvalidArgument(_))
    ));
    assert_eq!(dump(&store), before);
    // Re-installing at the same position replaces the data.
    store
        .install_snapshot(G, snap(6, 1), Bytes::from_static(b"y"))
        .unwrap();
    assert_eq!(store.snapshot(G).unwrap().1, Bytes::from_static(b"y"));
    assert_eq!(store.last_index(G).unwrap(), 8);
}

pub fn hard_state_survives_reopen<H: Harness>(h: &mut H) {
    // The last hard state written is the one read back after a reopen.
    let store = h.open();
    store
        .set_hard_state(
            G,
            HardState {
                term: 3,
                voted_for: Some(2),
            },
        )
        .unwrap();
    store
        .set_hard_state(
            G,
            HardState {
                term: 4,
                voted_for: None,
            },
        )
        .unwrap();
    let store = h.reopen(store);
    assert_eq!(
        store.hard_state(G).unwrap(),
        HardState {
            term: 4,
            voted_for: None
        }
    );
    assert_eq!(store.groups().unwrap(), vec![G]);
    assert_eq!(store.last_index(G).unwrap(), 0);
}

pub fn groups_are_independent<H: Harness>(h: &mut H) {
    // Logs of different groups (including the extreme ids) never affect each other.
    let store = h.open();
    let groups = [0, 7, u64::MAX];
    for (i, group) in groups.iter().enumerate() {
        store
            .append(*group, &entries(1, 3 + i as u64, i as u64 + 1))
            .unwrap();
    }
    store.compact(7, 2).unwrap();
    store
        .install_snapshot(0, snap(1, 1), Bytes::from_static(b"g0"))
        .unwrap();
    let check = |store: &H::S| {
        assert_eq!(store.groups().unwrap(), groups.to_vec());
        assert_eq!(
            (store.first_index(0).unwrap(), store.last_index(0).unwrap()),
            (2, 3)
        );
        assert_eq!(
            (store.first_index(7).unwrap(), store.last_index(7).unwrap()),
            (3, 4)
        );
        assert_eq!(
            (
                store.first_index(u64::MAX).unwrap(),
                store.last_index(u64::MAX).unwrap()
            ),
            (1, 5)
        );
        assert_eq!(
            store.entries(u64::MAX, 1, 6, u64::MAX).unwrap(),
            entries(1, 5, 3)
        );
        assert_eq!(store.snapshot_meta(7).unwrap(), SnapshotMeta::default());
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn a_failing_batch_changes_nothing<H: Harness>(h: &mut H) {
    // A batch with one invalid write fails as a whole: no group, map or record changes.
    let store = h.open();
    store.append(G, &entries(1, 2, 1)).unwrap();
    let before = dump(&store);
    let mut batch = WriteBatch::new();
    batch
        .set_hard_state(
            G,
            HardState {
                term: 9,
                voted_for: Some(1),
            },
        )
        .append(G, entries(3, 4, 9))
        .append(2, entries(1, 1, 1))
        .kv_put(0, "k", "v", 1)
        .set_applied_index(0, 4)
        .mr_put("task/1", "idle")
        .append(G, entries(9, 9, 9)); // gap: the whole batch fails
    assert!(matches!(
        store.commit(batch),
        Err(StorageError::LogGap { .. })
    ));
    assert_eq!(dump(&store), before);
    let store = h.reopen(store);
    assert_eq!(dump(&store), before);
}

pub fn a_batch_spans_groups_maps_and_records<H: Harness>(h: &mut H) {
    // One batch writes several groups, a KV change with its applied index and MapReduce records together.
    let store = h.open();
    let mut batch = WriteBatch::new();
    batch
        .set_hard_state(
            1,
            HardState {
                term: 2,
                voted_for: Some(3),
            },
        )
        .append(1, entries(1, 3, 2))
        .append(2, entries(1, 1, 1))
        .kv_put(5, "a", "1", 1)
        .kv_put(5, "b", "2", 1)
        .set_applied_index(5, 3)
        .mr_put("task/1", "done");
    store.commit(batch).unwrap();
    let store = h.reopen(store);
    assert_eq!(store.hard_state(1).unwrap().term, 2);
    assert_eq!(store.last_index(1).unwrap(), 3);
    assert_eq!(store.last_index(2).unwrap(), 1);
    assert_eq!(store.kv_get(5, b"b").unwrap(), Some(vv("2", 1)));
    assert_eq!(store.applied_index(5).unwrap(), 3);
    assert_eq!(
        store.mr_get(b"task/1").unwrap(),
        Some(Bytes::from_static(b"done"))
    );
}

pub fn writes_in_a_batch_see_earlier_writes<H: Harness>(h: &mut H) {
    // Later writes of a batch act on the state left by earlier ones (append, truncate, compact, snapshot, replace).
    let store = h.open();
    store.append(G, &entries(1, 2, 1)).unwrap();
    let mut batch = WriteBatch::new();
    batch
        .append(G, entries(3, 8, 1))
        .append(G, entries(6, 7, 2)) // truncates 6..=8 of the previous append
        .compact(G, 4) // term 1, from the first append of this batch
        .install_snapshot(G, snap(6, 2), Bytes::from_static(b"s")) // matches the second append: keeps 7
        .kv_put(0, "gone", "x", 1)
        .kv_replace_all(0, [(Bytes::from_static(b"kept"), vv("y", 4))], 6);
    store.commit(batch).unwrap();
    let check = |store: &H::S| {
        assert_eq!(store.first_index(G).unwrap(), 7);
        assert_eq!(store.last_index(G).unwrap(), 7);
        assert_eq!(store.entries(G, 7, 8, u64::MAX).unwrap(), vec![entry(7, 2)]);
        assert_eq!(store.snapshot_meta(G).unwrap(), snap(6, 2));
        assert_eq!(store.kv_get(0, b"gone").unwrap(), None);
        assert_eq!(store.kv_get(0, b"kept").unwrap(), Some(vv("y", 4)));
        assert_eq!(store.applied_index(0).unwrap(), 6);
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn kv_put_get_delete_by_namespace<H: Harness>(h: &mut H) {
    // KV values carry their versions, deletes remove keys, and namespaces do not see each other.
    let store = h.open();
    let mut batch = WriteBatch::new();
    batch
        .kv_put(0, "k", "v1", 1)
        .kv_put(1, "k", "other", 7)
        .kv_put(0, "", "empty key", 1);
    store.commit(batch).unwrap();
    let mut batch = WriteBatch::new();
    batch
        .kv_put(0, "k", "v2", 2)
        .kv_delete(0, "")
        .kv_delete(0, "never there");
    store.commit(batch).unwrap();
    let check = |store: &H::S| {
        assert_eq!(store.kv_get(0, b"k").unwrap(), Some(vv("v2", 2)));
        assert_eq!(store.kv_get(1, b"k").unwrap(), Some(vv("other", 7)));
        assert_eq!(store.kv_get(0, b"").unwrap(), None);
        assert_eq!(store.kv_key_count(0).unwrap(), 1);
        assert_eq!(store.kv_namespaces().unwrap(), vec![0, 1]);
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn kv_replace_all_replaces_one_namespace<H: Harness>(h: &mut H) {
    // replace_all swaps a namespace's whole map and applied index and leaves other namespaces alone.
    let store = h.open();
    let mut batch = WriteBatch::new();
    batch
        .kv_put(0, "a", "1", 1)
        .kv_put(0, "b", "1", 1)
        .kv_put(0, "c", "1", 1)
        .kv_put(1, "a", "1", 1);
    batch.set_applied_index(0, 3).set_applied_index(1, 9);
    store.commit(batch).unwrap();
    let mut batch = WriteBatch::new();
    batch.kv_replace_all(
        0,
        [
            (Bytes::from_static(b"b"), vv("2", 2)),
            (Bytes::from_static(b"d"), vv("3", 1)),
        ],
        7,
    );
    store.commit(batch).unwrap();
    let check = |store: &H::S| {
        let keys: Vec<Bytes> = store
            .kv_scan(0, None, 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            vec![Bytes::from_static(b"b"), Bytes::from_static(b"d")]
        );
        assert_eq!(store.kv_get(0, b"b").unwrap(), Some(vv("2", 2)));
        assert_eq!(store.applied_index(0).unwrap(), 7);
        assert_eq!(store.kv_get(1, b"a").unwrap(), Some(vv("1", 1)));
        assert_eq!(store.applied_index(1).unwrap(), 9);
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn kv_scan_is_ordered_and_pages<H: Harness>(h: &mut H) {
    // kv_scan returns keys in byte order, honours the limit and pages with `after`.
    let store = h.open();
    let mut batch = WriteBatch::new();
    let mut keys: Vec<Vec<u8>> = (0..25u32)
        .map(|i| format!("key{:02}", (i * 7) % 25).into_bytes())
        .collect();
    keys.push(vec![0xff, 0x00]);
    keys.push(vec![]);
    for key in &keys {
        batch.kv_put(3, key.clone(), "v", 1);
    }
    batch.kv_put(4, "key00", "other namespace", 1);
    store.commit(batch).unwrap();
    keys.sort();
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.kv_scan(3, after.as_deref(), 10).unwrap();
        assert!(page.len() <= 10);
        if page.is_empty() {
            break;
        }
        after = Some(page.last().unwrap().0.to_vec());
        seen.extend(page.into_iter().map(|(k, _)| k.to_vec()));
    }
    assert_eq!(seen, keys);
    assert_eq!(store.kv_key_count(3).unwrap(), keys.len() as u64);
    assert!(store.kv_scan(3, None, 0).unwrap().is_empty());
}

pub fn mapreduce_records_round_trip<H: Harness>(h: &mut H) {
    // MapReduce records support put, get, delete, prefix scans and batching.
    let store = h.open();
    let mut batch = WriteBatch::new();
    batch
        .mr_put("map/0", "idle")
        .mr_put("map/1", "running")
        .mr_put("reduce/0", "idle")
        .mr_put("mapx", "?");
    store.commit(batch).unwrap();
    store.mr_put(b"map/1", b"done").unwrap();
    store.mr_delete(b"mapx").unwrap();
    let check = |store: &H::S| {
        assert_eq!(
            store.mr_get(b"map/1").unwrap(),
            Some(Bytes::from_static(b"done"))
        );
        assert_eq!(store.mr_get(b"mapx").unwrap(), None);
        let maps = store.mr_scan_prefix(b"map/", 10).unwrap();
        assert_eq!(
            maps,
            vec![
                (Bytes::from_static(b"map/0"), Bytes::from_static(b"idle")),
                (Bytes::from_static(b"map/1"), Bytes::from_static(b"done")),
            ]
        );
        assert_eq!(store.mr_scan_prefix(b"", 2).unwrap().len(), 2);
        assert_eq!(store.mr_record_count().unwrap(), 3);
    };
    check(&store);
    let store = h.reopen(store);
    check(&store);
}

pub fn limits_are_enforced<H: Harness>(h: &mut H) {
    // Writes beyond a configured limit fail with LimitExceeded and change nothing.
    let limits = Limits {
        key_bytes_max: 4,
        value_bytes_max: 8,
        entry_bytes_max: 16,
        snapshot_bytes_max: 32,
        batch_bytes_max: 256,
    };
    let store = h.open_with(limits);
    let too_big = |result: Result<(), StorageError>, limit: &str| match result {
        Err(StorageError::LimitExceeded { what, .. }) => assert_eq!(what, limit),
        other => panic!("expected LimitExceeded {limit}, got {other:?}"),
    };
    let mut batch = WriteBatch::new();
    batch.kv_put(0, "12345", "v", 1);
    too_big(store.commit(batch), "key_bytes_max");
    let mut batch = WriteBatch::new();
    batch.kv_put(0, "k", "123456789", 1);
    too_big(store.commit(batch), "value_bytes_max");
    let mut big = entry(1, 1);
    big.data = Bytes::from(vec![0u8; 17]);
    too_big(store.append(G, &[big]), "entry_bytes_max");
    store.append(G, &entries(1, 1, 1)).unwrap();
    too_big(
        store.install_snapshot(G, snap(1, 1), Bytes::from(vec![0u8; 33])),
        "snapshot_bytes_max",
    );
    too_big(store.mr_put(b"k", b"123456789"), "value_bytes_max");
    let mut batch = WriteBatch::new();
    for i in 2..=20 {
        batch.append(G, vec![entry(i, 1)]);
    }
    too_big(store.commit(batch), "batch_bytes_max");
    assert_eq!(store.last_index(G).unwrap(), 1);
    assert_eq!(store.kv_key_count(0).unwrap(), 0);
    assert_eq!(store.mr_record_count().unwrap(), 0);
}

pub fn readers_never_see_half_a_batch<H: Harness>(h: &mut H) {
    // Reads concurrent with truncating and compacting commits always see a contiguous log and a matching KV map.
    let store = h.open();
    store.append(G, &entries(1, 4, 1)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) || reads == 0 {
                let first = store.first_index(G).unwrap();
                let last = store.last_index(G).unwrap();
                match store.entries(G, first, last + 1, u64::MAX) {
                    Ok(got) => {
                        for pair in got.windows(2) {
                            assert_eq!(pair[0].index + 1, pair[1].index);
                        }
                        reads += 1;
                    }
                    // The log moved between the calls: allowed, a torn view is not.
                    Err(StorageError::Compacted { .. } | StorageError::Unavailable { .. }) => {}
                    Err(other) => panic!("torn read: {other}"),
                }
                for (key, value) in store.kv_scan(0, None, usize::MAX).unwrap() {
                    assert_eq!(key, value.value, "key and value come from the same batch");
                }
            }
        })
    };
    for round in 0..60u64 {
        let last = store.last_index(G).unwrap();
        let term = round + 2;
        let mut batch = WriteBatch::new();
        batch
            .append(
                G,
                entries(
                    last.saturating_sub(2).max(store.first_index(G).unwrap()),
                    last + 3,
                    term,
                ),
            )
            .kv_replace_all(
                0,
                (0..5).map(|i| {
                    let kv = Bytes::from(format!("{round}-{i}"));
                    (
                        kv.clone(),
                        VersionedValue {
                            value: kv,
                            version: 1,
                        },
                    )
                }),
                round,
            );
        if round % 5 == 4 {
            batch.compact(G, last - 1);
        }
        store.commit(batch).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader thread");
}

macro_rules! conformance_suite {
    ($module:ident, $harness:expr) => {
        mod $module {
            conformance_suite!(@tests $harness;
                empty_store_reads_as_defaults,
                appended_entries_survive_reopen,
                append_truncates_the_conflicting_suffix,
                invalid_appends_are_rejected_without_change,
                entries_respects_bounds_and_bytes_max,
                compaction_discards_the_prefix_and_keeps_its_term,
                compacting_a_long_log_purges_it_over_later_commits,
                snapshot_keeps_a_matching_suffix,
                snapshot_discards_a_conflicting_or_shorter_log,
                stale_and_empty_snapshots_are_rejected,
                hard_state_survives_reopen,
                groups_are_independent,
                a_failing_batch_changes_nothing,
                a_batch_spans_groups_maps_and_records,
                writes_in_a_batch_see_earlier_writes,
                kv_put_get_delete_by_namespace,
                kv_replace_all_replaces_one_namespace,
                kv_scan_is_ordered_and_pages,
                mapreduce_records_round_trip,
                limits_are_enforced,
                readers_never_see_half_a_batch
            );
        }
    };
    (@tests $harness:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let mut harness = $harness;
                super::$name(&mut harness);
            }
        )*
    };
}

conformance_suite!(sled_store, crate::SledHarness::default());
conformance_suite!(mem_store, crate::MemHarness::default());
conformance_suite!(wal_store, crate::WalHarness::default());

#[test]
fn mem_store_crash_loses_only_uncommitted_writes() {
    // A MemStore restarted on a fork of its disk has every committed batch, not the uncommitted one, and the dead instance cannot reach it.
    let disk = MemDisk::new();
    let store = MemStore::open(&disk).unwrap();
    store.append(G, &entries(1, 3, 1)).unwrap();
    let mut uncommitted = WriteBatch::new();
    uncommitted.append(G, entries(4, 5, 1));
    let restarted_disk = disk.fork(); // the crash
    let restarted = MemStore::open(&restarted_disk).unwrap();
    store.commit(uncommitted).unwrap(); // the dead instance keeps writing to its own disk
    assert_eq!(store.last_index(G).unwrap(), 5);
    assert_eq!(restarted.last_index(G).unwrap(), 3);
    assert_eq!(
        restarted.entries(G, 1, 4, u64::MAX).unwrap(),
        entries(1, 3, 1)
    );
}

#[test]
fn mem_store_disk_sheds_a_compacted_log_within_bounded_commits() {
    // The stale entries of a compacted log leave the disk within a bounded number of later
    // commits (each deleting at most max(64, 2 x appended)), and not all in the compaction's
    // own commit.
    let disk = MemDisk::new();
    let store = MemStore::open(&disk).unwrap();
    for first in (1..=1000).step_by(500) {
        store.append(G, &entries(first, first + 499, 1)).unwrap();
    }
    let full = disk.size_bytes();
    store.compact(G, 1000).unwrap();
    let after_compaction = disk.size_bytes();
    assert!(
        after_compaction > full * 9 / 10,
        "compaction itself deleted the prefix ({after_compaction} of {full} bytes left)"
    );
    // Same-sized hard-state commits (append nothing): only the purge changes the disk's size.
    let mut sizes = vec![after_compaction];
    for term in 1..=20 {
        store
            .set_hard_state(
                G,
                HardState {
                    term,
                    voted_for: Some(1),
                },
            )
            .unwrap();
        sizes.push(disk.size_bytes());
    }
    // 1,000 stale entries at 64 per commit, the compaction's own commit included: 15 more
    // commits shrink the disk, then it is stable.
    assert!(sizes[..=15].windows(2).all(|w| w[0] > w[1]), "{sizes:?}");
    assert!(
        sizes[15..].iter().all(|&size| size == sizes[15]),
        "{sizes:?}"
    );
    assert!(sizes[15] < full / 100, "{sizes:?} of {full}");
}

#[test]
fn mem_store_disk_is_locked_while_open() {
    // A second MemStore on a disk in use fails with Locked until every clone of the first is dropped.
    let disk = MemDisk::new();
    let store = MemStore::open(&disk).unwrap();
    let clone = store.clone();
    assert!(matches!(
        MemStore::open(&disk),
        Err(StorageError::Locked { .. })
    ));
    drop(store);
    assert!(matches!(
        MemStore::open(&disk),
        Err(StorageError::Locked { .. })
    ));
    drop(clone);
    let reopened = MemStore::open(&disk).unwrap();
    assert!(reopened.groups().unwrap().is_empty());
    assert!(disk.size_bytes() > 0, "the format marker is on the disk");
}

#[test]
fn both_stores_agree_on_the_same_history() {
    // The sled store and the memory store end in identical observable states after the same writes.
    fn history<S: NodeStorage>(store: &S) {
        store.append(G, &entries(1, 6, 1)).unwrap();
        store.append(G, &entries(4, 8, 2)).unwrap();
        store.compact(G, 2).unwrap();
        store
            .install_snapshot(G, snap(5, 2), Bytes::from_static(b"five"))
            .unwrap();
        store
            .set_hard_state(
                G,
                HardState {
                    term: 2,
                    voted_for: Some(1),
                },
            )
            .unwrap();
        let mut batch = WriteBatch::new();
        batch
            .kv_put(0, "x", "1", 1)
            .kv_put(2, "y", "2", 3)
            .set_applied_index(0, 8)
            .mr_put("m", "r");
        store.commit(batch).unwrap();
    }
    let mut sled = crate::SledHarness::default();
    let sled_store = sled.open();
    history(&sled_store);
    let mem_store = MemStore::open(&MemDisk::new()).unwrap();
    history(&mem_store);
    assert_eq!(dump(&sled_store), dump(&mem_store));
    let mut wal = crate::WalHarness::default();
    let wal_store = wal.open();
    history(&wal_store);
    assert_eq!(dump(&sled_store), dump(&wal_store));
}

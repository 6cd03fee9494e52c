//! Bad input on disk or at open: foreign directories, newer formats,
//! corrupted records and locked directories are typed errors, never panics
//! and never a silent re-initialisation.

use std::path::Path;

use raftkv::storage::{
    FORMAT_VERSION, KvStorage, MrStorage, RaftLogStorage, Storage, StorageError, Store,
    StoreConfig, WriteBatch,
};

use super::entries;

/// Writes raw bytes under a raw key with sled directly (the store is closed).
fn poke(dir: &Path, key: &[u8], value: &[u8]) {
    let db = sled::open(dir).expect("open the database with sled");
    db.insert(key, value).expect("insert");
    db.flush().expect("flush");
}

fn peek(dir: &Path, key: &[u8]) -> Vec<u8> {
    let db = sled::open(dir).expect("open the database with sled");
    db.get(key)
        .expect("get")
        .expect("the record exists")
        .to_vec()
}

fn entry_key(group: u64, index: u64) -> Vec<u8> {
    let mut key = vec![0x13];
    key.extend_from_slice(&group.to_be_bytes());
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn kv_key(ns: u64, key: &[u8]) -> Vec<u8> {
    let mut full = vec![0x21];
    full.extend_from_slice(&ns.to_be_bytes());
    full.extend_from_slice(key);
    full
}

fn no_create() -> StoreConfig {
    StoreConfig {
        create_if_missing: false,
        ..StoreConfig::default()
    }
}

#[test]
fn foreign_directory_is_rejected_untouched() {
    // A directory holding other files is NotRaftkvDirectory and is left exactly as it was.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"not a database").unwrap();
    let error = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(error, StorageError::NotRaftkvDirectory { .. }),
        "{error}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("notes.txt")]);
}

#[test]
fn file_missing_and_empty_paths_are_rejected_without_create() {
    // A plain file is never a store; a missing or empty directory is one only when creation is allowed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Store::open(&file),
        Err(StorageError::NotRaftkvDirectory { .. })
    ));
    let missing = dir.path().join("missing");
    assert!(matches!(
        Store::open_with(&missing, &no_create()),
        Err(StorageError::NotRaftkvDirectory { .. })
    ));
    assert!(
        !missing.exists(),
        "inspecting must not create the directory"
    );
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(
        Store::open_with(&empty, &no_create()),
        Err(StorageError::NotRaftkvDirectory { .. })
    ));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    let store = Store::open(&missing).expect("created when allowed");
    assert_eq!(store.format_version(), FORMAT_VERSION);
}

#[test]
fn foreign_sled_database_is_rejected() {
    // A sled database written by someone else (no format marker) is NotRaftkvDirectory, not adopted.
    let dir = tempfile::tempdir().unwrap();
    poke(dir.path(), b"someone else's key", b"value");
    let error = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(error, StorageError::NotRaftkvDirectory { .. }),
        "{error}"
    );
    // A foreign magic in our marker's place is also foreign.
    let dir = tempfile::tempdir().unwrap();
    poke(dir.path(), b"\x00format", b"OTHERDB!\x00\x00\x00\x01abcd");
    assert!(matches!(
        Store::open(dir.path()),
        Err(StorageError::NotRaftkvDirectory { .. })
    ));
}

#[test]
fn newer_format_version_is_rejected() {
    // A directory whose marker carries a newer version is NewerFormat with both versions.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let newer = FORMAT_VERSION + 1;
    let mut payload = b"RAFTKV\0\0".to_vec();
    payload.extend_from_slice(&newer.to_be_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(b"\x00format");
    hasher.update(&payload);
    payload.extend_from_slice(&hasher.finalize().to_le_bytes());
    poke(dir.path(), b"\x00format", &payload);
    match Store::open(dir.path()) {
        Err(StorageError::NewerFormat { found, supported }) => {
            assert_eq!(found, newer);
            assert_eq!(supported, FORMAT_VERSION);
        }
        other => panic!("expected NewerFormat, got {other:?}"),
    }
}

#[test]
fn corrupted_records_are_reported_by_name() {
    // A flipped bit in an entry, a KV value or a MapReduce record is a Corruption naming that record.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.append(3, &entries(1, 5, 1)).unwrap();
        let mut batch = WriteBatch::new();
        batch.kv_put(0, "key", "value", 1).mr_put("task", "idle");
        store.commit(batch).unwrap();
    }
    let flip = |key: &[u8]| {
        let mut value = peek(dir.path(), key);
        value[0] ^= 0x01;
        poke(dir.path(), key, &value);
    };
    flip(&entry_key(3, 2));
    flip(&kv_key(0, b"key"));
    flip(b"\x30task");
    let store = Store::open(dir.path()).expect("corruption inside the log is found on read");
    let record = |error: StorageError| match error {
        StorageError::Corruption { record, .. } => record,
        other => panic!("expected Corruption, got {other:?}"),
    };
    assert_eq!(
        record(store.entries(3, 1, 6, u64::MAX).unwrap_err()),
        "raft group 3 entry 2"
    );
    assert_eq!(
        record(store.term(3, 2).unwrap_err()),
        "raft group 3 entry 2"
    );
    assert_eq!(store.term(3, 3).unwrap(), 1, "the other entries are fine");
    assert_eq!(
        record(store.kv_get(0, b"key").unwrap_err()),
        "kv namespace 0 key \"key\""
    );
    assert_eq!(
        record(store.mr_get(b"task").unwrap_err()),
        "mapreduce record \"task\""
    );
}

#[test]
fn corrupted_group_records_fail_the_open() {
    // A corrupted hard state or a truncated last entry is found when the store opens.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.append(0, &entries(1, 2, 1)).unwrap();
        store
            .set_hard_state(
                0,
                raftkv::raft::HardState {
                    term: 1,
                    voted_for: Some(1),
                },
            )
            .unwrap();
    }
    let last = entry_key(0, 2);
    let value = peek(dir.path(), &last);
    poke(dir.path(), &last, &value[..3]);
    match Store::open(dir.path()) {
        Err(StorageError::Corruption { record, .. }) => assert_eq!(record, "raft group 0 entry 2"),
        other => panic!("expected Corruption, got {other:?}"),
    }
    poke(dir.path(), &last, &value);
    let mut hard_state_key = vec![0x10];
    hard_state_key.extend_from_slice(&0u64.to_be_bytes());
    let mut value = peek(dir.path(), &hard_state_key);
    let last_byte = value.len() - 1;
    value[last_byte] ^= 0x80;
    poke(dir.path(), &hard_state_key, &value);
    match Store::open(dir.path()) {
        Err(StorageError::Corruption { record, .. }) => {
            assert_eq!(record, "raft group 0 hard state")
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
}

#[test]
fn a_hole_in_the_log_is_corruption() {
    // An entry missing from the middle of the log is reported, not skipped.
    let dir = tempfile::tempdir().unwrap();
    drop({
        let store = Store::open(dir.path()).unwrap();
        store.append(1, &entries(1, 5, 1)).unwrap();
        store
    });
    {
        let db = sled::open(dir.path()).unwrap();
        db.remove(entry_key(1, 3)).unwrap();
        db.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    match store.entries(1, 1, 6, u64::MAX) {
        Err(StorageError::Corruption { record, detail }) => {
            assert_eq!(record, "raft group 1 entry 3");
            assert!(detail.contains("missing"), "{detail}");
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    assert!(matches!(
        store.term(1, 3),
        Err(StorageError::Corruption { .. })
    ));
}

#[test]
fn locked_directory_is_reported() {
    // Opening a directory that an open store holds is Locked; after it is dropped the directory opens again.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.mr_put(b"k", b"v").unwrap();
    let error = Store::open(dir.path()).unwrap_err();
    assert!(matches!(error, StorageError::Locked { .. }), "{error}");
    assert!(error.to_string().contains("locked"));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.mr_get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

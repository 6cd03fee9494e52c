//! `raftkv inspect`, tested by running the binary on directories made here.

use std::path::Path;
use std::process::{Command, Output};

use bytes::Bytes;
use raftkv::raft::{Entry, EntryKind, HardState, SnapshotMeta};
use raftkv::storage::{
    MrStorage, RaftLogStorage, Storage, Store, StoreConfig, StoreEngine, WriteBatch,
};

use super::entries;

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_raftkv"))
        .arg("inspect")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run raftkv")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8 output")
}

/// A stopped node's directory: group 0 with a snapshot at 3 and entries
/// 4..=12, group 5 with one no-op, 15 KV keys and two MapReduce records.
fn populated(dir: &Path) {
    populated_with(dir, StoreEngine::Sled);
}

fn populated_with(dir: &Path, engine: StoreEngine) {
    let config = StoreConfig {
        engine,
        ..StoreConfig::default()
    };
    let store = Store::open_with(dir, &config).unwrap();
    store.append(0, &entries(1, 8, 1)).unwrap();
    store.append(0, &entries(9, 12, 4)).unwrap();
    store
        .set_hard_state(
            0,
            HardState {
                term: 4,
                voted_for: Some(2),
            },
        )
        .unwrap();
    let meta = SnapshotMeta {
        last_included_index: 3,
        last_included_term: 1,
    };
    store
        .install_snapshot(0, meta, Bytes::from_static(b"0123456789"))
        .unwrap();
    store
        .append(
            5,
            &[Entry {
                index: 1,
                term: 1,
                kind: EntryKind::Noop,
                data: Bytes::new(),
            }],
        )
        .unwrap();
    let mut batch = WriteBatch::new();
    for i in 0..15 {
        batch.kv_put(0, format!("key{i:02}"), "x".repeat(i), i as u64 + 1);
    }
    batch
        .set_applied_index(0, 12)
        .mr_put("map/0", "done")
        .mr_put("reduce/0", "idle");
    store.commit(batch).unwrap();
}

#[test]
fn text_report_shows_groups_entries_keys_and_records() {
    // The text report has the format version, the engine, each group's hard state, log bounds, snapshot and last N entries, the KV map and the MapReduce records; both engines report the same content.
    for (engine, name) in [(StoreEngine::Sled, "sled"), (StoreEngine::Wal, "wal")] {
        let dir = tempfile::tempdir().unwrap();
        populated_with(dir.path(), engine);
        let output = inspect(&[dir.path().to_str().unwrap(), "--entries", "3"]);
        assert!(output.status.success(), "stderr: {}", stderr(&output));
        let text = stdout(&output);
        assert!(
            text.contains(&format!("format version: 2\nstorage engine: {name}\n")),
            "{text}"
        );
        check_text_report(&text);
    }
}

fn check_text_report(text: &str) {
    for expected in [
        "format version: 2",
        "raft group 0\n  hard state: term 4, voted for node 2\n  log: first index 4, last index 12 (9 entries)\n  snapshot: last included index 3, term 1, 10 bytes\n  last 3 entries:\n    index 10  term 4  normal  8 bytes  hex 636d642d31302d34\n    index 11  term 4",
        "    index 12  term 4  normal  8 bytes",
        "raft group 5\n  hard state: term 0, voted for nobody\n  log: first index 1, last index 1 (1 entries)\n  snapshot: none\n  last 1 entries:\n    index 1  term 1  noop  0 bytes\n",
        "kv namespace 0\n  applied index: 12\n  keys: 15 (first 3 shown)\n    \"key00\"  version 1  0 bytes\n    \"key01\"  version 2  1 bytes\n    \"key02\"  version 3  2 bytes\n",
        "mapreduce records: 2\n    \"map/0\"  4 bytes  \"done\"\n    \"reduce/0\"  4 bytes  \"idle\"\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert!(
        !text.contains("index 9 "),
        "only the last 3 entries are shown:\n{text}"
    );
}

#[test]
fn json_report_has_the_same_content() {
    // --json prints one JSON document with the same facts as the text report.
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    let output = inspect(&[dir.path().to_str().unwrap(), "--json", "--entries", "2"]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let report: serde_json::Value =
        serde_json::from_str(&stdout(&output)).expect("one JSON document");
    assert_eq!(report["format_version"], 2);
    let group = &report["raft_groups"][0];
    assert_eq!(group["group"], 0);
    assert_eq!(group["term"], 4);
    assert_eq!(group["voted_for"], 2);
    assert_eq!(group["first_index"], 4);
    assert_eq!(group["last_index"], 12);
    assert_eq!(group["snapshot"]["last_included_index"], 3);
    assert_eq!(group["snapshot"]["data_bytes"], 10);
    let last = group["last_entries"].as_array().unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(last[1]["index"], 12);
    assert_eq!(last[1]["decoded"]["type"], "opaque");
    assert_eq!(last[1]["decoded"]["hex_prefix"], "636d642d31322d34");
    assert_eq!(
        report["raft_groups"][1]["last_entries"][0]["decoded"]["type"],
        "empty"
    );
    let namespace = &report["kv_namespaces"][0];
    assert_eq!(namespace["key_count"], 15);
    assert_eq!(namespace["applied_index"], 12);
    assert_eq!(namespace["first_keys"][1]["key"], "key01");
    assert_eq!(namespace["first_keys"][1]["version"], 2);
    assert_eq!(report["mapreduce"]["record_count"], 2);
    assert_eq!(report["mapreduce"]["first_records"][0]["key"], "map/0");
}

#[test]
fn empty_store_reports_nothing_stored() {
    // A fresh store reports no groups, no KV namespaces and no MapReduce records.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    let output = inspect(&[dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("raft groups: none"), "{text}");
    assert!(text.contains("kv namespaces: none"), "{text}");
    assert!(text.contains("mapreduce records: 0"), "{text}");
}

#[test]
fn locked_directory_prints_one_line_and_fails() {
    // On a directory held by a running store, inspect prints one line saying it is locked and exits non-zero.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let output = inspect(&[dir.path().to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    assert!(message.contains("locked"), "{message}");
    assert!(stdout(&output).is_empty());
    store.mr_put(b"still", b"usable").unwrap();
}

#[test]
fn foreign_or_missing_directories_print_one_line_and_fail() {
    // A missing directory or one holding other files is one clear line and a failure, and is not created or touched.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    for path in [missing.as_path(), dir.path()] {
        let output = inspect(&[path.to_str().unwrap()]);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert_eq!(message.lines().count(), 1, "one line: {message}");
        assert!(message.contains("not a raftkv data directory"), "{message}");
    }
    assert!(!missing.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn bad_flags_are_rejected_without_a_panic() {
    // A malformed --entries value is a usage error, not a crash.
    let dir = tempfile::tempdir().unwrap();
    let output = inspect(&[dir.path().to_str().unwrap(), "--entries", "many"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--entries"));
    assert!(!stderr(&output).contains("panicked"));
}

#[test]
fn batched_kv_entries_are_decoded() {
    // An entry carrying a batch of key/value commands shows their count and the first one.
    use raftkv::kv::{KvCommand, KvLogCommand};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let put = |key: &str| KvCommand::Put {
        key: key.to_owned(),
        value: Bytes::from_static(b"red"),
        version: 0,
    };
    let data = KvLogCommand::Batch(vec![put("color"), put("shape")]).encode();
    let entry = Entry {
        index: 1,
        term: 1,
        kind: EntryKind::Normal,
        data,
    };
    store.append(0, &[entry]).unwrap();
    drop(store);
    let output = inspect(&[dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "stderr: {}", stderr(&output));
    let text = stdout(&output);
    let expected =
        "kv batch of 2 commands, first:  kv put \"color\" version 0 value (3 bytes) \"red\"";
    assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    let output = inspect(&[dir.path().to_str().unwrap(), "--json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let decoded = &report["raft_groups"][0]["last_entries"][0]["decoded"];
    assert_eq!(decoded["type"], "kv_batch");
    assert_eq!(decoded["commands"], 2);
    assert_eq!(decoded["first"]["key"], "color");
}

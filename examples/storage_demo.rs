//! Creates (or extends) a raftkv data directory with a few Raft entries, a
//! snapshot, KV puts with their applied index and MapReduce task records, all
//! through atomic, durable batches. Then look at it with `raftkv inspect`:
//!
//! ```text
//! cargo run --release --example storage_demo -- /tmp/raftkv-demo
//! cargo run --release -- inspect /tmp/raftkv-demo
//! ```

use bytes::Bytes;
use raftkv::raft::{Entry, EntryKind, HardState, SnapshotMeta};
use raftkv::storage::{KvStorage, RaftLogStorage, Storage, Store, WriteBatch};

/// The Raft group and the state machine the demo writes.
const GROUP: u64 = 0;
const NAMESPACE: u64 = 0;

fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: storage_demo DIR"))?;
    let store = Store::open(&dir)?;
    let term = store.hard_state(GROUP)?.term + 1;

    // A new leader's term: its vote and a no-op entry, in one batch.
    let mut last = store.last_index(GROUP)?;
    let mut batch = WriteBatch::new();
    batch
        .set_hard_state(
            GROUP,
            HardState {
                term,
                voted_for: Some(1),
            },
        )
        .append(
            GROUP,
            vec![Entry {
                index: last + 1,
                term,
                kind: EntryKind::Noop,
                data: Bytes::new(),
            }],
        );
    store.commit(batch)?;
    last += 1;

    // Five commands; each is applied to the KV map with the applied index in
    // the same batch as the entry itself (group commit).
    for i in 0..5u64 {
        let key = format!("key-{i}");
        let value = format!("value written in term {term}");
        let version = store
            .kv_get(NAMESPACE, key.as_bytes())?
            .map_or(1, |v| v.version + 1);
        let index = last + 1;
        let command = Bytes::from(format!("put {key}={value} v{version}"));
        let mut batch = WriteBatch::new();
        batch
            .append(
                GROUP,
                vec![Entry {
                    index,
                    term,
                    kind: EntryKind::Normal,
                    data: command,
                }],
            )
            .kv_put(NAMESPACE, key, value, version)
            .set_applied_index(NAMESPACE, index);
        store.commit(batch)?;
        last = index;
    }

    // Snapshot the state machine two entries back; the log keeps the suffix.
    let snapshot_index = last - 2;
    let meta = SnapshotMeta {
        last_included_index: snapshot_index,
        last_included_term: store.term(GROUP, snapshot_index)?,
    };
    let data = Bytes::from(format!("kv map as of index {snapshot_index}"));
    store.install_snapshot(GROUP, meta, data)?;

    // MapReduce task records, batched.
    let mut batch = WriteBatch::new();
    batch
        .mr_put("map/0", "done")
        .mr_put("map/1", "running")
        .mr_put("reduce/0", "idle");
    store.commit(batch)?;

    println!(
        "{dir}: raft group {GROUP} log {}..={}, snapshot at {snapshot_index}, applied index {}",
        store.first_index(GROUP)?,
        store.last_index(GROUP)?,
        store.applied_index(NAMESPACE)?
    );
    Ok(())
}

//! [`WriteBatch`]: a group of writes committed atomically with one flush.

use bytes::Bytes;

use super::{GroupId, StateMachineId, VersionedValue};
use crate::raft::{Entry, HardState, SnapshotMeta};

/// One write of a batch, in the order it was added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    SetHardState {
        group: GroupId,
        hard_state: HardState,
    },
    Append {
        group: GroupId,
        entries: Vec<Entry>,
    },
    InstallSnapshot {
        group: GroupId,
        meta: SnapshotMeta,
        data: Bytes,
    },
    Compact {
        group: GroupId,
        through_index: u64,
    },
    KvPut {
        ns: StateMachineId,
        key: Bytes,
        value: VersionedValue,
    },
    KvDelete {
        ns: StateMachineId,
        key: Bytes,
    },
    SetAppliedIndex {
        ns: StateMachineId,
        index: u64,
    },
    KvReplaceAll {
        ns: StateMachineId,
        entries: Vec<(Bytes, VersionedValue)>,
        applied_index: u64,
    },
    MrPut {
        key: Bytes,
        value: Bytes,
    },
    MrDelete {
        key: Bytes,
    },
}

/// Writes for any number of Raft groups, KV namespaces and the MapReduce
/// records, committed together by [`Storage::commit`](super::Storage::commit):
/// all of them or none survive a crash, and the commit costs one flush.
///
/// Building a batch touches no storage; every check happens at commit, in the
/// order the writes were added, each write seeing the effect of the earlier
/// ones (an append followed by a compaction of the appended entries is fine).
/// If any write is invalid the commit fails and nothing of the batch is
/// applied.
///
/// ```
/// use bytes::Bytes;
/// use raftkv::raft::{Entry, EntryKind, HardState};
/// use raftkv::storage::{MemDisk, MemStore, RaftLogStorage, KvStorage, Storage, WriteBatch};
///
/// let store = MemStore::open(&MemDisk::new())?;
/// let entry = Entry { index: 1, term: 1, kind: EntryKind::Normal, data: Bytes::from_static(b"put x") };
/// let mut batch = WriteBatch::new();
/// batch
///     .set_hard_state(7, HardState { term: 1, voted_for: Some(2) })
///     .append(7, vec![entry])
///     .kv_put(0, "x", "1", 1)
///     .set_applied_index(0, 1);
/// store.commit(batch)?; // durable and atomic
/// assert_eq!(store.last_index(7)?, 1);
/// assert_eq!(store.applied_index(0)?, 1);
/// # Ok::<(), raftkv::storage::StorageError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub(crate) ops: Vec<Op>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// An empty batch with room for `ops` writes.
    pub fn with_capacity(ops: usize) -> WriteBatch {
        WriteBatch {
            ops: Vec::with_capacity(ops),
        }
    }

    /// Number of writes added.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Appends `other`'s writes after this batch's: committing the result is
    /// committing this batch and then `other`, as one atomic batch.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }

    /// Bytes of entry data, snapshot data, keys and values the batch carries
    /// (a size estimate, without record overheads).
    pub fn payload_bytes(&self) -> u64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Append { entries, .. } => {
                    entries.iter().map(|e| e.data.len() as u64).sum::<u64>()
                }
                Op::InstallSnapshot { data, .. } => data.len() as u64,
                Op::KvPut { key, value, .. } => (key.len() + value.value.len()) as u64,
                Op::KvReplaceAll { entries, .. } => entries
                    .iter()
                    .map(|(key, value)| (key.len() + value.value.len()) as u64)
                    .sum(),
                Op::MrPut { key, value } => (key.len() + value.len()) as u64,
                _ => 0,
            })
            .sum()
    }

    /// Whether no write was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Replaces the hard state (term, vote) of `group`.
    pub fn set_hard_state(&mut self, group: GroupId, hard_state: HardState) -> &mut Self {
        self.ops.push(Op::SetHardState { group, hard_state });
        self
    }

    /// Appends consecutive `entries` to the log of `group`, first deleting every
    /// existing entry at or after the first appended index (the conflicting
    /// suffix). The first index must be above the compacted prefix and at most
    /// `last_index + 1`. Appending nothing is a no-op. Only pass the entries
    /// that really conflict or are new: re-appending an old, matching entry
    /// also deletes everything after it.
    pub fn append(&mut self, group: GroupId, entries: impl Into<Vec<Entry>>) -> &mut Self {
        self.ops.push(Op::Append {
            group,
            entries: entries.into(),
        });
        self
    }

    /// Installs a snapshot for `group` (Raft §7): if the log holds an entry at
    /// the snapshot's last included index with the same term, the entries
    /// after it are kept; otherwise the whole log is discarded. Either way the
    /// entries the snapshot covers are gone from the log and its first index
    /// becomes `last_included_index + 1` (their records are deleted over the
    /// following commits, a bounded number per commit, as for
    /// [`compact`](Self::compact)). The index must be at least 1 and not
    /// below the already compacted prefix.
    pub fn install_snapshot(
        &mut self,
        group: GroupId,
        meta: SnapshotMeta,
        data: Bytes,
    ) -> &mut Self {
        self.ops.push(Op::InstallSnapshot { group, meta, data });
        self
    }

    /// Discards the entries of `group` up to and including `through_index`,
    /// remembering that entry's term so `term(through_index)` still answers.
    /// They are gone from the log at once; their records are deleted over this
    /// and the following commits, at most `max(64, 2 × entries appended)`
    /// per commit, so compacting a long log never makes one commit slow.
    /// Compacting at or below the compacted prefix is a no-op; beyond the last
    /// index is [`StorageError::Unavailable`](super::StorageError::Unavailable).
    /// The snapshot is not changed: compact past it only when the state machine
    /// is durable itself (the KV map with its applied index is).
    pub fn compact(&mut self, group: GroupId, through_index: u64) -> &mut Self {
        self.ops.push(Op::Compact {
            group,
            through_index,
        });
        self
    }

    /// Sets `key` in namespace `ns` to `value` with `version`.
    pub fn kv_put(
        &mut self,
        ns: StateMachineId,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
        version: u64,
    ) -> &mut Self {
        self.ops.push(Op::KvPut {
            ns,
            key: key.into(),
            value: VersionedValue {
                value: value.into(),
                version,
            },
        });
        self
    }

    /// Deletes `key` from namespace `ns` (no-op when absent).
    pub fn kv_delete(&mut self, ns: StateMachineId, key: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::KvDelete {
            ns,
            key: key.into(),
        });
        self
    }

    /// Records that the state machine `ns` has applied the log through `index`.
    pub fn set_applied_index(&mut self, ns: StateMachineId, index: u64) -> &mut Self {
        self.ops.push(Op::SetAppliedIndex { ns, index });
        self
    }

    /// Replaces the whole map of namespace `ns` with `entries` and sets its
    /// applied index (installing a state-machine snapshot). A key given twice
    /// keeps its last value.
    pub fn kv_replace_all(
        &mut self,
        ns: StateMachineId,
        entries: impl IntoIterator<Item = (Bytes, VersionedValue)>,
        applied_index: u64,
    ) -> &mut Self {
        self.ops.push(Op::KvReplaceAll {
            ns,
            entries: entries.into_iter().collect(),
            applied_index,
        });
        self
    }

    /// Sets the MapReduce record `key` to `value`.
    pub fn mr_put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::MrPut {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Deletes the MapReduce record `key` (no-op when absent).
    pub fn mr_delete(&mut self, key: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::MrDelete { key: key.into() });
        self
    }
}

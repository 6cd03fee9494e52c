//! The storage interfaces and their durability contract.

use std::sync::Arc;

use bytes::Bytes;

use super::{GroupId, StateMachineId, StorageError, WriteBatch};
use crate::raft::{Entry, HardState, SnapshotMeta};

/// A node's durable state: the one way to write is [`Storage::commit`].
///
/// # Durability contract (what every implementation guarantees)
///
/// 1. **Durable on return.** When `commit` (or any write method built on it)
///    returns `Ok`, every write of the batch is on stable storage (sled has
///    flushed and fsynced) and survives a crash of the process or the machine.
///    ([`FlushMode::Background`](super::FlushMode::Background) is the one,
///    explicitly unsafe, exception.)
/// 2. **Atomic.** A batch survives a crash entirely or not at all: entries
///    together with the hard state, a KV change together with its applied
///    index, a snapshot together with the log truncation it implies, and
///    writes for several groups and namespaces in one batch. All records share
///    one sled tree, written by one `apply_batch`.
/// 3. **All-or-nothing validation.** A batch with an invalid write fails with
///    an error and changes nothing.
/// 4. **Ordered.** Commits are applied one after another; each one sees the
///    effects of all earlier ones.
/// 5. **Reads** never see half of a batch. A read running concurrently with a
///    commit from another thread may see that batch before its `commit` has
///    returned, i.e. before it is durable; a caller that must only act on
///    durable state acts after its own `commit` returned.
/// 6. **Fail-stop.** If a commit fails after it may have changed memory or
///    disk (an I/O error during write or flush), the store returns
///    [`StorageError::Poisoned`] from then on; reopen it to recover the
///    durable state.
///
/// Bad bytes on disk are reported as [`StorageError::Corruption`] naming the
/// record, never a panic.
pub trait Storage: Send + Sync {
    /// Applies `batch` atomically and returns once it is durable. An empty
    /// batch returns at once.
    fn commit(&self, batch: WriteBatch) -> Result<(), StorageError>;
}

/// Persistence of Raft groups (hard state, log, snapshot), several groups per
/// store, identified by [`GroupId`]. A group that was never written reads as
/// empty: default hard state, first index 1, last index 0, no snapshot.
///
/// The log holds the entries `first_index()..=last_index()`, one record per
/// entry; `first_index() - 1` is the last compacted index (0 at the start,
/// the snapshot's last included index after a snapshot) whose term is still
/// known. An empty log has `last_index() == first_index() - 1`.
///
/// Every write method is one [`Storage::commit`] and obeys its durability
/// contract; use a [`WriteBatch`] to group writes (for example the entries and
/// the hard state of one Raft `Ready`, or several groups) under one flush.
pub trait RaftLogStorage: Storage {
    /// Groups that have any durable Raft record, ascending.
    fn groups(&self) -> Result<Vec<GroupId>, StorageError>;

    /// The group's hard state (default when never written).
    fn hard_state(&self, group: GroupId) -> Result<HardState, StorageError>;

    /// Index of the first entry in the log (last compacted index + 1).
    fn first_index(&self, group: GroupId) -> Result<u64, StorageError>;

    /// Index of the last entry in the log (`first_index() - 1` when empty).
    fn last_index(&self, group: GroupId) -> Result<u64, StorageError>;

    /// Term of the entry at `index`, for `first_index() - 1 <= index <= last_index()`
    /// (term 0 for index 0). Lower: [`StorageError::Compacted`]; higher:
    /// [`StorageError::Unavailable`].
    fn term(&self, group: GroupId, index: u64) -> Result<u64, StorageError>;

    /// Entries `lo..hi` (hi exclusive), stopping early once their data adds
    /// up to more than `bytes_max` but always returning at least one entry
    /// when `lo < hi`. `lo < first_index()`: [`StorageError::Compacted`];
    /// `hi > last_index() + 1`: [`StorageError::Unavailable`].
    fn entries(
        &self,
        group: GroupId,
        lo: u64,
        hi: u64,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError>;

    /// Position of the latest snapshot (all zero when there is none).
    fn snapshot_meta(&self, group: GroupId) -> Result<SnapshotMeta, StorageError>;

    /// The latest snapshot and its data (zero meta and empty data when none).
    fn snapshot(&self, group: GroupId) -> Result<(SnapshotMeta, Bytes), StorageError>;

    /// Bytes the group's Raft state occupies excluding the snapshot: hard
    /// state, log base and all entry records (keys and values). What the
    /// reference labs call the persisted Raft state size. Costs a scan of the
    /// log.
    fn raft_state_bytes(&self, group: GroupId) -> Result<u64, StorageError>;

    /// Durably replaces the hard state. See [`WriteBatch::set_hard_state`].
    fn set_hard_state(&self, group: GroupId, hard_state: HardState) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.set_hard_state(group, hard_state);
        self.commit(batch)
    }

    /// Durably appends entries, truncating the conflicting suffix. See [`WriteBatch::append`].
    fn append(&self, group: GroupId, entries: &[Entry]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.append(group, entries);
        self.commit(batch)
    }

    /// Durably installs a snapshot. See [`WriteBatch::install_snapshot`].
    fn install_snapshot(
        &self,
        group: GroupId,
        meta: SnapshotMeta,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.install_snapshot(group, meta, data);
        self.commit(batch)
    }

    /// Durably discards the log through `through_index`. See [`WriteBatch::compact`].
    fn compact(&self, group: GroupId, through_index: u64) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.compact(group, through_index);
        self.commit(batch)
    }
}

/// A shared store is a store, under the same contract: lets a service keep a
/// handle on the storage it hands to a Raft node (the replicated key/value
/// server keeps a [`Weak`](std::sync::Weak) one to report the log size).
impl<T: Storage + ?Sized> Storage for Arc<T> {
    fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
        (**self).commit(batch)
    }
}

impl<T: RaftLogStorage + ?Sized> RaftLogStorage for Arc<T> {
    fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
        (**self).groups()
    }
    fn hard_state(&self, group: GroupId) -> Result<HardState, StorageError> {
        (**self).hard_state(group)
    }
    fn first_index(&self, group: GroupId) -> Result<u64, StorageError> {
        (**self).first_index(group)
    }
    fn last_index(&self, group: GroupId) -> Result<u64, StorageError> {
        (**self).last_index(group)
    }
    fn term(&self, group: GroupId, index: u64) -> Result<u64, StorageError> {
        (**self).term(group, index)
    }
    fn entries(
        &self,
        group: GroupId,
        lo: u64,
        hi: u64,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        (**self).entries(group, lo, hi, bytes_max)
    }
    fn snapshot_meta(&self, group: GroupId) -> Result<SnapshotMeta, StorageError> {
        (**self).snapshot_meta(group)
    }
    fn snapshot(&self, group: GroupId) -> Result<(SnapshotMeta, Bytes), StorageError> {
        (**self).snapshot(group)
    }
    fn raft_state_bytes(&self, group: GroupId) -> Result<u64, StorageError> {
        (**self).raft_state_bytes(group)
    }
    fn set_hard_state(&self, group: GroupId, hard_state: HardState) -> Result<(), StorageError> {
        (**self).set_hard_state(group, hard_state)
    }
    fn append(&self, group: GroupId, entries: &[Entry]) -> Result<(), StorageError> {
        (**self).append(group, entries)
    }
    fn install_snapshot(
        &self,
        group: GroupId,
        meta: SnapshotMeta,
        data: Bytes,
    ) -> Result<(), StorageError> {
        (**self).install_snapshot(group, meta, data)
    }
    fn compact(&self, group: GroupId, through_index: u64) -> Result<(), StorageError> {
        (**self).compact(group, through_index)
    }
}

/// A value of the versioned KV map with its version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VersionedValue {
    /// The value bytes.
    pub value: Bytes,
    /// The version the KV service assigned (it starts at 1 for a new key).
    pub version: u64,
}

/// The versioned KV maps of the state machines on this node, one per
/// namespace ([`StateMachineId`]), each with its applied index. Writes go
/// through [`WriteBatch`]: put the map changes and `set_applied_index` in one
/// batch so that a restart resumes exactly after the last applied entry.
pub trait KvStorage: Storage {
    /// The value and version of `key`, if present.
    fn kv_get(
        &self,
        ns: StateMachineId,
        key: &[u8],
    ) -> Result<Option<VersionedValue>, StorageError>;

    /// The applied index of the namespace (0 when never set).
    fn applied_index(&self, ns: StateMachineId) -> Result<u64, StorageError>;

    /// Up to `limit` entries in key order, starting after `after` (from the
    /// first key when `None`). Page through a map by passing the last key of
    /// the previous page. Pages are only consistent with each other if no
    /// commit changes the namespace in between.
    fn kv_scan(
        &self,
        ns: StateMachineId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, VersionedValue)>, StorageError>;

    /// Number of keys in the namespace. Costs a scan of the namespace.
    fn kv_key_count(&self, ns: StateMachineId) -> Result<u64, StorageError>;

    /// Namespaces that have keys or an applied index, ascending.
    fn kv_namespaces(&self) -> Result<Vec<StateMachineId>, StorageError>;
}

/// Generic byte records for the MapReduce coordinator's task table, in their
/// own key space. Batch them with [`WriteBatch::mr_put`] / [`WriteBatch::mr_delete`].
pub trait MrStorage: Storage {
    /// The record `key`, if present.
    fn mr_get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError>;

    /// Up to `limit` records whose key starts with `prefix`, in key order.
    fn mr_scan_prefix(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError>;

    /// Number of MapReduce records. Costs a scan.
    fn mr_record_count(&self) -> Result<u64, StorageError>;

    /// Durably sets one record. See [`WriteBatch::mr_put`].
    fn mr_put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.mr_put(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
        self.commit(batch)
    }

    /// Durably deletes one record. See [`WriteBatch::mr_delete`].
    fn mr_delete(&self, key: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::with_capacity(1);
        batch.mr_delete(Bytes::copy_from_slice(key));
        self.commit(batch)
    }
}

/// Everything a node keeps: implemented by [`Store`](super::Store) (sled) and
/// [`MemStore`](super::MemStore) (memory). Code generic over `S: NodeStorage`
/// runs on both.
pub trait NodeStorage: RaftLogStorage + KvStorage + MrStorage + Clone + 'static {}

impl<T: RaftLogStorage + KvStorage + MrStorage + Clone + 'static> NodeStorage for T {}

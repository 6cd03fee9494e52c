//! Durable state of a node: one store per data directory (a write-ahead log
//! with checkpoint images, or a sled database) holding Raft hard state, log
//! entries and snapshots per Raft group, the versioned key/value maps with
//! their applied indexes, and MapReduce job state.
//!
//! - [`Store`] keeps it in a data directory, on either [`StoreEngine`];
//!   [`MemStore`] keeps it in a [`MemDisk`] for simulation. All of them share
//!   the same batch and read logic and pass the same conformance suite.
//! - [`Storage::commit`] writes a [`WriteBatch`] atomically and durably: read
//!   the durability contract on [`Storage`] before using this module.
//! - [`RaftLogStorage`], [`KvStorage`] and [`MrStorage`] are the read sides
//!   (plus one-write conveniences) for the Raft driver, the KV state machine
//!   and the MapReduce coordinator; [`NodeStorage`] is all three.
//!
//! This module owns the on-disk format (key layout in `format.rs`, described
//! in `ARCHITECTURE.md`); nothing else may touch sled or the log's files.

mod config;
mod engine;
mod error;
mod format;
mod mem_log;
mod mem_store;
mod store;
mod traits;
mod wal;
mod write_batch;

pub use config::{FORMAT_VERSION, FlushMode, Limits, StoreConfig, StoreEngine};
pub use error::StorageError;
pub use mem_store::{MemDisk, MemStore};
pub use store::Store;
pub use traits::{KvStorage, MrStorage, NodeStorage, RaftLogStorage, Storage, VersionedValue};
pub use write_batch::WriteBatch;

use bytes::Bytes;

use crate::raft::{Entry, HardState, SnapshotMeta};

/// Bytes one log entry carrying `data_len` bytes of command occupies in a
/// store, as [`RaftLogStorage::raft_state_bytes`] counts them (key, term,
/// kind, data, checksum). Lets a service estimate its persisted Raft state
/// without scanning the log.
pub fn raft_entry_persisted_bytes(data_len: usize) -> u64 {
    (format::entry_key(0, 0).len() + format::ENTRY_HEADER_BYTES + data_len + format::CRC_BYTES)
        as u64
}

/// Identifier of a Raft group; several groups (shards) can share one store.
pub type GroupId = u64;

/// Identifier of a state machine (namespace of the versioned KV map); several
/// state machines can share one store.
pub type StateMachineId = u64;

/// Implements the storage traits for a store type by delegating to its engine.
macro_rules! delegate_to_engine {
    ($store:ty) => {
        impl Storage for $store {
            fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
                self.engine.commit(batch)
            }
        }

        impl RaftLogStorage for $store {
            fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
                self.engine.groups()
            }
            fn hard_state(&self, group: GroupId) -> Result<HardState, StorageError> {
                Ok(self.engine.group_state(group)?.hard_state)
            }
            fn first_index(&self, group: GroupId) -> Result<u64, StorageError> {
                Ok(self.engine.group_state(group)?.base_index + 1)
            }
            fn last_index(&self, group: GroupId) -> Result<u64, StorageError> {
                Ok(self.engine.group_state(group)?.last_index)
            }
            fn term(&self, group: GroupId, index: u64) -> Result<u64, StorageError> {
                self.engine.term(group, index)
            }
            fn entries(
                &self,
                group: GroupId,
                lo: u64,
                hi: u64,
                bytes_max: u64,
            ) -> Result<Vec<Entry>, StorageError> {
                self.engine.entries(group, lo, hi, bytes_max)
            }
            fn snapshot_meta(&self, group: GroupId) -> Result<SnapshotMeta, StorageError> {
                Ok(self.engine.group_state(group)?.snapshot)
            }
            fn snapshot(&self, group: GroupId) -> Result<(SnapshotMeta, Bytes), StorageError> {
                self.engine.snapshot(group)
            }
            fn raft_state_bytes(&self, group: GroupId) -> Result<u64, StorageError> {
                self.engine.raft_state_bytes(group)
            }
        }

        impl KvStorage for $store {
            fn kv_get(
                &self,
                ns: StateMachineId,
                key: &[u8],
            ) -> Result<Option<VersionedValue>, StorageError> {
                self.engine.kv_get(ns, key)
            }
            fn applied_index(&self, ns: StateMachineId) -> Result<u64, StorageError> {
                self.engine.applied_index(ns)
            }
            fn kv_scan(
                &self,
                ns: StateMachineId,
                after: Option<&[u8]>,
                limit: usize,
            ) -> Result<Vec<(Bytes, VersionedValue)>, StorageError> {
                self.engine.kv_scan(ns, after, limit)
            }
            fn kv_key_count(&self, ns: StateMachineId) -> Result<u64, StorageError> {
                self.engine.kv_key_count(ns)
            }
            fn kv_namespaces(&self) -> Result<Vec<StateMachineId>, StorageError> {
                self.engine.kv_namespaces()
            }
        }

        impl MrStorage for $store {
            fn mr_get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
                self.engine.mr_get(key)
            }
            fn mr_scan_prefix(
                &self,
                prefix: &[u8],
                limit: usize,
            ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
                self.engine.mr_scan_prefix(prefix, limit)
            }
            fn mr_record_count(&self) -> Result<u64, StorageError> {
                self.engine.mr_record_count()
            }
        }
    };
}

delegate_to_engine!(Store);
delegate_to_engine!(MemStore);

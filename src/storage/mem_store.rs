//! [`MemStore`] and [`MemDisk`]: the in-memory store for simulation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use smallvec::SmallVec;

use super::engine::{Backend, BackendBatch, Engine};
use super::{Limits, StorageError};

/// The durable image of a simulated node's disk: what survives its crashes.
///
/// A [`MemStore`] writes every commit straight into its `MemDisk`, as if the
/// commit had been flushed. To simulate a crash, give the restarted node a
/// [`fork`](MemDisk::fork) of the disk and open a new `MemStore` on it: it
/// holds exactly the committed batches, and a dead instance that keeps
/// running can no longer change what the restarted one reads (the reference
/// labs' "copy of the persisted state"). A [`WriteBatch`](super::WriteBatch)
/// built but not committed before the crash is lost, like on a real disk.
///
/// Cheap to clone; clones share the same image.
#[derive(Clone, Default)]
pub struct MemDisk {
    image: Arc<Mutex<DiskImage>>,
}

/// A record's key; log-entry and hard-state keys (≤ 17 bytes) stay inline.
type DiskKey = SmallVec<[u8; 24]>;

#[derive(Default)]
struct DiskImage {
    records: BTreeMap<DiskKey, Bytes>,
    /// Whether a live `MemStore` uses this disk (sled's directory lock).
    open: bool,
}

impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let image = self.lock();
        f.debug_struct("MemDisk")
            .field("records", &image.records.len())
            .field("open", &image.open)
            .finish()
    }
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    /// A copy of the durable image, not in use by any store: what a node
    /// restarted after a crash finds.
    pub fn fork(&self) -> MemDisk {
        let records = self.lock().records.clone();
        MemDisk {
            image: Arc::new(Mutex::new(DiskImage {
                records,
                open: false,
            })),
        }
    }

    /// Total bytes of keys and values on the disk.
    pub fn size_bytes(&self) -> u64 {
        self.lock()
            .records
            .iter()
            .map(|(key, value)| (key.len() + value.len()) as u64)
            .sum()
    }

    fn lock(&self) -> MutexGuard<'_, DiskImage> {
        self.image
            .lock()
            .expect("invariant: a panic while holding the memory disk lock")
    }
}

/// The in-memory store: the same engine as [`Store`](super::Store) over a
/// [`MemDisk`] instead of sled, for fast deterministic simulation. Every
/// commit is durable (in the `MemDisk`) when it returns; see [`MemDisk`] for
/// how to crash and restart it. Cheap to clone; the disk counts as in use
/// until the last clone is dropped.
#[derive(Clone)]
pub struct MemStore {
    pub(crate) engine: Arc<Engine<MemBackend>>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").finish_non_exhaustive()
    }
}

const MEMORY_PATH: &str = "<memory>";

impl MemStore {
    /// Opens a store on `disk` with default [`Limits`], initialising an empty
    /// disk. [`StorageError::Locked`] when another live `MemStore` uses it.
    pub fn open(disk: &MemDisk) -> Result<MemStore, StorageError> {
        MemStore::open_with(disk, Limits::default())
    }

    /// Opens a store on `disk` with `limits`.
    pub fn open_with(disk: &MemDisk, limits: Limits) -> Result<MemStore, StorageError> {
        {
            let mut image = disk.lock();
            if image.open {
                return Err(StorageError::Locked {
                    path: MEMORY_PATH.into(),
                });
            }
            image.open = true;
        }
        // From here the backend owns the lock and releases it when dropped,
        // also when opening fails below.
        let backend = MemBackend { disk: disk.clone() };
        let engine = Engine::open(backend, limits, true, true, Path::new(MEMORY_PATH))?;
        Ok(MemStore {
            engine: Arc::new(engine),
        })
    }

    /// The disk this store writes to.
    pub fn disk(&self) -> MemDisk {
        self.engine.backend().disk.clone()
    }

    /// The on-disk format version.
    pub fn format_version(&self) -> u32 {
        self.engine.format_version()
    }
}

pub(crate) struct MemBackend {
    disk: MemDisk,
}

impl Drop for MemBackend {
    fn drop(&mut self) {
        // Never panic in drop: recover the guard even after a poisoning panic.
        let mut image = self.disk.image.lock().unwrap_or_else(|e| e.into_inner());
        image.open = false;
    }
}

/// Writes in order; applied one after another under the disk lock. The
/// values of small writes are copied into one buffer per batch (one
/// allocation, shared by the records it holds); a large value gets its own.
#[derive(Default)]
pub(crate) struct MemBatch {
    writes: Vec<(DiskKey, Option<BatchValue>)>,
    arena: Vec<u8>,
}

enum BatchValue {
    /// A range of the batch's buffer.
    Arena(std::ops::Range<usize>),
    Own(Bytes),
}

/// Values at most this long share their batch's buffer.
const ARENA_VALUE_BYTES_MAX: usize = 1024;

impl BackendBatch for MemBatch {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        let value = if value.len() <= ARENA_VALUE_BYTES_MAX {
            let start = self.arena.len();
            self.arena.extend_from_slice(value);
            BatchValue::Arena(start..self.arena.len())
        } else {
            BatchValue::Own(Bytes::copy_from_slice(value))
        };
        self.writes.push((DiskKey::from_slice(key), Some(value)));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.push((DiskKey::from_slice(key), None));
    }
}

impl Backend for MemBackend {
    type Value = Bytes;
    type Batch = MemBatch;

    fn new_batch(&self) -> MemBatch {
        MemBatch::default()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        Ok(self.disk.lock().records.get(key).cloned())
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, mut visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], Bytes) -> Result<bool, StorageError>,
    {
        let image = self.disk.lock();
        let range = image
            .records
            .range::<[u8], _>((Bound::Included(lo), Bound::Excluded(hi)));
        if reverse {
            for (key, value) in range.rev() {
                if !visit(key, value.clone())? {
                    break;
                }
            }
        } else {
            for (key, value) in range {
                if !visit(key, value.clone())? {
                    break;
                }
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.disk.lock().records.is_empty())
    }

    fn apply(&self, batch: MemBatch) -> Result<(), StorageError> {
        let arena = Bytes::from(batch.arena);
        let mut image = self.disk.lock();
        for (key, value) in batch.writes {
            match value {
                Some(value) => {
                    let value = match value {
                        BatchValue::Arena(range) => arena.slice(range),
                        BatchValue::Own(value) => value,
                    };
                    image.records.insert(key, value);
                }
                None => {
                    image.records.remove(&key);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn into_bytes(value: Bytes) -> Bytes {
        value
    }
}

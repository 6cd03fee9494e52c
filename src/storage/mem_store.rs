//! [`MemStore`] and [`MemDisk`]: the in-memory store for simulation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use smallvec::SmallVec;

use super::engine::{Backend, BackendBatch, Engine};
use super::format::{TAG_ENTRY, be_u64, entry_key};
use super::mem_log::{LogKey, MemLog};
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
    /// Every record but the log entries in `log`.
    records: BTreeMap<DiskKey, Bytes>,
    /// The log entries (`TAG_ENTRY` keys), by `(group, index)`, in one window
    /// per group: most writes are entries, appended at a group's end and
    /// purged from its start. An entry the window refuses (far from the
    /// others) is kept in `records` under its key instead. Reads see one
    /// ordered key space: scans merge both.
    log: MemLog,
    /// How many log entries `records` holds.
    log_in_records: usize,
    /// Whether a live `MemStore` uses this disk (sled's directory lock).
    open: bool,
}

impl std::fmt::Debug for MemDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let image = self.lock();
        f.debug_struct("MemDisk")
            .field("records", &(image.records.len() + image.log.len()))
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
        let image = self.lock();
        let (records, log) = (image.records.clone(), image.log.clone());
        let log_in_records = image.log_in_records;
        drop(image);
        MemDisk {
            image: Arc::new(Mutex::new(DiskImage {
                records,
                log,
                log_in_records,
                open: false,
            })),
        }
    }

    /// Total bytes of keys and values on the disk.
    pub fn size_bytes(&self) -> u64 {
        let image = self.lock();
        let records: u64 = image
            .records
            .iter()
            .map(|(key, value)| (key.len() + value.len()) as u64)
            .sum();
        let log: u64 = image
            .log
            .values()
            .map(|value| (LOG_KEY_BYTES + value.len()) as u64)
            .sum();
        records + log
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

impl MemBackend {
    /// A backend over `disk` (the write-ahead-log store keeps its image in
    /// one that no `MemStore` ever opens).
    pub(super) fn on(disk: MemDisk) -> MemBackend {
        MemBackend { disk }
    }
}

impl Drop for MemBackend {
    fn drop(&mut self) {
        // Never panic in drop: recover the guard even after a poisoning panic.
        let mut image = self.disk.image.lock().unwrap_or_else(|e| e.into_inner());
        image.open = false;
    }
}

/// Length of a log entry key: tag, group, index.
const LOG_KEY_BYTES: usize = 17;

/// The `(group, index)` of a log entry key, `None` for any other key.
fn log_key(key: &[u8]) -> Option<LogKey> {
    if key.len() != LOG_KEY_BYTES || key[0] != TAG_ENTRY {
        return None;
    }
    Some((be_u64(key, 1), be_u64(key, 9)))
}

/// The smallest `(group, index)` whose entry key is `>= bound` (`None`: no
/// entry key is). Entry keys order like their tuples.
fn log_lower_bound(bound: &[u8]) -> Option<LogKey> {
    match bound.first() {
        None => return Some((0, 0)),
        Some(&tag) if tag < TAG_ENTRY => return Some((0, 0)),
        Some(&tag) if tag > TAG_ENTRY => return None,
        Some(_) => {}
    }
    // A shorter bound compares like itself padded with zeros; a longer one
    // is above the entry key it starts with.
    let mut padded = [0u8; LOG_KEY_BYTES];
    let n = bound.len().min(LOG_KEY_BYTES);
    padded[..n].copy_from_slice(&bound[..n]);
    let at = (be_u64(&padded, 1), be_u64(&padded, 9));
    if bound.len() <= LOG_KEY_BYTES {
        Some(at)
    } else if at.1 < u64::MAX {
        Some((at.0, at.1 + 1))
    } else if at.0 < u64::MAX {
        Some((at.0 + 1, 0))
    } else {
        None
    }
}

/// The log entries whose keys lie in `lo..hi`.
fn log_range<'a>(
    log: &'a MemLog,
    lo: &[u8],
    hi: &[u8],
) -> Box<dyn DoubleEndedIterator<Item = (LogKey, &'a Bytes)> + 'a> {
    let Some(start) = log_lower_bound(lo) else {
        return Box::new(std::iter::empty());
    };
    let end = log_lower_bound(hi);
    match end {
        Some(end) if end <= start => Box::new(std::iter::empty()),
        end => Box::new(log.range(start, end)),
    }
}

/// The other records of a scan, in its order.
type RecordIter<'a> = Box<dyn Iterator<Item = (&'a DiskKey, &'a Bytes)> + 'a>;
/// The log entries of a scan, in its order.
type LogIter<'a> = Box<dyn Iterator<Item = (LogKey, &'a Bytes)> + 'a>;

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
/// Most bytes a size hint reserves for the buffer (it grows past that).
const ARENA_RESERVE_BYTES_MAX: usize = 1 << 20;

impl MemBatch {
    /// Visits the writes in order: a put with its value, a delete with `None`.
    pub(super) fn for_each_write(&self, mut visit: impl FnMut(&[u8], Option<&[u8]>)) {
        for (key, value) in &self.writes {
            let value = value.as_ref().map(|value| match value {
                BatchValue::Arena(range) => &self.arena[range.clone()],
                BatchValue::Own(value) => &value[..],
            });
            visit(key, value);
        }
    }

    /// How many writes the batch holds.
    pub(super) fn len(&self) -> usize {
        self.writes.len()
    }
}

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

    fn reserve(&mut self, writes: usize, bytes: usize) {
        self.writes.reserve(writes);
        // Large values do not go to the arena: never reserve more than the
        // arena could take.
        self.arena.reserve(
            bytes
                .min(writes.saturating_mul(ARENA_VALUE_BYTES_MAX))
                .min(ARENA_RESERVE_BYTES_MAX),
        );
    }
}

impl Backend for MemBackend {
    type Value = Bytes;
    type Batch = MemBatch;

    fn new_batch(&self) -> MemBatch {
        MemBatch::default()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        let image = self.disk.lock();
        Ok(match log_key(key) {
            Some(at) => match image.log.get(at) {
                Some(value) => Some(value.clone()),
                None if image.log_in_records > 0 => image.records.get(key).cloned(),
                None => None,
            },
            None => image.records.get(key).cloned(),
        })
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, mut visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], Bytes) -> Result<bool, StorageError>,
    {
        let image = self.disk.lock();
        let records = image
            .records
            .range::<[u8], _>((Bound::Included(lo), Bound::Excluded(hi)));
        let log = log_range(&image.log, lo, hi);
        // Merge the two ordered sources into one key order.
        let (mut records, mut log): (RecordIter<'_>, LogIter<'_>) = if reverse {
            (Box::new(records.rev()), Box::new(log.rev()))
        } else {
            (Box::new(records), log)
        };
        let mut next_record = records.next();
        let mut next_entry = log.next();
        loop {
            let next_log_key = next_entry.map(|((group, index), _)| entry_key(group, index));
            let take_record = match (next_record, &next_log_key) {
                (None, None) => return Ok(()),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((key, _)), Some(next_log_key)) => {
                    (key.as_slice() < &next_log_key[..]) != reverse
                }
            };
            let go_on = if take_record {
                let (key, value) = next_record.expect("a record was chosen");
                next_record = records.next();
                visit(key, value.clone())?
            } else {
                let (_, value) = next_entry.expect("an entry was chosen");
                next_entry = log.next();
                visit(&next_log_key.expect("an entry was chosen"), value.clone())?
            };
            if !go_on {
                return Ok(());
            }
        }
    }

    fn is_empty(&self) -> Result<bool, StorageError> {
        let image = self.disk.lock();
        Ok(image.records.is_empty() && image.log.is_empty())
    }

    fn apply(&self, batch: MemBatch) -> Result<(), StorageError> {
        let mut arena = batch.arena;
        if arena.capacity() > 2 * arena.len() + 4096 {
            // The hint counted large values too: the stored slices would pin
            // the unused reservation for as long as they live.
            arena.shrink_to_fit();
        }
        let arena = Bytes::from(arena);
        let mut guard = self.disk.lock();
        let image = &mut *guard;
        for (key, value) in batch.writes {
            let value = value.map(|value| match value {
                BatchValue::Arena(range) => arena.slice(range),
                BatchValue::Own(value) => value,
            });
            match (log_key(&key), value) {
                (Some(at), Some(value)) => match image.log.try_insert(at, value) {
                    Ok(()) => {
                        if image.log_in_records > 0 && image.records.remove(&key).is_some() {
                            image.log_in_records -= 1;
                        }
                    }
                    Err(value) => {
                        if image.records.insert(key, value).is_none() {
                            image.log_in_records += 1;
                        }
                    }
                },
                (Some(at), None) => {
                    if !image.log.remove(at) && image.records.remove(&key).is_some() {
                        image.log_in_records -= 1;
                    }
                }
                (None, Some(value)) => {
                    image.records.insert(key, value);
                }
                (None, None) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::format::{TAG_HARD_STATE, TAG_SNAPSHOT_DATA, group_key};

    #[test]
    fn log_bounds_follow_byte_order() {
        assert_eq!(log_lower_bound(&[]), Some((0, 0)));
        assert_eq!(log_lower_bound(&[TAG_HARD_STATE]), Some((0, 0)));
        assert_eq!(log_lower_bound(&[TAG_SNAPSHOT_DATA]), None);
        assert_eq!(log_lower_bound(&[TAG_ENTRY]), Some((0, 0)));
        assert_eq!(log_lower_bound(&group_key(TAG_ENTRY, 3)), Some((3, 0)));
        assert_eq!(log_lower_bound(&entry_key(3, 7)), Some((3, 7)));
        let mut longer = entry_key(3, 7).to_vec();
        longer.push(0);
        assert_eq!(log_lower_bound(&longer), Some((3, 8)));
        let mut last = entry_key(3, u64::MAX).to_vec();
        last.push(0);
        assert_eq!(log_lower_bound(&last), Some((4, 0)));
    }

    /// Scans see the log entries and the other records as one ordered key
    /// space, both ways, and stop when told.
    #[test]
    fn scans_merge_the_log_with_the_other_records() {
        let disk = MemDisk::new();
        let backend = MemBackend { disk: disk.clone() };
        let mut batch = backend.new_batch();
        let keys: Vec<Vec<u8>> = vec![
            group_key(TAG_HARD_STATE, 1).to_vec(),
            group_key(TAG_ENTRY, 1).to_vec(), // a 9-byte key under the entry tag
            entry_key(1, 1).to_vec(),
            entry_key(1, 2).to_vec(),
            entry_key(2, 1).to_vec(),
            group_key(TAG_SNAPSHOT_DATA, 1).to_vec(),
        ];
        for key in keys.iter().rev() {
            batch.put(key, key);
        }
        backend.apply(batch).expect("apply");
        let scan = |lo: &[u8], hi: &[u8], reverse: bool, limit: usize| {
            let mut seen = Vec::new();
            backend
                .scan(lo, hi, reverse, |key, value| {
                    assert_eq!(key, value.as_ref());
                    seen.push(key.to_vec());
                    Ok(seen.len() < limit)
                })
                .expect("scan");
            seen
        };
        assert_eq!(scan(&[0], &[0xff], false, usize::MAX), keys);
        let mut reversed = keys.clone();
        reversed.reverse();
        assert_eq!(scan(&[0], &[0xff], true, usize::MAX), reversed);
        assert_eq!(scan(&entry_key(1, 2), &[0xff], false, 2), keys[3..5]);
        assert_eq!(
            scan(&group_key(TAG_ENTRY, 1), &group_key(TAG_ENTRY, 2), true, 1),
            vec![keys[3].clone()]
        );
        assert_eq!(
            backend.get(&entry_key(2, 1)).expect("get").as_deref(),
            Some(&keys[4][..])
        );
        let mut batch = backend.new_batch();
        batch.delete(&entry_key(1, 1));
        backend.apply(batch).expect("apply");
        assert_eq!(backend.get(&entry_key(1, 1)).expect("get"), None);
        assert_eq!(disk.fork().size_bytes(), disk.size_bytes());
    }

    /// An entry far from its group's window lives among the other records
    /// until the window reaches it; reads, scans, deletes and forks see one
    /// key space throughout.
    #[test]
    fn entries_far_from_the_window_are_kept_with_the_records() {
        let disk = MemDisk::new();
        let backend = MemBackend { disk: disk.clone() };
        let write = |puts: &[u64], deletes: &[u64]| {
            let mut batch = backend.new_batch();
            for &index in puts {
                batch.put(&entry_key(1, index), &index.to_be_bytes());
            }
            for &index in deletes {
                batch.delete(&entry_key(1, index));
            }
            backend.apply(batch).expect("apply");
        };
        let indexes = || {
            let mut seen = Vec::new();
            backend
                .scan(&[0], &[0xff], false, |key, value| {
                    let index = be_u64(key, 9);
                    assert_eq!(value.as_ref(), &index.to_be_bytes());
                    seen.push(index);
                    Ok(true)
                })
                .expect("scan");
            seen
        };
        write(&[1, 2, 1000], &[]);
        assert_eq!(disk.lock().log_in_records, 1);
        assert_eq!(indexes(), vec![1, 2, 1000]);
        assert_eq!(
            backend.get(&entry_key(1, 1000)).expect("get").as_deref(),
            Some(&1000u64.to_be_bytes()[..])
        );
        let forked = disk.fork();
        assert_eq!(forked.size_bytes(), disk.size_bytes());
        // The window grows up to the far entry, which moves into it.
        let filling: Vec<u64> = (3..=1000).collect();
        write(&filling, &[]);
        assert_eq!(disk.lock().log_in_records, 0);
        assert_eq!(indexes(), (1..=1000).collect::<Vec<u64>>());
        // A far entry deleted from the records.
        write(&[5000], &[]);
        assert_eq!(disk.lock().log_in_records, 1);
        write(&[], &[5000, 1]);
        assert_eq!(disk.lock().log_in_records, 0);
        assert_eq!(backend.get(&entry_key(1, 5000)).expect("get"), None);
        assert_eq!(indexes(), (2..=1000).collect::<Vec<u64>>());
        // The fork kept its own copy.
        let forked = MemBackend { disk: forked };
        assert!(forked.get(&entry_key(1, 1000)).expect("get").is_some());
        assert!(forked.get(&entry_key(1, 999)).expect("get").is_none());
    }
}

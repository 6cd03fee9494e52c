//! The engine shared by [`Store`](super::Store) and [`MemStore`](super::MemStore):
//! format checks, the per-group state cache, batch planning and all reads.
//! It sees its backend only as an ordered byte map with atomic batches and a
//! flush, so both stores run the same logic and differ only in where the
//! bytes live.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::format::{
    FORMAT_KEY, TAG_ENTRY, TAG_HARD_STATE, TAG_KV_APPLIED, TAG_KV_ENTRY, TAG_LOG_BASE, TAG_MR,
    TAG_SNAPSHOT_DATA, TAG_SNAPSHOT_META, applied_key, be_u64, corruption, decode_entry,
    decode_format, decode_hard_state, decode_plain, decode_snapshot_data, decode_u64s,
    decode_versioned, encode_entry, encode_format, encode_hard_state, encode_plain,
    encode_snapshot_data, encode_u64s, encode_versioned, entry_key, group_key, kv_key, kv_prefix,
    mr_key, prefix_end,
};
use super::write_batch::Op;
use super::{
    FORMAT_VERSION, GroupId, Limits, StateMachineId, StorageError, VersionedValue, WriteBatch,
};
use crate::raft::{Entry, HardState, SnapshotMeta};

/// An ordered byte map with atomic batches: what the engine needs from sled
/// or from memory.
pub(crate) trait Backend: Send + Sync + 'static {
    /// A stored value, owned (sled's `IVec`, or `Bytes` in memory).
    type Value: AsRef<[u8]> + Send + Sync + 'static;
    /// A batch of puts and deletes applied atomically.
    type Batch: BackendBatch;

    fn new_batch(&self) -> Self::Batch;
    fn get(&self, key: &[u8]) -> Result<Option<Self::Value>, StorageError>;
    /// Visits the keys in `lo..hi` in order (descending when `reverse`) until
    /// `visit` returns `false`.
    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], Self::Value) -> Result<bool, StorageError>;
    /// Whether the backend holds no record at all (a fresh database).
    fn is_empty(&self) -> Result<bool, StorageError>;
    /// Applies a batch atomically (in memory and, once flushed, on disk).
    fn apply(&self, batch: Self::Batch) -> Result<(), StorageError>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StorageError>;
    /// Turns a value into `Bytes` without copying it.
    fn into_bytes(value: Self::Value) -> Bytes;
}

/// Puts and deletes collected for one atomic apply; a later write of a key
/// overrides an earlier one.
pub(crate) trait BackendBatch {
    fn put(&mut self, key: &[u8], value: &[u8]);
    fn delete(&mut self, key: &[u8]);
    /// A hint: about `writes` more puts and deletes with `bytes` of values
    /// follow.
    fn reserve(&mut self, writes: usize, bytes: usize) {
        let _ = (writes, bytes);
    }
}

/// What the engine remembers about a Raft group between calls (mirrors its
/// durable records so that the hot reads need no I/O).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupState {
    pub(crate) hard_state: HardState,
    /// Last compacted index (0 when nothing was compacted) and its term.
    pub(crate) base_index: u64,
    pub(crate) base_term: u64,
    /// Last index in the log (`base_index` when the log is empty) and its term.
    pub(crate) last_index: u64,
    pub(crate) last_term: u64,
    pub(crate) snapshot: SnapshotMeta,
    pub(crate) snapshot_bytes: u64,
    /// Entries at or below this index are physically deleted. Compaction only
    /// moves `base_index`; the entries it covers (`purged_through + 1 ..=
    /// base_index`) are deleted a bounded number per later commit (see
    /// [`PURGE_ENTRIES_PER_COMMIT_MIN`]), so compacting a long log never makes
    /// one commit slow. Not persisted: derived from the first entry at open.
    pub(crate) purged_through: u64,
}

/// Stale entries (below the log base) deleted per commit at least; a commit
/// that appends many entries deletes up to twice as many, so purging always
/// outpaces appending.
pub(crate) const PURGE_ENTRIES_PER_COMMIT_MIN: u64 = 64;

/// Bytes a log entry's value takes beyond its data (header and checksum).
const ENTRY_RECORD_OVERHEAD_BYTES: usize =
    super::format::ENTRY_HEADER_BYTES + super::format::CRC_BYTES;

/// The storage engine over one backend.
pub(crate) struct Engine<B: Backend> {
    backend: B,
    limits: Limits,
    flush_on_commit: bool,
    /// The directory's format version; raised to [`FORMAT_VERSION`] by the
    /// first commit that writes snapshot data into a format-1 store opened
    /// without `create` (format 2 keeps snapshot data elsewhere).
    format_version: AtomicU32,
    /// The group cache. Commits hold the write lock while they plan and apply
    /// (not while they flush); reads hold the read lock so they never see half
    /// of a batch.
    groups: RwLock<BTreeMap<GroupId, GroupState>>,
    /// Set once a write failed half-way; the engine then refuses every call.
    poisoned: OnceLock<String>,
}

fn not_raftkv(path: &Path, reason: &str) -> StorageError {
    StorageError::NotRaftkvDirectory {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// Writes and flushes the marker of [`FORMAT_VERSION`].
fn write_format_marker<B: Backend>(backend: &B) -> Result<(), StorageError> {
    let mut buf = Vec::new();
    encode_format(FORMAT_VERSION, &mut buf);
    let mut batch = backend.new_batch();
    batch.put(FORMAT_KEY, &buf);
    backend.apply(batch)?;
    backend.flush()
}

/// End of the key range of a prefix; every prefix we scan starts with a tag
/// below 0xff, so it exists.
fn end_of(prefix: &[u8]) -> Vec<u8> {
    prefix_end(prefix).expect("invariant: every scanned prefix starts with a tag below 0xff")
}

impl<B: Backend> Engine<B> {
    /// Checks the format marker (writing it into an empty backend when
    /// `create`), then loads the group cache.
    pub(crate) fn open(
        backend: B,
        limits: Limits,
        flush_on_commit: bool,
        create: bool,
        path: &Path,
    ) -> Result<Engine<B>, StorageError> {
        let format_version = match backend.get(FORMAT_KEY)? {
            Some(value) => match decode_format(value.as_ref())? {
                None => return Err(not_raftkv(path, "the database has a foreign format marker")),
                Some(found) if found > FORMAT_VERSION => {
                    return Err(StorageError::NewerFormat {
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                Some(0) => return Err(corruption(FORMAT_KEY, "format version 0 does not exist")),
                Some(found) if found < FORMAT_VERSION && create => {
                    // Format 2 only moved where sled keeps snapshot data (read
                    // from either place), so the marker is the whole upgrade.
                    write_format_marker(&backend)?;
                    tracing::info!(path = %path.display(), from = found, to = FORMAT_VERSION, "upgraded a raftkv store");
                    FORMAT_VERSION
                }
                Some(found) => found,
            },
            None if !backend.is_empty()? => {
                return Err(not_raftkv(
                    path,
                    "the database holds records but no raftkv format marker",
                ));
            }
            None if !create => {
                return Err(not_raftkv(path, "the database is empty (no format marker)"));
            }
            None => {
                write_format_marker(&backend)?;
                tracing::info!(path = %path.display(), version = FORMAT_VERSION, "created a raftkv store");
                FORMAT_VERSION
            }
        };
        let groups = load_groups(&backend)?;
        Ok(Engine {
            backend,
            limits,
            flush_on_commit,
            format_version: AtomicU32::new(format_version),
            groups: RwLock::new(groups),
            poisoned: OnceLock::new(),
        })
    }

    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    pub(crate) fn format_version(&self) -> u32 {
        self.format_version.load(Ordering::Acquire)
    }

    fn check_usable(&self) -> Result<(), StorageError> {
        match self.poisoned.get() {
            Some(cause) => Err(StorageError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&self, error: &StorageError) {
        tracing::error!(%error, "a write failed half-way; the store refuses further calls until reopened");
        let _ = self.poisoned.set(error.to_string());
    }

    /// Read access to the group cache, after checking the engine is usable.
    fn read(&self) -> Result<RwLockReadGuard<'_, BTreeMap<GroupId, GroupState>>, StorageError> {
        self.check_usable()?;
        Ok(self
            .groups
            .read()
            .expect("invariant: a panic while holding the storage lock"))
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<GroupId, GroupState>> {
        self.groups
            .write()
            .expect("invariant: a panic while holding the storage lock")
    }

    // ---- writes ----

    /// Plans, applies and (per the flush mode) flushes one batch. See the
    /// durability contract on [`Storage`](super::Storage).
    pub(crate) fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.check_usable()?;
        if batch.ops.is_empty() {
            return Ok(());
        }
        {
            let mut groups = self.write();
            let mut planner = Planner {
                backend: &self.backend,
                limits: &self.limits,
                committed: &groups,
                working: Vec::new(),
                batch: self.backend.new_batch(),
                scratch: Vec::new(),
                batch_bytes: 0,
            };
            let (appended, bytes) = batch
                .ops
                .iter()
                .fold((0, 0), |(count, bytes), op| match op {
                    Op::Append { entries, .. } => (
                        count + entries.len(),
                        bytes
                            + entries
                                .iter()
                                .map(|entry| ENTRY_RECORD_OVERHEAD_BYTES + entry.data.len())
                                .sum::<usize>(),
                    ),
                    _ => (count, bytes),
                });
            // Deletes of stale entries (see `purge`) come on top, when due.
            let purging = groups.values().any(|s| s.purged_through < s.base_index);
            let purges = if purging {
                (PURGE_ENTRIES_PER_COMMIT_MIN as usize).max(2 * appended)
            } else {
                0
            };
            let writes = batch.ops.len() + appended + purges;
            planner.batch.reserve(writes, bytes);
            for (position, op) in batch.ops.iter().enumerate() {
                planner.plan(&batch.ops[..position], op)?;
            }
            planner.purge(&batch.ops);
            let upgrade = self.format_version() < FORMAT_VERSION
                && batch
                    .ops
                    .iter()
                    .any(|op| matches!(op, Op::InstallSnapshot { .. }));
            if upgrade {
                // Snapshot data is about to be written the format-2 way: the
                // marker goes with it, atomically, so older builds refuse the
                // directory instead of missing the data.
                let mut buf = Vec::new();
                encode_format(FORMAT_VERSION, &mut buf);
                planner.batch.put(FORMAT_KEY, &buf);
            }
            let Planner {
                working,
                batch: backend_batch,
                ..
            } = planner;
            if let Err(error) = self.backend.apply(backend_batch) {
                self.poison(&error);
                return Err(error);
            }
            for (group, state) in working {
                groups.insert(group, state);
            }
            if upgrade {
                self.format_version.store(FORMAT_VERSION, Ordering::Release);
            }
        }
        if self.flush_on_commit {
            if let Err(error) = self.backend.flush() {
                self.poison(&error);
                return Err(error);
            }
        }
        Ok(())
    }

    // ---- Raft reads ----

    pub(crate) fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
        Ok(self.read()?.keys().copied().collect())
    }

    pub(crate) fn group_state(&self, group: GroupId) -> Result<GroupState, StorageError> {
        Ok(self.read()?.get(&group).copied().unwrap_or_default())
    }

    pub(crate) fn term(&self, group: GroupId, index: u64) -> Result<u64, StorageError> {
        let groups = self.read()?;
        let state = groups.get(&group).copied().unwrap_or_default();
        if index < state.base_index {
            return Err(StorageError::Compacted {
                group,
                index,
                first_index: state.base_index + 1,
            });
        }
        if index > state.last_index {
            return Err(StorageError::Unavailable {
                group,
                index,
                last_index: state.last_index,
            });
        }
        if index == state.base_index {
            return Ok(state.base_term);
        }
        if index == state.last_index {
            return Ok(state.last_term);
        }
        read_entry_term(&self.backend, group, index)
    }

    pub(crate) fn entries(
        &self,
        group: GroupId,
        lo: u64,
        hi: u64,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if lo > hi {
            return Err(StorageError::InvalidArgument(format!(
                "entries({lo}, {hi}): lo is above hi"
            )));
        }
        let groups = self.read()?;
        let state = groups.get(&group).copied().unwrap_or_default();
        if lo <= state.base_index {
            return Err(StorageError::Compacted {
                group,
                index: lo,
                first_index: state.base_index + 1,
            });
        }
        if hi > state.last_index + 1 {
            return Err(StorageError::Unavailable {
                group,
                index: hi - 1,
                last_index: state.last_index,
            });
        }
        let wanted = hi - lo;
        let mut entries = Vec::with_capacity(wanted.min(1024) as usize);
        let mut data_bytes = 0u64;
        let mut stopped_by_limit = false;
        self.backend.scan(
            &entry_key(group, lo),
            &entry_key(group, hi),
            false,
            |key, value| {
                let expected = lo + entries.len() as u64;
                if key.len() != 17 {
                    return Err(corruption(key, "log entry key has the wrong length"));
                }
                let index = be_u64(key, 9);
                if index != expected {
                    return Err(corruption(
                        &entry_key(group, expected),
                        "entry missing inside the log",
                    ));
                }
                let (term, kind, range) = decode_entry(key, value.as_ref())?;
                data_bytes += range.len() as u64;
                if !entries.is_empty() && data_bytes > bytes_max {
                    stopped_by_limit = true;
                    return Ok(false);
                }
                let data = B::into_bytes(value).slice(range);
                entries.push(Entry {
                    index,
                    term,
                    kind,
                    data,
                });
                Ok(true)
            },
        )?;
        if !stopped_by_limit && (entries.len() as u64) < wanted {
            return Err(corruption(
                &entry_key(group, lo + entries.len() as u64),
                "entry missing inside the log",
            ));
        }
        Ok(entries)
    }

    pub(crate) fn snapshot(&self, group: GroupId) -> Result<(SnapshotMeta, Bytes), StorageError> {
        let groups = self.read()?;
        let state = groups.get(&group).copied().unwrap_or_default();
        if state.snapshot.last_included_index == 0 {
            return Ok((SnapshotMeta::default(), Bytes::new()));
        }
        let key = group_key(TAG_SNAPSHOT_DATA, group);
        let value = self.backend.get(&key)?.ok_or_else(|| {
            corruption(&key, "snapshot meta exists but the data record is missing")
        })?;
        let (meta, range) = decode_snapshot_data(&key, value.as_ref())?;
        if meta != state.snapshot {
            return Err(corruption(
                &key,
                format!(
                    "data is for index {} term {} but the meta says index {} term {}",
                    meta.last_included_index,
                    meta.last_included_term,
                    state.snapshot.last_included_index,
                    state.snapshot.last_included_term
                ),
            ));
        }
        if range.len() as u64 != state.snapshot_bytes {
            return Err(corruption(
                &key,
                format!(
                    "data is {} bytes but the meta says {}",
                    range.len(),
                    state.snapshot_bytes
                ),
            ));
        }
        Ok((meta, B::into_bytes(value).slice(range)))
    }

    pub(crate) fn raft_state_bytes(&self, group: GroupId) -> Result<u64, StorageError> {
        let groups = self.read()?;
        let mut total = 0u64;
        for tag in [TAG_HARD_STATE, TAG_LOG_BASE] {
            let key = group_key(tag, group);
            if let Some(value) = self.backend.get(&key)? {
                total += (key.len() + value.as_ref().len()) as u64;
            }
        }
        // Only the live log: stale entries below the base are being purged.
        let state = groups.get(&group).copied().unwrap_or_default();
        let prefix = group_key(TAG_ENTRY, group);
        self.backend.scan(
            &entry_key(group, state.base_index + 1),
            &end_of(&prefix),
            false,
            |key, value| {
                total += (key.len() + value.as_ref().len()) as u64;
                Ok(true)
            },
        )?;
        Ok(total)
    }

    // ---- KV reads ----

    pub(crate) fn kv_get(
        &self,
        ns: StateMachineId,
        key: &[u8],
    ) -> Result<Option<VersionedValue>, StorageError> {
        let _groups = self.read()?;
        let full = kv_key(ns, key);
        match self.backend.get(&full)? {
            None => Ok(None),
            Some(value) => {
                let (version, range) = decode_versioned(&full, value.as_ref())?;
                Ok(Some(VersionedValue {
                    value: B::into_bytes(value).slice(range),
                    version,
                }))
            }
        }
    }

    pub(crate) fn applied_index(&self, ns: StateMachineId) -> Result<u64, StorageError> {
        let _groups = self.read()?;
        let key = applied_key(ns);
        match self.backend.get(&key)? {
            None => Ok(0),
            Some(value) => Ok(decode_u64s::<1>(&key, value.as_ref())?[0]),
        }
    }

    pub(crate) fn kv_scan(
        &self,
        ns: StateMachineId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, VersionedValue)>, StorageError> {
        let _groups = self.read()?;
        let prefix = kv_prefix(ns);
        let lo = match after {
            Some(after) => {
                let mut lo = kv_key(ns, after);
                lo.push(0);
                lo
            }
            None => prefix.to_vec(),
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.backend
            .scan(&lo, &end_of(&prefix), false, |key, value| {
                let (version, range) = decode_versioned(key, value.as_ref())?;
                out.push((
                    Bytes::copy_from_slice(&key[prefix.len()..]),
                    VersionedValue {
                        value: B::into_bytes(value).slice(range),
                        version,
                    },
                ));
                Ok(out.len() < limit)
            })?;
        Ok(out)
    }

    pub(crate) fn kv_key_count(&self, ns: StateMachineId) -> Result<u64, StorageError> {
        let _groups = self.read()?;
        let prefix = kv_prefix(ns);
        let mut count = 0u64;
        self.backend
            .scan(&prefix, &end_of(&prefix), false, |_, _| {
                count += 1;
                Ok(true)
            })?;
        Ok(count)
    }

    pub(crate) fn kv_namespaces(&self) -> Result<Vec<StateMachineId>, StorageError> {
        let _groups = self.read()?;
        let mut namespaces = BTreeSet::new();
        self.backend
            .scan(&[TAG_KV_APPLIED], &[TAG_KV_APPLIED + 1], false, |key, _| {
                if key.len() != 9 {
                    return Err(corruption(key, "applied-index key has the wrong length"));
                }
                namespaces.insert(be_u64(key, 1));
                Ok(true)
            })?;
        // Jump from namespace to namespace instead of visiting every key.
        let mut lo = vec![TAG_KV_ENTRY];
        loop {
            let mut found = None;
            self.backend
                .scan(&lo, &[TAG_KV_ENTRY + 1], false, |key, _| {
                    if key.len() < 9 {
                        return Err(corruption(key, "kv key is shorter than its namespace"));
                    }
                    found = Some(be_u64(key, 1));
                    Ok(false)
                })?;
            let Some(ns) = found else { break };
            namespaces.insert(ns);
            lo = end_of(&kv_prefix(ns));
        }
        Ok(namespaces.into_iter().collect())
    }

    // ---- MapReduce reads ----

    pub(crate) fn mr_get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        let _groups = self.read()?;
        let full = mr_key(key);
        match self.backend.get(&full)? {
            None => Ok(None),
            Some(value) => {
                let range = decode_plain(&full, value.as_ref())?;
                Ok(Some(B::into_bytes(value).slice(range)))
            }
        }
    }

    pub(crate) fn mr_scan_prefix(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
        let _groups = self.read()?;
        let lo = mr_key(prefix);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.backend.scan(&lo, &end_of(&lo), false, |key, value| {
            let range = decode_plain(key, value.as_ref())?;
            out.push((
                Bytes::copy_from_slice(&key[1..]),
                B::into_bytes(value).slice(range),
            ));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    pub(crate) fn mr_record_count(&self) -> Result<u64, StorageError> {
        let _groups = self.read()?;
        let mut count = 0u64;
        self.backend.scan(&[TAG_MR], &[TAG_MR + 1], false, |_, _| {
            count += 1;
            Ok(true)
        })?;
        Ok(count)
    }
}

/// Reads and checks the term of a stored entry.
fn read_entry_term<B: Backend>(
    backend: &B,
    group: GroupId,
    index: u64,
) -> Result<u64, StorageError> {
    let key = entry_key(group, index);
    let value = backend
        .get(&key)?
        .ok_or_else(|| corruption(&key, "entry missing inside the log"))?;
    Ok(decode_entry(&key, value.as_ref())?.0)
}

/// Rebuilds the group cache from the records, checking that each log starts
/// right after its base.
fn load_groups<B: Backend>(backend: &B) -> Result<BTreeMap<GroupId, GroupState>, StorageError> {
    let mut groups: BTreeMap<GroupId, GroupState> = BTreeMap::new();
    for tag in [TAG_HARD_STATE, TAG_LOG_BASE, TAG_SNAPSHOT_META] {
        backend.scan(&[tag], &[tag + 1], false, |key, value| {
            if key.len() != 9 {
                return Err(corruption(key, "per-group key has the wrong length"));
            }
            let state = groups.entry(be_u64(key, 1)).or_default();
            let value = value.as_ref();
            match tag {
                TAG_HARD_STATE => state.hard_state = decode_hard_state(key, value)?,
                TAG_LOG_BASE => {
                    let [index, term] = decode_u64s::<2>(key, value)?;
                    state.base_index = index;
                    state.base_term = term;
                }
                _ => {
                    let [index, term, bytes] = decode_u64s::<3>(key, value)?;
                    state.snapshot = SnapshotMeta {
                        last_included_index: index,
                        last_included_term: term,
                    };
                    state.snapshot_bytes = bytes;
                }
            }
            Ok(true)
        })?;
    }
    for state in groups.values_mut() {
        state.last_index = state.base_index;
        state.last_term = state.base_term;
        state.purged_through = state.base_index;
    }
    // Each group's first and last entry, jumping from group to group.
    let mut lo = vec![TAG_ENTRY];
    loop {
        let mut first_key = None;
        backend.scan(&lo, &[TAG_ENTRY + 1], false, |key, _| {
            first_key = Some(key.to_vec());
            Ok(false)
        })?;
        let Some(first_key) = first_key else { break };
        if first_key.len() != 17 {
            return Err(corruption(&first_key, "log entry key has the wrong length"));
        }
        let group = be_u64(&first_key, 1);
        let first_index = be_u64(&first_key, 9);
        let prefix = group_key(TAG_ENTRY, group);
        let group_end = end_of(&prefix);
        let mut last = None;
        backend.scan(&prefix, &group_end, true, |key, value| {
            last = Some((key.to_vec(), value));
            Ok(false)
        })?;
        let (last_key, last_value) =
            last.expect("invariant: the scan found this group's first entry");
        if last_key.len() != 17 {
            return Err(corruption(&last_key, "log entry key has the wrong length"));
        }
        let (last_term, _, _) = decode_entry(&last_key, last_value.as_ref())?;
        let state = groups.entry(group).or_default();
        // Entries at or below the base are stale ones still to be purged.
        if first_index > state.base_index + 1 {
            return Err(StorageError::Corruption {
                record: format!("raft group {group} log"),
                detail: format!(
                    "the first entry is {first_index} but the log base is {}",
                    state.base_index
                ),
            });
        }
        state.purged_through = first_index - 1;
        let last_index = be_u64(&last_key, 9);
        if last_index > state.base_index {
            state.last_index = last_index;
            state.last_term = last_term;
        }
        lo = group_end;
    }
    for (group, state) in &groups {
        if state.snapshot.last_included_index > state.base_index {
            return Err(corruption(
                &group_key(TAG_SNAPSHOT_META, *group),
                format!(
                    "snapshot index {} is above the log base {}",
                    state.snapshot.last_included_index, state.base_index
                ),
            ));
        }
    }
    Ok(groups)
}

/// Turns the writes of one batch into backend puts and deletes, tracking the
/// groups it changes. Nothing reaches the backend until the whole batch is
/// planned, so an invalid write leaves the store unchanged.
struct Planner<'a, B: Backend> {
    backend: &'a B,
    limits: &'a Limits,
    committed: &'a BTreeMap<GroupId, GroupState>,
    /// States of the groups this batch changes, as of the op being planned.
    working: Vec<(GroupId, GroupState)>,
    batch: B::Batch,
    /// Reused encoding buffer: one allocation for the whole batch.
    scratch: Vec<u8>,
    batch_bytes: u64,
}

fn check_limit(what: &'static str, bytes: usize, max: u64) -> Result<(), StorageError> {
    if bytes as u64 > max {
        return Err(StorageError::LimitExceeded {
            what,
            bytes: bytes as u64,
            max,
        });
    }
    Ok(())
}

impl<B: Backend> Planner<'_, B> {
    fn state(&self, group: GroupId) -> GroupState {
        match self.working.iter().find(|(g, _)| *g == group) {
            Some((_, state)) => *state,
            None => self.committed.get(&group).copied().unwrap_or_default(),
        }
    }

    /// Records the new state of a group whose records this batch writes.
    fn set_state(&mut self, group: GroupId, state: GroupState) {
        assert!(
            state.base_index <= state.last_index,
            "invariant: log base above last index"
        );
        assert!(
            state.snapshot.last_included_index <= state.base_index,
            "invariant: snapshot above log base"
        );
        assert!(
            state.purged_through <= state.base_index,
            "invariant: purged past the log base"
        );
        match self.working.iter_mut().find(|(g, _)| *g == group) {
            Some((_, slot)) => *slot = state,
            None => self.working.push((group, state)),
        }
    }

    /// Adds `key` → the encoded value in `scratch` to the batch.
    fn put_scratch(&mut self, key: &[u8]) -> Result<(), StorageError> {
        self.batch_bytes += (key.len() + self.scratch.len()) as u64;
        if self.batch_bytes > self.limits.batch_bytes_max {
            return Err(StorageError::LimitExceeded {
                what: "batch_bytes_max",
                bytes: self.batch_bytes,
                max: self.limits.batch_bytes_max,
            });
        }
        self.batch.put(key, &self.scratch);
        Ok(())
    }

    fn delete_entries(&mut self, group: GroupId, from: u64, through: u64) {
        for index in from..=through {
            self.batch.delete(&entry_key(group, index));
        }
    }

    /// Deletes stale entries below the log bases (oldest first), at most
    /// `max(PURGE_ENTRIES_PER_COMMIT_MIN, 2 × entries appended by this batch)`.
    fn purge(&mut self, ops: &[Op]) {
        let stale = |state: &GroupState| state.purged_through < state.base_index;
        if !self.committed.values().any(stale) && !self.working.iter().any(|(_, s)| stale(s)) {
            return;
        }
        let appended: u64 = ops
            .iter()
            .map(|op| match op {
                Op::Append { entries, .. } => entries.len() as u64,
                _ => 0,
            })
            .sum();
        let mut budget = PURGE_ENTRIES_PER_COMMIT_MIN.max(2 * appended);
        let groups: BTreeSet<GroupId> = self
            .committed
            .keys()
            .copied()
            .chain(self.working.iter().map(|(group, _)| *group))
            .collect();
        for group in groups {
            if budget == 0 {
                break;
            }
            let mut state = self.state(group);
            if state.purged_through >= state.base_index {
                continue;
            }
            let through = state.base_index.min(state.purged_through + budget);
            self.delete_entries(group, state.purged_through + 1, through);
            budget -= through - state.purged_through;
            state.purged_through = through;
            self.set_state(group, state);
        }
    }

    /// Term of `index`, which lies in `base_index..=last_index` of `state` (the
    /// state as of this op), taking earlier appends of this batch into account.
    fn term_at(
        &self,
        earlier: &[Op],
        group: GroupId,
        state: &GroupState,
        index: u64,
    ) -> Result<u64, StorageError> {
        assert!(
            index >= state.base_index,
            "invariant: term_at below the log base"
        );
        assert!(
            index <= state.last_index,
            "invariant: term_at beyond the last index"
        );
        if index == state.base_index {
            return Ok(state.base_term);
        }
        if index == state.last_index {
            return Ok(state.last_term);
        }
        // The latest append of this batch that starts at or below `index`
        // decides its term: it wrote the entry, or truncated it (then `index`
        // would be beyond the last index, which the caller excluded).
        for op in earlier.iter().rev() {
            if let Op::Append { group: g, entries } = op {
                let Some(first) = entries.first() else {
                    continue;
                };
                if *g == group && first.index <= index {
                    let entry = entries
                        .get((index - first.index) as usize)
                        .expect("invariant: a truncated index is beyond the last index");
                    return Ok(entry.term);
                }
            }
        }
        read_entry_term(self.backend, group, index)
    }

    fn plan(&mut self, earlier: &[Op], op: &Op) -> Result<(), StorageError> {
        match op {
            Op::SetHardState { group, hard_state } => {
                let key = group_key(TAG_HARD_STATE, *group);
                encode_hard_state(&key, hard_state, &mut self.scratch);
                self.put_scratch(&key)?;
                let mut state = self.state(*group);
                state.hard_state = *hard_state;
                self.set_state(*group, state);
            }
            Op::Append { group, entries } => self.append(*group, entries)?,
            Op::InstallSnapshot { group, meta, data } => {
                self.install_snapshot(earlier, *group, meta, data)?
            }
            Op::Compact {
                group,
                through_index,
            } => self.compact(earlier, *group, *through_index)?,
            Op::KvPut { ns, key, value } => self.kv_put(*ns, key, value)?,
            Op::KvDelete { ns, key } => self.batch.delete(&kv_key(*ns, key)),
            Op::SetAppliedIndex { ns, index } => self.set_applied_index(*ns, *index)?,
            Op::KvReplaceAll {
                ns,
                entries,
                applied_index,
            } => {
                self.delete_namespace(earlier, *ns)?;
                for (key, value) in entries {
                    self.kv_put(*ns, key, value)?;
                }
                self.set_applied_index(*ns, *applied_index)?;
            }
            Op::MrPut { key, value } => {
                check_limit("key_bytes_max", key.len(), self.limits.key_bytes_max)?;
                check_limit("value_bytes_max", value.len(), self.limits.value_bytes_max)?;
                let full = mr_key(key);
                encode_plain(&full, value, &mut self.scratch);
                self.put_scratch(&full)?;
            }
            Op::MrDelete { key } => self.batch.delete(&mr_key(key)),
        }
        Ok(())
    }

    fn append(&mut self, group: GroupId, entries: &[Entry]) -> Result<(), StorageError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let bad = |detail: String| StorageError::BadEntries { group, detail };
        if first.index == 0 {
            return Err(bad("the first entry has index 0".to_owned()));
        }
        for (offset, entry) in entries.iter().enumerate() {
            let expected = first.index.checked_add(offset as u64);
            if Some(entry.index) != expected {
                return Err(bad(format!(
                    "entry {offset} has index {}, expected {}",
                    entry.index,
                    first.index.saturating_add(offset as u64)
                )));
            }
            if entry.term == 0 {
                return Err(bad(format!("entry {} has term 0", entry.index)));
            }
            check_limit(
                "entry_bytes_max",
                entry.data.len(),
                self.limits.entry_bytes_max,
            )?;
        }
        let mut state = self.state(group);
        if first.index <= state.base_index {
            return Err(StorageError::Compacted {
                group,
                index: first.index,
                first_index: state.base_index + 1,
            });
        }
        if first.index > state.last_index + 1 {
            return Err(StorageError::LogGap {
                group,
                index: first.index,
                last_index: state.last_index,
            });
        }
        // The conflicting suffix (empty in the common case first = last + 1).
        self.delete_entries(group, first.index, state.last_index);
        for entry in entries {
            let key = entry_key(group, entry.index);
            encode_entry(&key, entry.term, entry.kind, &entry.data, &mut self.scratch);
            self.put_scratch(&key)?;
        }
        state.last_index = last.index;
        state.last_term = last.term;
        self.set_state(group, state);
        Ok(())
    }

    fn install_snapshot(
        &mut self,
        earlier: &[Op],
        group: GroupId,
        meta: &SnapshotMeta,
        data: &Bytes,
    ) -> Result<(), StorageError> {
        let index = meta.last_included_index;
        let term = meta.last_included_term;
        if index == 0 || term == 0 {
            return Err(StorageError::InvalidArgument(format!(
                "raft group {group}: a snapshot must include an index >= 1 with a term >= 1 (got index {index} term {term})"
            )));
        }
        check_limit(
            "snapshot_bytes_max",
            data.len(),
            self.limits.snapshot_bytes_max,
        )?;
        let mut state = self.state(group);
        if index < state.base_index {
            return Err(StorageError::StaleSnapshot {
                group,
                index,
                compacted_index: state.base_index,
            });
        }
        let keep_suffix =
            index <= state.last_index && self.term_at(earlier, group, &state, index)? == term;
        // Entries up to `index` become stale (purged over the following
        // commits); a discarded suffix above it goes now.
        if !keep_suffix {
            if state.last_index > index {
                self.delete_entries(group, index + 1, state.last_index);
            }
            state.last_index = index;
            state.last_term = term;
        }
        state.base_index = index;
        state.base_term = term;
        state.snapshot = *meta;
        state.snapshot_bytes = data.len() as u64;

        let key = group_key(TAG_LOG_BASE, group);
        encode_u64s(&key, &[index, term], &mut self.scratch);
        self.put_scratch(&key)?;
        let key = group_key(TAG_SNAPSHOT_META, group);
        encode_u64s(&key, &[index, term, data.len() as u64], &mut self.scratch);
        self.put_scratch(&key)?;
        let key = group_key(TAG_SNAPSHOT_DATA, group);
        encode_snapshot_data(&key, meta, data, &mut self.scratch);
        self.put_scratch(&key)?;
        self.set_state(group, state);
        Ok(())
    }

    fn compact(
        &mut self,
        earlier: &[Op],
        group: GroupId,
        through_index: u64,
    ) -> Result<(), StorageError> {
        let mut state = self.state(group);
        if through_index <= state.base_index {
            return Ok(());
        }
        if through_index > state.last_index {
            return Err(StorageError::Unavailable {
                group,
                index: through_index,
                last_index: state.last_index,
            });
        }
        let term = self.term_at(earlier, group, &state, through_index)?;
        // The covered entries become stale; `purge` deletes them over the
        // following commits.
        state.base_index = through_index;
        state.base_term = term;
        let key = group_key(TAG_LOG_BASE, group);
        encode_u64s(&key, &[through_index, term], &mut self.scratch);
        self.put_scratch(&key)?;
        self.set_state(group, state);
        Ok(())
    }

    fn kv_put(
        &mut self,
        ns: StateMachineId,
        key: &[u8],
        value: &VersionedValue,
    ) -> Result<(), StorageError> {
        check_limit("key_bytes_max", key.len(), self.limits.key_bytes_max)?;
        check_limit(
            "value_bytes_max",
            value.value.len(),
            self.limits.value_bytes_max,
        )?;
        let full = kv_key(ns, key);
        encode_versioned(&full, value.version, &value.value, &mut self.scratch);
        self.put_scratch(&full)
    }

    fn set_applied_index(&mut self, ns: StateMachineId, index: u64) -> Result<(), StorageError> {
        let key = applied_key(ns);
        encode_u64s(&key, &[index], &mut self.scratch);
        self.put_scratch(&key)
    }

    /// Deletes every key of the namespace: the stored ones and the ones put
    /// earlier in this batch.
    fn delete_namespace(&mut self, earlier: &[Op], ns: StateMachineId) -> Result<(), StorageError> {
        let prefix = kv_prefix(ns);
        let batch = &mut self.batch;
        self.backend
            .scan(&prefix, &end_of(&prefix), false, |key, _| {
                batch.delete(key);
                Ok(true)
            })?;
        for op in earlier {
            match op {
                Op::KvPut { ns: n, key, .. } if *n == ns => self.batch.delete(&kv_key(ns, key)),
                Op::KvReplaceAll { ns: n, entries, .. } if *n == ns => {
                    for (key, _) in entries {
                        self.batch.delete(&kv_key(ns, key));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

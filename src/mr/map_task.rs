//! Executing a map task: read the split, map, combine, partition, write the intermediate file.

use std::fs::File;
use std::hash::BuildHasher;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use hashbrown::HashTable;
use tempfile::NamedTempFile;

use super::app::{App, AppError, CombineOp, Combiner, Emitter};
use super::config::ExecConfig;
use super::error::MrError;
use super::format::IntermediateWriter;
use super::hash::{FastBuildHasher, partition};
use super::table::{MapTask, REDUCE_TASKS_MAX, TaskId, TaskStats};

/// Name of the intermediate file that `attempt` of map task `map_task` writes (one file for
/// all reduce tasks): `mr-<m>-a<attempt>`. Each attempt has its own name, so a slow stale
/// attempt can never replace the file of the attempt the coordinator accepted.
pub fn intermediate_file_name(map_task: u32, attempt: u32) -> String {
    format!("mr-{map_task}-a{attempt}")
}

/// Name of the output of reduce task `reduce_task`: `mr-out-<r>`.
pub fn output_file_name(reduce_task: u32) -> String {
    format!("mr-out-{reduce_task}")
}

/// Prefix of temporary files; they are renamed into place when complete.
pub(crate) const TEMP_PREFIX: &str = ".mr-tmp-";

/// Creates a temporary file in `dir` that is deleted unless persisted.
pub(crate) fn temp_file_in(dir: &Path) -> Result<NamedTempFile, MrError> {
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| MrError::io("create a temporary file in", dir, e))
}

/// Flushes, optionally fsyncs, and atomically renames a finished temporary file to `target`.
pub(crate) fn persist(
    writer: BufWriter<NamedTempFile>,
    target: &Path,
    sync: bool,
) -> Result<(), MrError> {
    let temp = writer
        .into_inner()
        .map_err(|e| MrError::io("flush", target, e.into_error()))?;
    if sync {
        temp.as_file()
            .sync_all()
            .map_err(|e| MrError::io("fsync", target, e))?;
    }
    temp.persist(target)
        .map_err(|e| MrError::io("rename into place", target, e.error))?;
    Ok(())
}

/// Makes the renames into `dir` durable (fsync of the directory). Only on Unix, where a
/// directory can be opened and synced; elsewhere renames are as durable as the platform makes
/// them.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), MrError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| MrError::io("fsync directory", dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Turns a caught panic payload into a message.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        format!("panicked: {message}")
    } else if let Some(message) = payload.downcast_ref::<String>() {
        format!("panicked: {message}")
    } else {
        "panicked".to_string()
    }
}

/// Keys up to this length are stored inside the combine-table entry (no allocation, no pointer
/// to follow on lookup); nearly every word is this short.
const INLINE_KEY_BYTES: usize = 22;

/// A combine-table key: inline when short, boxed otherwise.
enum SmallKey {
    Inline {
        len: u8,
        bytes: [u8; INLINE_KEY_BYTES],
    },
    Heap(Box<[u8]>),
}

impl SmallKey {
    fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE_KEY_BYTES {
            let mut bytes = [0u8; INLINE_KEY_BYTES];
            bytes[..key.len()].copy_from_slice(key);
            SmallKey::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            SmallKey::Heap(key.into())
        }
    }

    #[inline]
    fn as_slice(&self) -> &[u8] {
        match self {
            SmallKey::Inline { len, bytes } => &bytes[..*len as usize],
            SmallKey::Heap(bytes) => bytes,
        }
    }

    /// Heap bytes owned beyond the entry itself, with allocation overhead.
    fn heap_bytes(&self) -> usize {
        match self {
            SmallKey::Inline { .. } => 0,
            SmallKey::Heap(bytes) => bytes.len() + ALLOCATION_OVERHEAD_BYTES,
        }
    }
}

/// Equality of short byte strings with a few word loads instead of a `memcmp` call (the
/// combine table compares one key per emitted pair).
#[inline]
fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word4 = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4"));
    let word8 = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8"));
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=8 => word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4),
        9..=16 => word8(a, 0) == word8(b, 0) && word8(a, n - 8) == word8(b, n - 8),
        _ => a == b,
    }
}

/// Accumulated values up to this length are stored inside the entry (a count, a small sum).
const INLINE_VALUE_BYTES: usize = 8;

/// A combine-table value: inline when short, on the heap otherwise.
enum SmallValue {
    Inline {
        len: u8,
        bytes: [u8; INLINE_VALUE_BYTES],
    },
    Heap(Vec<u8>),
}

impl SmallValue {
    fn new(value: &[u8]) -> Self {
        if value.len() <= INLINE_VALUE_BYTES {
            let mut bytes = [0u8; INLINE_VALUE_BYTES];
            bytes[..value.len()].copy_from_slice(value);
            SmallValue::Inline {
                len: value.len() as u8,
                bytes,
            }
        } else {
            SmallValue::Heap(value.to_vec())
        }
    }

    #[inline]
    fn as_slice(&self) -> &[u8] {
        match self {
            SmallValue::Inline { len, bytes } => &bytes[..*len as usize],
            SmallValue::Heap(bytes) => bytes,
        }
    }

    /// Heap bytes owned beyond the entry itself, with allocation overhead.
    fn heap_bytes(&self) -> usize {
        match self {
            SmallValue::Inline { .. } => 0,
            SmallValue::Heap(bytes) => bytes.capacity() + ALLOCATION_OVERHEAD_BYTES,
        }
    }
}

/// One key of the combine table with its accumulated value. The hash is not stored: the
/// table is probed by the key bytes held inline, and a smaller entry (32 bytes for a native
/// sum, 48 with a [`SmallValue`]) means fewer cache misses on the per-word lookup; growing the
/// table rehashes keys, which the fast hasher makes cheap.
struct CombineEntry<V> {
    key: SmallKey,
    value: V,
}

/// Estimated malloc overhead of one allocation.
const ALLOCATION_OVERHEAD_BYTES: usize = 16;
const _: () = assert!(
    std::mem::size_of::<CombineEntry<SmallValue>>() <= 48,
    "combine entries stay small"
);
const _: () = assert!(
    std::mem::size_of::<CombineEntry<u64>>() <= 32,
    "native sum entries stay small"
);

/// How the combine table folds the values of one key: [`ByCombiner`] calls the application's
/// combiner, [`SumU64`] runs [`CombineOp::SumU64Le`] natively. The map task is compiled once
/// per implementation, so a native fold is inlined into the per-pair path.
trait Fold {
    /// The accumulated value an entry holds.
    type Value;
    /// The accumulator of a key's first value.
    fn start(&mut self, value: &[u8]) -> Result<Self::Value, AppError>;
    /// Folds `value` into `accumulator`, both values of `key`.
    fn fold(
        &mut self,
        key: &[u8],
        accumulator: &mut Self::Value,
        value: &[u8],
    ) -> Result<(), AppError>;
    /// Calls `f` with the encoded accumulated value.
    fn with_bytes<T>(accumulator: &Self::Value, f: impl FnOnce(&[u8]) -> T) -> T;
    /// Length of the encoded accumulated value.
    fn encoded_len(accumulator: &Self::Value) -> usize;
    /// Heap bytes the accumulated value owns beyond the entry, with allocation overhead.
    fn heap_bytes(accumulator: &Self::Value) -> usize;
}

/// Folds through the application's [`Combiner::combine`].
struct ByCombiner<'a> {
    combiner: &'a dyn Combiner,
    /// The accumulator handed to the combiner for an inline value.
    scratch: Vec<u8>,
}

impl Fold for ByCombiner<'_> {
    type Value = SmallValue;

    fn start(&mut self, value: &[u8]) -> Result<SmallValue, AppError> {
        Ok(SmallValue::new(value))
    }

    fn fold(
        &mut self,
        key: &[u8],
        accumulator: &mut SmallValue,
        value: &[u8],
    ) -> Result<(), AppError> {
        match accumulator {
            SmallValue::Heap(bytes) => self.combiner.combine(key, bytes, value),
            SmallValue::Inline { len, bytes } => {
                let scratch = &mut self.scratch;
                scratch.clear();
                scratch.extend_from_slice(&bytes[..*len as usize]);
                let result = self.combiner.combine(key, scratch, value);
                if scratch.len() <= INLINE_VALUE_BYTES {
                    bytes[..scratch.len()].copy_from_slice(scratch);
                    *len = scratch.len() as u8;
                } else {
                    *accumulator = SmallValue::Heap(scratch.clone());
                }
                result
            }
        }
    }

    fn with_bytes<T>(accumulator: &SmallValue, f: impl FnOnce(&[u8]) -> T) -> T {
        f(accumulator.as_slice())
    }

    fn encoded_len(accumulator: &SmallValue) -> usize {
        accumulator.as_slice().len()
    }

    fn heap_bytes(accumulator: &SmallValue) -> usize {
        accumulator.heap_bytes()
    }
}

/// [`CombineOp::SumU64Le`], natively: the accumulator is the sum itself.
struct SumU64;

fn decode_u64(value: &[u8]) -> Result<u64, AppError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        AppError::new(format!(
            "SumU64Le: a value must be 8 bytes, got {} bytes",
            value.len()
        ))
    })?;
    Ok(u64::from_le_bytes(bytes))
}

impl Fold for SumU64 {
    type Value = u64;

    #[inline]
    fn start(&mut self, value: &[u8]) -> Result<u64, AppError> {
        decode_u64(value)
    }

    #[inline]
    fn fold(&mut self, _key: &[u8], accumulator: &mut u64, value: &[u8]) -> Result<(), AppError> {
        *accumulator = accumulator
            .checked_add(decode_u64(value)?)
            .ok_or_else(|| AppError::new("SumU64Le: the sum overflows u64"))?;
        Ok(())
    }

    #[inline]
    fn with_bytes<T>(accumulator: &u64, f: impl FnOnce(&[u8]) -> T) -> T {
        f(&accumulator.to_le_bytes())
    }

    #[inline]
    fn encoded_len(_: &u64) -> usize {
        8
    }

    #[inline]
    fn heap_bytes(_: &u64) -> usize {
        0
    }
}

/// The map-side combine table: one accumulated value per key, flushed when over budget.
struct CombineTable<F: Fold> {
    fold: F,
    entries: HashTable<CombineEntry<F::Value>>,
    hasher: FastBuildHasher,
    /// Heap bytes of boxed keys and heap values, including allocation overhead.
    heap_bytes: usize,
    budget_bytes: usize,
}

impl<F: Fold> CombineTable<F> {
    /// Bytes per slot of the table itself (the entry plus hashbrown's control byte).
    const SLOT_BYTES: usize = std::mem::size_of::<CombineEntry<F::Value>>() + 1;

    fn new(fold: F, budget_bytes: usize) -> Self {
        CombineTable {
            fold,
            entries: HashTable::with_capacity((budget_bytes / 256).min(1 << 14)),
            hasher: FastBuildHasher::default(),
            heap_bytes: 0,
            budget_bytes,
        }
    }

    /// Memory of a table that holds `capacity` entries: hashbrown keeps at most 7/8 of its
    /// buckets full and has a power-of-two number of them.
    fn table_bytes(&self, capacity: usize) -> usize {
        let buckets = capacity.saturating_mul(8).div_ceil(7).next_power_of_two();
        buckets.saturating_mul(Self::SLOT_BYTES)
    }

    fn over_budget(&self) -> bool {
        self.heap_bytes + self.table_bytes(self.entries.capacity()) > self.budget_bytes
    }

    /// Whether inserting a new entry owning `bytes` of heap would take the table over budget
    /// (counting the table's growth when it is full).
    fn insert_would_overflow(&self, bytes: usize) -> bool {
        let capacity = self.entries.capacity();
        let capacity_after = if self.entries.len() < capacity {
            capacity
        } else {
            (capacity * 2).max(4)
        };
        self.heap_bytes + bytes + self.table_bytes(capacity_after) > self.budget_bytes
    }
}

/// Write buffer of the intermediate file; blocks larger than this are written directly.
const FILE_WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Everything map's emitter writes to.
struct MapOutput<'a, F: Fold> {
    app_name: &'a str,
    task: TaskId,
    writer: IntermediateWriter<BufWriter<NamedTempFile>>,
    reduce_tasks: u32,
    record_bytes_max: usize,
    combine: Option<CombineTable<F>>,
    /// The first error; once set, further pairs are dropped and the task fails.
    error: Option<MrError>,
    emitted: u64,
    spills: u64,
}

impl<F: Fold> MapOutput<'_, F> {
    fn combine_error(&self, e: AppError) -> MrError {
        MrError::App {
            app: self.app_name.to_string(),
            task: self.task,
            message: format!("combine: {e}"),
        }
    }

    /// Takes one pair from map: folds it into its key's entry, or adds an entry, or (without a
    /// combiner) writes it out.
    #[inline]
    fn emit(&mut self, key: &[u8], value: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.emitted += 1;
        if key.len() + value.len() > self.record_bytes_max {
            self.error = Some(MrError::RecordTooLarge {
                key_bytes: key.len(),
                value_bytes: value.len(),
                max: self.record_bytes_max,
            });
            return;
        }
        let Some(table) = self.combine.as_mut() else {
            let r = partition(key, self.reduce_tasks);
            if let Err(e) = self.writer.write(r, key, value) {
                self.error = Some(e);
            }
            return;
        };
        let hash = table.hasher.hash_one(key);
        let Some(entry) = table
            .entries
            .find_mut(hash, |entry| bytes_equal(entry.key.as_slice(), key))
        else {
            self.insert(hash, key, value);
            return;
        };
        let before = F::heap_bytes(&entry.value);
        if let Err(e) = table.fold.fold(key, &mut entry.value, value) {
            self.error = Some(self.combine_error(e));
            return;
        }
        let combined = F::encoded_len(&entry.value);
        if key.len() + combined > self.record_bytes_max {
            self.error = Some(MrError::RecordTooLarge {
                key_bytes: key.len(),
                value_bytes: combined,
                max: self.record_bytes_max,
            });
            return;
        }
        let after = F::heap_bytes(&entry.value);
        if after != before {
            table.heap_bytes = table.heap_bytes - before + after;
            if table.over_budget() && table.entries.len() > 1 {
                self.spills += 1;
                if let Err(e) = self.flush() {
                    self.error = Some(e);
                }
            }
        }
    }

    /// Adds an entry for a key not in the table, flushing the table first if the entry would
    /// take it over budget. Out of line: it runs once per distinct key per flush.
    #[inline(never)]
    fn insert(&mut self, hash: u64, key: &[u8], value: &[u8]) {
        let table = self.combine.as_mut().expect("combine table present");
        let value = match table.fold.start(value) {
            Ok(value) => value,
            Err(e) => {
                self.error = Some(self.combine_error(e));
                return;
            }
        };
        let key = SmallKey::new(key);
        let bytes = key.heap_bytes() + F::heap_bytes(&value);
        if table.insert_would_overflow(bytes) && !table.entries.is_empty() {
            self.spills += 1;
            if let Err(e) = self.flush() {
                self.error = Some(e);
                return;
            }
        }
        let table = self.combine.as_mut().expect("combine table present");
        let hasher = FastBuildHasher::default();
        table
            .entries
            .insert_unique(hash, CombineEntry { key, value }, |entry| {
                hasher.hash_one(entry.key.as_slice())
            });
        table.heap_bytes += bytes;
    }

    /// Writes every combined pair to its reduce task's buffer and empties the table (keeping
    /// its slots).
    fn flush(&mut self) -> Result<(), MrError> {
        let Some(table) = self.combine.as_mut() else {
            return Ok(());
        };
        for entry in table.entries.drain() {
            let key = entry.key.as_slice();
            let r = partition(key, self.reduce_tasks);
            F::with_bytes(&entry.value, |value| self.writer.write(r, key, value))?;
        }
        table.heap_bytes = 0;
        Ok(())
    }
}

/// Runs map task `task` of `app`: reads its split in chunks of whole lines, calls map on each,
/// combines (if the application has a combiner and `config.use_combiner`; natively if the
/// combiner declares a [`CombineOp`]), partitions pairs by [`partition`] and writes one
/// intermediate file, `mr-<m>-a<attempt>` in `config.intermediate_dir`, holding the records of
/// every reduce task (see `format.rs`). The file is written under a temporary name and renamed
/// into place (after an fsync with `config.sync_files`) only when complete, so a failure, panic
/// or crash never leaves a partial intermediate file visible (a crash after the rename can
/// leave a complete one, which no reduce reads unless the attempt was accepted).
pub fn run_map(app: &dyn App, task: &MapTask, config: &ExecConfig) -> Result<TaskStats, MrError> {
    config.validate()?;
    if task.reduce_tasks == 0 || task.reduce_tasks > REDUCE_TASKS_MAX {
        return Err(MrError::Config(format!(
            "map task {} has reduce_tasks = {}, outside 1..={REDUCE_TASKS_MAX}",
            task.task, task.reduce_tasks
        )));
    }
    if task.split.start > task.split.end {
        return Err(MrError::Config(format!(
            "map task {} has a split that starts after it ends",
            task.task
        )));
    }
    let budget = config.combine_buffer_bytes_max;
    match app.combiner().filter(|_| config.use_combiner) {
        Some(combiner) => match combiner.op() {
            Some(CombineOp::SumU64Le) => {
                run_map_with(app, task, config, Some(CombineTable::new(SumU64, budget)))
            }
            None => {
                let fold = ByCombiner {
                    combiner,
                    scratch: Vec::new(),
                };
                run_map_with(app, task, config, Some(CombineTable::new(fold, budget)))
            }
        },
        None => run_map_with::<ByCombiner>(app, task, config, None),
    }
}

fn run_map_with<F: Fold>(
    app: &dyn App,
    task: &MapTask,
    config: &ExecConfig,
    combine: Option<CombineTable<F>>,
) -> Result<TaskStats, MrError> {
    let dir = &config.intermediate_dir;
    std::fs::create_dir_all(dir).map_err(|e| MrError::io("create directory", dir, e))?;
    let target = dir.join(intermediate_file_name(task.task, task.attempt));
    let block_bytes = (config.map_write_buffer_bytes / task.reduce_tasks as usize).max(4096);
    let writer = IntermediateWriter::new(
        BufWriter::with_capacity(FILE_WRITE_BUFFER_BYTES, temp_file_in(dir)?),
        &target,
        task.reduce_tasks,
        block_bytes,
    );
    let mut output = MapOutput {
        app_name: app.name(),
        task: TaskId::Map(task.task),
        writer,
        reduce_tasks: task.reduce_tasks,
        record_bytes_max: config.record_bytes_max,
        combine,
        error: None,
        emitted: 0,
        spills: 0,
    };

    read_split(task, config, |chunk| {
        let mut sink = |key: &[u8], value: &[u8]| output.emit(key, value);
        let mut emitter = Emitter::new(&mut sink);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            app.map(&task.split.path, chunk, &mut emitter)
        }));
        let app_error = |message: String| MrError::App {
            app: app.name().to_string(),
            task: TaskId::Map(task.task),
            message,
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(app_error(format!("map: {e}"))),
            Err(payload) => return Err(app_error(format!("map {}", panic_message(payload)))),
        }
        match output.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;
    output.flush()?;

    let output_records = output.writer.records();
    let (buffered, output_bytes) = output.writer.finish()?;
    let stats = TaskStats {
        input_bytes: task.split.len(),
        input_records: output.emitted,
        output_records,
        output_bytes,
        spills: output.spills,
    };
    persist(buffered, &target, config.sync_files)?;
    if config.sync_files {
        sync_dir(dir)?;
    }
    tracing::debug!(
        task = task.task,
        attempt = task.attempt,
        ?stats,
        "map task done"
    );
    Ok(stats)
}

/// Reads the split of `task` and calls `map_chunk` on successive runs of whole lines of about
/// `map_chunk_bytes` (exactly once, possibly with no bytes, for an empty split).
fn read_split(
    task: &MapTask,
    config: &ExecConfig,
    mut map_chunk: impl FnMut(&[u8]) -> Result<(), MrError>,
) -> Result<(), MrError> {
    let path = Path::new(&task.split.path);
    let mut file = File::open(path).map_err(|e| MrError::io("open input", path, e))?;
    file.seek(SeekFrom::Start(task.split.start))
        .map_err(|e| MrError::io("seek in input", path, e))?;
    let chunk_bytes = config.map_chunk_bytes;
    let line_max = config.map_line_bytes_max;
    let mut remaining = task.split.len();
    let mut buf: Vec<u8> = Vec::with_capacity(chunk_bytes.min(remaining as usize));
    let mut buf_offset = task.split.start;
    let mut calls = 0u64;
    loop {
        let target = if buf.len() < chunk_bytes {
            chunk_bytes
        } else {
            (buf.len() * 2).min(line_max)
        };
        assert!(target > buf.len(), "the read target must grow the buffer");
        let want = ((target - buf.len()) as u64).min(remaining);
        if want > 0 {
            buf.reserve(want as usize);
            let read = (&mut file)
                .take(want)
                .read_to_end(&mut buf)
                .map_err(|e| MrError::io("read input", path, e))?;
            if (read as u64) < want {
                let e = std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than when the job was planned",
                );
                return Err(MrError::io("read input", path, e));
            }
            remaining -= want;
        }
        if remaining == 0 {
            if !buf.is_empty() || calls == 0 {
                map_chunk(&buf)?;
            }
            return Ok(());
        }
        match memchr::memrchr(b'\n', &buf) {
            Some(last) => {
                map_chunk(&buf[..=last])?;
                calls += 1;
                buf.drain(..=last);
                buf_offset += last as u64 + 1;
            }
            None if buf.len() >= line_max => {
                return Err(MrError::LineTooLong {
                    path: path.to_path_buf(),
                    offset: buf_offset,
                    max: line_max,
                });
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Proves the word-load equality agrees with slice equality at every length.
        #[test]
        fn bytes_equal_matches_slice_equality(
            a in proptest::collection::vec(any::<u8>(), 0..40),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            other in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            // Same length, at most one byte changed: the cases a word-load compare could miss.
            let mut b = a.clone();
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] = byte;
            }
            prop_assert_eq!(bytes_equal(&a, &b), a == b);
            prop_assert_eq!(bytes_equal(&a, &other), a == other);
        }

        // Proves small keys and values round-trip through the inline and heap representations.
        #[test]
        fn small_keys_and_values_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..60)) {
            let key = SmallKey::new(&bytes);
            prop_assert_eq!(key.as_slice(), &bytes[..]);
            prop_assert_eq!(key.heap_bytes() == 0, bytes.len() <= INLINE_KEY_BYTES);
            let value = SmallValue::new(&bytes);
            prop_assert_eq!(value.as_slice(), &bytes[..]);
            prop_assert_eq!(value.heap_bytes() == 0, bytes.len() <= INLINE_VALUE_BYTES);
        }
    }
}

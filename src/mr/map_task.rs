//! Executing a map task: read the split, map, combine, partition, write intermediate files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use tempfile::NamedTempFile;

use super::app::{App, Combiner, Emitter};
use super::config::ExecConfig;
use super::error::MrError;
use super::format::RecordWriter;
use super::hash::{FastBuildHasher, partition};
use super::table::{MapTask, REDUCE_TASKS_MAX, TaskId, TaskStats};

/// Name of the intermediate file that `attempt` of map task `map_task` writes for reduce task
/// `reduce_task`: `mr-<m>-<r>-a<attempt>`. Each attempt has its own names, so a slow stale
/// attempt can never replace the files of the attempt the coordinator accepted.
pub fn intermediate_file_name(map_task: u32, reduce_task: u32, attempt: u32) -> String {
    format!("mr-{map_task}-{reduce_task}-a{attempt}")
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

/// Estimated heap bytes per combine-table entry beyond its key and value (two allocations).
const ENTRY_ALLOCATION_BYTES: usize = 32;
/// Bytes per slot of the combine table itself (the slot plus hashbrown's control byte).
const TABLE_SLOT_BYTES: usize = std::mem::size_of::<(Box<[u8]>, Vec<u8>)>() + 1;

/// The map-side combine table: one accumulated value per key, flushed when over budget.
struct CombineTable<'a> {
    combiner: &'a dyn Combiner,
    entries: HashMap<Box<[u8]>, Vec<u8>, FastBuildHasher>,
    /// Heap bytes of keys and values, including allocation overhead.
    heap_bytes: usize,
    budget_bytes: usize,
}

impl CombineTable<'_> {
    fn table_bytes(&self, capacity: usize) -> usize {
        capacity.saturating_mul(TABLE_SLOT_BYTES)
    }

    fn over_budget(&self) -> bool {
        self.heap_bytes + self.table_bytes(self.entries.capacity()) > self.budget_bytes
    }

    /// Whether inserting a new entry of `bytes` would take the table over budget (counting the
    /// table's growth when it is full).
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

/// Everything map's emitter writes to.
struct MapOutput<'a> {
    app_name: &'a str,
    task: TaskId,
    partitions: Vec<RecordWriter<BufWriter<NamedTempFile>>>,
    reduce_tasks: u32,
    record_bytes_max: usize,
    combine: Option<CombineTable<'a>>,
    /// The first error; once set, further pairs are dropped and the task fails.
    error: Option<MrError>,
    emitted: u64,
    spills: u64,
}

impl MapOutput<'_> {
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
            let r = partition(key, self.reduce_tasks) as usize;
            if let Err(e) = self.partitions[r].write(key, value) {
                self.error = Some(e);
            }
            return;
        };
        if let Some(accumulator) = table.entries.get_mut(key) {
            let before = accumulator.capacity();
            if let Err(e) = table.combiner.combine(key, accumulator, value) {
                self.error = Some(MrError::App {
                    app: self.app_name.to_string(),
                    task: self.task,
                    message: format!("combine: {e}"),
                });
                return;
            }
            if key.len() + accumulator.len() > self.record_bytes_max {
                self.error = Some(MrError::RecordTooLarge {
                    key_bytes: key.len(),
                    value_bytes: accumulator.len(),
                    max: self.record_bytes_max,
                });
                return;
            }
            table.heap_bytes = table.heap_bytes - before + accumulator.capacity();
        } else {
            let bytes = key.len() + value.len() + ENTRY_ALLOCATION_BYTES;
            if table.insert_would_overflow(bytes) && !table.entries.is_empty() {
                self.spills += 1;
                if let Err(e) = self.flush() {
                    self.error = Some(e);
                    return;
                }
            }
            let table = self.combine.as_mut().expect("combine table present");
            table.entries.insert(key.into(), value.to_vec());
            table.heap_bytes += bytes;
        }
        let table = self.combine.as_ref().expect("combine table present");
        if table.over_budget() && table.entries.len() > 1 {
            self.spills += 1;
            if let Err(e) = self.flush() {
                self.error = Some(e);
            }
        }
    }

    /// Writes every combined pair to its partition and empties the table (keeping its slots).
    fn flush(&mut self) -> Result<(), MrError> {
        let Some(table) = self.combine.as_mut() else {
            return Ok(());
        };
        for (key, value) in table.entries.drain() {
            let r = partition(&key, self.reduce_tasks) as usize;
            self.partitions[r].write(&key, &value)?;
        }
        table.heap_bytes = 0;
        Ok(())
    }
}

/// Runs map task `task` of `app`: reads its split in chunks of whole lines, calls map on each,
/// combines (if the application has a combiner and `config.use_combiner`), partitions pairs by
/// [`partition`] and writes one intermediate file per reduce task to
/// `config.intermediate_dir`, each under a temporary name renamed into place only when all are
/// complete. A failure or panic leaves no intermediate file of this attempt visible (a process
/// crash can leave some renamed ones, which no reduce reads: only the accepted attempt's files
/// are read).
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
    let dir = &config.intermediate_dir;
    std::fs::create_dir_all(dir).map_err(|e| MrError::io("create directory", dir, e))?;
    let buffer_bytes = (config.map_write_buffer_bytes / task.reduce_tasks as usize).max(4096);
    let mut partitions = Vec::with_capacity(task.reduce_tasks as usize);
    for r in 0..task.reduce_tasks {
        let target = dir.join(intermediate_file_name(task.task, r, task.attempt));
        let temp = temp_file_in(dir)?;
        partitions.push(RecordWriter::new(
            BufWriter::with_capacity(buffer_bytes, temp),
            &target,
        )?);
    }
    let combine = match app.combiner() {
        Some(combiner) if config.use_combiner => Some(CombineTable {
            combiner,
            entries: HashMap::with_capacity_and_hasher(
                (config.combine_buffer_bytes_max / 256).min(1 << 14),
                FastBuildHasher::default(),
            ),
            heap_bytes: 0,
            budget_bytes: config.combine_buffer_bytes_max,
        }),
        _ => None,
    };
    let mut output = MapOutput {
        app_name: app.name(),
        task: TaskId::Map(task.task),
        partitions,
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

    let mut stats = TaskStats {
        input_bytes: task.split.len(),
        input_records: output.emitted,
        spills: output.spills,
        ..TaskStats::default()
    };
    let mut finished = Vec::with_capacity(output.partitions.len());
    for writer in output.partitions {
        stats.output_records += writer.records();
        let (buffered, bytes) = writer.finish()?;
        stats.output_bytes += bytes;
        finished.push(buffered);
    }
    for (r, buffered) in finished.into_iter().enumerate() {
        let target = dir.join(intermediate_file_name(task.task, r as u32, task.attempt));
        persist(buffered, &target, config.sync_files)?;
    }
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

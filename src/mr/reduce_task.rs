//! Executing a reduce task: read the intermediate files, sort and group under a memory budget
//! (external merge sort), reduce, write `mr-out-<r>` atomically.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use super::app::{App, ValueSource, Values};
use super::config::ExecConfig;
use super::error::MrError;
use super::format::{RecordReader, RecordWriter, read_index};
use super::map_task::{
    intermediate_file_name, output_file_name, panic_message, persist, sync_dir, temp_file_in,
};
use super::table::{ReduceTask, TaskId, TaskStats};

/// Most read buffer per block of an intermediate file while loading.
const INPUT_READ_BUFFER_BYTES: usize = 256 * 1024;
/// Write buffer of the output file and of spill runs.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// One record in the sort buffer: where its key and value are in the arena, and the first
/// eight key bytes (big-endian) so most comparisons never touch the arena.
#[derive(Clone, Copy)]
struct Entry {
    prefix: u64,
    offset: usize,
    key_len: u32,
    value_len: u32,
}

impl Entry {
    fn key<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        &arena[self.offset..self.offset + self.key_len as usize]
    }

    fn value<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        let start = self.offset + self.key_len as usize;
        &arena[start..start + self.value_len as usize]
    }
}

fn key_prefix(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = key.len().min(8);
    bytes[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(bytes)
}

/// Collects records in memory up to a budget and spills them as sorted runs beyond it.
struct Sorter {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    arena_bytes_max: usize,
    entries_max: usize,
    runs: Vec<File>,
    dir: PathBuf,
}

impl Sorter {
    /// Half the budget holds keys and values, half the entries. Both vectors are allocated
    /// once at their full size and never grow, so the budget is a hard bound (untouched
    /// capacity costs address space, not memory).
    fn new(config: &ExecConfig) -> Self {
        let arena_bytes_max = config.sort_buffer_bytes_max / 2;
        let entries_max = (config.sort_buffer_bytes_max / 2 / std::mem::size_of::<Entry>()).max(1);
        Sorter {
            arena: Vec::with_capacity(arena_bytes_max),
            entries: Vec::with_capacity(entries_max),
            arena_bytes_max,
            entries_max,
            runs: Vec::new(),
            dir: config.intermediate_dir.clone(),
        }
    }

    fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), MrError> {
        let bytes = key.len() + value.len();
        if self.arena.len() + bytes > self.arena_bytes_max || self.entries.len() == self.entries_max
        {
            self.spill()?;
        }
        assert!(
            self.arena.len() + bytes <= self.arena_bytes_max,
            "a record of {bytes} bytes does not fit an empty sort buffer (config not validated?)"
        );
        let entry = Entry {
            prefix: key_prefix(key),
            offset: self.arena.len(),
            key_len: key.len() as u32,
            value_len: value.len() as u32,
        };
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        self.entries.push(entry);
        Ok(())
    }

    /// Sorts the buffered records by key; stable, so equal keys keep their input order.
    fn sort(&mut self) {
        let arena = &self.arena;
        self.entries.sort_by(|a, b| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| a.key(arena).cmp(b.key(arena)))
        });
    }

    /// Writes the buffered records as a sorted run to an anonymous temporary file (deleted by
    /// the operating system when closed, even after a crash).
    fn spill(&mut self) -> Result<(), MrError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.sort();
        let label = self.run_label(self.runs.len());
        let file = tempfile::tempfile_in(&self.dir)
            .map_err(|e| MrError::io("create a spill run in", &self.dir, e))?;
        let mut writer =
            RecordWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file), &label)?;
        for entry in &self.entries {
            writer.write(entry.key(&self.arena), entry.value(&self.arena))?;
        }
        let (buffered, _) = writer.finish()?;
        let mut file = buffered
            .into_inner()
            .map_err(|e| MrError::io("flush spill run", &label, e.into_error()))?;
        file.rewind()
            .map_err(|e| MrError::io("rewind spill run", &label, e))?;
        self.runs.push(file);
        self.arena.clear();
        self.entries.clear();
        Ok(())
    }

    fn run_label(&self, n: usize) -> PathBuf {
        self.dir.join(format!("<spill run {n}>"))
    }
}

/// A k-way merge of sorted runs: a binary min-heap of run indices ordered by (current key,
/// run index), so equal keys come out in run order (which keeps the sort stable).
struct Merger {
    readers: Vec<RecordReader<File>>,
    heap: Vec<usize>,
    /// A read error met while streaming values; ends the merge.
    error: Option<MrError>,
}

impl Merger {
    fn new(mut readers: Vec<RecordReader<File>>) -> Result<Self, MrError> {
        let mut live = Vec::with_capacity(readers.len());
        for (i, reader) in readers.iter_mut().enumerate() {
            if reader.advance()? {
                live.push(i);
            }
        }
        let mut merger = Merger {
            readers,
            heap: live,
            error: None,
        };
        for i in (0..merger.heap.len() / 2).rev() {
            merger.sift_down(i);
        }
        Ok(merger)
    }

    fn less(&self, a: usize, b: usize) -> bool {
        let (x, y) = (self.heap[a], self.heap[b]);
        match self.readers[x].key().cmp(self.readers[y].key()) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => x < y,
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        loop {
            let left = 2 * i + 1;
            if left >= self.heap.len() {
                return;
            }
            let right = left + 1;
            let child = if right < self.heap.len() && self.less(right, left) {
                right
            } else {
                left
            };
            if !self.less(child, i) {
                return;
            }
            self.heap.swap(i, child);
            i = child;
        }
    }

    /// The run holding the smallest current record.
    fn peek(&self) -> Option<usize> {
        self.heap.first().copied()
    }

    /// Moves the smallest run to its next record.
    fn advance_top(&mut self) -> Result<(), MrError> {
        let top = self.heap[0];
        if self.readers[top].advance()? {
            self.sift_down(0);
        } else {
            self.heap.swap_remove(0);
            if !self.heap.is_empty() {
                self.sift_down(0);
            }
        }
        Ok(())
    }
}

/// The values of one key from a merge.
struct MergeValues<'a> {
    merger: &'a mut Merger,
    key: &'a [u8],
    value: Vec<u8>,
}

impl ValueSource for MergeValues<'_> {
    fn next_value(&mut self) -> Option<&[u8]> {
        if self.merger.error.is_some() {
            return None;
        }
        let top = self.merger.peek()?;
        if self.merger.readers[top].key() != self.key {
            return None;
        }
        self.value.clear();
        self.value
            .extend_from_slice(self.merger.readers[top].value());
        if let Err(e) = self.merger.advance_top() {
            self.merger.error = Some(e);
        }
        Some(&self.value)
    }
}

/// The values of one key from the in-memory sort buffer.
struct ArenaValues<'a> {
    arena: &'a [u8],
    entries: std::slice::Iter<'a, Entry>,
}

impl ValueSource for ArenaValues<'_> {
    fn next_value(&mut self) -> Option<&[u8]> {
        self.entries.next().map(|entry| entry.value(self.arena))
    }
}

/// Writes `key value` lines to the output and counts them.
struct OutputWriter<'a> {
    app: &'a dyn App,
    task: TaskId,
    writer: BufWriter<tempfile::NamedTempFile>,
    path: &'a Path,
    value: Vec<u8>,
    lines: u64,
    bytes: u64,
}

impl OutputWriter<'_> {
    /// Calls reduce on one key's values and writes the line. Values reduce left unread are
    /// skipped so the next key starts at its own values.
    fn reduce(&mut self, key: &[u8], source: &mut dyn ValueSource) -> Result<(), MrError> {
        self.value.clear();
        let (app, value) = (self.app, &mut self.value);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            let mut values = Values::new(&mut *source);
            app.reduce(key, &mut values, value)
        }));
        let app_error = |message: String| MrError::App {
            app: self.app.name().to_string(),
            task: self.task,
            message,
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(app_error(format!("reduce: {e}"))),
            Err(payload) => return Err(app_error(format!("reduce {}", panic_message(payload)))),
        }
        while source.next_value().is_some() {}
        let io = |e| MrError::io("write output", self.path, e);
        self.writer.write_all(key).map_err(io)?;
        self.writer.write_all(b" ").map_err(io)?;
        self.writer.write_all(&self.value).map_err(io)?;
        self.writer.write_all(b"\n").map_err(io)?;
        self.lines += 1;
        self.bytes += (key.len() + self.value.len() + 2) as u64;
        Ok(())
    }
}

/// Runs reduce task `task` of `app`: reads its blocks of `mr-<m>-a<attempt>` for every map task
/// (the accepted attempts listed in the task; the file's index says which blocks are this
/// task's, see `format.rs`), sorts all records by key — in memory when they fit
/// `sort_buffer_bytes_max`, else as spilled sorted runs merged `merge_fan_in_max` at a time —
/// calls reduce once per key and writes `key value` lines to a temporary file renamed to
/// `mr-out-<r>` in `config.output_dir` when complete. Every index and block it reads is read
/// (and checksummed) to the end before any output is written, and a failure leaves no output.
pub fn run_reduce(
    app: &dyn App,
    task: &ReduceTask,
    config: &ExecConfig,
) -> Result<TaskStats, MrError> {
    config.validate()?;
    for dir in [&config.intermediate_dir, &config.output_dir] {
        std::fs::create_dir_all(dir).map_err(|e| MrError::io("create directory", dir, e))?;
    }
    let mut stats = TaskStats::default();
    let mut sorter = Sorter::new(config);
    for (map_task, &attempt) in task.map_attempts.iter().enumerate() {
        let name = intermediate_file_name(map_task as u32, attempt);
        let path = config.intermediate_dir.join(name);
        let mut file =
            File::open(&path).map_err(|e| MrError::io("open intermediate file", &path, e))?;
        for block in read_index(&mut file, &path, task.task)? {
            file.seek(SeekFrom::Start(block.offset))
                .map_err(|e| MrError::io("seek in intermediate file", &path, e))?;
            let buffer_bytes = INPUT_READ_BUFFER_BYTES.min(block.bytes as usize);
            let mut reader = RecordReader::new(
                (&mut file).take(block.bytes),
                &path,
                block.offset,
                config.record_bytes_max,
                buffer_bytes,
            )?;
            while reader.advance()? {
                sorter.push(reader.key(), reader.value())?;
                stats.input_records += 1;
            }
            stats.input_bytes += block.bytes;
        }
    }

    let target = config.output_dir.join(output_file_name(task.task));
    let mut output = OutputWriter {
        app,
        task: TaskId::Reduce(task.task),
        writer: BufWriter::with_capacity(WRITE_BUFFER_BYTES, temp_file_in(&config.output_dir)?),
        path: &target,
        value: Vec::new(),
        lines: 0,
        bytes: 0,
    };
    if sorter.runs.is_empty() {
        sorter.sort();
        let mut rest = &sorter.entries[..];
        while let Some(first) = rest.first() {
            let key = first.key(&sorter.arena);
            let group = rest
                .iter()
                .position(|entry| entry.key(&sorter.arena) != key)
                .unwrap_or(rest.len());
            let mut source = ArenaValues {
                arena: &sorter.arena,
                entries: rest[..group].iter(),
            };
            output.reduce(key, &mut source)?;
            rest = &rest[group..];
        }
    } else {
        sorter.spill()?;
        stats.spills = sorter.runs.len() as u64;
        let runs = std::mem::take(&mut sorter.runs);
        drop(sorter);
        let runs = merge_down(runs, config)?;
        let mut merger = Merger::new(open_runs(runs, config)?)?;
        let mut key = Vec::new();
        while let Some(top) = merger.peek() {
            key.clear();
            key.extend_from_slice(merger.readers[top].key());
            let mut source = MergeValues {
                merger: &mut merger,
                key: &key,
                value: Vec::new(),
            };
            output.reduce(&key, &mut source)?;
            if let Some(e) = merger.error.take() {
                return Err(e);
            }
        }
    }
    stats.output_records = output.lines;
    stats.output_bytes = output.bytes;
    persist(output.writer, &target, config.sync_files)?;
    if config.sync_files {
        sync_dir(&config.output_dir)?;
    }
    tracing::debug!(
        task = task.task,
        attempt = task.attempt,
        ?stats,
        "reduce task done"
    );
    Ok(stats)
}

/// Read buffer per run while merging: the sort budget shared by the runs of one merge.
fn merge_read_buffer_bytes(config: &ExecConfig) -> usize {
    (config.sort_buffer_bytes_max / (2 * config.merge_fan_in_max)).clamp(4096, 1 << 20)
}

fn open_runs(runs: Vec<File>, config: &ExecConfig) -> Result<Vec<RecordReader<File>>, MrError> {
    let buffer_bytes = merge_read_buffer_bytes(config);
    runs.into_iter()
        .enumerate()
        .map(|(i, file)| {
            let label = config.intermediate_dir.join(format!("<spill run {i}>"));
            RecordReader::new(file, &label, 0, config.record_bytes_max, buffer_bytes)
        })
        .collect()
}

/// Merges runs in passes of `merge_fan_in_max` consecutive runs until at most that many remain.
fn merge_down(mut runs: Vec<File>, config: &ExecConfig) -> Result<Vec<File>, MrError> {
    let fan_in = config.merge_fan_in_max;
    while runs.len() > fan_in {
        let mut merged = Vec::with_capacity(runs.len().div_ceil(fan_in));
        let mut pending = runs.into_iter().peekable();
        while pending.peek().is_some() {
            let group: Vec<File> = pending.by_ref().take(fan_in).collect();
            merged.push(merge_runs(group, config)?);
        }
        runs = merged;
    }
    Ok(runs)
}

/// Merges sorted runs into one sorted run.
fn merge_runs(runs: Vec<File>, config: &ExecConfig) -> Result<File, MrError> {
    let label = config.intermediate_dir.join("<merged spill run>");
    let file = tempfile::tempfile_in(&config.intermediate_dir)
        .map_err(|e| MrError::io("create a spill run in", &config.intermediate_dir, e))?;
    let mut writer = RecordWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file), &label)?;
    let mut merger = Merger::new(open_runs(runs, config)?)?;
    while let Some(top) = merger.peek() {
        writer.write(merger.readers[top].key(), merger.readers[top].value())?;
        merger.advance_top()?;
    }
    let (buffered, _) = writer.finish()?;
    let mut file = buffered
        .into_inner()
        .map_err(|e| MrError::io("flush spill run", &label, e.into_error()))?;
    file.rewind()
        .map_err(|e| MrError::io("rewind spill run", &label, e))?;
    Ok(file)
}

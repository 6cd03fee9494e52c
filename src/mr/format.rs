//! The binary format of intermediate files and reduce spill runs.
//!
//! A *block* holds records of one reduce task; a spill run is one block, and an intermediate
//! file (one per map attempt, `mr-<m>-a<attempt>`) is a sequence of blocks followed by an index
//! that says where each reduce task's blocks are:
//!
//! ```text
//! block   := header record* trailer
//! header  := "RKMRI" version:u8 (= 1)
//! record  := 0x01 key_len:varint value_len:varint key value
//! trailer := 0x00 records:u64le crc:u32le
//!
//! file    := block* entry* slot{reduce_tasks} footer
//! entry   := offset:u64le bytes:u64le                  (one per block)
//! slot    := first_entry:u64le entries:u32le crc:u32le (one per reduce task, in order)
//! footer  := reduce_tasks:u32le entries:u64le crc:u32le "RKMRX" version:u8 (= 1)
//! ```
//!
//! Lengths are unsigned LEB128 of at most 5 bytes (u32). A block's `records` counts its records
//! and its `crc` is the CRC-32 (IEEE) of every byte between its header and its trailer. The
//! entries are grouped by reduce task (reduce task 0's first), each group in file order; the
//! slot of reduce task `r` names its group, and its `crc` covers `r`, `first_entry`, `entries`
//! and the group's entries. The footer's `crc` covers its first 12 bytes. So a reduce task
//! reads the footer, its slot and its entries — not the whole index — and every byte it
//! depends on is checksummed. A map task keeps one bounded buffer per reduce task and writes
//! it out as a block when full (and at the end), so a reduce task may have several blocks in
//! one file, in the order their records were written, or none.
//!
//! A block or file without a valid trailer or footer is truncated; a reader reports any
//! violation as [`MrError::Corrupt`] (with the byte offset in the file) and never panics. A
//! block's CRC is only known at its end, so a consumer must not publish anything derived from
//! a block before reading it to the end (reduce reads all its inputs before writing output).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::MrError;

const MAGIC: &[u8; 5] = b"RKMRI";
const VERSION: u8 = 1;
const HEADER_BYTES: usize = 6;
const TAG_RECORD: u8 = 1;
const TAG_TRAILER: u8 = 0;
const TRAILER_BYTES: usize = 1 + 8 + 4;
const VARINT_BYTES_MAX: usize = 5;
const RECORD_HEAD_BYTES_MAX: usize = 1 + 2 * VARINT_BYTES_MAX;
const INDEX_MAGIC: &[u8; 5] = b"RKMRX";
const INDEX_VERSION: u8 = 1;
const INDEX_ENTRY_BYTES: usize = 8 + 8;
const SLOT_BYTES: usize = 8 + 4 + 4;
const FOOTER_BYTES: usize = 4 + 8 + 4 + 5 + 1;
/// Index entries read at a time.
const INDEX_READ_ENTRIES: usize = 4096;

/// Appends `value` as unsigned LEB128 to `out`; returns the number of bytes written.
fn encode_varint(mut value: u32, out: &mut [u8; VARINT_BYTES_MAX]) -> usize {
    let mut i = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// Decodes unsigned LEB128 from the front of `bytes`: `Ok(Some((value, len)))`, `Ok(None)` if
/// `bytes` ends inside the varint, `Err(reason)` if it is malformed.
fn decode_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, &'static str> {
    let mut value: u64 = 0;
    for (i, &byte) in bytes.iter().take(VARINT_BYTES_MAX).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .map(|v| Some((v, i + 1)))
                .map_err(|_| "length varint overflows 32 bits");
        }
    }
    if bytes.len() >= VARINT_BYTES_MAX {
        Err("length varint longer than 5 bytes")
    } else {
        Ok(None)
    }
}

/// Encodes the head of a record (tag and both lengths) into `head`; returns its length.
fn record_head(
    key: &[u8],
    value: &[u8],
    head: &mut [u8; RECORD_HEAD_BYTES_MAX],
) -> Result<usize, MrError> {
    let too_large = || MrError::RecordTooLarge {
        key_bytes: key.len(),
        value_bytes: value.len(),
        max: u32::MAX as usize,
    };
    let key_len = u32::try_from(key.len()).map_err(|_| too_large())?;
    let value_len = u32::try_from(value.len()).map_err(|_| too_large())?;
    head[0] = TAG_RECORD;
    let mut varint = [0u8; VARINT_BYTES_MAX];
    let n = encode_varint(key_len, &mut varint);
    head[1..1 + n].copy_from_slice(&varint[..n]);
    let m = encode_varint(value_len, &mut varint);
    head[1 + n..1 + n + m].copy_from_slice(&varint[..m]);
    Ok(1 + n + m)
}

fn block_header() -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..5].copy_from_slice(MAGIC);
    header[5] = VERSION;
    header
}

fn block_trailer(records: u64, crc: u32) -> [u8; TRAILER_BYTES] {
    let mut trailer = [0u8; TRAILER_BYTES];
    trailer[0] = TAG_TRAILER;
    trailer[1..9].copy_from_slice(&records.to_le_bytes());
    trailer[9..13].copy_from_slice(&crc.to_le_bytes());
    trailer
}

/// Writes one block (a spill run) to `W` (normally a `BufWriter<File>`).
pub(crate) struct RecordWriter<W: Write> {
    inner: W,
    path: PathBuf,
    crc: crc32fast::Hasher,
    records: u64,
    bytes: u64,
}

impl<W: Write> RecordWriter<W> {
    /// Starts a block by writing its header. `path` names the file in errors.
    pub(crate) fn new(mut inner: W, path: &Path) -> Result<Self, MrError> {
        inner
            .write_all(&block_header())
            .map_err(|e| MrError::io("write intermediate file", path, e))?;
        Ok(RecordWriter {
            inner,
            path: path.to_path_buf(),
            crc: crc32fast::Hasher::new(),
            records: 0,
            bytes: HEADER_BYTES as u64,
        })
    }

    /// Appends one record.
    pub(crate) fn write(&mut self, key: &[u8], value: &[u8]) -> Result<(), MrError> {
        let mut head = [0u8; RECORD_HEAD_BYTES_MAX];
        let head_len = record_head(key, value, &mut head)?;
        let head = &head[..head_len];
        self.crc.update(head);
        self.crc.update(key);
        self.crc.update(value);
        let path = &self.path;
        let io = |e| MrError::io("write intermediate file", path, e);
        self.inner.write_all(head).map_err(io)?;
        self.inner.write_all(key).map_err(io)?;
        self.inner.write_all(value).map_err(io)?;
        self.records += 1;
        self.bytes += (head.len() + key.len() + value.len()) as u64;
        Ok(())
    }

    /// Writes the trailer, flushes, and returns the inner writer and the block's total size.
    pub(crate) fn finish(mut self) -> Result<(W, u64), MrError> {
        let trailer = block_trailer(self.records, self.crc.clone().finalize());
        let path = &self.path;
        let io = |e| MrError::io("write intermediate file", path, e);
        self.inner.write_all(&trailer).map_err(io)?;
        self.inner.flush().map_err(io)?;
        Ok((self.inner, self.bytes + TRAILER_BYTES as u64))
    }
}

/// One block of an intermediate file: `bytes` bytes from byte `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    /// Offset of the block's header in the file.
    pub(crate) offset: u64,
    /// Size of the block, header and trailer included.
    pub(crate) bytes: u64,
}

/// The records of one reduce task not yet written out: a block being built in memory.
struct BlockBuffer {
    /// Header and records (the trailer is appended when the block is written out).
    bytes: Vec<u8>,
    records: u64,
}

/// Writes an intermediate file to `W`: records of `reduce_tasks` reduce tasks, buffered per
/// reduce task (about `block_bytes` each) and written out as blocks, then the index.
pub(crate) struct IntermediateWriter<W: Write> {
    inner: W,
    path: PathBuf,
    buffers: Vec<BlockBuffer>,
    block_bytes: usize,
    /// Bytes written to `inner` so far: the offset of the next block.
    offset: u64,
    /// Per reduce task, the encoded index entries of its blocks written so far.
    index: Vec<Vec<u8>>,
    records: u64,
}

impl<W: Write> IntermediateWriter<W> {
    /// A writer of a file for `reduce_tasks` reduce tasks (at least 1) that writes a reduce
    /// task's records out once about `block_bytes` of them are buffered. `path` names the file
    /// in errors.
    pub(crate) fn new(inner: W, path: &Path, reduce_tasks: u32, block_bytes: usize) -> Self {
        assert!(reduce_tasks > 0, "an intermediate file needs reduce tasks");
        IntermediateWriter {
            inner,
            path: path.to_path_buf(),
            buffers: (0..reduce_tasks)
                .map(|_| BlockBuffer {
                    bytes: Vec::new(),
                    records: 0,
                })
                .collect(),
            block_bytes: block_bytes.max(HEADER_BYTES + TRAILER_BYTES),
            offset: 0,
            index: (0..reduce_tasks).map(|_| Vec::new()).collect(),
            records: 0,
        }
    }

    /// Appends one record for `reduce_task`.
    ///
    /// # Panics
    /// Panics if `reduce_task` is not below the writer's `reduce_tasks` (a caller bug).
    #[inline]
    pub(crate) fn write(
        &mut self,
        reduce_task: u32,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), MrError> {
        let mut head = [0u8; RECORD_HEAD_BYTES_MAX];
        let head_len = record_head(key, value, &mut head)?;
        let head = &head[..head_len];
        let record_bytes = head.len() + key.len() + value.len();
        let buffer = &self.buffers[reduce_task as usize];
        if buffer.records > 0
            && buffer.bytes.len() + record_bytes + TRAILER_BYTES > self.block_bytes
        {
            self.write_block(reduce_task)?;
        }
        let buffer = &mut self.buffers[reduce_task as usize];
        if buffer.bytes.is_empty() {
            buffer.bytes.reserve(self.block_bytes);
            buffer.bytes.extend_from_slice(&block_header());
        }
        buffer.bytes.extend_from_slice(head);
        buffer.bytes.extend_from_slice(key);
        buffer.bytes.extend_from_slice(value);
        buffer.records += 1;
        self.records += 1;
        Ok(())
    }

    /// Writes out the buffered records of `reduce_task` as one block and empties its buffer.
    fn write_block(&mut self, reduce_task: u32) -> Result<(), MrError> {
        let buffer = &mut self.buffers[reduce_task as usize];
        assert!(buffer.records > 0, "a block holds at least one record");
        let crc = crc32fast::hash(&buffer.bytes[HEADER_BYTES..]);
        buffer
            .bytes
            .extend_from_slice(&block_trailer(buffer.records, crc));
        let bytes = buffer.bytes.len() as u64;
        self.inner
            .write_all(&buffer.bytes)
            .map_err(|e| MrError::io("write intermediate file", &self.path, e))?;
        let entries = &mut self.index[reduce_task as usize];
        entries.extend_from_slice(&self.offset.to_le_bytes());
        entries.extend_from_slice(&bytes.to_le_bytes());
        self.offset += bytes;
        buffer.bytes.clear();
        buffer.records = 0;
        if buffer.bytes.capacity() > 2 * self.block_bytes {
            // A record larger than a block grew the buffer; give the memory back.
            buffer.bytes = Vec::new();
        }
        Ok(())
    }

    /// Number of records written so far.
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    /// Writes the remaining blocks (in reduce task order), the index and the footer, flushes,
    /// and returns the inner writer and the file's total size.
    pub(crate) fn finish(mut self) -> Result<(W, u64), MrError> {
        for reduce_task in 0..self.buffers.len() as u32 {
            if self.buffers[reduce_task as usize].records > 0 {
                self.write_block(reduce_task)?;
            }
        }
        let path = &self.path;
        let io = |e| MrError::io("write intermediate file", path, e);
        let mut slots = Vec::with_capacity(self.index.len() * SLOT_BYTES);
        let mut first_entry = 0u64;
        for (reduce_task, entries) in self.index.iter().enumerate() {
            let count = (entries.len() / INDEX_ENTRY_BYTES) as u32;
            let crc = entries_crc(reduce_task as u32, first_entry, count, entries);
            slots.extend_from_slice(&first_entry.to_le_bytes());
            slots.extend_from_slice(&count.to_le_bytes());
            slots.extend_from_slice(&crc.to_le_bytes());
            self.inner.write_all(entries).map_err(io)?;
            first_entry += u64::from(count);
        }
        self.inner.write_all(&slots).map_err(io)?;
        let mut footer = [0u8; FOOTER_BYTES];
        footer[..4].copy_from_slice(&(self.buffers.len() as u32).to_le_bytes());
        footer[4..12].copy_from_slice(&first_entry.to_le_bytes());
        let crc = crc32fast::hash(&footer[..12]);
        footer[12..16].copy_from_slice(&crc.to_le_bytes());
        footer[16..21].copy_from_slice(INDEX_MAGIC);
        footer[21] = INDEX_VERSION;
        self.inner.write_all(&footer).map_err(io)?;
        self.inner.flush().map_err(io)?;
        let index_bytes = first_entry * INDEX_ENTRY_BYTES as u64 + slots.len() as u64;
        Ok((self.inner, self.offset + index_bytes + FOOTER_BYTES as u64))
    }
}

/// The checksum of a reduce task's index entries, bound to its slot: the reduce task, its
/// first entry and its entry count, then the entries.
fn entries_crc(reduce_task: u32, first_entry: u64, count: u32, entries: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&reduce_task.to_le_bytes());
    crc.update(&first_entry.to_le_bytes());
    crc.update(&count.to_le_bytes());
    crc.update(entries);
    crc.finalize()
}

/// Reads and checks the part of the index of the intermediate file `file` (named `path` in
/// errors) that `reduce_task` needs — the footer, its slot and its entries, not the other
/// reduce tasks' — and returns its blocks, in file order. The blocks are checked as they are
/// read.
pub(crate) fn read_index<F: Read + Seek>(
    file: &mut F,
    path: &Path,
    reduce_task: u32,
) -> Result<Vec<Block>, MrError> {
    let corrupt = |offset: u64, reason: String| MrError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let io = |e| MrError::io("read intermediate file", path, e);
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len < FOOTER_BYTES as u64 {
        return Err(corrupt(0, "truncated: the index footer is missing".into()));
    }
    let footer_offset = len - FOOTER_BYTES as u64;
    let mut footer = [0u8; FOOTER_BYTES];
    file.seek(SeekFrom::Start(footer_offset)).map_err(io)?;
    file.read_exact(&mut footer).map_err(io)?;
    if &footer[16..21] != INDEX_MAGIC {
        let reason = "not an intermediate file or truncated (bad index magic)";
        return Err(corrupt(footer_offset, reason.into()));
    }
    if footer[21] != INDEX_VERSION {
        let reason = format!("unsupported index version {}", footer[21]);
        return Err(corrupt(footer_offset, reason));
    }
    let stored = u32::from_le_bytes(footer[12..16].try_into().expect("4 bytes"));
    let actual = crc32fast::hash(&footer[..12]);
    if stored != actual {
        let reason =
            format!("footer checksum mismatch (stored {stored:#010x}, computed {actual:#010x})");
        return Err(corrupt(footer_offset, reason));
    }
    let reduce_tasks = u32::from_le_bytes(footer[..4].try_into().expect("4 bytes"));
    let entries_total = u64::from_le_bytes(footer[4..12].try_into().expect("8 bytes"));
    if reduce_task >= reduce_tasks {
        let reason =
            format!("written for {reduce_tasks} reduce tasks, read by reduce task {reduce_task}");
        return Err(corrupt(footer_offset, reason));
    }
    let slots_start = footer_offset.checked_sub(u64::from(reduce_tasks) * SLOT_BYTES as u64);
    let entries_start = slots_start.and_then(|slots_start| {
        entries_total
            .checked_mul(INDEX_ENTRY_BYTES as u64)
            .and_then(|entries_bytes| slots_start.checked_sub(entries_bytes))
    });
    let (Some(slots_start), Some(entries_start)) = (slots_start, entries_start) else {
        let reason = format!(
            "an index of {reduce_tasks} slots and {entries_total} entries is larger than the file"
        );
        return Err(corrupt(footer_offset, reason));
    };
    let slot_offset = slots_start + u64::from(reduce_task) * SLOT_BYTES as u64;
    let mut slot = [0u8; SLOT_BYTES];
    file.seek(SeekFrom::Start(slot_offset)).map_err(io)?;
    file.read_exact(&mut slot).map_err(io)?;
    let first_entry = u64::from_le_bytes(slot[..8].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(slot[8..12].try_into().expect("4 bytes"));
    let stored = u32::from_le_bytes(slot[12..16].try_into().expect("4 bytes"));
    if first_entry
        .checked_add(u64::from(count))
        .is_none_or(|end| end > entries_total)
    {
        let reason = format!(
            "slot of reduce task {reduce_task}: entries {first_entry}+{count} of {entries_total}"
        );
        return Err(corrupt(slot_offset, reason));
    }
    // Read the entries in pieces, so memory stays bounded however many blocks there are.
    let mut entry_offset = entries_start + first_entry * INDEX_ENTRY_BYTES as u64;
    file.seek(SeekFrom::Start(entry_offset)).map_err(io)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&reduce_task.to_le_bytes());
    crc.update(&first_entry.to_le_bytes());
    crc.update(&count.to_le_bytes());
    let mut piece = vec![0u8; INDEX_ENTRY_BYTES * INDEX_READ_ENTRIES.min(count.max(1) as usize)];
    let mut blocks = Vec::new();
    let (mut remaining, mut previous_end) = (count as usize, 0u64);
    while remaining > 0 {
        let n = remaining.min(piece.len() / INDEX_ENTRY_BYTES);
        let piece = &mut piece[..n * INDEX_ENTRY_BYTES];
        file.read_exact(piece).map_err(io)?;
        crc.update(piece);
        for entry in piece.chunks_exact(INDEX_ENTRY_BYTES) {
            let offset = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
            let bytes = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
            let end = offset.checked_add(bytes);
            if offset < previous_end
                || bytes < (HEADER_BYTES + TRAILER_BYTES) as u64
                || end.is_none_or(|end| end > entries_start)
            {
                let reason = format!(
                    "index entry for a block of {bytes} bytes at {offset} (blocks end at \
                     {entries_start}, the previous one at {previous_end})"
                );
                return Err(corrupt(entry_offset, reason));
            }
            previous_end = offset + bytes;
            blocks.push(Block { offset, bytes });
            entry_offset += INDEX_ENTRY_BYTES as u64;
        }
        remaining -= n;
    }
    let actual = crc.finalize();
    if actual != stored {
        let reason = format!(
            "index checksum mismatch for reduce task {reduce_task} (stored {stored:#010x}, \
             computed {actual:#010x})"
        );
        return Err(corrupt(slot_offset, reason));
    }
    Ok(blocks)
}

/// Reads the records of one block, validating everything.
pub(crate) struct RecordReader<R: Read = File> {
    inner: R,
    path: PathBuf,
    /// Unconsumed bytes are `buf[start..end]`; `buf.len()` is the buffer's size.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Offset in the file of `buf[start]`.
    offset: u64,
    eof: bool,
    finished: bool,
    crc: crc32fast::Hasher,
    records: u64,
    record_bytes_max: usize,
    /// Location in `buf` of the current record's key and value (valid until the next advance).
    key: (usize, usize),
    value: (usize, usize),
}

impl<R: Read> RecordReader<R> {
    /// Reads one block from `inner` (positioned at its header, ending at its trailer); `path`
    /// names the file in errors and `offset` is where the block starts in it.
    pub(crate) fn new(
        inner: R,
        path: &Path,
        offset: u64,
        record_bytes_max: usize,
        buffer_bytes: usize,
    ) -> Result<Self, MrError> {
        let mut reader = RecordReader {
            inner,
            path: path.to_path_buf(),
            buf: vec![0; buffer_bytes.max(64)],
            start: 0,
            end: 0,
            offset,
            eof: false,
            finished: false,
            crc: crc32fast::Hasher::new(),
            records: 0,
            record_bytes_max,
            key: (0, 0),
            value: (0, 0),
        };
        let available = reader.fill_to(HEADER_BYTES)?;
        if available < HEADER_BYTES || &reader.buf[..5] != MAGIC {
            return Err(reader.corrupt("not an intermediate file (bad magic)"));
        }
        if reader.buf[5] != VERSION {
            let reason = format!("unsupported format version {}", reader.buf[5]);
            return Err(reader.corrupt(reason));
        }
        reader.consume(HEADER_BYTES);
        Ok(reader)
    }

    fn corrupt(&self, reason: impl Into<String>) -> MrError {
        MrError::Corrupt {
            path: self.path.clone(),
            offset: self.offset,
            reason: reason.into(),
        }
    }

    fn consume(&mut self, n: usize) {
        assert!(
            self.start + n <= self.end,
            "consume past the buffered bytes"
        );
        self.start += n;
        self.offset += n as u64;
    }

    /// Tries to buffer at least `n` unconsumed bytes; returns how many are buffered (fewer than
    /// `n` only at the end of the input). Grows the buffer if `n` exceeds its size.
    fn fill_to(&mut self, n: usize) -> Result<usize, MrError> {
        if self.end - self.start >= n || self.eof {
            return Ok(self.end - self.start);
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if n > self.buf.len() {
                self.buf.resize(n, 0);
            }
        }
        while self.end - self.start < n {
            let read = loop {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(read) => break read,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(MrError::io("read intermediate file", &self.path, e)),
                }
            };
            if read == 0 {
                self.eof = true;
                break;
            }
            self.end += read;
        }
        Ok(self.end - self.start)
    }

    /// Moves to the next record. Returns `false` at the (validated) end of the file.
    pub(crate) fn advance(&mut self) -> Result<bool, MrError> {
        if self.finished {
            return Ok(false);
        }
        let head_max = 1 + 2 * VARINT_BYTES_MAX;
        let available = self.fill_to(head_max)?;
        if available == 0 {
            return Err(self.corrupt("truncated: the trailer is missing"));
        }
        match self.buf[self.start] {
            TAG_RECORD => {}
            TAG_TRAILER => {
                self.read_trailer()?;
                return Ok(false);
            }
            tag => return Err(self.corrupt(format!("unknown record tag {tag:#04x}"))),
        }
        let head = &self.buf[self.start + 1..self.start + available];
        let (key_len, n) = match decode_varint(head) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(self.corrupt("truncated inside a record header")),
            Err(reason) => return Err(self.corrupt(reason)),
        };
        let (value_len, m) = match decode_varint(&head[n..]) {
            Ok(Some(v)) => v,
            Ok(None) => return Err(self.corrupt("truncated inside a record header")),
            Err(reason) => return Err(self.corrupt(reason)),
        };
        let (key_len, value_len) = (key_len as usize, value_len as usize);
        if key_len.saturating_add(value_len) > self.record_bytes_max {
            let reason = format!(
                "record of {} bytes exceeds record_bytes_max ({})",
                key_len.saturating_add(value_len),
                self.record_bytes_max
            );
            return Err(self.corrupt(reason));
        }
        let total = 1 + n + m + key_len + value_len;
        if self.fill_to(total)? < total {
            return Err(self.corrupt("truncated inside a record"));
        }
        let record = &self.buf[self.start..self.start + total];
        self.crc.update(record);
        let key_start = self.start + 1 + n + m;
        self.key = (key_start, key_start + key_len);
        self.value = (key_start + key_len, key_start + key_len + value_len);
        self.consume(total);
        self.records += 1;
        Ok(true)
    }

    fn read_trailer(&mut self) -> Result<(), MrError> {
        if self.fill_to(TRAILER_BYTES)? < TRAILER_BYTES {
            return Err(self.corrupt("truncated inside the trailer"));
        }
        let trailer = &self.buf[self.start..self.start + TRAILER_BYTES];
        let records = u64::from_le_bytes(trailer[1..9].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(trailer[9..13].try_into().expect("4 bytes"));
        if records != self.records {
            let reason = format!(
                "trailer counts {records} records but the file holds {}",
                self.records
            );
            return Err(self.corrupt(reason));
        }
        let actual = self.crc.clone().finalize();
        if crc != actual {
            let reason = format!("checksum mismatch (stored {crc:#010x}, computed {actual:#010x})");
            return Err(self.corrupt(reason));
        }
        self.consume(TRAILER_BYTES);
        if self.fill_to(1)? != 0 {
            return Err(self.corrupt("bytes after the trailer"));
        }
        self.finished = true;
        Ok(())
    }

    /// Key of the current record (after `advance` returned `true`).
    pub(crate) fn key(&self) -> &[u8] {
        &self.buf[self.key.0..self.key.1]
    }

    /// Value of the current record (after `advance` returned `true`).
    pub(crate) fn value(&self) -> &[u8] {
        &self.buf[self.value.0..self.value.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Records = Vec<(Vec<u8>, Vec<u8>)>;

    fn encode(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut writer = RecordWriter::new(Vec::new(), Path::new("mem")).unwrap();
        for (key, value) in records {
            writer.write(key, value).unwrap();
        }
        let (bytes, size) = writer.finish().unwrap();
        assert_eq!(size, bytes.len() as u64);
        bytes
    }

    fn decode(bytes: &[u8], buffer_bytes: usize) -> Result<Records, MrError> {
        let mut reader = RecordReader::new(bytes, Path::new("mem"), 0, 1 << 20, buffer_bytes)?;
        let mut out = Vec::new();
        while reader.advance()? {
            out.push((reader.key().to_vec(), reader.value().to_vec()));
        }
        assert!(!reader.advance()?, "advance after the end stays at the end");
        Ok(out)
    }

    /// Records tagged with their reduce task.
    type Tagged = Vec<(u32, Vec<u8>, Vec<u8>)>;

    fn encode_file(records: &Tagged, reduce_tasks: u32, block_bytes: usize) -> Vec<u8> {
        let mut writer =
            IntermediateWriter::new(Vec::new(), Path::new("mem"), reduce_tasks, block_bytes);
        for (r, key, value) in records {
            writer.write(*r, key, value).unwrap();
        }
        assert_eq!(writer.records(), records.len() as u64);
        let (bytes, size) = writer.finish().unwrap();
        assert_eq!(size, bytes.len() as u64);
        bytes
    }

    /// What reduce task `reduce_task` reads from an intermediate file: its blocks, in order.
    fn decode_file(bytes: &[u8], reduce_task: u32) -> Result<Records, MrError> {
        let mut file = std::io::Cursor::new(bytes);
        let mut out = Vec::new();
        for block in read_index(&mut file, Path::new("mem"), reduce_task)? {
            file.seek(SeekFrom::Start(block.offset)).unwrap();
            let mut reader = RecordReader::new(
                (&mut file).take(block.bytes),
                Path::new("mem"),
                block.offset,
                1 << 20,
                64,
            )?;
            while reader.advance()? {
                out.push((reader.key().to_vec(), reader.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn sample_file() -> (Tagged, Vec<u8>) {
        let records: Tagged = (0..40u32)
            .map(|i| {
                let key = format!("key{i}").into_bytes();
                (i % 3, key, vec![i as u8; (i % 5) as usize])
            })
            .collect();
        // Reduce task 3 of 4 gets no record; blocks of about 60 bytes split the others.
        let bytes = encode_file(&records, 4, 60);
        (records, bytes)
    }

    fn corrupt_reason(result: Result<Records, MrError>) -> String {
        match result {
            Err(MrError::Corrupt { reason, .. }) => reason,
            other => panic!("expected a Corrupt error, got {other:?}"),
        }
    }

    // Proves varints round-trip at their byte-length boundaries.
    #[test]
    fn varint_round_trips_at_boundaries() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            (1 << 21) - 1,
            1 << 28,
            u32::MAX,
        ] {
            let mut buf = [0u8; VARINT_BYTES_MAX];
            let n = encode_varint(value, &mut buf);
            assert_eq!(decode_varint(&buf[..n]), Ok(Some((value, n))));
            assert_eq!(decode_varint(&buf[..n - 1]), Ok(None));
        }
        assert!(decode_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        assert!(decode_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]).is_err());
    }

    // Proves an empty file (header and trailer only) reads as zero records.
    #[test]
    fn empty_file_round_trips() {
        assert_eq!(decode(&encode(&[]), 64).unwrap(), Vec::new());
    }

    // Proves truncation at every byte position is reported as corruption, never a panic.
    #[test]
    fn every_truncation_is_detected() {
        let bytes = encode(&[
            (b"alpha".to_vec(), b"1".to_vec()),
            (b"".to_vec(), b"".to_vec()),
            (vec![b'k'; 300], vec![7; 200]),
        ]);
        for len in 0..bytes.len() {
            assert!(
                matches!(decode(&bytes[..len], 64), Err(MrError::Corrupt { .. })),
                "prefix of {len} bytes was accepted"
            );
        }
    }

    // Proves flipping any byte is detected (tags, lengths, payload, trailer and checksum).
    #[test]
    fn every_byte_flip_is_detected() {
        let bytes = encode(&[
            (b"key".to_vec(), b"value".to_vec()),
            (b"k2".to_vec(), b"".to_vec()),
        ]);
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x41;
            assert!(
                matches!(decode(&damaged, 64), Err(MrError::Corrupt { .. })),
                "flip at byte {i} was accepted"
            );
        }
    }

    // Proves the specific failure modes produce the specific messages a user needs.
    #[test]
    fn errors_say_what_is_wrong() {
        assert!(corrupt_reason(decode(b"hello world", 64)).contains("bad magic"));
        let mut bytes = encode(&[(b"a".to_vec(), b"b".to_vec())]);
        bytes.push(0);
        assert!(corrupt_reason(decode(&bytes, 64)).contains("after the trailer"));
        let bytes = encode(&[(vec![b'x'; 100], vec![b'y'; 100])]);
        let mut reader = RecordReader::new(&bytes[..], Path::new("mem"), 0, 150, 64).unwrap();
        match reader.advance() {
            Err(MrError::Corrupt { reason, .. }) => assert!(reason.contains("record_bytes_max")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    // Proves a reduce task reads exactly its own records, in write order, from a file of
    // several blocks per reduce task, and a reduce task without records reads none.
    #[test]
    fn intermediate_file_round_trips_per_reduce_task() {
        let (records, bytes) = sample_file();
        for r in 0..4 {
            let expected: Records = records
                .iter()
                .filter(|(t, _, _)| *t == r)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(decode_file(&bytes, r).unwrap(), expected, "reduce task {r}");
        }
        let mut file = std::io::Cursor::new(&bytes[..]);
        let blocks = read_index(&mut file, Path::new("mem"), 0).unwrap();
        assert!(blocks.len() > 1, "small blocks: several per reduce task");
        assert!(
            read_index(&mut file, Path::new("mem"), 3)
                .unwrap()
                .is_empty()
        );
        let empty = encode_file(&Vec::new(), 2, 4096);
        assert_eq!(decode_file(&empty, 1).unwrap(), Vec::new());
    }

    // Proves truncation at every byte position fails every reduce task's read, never a panic.
    #[test]
    fn every_truncation_of_an_intermediate_file_is_detected() {
        let (_, bytes) = sample_file();
        for len in 0..bytes.len() {
            for r in 0..4 {
                assert!(
                    matches!(decode_file(&bytes[..len], r), Err(MrError::Corrupt { .. })),
                    "prefix of {len} bytes was accepted by reduce task {r}"
                );
            }
        }
    }

    // Proves flipping any byte of an intermediate file is detected: a byte of a block by the
    // block's reduce task, any other byte (index entries, slots, footer) by a reduce task that
    // depends on it. No byte goes unchecked.
    #[test]
    fn every_byte_flip_of_an_intermediate_file_is_detected() {
        let (_, bytes) = sample_file();
        let mut file = std::io::Cursor::new(&bytes[..]);
        let mut owner = vec![None; bytes.len()];
        for r in 0..4 {
            for block in read_index(&mut file, Path::new("mem"), r).unwrap() {
                let range = block.offset as usize..(block.offset + block.bytes) as usize;
                owner[range].fill(Some(r));
            }
        }
        for (i, owner) in owner.iter().enumerate() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x41;
            let detected_by: Vec<u32> = (0..4)
                .filter(|&r| matches!(decode_file(&damaged, r), Err(MrError::Corrupt { .. })))
                .collect();
            match owner {
                Some(r) => assert!(
                    detected_by.contains(r),
                    "flip at byte {i} (a block of reduce task {r}) detected by {detected_by:?}"
                ),
                None => assert!(!detected_by.is_empty(), "flip at byte {i} went unnoticed"),
            }
        }
    }

    // Proves a reduce task reads only its own part of the index: damage to another reduce
    // task's slot does not affect it (so reading costs its own blocks, not R × M entries).
    #[test]
    fn reduce_tasks_read_only_their_own_index_slot() {
        let (records, bytes) = sample_file();
        let slot_1 = bytes.len() - FOOTER_BYTES - 4 * SLOT_BYTES + SLOT_BYTES;
        let mut damaged = bytes.clone();
        damaged[slot_1 + 12] ^= 0x41;
        assert!(matches!(
            decode_file(&damaged, 1),
            Err(MrError::Corrupt { .. })
        ));
        for r in [0, 2] {
            let expected: Records = records
                .iter()
                .filter(|(t, _, _)| *t == r)
                .map(|(_, k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(decode_file(&damaged, r).unwrap(), expected);
        }
    }

    // Proves the index checks say what is wrong: a file of fewer reduce tasks, a footer that is
    // not one, and an error offset that points into the file.
    #[test]
    fn index_errors_say_what_is_wrong() {
        let (_, bytes) = sample_file();
        match decode_file(&bytes, 4) {
            Err(MrError::Corrupt { reason, .. }) => {
                assert!(reason.contains("4 reduce tasks"), "{reason}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let block = encode(&[(b"a".to_vec(), b"b".to_vec())]);
        match decode_file(&block, 0) {
            Err(MrError::Corrupt { reason, .. }) => assert!(reason.contains("index"), "{reason}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let mut damaged = bytes.clone();
        let inside = bytes.len() / 2;
        damaged[inside] ^= 0x41;
        let failure = (0..4).find_map(|r| match decode_file(&damaged, r) {
            Err(MrError::Corrupt { offset, .. }) => Some(offset),
            _ => None,
        });
        let offset = failure.expect("a reduce task notices the flip");
        assert!(offset > 0 && offset < bytes.len() as u64, "offset {offset}");
    }

    proptest! {
        // Proves any records round-trip through any buffer size, including records larger
        // than the buffer.
        #[test]
        fn records_round_trip(
            records in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..300),
                 proptest::collection::vec(any::<u8>(), 0..300)),
                0..40),
            buffer_bytes in 1usize..512,
        ) {
            let bytes = encode(&records);
            prop_assert_eq!(decode(&bytes, buffer_bytes).unwrap(), records);
        }

        // Proves any records of any reduce tasks round-trip through any block size.
        #[test]
        fn intermediate_files_round_trip(
            records in proptest::collection::vec(
                (0u32..4,
                 proptest::collection::vec(any::<u8>(), 0..100),
                 proptest::collection::vec(any::<u8>(), 0..100)),
                0..60),
            block_bytes in 1usize..400,
        ) {
            let bytes = encode_file(&records, 4, block_bytes);
            for r in 0..4 {
                let expected: Records = records
                    .iter()
                    .filter(|(t, _, _)| *t == r)
                    .map(|(_, k, v)| (k.clone(), v.clone()))
                    .collect();
                prop_assert_eq!(decode_file(&bytes, r).unwrap(), expected);
            }
        }

        // Proves arbitrary bytes read as an intermediate file are an error or records, never
        // a panic, a hang or a huge allocation.
        #[test]
        fn garbage_intermediate_files_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            footer in proptest::collection::vec(any::<u8>(), 16),
        ) {
            let mut file = bytes.clone();
            file.extend_from_slice(&footer);
            file.extend_from_slice(b"RKMRX\x01");
            for r in 0..3 {
                let _ = decode_file(&file, r);
            }
        }

        // Proves arbitrary garbage after a valid header is an error, never a panic or a hang.
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = b"RKMRI\x01".to_vec();
            bytes.extend_from_slice(&tail);
            let _ = decode(&bytes, 16);
        }
    }
}

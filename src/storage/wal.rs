//! The write-ahead-log engine ([`StoreEngine::Wal`](super::StoreEngine::Wal)):
//! every record in memory, every batch appended to a log file, one
//! `fdatasync` per flush.
//!
//! sled spends 250–500 µs per durable flush (its own writes and
//! `sync_file_range` per log buffer, then our `fdatasync` of its file);
//! appending one record to a preallocated file and `fdatasync`ing it takes
//! 130–200 µs on the same disk. A Raft node's durable state is small (the log
//! since the last snapshot, the hard state, the snapshot), so this engine keeps
//! all of it in memory — in a [`MemDisk`] image, read exactly like a
//! [`MemStore`](super::MemStore) — and makes it durable with a log of batches.
//!
//! # Files
//!
//! A directory holds:
//! - `raftkv-wal`: the marker naming this layout (written last when the
//!   directory is created, after the first segment; fsynced). Layout 2 adds
//!   the flush-start bit to layout 1; a writable open of a layout-1
//!   directory rewrites its marker first, so an older build refuses it;
//! - `LOCK`: held with `flock` while a store has the directory open;
//! - `wal-<seq>.log`: segments. Each is a run of records, one per applied
//!   batch, numbered by a sequence that goes on across segments; `<seq>` is
//!   the number of its first record. A record is `len u32 ‖ crc u32 ‖ seq u64
//!   ‖ payload` (little-endian; `crc = crc32(seq ‖ payload)`; the top bit of
//!   the stored `seq` marks the first record of a flush), the payload a
//!   run of operations (`1 ‖ key len u32 ‖ key ‖ value len u32 ‖ value` for a
//!   put, `2 ‖ key len u32 ‖ key` for a delete). Segments are written with
//!   zeros before use (by a thread of its own, one segment ahead: overwriting
//!   zeros is the cheapest write to sync); an all-zero header ends a segment.
//!   A flush that ends past the segment size (16 MiB, or a quarter of the
//!   checkpoint threshold) moves the log to the next segment.
//! - `wal-spare.tmp`: the next segment while it is being zero-filled.
//! - `image-<seq>.img`: a checkpoint, every record of the image after record
//!   `<seq>`: `magic ‖ seq u64 ‖ count u64 ‖ (key len u32 ‖ key ‖ value len
//!   u32 ‖ value)* ‖ crc32 of all before`. Written to a temporary name,
//!   fsynced, renamed, directory fsynced.
//!
//! # Checkpoints
//!
//! When the log moves to a new segment and the segments after the last image
//! hold [`StoreConfig::wal_checkpoint_bytes`] (and at least twice the last
//! image), the image is forked at the boundary (under the lock that orders
//! records, after everything before it was written and synced), and a thread
//! writes it as `image-<seq>`; once that file is durable the older segments
//! and images are deleted. A crash anywhere in between leaves either the old
//! image with all the segments after it or the new one: recovery reads the
//! newest image and replays every later segment.
//!
//! # Recovery
//!
//! Records must follow each other by sequence number across segments. A bad
//! record (checksum, length, sequence) in any but the newest segment is
//! [`StorageError::Corruption`]: those were synced before the next segment
//! was created. In the newest segment a bad record is a write torn by the
//! crash only if a sector-sized piece of it is still zeros (segments are
//! zero-filled, so a record that did not fully reach the disk has one; bit
//! rot does not — etcd's test) and no later flush follows it: flushes are
//! written one after another, each synced before the next starts, so a good
//! record marked as a flush's first (searched for at every offset after the
//! bad one) proves the bad record was synced, and is damage. A torn record
//! may be followed by good records of its own flush (a flush's sectors reach
//! the disk in any order). The log ends there (nothing after it was
//! acknowledged: each flush syncs all it wrote), and a writable open
//! truncates the segment there and zero-fills it again, so stale records
//! beyond the new end can never be replayed after later writes. Any other
//! bad record is `Corruption`, and the file is left as it is. What this
//! cannot tell apart: damage inside the last flush to a record that holds a
//! whole zero sector of its own (a value of zeros) looks like a torn write,
//! as in etcd.
//!
//! A store always has a segment after its newest image (the segment exists
//! before the image is written; a new directory gets segment 1 before its
//! marker): none is `Corruption`, not an empty log.
//!
//! An open without `create_if_missing` (`raftkv inspect`) repairs nothing,
//! deletes nothing, creates no file (not even `LOCK` when it is missing), and
//! every write to it fails: it is read-only.
//!
//! [`StoreConfig::wal_checkpoint_bytes`]: super::StoreConfig::wal_checkpoint_bytes

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::StorageError;
use super::engine::{Backend, BackendBatch};
use super::mem_store::{MemBackend, MemBatch, MemDisk};

/// The file that marks a directory as a write-ahead-log store.
pub(crate) const MARKER_FILE: &str = "raftkv-wal";
/// What the marker file says.
const MARKER_TEXT: &[u8] = b"raftkv write-ahead-log store, layout 2\n";
/// The marker of layout 1 (no flush-start bit), still read.
const MARKER_TEXT_LAYOUT_1: &[u8] = b"raftkv write-ahead-log store, layout 1\n";
/// The lock file.
const LOCK_FILE: &str = "LOCK";
/// Temporary files (incomplete images and segments) end with this.
const TMP_SUFFIX: &str = ".tmp";
/// Header of a record: payload length, crc, sequence number.
const RECORD_HEADER_BYTES: usize = 16;
/// The top bit of a record's stored sequence number: the record is the
/// first of its flush (sequence numbers stay below [`SEQ_MAX`]).
const FLUSH_START: u64 = 1 << 63;
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
/// First bytes of an image file.
const IMAGE_MAGIC: &[u8; 8] = b"RKVIMG\0\x01";
/// Size of a segment: the log moves to a new one once a flush ends past
/// this (so a segment grows past it only by one flush's records). A quarter
/// of the checkpoint threshold when that is smaller.
const SEGMENT_BYTES_MAX: u64 = 16 << 20;
/// A write buffer larger than this is freed after use, not kept.
const BUFFER_KEEP_BYTES_MAX: usize = 4 << 20;
/// The next segment, zero-filled ahead of time by a thread of its own.
const SPARE_SEGMENT: &str = "wal-spare.tmp";
/// Pause between attempts to take a held directory lock.
const LOCK_RETRY_INTERVAL_MS: u64 = 10;

fn segment_name(start: u64) -> String {
    format!("wal-{start:020}.log")
}

fn image_name(seq: u64) -> String {
    format!("image-{seq:020}.img")
}

/// The number in a file name `prefix<20 digits>suffix`.
fn parse_numbered(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The marker's temporary name: a directory holding only this is one a
/// crash interrupted while it was being created, and counts as empty.
pub(crate) const MARKER_TMP_FILE: &str = "raftkv-wal.tmp";

/// Whether `dir` holds a write-ahead-log store (its marker file).
pub(crate) fn is_wal_directory(dir: &Path) -> bool {
    dir.join(MARKER_FILE).is_file()
}

/// The files of a store directory that belong to the write-ahead-log layout.
pub(crate) fn is_wal_file(name: &str) -> bool {
    name == MARKER_FILE
        || name == LOCK_FILE
        || name.ends_with(TMP_SUFFIX)
        || parse_numbered(name, "wal-", ".log").is_some()
        || parse_numbered(name, "image-", ".img").is_some()
}

/// An I/O error on `path`, naming it ("Is a directory" alone does not say
/// which file).
fn at(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |error| {
        StorageError::Io(std::io::Error::new(
            error.kind(),
            format!("{}: {error}", path.display()),
        ))
    }
}

fn corrupt(file: &str, detail: impl Into<String>) -> StorageError {
    StorageError::Corruption {
        record: format!("write-ahead log file {file}"),
        detail: detail.into(),
    }
}

fn sync_directory(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes zeros over `from..to` of `file`. Overwriting written blocks is
/// the cheapest write to sync: no size, no extent changes (measured on ext4:
/// `pwrite` + `fdatasync` p50 145–185 µs into zeros, 200 µs into
/// `fallocate`d space, 210–280 µs appending).
fn fill_zeros(file: &File, from: u64, to: u64) -> Result<(), StorageError> {
    let chunk = PACE_BYTES.min(usize::try_from(to.saturating_sub(from)).unwrap_or(PACE_BYTES));
    let zeros = vec![0u8; chunk];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        write_out(file, at, n as u64)?;
        at += n as u64;
    }
    Ok(())
}

/// Background writes (zero-filling, images) go to the disk this many bytes
/// at a time: a log `fdatasync` running meanwhile then waits behind at most
/// this much of them, not behind a whole segment or image (measured: 100–150
/// ms stalls of the log every few seconds at 64 clients without pacing).
/// 256 KiB against 1 MiB, side by side at 64 clients (a segment's zeros
/// every second or so per node): p99 1.6–2.4 ms against 1.9–4.2 with
/// `--idle-poll 1ms` and 2.0–2.1 against 2.7–3.3 without, puts/s +2–17 %;
/// 64 KiB did no better than 256.
const PACE_BYTES: usize = 256 << 10;

/// Starts writing `len` bytes of `file` at `offset` to the disk and waits
/// until they are written, without the device cache flush of an `fsync`
/// (the final `sync_all` of the file does that once).
fn write_out(file: &File, offset: u64, len: u64) -> Result<(), StorageError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len),
        ) else {
            return Ok(());
        };
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: a plain system call on a descriptor we own.
        if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

/// A file written in order, sent to the disk every [`PACE_BYTES`].
struct PacedFile<'a> {
    file: &'a File,
    offset: u64,
    unsent_from: u64,
}

impl Write for PacedFile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        self.offset += n as u64;
        if self.offset - self.unsent_from >= PACE_BYTES as u64 {
            write_out(self.file, self.unsent_from, self.offset - self.unsent_from).map_err(
                |error| match error {
                    StorageError::Io(io) => io,
                    other => std::io::Error::other(other.to_string()),
                },
            )?;
            self.unsent_from = self.offset;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reserves `bytes` of zeros at the end of `file` (whose length is `len`)
/// at once, without writing them (the fallback when no zero-filled segment
/// is ready).
fn preallocate(file: &File, len: u64, bytes: u64) -> Result<(), StorageError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(bytes)) = (libc::off_t::try_from(len), libc::off_t::try_from(bytes))
        else {
            return Ok(());
        };
        // SAFETY: a plain system call on a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, bytes) };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(error.into());
        }
    }
    // No fallocate: a sparse extension still reads as zeros.
    file.set_len(len + bytes)?;
    Ok(())
}

/// Takes the directory's lock file, retrying while another holder goes away.
/// Without `create`, a missing lock file is left missing (no store ever
/// ran here with it, so none runs now): `None`.
fn lock_directory(dir: &Path, timeout_ms: u64, create: bool) -> Result<Option<File>, StorageError> {
    use std::os::fd::AsRawFd;
    // Read-only when the open is (`flock` needs no write access), so a copy
    // the user cannot write can still be inspected; and then shared (it
    // still excludes a writer, and NFS emulates an exclusive lock with one
    // that needs write access).
    let mode = if create { libc::LOCK_EX } else { libc::LOCK_SH };
    let path = dir.join(LOCK_FILE);
    let file = match OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) if !create && error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(at(&path)(error)),
    };
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        // SAFETY: a plain system call on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(file));
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(error.into());
        }
        if Instant::now() >= deadline {
            return Err(StorageError::Locked {
                path: dir.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(LOCK_RETRY_INTERVAL_MS));
    }
}

fn put_u32(buf: &mut Vec<u8>, n: usize) {
    // Lengths are bounded by `Limits` far below 4 GiB; checked by the caller.
    buf.extend_from_slice(&(n as u32).to_le_bytes());
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Appends one record for `batch` to `buf`, the records of the next flush:
/// the first one in `buf` is marked as a flush's first.
fn encode_record(buf: &mut Vec<u8>, seq: u64, batch: &MemBatch) -> Result<(), StorageError> {
    let start = buf.len();
    let stored_seq = if start == 0 { seq | FLUSH_START } else { seq };
    buf.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
    batch.for_each_write(|key, value| match value {
        Some(value) => {
            buf.push(OP_PUT);
            put_u32(buf, key.len());
            buf.extend_from_slice(key);
            put_u32(buf, value.len());
            buf.extend_from_slice(value);
        }
        None => {
            buf.push(OP_DELETE);
            put_u32(buf, key.len());
            buf.extend_from_slice(key);
        }
    });
    let payload_len = buf.len() - start - RECORD_HEADER_BYTES;
    let Ok(len) = u32::try_from(payload_len) else {
        buf.truncate(start);
        return Err(StorageError::LimitExceeded {
            what: "write-ahead log record",
            bytes: payload_len as u64,
            max: u64::from(u32::MAX),
        });
    };
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&stored_seq.to_le_bytes());
    hasher.update(&buf[start + RECORD_HEADER_BYTES..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&hasher.finalize().to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&stored_seq.to_le_bytes());
    Ok(())
}

/// What lies at an offset of a segment.
enum Read {
    /// A good record: its operations as a batch, and where the next starts.
    Record { batch: MemBatch, next: usize },
    /// Zeros (or the end of the file): the end of the log.
    End,
    /// Not a good record, and why.
    Bad(String),
}

/// Decodes the record at `at`, expected to be number `seq`.
fn read_record(bytes: &[u8], at: usize, seq: u64) -> Read {
    let rest = &bytes[at..];
    if rest.len() < RECORD_HEADER_BYTES {
        return if rest.iter().all(|&b| b == 0) {
            Read::End
        } else {
            Read::Bad(format!("a truncated record header at offset {at}"))
        };
    }
    let header = &rest[..RECORD_HEADER_BYTES];
    if header.iter().all(|&b| b == 0) {
        return Read::End;
    }
    let len = le_u32(header, 0) as usize;
    let crc = le_u32(header, 4);
    let stored_seq = le_u64(header, 8);
    if len > rest.len() - RECORD_HEADER_BYTES {
        return Read::Bad(format!(
            "the record at offset {at} claims {len} bytes, past the end of the file"
        ));
    }
    let payload = &rest[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    if !checksum_matches(stored_seq, payload, crc) {
        return Read::Bad(format!("the record at offset {at} fails its checksum"));
    }
    let found_seq = stored_seq & !FLUSH_START;
    if found_seq != seq {
        return Read::Bad(format!(
            "the record at offset {at} is number {found_seq}, expected {seq}"
        ));
    }
    match decode_ops(payload) {
        Some(batch) => Read::Record {
            batch,
            next: at + RECORD_HEADER_BYTES + len,
        },
        None => Read::Bad(format!(
            "the record at offset {at} has malformed operations"
        )),
    }
}

fn checksum_matches(stored_seq: u64, payload: &[u8], crc: u32) -> bool {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&stored_seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize() == crc
}

/// The first good record after the bad one at `at` (expected to be number
/// `seq`) that is the first of a later flush: its number and offset. Every
/// offset after the bad record's start is tried (its length may be the
/// damage, so its claimed extent proves nothing). A good record found on
/// the way (a number after `seq` that the bytes left could hold, a length
/// inside the file, a matching checksum) is the answer if it carries the
/// flush-start bit, and is skipped whole otherwise, so bytes inside a good
/// record's value are never taken for a record. (Bytes inside the bad
/// record itself can be: a value that embeds a well-formed later record
/// with the bit makes a torn write there look like damage, which refuses
/// the open rather than dropping anything.)
fn later_flush(bytes: &[u8], at: usize, seq: u64) -> Option<(u64, usize)> {
    let records_max = (bytes.len() - at) as u64 / RECORD_HEADER_BYTES as u64;
    let mut offset = at + 1;
    while offset + RECORD_HEADER_BYTES <= bytes.len() {
        let stored_seq = le_u64(bytes, offset + 8);
        let number = stored_seq & !FLUSH_START;
        let len = le_u32(bytes, offset) as usize;
        let good = number > seq
            && number - seq <= records_max
            && bytes
                .get(offset + RECORD_HEADER_BYTES..offset + RECORD_HEADER_BYTES + len)
                .is_some_and(|payload| {
                    checksum_matches(stored_seq, payload, le_u32(bytes, offset + 4))
                });
        if !good {
            offset += 1;
        } else if stored_seq & FLUSH_START != 0 {
            return Some((number, offset));
        } else {
            offset += RECORD_HEADER_BYTES + len;
        }
    }
    None
}

/// A record's operations as a batch (values copied out of the file buffer).
fn decode_ops(mut payload: &[u8]) -> Option<MemBatch> {
    fn take<'a>(payload: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if payload.len() < n {
            return None;
        }
        let (head, tail) = payload.split_at(n);
        *payload = tail;
        Some(head)
    }
    fn take_sized<'a>(payload: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = le_u32(take(payload, 4)?, 0) as usize;
        take(payload, len)
    }
    let mut batch = MemBatch::default();
    while !payload.is_empty() {
        let op = take(&mut payload, 1)?[0];
        let key = take_sized(&mut payload)?;
        match op {
            OP_PUT => {
                let value = take_sized(&mut payload)?;
                batch.put(key, value);
            }
            OP_DELETE => batch.delete(key),
            _ => return None,
        }
    }
    (batch.len() > 0).then_some(batch)
}

/// Writes `disk` as `image-<seq>.img` (temporary name, fsync, rename,
/// directory fsync); returns its size.
fn write_image(dir: &Path, seq: u64, disk: MemDisk) -> Result<u64, StorageError> {
    let name = image_name(seq);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let result = write_image_to(dir, &tmp, &name, seq, disk);
    if result.is_err() {
        // Do not leave a full-size temporary file behind (no space?).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_image_to(
    dir: &Path,
    tmp: &Path,
    name: &str,
    seq: u64,
    disk: MemDisk,
) -> Result<u64, StorageError> {
    let file = File::create(tmp)?;
    let paced = PacedFile {
        file: &file,
        offset: 0,
        unsent_from: 0,
    };
    let mut out = BufWriter::with_capacity(256 << 10, paced);
    let mut hasher = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut emit = |bytes: &[u8]| -> std::io::Result<()> {
        hasher.update(bytes);
        written += bytes.len() as u64;
        out.write_all(bytes)
    };
    let backend = MemBackend::on(disk);
    let mut count = 0u64;
    backend.scan(&[], &[u8::MAX], false, |_, _| {
        count += 1;
        Ok(true)
    })?;
    emit(IMAGE_MAGIC)?;
    emit(&seq.to_le_bytes())?;
    emit(&count.to_le_bytes())?;
    let mut io_result = Ok(());
    backend.scan(&[], &[u8::MAX], false, |key, value| {
        let mut head = [0u8; 4];
        head.copy_from_slice(&(key.len() as u32).to_le_bytes());
        io_result = emit(&head)
            .and_then(|()| emit(key))
            .and_then(|()| emit(&(value.len() as u32).to_le_bytes()))
            .and_then(|()| emit(&value));
        Ok(io_result.is_ok())
    })?;
    io_result?;
    let crc = hasher.finalize();
    out.write_all(&crc.to_le_bytes())?;
    out.flush()?;
    drop(out);
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, dir.join(name))?;
    sync_directory(dir)?;
    Ok(written + 4)
}

/// Reads `image-<seq>.img` into a fresh disk.
fn read_image(dir: &Path, seq: u64) -> Result<MemDisk, StorageError> {
    let name = image_name(seq);
    let path = dir.join(&name);
    let bytes = std::fs::read(&path).map_err(at(&path))?;
    let fixed = IMAGE_MAGIC.len() + 16;
    if bytes.len() < fixed + 4 || &bytes[..IMAGE_MAGIC.len()] != IMAGE_MAGIC {
        return Err(corrupt(&name, "not an image file (bad magic or too short)"));
    }
    let body = &bytes[..bytes.len() - 4];
    if crc32fast::hash(body) != le_u32(&bytes, bytes.len() - 4) {
        return Err(corrupt(&name, "the image fails its checksum"));
    }
    if le_u64(body, 8) != seq {
        return Err(corrupt(
            &name,
            "the image's sequence number differs from its name",
        ));
    }
    let count = le_u64(body, 16);
    let mut rest = &body[fixed..];
    let disk = MemDisk::new();
    let backend = MemBackend::on(disk.clone());
    let mut batch = MemBatch::default();
    let mut take = |n: usize| -> Result<&[u8], StorageError> {
        if rest.len() < n {
            return Err(corrupt(&name, "the image ends inside a record"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    for _ in 0..count {
        let klen = le_u32(take(4)?, 0) as usize;
        let key = take(klen)?;
        let vlen = le_u32(take(4)?, 0) as usize;
        let value = take(vlen)?;
        batch.put(key, value);
        if batch.len() >= 4096 {
            backend.apply(std::mem::take(&mut batch))?;
        }
    }
    if !rest.is_empty() {
        return Err(corrupt(&name, "bytes after the last record"));
    }
    if batch.len() > 0 {
        backend.apply(batch)?;
    }
    drop(backend);
    Ok(disk)
}

/// The write-ahead-log backend: reads from the in-memory image, writes go
/// to the image and to the log.
pub(crate) struct WalBackend {
    mem: MemBackend,
    wal: Arc<Wal>,
    /// The background flusher of `FlushMode::Background`.
    flusher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// The log, shared with the background flusher.
struct Wal {
    dir: PathBuf,
    /// The image (the same one `WalBackend::mem` writes), forked for images.
    disk: MemDisk,
    /// Records encoded and applied to the image but not yet written; the
    /// lock orders records and image changes alike.
    pending: Mutex<Pending>,
    /// Writes, syncs and checkpoints, one at a time.
    writer: Mutex<Writer>,
    /// Records up to this number are durable.
    durable_seq: AtomicU64,
    /// Set with `Writer::failed`: applies fail too (a background flusher's
    /// failure must not go unnoticed by commits).
    broken: AtomicBool,
    checkpoint_bytes_min: u64,
    /// Zero-filled size of a segment.
    segment_bytes: u64,
    /// The directory lock, released when the store is dropped.
    _lock: Option<File>,
}

struct Pending {
    buf: Vec<u8>,
    /// Number of the next record.
    next_seq: u64,
}

struct Writer {
    /// The newest segment; `None` in a read-only store (opened without
    /// `create_if_missing`), where every write fails.
    segment: Option<File>,
    /// Where the next record goes in `segment`.
    offset: u64,
    /// The log moves to a new segment once `offset` reaches this.
    move_at: u64,
    /// Bytes of records in the segments after the newest image.
    log_bytes: u64,
    /// Set once a write or sync failed: every later flush fails.
    failed: bool,
    /// The emptied buffer of the last write, reused.
    buffer: Vec<u8>,
    /// The thread writing the last checkpoint image, if it may still run.
    checkpoint: Option<JoinHandle<Result<u64, StorageError>>>,
    /// Size of the newest image.
    image_bytes: u64,
    /// The thread zero-filling the next segment ([`SPARE_SEGMENT`]).
    next_segment: Option<JoinHandle<Result<File, StorageError>>>,
}

/// The newest segment's state after replay.
struct Replayed {
    disk: MemDisk,
    next_seq: u64,
    image_bytes: u64,
    /// Bytes of records in the segments after the image.
    log_bytes: u64,
    /// The newest segment (its start and where its good records end), if any.
    last_segment: Option<(u64, u64)>,
}

impl WalBackend {
    /// Opens (or, when `create` and there is no marker, creates) the store in
    /// `dir`, which [`super::store`] checked holds nothing foreign.
    pub(crate) fn open(
        dir: &Path,
        create: bool,
        lock_timeout_ms: u64,
        checkpoint_bytes_min: u64,
        background_flush_ms: Option<u64>,
    ) -> Result<WalBackend, StorageError> {
        let mut creator_lock = None;
        if !is_wal_directory(dir) {
            if !create {
                return Err(StorageError::NotRaftkvDirectory {
                    path: dir.to_path_buf(),
                    reason: "no write-ahead-log marker".to_owned(),
                });
            }
            std::fs::create_dir_all(dir)?;
            // Under the lock: a second process opening the same new
            // directory waits (and gets `Locked`) instead of removing or
            // replacing this one's files.
            creator_lock = lock_directory(dir, lock_timeout_ms, true)?;
            if !is_wal_directory(dir) {
                // What an interrupted creation left (`is_interrupted_creation`).
                for leftover in [MARKER_TMP_FILE, SPARE_SEGMENT, &segment_name(1)] {
                    match std::fs::remove_file(dir.join(leftover)) {
                        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                            return Err(at(&dir.join(leftover))(error));
                        }
                        _ => {}
                    }
                }
                // The marker's temporary name first: a crash before the
                // rename leaves a directory `is_interrupted_creation`
                // recognizes.
                let tmp = write_marker_tmp(dir)?;
                zeroed_segment(dir, 1, segment_bytes_for(checkpoint_bytes_min))?;
                std::fs::rename(&tmp, dir.join(MARKER_FILE))?;
                sync_directory(dir)?;
            }
        }
        let marker_path = dir.join(MARKER_FILE);
        let marker = std::fs::read(&marker_path).map_err(at(&marker_path))?;
        if marker != MARKER_TEXT && marker != MARKER_TEXT_LAYOUT_1 {
            return Err(StorageError::NotRaftkvDirectory {
                path: dir.to_path_buf(),
                reason: "the write-ahead-log marker names an unknown layout".to_owned(),
            });
        }
        let lock = match creator_lock {
            Some(lock) => Some(lock),
            None => lock_directory(dir, lock_timeout_ms, create)?,
        };
        let replayed = replay(dir, create, marker == MARKER_TEXT_LAYOUT_1)?;
        let checkpoint_bytes_min = checkpoint_bytes_min.max(1);
        let segment_bytes = segment_bytes_for(checkpoint_bytes_min);
        let (segment, offset) = match replayed.last_segment {
            _ if !create => (None, 0),
            None => {
                // Layout 1 wrote its marker before the first segment: a
                // crash in between left none, an empty log.
                (
                    Some(zeroed_segment(dir, replayed.next_seq, segment_bytes)?),
                    0,
                )
            }
            Some((start, end)) => {
                let segment = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(segment_name(start)))?;
                let len = segment.metadata()?.len();
                if end < len {
                    // Zeros from here: nothing stale can follow a new record.
                    segment.set_len(end)?;
                    fill_zeros(&segment, end, len.min(end.max(segment_bytes)))?;
                    segment.sync_all()?;
                }
                (Some(segment), end)
            }
        };
        if create && marker != MARKER_TEXT {
            // Layout 1 → 2 before the first write (and after the segment a
            // layout-1 store may lack exists): records with the flush-start
            // bit would misread in an older build.
            let tmp = write_marker_tmp(dir)?;
            std::fs::rename(&tmp, dir.join(MARKER_FILE))?;
            sync_directory(dir)?;
        }
        let wal = Arc::new(Wal {
            dir: dir.to_path_buf(),
            disk: replayed.disk.clone(),
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                next_seq: replayed.next_seq,
            }),
            writer: Mutex::new(Writer {
                segment,
                offset,
                move_at: segment_bytes,
                log_bytes: replayed.log_bytes,
                failed: false,
                buffer: Vec::new(),
                checkpoint: None,
                image_bytes: replayed.image_bytes,
                next_segment: None,
            }),
            durable_seq: AtomicU64::new(replayed.next_seq - 1),
            broken: AtomicBool::new(false),
            checkpoint_bytes_min,
            segment_bytes,
            _lock: lock,
        });
        {
            let mut writer = wal.lock_writer();
            wal.prepare_next_segment(&mut writer);
        }
        let flusher = background_flush_ms.map(|every_ms| spawn_flusher(&wal, every_ms));
        Ok(WalBackend {
            mem: MemBackend::on(replayed.disk),
            wal,
            flusher,
        })
    }

    /// Bytes of the directory's files.
    pub(crate) fn size_on_disk(&self) -> Result<u64, StorageError> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.wal.dir)? {
            // A checkpoint may delete or rename files meanwhile.
            match entry?.metadata() {
                Ok(meta) if meta.is_file() => total += meta.len(),
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(total)
    }
}

fn spawn_flusher(wal: &Arc<Wal>, every_ms: u64) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let weak: Weak<Wal> = Arc::downgrade(wal);
    let stop_flag = stop.clone();
    let every = Duration::from_millis(every_ms.max(1));
    let handle = std::thread::Builder::new()
        .name("raftkv-wal-flush".into())
        .spawn(move || {
            while !stop_flag.load(Ordering::Acquire) {
                std::thread::park_timeout(every);
                let Some(wal) = weak.upgrade() else { return };
                if let Err(error) = wal.flush() {
                    tracing::error!(%error, "background flush of the write-ahead log failed");
                    return;
                }
            }
        })
        .expect("spawn the write-ahead-log flusher thread");
    (stop, handle)
}

/// Segment size for a checkpoint threshold: a checkpoint comes after four
/// segments or more.
fn segment_bytes_for(checkpoint_bytes_min: u64) -> u64 {
    (checkpoint_bytes_min.max(1) / 4).clamp(1, SEGMENT_BYTES_MAX)
}

/// Writes the current marker under its temporary name, synced.
fn write_marker_tmp(dir: &Path) -> Result<PathBuf, StorageError> {
    let tmp = dir.join(MARKER_TMP_FILE);
    let mut marker = File::create(&tmp)?;
    marker.write_all(MARKER_TEXT)?;
    marker.sync_all()?;
    Ok(tmp)
}

/// Whether a directory without a marker holding these names is one whose
/// creation a crash interrupted (or is still under way in another
/// process): `LOCK` alone, or the marker's temporary name with at most
/// `LOCK`, the first segment (zero-filled, never written: nothing is written
/// before the marker exists) and its spare. A creating open takes it for a
/// write-ahead-log store and, holding the lock, removes those files and
/// creates it again.
pub(crate) fn is_interrupted_creation(names: &[std::ffi::OsString]) -> bool {
    let first = segment_name(1);
    let only_lock = names.len() == 1 && names[0] == LOCK_FILE;
    only_lock
        || (names.iter().any(|name| name == MARKER_TMP_FILE)
            && names.iter().all(|name| {
                name == MARKER_TMP_FILE
                    || name == LOCK_FILE
                    || name == SPARE_SEGMENT
                    || *name == *first.as_str()
            }))
}

/// Creates (or empties) `path` and fills it with `bytes` zeros, synced.
fn zeroed_file(path: &Path, bytes: u64) -> Result<File, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    fill_zeros(&file, 0, bytes)?;
    file.sync_all()?;
    Ok(file)
}

/// Zero-fills a new segment `wal-<start>.log` of `bytes` now (through the
/// spare's name) and installs it.
fn zeroed_segment(dir: &Path, start: u64, bytes: u64) -> Result<File, StorageError> {
    let spare = dir.join(SPARE_SEGMENT);
    let file = zeroed_file(&spare, bytes)?;
    install_segment(dir, &spare, start, file)
}

/// Renames the prepared segment file at `prepared` to `wal-<start>.log`
/// and makes the name durable.
fn install_segment(
    dir: &Path,
    prepared: &Path,
    start: u64,
    file: File,
) -> Result<File, StorageError> {
    std::fs::rename(prepared, dir.join(segment_name(start)))?;
    sync_directory(dir)?;
    Ok(file)
}

/// Creates `wal-<start>.log` at once, its space reserved but not written:
/// the fallback when the zero-filled next segment is not ready.
fn create_segment(dir: &Path, start: u64, bytes: u64) -> Result<File, StorageError> {
    let name = segment_name(start);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    preallocate(&file, 0, bytes)?;
    file.sync_all()?;
    install_segment(dir, &tmp, start, file)
}

/// Loads the newest image and replays the segments after it.
/// Sector size assumed for torn writes: a sector is written whole or not.
const SECTOR_BYTES: usize = 512;

/// Whether the bad record at `at` looks like a write torn by a crash rather
/// than damage: segments are zero-filled before use, so a record that did
/// not fully reach the disk has a sector-sized piece still all zeros
/// (etcd's WAL uses the same test). Pieces under 8 bytes do not count
/// (record bytes may be zeros). A length past the end of the file is judged
/// on the header alone.
fn is_torn(bytes: &[u8], at: usize) -> bool {
    let header_end = (at + RECORD_HEADER_BYTES).min(bytes.len());
    let (end, piece_min) = if header_end - at < RECORD_HEADER_BYTES {
        (header_end, 1)
    } else {
        let len = le_u32(bytes, at) as usize;
        match (header_end + len <= bytes.len(), len) {
            (true, _) => (header_end + len, 8),
            (false, _) => (header_end, 1),
        }
    };
    let mut chunk = at - at % SECTOR_BYTES;
    while chunk < end {
        let lo = chunk.max(at);
        let hi = (chunk + SECTOR_BYTES).min(end);
        if hi - lo >= piece_min && bytes[lo..hi].iter().all(|&b| b == 0) {
            return true;
        }
        chunk += SECTOR_BYTES;
    }
    false
}

/// Records numbered from here on are refused: a sequence this high means a
/// damaged or forged file name (a store appends far fewer records).
const SEQ_MAX: u64 = u64::MAX / 2;

/// Loads the newest image and replays the segments after it. With
/// `repair`, deletes what crashes and checkpoints left behind (temporary
/// files, files an image made obsolete); without, touches nothing.
fn replay(dir: &Path, repair: bool, layout_1: bool) -> Result<Replayed, StorageError> {
    let mut images = Vec::new();
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_numbered(name, "image-", ".img") {
            images.push(seq);
        } else if let Some(start) = parse_numbered(name, "wal-", ".log") {
            segments.push(start);
        } else if name.ends_with(TMP_SUFFIX) && repair {
            // An image or segment a crash interrupted before its rename.
            std::fs::remove_file(dir.join(name))?;
        }
    }
    if let Some(&seq) = images.iter().chain(&segments).find(|&&seq| seq >= SEQ_MAX) {
        return Err(corrupt(
            &format!("numbered {seq}"),
            "a record number beyond any a store reaches",
        ));
    }
    images.sort_unstable();
    segments.sort_unstable();
    let (image_seq, disk, image_bytes) = match images.last() {
        Some(&seq) => {
            let size = std::fs::metadata(dir.join(image_name(seq)))?.len();
            (seq, read_image(dir, seq)?, size)
        }
        None => (0, MemDisk::new(), 0),
    };
    if repair {
        // Files a checkpoint made obsolete but a crash left behind.
        for &old in images.iter().filter(|&&seq| seq < image_seq) {
            std::fs::remove_file(dir.join(image_name(old)))?;
        }
        for &old in segments.iter().filter(|&&start| start <= image_seq) {
            std::fs::remove_file(dir.join(segment_name(old)))?;
        }
    }
    segments.retain(|&start| start > image_seq);
    // Layout 1 created its first segment after the marker, so a store of it
    // with neither image nor segment is one whose creation a crash cut short.
    if segments.is_empty() && !(layout_1 && image_seq == 0) {
        let whose = match image_seq {
            0 => "a store's first segment".to_owned(),
            seq => format!("the segment after {}", image_name(seq)),
        };
        return Err(corrupt(
            &segment_name(image_seq + 1),
            format!("missing: {whose} is created before anything is written"),
        ));
    }
    let backend = MemBackend::on(disk.clone());
    let mut next_seq = image_seq + 1;
    let mut last_segment = None;
    let mut log_bytes = 0;
    for (i, &start) in segments.iter().enumerate() {
        let name = segment_name(start);
        if start != next_seq {
            return Err(corrupt(
                &name,
                format!("starts at record {start}, but the log before it ends at {next_seq}"),
            ));
        }
        let path = dir.join(&name);
        let bytes = std::fs::read(&path).map_err(at(&path))?;
        let newest = i + 1 == segments.len();
        let mut at = 0;
        loop {
            match read_record(&bytes, at, next_seq) {
                Read::Record { batch, next } => {
                    backend.apply(batch)?;
                    next_seq += 1;
                    at = next;
                }
                Read::End => break,
                Read::Bad(detail) if newest && is_torn(&bytes, at) => {
                    if let Some((number, offset)) = later_flush(&bytes, at, next_seq) {
                        return Err(corrupt(
                            &name,
                            format!(
                                "{detail}; record {number} at offset {offset} starts a later \
                                 flush, so this one was synced: damage, not a torn write"
                            ),
                        ));
                    }
                    tracing::warn!(
                        file = %name,
                        %detail,
                        offset = at,
                        "the newest write-ahead-log segment ends in a torn write; its tail is dropped"
                    );
                    break;
                }
                Read::Bad(detail) => return Err(corrupt(&name, detail)),
            }
        }
        log_bytes += at as u64;
        if newest {
            last_segment = Some((start, at as u64));
        }
    }
    drop(backend);
    Ok(Replayed {
        disk,
        next_seq,
        image_bytes,
        log_bytes,
        last_segment,
    })
}

impl Wal {
    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .expect("invariant: a panic while holding the write-ahead-log buffer")
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer
            .lock()
            .expect("invariant: a panic while writing the write-ahead log")
    }

    /// Makes every record applied so far durable.
    fn flush(&self) -> Result<(), StorageError> {
        let target = self.lock_pending().next_seq - 1;
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let mut writer = self.lock_writer();
        if writer.failed {
            return Err(failed_error());
        }
        if self.durable_seq.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (buf, last) = self.take_pending(&mut writer, None);
        let result = self.write(&mut writer, buf, last);
        if let Err(error) = result {
            writer.failed = true;
            self.broken.store(true, Ordering::Release);
            return Err(error);
        }
        if writer.offset >= writer.move_at {
            self.next_segment(&mut writer)?;
        }
        Ok(())
    }

    /// Takes the pending records (from `pending`, the buffer's guard, when
    /// the caller holds it) and the number of the last one.
    fn take_pending(&self, writer: &mut Writer, pending: Option<&mut Pending>) -> (Vec<u8>, u64) {
        let mut buf = std::mem::take(&mut writer.buffer);
        let mut guard;
        let pending = match pending {
            Some(pending) => pending,
            None => {
                guard = self.lock_pending();
                &mut *guard
            }
        };
        std::mem::swap(&mut buf, &mut pending.buf);
        (buf, pending.next_seq - 1)
    }

    /// Writes `buf` (records up to number `last`) at the end of the segment
    /// and syncs it.
    fn write(&self, writer: &mut Writer, mut buf: Vec<u8>, last: u64) -> Result<(), StorageError> {
        if !buf.is_empty() {
            let Some(segment) = &writer.segment else {
                return Err(StorageError::Io(std::io::Error::other(
                    "the store was opened without create_if_missing: it is read-only",
                )));
            };
            segment.write_all_at(&buf, writer.offset)?;
            segment.sync_data()?;
            writer.offset += buf.len() as u64;
            writer.log_bytes += buf.len() as u64;
        }
        self.durable_seq.store(last, Ordering::Release);
        buf.clear();
        if buf.capacity() > BUFFER_KEEP_BYTES_MAX {
            // One large batch (a snapshot) must not pin its size for good.
            buf = Vec::new();
        }
        writer.buffer = buf;
        Ok(())
    }

    /// Moves the log to a new segment, with a checkpoint when the log after
    /// the last image has grown enough and no image is being written. Only
    /// a failed write of records is fatal: anything else (no space for the
    /// new segment, no thread) leaves the log in the current segment, which
    /// grows, and the move is tried again a segment later.
    fn next_segment(&self, writer: &mut Writer) -> Result<(), StorageError> {
        let idle = self.image_written(writer, false);
        let threshold = self.checkpoint_bytes_min.max(2 * writer.image_bytes);
        let checkpoint = idle && writer.log_bytes >= threshold;
        // The boundary: records before `start` go to the old segment, and the
        // fork (under the lock that orders records) holds exactly those.
        let (buf, start, image) = {
            let mut pending = self.lock_pending();
            let (buf, last) = self.take_pending(writer, Some(&mut pending));
            let image = checkpoint.then(|| self.disk.fork());
            (buf, last + 1, image)
        };
        if let Err(error) = self.write(writer, buf, start - 1) {
            writer.failed = true;
            self.broken.store(true, Ordering::Release);
            return Err(error);
        }
        match self.install_next_segment(writer, start) {
            Ok(file) => {
                writer.segment = Some(file);
                writer.offset = 0;
                writer.move_at = self.segment_bytes;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot start a new write-ahead-log segment; the current one grows");
                writer.move_at = writer.offset + self.segment_bytes;
                return Ok(());
            }
        }
        self.prepare_next_segment(writer);
        if let Some(image) = image {
            let seq = start - 1;
            let dir = self.dir.clone();
            let spawned = std::thread::Builder::new()
                .name("raftkv-wal-checkpoint".into())
                .spawn(move || {
                    let bytes = write_image(&dir, seq, image)?;
                    remove_older(&dir, seq)?;
                    tracing::debug!(seq, bytes, "write-ahead-log checkpoint written");
                    Ok(bytes)
                });
            match spawned {
                Ok(handle) => {
                    writer.checkpoint = Some(handle);
                    writer.log_bytes = 0;
                }
                Err(error) => tracing::warn!(%error, "cannot start the checkpoint thread"),
            }
        }
        Ok(())
    }

    /// The zero-filled spare renamed to `wal-<start>.log` when it is ready,
    /// else a new `fallocate`d file.
    fn install_next_segment(&self, writer: &mut Writer, start: u64) -> Result<File, StorageError> {
        let spare = match writer.next_segment.take() {
            Some(prepared) if prepared.is_finished() => match prepared.join() {
                Ok(Ok(file)) => Some(file),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "zero-filling the next write-ahead-log segment failed");
                    None
                }
                Err(_) => {
                    tracing::warn!("the write-ahead-log segment thread panicked");
                    None
                }
            },
            running => {
                // Still writing zeros: leave it for the next segment.
                writer.next_segment = running;
                None
            }
        };
        match spare {
            Some(file) => install_segment(&self.dir, &self.dir.join(SPARE_SEGMENT), start, file),
            None => create_segment(&self.dir, start, self.segment_bytes),
        }
    }

    /// Whether no image is being written (collecting the last one's result);
    /// with `wait`, waits for a running one first.
    fn image_written(&self, writer: &mut Writer, wait: bool) -> bool {
        match writer.checkpoint.take() {
            None => true,
            Some(running) if !wait && !running.is_finished() => {
                writer.checkpoint = Some(running);
                false
            }
            Some(done) => {
                match done.join() {
                    Ok(Ok(bytes)) => writer.image_bytes = bytes,
                    // The older image and its segments are all still there.
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "writing a write-ahead-log checkpoint failed; will retry");
                    }
                    Err(_) => tracing::warn!("the write-ahead-log checkpoint thread panicked"),
                }
                true
            }
        }
    }

    /// Starts zero-filling the next segment, unless that already runs (or
    /// the store is read-only).
    fn prepare_next_segment(&self, writer: &mut Writer) {
        if writer.next_segment.is_some() || writer.segment.is_none() {
            return;
        }
        let path = self.dir.join(SPARE_SEGMENT);
        let bytes = self.segment_bytes;
        match std::thread::Builder::new()
            .name("raftkv-wal-segment".into())
            .spawn(move || zeroed_file(&path, bytes))
        {
            Ok(handle) => writer.next_segment = Some(handle),
            // The next segment is then created without zeros.
            Err(error) => tracing::warn!(%error, "cannot start the segment thread"),
        }
    }

    /// Waits for the helper threads (a store being dropped).
    fn finish_threads(&self) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.image_written(&mut writer, true);
        if let Some(running) = writer.next_segment.take() {
            let _ = running.join();
            // Recovery would delete it too.
            let _ = std::fs::remove_file(self.dir.join(SPARE_SEGMENT));
        }
    }
}

fn failed_error() -> StorageError {
    StorageError::Io(std::io::Error::other(
        "an earlier write-ahead-log write failed; reopen the store",
    ))
}

/// Deletes the images before `seq` and the segments it covers.
fn remove_older(dir: &Path, seq: u64) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let obsolete = parse_numbered(name, "image-", ".img").is_some_and(|s| s < seq)
            || parse_numbered(name, "wal-", ".log").is_some_and(|start| start <= seq);
        if obsolete {
            std::fs::remove_file(dir.join(name))?;
        }
    }
    Ok(())
}

impl Drop for WalBackend {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.flusher.take() {
            stop.store(true, Ordering::Release);
            handle.thread().unpark();
            let _ = handle.join();
        }
        // Like sled, a dropped store writes what it has (a commit that was
        // acknowledged already flushed itself).
        if let Err(error) = self.wal.flush() {
            tracing::warn!(%error, "flushing the write-ahead log on close failed");
        }
        self.wal.finish_threads();
    }
}

impl Backend for WalBackend {
    type Value = Bytes;
    type Batch = MemBatch;

    fn new_batch(&self) -> MemBatch {
        self.mem.new_batch()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        self.mem.get(key)
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], Bytes) -> Result<bool, StorageError>,
    {
        self.mem.scan(lo, hi, reverse, visit)
    }

    fn is_empty(&self) -> Result<bool, StorageError> {
        self.mem.is_empty()
    }

    fn apply(&self, batch: MemBatch) -> Result<(), StorageError> {
        if batch.len() == 0 {
            return Ok(());
        }
        if self.wal.broken.load(Ordering::Acquire) {
            return Err(failed_error());
        }
        let mut pending = self.wal.lock_pending();
        let seq = pending.next_seq;
        encode_record(&mut pending.buf, seq, &batch)?;
        pending.next_seq += 1;
        // Under the same lock: the image changes in record order.
        self.mem.apply(batch)
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.wal.flush()
    }

    fn into_bytes(value: Bytes) -> Bytes {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::store::StoreBackend;
    use crate::storage::{KvStorage, Storage, Store, StoreConfig, StoreEngine, WriteBatch};

    /// The write-ahead-log backend of a wal store.
    fn wal_of(store: &Store) -> &WalBackend {
        match store.engine.backend() {
            StoreBackend::Wal(backend) => backend,
            StoreBackend::Sled(_) => panic!("a wal store"),
        }
    }

    fn config(checkpoint_bytes: u64) -> StoreConfig {
        StoreConfig {
            engine: StoreEngine::Wal,
            wal_checkpoint_bytes: checkpoint_bytes,
            ..StoreConfig::default()
        }
    }

    /// Puts `key` = a value of `value` repeated 32 times, version `version`.
    fn put(store: &Store, key: &str, value: u8, version: u64) {
        let mut batch = WriteBatch::new();
        batch.kv_put(0, key.to_owned(), vec![value; 32], version);
        store.commit(batch).expect("commit");
    }

    fn value(store: &Store, key: &str) -> Option<(u8, u64)> {
        store
            .kv_get(0, key.as_bytes())
            .expect("get")
            .map(|v| (v.value[0], v.version))
    }

    fn files(dir: &Path, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .filter(|name| name.starts_with(prefix))
            .collect();
        names.sort();
        names
    }

    /// Puts `key` = 600 bytes of `value`: a record longer than a sector.
    fn put_long(store: &Store, key: &str, value: u8, version: u64) {
        let mut batch = WriteBatch::new();
        batch.kv_put(0, key.to_owned(), vec![value; 600], version);
        store.commit(batch).expect("commit");
    }

    /// What a crash leaves of the record at `at` when only its first sector
    /// reached the disk: the rest of it still zeros.
    fn tear(bytes: &mut [u8], at: usize) {
        let end = at + RECORD_HEADER_BYTES + le_u32(bytes, at) as usize;
        let boundary = (at / SECTOR_BYTES + 1) * SECTOR_BYTES;
        assert!(boundary + 8 <= end, "the record crosses a sector boundary");
        bytes[boundary..end].fill(0);
    }

    /// The segment files.
    fn segments(dir: &Path) -> Vec<String> {
        let mut names = files(dir, "wal-");
        names.retain(|name| name.ends_with(".log"));
        names
    }

    /// Offsets of the records in a segment.
    fn record_offsets(bytes: &[u8]) -> Vec<usize> {
        let mut offsets = Vec::new();
        let mut at = 0;
        while at + RECORD_HEADER_BYTES <= bytes.len() && le_u32(bytes, at) != 0 {
            offsets.push(at);
            at += RECORD_HEADER_BYTES + le_u32(bytes, at) as usize;
        }
        offsets
    }

    #[test]
    fn records_survive_reopen_across_checkpoints() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(1024)).expect("open");
            for i in 0..300u64 {
                put(&store, &format!("k{}", i % 40), i as u8, i + 1);
            }
        }
        // The checkpoint threads finished when the store was dropped: one
        // image, the segments after it only.
        let images = files(dir.path(), "image-");
        assert_eq!(images.len(), 1, "{images:?}");
        let image_seq = parse_numbered(&images[0], "image-", ".img").expect("name");
        assert!(image_seq > 1);
        // The segments after it, numbered on from it; none it covers.
        let segments = files(dir.path(), "wal-");
        assert!(!segments.is_empty(), "{segments:?}");
        assert_eq!(segments[0], segment_name(image_seq + 1));
        assert!(!segments.iter().any(|name| name.ends_with(TMP_SUFFIX)));
        let store = Store::open_with(dir.path(), &config(1024)).expect("reopen");
        for k in 0..40u64 {
            let last = (0..300u64).filter(|i| i % 40 == k).max().expect("written");
            assert_eq!(
                value(&store, &format!("k{k}")),
                Some((last as u8, last + 1))
            );
        }
    }

    /// A config whose commits are flushed only when the store is dropped:
    /// everything committed while it is open goes out in one flush.
    fn one_flush_config() -> StoreConfig {
        StoreConfig {
            flush_mode: crate::storage::FlushMode::Background {
                every_ms: 3_600_000,
            },
            ..config(64 << 20)
        }
    }

    /// Whether the record at `at` carries the flush-start bit.
    fn starts_flush(bytes: &[u8], at: usize) -> bool {
        le_u64(bytes, at + 8) & FLUSH_START != 0
    }

    /// A torn write at the end of the newest segment drops that record and
    /// everything after it; the next record written there must not bring
    /// back the old records that followed (same lengths, valid checksums).
    #[test]
    fn a_torn_tail_is_cut_and_never_comes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            for i in 1..=2u8 {
                put_long(&store, "k", i, u64::from(i));
            }
        }
        {
            let store = Store::open_with(dir.path(), &one_flush_config()).expect("reopen");
            for i in 3..=5u8 {
                put_long(&store, "k", i, u64::from(i));
            }
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        let offsets = record_offsets(&bytes);
        assert_eq!(offsets.len(), 6, "the format marker and five puts");
        let starts: Vec<bool> = offsets.iter().map(|&at| starts_flush(&bytes, at)).collect();
        assert_eq!(
            starts,
            [true, true, true, true, false, false],
            "3..5 in one flush"
        );
        // The fourth record (version 3) torn; 4 and 5 made it to the disk
        // (the same flush, its pages written out of order).
        tear(&mut bytes, offsets[3]);
        std::fs::write(&segment, &bytes).expect("write");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("reopen");
            assert_eq!(value(&store, "k"), Some((2, 2)), "records 3..5 dropped");
            // Same length as the torn record: the old version 4 would follow it.
            put_long(&store, "k", 9, 3);
        }
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((9, 3)));
    }

    #[test]
    fn a_record_torn_after_its_first_sector_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            put_long(&store, "a", 1, 1);
            put_long(&store, "b", 2, 1);
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        let offsets = record_offsets(&bytes);
        tear(&mut bytes, offsets[2]);
        std::fs::write(&segment, &bytes).expect("write");
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("reopen");
        assert_eq!(value(&store, "a"), Some((1, 1)));
        assert_eq!(value(&store, "b"), None);
    }

    #[test]
    fn a_damaged_image_or_a_missing_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(512)).expect("open");
            for i in 0..100u64 {
                put(&store, "k", i as u8, i + 1);
            }
        }
        let image = dir.path().join(&files(dir.path(), "image-")[0]);
        let good = std::fs::read(&image).expect("read");
        let mut bad = good.clone();
        let middle = bad.len() / 2;
        bad[middle] ^= 1;
        std::fs::write(&image, &bad).expect("write");
        let error = Store::open_with(dir.path(), &config(512)).expect_err("damaged image");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. } if detail.contains("checksum")),
            "{error}"
        );
        // Without its image, the log after it has nothing to start from.
        std::fs::remove_file(&image).expect("remove");
        let error = Store::open_with(dir.path(), &config(512)).expect_err("missing image");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. } if detail.contains("starts at record")),
            "{error}"
        );
        std::fs::write(&image, &good).expect("restore");
        let store = Store::open_with(dir.path(), &config(512)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((99, 100)));
    }

    /// Only the newest segment may end in a torn write: the older ones were
    /// synced before the next was created, so damage there is corruption.
    #[test]
    fn damage_in_an_older_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // Segments of 1 KiB, a checkpoint after 4 KiB of log or more.
            let store = Store::open_with(dir.path(), &config(4096)).expect("open");
            for i in 0..200u64 {
                put(&store, "k", i as u8, i + 1);
            }
        }
        let segments: Vec<String> = files(dir.path(), "wal-");
        assert!(segments.len() >= 3, "{segments:?}");
        assert_eq!(files(dir.path(), "image-").len(), 1);
        let older = dir.path().join(&segments[segments.len() - 2]);
        let mut bytes = std::fs::read(&older).expect("read");
        let offsets = record_offsets(&bytes);
        bytes[offsets[offsets.len() - 1] + RECORD_HEADER_BYTES] ^= 0x40;
        std::fs::write(&older, &bytes).expect("write");
        let error = Store::open_with(dir.path(), &config(4096)).expect_err("corrupt");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. } if detail.contains("checksum")),
            "{error}"
        );
    }

    /// A crash in the middle of a second checkpoint: its new segment exists,
    /// its image is half-written under the temporary name. The first image
    /// and every segment after it still hold everything.
    #[test]
    fn an_interrupted_checkpoint_recovers_from_the_older_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
        let backend = wal_of(&store);
        // A checkpoint by hand: a new segment, then the image before it.
        let checkpoint = |complete: bool| {
            let mut writer = backend.wal.lock_writer();
            let pending = backend.wal.lock_pending();
            let next = pending.next_seq;
            let image = backend.wal.disk.fork();
            drop(pending);
            writer.segment = Some(create_segment(dir.path(), next, 4096).expect("segment"));
            writer.offset = 0;
            if complete {
                write_image(dir.path(), next - 1, image).expect("image");
                remove_older(dir.path(), next - 1).expect("remove");
            } else {
                let tmp = format!("{}{TMP_SUFFIX}", image_name(next - 1));
                std::fs::write(dir.path().join(tmp), b"half").expect("a half-written image");
            }
        };
        for i in 0..10u64 {
            put(&store, "k", i as u8, i + 1);
        }
        checkpoint(true);
        put(&store, "k", 50, 11);
        put(&store, "j", 51, 1);
        checkpoint(false);
        put(&store, "k", 77, 12);
        drop(store);
        assert_eq!(
            files(dir.path(), "image-").len(),
            2,
            "one image and a temporary one"
        );
        assert_eq!(segments(dir.path()).len(), 2);
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((77, 12)));
        assert_eq!(value(&store, "j"), Some((51, 1)));
        let images = files(dir.path(), "image-");
        assert_eq!(images.len(), 1, "the temporary image is gone: {images:?}");
        assert!(images[0].ends_with(".img"));
        assert_eq!(segments(dir.path()).len(), 2);
    }

    #[test]
    fn a_second_open_is_locked_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &config(1024)).expect("open");
        let config = StoreConfig {
            lock_timeout_ms: 20,
            ..config(1024)
        };
        let error = Store::open_with(dir.path(), &config).expect_err("locked");
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        drop(store);
        Store::open_with(dir.path(), &config).expect("free again");
    }

    #[test]
    fn a_store_keeps_its_engine_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(1024)).expect("open");
            put(&store, "k", 1, 1);
        }
        // Opened with the default (sled) config: still the wal engine.
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.engine(), StoreEngine::Wal);
        assert_eq!(value(&store, "k"), Some((1, 1)));
        drop(store);
        std::fs::write(dir.path().join("notes.txt"), b"mine").expect("write");
        let error = Store::open(dir.path()).expect_err("foreign file");
        assert!(
            matches!(error, StorageError::NotRaftkvDirectory { .. }),
            "{error}"
        );
    }

    #[test]
    fn background_flushes_make_commits_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            flush_mode: crate::storage::FlushMode::Background { every_ms: 1 },
            ..config(1024)
        };
        let store = Store::open_with(dir.path(), &config).expect("open");
        put(&store, "k", 5, 1);
        let backend = wal_of(&store);
        let deadline = Instant::now() + Duration::from_secs(10);
        while backend.wal.durable_seq.load(Ordering::Acquire) < 2 {
            assert!(
                Instant::now() < deadline,
                "the background flusher never flushed"
            );
            std::thread::park_timeout(Duration::from_millis(1));
        }
        drop(store);
        let store = Store::open_with(dir.path(), &config).expect("reopen");
        assert_eq!(value(&store, "k"), Some((5, 1)));
    }

    /// A flipped bit in an old record of the newest segment is no torn
    /// write (no zeroed sector): the open fails and the file keeps them all.
    #[test]
    fn a_bit_flip_in_the_newest_segment_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            for i in 1..=50u8 {
                put(&store, &format!("k{i}"), i, u64::from(i));
            }
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        let offsets = record_offsets(&bytes);
        assert_eq!(offsets.len(), 51);
        bytes[offsets[5] + RECORD_HEADER_BYTES + 3] ^= 0x01;
        std::fs::write(&segment, &bytes).expect("write");
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("corrupt");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. } if detail.contains("checksum")),
            "{error}"
        );
        let after = std::fs::read(&segment).expect("read");
        assert_eq!(record_offsets(&after).len(), 51, "nothing was cut");
    }

    /// Failing to start a new segment (no space, say) is not a failed write:
    /// the log stays in the current segment and every commit succeeds.
    #[test]
    fn a_segment_that_cannot_be_created_fails_no_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &config(1024)).expect("open");
        // Directories where the next segments and their temporary files go.
        let blockers: Vec<PathBuf> = (2..400u64)
            .flat_map(|n| {
                let name = segment_name(n);
                [
                    dir.path().join(&name),
                    dir.path().join(format!("{name}{TMP_SUFFIX}")),
                ]
            })
            .collect();
        for blocker in &blockers {
            std::fs::create_dir(blocker).expect("block");
        }
        for i in 0..200u64 {
            put(&store, "k", i as u8, i + 1);
        }
        assert_eq!(files(dir.path(), "image-").len(), 0);
        drop(store);
        for blocker in &blockers {
            std::fs::remove_dir(blocker).expect("unblock");
        }
        let store = Store::open_with(dir.path(), &config(1024)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((199, 200)));
    }

    /// A large flush (a snapshot) does not keep its buffer size for good.
    #[test]
    fn the_write_buffers_shrink_after_a_large_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &config(1 << 30)).expect("open");
        let mut batch = WriteBatch::new();
        batch.kv_put(0, "big".to_owned(), vec![7u8; 16 << 20], 1);
        store.commit(batch).expect("commit");
        for i in 0..10u64 {
            put(&store, "small", 1, i + 1);
        }
        let backend = wal_of(&store);
        let held =
            backend.wal.lock_pending().buf.capacity() + backend.wal.lock_writer().buffer.capacity();
        assert!(
            held < 1 << 20,
            "{held} bytes of buffer kept after the big flush"
        );
    }

    /// In background mode a failed flush fails the commits after it: none
    /// is accepted that can no longer become durable.
    #[test]
    fn a_failed_background_flush_fails_later_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            flush_mode: crate::storage::FlushMode::Background { every_ms: 1 },
            ..config(1 << 20)
        };
        let store = Store::open_with(dir.path(), &config).expect("open");
        put(&store, "k", 1, 1);
        let backend = wal_of(&store);
        {
            // A segment that cannot be written: every write fails (EBADF).
            let segment = dir.path().join(&segments(dir.path())[0]);
            let mut writer = backend.wal.lock_writer();
            writer.segment = Some(File::open(segment).expect("read-only handle"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut version = 2;
        loop {
            let mut batch = WriteBatch::new();
            batch.kv_put(0, "k".to_owned(), vec![2; 32], version);
            if store.commit(batch).is_err() {
                break;
            }
            assert!(Instant::now() < deadline, "commits kept succeeding");
            version += 1;
            std::thread::park_timeout(Duration::from_millis(1));
        }
        assert!(store.kv_get(0, b"k").is_err(), "the store is poisoned");
    }

    /// An open without `create_if_missing` (`raftkv inspect`) changes nothing.
    #[test]
    fn an_open_without_create_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(1 << 20)).expect("open");
            put(&store, "k", 3, 1);
        }
        std::fs::write(dir.path().join("image-00000000000000000007.img.tmp"), b"x").expect("tmp");
        let segment = dir.path().join(&segments(dir.path())[0]);
        // A torn tail a writable open would cut.
        let mut bytes = std::fs::read(&segment).expect("read");
        let end = record_offsets(&bytes)
            .last()
            .map(|&at| at + RECORD_HEADER_BYTES + le_u32(&bytes, at) as usize)
            .expect("records");
        // A header whose payload never reached the disk.
        bytes[end..end + 4].copy_from_slice(&600u32.to_le_bytes());
        bytes[end + 4..end + 8].copy_from_slice(&[1, 2, 3, 4]);
        std::fs::write(&segment, &bytes).expect("write");
        let listing = |dir: &Path| -> Vec<(String, u64)> {
            files(dir, "")
                .into_iter()
                .map(|name| {
                    let len = std::fs::metadata(dir.join(&name)).expect("meta").len();
                    (name, len)
                })
                .collect()
        };
        let before = listing(dir.path());
        let read_only = StoreConfig {
            create_if_missing: false,
            ..config(1 << 20)
        };
        let store = Store::open_with(dir.path(), &read_only).expect("open read-only");
        assert_eq!(value(&store, "k"), Some((3, 1)));
        let error = {
            let mut batch = WriteBatch::new();
            batch.kv_put(0, "k".to_owned(), vec![4; 32], 2);
            store.commit(batch).expect_err("read-only")
        };
        assert!(error.to_string().contains("read-only"), "{error}");
        drop(store);
        assert_eq!(listing(dir.path()), before);
        assert_eq!(std::fs::read(&segment).expect("read"), bytes);
    }

    /// Record numbers near `u64::MAX` in file names are refused, not wrapped.
    #[test]
    fn an_image_numbered_near_the_top_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(MARKER_FILE), MARKER_TEXT).expect("marker");
        let mut image = Vec::new();
        image.extend_from_slice(IMAGE_MAGIC);
        image.extend_from_slice(&u64::MAX.to_le_bytes());
        image.extend_from_slice(&0u64.to_le_bytes());
        let crc = crc32fast::hash(&image);
        image.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join(image_name(u64::MAX)), &image).expect("image");
        let error = Store::open_with(dir.path(), &config(1 << 20)).expect_err("refused");
        assert!(matches!(error, StorageError::Corruption { .. }), "{error}");
    }

    /// The WAL-damage case a torn-write test alone gets wrong: a flipped bit
    /// in a record that holds zero sectors of its own (a value of zeros)
    /// looks torn, but later flushes follow it, so it was synced: the open
    /// fails as corruption and the file keeps every record.
    #[test]
    fn damage_before_a_later_flush_is_corruption_even_with_zero_sectors() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            put_long(&store, "before", 7, 1);
            let mut batch = WriteBatch::new();
            batch.kv_put(0, "zeros".to_owned(), vec![0; 2048], 1);
            store.commit(batch).expect("commit");
            for i in 0..10u8 {
                put(&store, &format!("after{i}"), i, 1);
            }
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        let offsets = record_offsets(&bytes);
        assert_eq!(offsets.len(), 13);
        let zeros = offsets[2];
        assert!(
            is_torn(&bytes, zeros),
            "a zero sector of its own: looks torn"
        );
        bytes[zeros + 4] ^= 0x01; // the checksum
        std::fs::write(&segment, &bytes).expect("write");
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("corrupt");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. }
                if detail.contains("checksum") && detail.contains("later flush")),
            "{error}"
        );
        assert_eq!(
            std::fs::read(&segment).expect("read"),
            bytes,
            "nothing was cut"
        );
        // The bad record's length damaged as well: found by trying every offset.
        bytes[zeros] ^= 0x10;
        std::fs::write(&segment, &bytes).expect("write");
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("corrupt");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. } if detail.contains("later flush")),
            "{error}"
        );
    }

    /// A value that embeds a well-formed record marked as a flush's first,
    /// in a good record of the torn write's own flush, is not taken for a
    /// later flush: good records are skipped whole.
    #[test]
    fn a_record_inside_a_value_is_not_taken_for_a_later_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            put_long(&store, "k", 1, 1);
        }
        // The forged record: number 5 (the torn one will be 3), flush start.
        let payload = b"forged".to_vec();
        let stored_seq = 5 | FLUSH_START;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&stored_seq.to_le_bytes());
        hasher.update(&payload);
        let mut forged = Vec::new();
        forged.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        forged.extend_from_slice(&hasher.finalize().to_le_bytes());
        forged.extend_from_slice(&stored_seq.to_le_bytes());
        forged.extend_from_slice(&payload);
        {
            let store = Store::open_with(dir.path(), &one_flush_config()).expect("reopen");
            put_long(&store, "k", 2, 2);
            let mut batch = WriteBatch::new();
            batch.kv_put(0, "v".to_owned(), forged, 1);
            store.commit(batch).expect("commit");
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        let offsets = record_offsets(&bytes);
        assert_eq!(offsets.len(), 4, "the format marker, two puts, the value");
        assert!(starts_flush(&bytes, offsets[2]) && !starts_flush(&bytes, offsets[3]));
        tear(&mut bytes, offsets[2]);
        std::fs::write(&segment, &bytes).expect("write");
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("a torn tail");
        assert_eq!(value(&store, "k"), Some((1, 1)));
    }

    /// A store's segments can vanish; the newest image (or the store's
    /// creation) proves that one must exist, so none is corruption, never an
    /// empty log.
    #[test]
    fn a_store_without_its_first_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            put(&store, "k", 1, 1);
        }
        for name in segments(dir.path()) {
            std::fs::remove_file(dir.path().join(name)).expect("remove");
        }
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("no segment");
        assert!(
            matches!(&error, StorageError::Corruption { record, detail }
                if record.contains(&segment_name(1)) && detail.contains("missing")),
            "{error}"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(512)).expect("open");
            for i in 0..100u64 {
                put(&store, "k", i as u8, i + 1);
            }
        }
        let images = files(dir.path(), "image-");
        assert_eq!(images.len(), 1);
        for name in segments(dir.path()) {
            std::fs::remove_file(dir.path().join(name)).expect("remove");
        }
        let error = Store::open_with(dir.path(), &config(512)).expect_err("no segment");
        assert!(
            matches!(&error, StorageError::Corruption { detail, .. }
                if detail.contains("missing") && detail.contains(&images[0])),
            "{error}"
        );
    }

    /// Rewrites a segment as layout 1 wrote it: no flush-start bits.
    fn as_layout_1(bytes: &mut [u8]) {
        for at in record_offsets(bytes) {
            let seq = le_u64(bytes, at + 8) & !FLUSH_START;
            let len = le_u32(bytes, at) as usize;
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&seq.to_le_bytes());
            hasher.update(&bytes[at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + len]);
            bytes[at + 4..at + 8].copy_from_slice(&hasher.finalize().to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&seq.to_le_bytes());
        }
    }

    /// A layout-1 directory (no flush-start bits) is read as it is; a
    /// read-only open leaves its marker, a writable one moves it to layout 2
    /// before writing records with the bit; an unknown layout is refused.
    #[test]
    fn a_layout_1_directory_is_read_and_upgraded_by_a_writable_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            for i in 1..=3u8 {
                put(&store, &format!("k{i}"), i, 1);
            }
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&segment).expect("read");
        as_layout_1(&mut bytes);
        std::fs::write(&segment, &bytes).expect("write");
        let marker = dir.path().join(MARKER_FILE);
        std::fs::write(&marker, MARKER_TEXT_LAYOUT_1).expect("marker");
        let read_only = StoreConfig {
            create_if_missing: false,
            ..config(64 << 20)
        };
        {
            let store = Store::open_with(dir.path(), &read_only).expect("read-only");
            assert_eq!(value(&store, "k3"), Some((3, 1)));
        }
        assert_eq!(
            std::fs::read(&marker).expect("marker"),
            MARKER_TEXT_LAYOUT_1
        );
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("writable");
            assert_eq!(std::fs::read(&marker).expect("marker"), MARKER_TEXT);
            put(&store, "k4", 4, 1);
        }
        let store = Store::open_with(dir.path(), &config(64 << 20)).expect("reopen");
        for i in 1..=4u8 {
            assert_eq!(value(&store, &format!("k{i}")), Some((i, 1)));
        }
        drop(store);
        std::fs::write(&marker, b"raftkv write-ahead-log store, layout 3\n").expect("marker");
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("layout 3");
        assert!(
            matches!(error, StorageError::NotRaftkvDirectory { ref reason, .. } if reason.contains("unknown layout")),
            "{error}"
        );
    }

    /// Layout 1 wrote its marker before its first segment: a crash in
    /// between left a marker and no segment, which still opens as an empty
    /// store and gets its segment, then layout 2.
    #[test]
    fn a_layout_1_marker_without_a_segment_is_an_empty_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(MARKER_FILE), MARKER_TEXT_LAYOUT_1).expect("marker");
        let read_only = StoreConfig {
            create_if_missing: false,
            ..config(1 << 20)
        };
        // Not corruption: the store is merely empty (which a read-only open
        // reports as such).
        let error = Store::open_with(dir.path(), &read_only).expect_err("empty");
        assert!(
            matches!(&error, StorageError::NotRaftkvDirectory { reason, .. } if reason.contains("empty")),
            "{error}"
        );
        assert!(
            segments(dir.path()).is_empty(),
            "a read-only open creates nothing"
        );
        {
            let store = Store::open_with(dir.path(), &config(1 << 20)).expect("writable");
            put(&store, "k", 1, 1);
        }
        assert_eq!(segments(dir.path()), [segment_name(1)]);
        let marker = std::fs::read(dir.path().join(MARKER_FILE)).expect("marker");
        assert_eq!(marker, MARKER_TEXT);
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((1, 1)));
    }

    /// A creation interrupted after the first segment but before the
    /// marker's rename (or right after taking the lock) counts as empty; a
    /// segment without the marker's temporary file beside it is someone's
    /// data and is refused.
    #[test]
    fn an_interrupted_creation_is_created_again_but_a_lone_segment_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(MARKER_TMP_FILE), MARKER_TEXT).expect("marker tmp");
        std::fs::write(dir.path().join(segment_name(1)), vec![0; 4096]).expect("segment");
        std::fs::write(dir.path().join(SPARE_SEGMENT), vec![0; 4096]).expect("spare");
        std::fs::write(dir.path().join(LOCK_FILE), b"").expect("lock file");
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("open");
        put(&store, "k", 1, 1);
        drop(store);
        assert!(!dir.path().join(MARKER_TMP_FILE).exists());
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((1, 1)));
        drop(store);
        // A lock file alone: a creation cut short right after taking the lock.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCK_FILE), b"").expect("lock file");
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("open");
        put(&store, "k", 2, 1);
        drop(store);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(segment_name(1)), vec![1; 64]).expect("segment");
        let error = Store::open_with(dir.path(), &config(1 << 20)).expect_err("not ours");
        assert!(
            matches!(error, StorageError::NotRaftkvDirectory { .. }),
            "{error}"
        );
        assert!(dir.path().join(segment_name(1)).exists());
    }

    /// An I/O error on one of the store's files names the file.
    #[test]
    fn an_io_error_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open_with(dir.path(), &config(64 << 20)).expect("open");
            put(&store, "k", 1, 1);
        }
        let segment = dir.path().join(&segments(dir.path())[0]);
        std::fs::remove_file(&segment).expect("remove");
        std::fs::create_dir(&segment).expect("a directory in its place");
        let error = Store::open_with(dir.path(), &config(64 << 20)).expect_err("a directory");
        let text = error.to_string();
        assert!(
            matches!(error, StorageError::Io(_)) && text.contains(&segments(dir.path())[0]),
            "{text}"
        );
    }

    /// A second creating open of a directory another store holds (here,
    /// one whose marker is not there yet, as in the middle of a creation)
    /// waits for the lock and gets `Locked`: it neither removes nor
    /// replaces the other's files.
    #[test]
    fn a_second_creator_is_locked_out_and_touches_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("open");
        put(&store, "k", 1, 1);
        let marker = dir.path().join(MARKER_FILE);
        std::fs::rename(&marker, dir.path().join(MARKER_TMP_FILE)).expect("as if mid-creation");
        let segment = std::fs::read(dir.path().join(segment_name(1))).expect("segment");
        let quick = StoreConfig {
            lock_timeout_ms: 20,
            ..config(1 << 20)
        };
        let error = Store::open_with(dir.path(), &quick).expect_err("locked");
        assert!(matches!(error, StorageError::Locked { .. }), "{error}");
        assert!(dir.path().join(MARKER_TMP_FILE).exists());
        assert_eq!(
            std::fs::read(dir.path().join(segment_name(1))).expect("segment"),
            segment
        );
        std::fs::rename(dir.path().join(MARKER_TMP_FILE), &marker).expect("back");
        drop(store);
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("reopen");
        assert_eq!(value(&store, "k"), Some((1, 1)));
    }

    /// A crash while the marker was being written leaves a directory that a
    /// creating open treats as empty.
    #[test]
    fn a_directory_with_only_the_marker_being_written_is_created_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(MARKER_TMP_FILE), b"raftkv wr").expect("half a marker");
        let store = Store::open_with(dir.path(), &config(1 << 20)).expect("open");
        put(&store, "k", 1, 1);
        assert!(!dir.path().join(MARKER_TMP_FILE).exists());
    }
}

//! The binary format of intermediate files and reduce spill runs.
//!
//! ```text
//! file    := header record* trailer
//! header  := "RKMRI" version:u8 (= 1)
//! record  := 0x01 key_len:varint value_len:varint key value
//! trailer := 0x00 records:u64le crc:u32le
//! ```
//!
//! Lengths are unsigned LEB128 of at most 5 bytes (u32). `records` counts the records and `crc`
//! is the CRC-32 (IEEE) of every byte between the header and the trailer. A file without a valid
//! trailer is truncated; a reader reports any violation as [`MrError::Corrupt`] and never
//! panics. The CRC is only known at the end, so a consumer must not publish anything derived
//! from a file before reading it to the end (reduce reads all its inputs before writing output).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::error::MrError;

const MAGIC: &[u8; 5] = b"RKMRI";
const VERSION: u8 = 1;
const HEADER_BYTES: usize = 6;
const TAG_RECORD: u8 = 1;
const TAG_TRAILER: u8 = 0;
const TRAILER_BYTES: usize = 1 + 8 + 4;
const VARINT_BYTES_MAX: usize = 5;

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

/// Writes records in the intermediate format to `W` (normally a `BufWriter<File>`).
pub(crate) struct RecordWriter<W: Write> {
    inner: W,
    path: PathBuf,
    crc: crc32fast::Hasher,
    records: u64,
    bytes: u64,
}

impl<W: Write> RecordWriter<W> {
    /// Starts a file by writing its header. `path` names the file in errors.
    pub(crate) fn new(mut inner: W, path: &Path) -> Result<Self, MrError> {
        let mut header = [0u8; HEADER_BYTES];
        header[..5].copy_from_slice(MAGIC);
        header[5] = VERSION;
        inner
            .write_all(&header)
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
        let key_len = u32::try_from(key.len()).map_err(|_| MrError::RecordTooLarge {
            key_bytes: key.len(),
            value_bytes: value.len(),
            max: u32::MAX as usize,
        })?;
        let value_len = u32::try_from(value.len()).map_err(|_| MrError::RecordTooLarge {
            key_bytes: key.len(),
            value_bytes: value.len(),
            max: u32::MAX as usize,
        })?;
        let mut head = [0u8; 1 + 2 * VARINT_BYTES_MAX];
        head[0] = TAG_RECORD;
        let mut varint = [0u8; VARINT_BYTES_MAX];
        let n = encode_varint(key_len, &mut varint);
        head[1..1 + n].copy_from_slice(&varint[..n]);
        let m = encode_varint(value_len, &mut varint);
        head[1 + n..1 + n + m].copy_from_slice(&varint[..m]);
        let head = &head[..1 + n + m];
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

    /// Number of records written so far.
    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    /// Writes the trailer, flushes, and returns the inner writer and the file's total size.
    pub(crate) fn finish(mut self) -> Result<(W, u64), MrError> {
        let mut trailer = [0u8; TRAILER_BYTES];
        trailer[0] = TAG_TRAILER;
        trailer[1..9].copy_from_slice(&self.records.to_le_bytes());
        trailer[9..13].copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
        let path = &self.path;
        let io = |e| MrError::io("write intermediate file", path, e);
        self.inner.write_all(&trailer).map_err(io)?;
        self.inner.flush().map_err(io)?;
        Ok((self.inner, self.bytes + TRAILER_BYTES as u64))
    }
}

/// Reads records in the intermediate format, validating everything.
pub(crate) struct RecordReader<R: Read = File> {
    inner: R,
    path: PathBuf,
    /// Unconsumed bytes are `buf[start..end]`; `buf.len()` is the buffer's size.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
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

impl RecordReader<File> {
    /// Opens `path` for reading.
    pub(crate) fn open(
        path: &Path,
        record_bytes_max: usize,
        buffer_bytes: usize,
    ) -> Result<Self, MrError> {
        let file = File::open(path).map_err(|e| MrError::io("open intermediate file", path, e))?;
        RecordReader::new(file, path, record_bytes_max, buffer_bytes)
    }
}

impl<R: Read> RecordReader<R> {
    /// Reads from `inner` (positioned at the header); `path` names it in errors.
    pub(crate) fn new(
        inner: R,
        path: &Path,
        record_bytes_max: usize,
        buffer_bytes: usize,
    ) -> Result<Self, MrError> {
        let mut reader = RecordReader {
            inner,
            path: path.to_path_buf(),
            buf: vec![0; buffer_bytes.max(64)],
            start: 0,
            end: 0,
            offset: 0,
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

    /// Number of bytes consumed so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        self.offset
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
        let mut reader = RecordReader::new(bytes, Path::new("mem"), 1 << 20, buffer_bytes)?;
        let mut out = Vec::new();
        while reader.advance()? {
            out.push((reader.key().to_vec(), reader.value().to_vec()));
        }
        assert!(!reader.advance()?, "advance after the end stays at the end");
        Ok(out)
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
        let mut reader = RecordReader::new(&bytes[..], Path::new("mem"), 150, 64).unwrap();
        match reader.advance() {
            Err(MrError::Corrupt { reason, .. }) => assert!(reason.contains("record_bytes_max")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
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

        // Proves arbitrary garbage after a valid header is an error, never a panic or a hang.
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = b"RKMRI\x01".to_vec();
            bytes.extend_from_slice(&tail);
            let _ = decode(&bytes, 16);
        }
    }
}

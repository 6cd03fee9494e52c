//! The on-disk format: key layout and record encoding.
//!
//! All records live in sled's default tree, so one `apply_batch` covers any
//! mix of them atomically. The first key byte is a tag; integers in keys are
//! big-endian so that sled's byte order is numeric order.
//!
//! | tag    | key after the tag           | value payload                          |
//! |--------|-----------------------------|----------------------------------------|
//! | `0x00` | `"format"`                  | magic `RAFTKV\0\0`, version u32        |
//! | `0x10` | group u64                   | hard state: term u64, voted tag u8, node u64 |
//! | `0x11` | group u64                   | log base: index u64, term u64          |
//! | `0x12` | group u64                   | snapshot meta: index u64, term u64, data length u64 |
//! | `0x13` | group u64, index u64        | entry: term u64, kind u8, data         |
//! | `0x14` | group u64                   | snapshot data: index u64, term u64, data |
//! | `0x20` | namespace u64               | applied index u64                      |
//! | `0x21` | namespace u64, key bytes    | version u64, value                     |
//! | `0x30` | key bytes                   | value                                  |
//!
//! Every value is `payload || crc32(key || payload)` (crc little-endian), so a
//! flipped bit, a truncated value or a value moved under another key is
//! detected. Integers in payloads are big-endian.

use super::{GroupId, StateMachineId, StorageError};
use crate::raft::{EntryKind, HardState, SnapshotMeta};

pub(crate) const TAG_META: u8 = 0x00;
pub(crate) const TAG_HARD_STATE: u8 = 0x10;
pub(crate) const TAG_LOG_BASE: u8 = 0x11;
pub(crate) const TAG_SNAPSHOT_META: u8 = 0x12;
pub(crate) const TAG_ENTRY: u8 = 0x13;
pub(crate) const TAG_SNAPSHOT_DATA: u8 = 0x14;
pub(crate) const TAG_KV_APPLIED: u8 = 0x20;
pub(crate) const TAG_KV_ENTRY: u8 = 0x21;
pub(crate) const TAG_MR: u8 = 0x30;

pub(crate) const FORMAT_KEY: &[u8] = b"\x00format";
pub(crate) const MAGIC: &[u8; 8] = b"RAFTKV\0\0";
pub(crate) const CRC_BYTES: usize = 4;
/// Bytes of an entry payload before its data: term and kind.
pub(crate) const ENTRY_HEADER_BYTES: usize = 9;

/// Key of a per-group record (`tag` is one of the group tags).
pub(crate) fn group_key(tag: u8, group: GroupId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = tag;
    key[1..9].copy_from_slice(&group.to_be_bytes());
    key
}

/// Key of the log entry `index` of `group`.
pub(crate) fn entry_key(group: GroupId, index: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = TAG_ENTRY;
    key[1..9].copy_from_slice(&group.to_be_bytes());
    key[9..17].copy_from_slice(&index.to_be_bytes());
    key
}

/// Key of the applied-index record of a namespace.
pub(crate) fn applied_key(ns: StateMachineId) -> [u8; 9] {
    group_key(TAG_KV_APPLIED, ns)
}

/// Prefix of all KV keys of a namespace.
pub(crate) fn kv_prefix(ns: StateMachineId) -> [u8; 9] {
    group_key(TAG_KV_ENTRY, ns)
}

/// Key of a KV record.
pub(crate) fn kv_key(ns: StateMachineId, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(9 + key.len());
    full.extend_from_slice(&kv_prefix(ns));
    full.extend_from_slice(key);
    full
}

/// Key of a MapReduce record.
pub(crate) fn mr_key(key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(1 + key.len());
    full.push(TAG_MR);
    full.extend_from_slice(key);
    full
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when there is none (the prefix is empty or all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Reads a big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(buf)
}

/// A human-readable name of the record stored under `key`, for errors and tools.
pub(crate) fn record_name(key: &[u8]) -> String {
    let group_or_ns = || (key.len() >= 9).then(|| be_u64(key, 1));
    match (key.first(), group_or_ns()) {
        (Some(&TAG_META), _) => "format marker".to_owned(),
        (Some(&TAG_HARD_STATE), Some(g)) if key.len() == 9 => format!("raft group {g} hard state"),
        (Some(&TAG_LOG_BASE), Some(g)) if key.len() == 9 => format!("raft group {g} log base"),
        (Some(&TAG_SNAPSHOT_META), Some(g)) if key.len() == 9 => {
            format!("raft group {g} snapshot meta")
        }
        (Some(&TAG_SNAPSHOT_DATA), Some(g)) if key.len() == 9 => {
            format!("raft group {g} snapshot data")
        }
        (Some(&TAG_ENTRY), Some(g)) if key.len() == 17 => {
            format!("raft group {g} entry {}", be_u64(key, 9))
        }
        (Some(&TAG_KV_APPLIED), Some(ns)) if key.len() == 9 => {
            format!("kv namespace {ns} applied index")
        }
        (Some(&TAG_KV_ENTRY), Some(ns)) => {
            format!("kv namespace {ns} key \"{}\"", key[9..].escape_ascii())
        }
        (Some(&TAG_MR), _) => format!("mapreduce record \"{}\"", key[1..].escape_ascii()),
        _ => format!("unknown key \"{}\"", key.escape_ascii()),
    }
}

/// A corruption error for the record under `key`.
pub(crate) fn corruption(key: &[u8], detail: impl Into<String>) -> StorageError {
    StorageError::Corruption {
        record: record_name(key),
        detail: detail.into(),
    }
}

/// Appends the checksum of `key || payload` to `buf`, which holds the payload.
pub(crate) fn seal(key: &[u8], buf: &mut Vec<u8>) {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(buf);
    let crc = hasher.finalize();
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Checks the checksum of a stored value and returns its payload.
pub(crate) fn unseal<'a>(key: &[u8], value: &'a [u8]) -> Result<&'a [u8], StorageError> {
    if value.len() < CRC_BYTES {
        return Err(corruption(
            key,
            format!("value is {} bytes, shorter than its checksum", value.len()),
        ));
    }
    let (payload, stored) = value.split_at(value.len() - CRC_BYTES);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    let computed = hasher.finalize();
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    if computed != stored {
        return Err(corruption(
            key,
            format!("checksum mismatch (stored {stored:08x}, computed {computed:08x})"),
        ));
    }
    Ok(payload)
}

/// Checks that a payload has exactly `expected` bytes.
fn expect_len(key: &[u8], payload: &[u8], expected: usize) -> Result<(), StorageError> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(corruption(
            key,
            format!("payload is {} bytes, expected {expected}", payload.len()),
        ))
    }
}

/// Checks that a payload has at least `expected` bytes.
fn expect_min_len(key: &[u8], payload: &[u8], expected: usize) -> Result<(), StorageError> {
    if payload.len() >= expected {
        Ok(())
    } else {
        Err(corruption(
            key,
            format!(
                "payload is {} bytes, shorter than its {expected}-byte header",
                payload.len()
            ),
        ))
    }
}

// ---- format marker ----

pub(crate) fn encode_format(version: u32, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&version.to_be_bytes());
    seal(FORMAT_KEY, buf);
}

/// The format marker's payload: `Ok(None)` when the magic is wrong (a foreign
/// database), else the version.
pub(crate) fn decode_format(value: &[u8]) -> Result<Option<u32>, StorageError> {
    if value.len() < MAGIC.len() || &value[..MAGIC.len()] != MAGIC {
        return Ok(None);
    }
    let payload = unseal(FORMAT_KEY, value)?;
    expect_len(FORMAT_KEY, payload, MAGIC.len() + 4)?;
    let mut version = [0u8; 4];
    version.copy_from_slice(&payload[MAGIC.len()..]);
    Ok(Some(u32::from_be_bytes(version)))
}

// ---- Raft records ----

fn kind_to_byte(kind: EntryKind) -> u8 {
    match kind {
        EntryKind::Normal => 0,
        EntryKind::Noop => 1,
    }
}

fn kind_from_byte(byte: u8) -> Option<EntryKind> {
    match byte {
        0 => Some(EntryKind::Normal),
        1 => Some(EntryKind::Noop),
        _ => None,
    }
}

/// Encodes a log entry value (the index lives in the key).
pub(crate) fn encode_entry(key: &[u8], term: u64, kind: EntryKind, data: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(ENTRY_HEADER_BYTES + data.len() + CRC_BYTES);
    buf.extend_from_slice(&term.to_be_bytes());
    buf.push(kind_to_byte(kind));
    buf.extend_from_slice(data);
    seal(key, buf);
}

/// Decodes a log entry value into (term, kind, data range within `value`).
pub(crate) fn decode_entry(
    key: &[u8],
    value: &[u8],
) -> Result<(u64, EntryKind, std::ops::Range<usize>), StorageError> {
    let payload = unseal(key, value)?;
    expect_min_len(key, payload, ENTRY_HEADER_BYTES)?;
    let term = be_u64(payload, 0);
    let kind = kind_from_byte(payload[8])
        .ok_or_else(|| corruption(key, format!("unknown entry kind {}", payload[8])))?;
    Ok((term, kind, ENTRY_HEADER_BYTES..payload.len()))
}

pub(crate) fn encode_hard_state(key: &[u8], hard_state: &HardState, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&hard_state.term.to_be_bytes());
    match hard_state.voted_for {
        None => buf.extend_from_slice(&[0; 9]),
        Some(node) => {
            buf.push(1);
            buf.extend_from_slice(&node.to_be_bytes());
        }
    }
    seal(key, buf);
}

pub(crate) fn decode_hard_state(key: &[u8], value: &[u8]) -> Result<HardState, StorageError> {
    let payload = unseal(key, value)?;
    expect_len(key, payload, 17)?;
    let voted_for = match payload[8] {
        0 => None,
        1 => Some(be_u64(payload, 9)),
        other => return Err(corruption(key, format!("unknown voted-for tag {other}"))),
    };
    Ok(HardState {
        term: be_u64(payload, 0),
        voted_for,
    })
}

/// Encodes a payload of `u64`s (log base, snapshot meta, applied index).
pub(crate) fn encode_u64s(key: &[u8], values: &[u64], buf: &mut Vec<u8>) {
    buf.clear();
    for value in values {
        buf.extend_from_slice(&value.to_be_bytes());
    }
    seal(key, buf);
}

/// Decodes a payload of exactly `N` `u64`s.
pub(crate) fn decode_u64s<const N: usize>(
    key: &[u8],
    value: &[u8],
) -> Result<[u64; N], StorageError> {
    let payload = unseal(key, value)?;
    expect_len(key, payload, 8 * N)?;
    let mut out = [0u64; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = be_u64(payload, 8 * i);
    }
    Ok(out)
}

/// Encodes snapshot data together with its position, so that data and meta
/// can be checked against each other on read.
pub(crate) fn encode_snapshot_data(
    key: &[u8],
    meta: &SnapshotMeta,
    data: &[u8],
    buf: &mut Vec<u8>,
) {
    buf.clear();
    buf.reserve(16 + data.len() + CRC_BYTES);
    buf.extend_from_slice(&meta.last_included_index.to_be_bytes());
    buf.extend_from_slice(&meta.last_included_term.to_be_bytes());
    buf.extend_from_slice(data);
    seal(key, buf);
}

pub(crate) fn decode_snapshot_data(
    key: &[u8],
    value: &[u8],
) -> Result<(SnapshotMeta, std::ops::Range<usize>), StorageError> {
    let payload = unseal(key, value)?;
    expect_min_len(key, payload, 16)?;
    let meta = SnapshotMeta {
        last_included_index: be_u64(payload, 0),
        last_included_term: be_u64(payload, 8),
    };
    Ok((meta, 16..payload.len()))
}

// ---- KV and MapReduce records ----

pub(crate) fn encode_versioned(key: &[u8], version: u64, value: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(8 + value.len() + CRC_BYTES);
    buf.extend_from_slice(&version.to_be_bytes());
    buf.extend_from_slice(value);
    seal(key, buf);
}

/// Decodes a KV value into (version, value range within `value`).
pub(crate) fn decode_versioned(
    key: &[u8],
    value: &[u8],
) -> Result<(u64, std::ops::Range<usize>), StorageError> {
    let payload = unseal(key, value)?;
    expect_min_len(key, payload, 8)?;
    Ok((be_u64(payload, 0), 8..payload.len()))
}

pub(crate) fn encode_plain(key: &[u8], value: &[u8], buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(value.len() + CRC_BYTES);
    buf.extend_from_slice(value);
    seal(key, buf);
}

/// Decodes a MapReduce value into the range of its payload.
pub(crate) fn decode_plain(
    key: &[u8],
    value: &[u8],
) -> Result<std::ops::Range<usize>, StorageError> {
    let payload = unseal(key, value)?;
    Ok(0..payload.len())
}

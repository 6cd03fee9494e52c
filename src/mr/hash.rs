//! Hash functions: the stable partition hash and a fast in-memory table hasher.

use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a, 32 bits, over `bytes` (offset basis 0x811c9dc5, prime 0x01000193).
///
/// This is the hash the reference lab's `ihash` uses (Go's `hash/fnv` New32a). It is part of the
/// on-disk contract: which reduce task a key goes to must not change between versions or
/// processes, so never replace it with a seeded or platform-dependent hash.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The reduce task of `key`: `(fnv1a32(key) & 0x7fff_ffff) % reduce_tasks`, as the lab's
/// `ihash(key) % nReduce`.
///
/// # Panics
/// Panics if `reduce_tasks` is 0 (configurations are validated before any task runs).
pub fn partition(key: &[u8], reduce_tasks: u32) -> u32 {
    assert!(reduce_tasks > 0, "partition: reduce_tasks must be positive");
    (fnv1a32(key) & 0x7fff_ffff) % reduce_tasks
}

/// A fast, unseeded hasher for in-memory tables keyed by short byte strings (the map-side
/// combine table, the benchmark's count table).
///
/// It mixes eight bytes at a time with the FxHash multiply and folds the 128-bit product at the
/// end so that the low bits hashbrown uses for bucket selection are well mixed. It is not
/// resistant to hash flooding: the keys come from the job's own input, and a flood would only
/// slow that job down.
#[derive(Clone, Copy, Debug, Default)]
pub struct FastHasher {
    hash: u64,
}

/// `BuildHasher` for [`FastHasher`], for `HashMap::with_hasher`.
pub type FastBuildHasher = BuildHasherDefault<FastHasher>;

const SEED: u64 = 0x517c_c1b7_2722_0a95;

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

/// Packs 1..=7 bytes into a word without a variable-length copy: two overlapping 4-byte reads
/// for 4..=7 bytes, first/middle/last byte for 1..=3. Different inputs of one length give
/// different words, and `Hash for [u8]` hashes the length first, so nothing collides.
#[inline]
fn read_tail(tail: &[u8]) -> u64 {
    let n = tail.len();
    debug_assert!((1..8).contains(&n));
    if n >= 4 {
        let low = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        let high = u32::from_le_bytes(tail[n - 4..].try_into().expect("4 bytes"));
        u64::from(low) | (u64::from(high) << 32)
    } else {
        u64::from(tail[0]) | (u64::from(tail[n / 2]) << 8) | (u64::from(tail[n - 1]) << 16)
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            self.add(read_tail(tail));
        }
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let product = u128::from(self.hash) * u128::from(SEED);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves fnv1a32 matches the published FNV-1a 32-bit test vectors (so it equals Go's New32a).
    #[test]
    fn fnv1a32_matches_published_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    // Proves partition stays in range and is a pure function of the key.
    #[test]
    fn partition_is_in_range_and_stable() {
        for key in [&b""[..], b"a", b"hello", b"The", b"zzzzzzzzzzzzzzzzzzzz"] {
            for reduce_tasks in [1, 2, 7, 10, 1000] {
                let p = partition(key, reduce_tasks);
                assert!(p < reduce_tasks);
                assert_eq!(p, partition(key, reduce_tasks));
                assert_eq!(p, (fnv1a32(key) & 0x7fff_ffff) % reduce_tasks);
            }
        }
    }

    // Proves the fast hasher distinguishes keys that differ only in the tail or in length.
    #[test]
    fn fast_hasher_separates_similar_keys() {
        use std::hash::BuildHasher;
        let build = FastBuildHasher::default();
        let keys: [&[u8]; 10] = [
            b"",
            b"a",
            b"a\0",
            b"ab",
            b"ba",
            b"abc",
            b"acb",
            b"abcdefgh",
            b"abcdefgha",
            b"abcdefghb",
        ];
        let hashes: Vec<u64> = keys.iter().map(|k| build.hash_one(k)).collect();
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                assert_ne!(hashes[i], hashes[j], "{:?} vs {:?}", keys[i], keys[j]);
            }
        }
    }
}

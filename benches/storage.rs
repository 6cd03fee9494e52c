//! Raft-log append throughput of the sled [`Store`] beside raw sled.
//!
//! For 1, 16 and 256 entries of 128 bytes per flush, `raftkv` commits one
//! `WriteBatch` append (checksummed records, group cache, flush) and
//! `sled_raw` does what any sled user would do: one `apply_batch` of the same
//! number of 17-byte keys and 128-byte values, then `flush`. Same sled
//! configuration (64 MiB cache, no background flusher), fresh directories.
//!
//! Run: `cargo bench --bench storage`; compare the `raftkv` and `sled_raw`
//! throughputs of each size.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use raftkv::raft::{Entry, EntryKind};
use raftkv::storage::{Storage, Store, WriteBatch};

const ENTRY_BYTES: usize = 128;
const GROUP: u64 = 1;
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn sled_key(index: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = 0x13;
    key[1..9].copy_from_slice(&GROUP.to_be_bytes());
    key[9..17].copy_from_slice(&index.to_be_bytes());
    key
}

fn append_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("append_128B_per_flush");
    let data = Bytes::from(vec![0xab; ENTRY_BYTES]);
    for entries_per_flush in [1u64, 16, 256] {
        group.throughput(Throughput::Elements(entries_per_flush));

        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(dir.path()).expect("open store");
        let mut next_index = 1u64;
        group.bench_with_input(
            BenchmarkId::new("raftkv", entries_per_flush),
            &entries_per_flush,
            |b, &n| {
                b.iter(|| {
                    let entries: Vec<Entry> = (next_index..next_index + n)
                        .map(|index| Entry {
                            index,
                            term: 1,
                            kind: EntryKind::Normal,
                            data: data.clone(),
                        })
                        .collect();
                    let mut batch = WriteBatch::with_capacity(1);
                    batch.append(GROUP, entries);
                    store.commit(black_box(batch)).expect("commit");
                    next_index += n;
                })
            },
        );
        drop(store);

        let dir = tempfile::tempdir().expect("temporary directory");
        let db = sled::Config::new()
            .path(dir.path())
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let value = [0xab; ENTRY_BYTES];
        let mut next_index = 1u64;
        group.bench_with_input(
            BenchmarkId::new("sled_raw", entries_per_flush),
            &entries_per_flush,
            |b, &n| {
                b.iter(|| {
                    let mut batch = sled::Batch::default();
                    for index in next_index..next_index + n {
                        batch.insert(&sled_key(index)[..], &value[..]);
                    }
                    db.apply_batch(black_box(batch)).expect("apply_batch");
                    db.flush().expect("flush");
                    next_index += n;
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, append_throughput);
criterion_main!(benches);

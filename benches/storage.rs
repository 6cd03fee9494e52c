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
//!
//! Criterion measures the two one after the other, so on a shared machine a
//! load change between them skews their ratio. After the criterion run the
//! bench therefore also prints a paired measurement: both workloads
//! alternating commit by commit, so both see the same load, reporting the
//! ratio of their median commit times for each size.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
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

/// Commits per size in the paired measurement.
const PAIRED_COMMITS: [(u64, usize); 3] = [(1, 1000), (16, 500), (256, 100)];

/// Alternates raftkv and raw sled commits of each size and prints the ratio
/// of their median commit times (> 1: raftkv is faster).
fn paired_ratios() {
    let data = Bytes::from(vec![0xab; ENTRY_BYTES]);
    let value = [0xab; ENTRY_BYTES];
    for (n, commits) in PAIRED_COMMITS {
        let store_dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(store_dir.path()).expect("open store");
        let sled_dir = tempfile::tempdir().expect("temporary directory");
        let db = sled::Config::new()
            .path(sled_dir.path())
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(None)
            .open()
            .expect("open sled");
        let (mut ours, mut raw) = (Vec::with_capacity(commits), Vec::with_capacity(commits));
        let (mut next_ours, mut next_raw) = (1u64, 1u64);
        for round in 0..commits {
            let mut time_ours = || {
                let start = Instant::now();
                let entries: Vec<Entry> = (next_ours..next_ours + n)
                    .map(|index| Entry {
                        index,
                        term: 1,
                        kind: EntryKind::Normal,
                        data: data.clone(),
                    })
                    .collect();
                let mut batch = WriteBatch::with_capacity(1);
                batch.append(GROUP, entries);
                store.commit(batch).expect("commit");
                next_ours += n;
                ours.push(start.elapsed());
            };
            let mut time_raw = || {
                let start = Instant::now();
                let mut batch = sled::Batch::default();
                for index in next_raw..next_raw + n {
                    batch.insert(&sled_key(index)[..], &value[..]);
                }
                db.apply_batch(batch).expect("apply_batch");
                db.flush().expect("flush");
                next_raw += n;
                raw.push(start.elapsed());
            };
            // Alternate who goes first so neither always follows the other's flush.
            if round % 2 == 0 {
                time_ours();
                time_raw();
            } else {
                time_raw();
                time_ours();
            }
        }
        let median = |times: &mut Vec<Duration>| {
            times.sort();
            times[times.len() / 2]
        };
        let (ours, raw) = (median(&mut ours), median(&mut raw));
        println!(
            "paired append_128B_per_flush/{n}: median commit raftkv {ours:?}, sled_raw {raw:?}; \
             throughput ratio raftkv/sled_raw = {:.3}",
            raw.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

criterion_group!(benches, append_throughput);

fn main() {
    benches();
    // `cargo test --benches` / `--list` only check that the bench runs.
    if !std::env::args().any(|arg| arg == "--test" || arg == "--list") {
        paired_ratios();
    }
    Criterion::default().configure_from_args().final_summary();
}

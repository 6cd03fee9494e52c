//! SIGKILL crash test. A child process (this test binary, re-invoked with an
//! environment variable selecting the child role) commits seeded random
//! batches to a sled store — appends, truncating appends with a new hard
//! state, compactions, snapshots, KV puts with their applied index and
//! MapReduce records — printing `@@begin <op>` before each commit and `@@done` after it
//! returned. The parent kills it at seeded random moments, reopens the
//! directory and checks that the store equals a memory model holding every
//! acknowledged batch, plus possibly the one in flight — never a part of it.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use bytes::Bytes;
use raftkv::raft::{Entry, EntryKind, HardState, SnapshotMeta};
use raftkv::storage::{
    KvStorage, MemDisk, MemStore, RaftLogStorage, Storage, Store, StoreConfig, StoreEngine,
    VersionedValue, WriteBatch,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dump;

const CHILD_DIR: &str = "RAFTKV_CRASH_CHILD_DIR";
const CHILD_SEED: &str = "RAFTKV_CRASH_CHILD_SEED";
const CHILD_ENGINE: &str = "RAFTKV_CRASH_CHILD_ENGINE";
const SEEDS: &str = "RAFTKV_CRASH_SEEDS";
const TEST_NAME: &str = "crash::sigkill_never_loses_an_acknowledged_write";
const WAL_TEST_NAME: &str = "crash::sigkill_never_loses_an_acknowledged_write_to_the_wal";
/// Checkpoint threshold of the write-ahead-log runs: small, so that kills
/// land before, during and after checkpoints.
const WAL_CHECKPOINT_BYTES: u64 = 2048;
const DEFAULT_SEEDS: [u64; 4] = [1, 2, 3, 4];
const ROUNDS_PER_SEED: u64 = 8;
/// Batches a child commits at most before the parent kills it.
const KILL_AFTER_MAX: u64 = 60;
/// A child stops by itself after this many batches (the parent kills it long before).
const CHILD_OPS_MAX: u64 = 10_000;
/// Markers of the child's announcements; libtest may print before them on the same line.
const BEGIN: &str = "@@begin ";
const DONE: &str = "@@done";
const G: u64 = 0;
const NS: u64 = 0;

/// One batch of the child, fully described so that the parent can replay it.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum CrashOp {
    /// Appends `count` entries from `first` (truncating when `first` is inside
    /// the log), optionally with a new hard state, plus a KV put and the
    /// applied index.
    Append {
        first: u64,
        count: u64,
        term: u64,
        new_term: bool,
        key: u8,
        version: u64,
    },
    Compact {
        through: u64,
    },
    Snapshot {
        index: u64,
        term: u64,
    },
    Record {
        key: u8,
        value: Option<u64>,
    },
}

fn entry_data(index: u64, term: u64) -> Bytes {
    // Sizes from 0 to ~300 bytes: inline and out-of-line sled values.
    let len = ((index * 37 + term * 11) % 300) as usize;
    Bytes::from(
        (0..len)
            .map(|i| (index as usize + i) as u8)
            .collect::<Vec<u8>>(),
    )
}

impl CrashOp {
    fn batch(&self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        match *self {
            CrashOp::Append {
                first,
                count,
                term,
                new_term,
                key,
                version,
            } => {
                if new_term {
                    batch.set_hard_state(
                        G,
                        HardState {
                            term,
                            voted_for: Some(first % 3),
                        },
                    );
                }
                let entries: Vec<Entry> = (first..first + count)
                    .map(|index| Entry {
                        index,
                        term,
                        kind: EntryKind::Normal,
                        data: entry_data(index, term),
                    })
                    .collect();
                batch
                    .append(G, entries)
                    .kv_put(NS, format!("k{key}"), format!("v{version}"), version)
                    .set_applied_index(NS, first + count - 1);
            }
            CrashOp::Compact { through } => {
                batch.compact(G, through);
            }
            CrashOp::Snapshot { index, term } => {
                let meta = SnapshotMeta {
                    last_included_index: index,
                    last_included_term: term,
                };
                let value = Bytes::from(format!("state at {index}"));
                batch
                    .install_snapshot(G, meta, value.clone())
                    .kv_replace_all(
                        NS,
                        [(
                            Bytes::from_static(b"snapshot"),
                            VersionedValue {
                                value,
                                version: index,
                            },
                        )],
                        index,
                    );
            }
            CrashOp::Record { key, value } => match value {
                Some(value) => {
                    batch.mr_put(format!("task/{key}"), value.to_string());
                }
                None => {
                    batch.mr_delete(format!("task/{key}"));
                }
            },
        }
        batch
    }

    /// The next batch, chosen from the store's current state.
    fn generate(store: &Store, rng: &mut ChaCha8Rng) -> CrashOp {
        let first = store.first_index(G).unwrap();
        let last = store.last_index(G).unwrap();
        let last_term = store.term(G, last).unwrap();
        let term = store.hard_state(G).unwrap().term.max(last_term).max(1);
        let key = rng.random_range(0..8u8);
        let version = store
            .kv_get(NS, format!("k{key}").as_bytes())
            .unwrap()
            .map_or(1, |v| v.version + 1);
        let roll = rng.random_range(0..100);
        if roll < 60 || last < first {
            CrashOp::Append {
                first: last + 1,
                count: rng.random_range(1..=8),
                term,
                new_term: false,
                key,
                version,
            }
        } else if roll < 75 {
            let back = rng.random_range(0..=(last - first).min(3));
            CrashOp::Append {
                first: last - back,
                count: rng.random_range(1..=4),
                term: term + 1,
                new_term: true,
                key,
                version,
            }
        } else if roll < 85 {
            CrashOp::Compact {
                through: rng.random_range(first..=last),
            }
        } else if roll < 92 {
            if rng.random_bool(0.7) {
                CrashOp::Snapshot {
                    index: last,
                    term: last_term,
                }
            } else {
                CrashOp::Snapshot {
                    index: last + rng.random_range(1..3),
                    term: term + 1,
                }
            }
        } else {
            CrashOp::Record {
                key: rng.random_range(0..4),
                value: rng.random_bool(0.7).then(|| rng.random()),
            }
        }
    }
}

/// How both roles open the directory.
fn open(dir: &Path, engine: StoreEngine) -> Result<Store, raftkv::storage::StorageError> {
    let config = StoreConfig {
        engine,
        wal_checkpoint_bytes: WAL_CHECKPOINT_BYTES,
        ..StoreConfig::default()
    };
    let store = Store::open_with(dir, &config)?;
    assert_eq!(store.engine(), engine);
    Ok(store)
}

fn engine_name(engine: StoreEngine) -> &'static str {
    match engine {
        StoreEngine::Sled => "sled",
        StoreEngine::Wal => "wal",
    }
}

/// The child role: commit batches until killed, announcing each one.
fn run_child(dir: &Path, seed: u64, engine: StoreEngine) {
    let store = open(dir, engine).expect("child: open the store");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stdout = std::io::stdout();
    for _ in 0..CHILD_OPS_MAX {
        let op = CrashOp::generate(&store, &mut rng);
        writeln!(stdout, "{BEGIN}{}", serde_json::to_string(&op).unwrap()).unwrap();
        stdout.flush().unwrap();
        store.commit(op.batch()).expect("child: commit");
        writeln!(stdout, "{DONE}").unwrap();
        stdout.flush().unwrap();
    }
}

/// The reference state: every acknowledged batch applied to a memory store.
struct Model {
    disk: MemDisk,
}

impl Model {
    fn apply(&mut self, op: &CrashOp) {
        let store = MemStore::open(&self.disk).unwrap();
        store
            .commit(op.batch())
            .expect("the model accepts every batch the child committed");
    }

    fn with(&self, op: &CrashOp) -> Model {
        let mut next = Model {
            disk: self.disk.fork(),
        };
        next.apply(op);
        next
    }

    fn dump(&self) -> super::Dump {
        dump(&MemStore::open(&self.disk).unwrap())
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var(SEEDS) {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("RAFTKV_CRASH_SEEDS: comma-separated u64s")
            })
            .collect(),
        Err(_) => DEFAULT_SEEDS.to_vec(),
    }
}

fn run_seed(seed: u64, engine: StoreEngine) {
    let test_name = match engine {
        StoreEngine::Sled => TEST_NAME,
        StoreEngine::Wal => WAL_TEST_NAME,
    };
    let hint = |round: u64| {
        format!(
            "{} seed {seed} round {round}; replay with {SEEDS}={seed} cargo test --release --test storage -- --exact {test_name}",
            engine_name(engine)
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model {
        disk: MemDisk::new(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut acknowledged_total = 0;
    for round in 0..ROUNDS_PER_SEED {
        let kill_after = rng.random_range(1..=KILL_AFTER_MAX);
        // Kill right after a commit began, or right after one was acknowledged.
        let kill_in_flight = rng.random_bool(0.5);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ENGINE, engine_name(engine))
            .env(CHILD_SEED, (seed * 1000 + round).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut in_flight: Option<CrashOp> = None;
        let mut acknowledged = 0;
        let mut killed = false;
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).unwrap() == 0 || !line.ends_with('\n') {
                break; // EOF, or a line cut by the kill: never printed
            }
            if let Some(at) = line.find(BEGIN) {
                let json = &line[at + BEGIN.len()..];
                assert!(
                    in_flight.is_none(),
                    "child began a batch before finishing one; {}",
                    hint(round)
                );
                in_flight = Some(serde_json::from_str(json.trim_end()).unwrap());
                if !killed && kill_in_flight && acknowledged + 1 == kill_after {
                    child.kill().unwrap();
                    killed = true;
                }
            } else if line.ends_with(&format!("{DONE}\n")) {
                let op = in_flight
                    .take()
                    .unwrap_or_else(|| panic!("done without begin; {}", hint(round)));
                model.apply(&op);
                acknowledged += 1;
                if !killed && !kill_in_flight && acknowledged == kill_after {
                    child.kill().unwrap();
                    killed = true;
                }
            }
            // Anything else is the test harness talking.
        }
        let status = child.wait().unwrap();
        assert!(
            killed,
            "the child exited by itself ({status}) after {acknowledged} batches; {}",
            hint(round)
        );
        acknowledged_total += acknowledged;

        let store = open(dir.path(), engine)
            .unwrap_or_else(|e| panic!("reopen after the kill: {e}; {}", hint(round)));
        let recovered = dump(&store);
        drop(store);
        if engine == StoreEngine::Wal && acknowledged_total > 40 {
            let images = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    let name = name.to_str().unwrap();
                    name.starts_with("image-") && name.ends_with(".img")
                })
                .count();
            assert_eq!(images, 1, "checkpoints were written; {}", hint(round));
        }
        if recovered != model.dump() {
            let op = in_flight.take().unwrap_or_else(|| {
                panic!(
                    "recovered state differs from the acknowledged writes; {}",
                    hint(round)
                )
            });
            let after = model.with(&op);
            assert_eq!(
                recovered,
                after.dump(),
                "recovered state is neither before nor after the batch in flight {op:?}; {}",
                hint(round)
            );
            model = after;
        }
    }
    assert!(
        acknowledged_total > 0,
        "seed {seed}: no batch was acknowledged"
    );
}

/// The child role when this process is a child; otherwise every seed.
fn run(engine: StoreEngine) {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        let child_engine = std::env::var(CHILD_ENGINE).unwrap();
        assert_eq!(
            child_engine,
            engine_name(engine),
            "child started for another engine"
        );
        run_child(Path::new(&dir), seed, engine);
        return;
    }
    for seed in seeds() {
        run_seed(seed, engine);
    }
}

#[test]
fn sigkill_never_loses_an_acknowledged_write() {
    // Every batch acknowledged before a SIGKILL survives, and the batch in flight is all there or absent.
    run(StoreEngine::Sled);
}

#[test]
fn sigkill_never_loses_an_acknowledged_write_to_the_wal() {
    // The same for the write-ahead-log engine, with 512-byte segments and a
    // checkpoint every 2 KiB of log or more, so kills land at random points
    // between segment moves and checkpoints (that checkpoints happen is
    // asserted after each round).
    run(StoreEngine::Wal);
}

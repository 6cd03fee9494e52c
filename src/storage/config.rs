//! Configuration of a store: cache size, flush policy and size limits.

/// Newest on-disk format version this build reads and writes.
///
/// History: 1, the first; 2, snapshot data records in a sled tree of their
/// own (the logical records are unchanged; a format-1 store is read as it is
/// and upgraded by its first writable open, after which older builds refuse
/// it with `NewerFormat`).
pub const FORMAT_VERSION: u32 = 2;

/// When a commit makes its batch durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Every commit flushes (fsync) before it returns. This is what the
    /// durability contract of [`Storage`](super::Storage) promises; use it
    /// for every real node.
    EveryCommit,
    /// Commits return without flushing; sled flushes in the background every
    /// `every_ms` milliseconds and when the store is dropped. Each batch stays
    /// atomic, but a crash loses the commits of the last `every_ms`: this
    /// breaks the durability contract and exists for bulk loads and
    /// throw-away benchmarks only.
    Background {
        /// Interval of the background flush, in milliseconds (at least 1).
        every_ms: u64,
    },
}

/// Size limits enforced on every write; a write that exceeds one fails with
/// [`StorageError::LimitExceeded`](super::StorageError::LimitExceeded) and
/// leaves the store unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest key of a KV or MapReduce record.
    pub key_bytes_max: u64,
    /// Largest value of a KV or MapReduce record.
    pub value_bytes_max: u64,
    /// Largest `data` of one Raft log entry.
    pub entry_bytes_max: u64,
    /// Largest snapshot data.
    pub snapshot_bytes_max: u64,
    /// Largest total of keys and values written by one batch.
    pub batch_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 16 * 1024,
            value_bytes_max: 16 * 1024 * 1024,
            entry_bytes_max: 16 * 1024 * 1024,
            snapshot_bytes_max: 256 * 1024 * 1024,
            batch_bytes_max: 512 * 1024 * 1024,
        }
    }
}

/// How a [`Store`](super::Store) keeps its data on disk. Chosen when a
/// directory is created; an existing directory always opens with the engine
/// it was created with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StoreEngine {
    /// One sled database: records on disk, pages cached in memory. For state
    /// larger than memory (a single-node KV server's map, MapReduce jobs).
    #[default]
    Sled,
    /// Every record in memory, each committed batch appended to a
    /// preallocated log file and made durable with one `fdatasync`;
    /// checkpoint images bound the log. Several times faster per durable
    /// commit than sled, for state that fits in memory — a Raft node whose
    /// log is bounded by snapshots (`raftkv server` uses it).
    Wal,
}

/// How to open a [`Store`](super::Store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Size of sled's page cache. Default 64 MiB (sled's own default is 1 GiB).
    pub cache_capacity_bytes: u64,
    /// When commits become durable. Default [`FlushMode::EveryCommit`].
    pub flush_mode: FlushMode,
    /// Create the directory and a fresh store when the directory is missing or
    /// empty. Default `true`; tools that must not write (`raftkv inspect`) set
    /// it to `false`.
    pub create_if_missing: bool,
    /// How long `open` keeps retrying while another file handle holds the
    /// directory lock before it returns `Locked`. Covers a previous holder
    /// that is still going away (a process that is exiting, or a child
    /// process forked while the store was open that has not yet exec'd and
    /// closed its inherited copy of the lock). Default 500 ms.
    pub lock_timeout_ms: u64,
    /// Size limits on writes.
    pub limits: Limits,
    /// The engine of a directory this open creates. Default
    /// [`StoreEngine::Sled`].
    pub engine: StoreEngine,
    /// [`StoreEngine::Wal`]: when the log moves to a new segment, a checkpoint
    /// image is written once the log since the last image holds this many
    /// bytes (and at least twice the size of the last image, so writing
    /// images costs at most as much as the log).
    /// Default 64 MiB.
    pub wal_checkpoint_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_capacity_bytes: 64 * 1024 * 1024,
            flush_mode: FlushMode::EveryCommit,
            create_if_missing: true,
            lock_timeout_ms: 500,
            limits: Limits::default(),
            engine: StoreEngine::Sled,
            wal_checkpoint_bytes: 64 << 20,
        }
    }
}

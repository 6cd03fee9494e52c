//! [`Store`]: the store of one data directory, on sled or on the write-ahead
//! log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::engine::{Backend, BackendBatch, Engine};
use super::format::TAG_SNAPSHOT_DATA;
use super::mem_store::MemBatch;
use super::wal::{self, WalBackend};
use super::{FlushMode, StorageError, StoreConfig, StoreEngine};
use sled::Transactional;

/// The durable state of one node: one data directory holding one sled
/// database or one write-ahead log ([`StoreEngine`]). Cheap to clone (all clones share the database); the directory is
/// locked until the last clone is dropped.
///
/// Implements [`RaftLogStorage`](super::RaftLogStorage),
/// [`KvStorage`](super::KvStorage) and [`MrStorage`](super::MrStorage) under
/// the durability contract of [`Storage`](super::Storage).
///
/// ```
/// use raftkv::storage::{KvStorage, Storage, Store, WriteBatch};
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let mut batch = WriteBatch::new();
/// batch.kv_put(0, "k", "v", 1).set_applied_index(0, 1);
/// store.commit(batch)?;
/// drop(store);
/// let store = Store::open(dir.path())?; // reopen: the write is there
/// assert_eq!(store.kv_get(0, b"k")?.unwrap().version, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Store {
    pub(crate) engine: Arc<Engine<StoreBackend>>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the data directory `dir` with the default [`StoreConfig`],
    /// creating it (and a fresh store) when missing or empty.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StorageError> {
        Store::open_with(dir, &StoreConfig::default())
    }

    /// Opens the data directory `dir` with `config`.
    ///
    /// Errors: [`StorageError::NotRaftkvDirectory`] for a missing directory
    /// (unless `create_if_missing`), a file, a directory holding other files,
    /// or a database without the raftkv format marker;
    /// [`StorageError::NewerFormat`]; [`StorageError::Locked`] when another
    /// process or another open `Store` holds it; [`StorageError::Corruption`].
    /// A directory is never re-initialised.
    pub fn open_with(dir: impl AsRef<Path>, config: &StoreConfig) -> Result<Store, StorageError> {
        let path = dir.as_ref().to_path_buf();
        let engine_kind = check_directory(&path, config)?;
        let (backend, flush_on_commit) = match engine_kind {
            StoreEngine::Sled => {
                let mut sled_config = sled::Config::new()
                    .path(&path)
                    .cache_capacity(config.cache_capacity_bytes);
                let flush_on_commit = match config.flush_mode {
                    // Every commit flushes itself: no background flusher needed.
                    FlushMode::EveryCommit => {
                        sled_config = sled_config.flush_every_ms(None);
                        true
                    }
                    FlushMode::Background { every_ms } => {
                        sled_config = sled_config.flush_every_ms(Some(every_ms.max(1)));
                        false
                    }
                };
                let db = open_sled(&sled_config, &path, config.lock_timeout_ms)?;
                (
                    StoreBackend::Sled(SledBackend::new(db, &path)?),
                    flush_on_commit,
                )
            }
            StoreEngine::Wal => {
                let background_ms = match config.flush_mode {
                    FlushMode::EveryCommit => None,
                    FlushMode::Background { every_ms } => Some(every_ms),
                };
                let backend = WalBackend::open(
                    &path,
                    config.create_if_missing,
                    config.lock_timeout_ms,
                    config.wal_checkpoint_bytes,
                    background_ms,
                )?;
                (StoreBackend::Wal(backend), background_ms.is_none())
            }
        };
        let engine = Engine::open(
            backend,
            config.limits.clone(),
            flush_on_commit,
            config.create_if_missing,
            &path,
        )?;
        Ok(Store {
            engine: Arc::new(engine),
            path: Arc::new(path),
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The on-disk format version of the directory.
    pub fn format_version(&self) -> u32 {
        self.engine.format_version()
    }

    /// The engine the directory was created with.
    pub fn engine(&self) -> StoreEngine {
        match self.engine.backend() {
            StoreBackend::Sled(_) => StoreEngine::Sled,
            StoreBackend::Wal(_) => StoreEngine::Wal,
        }
    }

    /// Bytes the store uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        match self.engine.backend() {
            StoreBackend::Sled(sled) => Ok(sled.db.size_on_disk()?),
            StoreBackend::Wal(wal) => wal.size_on_disk(),
        }
    }
}

/// sled's message when another open file handle holds the directory lock.
const SLED_LOCK_MESSAGE: &str = "could not acquire lock";
/// Pause between attempts to take a held directory lock.
const LOCK_RETRY_INTERVAL_MS: u64 = 10;

fn is_lock_error(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(io) if io.to_string().contains(SLED_LOCK_MESSAGE))
}

/// Opens sled, retrying for up to `lock_timeout_ms` while the lock is held.
fn open_sled(
    config: &sled::Config,
    path: &Path,
    lock_timeout_ms: u64,
) -> Result<sled::Db, StorageError> {
    let deadline = Instant::now() + Duration::from_millis(lock_timeout_ms);
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(error) if is_lock_error(&error) => {
                if Instant::now() >= deadline {
                    return Err(StorageError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                tracing::debug!(path = %path.display(), "directory lock is held; retrying");
                std::thread::sleep(Duration::from_millis(LOCK_RETRY_INTERVAL_MS));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Rejects anything that is not a missing/empty directory or a raftkv store
/// before an engine can write into it; says which engine opens it (an empty
/// or missing directory gets `config.engine`).
fn check_directory(path: &Path, config: &StoreConfig) -> Result<StoreEngine, StorageError> {
    let create = config.create_if_missing;
    let not_raftkv = |reason: &str| StorageError::NotRaftkvDirectory {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => Err(not_raftkv("it is not a directory")),
        Ok(_) => {
            let names = std::fs::read_dir(path)?
                .map(|entry| entry.map(|entry| entry.file_name()))
                .collect::<Result<Vec<OsString>, _>>()?;
            if create && wal::is_interrupted_creation(&names) {
                // A creation a crash interrupted before the marker existed,
                // or one under way: the engine cleans it up under its lock.
                return Ok(StoreEngine::Wal);
            }
            if names.is_empty() {
                return if create {
                    Ok(config.engine)
                } else {
                    Err(not_raftkv("the directory is empty"))
                };
            }
            let has = |name: &str| names.iter().any(|n| n == name);
            let all_wal = names
                .iter()
                .all(|name| name.to_str().is_some_and(wal::is_wal_file));
            if has("db") && has("conf") {
                Ok(StoreEngine::Sled)
            } else if has(wal::MARKER_FILE) && all_wal {
                Ok(StoreEngine::Wal)
            } else {
                Err(not_raftkv("it holds files that are not a raftkv database"))
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if create {
                std::fs::create_dir_all(path)?;
                Ok(config.engine)
            } else {
                Err(not_raftkv("it does not exist"))
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// The backend of a [`Store`]: sled or the write-ahead log.
pub(crate) enum StoreBackend {
    Sled(SledBackend),
    Wal(WalBackend),
}

/// A value read from either backend.
pub(crate) enum StoreValue {
    Sled(sled::IVec),
    Bytes(Bytes),
}

impl AsRef<[u8]> for StoreValue {
    fn as_ref(&self) -> &[u8] {
        match self {
            StoreValue::Sled(value) => value,
            StoreValue::Bytes(value) => value,
        }
    }
}

/// A batch for either backend.
pub(crate) enum StoreBatch {
    Sled(SledBatch),
    Wal(MemBatch),
}

impl BackendBatch for StoreBatch {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        match self {
            StoreBatch::Sled(batch) => batch.put(key, value),
            StoreBatch::Wal(batch) => batch.put(key, value),
        }
    }

    fn delete(&mut self, key: &[u8]) {
        match self {
            StoreBatch::Sled(batch) => batch.delete(key),
            StoreBatch::Wal(batch) => batch.delete(key),
        }
    }

    fn reserve(&mut self, writes: usize, bytes: usize) {
        match self {
            StoreBatch::Sled(batch) => batch.reserve(writes, bytes),
            StoreBatch::Wal(batch) => batch.reserve(writes, bytes),
        }
    }
}

impl StoreBackend {
    /// The sled backend (tests of sled specifics).
    #[cfg(test)]
    pub(crate) fn sled(&self) -> &SledBackend {
        match self {
            StoreBackend::Sled(sled) => sled,
            StoreBackend::Wal(_) => panic!("not a sled store"),
        }
    }
}

impl Backend for StoreBackend {
    type Value = StoreValue;
    type Batch = StoreBatch;

    fn new_batch(&self) -> StoreBatch {
        match self {
            StoreBackend::Sled(sled) => StoreBatch::Sled(sled.new_batch()),
            StoreBackend::Wal(wal) => StoreBatch::Wal(wal.new_batch()),
        }
    }

    fn get(&self, key: &[u8]) -> Result<Option<StoreValue>, StorageError> {
        Ok(match self {
            StoreBackend::Sled(sled) => sled.get(key)?.map(StoreValue::Sled),
            StoreBackend::Wal(wal) => wal.get(key)?.map(StoreValue::Bytes),
        })
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, mut visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], StoreValue) -> Result<bool, StorageError>,
    {
        match self {
            StoreBackend::Sled(sled) => sled.scan(lo, hi, reverse, |key, value| {
                visit(key, StoreValue::Sled(value))
            }),
            StoreBackend::Wal(wal) => wal.scan(lo, hi, reverse, |key, value| {
                visit(key, StoreValue::Bytes(value))
            }),
        }
    }

    fn is_empty(&self) -> Result<bool, StorageError> {
        match self {
            StoreBackend::Sled(sled) => sled.is_empty(),
            StoreBackend::Wal(wal) => wal.is_empty(),
        }
    }

    fn apply(&self, batch: StoreBatch) -> Result<(), StorageError> {
        match (self, batch) {
            (StoreBackend::Sled(sled), StoreBatch::Sled(batch)) => sled.apply(batch),
            (StoreBackend::Wal(wal), StoreBatch::Wal(batch)) => wal.apply(batch),
            _ => panic!("invariant: a batch is applied by the backend that made it"),
        }
    }

    fn flush(&self) -> Result<(), StorageError> {
        match self {
            StoreBackend::Sled(sled) => sled.flush(),
            StoreBackend::Wal(wal) => wal.flush(),
        }
    }

    fn into_bytes(value: StoreValue) -> Bytes {
        match value {
            StoreValue::Sled(value) => SledBackend::into_bytes(value),
            StoreValue::Bytes(value) => value,
        }
    }
}

/// sled's default tree as an engine backend.
///
/// sled's own `flush` writes its log buffers and waits with
/// `sync_file_range`, which on Linux neither persists the file's size nor
/// flushes the device's volatile write cache, and it never syncs the files
/// it keeps for large values (`blobs/`). A flush here therefore adds what a
/// power loss needs: every blob file written since the last flush is synced
/// (and the blob directory with it) before sled's log records that point at
/// them, again after sled's flush (for blobs written meanwhile), and the log
/// file is `fdatasync`ed last. Flushes run one at a time, and a failed one
/// fails every later one (the store must be reopened).
///
/// Snapshot data records (the one key per group under `TAG_SNAPSHOT_DATA`)
/// live in a sled tree of their own ([`SNAPSHOT_TREE`]). In the default tree
/// the record sorted right after the log's newest entries, so it shared their
/// leaf page, and sled rewrote the whole snapshot (a blob file once over
/// 128 KiB) every time it consolidated that page — hundreds of times a
/// second under load, the cost growing with the state machine. A batch that
/// writes snapshot data is applied as one sled transaction over both trees
/// (atomic like any batch); reads fall back to the default tree, where
/// format-1 stores kept the record (a later write moves it).
pub(crate) struct SledBackend {
    db: sled::Db,
    /// The snapshot-data tree, opened (created) at the first snapshot write
    /// or when it exists, so that a read-only open creates nothing.
    snapshots: std::sync::OnceLock<sled::Tree>,
    /// sled's log file (`DIR/db`), opened again only to `fdatasync` it.
    log_file: std::fs::File,
    /// sled's directory of large values.
    blobs_dir: PathBuf,
    /// Blob files known durable, and how to learn of new ones.
    blobs: std::sync::Mutex<BlobTracker>,
    /// Serialises flushes; set once a flush failed (then every flush fails).
    flush_failed: std::sync::Mutex<bool>,
}

/// sled's log file and blob directory inside a data directory.
const SLED_LOG_FILE: &str = "db";
const SLED_BLOBS_DIR: &str = "blobs";
/// The sled tree holding snapshot data records.
pub(crate) const SNAPSHOT_TREE: &[u8] = b"raftkv-snapshot-data";

/// Whether `key` is a snapshot data record (kept in [`SNAPSHOT_TREE`]).
fn is_snapshot_data(key: &[u8]) -> bool {
    key.first() == Some(&TAG_SNAPSHOT_DATA)
}

impl SledBackend {
    /// Wraps an open database; syncs what an earlier run may have left
    /// unsynced (the blobs, the directories).
    fn new(db: sled::Db, dir: &Path) -> Result<SledBackend, StorageError> {
        let log_file = std::fs::File::open(dir.join(SLED_LOG_FILE))?;
        let snapshots = std::sync::OnceLock::new();
        if db.tree_names().iter().any(|name| name == SNAPSHOT_TREE) {
            let _ = snapshots.set(db.open_tree(SNAPSHOT_TREE)?);
        }
        let backend = SledBackend {
            db,
            snapshots,
            log_file,
            blobs: std::sync::Mutex::new(BlobTracker::start(&dir.join(SLED_BLOBS_DIR))),
            blobs_dir: dir.join(SLED_BLOBS_DIR),
            flush_failed: std::sync::Mutex::new(false),
        };
        // The tracker lists the directory first: what was there before its
        // watch started is synced here.
        backend.sync_new_blobs()?;
        sync_directory(dir)?;
        Ok(backend)
    }

    /// The snapshot-data tree, created if needed.
    fn snapshots_for_write(&self) -> Result<&sled::Tree, StorageError> {
        if let Some(tree) = self.snapshots.get() {
            return Ok(tree);
        }
        let tree = self.db.open_tree(SNAPSHOT_TREE)?;
        // Writes are serialised by the engine's lock: nobody raced us here.
        Ok(self.snapshots.get_or_init(|| tree))
    }

    /// Applies a batch that writes snapshot data: one transaction over both
    /// trees; a snapshot record written here leaves the default tree.
    fn apply_with_snapshots(&self, batch: SledBatch) -> Result<(), StorageError> {
        let snapshots = self.snapshots_for_write()?;
        let main: &sled::Tree = &self.db;
        let result: sled::transaction::TransactionResult<(), ()> =
            (main, snapshots).transaction(|(main, snapshots)| {
                for (key, value) in &batch.writes {
                    if is_snapshot_data(key) {
                        main.remove(key.clone())?;
                        match value {
                            Some(value) => snapshots.insert(key.clone(), value.clone())?,
                            None => snapshots.remove(key.clone())?,
                        };
                    } else {
                        match value {
                            Some(value) => main.insert(key.clone(), value.clone())?,
                            None => main.remove(key.clone())?,
                        };
                    }
                }
                Ok(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(sled::transaction::TransactionError::Storage(error)) => Err(error.into()),
            Err(sled::transaction::TransactionError::Abort(())) => {
                unreachable!("the transaction never aborts")
            }
        }
    }

    /// Syncs every blob file not yet known durable, then the blob directory
    /// when there was one. With a watch, the files sled finished writing since
    /// the last call are known without listing the directory (a listing costs
    /// a few system calls per flush); without one, or when the watch lost
    /// events, the directory is listed.
    fn sync_new_blobs(&self) -> Result<(), StorageError> {
        let mut guard = self
            .blobs
            .lock()
            .expect("invariant: a panic while holding the blob tracker");
        let tracker = &mut *guard;
        let mut new = false;
        if !tracker.list_next {
            match tracker.sync_watched(&self.blobs_dir)? {
                Watched::Synced { new } => {
                    if new {
                        sync_directory(&self.blobs_dir)?;
                    }
                    return Ok(());
                }
                Watched::Lost { new: synced } => {
                    tracker.list_next = true;
                    new = synced;
                }
            }
        }
        let synced = &mut tracker.synced;
        let listing = match std::fs::read_dir(&self.blobs_dir) {
            Ok(listing) => listing,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let mut present = std::collections::HashSet::with_capacity(synced.len());
        for item in listing {
            let item = item?;
            let name = item.file_name();
            if !synced.contains(&name) {
                if !sync_file(&item.path())? {
                    continue;
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            sync_directory(&self.blobs_dir)?;
        }
        *synced = present;
        // Listed: events queued from now on are complete again.
        tracker.list_next = tracker.watch.is_none();
        Ok(())
    }
}

/// `fsync` of a file; false when it no longer exists (sled removed it).
fn sync_file(path: &Path) -> Result<bool, StorageError> {
    match std::fs::File::open(path) {
        Ok(file) => {
            file.sync_all()?;
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// The blob files known synced, and (on Linux) an inotify watch on the blob
/// directory. sled writes a blob file whole and closes it before the log
/// record pointing at it can be written, so a "closed after writing" event
/// names every blob a later log flush may make reachable.
struct BlobTracker {
    #[cfg(target_os = "linux")]
    watch: Option<inotify::Inotify>,
    #[cfg(not(target_os = "linux"))]
    watch: Option<()>,
    /// List the directory at the next sync: there is no watch, the watch
    /// lost events, or nothing was listed yet.
    list_next: bool,
    /// Blob files known durable (mirrors the directory: deletions remove).
    synced: std::collections::HashSet<OsString>,
    /// Blob files created and not yet seen closed: synced at every flush.
    open: std::collections::HashSet<OsString>,
}

/// What one pass over the watch's events did.
enum Watched {
    /// The events were complete; `new`: some file was synced.
    Synced { new: bool },
    /// Events were lost (queue overflow) or the watch ended: list instead.
    /// `new`: files were synced before that (the directory still needs its
    /// sync).
    Lost { new: bool },
}

impl BlobTracker {
    #[cfg(target_os = "linux")]
    fn start(dir: &Path) -> BlobTracker {
        use inotify::{Inotify, WatchMask};
        let watch = Inotify::init().and_then(|watch| {
            watch.watches().add(
                dir,
                WatchMask::CREATE
                    | WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::DELETE
                    | WatchMask::MOVED_FROM
                    | WatchMask::ONLYDIR,
            )?;
            Ok(watch)
        });
        let watch = match watch {
            Ok(watch) => Some(watch),
            Err(error) => {
                // A missing directory, or the inotify limits: list instead.
                tracing::debug!(dir = %dir.display(), %error, "no watch on the blob directory; flushes list it");
                None
            }
        };
        BlobTracker {
            watch,
            list_next: true,
            synced: std::collections::HashSet::new(),
            open: std::collections::HashSet::new(),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn start(_dir: &Path) -> BlobTracker {
        BlobTracker {
            watch: None,
            list_next: true,
            synced: std::collections::HashSet::new(),
            open: std::collections::HashSet::new(),
        }
    }

    /// Syncs the files the watch saw written, in event order, then every
    /// file created but not yet seen closed (a child process between fork
    /// and exec can hold sled's descriptor, delaying the close event past
    /// the flush that makes the blob reachable).
    #[cfg(target_os = "linux")]
    fn sync_watched(&mut self, dir: &Path) -> Result<Watched, StorageError> {
        use inotify::EventMask;
        let Some(watch) = self.watch.as_mut() else {
            return Ok(Watched::Lost { new: false });
        };
        let mut buffer = [0u8; 4096];
        let mut new = false;
        loop {
            let events = match watch.read_events(&mut buffer) {
                Ok(events) => events,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "blob directory watch failed; flushes list it from now on");
                    self.watch = None;
                    return Ok(Watched::Lost { new });
                }
            };
            for event in events {
                if event
                    .mask
                    .intersects(EventMask::Q_OVERFLOW | EventMask::IGNORED)
                {
                    if event.mask.contains(EventMask::IGNORED) {
                        // The directory is gone: no more events will come.
                        self.watch = None;
                    }
                    return Ok(Watched::Lost { new });
                }
                let Some(name) = event.name else { continue };
                if event.mask.contains(EventMask::CREATE) {
                    self.open.insert(name.to_os_string());
                } else if event
                    .mask
                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO)
                {
                    self.open.remove(name);
                    if sync_file(&dir.join(name))? {
                        new = true;
                        self.synced.insert(name.to_os_string());
                    }
                } else if event
                    .mask
                    .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                {
                    self.open.remove(name);
                    self.synced.remove(name);
                }
            }
        }
        let mut gone = Vec::new();
        for name in &self.open {
            if sync_file(&dir.join(name))? {
                new = true;
            } else {
                gone.push(name.clone());
            }
        }
        for name in gone {
            self.open.remove(&name);
        }
        Ok(Watched::Synced { new })
    }

    #[cfg(not(target_os = "linux"))]
    fn sync_watched(&mut self, _dir: &Path) -> Result<Watched, StorageError> {
        Ok(Watched::Lost { new: false })
    }
}

/// `fsync` of a directory: makes the names created in it durable.
fn sync_directory(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The writes of one commit, in order. A batch of one write is applied as a
/// plain insert or remove (atomic on its own), which saves sled the batch
/// manifest record and, at flush, a second sequential `sync_file_range`: a
/// follower's single-entry append then costs one disk wait instead of two.
#[derive(Default)]
pub(crate) struct SledBatch {
    writes: Vec<(sled::IVec, Option<sled::IVec>)>,
}

impl BackendBatch for SledBatch {
    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.writes.push((key.into(), Some(value.into())));
    }

    fn delete(&mut self, key: &[u8]) {
        self.writes.push((key.into(), None));
    }
}

impl Backend for SledBackend {
    type Value = sled::IVec;
    type Batch = SledBatch;

    fn new_batch(&self) -> SledBatch {
        SledBatch::default()
    }

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StorageError> {
        if is_snapshot_data(key) {
            if let Some(value) = self
                .snapshots
                .get()
                .map(|t| t.get(key))
                .transpose()?
                .flatten()
            {
                return Ok(Some(value));
            }
        }
        Ok(self.db.get(key)?)
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, mut visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], sled::IVec) -> Result<bool, StorageError>,
    {
        // No scan of the engine reaches the snapshot-data records, which
        // live in another tree.
        debug_assert!(
            !(lo <= &[TAG_SNAPSHOT_DATA, u8::MAX][..] && hi > &[TAG_SNAPSHOT_DATA][..]),
            "a scan over the snapshot-data records"
        );
        let range = self.db.range(lo..hi);
        if reverse {
            for item in range.rev() {
                let (key, value) = item?;
                if !visit(&key, value)? {
                    break;
                }
            }
        } else {
            for item in range {
                let (key, value) = item?;
                if !visit(&key, value)? {
                    break;
                }
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> Result<bool, StorageError> {
        // Only the default tree (and an empty snapshot tree) may exist in a
        // fresh database.
        let default_tree: &[u8] = b"__sled__default";
        let only_ours = self
            .db
            .tree_names()
            .iter()
            .all(|name| name == default_tree || name == SNAPSHOT_TREE);
        let snapshots_empty = self.snapshots.get().is_none_or(|t| t.is_empty());
        Ok(self.db.is_empty() && snapshots_empty && only_ours)
    }

    fn apply(&self, mut batch: SledBatch) -> Result<(), StorageError> {
        if batch.writes.iter().any(|(key, _)| is_snapshot_data(key)) {
            return self.apply_with_snapshots(batch);
        }
        if batch.writes.len() == 1 {
            let (key, value) = batch.writes.pop().expect("one write");
            match value {
                Some(value) => self.db.insert(key, value)?,
                None => self.db.remove(key)?,
            };
            return Ok(());
        }
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.writes {
            match value {
                // A later write of a key overrides an earlier one.
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        Ok(self.db.apply_batch(sled_batch)?)
    }

    fn flush(&self) -> Result<(), StorageError> {
        // One flush at a time, and a failed one is final: after a failed
        // fdatasync the kernel may have dropped the dirty pages and a retry
        // could succeed without them, so no later flush may report success.
        let mut failed = self
            .flush_failed
            .lock()
            .expect("invariant: a panic while flushing");
        if *failed {
            return Err(StorageError::Io(std::io::Error::other(
                "an earlier flush failed; reopen the store",
            )));
        }
        let result = (|| {
            self.sync_new_blobs()?;
            self.db.flush()?;
            // Blobs sled wrote while flushing, for records the flush made stable.
            self.sync_new_blobs()?;
            self.log_file.sync_data()?;
            Ok(())
        })();
        if result.is_err() {
            *failed = true;
        }
        result
    }

    fn into_bytes(value: sled::IVec) -> Bytes {
        Bytes::from_owner(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Entry, EntryKind, SnapshotMeta};
    use crate::storage::FORMAT_VERSION;
    use crate::storage::format::{FORMAT_KEY, encode_format, group_key};
    use crate::storage::{KvStorage, RaftLogStorage, Storage, WriteBatch};

    /// Writes (and flushes) the format-1 marker: a directory as a build of
    /// format 1 left it.
    fn mark_format_1(backend: &SledBackend) {
        let mut marker = Vec::new();
        encode_format(1, &mut marker);
        backend.db.insert(FORMAT_KEY, marker).expect("marker");
        backend.flush().expect("flush");
    }

    fn entries(from: u64, to: u64) -> Vec<Entry> {
        (from..=to)
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                data: Bytes::from(vec![index as u8; 100]),
            })
            .collect()
    }

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            last_included_index: index,
            last_included_term: 1,
        }
    }

    /// A format-1 store opened without `create` (as `inspect` does) and then
    /// written: the first snapshot written the format-2 way raises the marker
    /// in the same batch, so older builds refuse the directory.
    #[test]
    fn writing_snapshot_data_upgrades_the_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.append(0, &entries(1, 10)).expect("append");
            let backend = store.engine.backend().sled();
            mark_format_1(backend);
        }
        let no_create = StoreConfig {
            create_if_missing: false,
            ..StoreConfig::default()
        };
        let store = Store::open_with(dir.path(), &no_create).expect("open");
        assert_eq!(store.format_version(), 1);
        store.append(0, &entries(11, 12)).expect("append");
        assert_eq!(
            store.format_version(),
            1,
            "only snapshot data needs format 2"
        );
        store
            .install_snapshot(0, meta(5), Bytes::from_static(b"state"))
            .expect("snapshot");
        assert_eq!(store.format_version(), FORMAT_VERSION);
        drop(store);
        let store = Store::open_with(dir.path(), &no_create).expect("reopen");
        assert_eq!(store.format_version(), FORMAT_VERSION);
        assert_eq!(
            store.snapshot(0).expect("snapshot"),
            (meta(5), Bytes::from_static(b"state"))
        );
    }

    /// Snapshot data lives in its own tree, never in the default tree next
    /// to the log's newest entries (where every page rewrite copied it).
    #[test]
    fn snapshot_data_lives_in_its_own_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.append(0, &entries(1, 10)).expect("append");
        let data = Bytes::from(vec![9u8; 300_000]);
        store
            .install_snapshot(0, meta(5), data.clone())
            .expect("snapshot");
        store.append(0, &entries(11, 20)).expect("append");
        let key = group_key(TAG_SNAPSHOT_DATA, 0);
        let backend = store.engine.backend().sled();
        assert!(backend.db.get(key).expect("get").is_none());
        let tree = backend.snapshots.get().expect("the snapshot tree exists");
        assert!(tree.get(key).expect("get").is_some());
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.snapshot(0).expect("snapshot"), (meta(5), data));
        assert_eq!(store.last_index(0).expect("last"), 20);
    }

    /// A format-1 store kept snapshot data in the default tree: it is read
    /// from there (a read-only open leaves the store as it is), a writable
    /// open upgrades the marker, and the next snapshot moves the record.
    #[test]
    fn format_1_snapshot_data_is_read_and_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = Bytes::from(vec![1u8; 1000]);
        {
            let store = Store::open(dir.path()).expect("open");
            store.append(0, &entries(1, 10)).expect("append");
            store
                .install_snapshot(0, meta(5), old.clone())
                .expect("snapshot");
            // Make it a format-1 store: the record in the default tree.
            let backend = store.engine.backend().sled();
            let key = group_key(TAG_SNAPSHOT_DATA, 0);
            let tree = backend.snapshots.get().expect("tree");
            let value = tree.remove(key).expect("remove").expect("present");
            backend.db.insert(key, value).expect("insert");
            backend.db.drop_tree(SNAPSHOT_TREE).expect("drop the tree");
            mark_format_1(backend);
        }
        let read_only = StoreConfig {
            create_if_missing: false,
            ..StoreConfig::default()
        };
        let store = Store::open_with(dir.path(), &read_only).expect("open read-only");
        assert_eq!(store.format_version(), 1);
        assert_eq!(store.snapshot(0).expect("snapshot"), (meta(5), old.clone()));
        let names = store.engine.backend().sled().db.tree_names();
        assert!(
            !names.iter().any(|name| name == SNAPSHOT_TREE),
            "a read-only open creates no tree"
        );
        drop(store);
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.format_version(), FORMAT_VERSION);
        assert_eq!(store.snapshot(0).expect("snapshot"), (meta(5), old));
        let new = Bytes::from(vec![2u8; 1000]);
        store
            .install_snapshot(0, meta(8), new.clone())
            .expect("snapshot");
        let key = group_key(TAG_SNAPSHOT_DATA, 0);
        assert!(
            store
                .engine
                .backend()
                .sled()
                .db
                .get(key)
                .expect("get")
                .is_none()
        );
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.snapshot(0).expect("snapshot"), (meta(8), new));
    }

    /// A value too large for sled's log goes to a blob file, which sled never
    /// syncs; a flushing commit leaves every blob file known synced.
    #[test]
    fn a_flushing_commit_syncs_the_blob_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let large = vec![7u8; 1 << 20];
        let mut batch = WriteBatch::new();
        batch
            .kv_put(0, "big", large.clone(), 1)
            .set_applied_index(0, 1);
        store.commit(batch).expect("commit");
        let backend = store.engine.backend().sled();
        let on_disk: std::collections::HashSet<OsString> = std::fs::read_dir(&backend.blobs_dir)
            .expect("blob directory")
            .map(|item| item.expect("listing").file_name())
            .collect();
        assert!(
            !on_disk.is_empty(),
            "a 1 MiB value is expected in a blob file"
        );
        let tracker = backend.blobs.lock().expect("lock");
        #[cfg(target_os = "linux")]
        assert!(
            tracker.watch.is_some() && !tracker.list_next,
            "the flush learnt of the blob from the watch"
        );
        let synced = tracker.synced.clone();
        drop(tracker);
        assert!(
            on_disk.is_subset(&synced),
            "unsynced blobs: {:?}",
            on_disk.difference(&synced).collect::<Vec<_>>()
        );
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let value = store.kv_get(0, b"big").expect("get").expect("present");
        assert_eq!(value.value.as_ref(), &large[..]);
    }

    /// When the watch lost events (or there is none), the next flush lists
    /// the blob directory instead, then goes back to the watch.
    #[test]
    fn a_flush_after_lost_events_lists_the_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let backend = store.engine.backend().sled();
        let on_disk = || -> std::collections::HashSet<OsString> {
            std::fs::read_dir(&backend.blobs_dir)
                .expect("blob directory")
                .map(|item| item.expect("listing").file_name())
                .collect()
        };
        for (round, lose_events) in [(1u64, true), (2, false), (3, true)] {
            if lose_events {
                let mut tracker = backend.blobs.lock().expect("lock");
                tracker.list_next = true;
                #[cfg(target_os = "linux")]
                {
                    // Events of blobs written meanwhile are dropped, too.
                    tracker.watch = None;
                }
            }
            let mut batch = WriteBatch::new();
            batch
                .kv_put(0, format!("big{round}"), vec![round as u8; 1 << 20], round)
                .set_applied_index(0, round);
            store.commit(batch).expect("commit");
            let on_disk = on_disk();
            assert!(on_disk.len() as u64 >= round, "round {round}: {on_disk:?}");
            let tracker = backend.blobs.lock().expect("lock");
            assert!(
                on_disk.is_subset(&tracker.synced),
                "round {round}: unsynced blobs {:?}",
                on_disk.difference(&tracker.synced).collect::<Vec<_>>()
            );
        }
    }

    /// A blob file created and not yet closed (another process can hold
    /// sled's descriptor between fork and exec) is synced at every flush
    /// until its close is seen; then it counts as synced.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_blob_not_yet_closed_is_synced_at_every_flush() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let backend = store.engine.backend().sled();
        let name = OsString::from("4242");
        let mut held = std::fs::File::create(backend.blobs_dir.join(&name)).expect("create");
        held.write_all(b"a blob still being written")
            .expect("write");
        let flush = |round: u64| {
            let mut batch = WriteBatch::new();
            batch.set_applied_index(0, round);
            store.commit(batch).expect("commit");
        };
        flush(1);
        {
            let tracker = backend.blobs.lock().expect("lock");
            assert!(tracker.open.contains(&name), "the open blob is tracked");
            assert!(!tracker.synced.contains(&name));
        }
        drop(held);
        flush(2);
        let tracker = backend.blobs.lock().expect("lock");
        assert!(tracker.open.is_empty(), "closed: {:?}", tracker.open);
        assert!(tracker.synced.contains(&name));
    }
}

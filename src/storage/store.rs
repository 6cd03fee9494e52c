//! [`Store`]: the sled-backed store of one data directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::engine::{Backend, BackendBatch, Engine};
use super::{FlushMode, StorageError, StoreConfig};

/// The durable state of one node: one data directory holding one sled
/// database. Cheap to clone (all clones share the database); the directory is
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
    pub(crate) engine: Arc<Engine<SledBackend>>,
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
        check_directory(&path, config.create_if_missing)?;
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
        let engine = Engine::open(
            SledBackend { db },
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

    /// Bytes sled uses on disk.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        Ok(self.engine.backend().db.size_on_disk()?)
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

/// Rejects anything that is not a missing/empty directory or a sled database
/// before sled can write into it.
fn check_directory(path: &Path, create: bool) -> Result<(), StorageError> {
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
            if names.is_empty() {
                return if create {
                    Ok(())
                } else {
                    Err(not_raftkv("the directory is empty"))
                };
            }
            let has = |name: &str| names.iter().any(|n| n == name);
            if has("db") && has("conf") {
                Ok(())
            } else {
                Err(not_raftkv("it holds files that are not a raftkv database"))
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if create {
                std::fs::create_dir_all(path)?;
                Ok(())
            } else {
                Err(not_raftkv("it does not exist"))
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// sled's default tree as an engine backend.
pub(crate) struct SledBackend {
    db: sled::Db,
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
        Ok(self.db.get(key)?)
    }

    fn scan<F>(&self, lo: &[u8], hi: &[u8], reverse: bool, mut visit: F) -> Result<(), StorageError>
    where
        F: FnMut(&[u8], sled::IVec) -> Result<bool, StorageError>,
    {
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
        // Only the default tree may exist in a fresh database.
        Ok(self.db.is_empty() && self.db.tree_names().len() <= 1)
    }

    fn apply(&self, mut batch: SledBatch) -> Result<(), StorageError> {
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
        self.db.flush()?;
        Ok(())
    }

    fn into_bytes(value: sled::IVec) -> Bytes {
        Bytes::from_owner(value)
    }
}

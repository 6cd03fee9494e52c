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
        let backend = SledBackend::new(db, &path)?;
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
///
/// sled's own `flush` writes its log buffers and waits with
/// `sync_file_range`, which on Linux neither persists the file's size nor
/// flushes the device's volatile write cache, and it never syncs the files
/// it keeps for large values (`blobs/`). A flush here therefore adds what a
/// power loss needs: every blob file written since the last flush is synced
/// (and the blob directory with it) before sled's log records that point at
/// them, and the log file is `fdatasync`ed after them.
pub(crate) struct SledBackend {
    db: sled::Db,
    /// sled's log file (`DIR/db`), opened again only to `fdatasync` it.
    log_file: std::fs::File,
    /// sled's directory of large values.
    blobs_dir: PathBuf,
    /// Blob files known durable.
    synced_blobs: std::sync::Mutex<std::collections::HashSet<OsString>>,
}

/// sled's log file and blob directory inside a data directory.
const SLED_LOG_FILE: &str = "db";
const SLED_BLOBS_DIR: &str = "blobs";

impl SledBackend {
    /// Wraps an open database; syncs what an earlier run may have left
    /// unsynced (the blobs, the directories).
    fn new(db: sled::Db, dir: &Path) -> Result<SledBackend, StorageError> {
        let log_file = std::fs::File::open(dir.join(SLED_LOG_FILE))?;
        let backend = SledBackend {
            db,
            log_file,
            blobs_dir: dir.join(SLED_BLOBS_DIR),
            synced_blobs: std::sync::Mutex::new(std::collections::HashSet::new()),
        };
        backend.sync_new_blobs()?;
        sync_directory(dir)?;
        Ok(backend)
    }

    /// Syncs every blob file not yet known durable, then the blob directory
    /// when there was one. A directory listing costs microseconds against the
    /// log flush that follows.
    fn sync_new_blobs(&self) -> Result<(), StorageError> {
        let mut synced = self
            .synced_blobs
            .lock()
            .expect("invariant: a panic while holding the synced-blob set");
        let listing = match std::fs::read_dir(&self.blobs_dir) {
            Ok(listing) => listing,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let mut present = std::collections::HashSet::with_capacity(synced.len());
        let mut new = false;
        for item in listing {
            let item = item?;
            let name = item.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(item.path()) {
                    Ok(file) => file.sync_all()?,
                    // sled removed it meanwhile (garbage collection).
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error.into()),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            sync_directory(&self.blobs_dir)?;
        }
        *synced = present;
        Ok(())
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
        self.sync_new_blobs()?;
        self.db.flush()?;
        self.log_file.sync_data()?;
        Ok(())
    }

    fn into_bytes(value: sled::IVec) -> Bytes {
        Bytes::from_owner(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{KvStorage, Storage, WriteBatch};

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
        let backend = store.engine.backend();
        let on_disk: std::collections::HashSet<OsString> = std::fs::read_dir(&backend.blobs_dir)
            .expect("blob directory")
            .map(|item| item.expect("listing").file_name())
            .collect();
        assert!(
            !on_disk.is_empty(),
            "a 1 MiB value is expected in a blob file"
        );
        let synced = backend.synced_blobs.lock().expect("lock").clone();
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
}

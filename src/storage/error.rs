//! The typed error of the storage engine.

use std::path::PathBuf;

use super::GroupId;

/// Everything that can go wrong when opening, reading or writing a store.
///
/// Expected outcomes of the Raft log interface ([`StorageError::Compacted`],
/// [`StorageError::Unavailable`]) are values the caller reacts to; the rest
/// are bad input from the disk, a misuse of the API, or an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The path is not a raftkv data directory (missing, foreign files, or no format marker).
    #[error("{} is not a raftkv data directory: {reason}", path.display())]
    NotRaftkvDirectory {
        /// The directory that was opened.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// The directory was written by a newer raftkv whose format this build cannot read.
    #[error(
        "data directory format version {found} is newer than the newest this build reads ({supported})"
    )]
    NewerFormat {
        /// Format version found in the directory.
        found: u32,
        /// Newest format version this build supports.
        supported: u32,
    },
    /// Another process (or another open store in this process) holds the directory.
    #[error("{} is locked by another process (is a raftkv node running?)", path.display())]
    Locked {
        /// The locked directory.
        path: PathBuf,
    },
    /// A record failed its checksum or could not be decoded.
    #[error("corrupted record {record}: {detail}")]
    Corruption {
        /// Which record, e.g. `raft group 3 entry 17` or `kv namespace 0 key "x"`.
        record: String,
        /// What is wrong with it.
        detail: String,
    },
    /// An operating-system I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An error reported by sled that is neither I/O, corruption nor a lock conflict.
    #[error("sled error: {0}")]
    Sled(sled::Error),
    /// The index lies in the prefix of the log discarded by a snapshot or compaction.
    #[error("raft group {group}: index {index} is compacted (first index is {first_index})")]
    Compacted {
        /// The Raft group.
        group: GroupId,
        /// The index asked for or written at.
        index: u64,
        /// The first index still in the log.
        first_index: u64,
    },
    /// The index lies beyond the last entry of the log.
    #[error("raft group {group}: index {index} is beyond the last index {last_index}")]
    Unavailable {
        /// The Raft group.
        group: GroupId,
        /// The index asked for.
        index: u64,
        /// The last index in the log.
        last_index: u64,
    },
    /// An append whose first index would leave a hole after the last entry.
    #[error(
        "raft group {group}: append at index {index} leaves a gap after the last index {last_index}"
    )]
    LogGap {
        /// The Raft group.
        group: GroupId,
        /// The first index of the append.
        index: u64,
        /// The last index in the log.
        last_index: u64,
    },
    /// The entries of one append are not consecutive, or one has index or term 0.
    #[error("raft group {group}: bad entries in append: {detail}")]
    BadEntries {
        /// The Raft group.
        group: GroupId,
        /// What is wrong.
        detail: String,
    },
    /// A snapshot older than the prefix of the log that is already compacted.
    #[error(
        "raft group {group}: snapshot at index {index} is older than the compacted prefix (up to {compacted_index})"
    )]
    StaleSnapshot {
        /// The Raft group.
        group: GroupId,
        /// The snapshot's last included index.
        index: u64,
        /// The last compacted index of the log.
        compacted_index: u64,
    },
    /// A write exceeded one of the configured [`Limits`](super::Limits).
    #[error("{what} is {bytes} bytes, more than the limit of {max} bytes")]
    LimitExceeded {
        /// Which limit, named like its field in [`Limits`](super::Limits).
        what: &'static str,
        /// The size that was asked for.
        bytes: u64,
        /// The configured limit.
        max: u64,
    },
    /// An argument outside its documented domain (for example `lo > hi`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier write failed half-way; the store refuses all further calls until reopened.
    #[error("store is unusable after an earlier failed write ({cause}); reopen it")]
    Poisoned {
        /// The error of the failed write.
        cause: String,
    },
}

impl From<sled::Error> for StorageError {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Io(io) => StorageError::Io(io),
            sled::Error::Corruption { at, .. } => StorageError::Corruption {
                record: "sled page store".to_owned(),
                detail: format!("sled reports corruption at {at:?}"),
            },
            other => StorageError::Sled(other),
        }
    }
}

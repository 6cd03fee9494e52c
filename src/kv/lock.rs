//! A distributed lock built only on versioned Put/Get ([`KvClient`]), correct
//! when Puts end in ErrMaybe, with an optional lease so that a crashed
//! holder's lock can be taken over, and fencing tokens.
//!
//! # How it works
//! The lock lives in one key. `""` (or a missing key) means free; otherwise
//! the value is a JSON [`LockRecord`] naming the owner. Acquire reads the key
//! and, if it is free, writes its record with a conditional Put at the
//! version it read, so at most one of several racing acquirers succeeds.
//! Owner ids are unique per lock instance and only the owner writes its own
//! id, so after an ErrMaybe (or any other doubtful outcome) the lock reads the
//! key back: the record carries our id if and only if our Put took effect.
//! Release writes `""` with a conditional Put at the version of our record.
//!
//! # Fencing tokens
//! Acquire returns the key's version just after our record was installed. A
//! key's version only grows, so every later holder gets a larger token. A
//! resource protected by the lock must remember the largest token it has seen
//! and reject requests carrying a smaller one: this is what keeps a holder
//! that was paused past its lease from doing damage, whatever the clocks do.
//!
//! # Leases and clock assumptions
//! With a lease, the record also carries the lease length. A waiter that
//! sees the same record at the same version for a full lease, measured on
//! the waiter's own monotonic clock from the moment its Get returned, takes
//! the lock over with a conditional Put at that version (which fails if the
//! holder renewed meanwhile: every renewal changes the version).
//! - No synchronised wall clocks are needed: each side only measures
//!   durations on its own monotonic clock. The `expires_unix_ms` field of the
//!   record is informational (for people and tools) and never decides anything.
//! - Clock rates may differ by at most `clock_drift_ppm_max` (each clock's
//!   rate error against real time). The holder counts its lease from the
//!   moment it *sent* the Put that installed its record (a lower bound of when
//!   the record appeared) and shortens it by twice the drift bound, so its
//!   [`LockGrant::valid_until`] passes no later, in real time, than any
//!   waiter's takeover.
//! - Process pauses (GC, swapping, a stopped VM) and message delays after the
//!   check are not covered by any lease: use the fencing token.
//! - If an acquire is abandoned (cancelled, or the client reports an error), a
//!   delayed Put of it may still install our record later; without a lease it
//!   then stays held until [`Lock::release`] is called by an instance with
//!   the same owner id.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::clerk::KvClient;
use super::types::{KvError, Version, Versioned};

/// Longest owner id, in bytes.
pub const OWNER_BYTES_MAX: usize = 256;

/// A lock holder's token: the version of the lock key just after it was
/// acquired. Strictly larger for every later holder of the same lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

/// What the lock key holds while the lock is held (JSON-encoded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// The holder's owner id.
    pub owner: String,
    /// The lease length in milliseconds; `None` for a lock without lease.
    pub lease_ms: Option<u64>,
    /// Informational: the holder's wall-clock estimate of when its lease ends
    /// (Unix milliseconds). Never used for decisions.
    pub expires_unix_ms: Option<u64>,
}

impl LockRecord {
    /// The JSON bytes stored in the lock key.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a LockRecord always serialises"))
    }

    /// Parses the bytes of a held lock key.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Settings of a [`Lock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockConfig {
    /// `None`: held until released. `Some(lease)`: may be taken over by a
    /// waiter once the holder has not renewed for `lease`.
    pub lease: Option<Duration>,
    /// Pause between two reads while another owner holds the lock.
    pub retry_interval: Duration,
    /// Bound on each clock's rate error against real time, in parts per
    /// million; the holder's lease is shortened by twice this fraction.
    pub clock_drift_ppm_max: u32,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            lease: None,
            retry_interval: Duration::from_millis(10),
            clock_drift_ppm_max: 1_000,
        }
    }
}

/// The result of a successful acquire or renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockGrant {
    /// Pass this to the protected resource with every request.
    pub token: FencingToken,
    /// Until when (on this process's tokio clock) the lease is certainly still
    /// ours; `None` for a lock without lease (held until released).
    pub valid_until: Option<Instant>,
}

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The client failed in a way the lock cannot recover from (e.g. timeout).
    #[error("lock key {key:?}: client error: {source}")]
    Client {
        /// The lock key.
        key: String,
        /// The client's error.
        source: KvError,
    },
    /// The lock key holds something that is not a lock record.
    #[error("lock key {key:?} holds a value that is not a lock record: {reason}")]
    Corrupt {
        /// The lock key.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// Renew found that this owner no longer holds the lock.
    #[error("lock key {key:?}: lock lost to another owner (or released)")]
    Lost {
        /// The lock key.
        key: String,
    },
    /// Renew was called on a lock without lease.
    #[error("lock key {key:?}: renew needs a lock with a lease")]
    NoLease {
        /// The lock key.
        key: String,
    },
    /// The owner id was empty or longer than [`OWNER_BYTES_MAX`].
    #[error("owner id of {len} bytes must be 1..={OWNER_BYTES_MAX} bytes")]
    BadOwner {
        /// Length of the rejected owner id.
        len: usize,
    },
}

/// A lock on one key, for one owner (see the module docs).
#[derive(Debug)]
pub struct Lock<C> {
    client: C,
    key: String,
    owner: String,
    config: LockConfig,
}

/// What the lock key says, from this owner's point of view.
enum Observed {
    /// Free at this version (0 = missing key).
    Free(Version),
    /// Held by us, at this version.
    Ours(Versioned),
    /// Held by another owner.
    Theirs(Versioned, LockRecord),
}

impl<C: KvClient> Lock<C> {
    /// A lock on `key` with a fresh random 128-bit owner id.
    pub fn new(client: C, key: impl Into<String>, config: LockConfig) -> Self {
        let owner = format!("{:032x}", rand::random::<u128>());
        Self {
            client,
            key: key.into(),
            owner,
            config,
        }
    }

    /// A lock on `key` for a given owner id, e.g. to release from another
    /// process what an earlier one acquired. The id must be unique among all
    /// instances that use this lock at the same time.
    pub fn with_owner(
        client: C,
        key: impl Into<String>,
        owner: impl Into<String>,
        config: LockConfig,
    ) -> Result<Self, LockError> {
        let owner = owner.into();
        if owner.is_empty() || owner.len() > OWNER_BYTES_MAX {
            return Err(LockError::BadOwner { len: owner.len() });
        }
        Ok(Self {
            client,
            key: key.into(),
            owner,
            config,
        })
    }

    /// The lock key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// This instance's owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The client.
    pub fn client(&self) -> &C {
        &self.client
    }

    /// Waits until this owner holds the lock and returns its grant. If the
    /// lock is already held by this owner id, returns at once (renewing the
    /// record first when there is a lease, so the lease start is known).
    pub async fn acquire(&self) -> Result<LockGrant, LockError> {
        // Versions our Puts would create, with when each was sent.
        let mut sent: Vec<(Version, Instant)> = Vec::new();
        // Another owner's record we are timing for a lease takeover.
        let mut watching: Option<(Version, Instant)> = None;
        loop {
            let (observed, read_at) = self.observe().await?;
            forget_passed(&mut sent, &observed);
            let base = match observed {
                Observed::Free(version) => version,
                Observed::Ours(current) => {
                    if let Some(&(_, sent_at)) = sent.iter().find(|(v, _)| *v == current.version) {
                        return Ok(self.grant(current.version, sent_at));
                    }
                    if self.config.lease.is_none() {
                        return Ok(LockGrant {
                            token: FencingToken(current.version),
                            valid_until: None,
                        });
                    }
                    // Ours, but we do not know when it was written: rewrite it.
                    current.version
                }
                Observed::Theirs(current, record) => {
                    let lease = record.lease_ms.map(Duration::from_millis);
                    match (lease, watching) {
                        (Some(lease), Some((version, since)))
                            if version == current.version && read_at - since >= lease =>
                        {
                            tracing::info!(key = %self.key, holder = %record.owner, "lock: lease expired, taking over");
                            current.version
                        }
                        (Some(_), Some((version, _))) if version == current.version => {
                            tokio::time::sleep(self.config.retry_interval).await;
                            continue;
                        }
                        (Some(_), _) => {
                            watching = Some((current.version, read_at));
                            tokio::time::sleep(self.config.retry_interval).await;
                            continue;
                        }
                        (None, _) => {
                            tokio::time::sleep(self.config.retry_interval).await;
                            continue;
                        }
                    }
                }
            };
            let sent_at = Instant::now();
            let installs = base.checked_add(1).expect("lock key version overflowed");
            sent.push((installs, sent_at));
            match self
                .client
                .put(&self.key, self.record().encode(), base)
                .await
            {
                Ok(()) => return Ok(self.grant(installs, sent_at)),
                // Doubtful or lost race: the next read decides.
                Err(KvError::Maybe | KvError::Version | KvError::NoKey) => {}
                Err(source) => return Err(self.client_error(source)),
            }
        }
    }

    /// Extends the lease: rewrites our record, so waiters restart their
    /// timing. Returns a grant with the same token and a new `valid_until`,
    /// or [`LockError::Lost`] if another owner took the lock over.
    pub async fn renew(&self, grant: &LockGrant) -> Result<LockGrant, LockError> {
        if self.config.lease.is_none() {
            return Err(LockError::NoLease {
                key: self.key.clone(),
            });
        }
        let mut sent: Vec<(Version, Instant)> = Vec::new();
        loop {
            let (observed, _) = self.observe().await?;
            forget_passed(&mut sent, &observed);
            let current = match observed {
                Observed::Ours(current) => current,
                Observed::Free(_) | Observed::Theirs(..) => {
                    return Err(LockError::Lost {
                        key: self.key.clone(),
                    });
                }
            };
            if let Some(&(_, sent_at)) = sent.iter().find(|(v, _)| *v == current.version) {
                return Ok(LockGrant {
                    token: grant.token,
                    ..self.grant(current.version, sent_at)
                });
            }
            let sent_at = Instant::now();
            let installs = current
                .version
                .checked_add(1)
                .expect("lock key version overflowed");
            sent.push((installs, sent_at));
            match self
                .client
                .put(&self.key, self.record().encode(), current.version)
                .await
            {
                Ok(()) => {
                    return Ok(LockGrant {
                        token: grant.token,
                        ..self.grant(installs, sent_at)
                    });
                }
                Err(KvError::Maybe | KvError::Version | KvError::NoKey) => {}
                Err(source) => return Err(self.client_error(source)),
            }
        }
    }

    /// Releases the lock if this owner holds it. Afterwards this owner does
    /// not hold the lock (it is free, or another owner took it over).
    pub async fn release(&self) -> Result<(), LockError> {
        loop {
            let (observed, _) = self.observe().await?;
            let current = match observed {
                Observed::Ours(current) => current,
                Observed::Free(_) | Observed::Theirs(..) => return Ok(()),
            };
            match self
                .client
                .put(&self.key, Bytes::new(), current.version)
                .await
            {
                Ok(()) => return Ok(()),
                Err(KvError::Maybe | KvError::Version | KvError::NoKey) => {}
                Err(source) => return Err(self.client_error(source)),
            }
        }
    }

    /// Reads the lock key; returns what it says and when the read returned.
    async fn observe(&self) -> Result<(Observed, Instant), LockError> {
        let read = self.client.get(&self.key).await;
        let read_at = Instant::now();
        let observed = match read {
            Err(KvError::NoKey) => Observed::Free(0),
            Err(source) => return Err(self.client_error(source)),
            Ok(current) if current.value.is_empty() => Observed::Free(current.version),
            Ok(current) => {
                let record =
                    LockRecord::decode(&current.value).map_err(|error| LockError::Corrupt {
                        key: self.key.clone(),
                        reason: error.to_string(),
                    })?;
                if record.owner == self.owner {
                    Observed::Ours(current)
                } else {
                    Observed::Theirs(current, record)
                }
            }
        };
        Ok((observed, read_at))
    }

    fn record(&self) -> LockRecord {
        let lease_ms = self
            .config
            .lease
            .map(|lease| u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let expires_unix_ms = lease_ms.and_then(|lease_ms| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            u64::try_from(now.as_millis()).ok()?.checked_add(lease_ms)
        });
        LockRecord {
            owner: self.owner.clone(),
            lease_ms,
            expires_unix_ms,
        }
    }

    /// The grant for our record installed at `version` by a Put sent at `sent_at`.
    fn grant(&self, version: Version, sent_at: Instant) -> LockGrant {
        let valid_until = self.config.lease.map(|lease| {
            let margin = lease.mul_f64(2.0 * f64::from(self.config.clock_drift_ppm_max) / 1e6);
            sent_at + lease.saturating_sub(margin)
        });
        LockGrant {
            token: FencingToken(version),
            valid_until,
        }
    }

    fn client_error(&self, source: KvError) -> LockError {
        LockError::Client {
            key: self.key.clone(),
            source,
        }
    }
}

/// Drops our sent Puts that can no longer be the one that installed our
/// record: versions only grow, so one that would have created a version
/// below the observed one never will. Keeps `sent` small while waiting.
fn forget_passed(sent: &mut Vec<(Version, Instant)>, observed: &Observed) {
    let version = match observed {
        Observed::Free(version) => *version,
        Observed::Ours(current) | Observed::Theirs(current, _) => current.version,
    };
    sent.retain(|&(installs, _)| installs >= version);
}

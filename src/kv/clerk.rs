//! The Clerk: the client side of the versioned key/value service. It retries
//! every RPC until a server replies, moves to another server on "no reply" and
//! on ErrWrongLeader (remembering the last server that answered), and applies
//! the ErrMaybe rule. It is generic over a small transport trait ([`KvRpc`]),
//! so the simulated network, TCP, a single server or a Raft group all fit.
//!
//! The ErrMaybe rule: if a Put gets ErrVersion after an earlier copy of it may
//! have been executed, that copy may have been applied (its reply was lost),
//! so the Clerk returns [`KvError::Maybe`]; otherwise [`KvError::Version`].
//! An earlier copy "may have been executed" when it got no reply or
//! [`KvError::LeadershipLost`] (a leader that appended it lost leadership
//! before answering: the entry may still commit). An ErrWrongLeader answer
//! ([`KvError::WrongLeader`]) says the server did nothing, so a Put first sent
//! to a follower and then to the leader still gets a precise ErrVersion.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::types::{KvCommand, KvError, KvReply, Version, Versioned};
use crate::NodeId;

/// A transport could not deliver a request or did not get its reply: the
/// server may or may not have executed the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no reply")]
pub struct NoReply;

/// Sends one key/value request to one server and waits for its reply.
///
/// Contract for implementations: return `Err(NoReply)` when the request or
/// its reply was lost, the server is unreachable or a transport timeout
/// passed; never retry internally (the Clerk owns retries and the ErrMaybe
/// rule, which depend on counting sends). A call must finish in bounded time.
pub trait KvRpc: Send + Sync {
    /// Sends `request` to `server` and returns its reply.
    fn call(
        &self,
        server: NodeId,
        request: &KvCommand,
    ) -> impl Future<Output = Result<KvReply, NoReply>> + Send;
}

impl<T: KvRpc + ?Sized> KvRpc for Arc<T> {
    fn call(
        &self,
        server: NodeId,
        request: &KvCommand,
    ) -> impl Future<Output = Result<KvReply, NoReply>> + Send {
        (**self).call(server, request)
    }
}

impl<T: KvRpc + ?Sized> KvRpc for &T {
    fn call(
        &self,
        server: NodeId,
        request: &KvCommand,
    ) -> impl Future<Output = Result<KvReply, NoReply>> + Send {
        (**self).call(server, request)
    }
}

/// The two client operations of the versioned key/value service, as seen by
/// code built on top of a client (the lock). Implemented by [`Clerk`].
pub trait KvClient: Send + Sync {
    /// Reads `key`: its value and version, or [`KvError::NoKey`].
    fn get(&self, key: &str) -> impl Future<Output = Result<Versioned, KvError>> + Send;
    /// Installs `value` at `key` if its version is `version` (0 = create),
    /// with the Lab 2 outcomes, including [`KvError::Maybe`].
    fn put(
        &self,
        key: &str,
        value: Bytes,
        version: Version,
    ) -> impl Future<Output = Result<(), KvError>> + Send;
}

impl<T: KvClient + ?Sized> KvClient for Arc<T> {
    fn get(&self, key: &str) -> impl Future<Output = Result<Versioned, KvError>> + Send {
        (**self).get(key)
    }
    fn put(
        &self,
        key: &str,
        value: Bytes,
        version: Version,
    ) -> impl Future<Output = Result<(), KvError>> + Send {
        (**self).put(key, value, version)
    }
}

impl<T: KvClient + ?Sized> KvClient for &T {
    fn get(&self, key: &str) -> impl Future<Output = Result<Versioned, KvError>> + Send {
        (**self).get(key)
    }
    fn put(
        &self,
        key: &str,
        value: Bytes,
        version: Version,
    ) -> impl Future<Output = Result<(), KvError>> + Send {
        (**self).put(key, value, version)
    }
}

/// Retry behaviour of a [`Clerk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClerkConfig {
    /// Pause after the first round (one RPC to each server) without a usable
    /// reply; doubled after each further such round.
    pub retry_backoff_min: Duration,
    /// Upper bound of the pause between rounds.
    pub retry_backoff_max: Duration,
    /// Give up on an operation after this long with [`KvError::Timeout`];
    /// `None` retries forever, as the lab's Clerk does.
    pub deadline: Option<Duration>,
}

impl Default for ClerkConfig {
    fn default() -> Self {
        Self {
            retry_backoff_min: Duration::from_millis(10),
            retry_backoff_max: Duration::from_secs(1),
            deadline: None,
        }
    }
}

/// Why a [`Clerk`] could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClerkConfigError {
    /// The server list was empty.
    #[error("the clerk needs at least one server")]
    NoServers,
    /// `retry_backoff_min` was zero, which would make the Clerk spin.
    #[error("retry_backoff_min must be greater than zero")]
    ZeroBackoff,
    /// `retry_backoff_min` was larger than `retry_backoff_max`.
    #[error("retry_backoff_min ({min:?}) is larger than retry_backoff_max ({max:?})")]
    BackoffRange {
        /// The configured minimum.
        min: Duration,
        /// The configured maximum.
        max: Duration,
    },
}

/// The client of the versioned key/value service (see the module docs).
///
/// A Clerk keeps no state besides the index of the server that last answered,
/// so one Clerk may be shared by concurrent tasks (`&self` methods).
#[derive(Debug)]
pub struct Clerk<T> {
    transport: T,
    servers: Vec<NodeId>,
    /// Index into `servers` of the server to try first.
    leader: AtomicUsize,
    config: ClerkConfig,
}

/// A usable reply, and whether an earlier RPC of the same operation may have
/// been executed (no reply, leadership lost, garbage reply).
struct Answer {
    reply: KvReply,
    maybe_executed_before: bool,
}

impl<T: KvRpc> Clerk<T> {
    /// A Clerk that talks to `servers` (in rotation order) through `transport`.
    pub fn new(
        transport: T,
        servers: Vec<NodeId>,
        config: ClerkConfig,
    ) -> Result<Self, ClerkConfigError> {
        if servers.is_empty() {
            return Err(ClerkConfigError::NoServers);
        }
        if config.retry_backoff_min.is_zero() {
            return Err(ClerkConfigError::ZeroBackoff);
        }
        if config.retry_backoff_min > config.retry_backoff_max {
            return Err(ClerkConfigError::BackoffRange {
                min: config.retry_backoff_min,
                max: config.retry_backoff_max,
            });
        }
        Ok(Self {
            transport,
            servers,
            leader: AtomicUsize::new(0),
            config,
        })
    }

    /// The servers, in rotation order.
    pub fn servers(&self) -> &[NodeId] {
        &self.servers
    }

    /// The server the next operation will try first (the last one that answered).
    pub fn leader(&self) -> NodeId {
        self.servers[self.leader.load(Ordering::Relaxed)]
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The retry configuration.
    pub fn config(&self) -> &ClerkConfig {
        &self.config
    }

    /// Reads `key`: `Ok` with value and version, or [`KvError::NoKey`],
    /// [`KvError::TooLarge`] (not sent) or [`KvError::Timeout`].
    pub async fn get(&self, key: &str) -> Result<Versioned, KvError> {
        let command = KvCommand::Get {
            key: key.to_owned(),
        };
        command.check_size()?;
        let answer = self.run(&command).await?;
        match answer.reply {
            KvReply::Get(result) => result,
            KvReply::Put(_) => unreachable!("run() only returns replies of the request's kind"),
        }
    }

    /// Installs `value` at `key` if the key's version is `version` (0 creates
    /// a missing key). Returns `Ok`, [`KvError::Version`] (no earlier copy of
    /// the Put can have been executed), [`KvError::Maybe`] (ErrVersion after
    /// an earlier copy may have been executed: see the module docs),
    /// [`KvError::NoKey`], [`KvError::TooLarge`] (not sent) or
    /// [`KvError::Timeout`] (may or may not have been applied).
    pub async fn put(&self, key: &str, value: Bytes, version: Version) -> Result<(), KvError> {
        let command = KvCommand::Put {
            key: key.to_owned(),
            value,
            version,
        };
        command.check_size()?;
        let answer = self.run(&command).await?;
        match answer.reply {
            KvReply::Put(Err(KvError::Version)) if answer.maybe_executed_before => {
                Err(KvError::Maybe)
            }
            KvReply::Put(result) => result,
            KvReply::Get(_) => unreachable!("run() only returns replies of the request's kind"),
        }
    }

    /// Sends `command` until a server gives a usable reply (anything but no
    /// reply, ErrWrongLeader or a reply of the wrong kind), rotating servers
    /// and backing off between rounds, within the configured deadline.
    async fn run(&self, command: &KvCommand) -> Result<Answer, KvError> {
        let deadline = self.config.deadline.map(|after| Instant::now() + after);
        let mut index = self.leader.load(Ordering::Relaxed);
        let mut backoff = self.config.retry_backoff_min;
        let mut attempts: u64 = 0;
        let mut attempts_in_round = 0usize;
        // Whether an earlier RPC of this operation may have been executed.
        let mut maybe_executed = false;
        loop {
            let server = self.servers[index];
            let call = self.transport.call(server, command);
            let result = match deadline {
                None => call.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                    Ok(result) => result,
                    Err(_elapsed) => {
                        return Err(KvError::Timeout {
                            attempts: attempts + 1,
                        });
                    }
                },
            };
            attempts += 1;
            let mut hint = None;
            match result {
                Ok(KvReply::Put(Err(KvError::WrongLeader { leader_hint })))
                | Ok(KvReply::Get(Err(KvError::WrongLeader { leader_hint }))) => {
                    tracing::debug!(server, ?leader_hint, "kv clerk: wrong leader");
                    hint = leader_hint;
                }
                Ok(KvReply::Put(Err(KvError::LeadershipLost { leader_hint })))
                | Ok(KvReply::Get(Err(KvError::LeadershipLost { leader_hint }))) => {
                    tracing::debug!(server, ?leader_hint, "kv clerk: leadership lost");
                    hint = leader_hint;
                    maybe_executed = true;
                }
                Ok(reply) if same_kind(command, &reply) => {
                    self.leader.store(index, Ordering::Relaxed);
                    return Ok(Answer {
                        reply,
                        maybe_executed_before: maybe_executed,
                    });
                }
                Ok(reply) => {
                    tracing::warn!(server, ?reply, "kv clerk: reply of the wrong kind, ignored");
                    maybe_executed = true;
                }
                Err(NoReply) => {
                    tracing::debug!(server, attempts, "kv clerk: no reply");
                    maybe_executed = true;
                }
            }
            index = match hint.and_then(|id| self.servers.iter().position(|&s| s == id)) {
                Some(hinted) if hinted != index => hinted,
                _ => (index + 1) % self.servers.len(),
            };
            attempts_in_round += 1;
            if attempts_in_round >= self.servers.len() {
                attempts_in_round = 0;
                let wake = Instant::now() + backoff;
                match deadline {
                    Some(deadline) if wake >= deadline => {
                        tokio::time::sleep_until(deadline).await;
                        return Err(KvError::Timeout { attempts });
                    }
                    _ => tokio::time::sleep_until(wake).await,
                }
                backoff = (backoff * 2).min(self.config.retry_backoff_max);
            }
        }
    }
}

fn same_kind(command: &KvCommand, reply: &KvReply) -> bool {
    matches!(
        (command, reply),
        (KvCommand::Put { .. }, KvReply::Put(_)) | (KvCommand::Get { .. }, KvReply::Get(_))
    )
}

impl<T: KvRpc> KvClient for Clerk<T> {
    fn get(&self, key: &str) -> impl Future<Output = Result<Versioned, KvError>> + Send {
        Clerk::get(self, key)
    }

    fn put(
        &self,
        key: &str,
        value: Bytes,
        version: Version,
    ) -> impl Future<Output = Result<(), KvError>> + Send {
        Clerk::put(self, key, value, version)
    }
}

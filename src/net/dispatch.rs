//! The table of handlers and inboxes of one node, shared by both transports.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::NodeId;
use crate::net::transport::{HandlerFuture, RawHandler, RawInbox};
use crate::net::{Kind, NetError, RemoteFault};

/// Why a one-way message was not put into an inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Undelivered {
    /// No inbox is open for the kind id.
    NoInbox,
    /// The inbox has another schema version.
    VersionMismatch,
    /// The inbox is full.
    Full,
    /// The inbox's receiver was dropped, or the node is shut down.
    Closed,
}

#[derive(Default)]
struct Tables {
    handlers: HashMap<u16, (Kind, RawHandler)>,
    inboxes: HashMap<u16, (Kind, mpsc::Sender<(NodeId, Bytes)>)>,
    closed: bool,
}

/// Handlers and inboxes by kind id.
#[derive(Default)]
pub(crate) struct Dispatch {
    tables: Mutex<Tables>,
    /// One-way messages dropped because no inbox could take them.
    undelivered: AtomicU64,
}

impl Dispatch {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A poisoned lock means a panic while holding it: the tables are plain
        // maps that stay consistent, so keep going.
        self.tables
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(crate) fn register(&self, kind: Kind, handler: RawHandler) -> Result<(), NetError> {
        let mut tables = self.tables();
        if tables.closed {
            return Err(NetError::Shutdown);
        }
        if tables.handlers.contains_key(&kind.id) || tables.inboxes.contains_key(&kind.id) {
            return Err(NetError::AlreadyRegistered(kind));
        }
        tables.handlers.insert(kind.id, (kind, handler));
        Ok(())
    }

    pub(crate) fn open_inbox(
        &self,
        kind: Kind,
        capacity_messages: usize,
    ) -> Result<RawInbox, NetError> {
        if capacity_messages == 0 {
            return Err(NetError::Config(
                "inbox capacity must be at least 1 message".into(),
            ));
        }
        let mut tables = self.tables();
        if tables.closed {
            return Err(NetError::Shutdown);
        }
        if tables.handlers.contains_key(&kind.id) || tables.inboxes.contains_key(&kind.id) {
            return Err(NetError::AlreadyRegistered(kind));
        }
        let (sender, receiver) = mpsc::channel(capacity_messages);
        tables.inboxes.insert(kind.id, (kind, sender));
        Ok(RawInbox { receiver })
    }

    /// Starts the handler for a request of `kind`, or returns the fault to
    /// send back instead.
    pub(crate) fn handle(
        &self,
        from: NodeId,
        kind: Kind,
        payload: Bytes,
    ) -> Result<HandlerFuture, RemoteFault> {
        let handler = {
            let tables = self.tables();
            if tables.closed {
                return Err(RemoteFault::ShuttingDown);
            }
            match tables.handlers.get(&kind.id) {
                None => return Err(RemoteFault::UnknownKind),
                Some((registered, _)) if registered.version != kind.version => {
                    return Err(RemoteFault::VersionMismatch {
                        supported: registered.version,
                    });
                }
                Some((_, handler)) => handler.clone(),
            }
        };
        // Invoke outside the lock: the handler may register more handlers.
        Ok(handler(from, payload))
    }

    /// Puts a one-way message into the inbox of its kind, without waiting.
    pub(crate) fn deliver(
        &self,
        from: NodeId,
        kind: Kind,
        payload: Bytes,
    ) -> Result<(), Undelivered> {
        let outcome = {
            let tables = self.tables();
            match tables.inboxes.get(&kind.id) {
                _ if tables.closed => Err(Undelivered::Closed),
                None => Err(Undelivered::NoInbox),
                Some((registered, _)) if registered.version != kind.version => {
                    Err(Undelivered::VersionMismatch)
                }
                Some((_, sender)) => {
                    sender
                        .try_send((from, payload))
                        .map_err(|error| match error {
                            mpsc::error::TrySendError::Full(_) => Undelivered::Full,
                            mpsc::error::TrySendError::Closed(_) => Undelivered::Closed,
                        })
                }
            }
        };
        if let Err(reason) = outcome {
            self.undelivered.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(from, %kind, ?reason, "one-way message dropped at the receiver");
        }
        outcome
    }

    /// Drops every handler and closes every inbox; later registrations fail.
    pub(crate) fn close(&self) {
        let mut tables = self.tables();
        tables.closed = true;
        tables.handlers.clear();
        tables.inboxes.clear();
    }

    /// How many one-way messages were dropped at this node's inboxes.
    pub(crate) fn undelivered(&self) -> u64 {
        self.undelivered.load(Ordering::Relaxed)
    }
}

//! The key/value RPC on the net layer: the request kind, the reply type a
//! server sends, and [`EndpointRpc`], the [`KvRpc`] transport that lets a
//! [`Clerk`](super::Clerk) talk to servers through a [`net::Endpoint`]
//! (simulated network or TCP alike).
//!
//! The request is a [`KvCommand`] itself (kind [`KV_REQUEST_KIND`]); the
//! reply is a [`KvResponse`]: the state machine's [`KvReply`], or a
//! [`ServerUnavailable`] saying the server did not execute the command (busy,
//! shutting down, storage failed). Every server kind (the single-node
//! [`KvServer`](super::KvServer), the replicated one) answers this RPC, so a
//! client never needs to know which kind it talks to.
//!
//! [`net::Endpoint`]: crate::net::Endpoint

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::clerk::{KvRpc, NoReply};
use super::types::{KvCommand, KvReply};
use crate::NodeId;
use crate::net::{Endpoint, Kind, NetError, Rpc};

/// Kind of the key/value request ([`KvCommand`]) and its reply ([`KvResponse`]).
pub const KV_REQUEST_KIND: Kind = Kind::new(0x0201, 1);

/// Why a server did not execute a command. The command had no effect; the
/// client should try again (later, or at another server).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum ServerUnavailable {
    /// The server's bounded request queue was full.
    #[error("the server's request queue is full")]
    Busy,
    /// The server is shutting down and takes no new requests.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The server's storage failed; it serves nothing until restarted.
    #[error("the server's storage failed")]
    StorageFailed,
}

/// What a key/value server answers to a [`KvCommand`].
pub type KvResponse = Result<KvReply, ServerUnavailable>;

impl Rpc for KvCommand {
    const KIND: Kind = KV_REQUEST_KIND;
    type Reply = KvResponse;
}

/// A [`KvRpc`] over a [`net::Endpoint`](crate::net::Endpoint): sends each
/// command as one call with a per-call timeout.
///
/// Every failure maps to [`NoReply`], as the [`KvRpc`] contract asks: a
/// timeout or a lost reply (the command may have run), a refused or
/// unreachable server, a [`ServerUnavailable`] answer (it did not run). The
/// Clerk then moves on to the next server; treating "did not run" as "may
/// have run" only makes the Clerk more careful (ErrMaybe instead of
/// ErrVersion), never wrong.
#[derive(Clone, Debug)]
pub struct EndpointRpc {
    endpoint: Endpoint,
    call_timeout: Duration,
}

impl EndpointRpc {
    /// Calls servers through `endpoint`, giving up on a call (as
    /// [`NoReply`]) after `call_timeout`.
    pub fn new(endpoint: Endpoint, call_timeout: Duration) -> Self {
        Self {
            endpoint,
            call_timeout,
        }
    }

    /// The endpoint calls go through.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The per-call timeout.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }
}

impl KvRpc for EndpointRpc {
    fn call(
        &self,
        server: NodeId,
        request: &KvCommand,
    ) -> impl Future<Output = Result<KvReply, NoReply>> + Send {
        // The request is sent now (see `Endpoint::call`); the future only waits.
        let reply = self
            .endpoint
            .call_timeout(server, request, self.call_timeout);
        async move {
            match reply.await {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(unavailable)) => {
                    tracing::debug!(server, %unavailable, "kv rpc: server unavailable");
                    Err(NoReply)
                }
                Err(error @ NetError::NoReply { .. }) => {
                    tracing::debug!(server, %error, "kv rpc: no reply");
                    Err(NoReply)
                }
                Err(error) => {
                    tracing::debug!(server, %error, "kv rpc: call failed");
                    Err(NoReply)
                }
            }
        }
    }
}

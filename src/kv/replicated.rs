//! The versioned key/value service replicated on Raft (Lab 4): the same
//! state machine as the single-node server ([`apply`](super::apply), the
//! Lab 2 rules), applied through an [`Rsm`] on every replica.
//!
//! # How a request is served
//! [`RaftKvServer`] answers the key/value RPC ([`KV_REQUEST_KIND`](super::KV_REQUEST_KIND)) on the
//! node's [`Endpoint`], next to the Raft messages:
//! - a **Put** is submitted to the log and answered with the state machine's
//!   reply once it is committed (durable on a majority) and applied;
//! - a **Get** is served without writing to the log: the leader confirms its
//!   leadership with a quorum (ReadIndex), waits until it has applied
//!   everything committed before the request, and reads its state machine.
//!   Only a leader that has not committed an entry of its term yet appends a
//!   no-op first (the ReadIndex rule), so reads fall back to the log only then;
//! - a replica that is not the leader, or loses leadership while the request
//!   waits, answers [`KvError::WrongLeader`] with the leader it knows of, and
//!   the [`Clerk`](super::Clerk) retries there (a Put re-sent after that may
//!   get ErrMaybe, the Lab 2 rule).
//!
//! # State and durability
//! The map lives in memory on each replica ([`KvStateMachine`]); its durable
//! form is the Raft log and snapshot in the node's store. A restarted replica
//! restores the latest snapshot and replays the log after it. With
//! [`RsmConfig::maxraftstate_bytes`] set, the replica snapshots its map once
//! the persisted log reaches that size, which bounds the log on disk and the
//! replay time. No per-client state is kept: versions make Puts conditional,
//! so duplicates need no table.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::rpc::{KvResponse, ServerUnavailable};
use super::state_machine::MemoryKv;
use super::status::serve_status;
use super::types::{KvCommand, KvError, KvReply, Versioned};
use crate::NodeId;
use crate::net::{Endpoint, NetError};
use crate::rsm::{CodecError, Rsm, RsmConfig, RsmStartError, StateMachine, SubmitError};
use crate::storage::RaftLogStorage;

/// Format byte of a [`KvStateMachine`] snapshot.
pub const KV_SNAPSHOT_FORMAT: u8 = 1;

/// The versioned map as a replicated [`StateMachine`]: commands are
/// [`KvCommand`]s (log entries carry [`KvCommand::encode`], which
/// `raftkv inspect` decodes), outputs are [`KvReply`]s.
#[derive(Clone, Debug, Default)]
pub struct KvStateMachine {
    map: MemoryKv,
}

#[derive(Serialize, Deserialize)]
struct SnapshotRecord {
    key: String,
    value: Bytes,
    version: u64,
}

impl KvStateMachine {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The map.
    pub fn map(&self) -> &MemoryKv {
        &self.map
    }
}

impl StateMachine for KvStateMachine {
    type Command = KvCommand;
    type Output = KvReply;

    fn encode_command(command: &KvCommand) -> Bytes {
        command.encode()
    }

    fn decode_command(data: &[u8]) -> Result<KvCommand, CodecError> {
        KvCommand::decode(data).map_err(|error| CodecError::new("kv command", error))
    }

    fn apply(&mut self, _index: u64, command: KvCommand) -> KvReply {
        self.map.apply(&command)
    }

    /// One format byte, then the records sorted by key (postcard), so every
    /// replica produces the same bytes for the same map.
    fn snapshot(&self) -> Bytes {
        let mut records: Vec<SnapshotRecord> = self
            .map
            .iter()
            .map(|(key, versioned)| SnapshotRecord {
                key: key.to_owned(),
                value: versioned.value.clone(),
                version: versioned.version,
            })
            .collect();
        records.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let out = postcard::to_extend(&records, vec![KV_SNAPSHOT_FORMAT])
            .expect("encoding into a Vec cannot fail");
        Bytes::from(out)
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), CodecError> {
        let (&format, body) = data
            .split_first()
            .ok_or_else(|| CodecError::new("kv snapshot", "empty"))?;
        if format != KV_SNAPSHOT_FORMAT {
            return Err(CodecError::new(
                "kv snapshot",
                format!("unknown format {format}"),
            ));
        }
        let records: Vec<SnapshotRecord> =
            postcard::from_bytes(body).map_err(|error| CodecError::new("kv snapshot", error))?;
        let mut map = MemoryKv::new();
        for record in records {
            if record.version == 0 {
                return Err(CodecError::new(
                    "kv snapshot",
                    format!("key {:?} at version 0", record.key),
                ));
            }
            map.restore(
                record.key,
                Versioned {
                    value: record.value,
                    version: record.version,
                },
            );
        }
        self.map = map;
        Ok(())
    }
}

/// Settings of a [`RaftKvServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftKvConfig {
    /// The replica's settings (Raft node, snapshot threshold, timeouts).
    pub rsm: RsmConfig,
    /// Requests being served at once; beyond this a request is answered
    /// [`ServerUnavailable::Busy`] at once. Default 8192.
    pub requests_inflight_max: usize,
}

impl Default for RaftKvConfig {
    fn default() -> Self {
        RaftKvConfig {
            rsm: RsmConfig::default(),
            requests_inflight_max: 8192,
        }
    }
}

/// Why a [`RaftKvServer`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftKvError {
    /// The replica could not start.
    #[error(transparent)]
    Start(#[from] RsmStartError),
    /// The request or status handler could not be registered on the endpoint.
    #[error("cannot register the kv request handlers: {0}")]
    Register(#[source] NetError),
    /// `requests_inflight_max` is zero.
    #[error("requests_inflight_max must be at least 1")]
    InflightZero,
}

/// One replica of the replicated key/value service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RaftKvServer {
    rsm: Rsm<KvStateMachine>,
}

impl RaftKvServer {
    /// Starts replica `id` of the cluster `voters` on `storage`, serving the
    /// key/value RPC, the status RPC ([`serve_status`]) and Raft on
    /// `endpoint`. Restarting on the same storage resumes from its snapshot
    /// and log.
    pub fn start<S: RaftLogStorage + 'static>(
        id: NodeId,
        voters: &[NodeId],
        config: RaftKvConfig,
        storage: S,
        endpoint: Endpoint,
    ) -> Result<RaftKvServer, RaftKvError> {
        if config.requests_inflight_max == 0 {
            return Err(RaftKvError::InflightZero);
        }
        // The node owns the storage; the status RPC only holds a weak handle.
        let storage = Arc::new(storage);
        let status_storage = Arc::downgrade(&storage);
        let rsm = Rsm::start(
            id,
            voters,
            config.rsm,
            storage,
            endpoint.clone(),
            KvStateMachine::new(),
        )?;
        let inflight = Arc::new(Semaphore::new(config.requests_inflight_max));
        let handler_rsm = rsm.clone();
        let registered = endpoint.register(move |_from, command: KvCommand| {
            let rsm = handler_rsm.clone();
            let permit = inflight.clone().try_acquire_owned();
            async move {
                let Ok(_permit) = permit else {
                    return Err(ServerUnavailable::Busy);
                };
                serve(&rsm, command).await
            }
        });
        let registered = registered.and_then(|()| serve_status(&endpoint, &rsm, status_storage));
        if let Err(error) = registered {
            let stopping = rsm.clone();
            tokio::spawn(async move { stopping.shutdown().await });
            return Err(RaftKvError::Register(error));
        }
        Ok(RaftKvServer { rsm })
    }

    /// The replica (its Raft node, applied index, local reads).
    pub fn rsm(&self) -> &Rsm<KvStateMachine> {
        &self.rsm
    }

    /// Stops the replica; requests still waiting are answered
    /// [`ServerUnavailable::ShuttingDown`]. The endpoint is left to the caller.
    pub async fn shutdown(&self) {
        self.rsm.shutdown().await;
    }
}

/// Serves one request (see the module docs).
async fn serve(rsm: &Rsm<KvStateMachine>, command: KvCommand) -> KvResponse {
    if let Err(error) = command.check_size() {
        return Ok(reply_error(&command, error));
    }
    let outcome = match &command {
        KvCommand::Put { .. } => rsm.submit(&command).await,
        KvCommand::Get { key } => {
            rsm.read(|machine| match machine.map.get(key) {
                Some(versioned) => KvReply::Get(Ok(versioned.clone())),
                None => KvReply::Get(Err(KvError::NoKey)),
            })
            .await
        }
    };
    match outcome {
        Ok(reply) => Ok(reply),
        // Nothing was appended: the clerk may resend without doubt.
        Err(SubmitError::NotLeader { leader_hint }) => {
            Ok(reply_error(&command, KvError::WrongLeader { leader_hint }))
        }
        // Appended, outcome unknown (a resend that meets ErrVersion is ErrMaybe).
        Err(SubmitError::LeadershipLost { leader_hint }) => Ok(reply_error(
            &command,
            KvError::LeadershipLost { leader_hint },
        )),
        // A leader cut off from its quorum times out: send the client on.
        Err(SubmitError::Timeout) => Ok(reply_error(
            &command,
            KvError::LeadershipLost { leader_hint: None },
        )),
        Err(SubmitError::TooLarge { bytes, max }) => {
            tracing::warn!(bytes, max, "kv: command too large for the raft log");
            Err(ServerUnavailable::Busy)
        }
        Err(SubmitError::Busy | SubmitError::Undecodable) => Err(ServerUnavailable::Busy),
        Err(SubmitError::Stopped) => Err(ServerUnavailable::ShuttingDown),
    }
}

fn reply_error(command: &KvCommand, error: KvError) -> KvReply {
    match command {
        KvCommand::Put { .. } => KvReply::Put(Err(error)),
        KvCommand::Get { .. } => KvReply::Get(Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kv::{Clerk, ClerkConfig, EndpointRpc};
    use crate::net::sim::{SimConfig, SimNetwork};
    use crate::storage::{MemDisk, MemStore};

    fn start(net: &SimNetwork, disk: &MemDisk, id: NodeId, voters: &[NodeId]) -> RaftKvServer {
        let mut config = RaftKvConfig::default();
        config.rsm.node.rng_seed = id;
        config.rsm.maxraftstate_bytes = Some(4096);
        let store = MemStore::open(disk).unwrap();
        RaftKvServer::start(id, voters, config, store, net.restart(id)).unwrap()
    }

    // The snapshot round-trips the map, is byte-identical for equal maps,
    // and a corrupted snapshot is an error, not a panic.
    #[test]
    fn snapshot_round_trips_and_rejects_garbage() {
        let mut machine = KvStateMachine::new();
        for (i, key) in ["b", "a", "c"].iter().enumerate() {
            let put = KvCommand::Put {
                key: key.to_string(),
                value: Bytes::from(vec![i as u8; 3]),
                version: 0,
            };
            assert_eq!(machine.apply(i as u64 + 1, put), KvReply::Put(Ok(())));
        }
        let snapshot = machine.snapshot();
        let mut restored = KvStateMachine::new();
        restored.restore(&snapshot).unwrap();
        assert_eq!(restored.map(), machine.map());
        assert_eq!(restored.snapshot(), snapshot);
        assert!(restored.restore(&snapshot[..snapshot.len() - 1]).is_err());
        assert!(restored.restore(&[]).is_err());
        assert!(restored.restore(&[9, 0]).is_err());
        assert_eq!(
            restored.map(),
            machine.map(),
            "a failed restore changes nothing"
        );
    }

    // A clerk writes and reads through a 3-replica cluster, and the service
    // keeps every acknowledged write when the leader crashes.
    #[tokio::test(start_paused = true)]
    async fn clerk_survives_a_leader_crash() {
        let net = SimNetwork::new(SimConfig::new(5));
        let voters = [1, 2, 3];
        let disks: Vec<MemDisk> = voters.iter().map(|_| MemDisk::new()).collect();
        let servers: Vec<RaftKvServer> = voters
            .iter()
            .zip(&disks)
            .map(|(&id, disk)| start(&net, disk, id, &voters))
            .collect();
        let clerk = Clerk::new(
            EndpointRpc::new(net.add_client(), Duration::from_millis(500)),
            voters.to_vec(),
            ClerkConfig::default(),
        )
        .unwrap();
        for i in 0..50u64 {
            clerk.put("k", Bytes::from(i.to_string()), i).await.unwrap();
        }
        let leader = servers
            .iter()
            .position(|s| s.rsm().node().state().1)
            .expect("a leader answered the puts");
        net.crash(voters[leader]);
        servers[leader].shutdown().await;
        let got = clerk.get("k").await.unwrap();
        assert_eq!((got.value, got.version), (Bytes::from("49"), 50));
        clerk.put("k", Bytes::from("50"), 50).await.unwrap();
        // The crashed replica comes back from its disk and catches up.
        let back = start(&net, &disks[leader].fork(), voters[leader], &voters);
        back.rsm().wait_applied(52).await.unwrap();
        let local = back.rsm().read_local(|m| m.map().get("k").cloned());
        assert_eq!(local.map(|v| v.version), Some(51));
        for server in servers.iter().chain([&back]) {
            server.shutdown().await;
        }
    }
}

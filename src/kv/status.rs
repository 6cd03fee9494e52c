//! The status RPC of a replica: a small request ([`StatusRequest`], kind
//! [`KV_STATUS_KIND`]) answered with the replica's [`NodeStatus`] — its Raft
//! role, term, leader and indexes, the size of its persisted Raft log, and
//! its work counters ([`NodeCounters`]: flushes, entries written and sent).
//! It is what `raftkv status` shows, one row per node, and what a test or an
//! operator polls to see a leader elected or a restarted node catch up.
//!
//! [`RaftKvServer::start`](super::RaftKvServer::start) registers it; an
//! application with its own state machine on an [`Rsm`] can call
//! [`serve_status`] itself. A client asks with [`fetch_status`] (or
//! [`Endpoint::call`] with a [`StatusRequest`]). The request writes nothing
//! and does not go through Raft: it reports this replica's own view, which
//! may be stale (a partitioned node still believes in its old leader).
//!
//! # The log size
//! [`NodeStatus::raft_state_bytes`] is the store's persisted Raft state
//! without the snapshot — hard state, log base and every log entry record,
//! keys and values — as [`RaftLogStorage::raft_state_bytes`] counts it: the
//! quantity [`RsmConfig::maxraftstate_bytes`](crate::rsm::RsmConfig::maxraftstate_bytes)
//! bounds. It is not the directory's size on disk (sled's files also hold the
//! snapshot and space not yet reclaimed). Computing it scans the log on a
//! blocking thread, one status request at a time.
//!
//! The service keeps only a [`Weak`] handle on the storage: the Raft node
//! owns it, so once the node has shut down its directory can be reopened,
//! and the status reports the size as unknown.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::NodeId;
use crate::net::{Endpoint, Kind, NetError, Rpc};
use crate::raft::{Metrics, Role, StopReason};
use crate::rsm::{Rsm, StateMachine};
use crate::storage::RaftLogStorage;

/// Kind of the status request ([`StatusRequest`]) and its reply ([`NodeStatus`]).
/// Version 2 added [`NodeStatus::counters`]; a version-1 peer is refused
/// with [`RemoteFault::VersionMismatch`](crate::net::RemoteFault::VersionMismatch).
pub const KV_STATUS_KIND: Kind = Kind::new(0x0202, 2);

/// Asks a replica for its [`NodeStatus`]. Carries nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest;

impl Rpc for StatusRequest {
    const KIND: Kind = KV_STATUS_KIND;
    type Reply = NodeStatus;
}

/// A replica's Raft role, as the status RPC reports it (a wire type of its
/// own, so the core's [`Role`] can change without changing the protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Follows a leader, or waits for one.
    Follower,
    /// Asks for pre-votes before starting an election.
    PreCandidate,
    /// Asks for votes in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

impl NodeRole {
    /// The role in lower case: `follower`, `pre_candidate`, `candidate`, `leader`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Follower => "follower",
            NodeRole::PreCandidate => "pre_candidate",
            NodeRole::Candidate => "candidate",
            NodeRole::Leader => "leader",
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Role> for NodeRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Follower => NodeRole::Follower,
            Role::PreCandidate => NodeRole::PreCandidate,
            Role::Candidate => NodeRole::Candidate,
            Role::Leader => NodeRole::Leader,
        }
    }
}

/// What a replica reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The replica's node id.
    pub id: NodeId,
    /// Its role in its current term.
    pub role: NodeRole,
    /// Its current term.
    pub term: u64,
    /// The leader of the current term, if it knows one.
    pub leader: Option<NodeId>,
    /// Highest log index it knows to be committed.
    pub commit_index: u64,
    /// Highest log index its state machine has applied.
    pub applied_index: u64,
    /// Index of its last log entry.
    pub last_index: u64,
    /// Last index covered by its latest snapshot (0: none).
    pub snapshot_index: u64,
    /// Bytes of persisted Raft state without the snapshot (see the module
    /// docs); `None` when unknown (the node has stopped, or the store failed
    /// to answer).
    pub raft_state_bytes: Option<u64>,
    /// Why the replica has stopped (it serves no requests), if it has.
    pub stopped: Option<String>,
    /// The Raft driver's work counters since the replica started.
    pub counters: NodeCounters,
}

/// A replica's work counters since it started (the Raft driver's
/// [`Metrics`]), as the status RPC reports them: how much it wrote and sent,
/// and how well its load was batched (entries per flush, per append). A
/// type of its own rather than [`Metrics`] itself: this is a wire format,
/// which changes only with [`KV_STATUS_KIND`]'s version, while the driver's
/// metrics may change freely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounters {
    /// Storage commits, each one flush (`fdatasync`).
    pub flushes: u64,
    /// Log entries written by those commits.
    pub entries_persisted: u64,
    /// Storage commits that took 100 ms or more (each also logged).
    pub slow_commits: u64,
    /// Append messages carrying at least one entry sent.
    pub append_messages_sent: u64,
    /// Entries carried by those append messages.
    pub append_entries_sent: u64,
    /// Raft messages sent.
    pub messages_sent: u64,
    /// Raft messages the transport refused to send (queue full, shut down).
    pub send_failures: u64,
    /// Raft messages received.
    pub messages_received: u64,
    /// Received messages dropped (wrong group, forged sender, refused).
    pub messages_rejected: u64,
    /// Proposals the leader accepted (log entries it created).
    pub proposals_accepted: u64,
    /// Committed entries handed to the state machine.
    pub entries_applied: u64,
    /// Snapshots received from a leader and installed.
    pub snapshots_installed: u64,
}

impl From<&Metrics> for NodeCounters {
    fn from(metrics: &Metrics) -> Self {
        NodeCounters {
            flushes: metrics.flushes,
            entries_persisted: metrics.entries_persisted,
            slow_commits: metrics.slow_commits,
            append_messages_sent: metrics.append_messages_sent,
            append_entries_sent: metrics.append_entries_sent,
            messages_sent: metrics.messages_sent,
            send_failures: metrics.send_failures,
            messages_received: metrics.messages_received,
            messages_rejected: metrics.messages_rejected,
            proposals_accepted: metrics.proposals_accepted,
            entries_applied: metrics.entries_applied,
            snapshots_installed: metrics.snapshots_installed,
        }
    }
}

/// Answers [`StatusRequest`]s on `endpoint` with the status of `rsm`, whose
/// Raft node runs on `storage` (held weakly; see the module docs).
///
/// Errors: [`NetError::AlreadyRegistered`] when the endpoint already serves
/// the status kind, [`NetError::Shutdown`] when it is shut down.
pub fn serve_status<M, S>(
    endpoint: &Endpoint,
    rsm: &Rsm<M>,
    storage: Weak<S>,
) -> Result<(), NetError>
where
    M: StateMachine,
    S: RaftLogStorage + 'static,
{
    let rsm = rsm.clone();
    // One log scan at a time; further requests wait for it (the transport
    // bounds how many can wait).
    let scans = Arc::new(Semaphore::new(1));
    endpoint.register(move |_from, StatusRequest| {
        let rsm = rsm.clone();
        let storage = storage.clone();
        let scans = scans.clone();
        async move {
            let raft_state_bytes = raft_state_bytes(&storage, &scans, rsm.node().group()).await;
            let status = rsm.node().status();
            NodeStatus {
                id: status.id,
                role: status.role.into(),
                term: status.term,
                leader: status.leader,
                commit_index: status.commit_index,
                applied_index: rsm.applied_index(),
                last_index: status.last_index,
                snapshot_index: status.snapshot_index,
                raft_state_bytes,
                stopped: status.stopped.as_ref().map(stop_reason),
                counters: NodeCounters::from(&status.metrics),
            }
        }
    })
}

/// Asks node `node` for its status through `endpoint`, waiting at most `timeout`.
pub async fn fetch_status(
    endpoint: &Endpoint,
    node: NodeId,
    timeout: Duration,
) -> Result<NodeStatus, NetError> {
    endpoint.call_timeout(node, &StatusRequest, timeout).await
}

/// The store's persisted Raft state size, or `None` if the node no longer
/// holds the store or the store fails.
async fn raft_state_bytes<S: RaftLogStorage + 'static>(
    storage: &Weak<S>,
    scans: &Arc<Semaphore>,
    group: u64,
) -> Option<u64> {
    let _permit = scans.acquire().await.ok()?;
    let storage = storage.upgrade()?;
    let scanned = tokio::task::spawn_blocking(move || storage.raft_state_bytes(group)).await;
    match scanned {
        Ok(Ok(bytes)) => Some(bytes),
        Ok(Err(error)) => {
            tracing::warn!(%error, "status: cannot read the raft state size");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "status: the size scan failed");
            None
        }
    }
}

fn stop_reason(reason: &StopReason) -> String {
    match reason {
        StopReason::Shutdown => "shut down".to_owned(),
        StopReason::HandlesDropped => "all handles dropped".to_owned(),
        StopReason::TransportClosed => "transport closed".to_owned(),
        StopReason::StorageFailed(error) => format!("storage failed: {error}"),
        StopReason::Panicked => "driver panicked".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::kv::{Clerk, ClerkConfig, EndpointRpc, RaftKvConfig, RaftKvServer};
    use crate::net::sim::{SimConfig, SimNetwork};
    use crate::storage::{MemDisk, MemStore};

    // Every replica of a running cluster answers the status RPC: one leader
    // that all agree on, indexes that reach the writes, a log size that grows;
    // a stopped replica reports that it stopped and no size.
    #[tokio::test(start_paused = true)]
    async fn replicas_report_role_indexes_and_log_size() {
        let net = SimNetwork::new(SimConfig::new(7));
        let voters = [1, 2, 3];
        let mut servers = Vec::new();
        for id in voters {
            let mut config = RaftKvConfig::default();
            config.rsm.node.rng_seed = id;
            let store = MemStore::open(&MemDisk::new()).unwrap();
            servers.push(
                RaftKvServer::start(id, &voters, config, store, net.add_node(id).unwrap()).unwrap(),
            );
        }
        let client = net.add_client();
        let clerk = Clerk::new(
            EndpointRpc::new(client.clone(), Duration::from_millis(500)),
            voters.to_vec(),
            ClerkConfig::default(),
        )
        .unwrap();
        for version in 0..5u64 {
            clerk.put("k", Bytes::from("v"), version).await.unwrap();
        }
        let timeout = Duration::from_secs(1);
        let before = fetch_status(&client, 1, timeout).await.unwrap();
        for version in 5..10u64 {
            clerk.put("k", Bytes::from("v"), version).await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let leader_applied = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replicas did not converge within 10 s (virtual)"
            );
            let statuses = [
                fetch_status(&client, 1, timeout).await.unwrap(),
                fetch_status(&client, 2, timeout).await.unwrap(),
                fetch_status(&client, 3, timeout).await.unwrap(),
            ];
            let leaders: Vec<&NodeStatus> = statuses
                .iter()
                .filter(|s| s.role == NodeRole::Leader)
                .collect();
            assert_eq!(leaders.len(), 1, "{statuses:?}");
            let leader = leaders[0];
            if statuses
                .iter()
                .all(|s| s.applied_index == leader.applied_index)
            {
                for (status, id) in statuses.iter().zip(voters) {
                    assert_eq!(status.id, id);
                    assert_eq!(status.leader, Some(leader.id));
                    assert_eq!(status.term, leader.term);
                    assert!(status.commit_index >= status.applied_index);
                    assert!(status.last_index >= status.commit_index);
                    assert_eq!(status.stopped, None);
                    // Every replica wrote the entries it applied (in at
                    // least one flush; the vote's flush writes none), sent
                    // and received messages.
                    let counters = &status.counters;
                    assert!(
                        counters.entries_persisted >= status.applied_index,
                        "{status:?}"
                    );
                    assert!(counters.flushes >= 1, "{status:?}");
                    assert!(
                        counters.entries_applied >= status.applied_index,
                        "{status:?}"
                    );
                    assert!(counters.messages_sent > 0 && counters.messages_received > 0);
                    assert_eq!(counters.slow_commits, 0, "virtual time: no slow commit");
                }
                // Only the leader proposed the 10 puts and sent them in appends.
                let leader_counters = &leader.counters;
                assert!(leader_counters.proposals_accepted >= 10, "{leader:?}");
                assert!(leader_counters.append_entries_sent >= 2 * 10, "{leader:?}");
                assert!(
                    leader_counters.append_messages_sent <= leader_counters.append_entries_sent,
                    "{leader:?}"
                );
                for follower in statuses.iter().filter(|s| s.id != leader.id) {
                    assert_eq!(follower.counters.proposals_accepted, 0, "{follower:?}");
                }
                break leader.applied_index;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(leader_applied >= 10, "10 puts applied: {leader_applied}");
        let after = fetch_status(&client, 1, timeout).await.unwrap();
        let (before_bytes, after_bytes) = (
            before.raft_state_bytes.unwrap(),
            after.raft_state_bytes.unwrap(),
        );
        assert!(
            after_bytes > before_bytes,
            "{before_bytes} -> {after_bytes}"
        );

        servers[0].shutdown().await;
        let stopped = fetch_status(&client, 1, timeout).await.unwrap();
        assert_eq!(stopped.stopped.as_deref(), Some("shut down"));
        assert_eq!(stopped.raft_state_bytes, None, "the store was released");
        for server in &servers[1..] {
            server.shutdown().await;
        }
    }
}

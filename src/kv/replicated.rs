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
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::rpc::{KvResponse, ServerUnavailable};
use super::state_machine::MemoryKv;
use super::status::serve_status;
use super::types::{COMMAND_BYTES_MAX, KvCommand, KvError, KvReply, Versioned};
use crate::NodeId;
use crate::net::{Endpoint, NetError, wire};
use crate::rsm::{CodecError, Rsm, RsmConfig, RsmStartError, StateMachine, SubmitError};
use crate::storage::RaftLogStorage;

/// Format byte of a [`KvStateMachine`] snapshot.
pub const KV_SNAPSHOT_FORMAT: u8 = 1;

/// First byte of a log entry carrying a batch of commands
/// ([`KvLogCommand::Batch`]); a single command keeps
/// [`COMMAND_FORMAT`](super::types::COMMAND_FORMAT).
pub const BATCH_FORMAT: u8 = 2;

/// Most commands one log entry carries.
pub const BATCH_COMMANDS_MAX: usize = 256;

/// Most encoded bytes of the commands one batch gathers (a command larger
/// than this travels alone); well under the Raft entry limit.
pub const BATCH_BYTES_MAX: usize = 256 * 1024;

/// Largest encoded batch entry accepted when decoding.
const BATCH_ENCODED_BYTES_MAX: usize = COMMAND_BYTES_MAX + BATCH_BYTES_MAX;

/// What one log entry of the replicated service carries: one command, or
/// several Puts that arrived together, applied one after another at the
/// entry's place in the log (as if they were consecutive entries). Batching
/// cuts the per-entry costs (a storage record, replication, a waiter) when
/// many clients write at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvLogCommand {
    /// One command, encoded as [`KvCommand::encode`] (the format of every
    /// entry before batches existed).
    One(KvCommand),
    /// Commands applied in order: `[BATCH_FORMAT] ++ postcard(commands)`.
    Batch(Vec<KvCommand>),
}

/// The output of a [`KvLogCommand`]: one reply per command, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvLogReply {
    /// The reply to [`KvLogCommand::One`].
    One(KvReply),
    /// The replies to [`KvLogCommand::Batch`], in the batch's order.
    Batch(Vec<KvReply>),
}

impl KvLogCommand {
    /// The bytes of the log entry.
    pub fn encode(&self) -> Bytes {
        match self {
            KvLogCommand::One(command) => command.encode(),
            KvLogCommand::Batch(commands) => Bytes::from(
                postcard::to_extend(commands, vec![BATCH_FORMAT])
                    .expect("encoding into a Vec cannot fail"),
            ),
        }
    }

    /// Decodes a log entry; garbage is an error, never a panic.
    pub fn decode(input: &[u8]) -> Result<Self, CodecError> {
        match input.first() {
            Some(&BATCH_FORMAT) => {
                if input.len() > BATCH_ENCODED_BYTES_MAX {
                    return Err(CodecError::new(
                        "kv batch",
                        format!("{} bytes exceed {BATCH_ENCODED_BYTES_MAX}", input.len()),
                    ));
                }
                let commands = wire::decode_exact::<Vec<KvCommand>>(&input[1..])
                    .map_err(|error| CodecError::new("kv batch", error))?;
                if commands.is_empty() || commands.len() > BATCH_COMMANDS_MAX {
                    return Err(CodecError::new(
                        "kv batch",
                        format!("{} commands (1..={BATCH_COMMANDS_MAX})", commands.len()),
                    ));
                }
                Ok(KvLogCommand::Batch(commands))
            }
            _ => KvCommand::decode(input)
                .map(KvLogCommand::One)
                .map_err(|error| CodecError::new("kv command", error)),
        }
    }
}

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
    type Command = KvLogCommand;
    type Output = KvLogReply;

    fn encode_command(command: &KvLogCommand) -> Bytes {
        command.encode()
    }

    fn decode_command(data: &[u8]) -> Result<KvLogCommand, CodecError> {
        KvLogCommand::decode(data)
    }

    fn apply(&mut self, _index: u64, command: KvLogCommand) -> KvLogReply {
        match command {
            KvLogCommand::One(command) => KvLogReply::One(self.map.apply(&command)),
            KvLogCommand::Batch(commands) => KvLogReply::Batch(
                commands
                    .iter()
                    .map(|command| self.map.apply(command))
                    .collect(),
            ),
        }
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

/// Raft entry and append limit of [`RaftKvConfig::default`]: room for the
/// largest command ([`COMMAND_BYTES_MAX`], a bit over 1 MiB) alone in an entry.
pub const KV_ENTRY_BYTES_MAX_DEFAULT: u64 = 2 << 20;

impl Default for RaftKvConfig {
    fn default() -> Self {
        let mut rsm = RsmConfig::default();
        let raft = &mut rsm.node.raft;
        raft.entry_bytes_max = raft.entry_bytes_max.max(KV_ENTRY_BYTES_MAX_DEFAULT);
        raft.append_bytes_max = raft.append_bytes_max.max(raft.entry_bytes_max);
        RaftKvConfig {
            rsm,
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
    /// The Raft entry limit cannot hold the largest command a client may
    /// send: such puts would be refused as Busy forever.
    #[error(
        "the raft entry_bytes_max ({entry_bytes_max}) is below the largest kv command ({command_bytes_max} bytes)"
    )]
    EntryTooSmall {
        /// The configured limit.
        entry_bytes_max: u64,
        /// [`COMMAND_BYTES_MAX`].
        command_bytes_max: u64,
    },
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
        let entry_bytes_max = config.rsm.node.raft.entry_bytes_max;
        if entry_bytes_max < COMMAND_BYTES_MAX as u64 {
            return Err(RaftKvError::EntryTooSmall {
                entry_bytes_max,
                command_bytes_max: COMMAND_BYTES_MAX as u64,
            });
        }
        // The node owns the storage; the status RPC only holds a weak handle.
        let storage = Arc::new(storage);
        let status_storage = Arc::downgrade(&storage);
        let rsm = Rsm::start(
            id,
            voters,
            config.rsm.clone(),
            storage,
            endpoint.clone(),
            KvStateMachine::new(),
        )?;
        let inflight = Arc::new(Semaphore::new(config.requests_inflight_max));
        let (puts, queue) = mpsc::channel(config.requests_inflight_max);
        // A batch stays well inside the node's entry limit, whatever it is.
        let entry_bytes_max =
            usize::try_from(config.rsm.node.raft.entry_bytes_max / 2).unwrap_or(usize::MAX);
        let batch_bytes_max = BATCH_BYTES_MAX.min(entry_bytes_max);
        tokio::spawn(batch_puts(rsm.clone(), queue, batch_bytes_max));
        let handler_rsm = rsm.clone();
        let registered = endpoint.register(move |_from, command: KvCommand| {
            let rsm = handler_rsm.clone();
            let puts = puts.clone();
            let permit = inflight.clone().try_acquire_owned();
            async move {
                let Ok(_permit) = permit else {
                    return Err(ServerUnavailable::Busy);
                };
                serve(&rsm, &puts, command).await
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

/// A Put waiting for the batcher, and where its outcome goes.
type PendingPut = (KvCommand, oneshot::Sender<Result<KvReply, SubmitError>>);

/// Encoded size of a command, near enough for the batch byte bound.
fn command_bytes(command: &KvCommand) -> usize {
    match command {
        KvCommand::Put { key, value, .. } => key.len() + value.len() + 16,
        KvCommand::Get { key } => key.len() + 8,
    }
}

/// Gathers the Puts queued at one moment (at most [`BATCH_COMMANDS_MAX`] and
/// `bytes_max`, itself at most [`BATCH_BYTES_MAX`]) into one log entry and
/// submits it without waiting for the batches before it, which are in flight
/// meanwhile. A lone Put goes as [`KvLogCommand::One`]. Ends when every
/// sender is gone.
async fn batch_puts(
    rsm: Rsm<KvStateMachine>,
    mut queue: mpsc::Receiver<PendingPut>,
    bytes_max: usize,
) {
    let mut carried: Option<PendingPut> = None;
    loop {
        let first = match carried.take() {
            Some(put) => put,
            None => match queue.recv().await {
                Some(put) => put,
                None => return,
            },
        };
        let mut bytes = command_bytes(&first.0);
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX {
            let Ok(next) = queue.try_recv() else { break };
            let next_bytes = command_bytes(&next.0);
            if bytes + next_bytes > bytes_max {
                carried = Some(next);
                break;
            }
            bytes += next_bytes;
            batch.push(next);
        }
        tokio::spawn(submit_batch(rsm.clone(), batch));
    }
}

/// Submits one batch and hands every Put its own outcome.
async fn submit_batch(rsm: Rsm<KvStateMachine>, mut batch: Vec<PendingPut>) {
    if batch.len() == 1 {
        let (command, reply) = batch.pop().expect("one put");
        let outcome = rsm
            .submit(&KvLogCommand::One(command))
            .await
            .map(|output| match output {
                KvLogReply::One(reply) => reply,
                KvLogReply::Batch(_) => panic!("invariant: one command gives one reply"),
            });
        let _ = reply.send(outcome);
        return;
    }
    let (commands, replies): (Vec<KvCommand>, Vec<_>) = batch.into_iter().unzip();
    let count = commands.len();
    match rsm.submit(&KvLogCommand::Batch(commands)).await {
        Ok(KvLogReply::Batch(outputs)) if outputs.len() == count => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        Ok(other) => panic!("invariant: a batch of {count} commands got {other:?}"),
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// Serves one request (see the module docs).
async fn serve(
    rsm: &Rsm<KvStateMachine>,
    puts: &mpsc::Sender<PendingPut>,
    command: KvCommand,
) -> KvResponse {
    // An error reply needs only the command's kind (the command itself goes
    // to the batcher).
    let is_put = matches!(command, KvCommand::Put { .. });
    let error_reply = |error| {
        if is_put {
            KvReply::Put(Err(error))
        } else {
            KvReply::Get(Err(error))
        }
    };
    if let Err(error) = command.check_size() {
        return Ok(error_reply(error));
    }
    let outcome = match &command {
        KvCommand::Put { .. } => {
            let (reply, outcome) = oneshot::channel();
            match puts.send((command, reply)).await {
                Ok(()) => outcome.await.unwrap_or(Err(SubmitError::Stopped)),
                Err(_) => Err(SubmitError::Stopped),
            }
        }
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
            Ok(error_reply(KvError::WrongLeader { leader_hint }))
        }
        // Appended, outcome unknown (a resend that meets ErrVersion is ErrMaybe).
        Err(SubmitError::LeadershipLost { leader_hint }) => {
            Ok(error_reply(KvError::LeadershipLost { leader_hint }))
        }
        // A leader cut off from its quorum times out: send the client on.
        Err(SubmitError::Timeout) => Ok(error_reply(KvError::LeadershipLost { leader_hint: None })),
        Err(SubmitError::TooLarge { bytes, max }) => {
            tracing::warn!(bytes, max, "kv: command too large for the raft log");
            Err(ServerUnavailable::Busy)
        }
        Err(SubmitError::Busy | SubmitError::Undecodable) => Err(ServerUnavailable::Busy),
        Err(SubmitError::Stopped) => Err(ServerUnavailable::ShuttingDown),
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

    fn put(key: &str, value: &str, version: u64) -> KvCommand {
        KvCommand::Put {
            key: key.to_owned(),
            value: Bytes::from(value.to_owned()),
            version,
        }
    }

    // A single command keeps the entry format of the log before batches; a
    // batch round-trips; garbage and out-of-bounds batches are errors.
    #[test]
    fn log_commands_round_trip_and_reject_garbage() {
        let one = put("k", "v", 0);
        assert_eq!(KvLogCommand::One(one.clone()).encode(), one.encode());
        for command in [
            KvLogCommand::One(one.clone()),
            KvLogCommand::Batch(vec![one.clone(), put("j", "w", 3)]),
        ] {
            assert_eq!(KvLogCommand::decode(&command.encode()), Ok(command));
        }
        let batch = KvLogCommand::Batch(vec![one.clone()]).encode();
        let mut trailing = batch.to_vec();
        trailing.push(0);
        assert!(KvLogCommand::decode(&trailing).is_err());
        assert!(KvLogCommand::decode(&batch[..batch.len() - 1]).is_err());
        assert!(KvLogCommand::decode(&KvLogCommand::Batch(Vec::new()).encode()).is_err());
        let too_many = KvLogCommand::Batch(vec![one; BATCH_COMMANDS_MAX + 1]).encode();
        assert!(KvLogCommand::decode(&too_many).is_err());
        assert!(KvLogCommand::decode(&[]).is_err());
        assert!(KvLogCommand::decode(&[BATCH_FORMAT, 0xff, 0xff]).is_err());
    }

    // A batch applies its commands in order, as consecutive entries would.
    #[test]
    fn a_batch_applies_in_order() {
        let mut machine = KvStateMachine::new();
        let replies = machine.apply(
            1,
            KvLogCommand::Batch(vec![put("k", "a", 0), put("k", "b", 1), put("k", "c", 1)]),
        );
        assert_eq!(
            replies,
            KvLogReply::Batch(vec![
                KvReply::Put(Ok(())),
                KvReply::Put(Ok(())),
                KvReply::Put(Err(KvError::Version)),
            ])
        );
        let stored = machine.map().get("k").expect("stored");
        assert_eq!((stored.value.as_ref(), stored.version), (&b"b"[..], 2));
    }

    // Puts that arrive together share one log entry, and each gets its own
    // reply.
    #[tokio::test(start_paused = true)]
    async fn concurrent_puts_share_a_log_entry() {
        let net = SimNetwork::new(SimConfig::new(8));
        let disk = MemDisk::new();
        let server = start(&net, &disk, 1, &[1]);
        let mut status = server.rsm().node().subscribe();
        status
            .wait_for(|s| s.role == crate::raft::Role::Leader)
            .await
            .expect("node running");
        let (puts, queue) = mpsc::channel(64);
        tokio::spawn(batch_puts(server.rsm().clone(), queue, BATCH_BYTES_MAX));
        let requests = (0..20).map(|i| serve(server.rsm(), &puts, put(&format!("k{i}"), "v", 0)));
        let mut requests: Vec<_> = requests.collect();
        // A put on k0 again, at version 1: applied after the first one.
        requests.push(serve(server.rsm(), &puts, put("k0", "w", 1)));
        let replies = futures::future::join_all(requests).await;
        for reply in replies {
            assert_eq!(reply, Ok(KvReply::Put(Ok(()))));
        }
        let store = MemStore::open(&disk.fork()).expect("fork");
        let last = store.last_index(0).expect("last");
        let entries = store.entries(0, 1, last + 1, u64::MAX).expect("entries");
        let batches: Vec<usize> = entries
            .iter()
            .filter_map(|e| match KvLogCommand::decode(&e.data) {
                Ok(KvLogCommand::Batch(commands)) => Some(commands.len()),
                _ => None,
            })
            .collect();
        assert_eq!(batches, vec![21], "one entry for the 21 puts: {batches:?}");
        let value = server.rsm().read_local(|m| m.map().get("k0").cloned());
        assert_eq!(value.map(|v| v.version), Some(2));
        server.shutdown().await;
    }

    // The largest command a client may send (largest key and value) fits
    // an entry under the default config, and is applied; a config whose
    // entry limit could not hold it is refused at start, not Busy forever.
    #[tokio::test(start_paused = true)]
    async fn the_largest_command_fits_and_a_smaller_entry_limit_is_refused() {
        use crate::kv::types::{KEY_BYTES_MAX, VALUE_BYTES_MAX};
        let net = SimNetwork::new(SimConfig::new(9));
        let disk = MemDisk::new();
        let server = start(&net, &disk, 1, &[1]);
        let clerk = Clerk::new(
            EndpointRpc::new(net.add_client(), Duration::from_secs(5)),
            vec![1],
            ClerkConfig::default(),
        )
        .unwrap();
        let key = "k".repeat(KEY_BYTES_MAX);
        let value = Bytes::from(vec![7u8; VALUE_BYTES_MAX]);
        assert!(put(&key, "", 0).encode().len() + VALUE_BYTES_MAX > 1 << 20);
        clerk
            .put(&key, value.clone(), 0)
            .await
            .expect("the largest put");
        let stored = clerk.get(&key).await.expect("get");
        assert_eq!((stored.value, stored.version), (value, 1));
        server.shutdown().await;
        let mut config = RaftKvConfig::default();
        config.rsm.node.raft.entry_bytes_max = 1 << 20;
        let error = RaftKvServer::start(
            2,
            &[2],
            config,
            MemStore::open(&MemDisk::new()).unwrap(),
            net.add_node(2).unwrap(),
        )
        .expect_err("an entry limit under the largest command");
        assert!(
            matches!(error, RaftKvError::EntryTooSmall { entry_bytes_max, .. } if entry_bytes_max == 1 << 20),
            "{error}"
        );
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
            assert_eq!(
                machine.apply(i as u64 + 1, KvLogCommand::One(put)),
                KvLogReply::One(KvReply::Put(Ok(())))
            );
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

//! The key/value commands of the `raftkv` binary (a module of `main.rs`,
//! not of the library): `kvsrv`, `put`, `get` and `lock`.
//!
//! Client commands only speak the key/value RPC through a [`Clerk`], which
//! retries, moves to the next server on "no reply" and on ErrWrongLeader, and
//! applies the ErrMaybe rule; so they work unchanged against any server kind
//! (the single-node `kvsrv`, or a replicated cluster of `raftkv server`s).
//! Server node ids come from the order of `--servers`: the i-th address (from
//! 1) is node i. `kvsrv` is node 1, so it is listed alone (or first).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use raftkv::NodeId;
use raftkv::kv::{
    Clerk, ClerkConfig, EndpointRpc, KvError, KvServer, KvServerConfig, Lock, LockConfig, NodeRole,
    fetch_status,
};
use raftkv::net::Endpoint;
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::storage::Store;
use serde_json::json;

/// Exit status of a Put that got ErrVersion.
const EXIT_ERR_VERSION: u8 = 3;
/// Exit status of a Put or Get that got ErrNoKey.
const EXIT_ERR_NO_KEY: u8 = 4;
/// Exit status of a Put that got ErrMaybe.
const EXIT_ERR_MAYBE: u8 = 5;

/// Cluster name used when `--cluster-id` is not given.
pub(crate) const DEFAULT_CLUSTER: &str = "raftkv";
/// Node id of the single-node server.
const KVSRV_NODE_ID: NodeId = 1;
/// Command-line clients take random node ids at or above this, far from server ids.
pub(crate) const CLIENT_ID_BASE: NodeId = 1 << 62;
/// Longest wait for one RPC before the clerk tries again (or another server).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a client asks the servers which one leads before its first RPC.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Arguments of `raftkv kvsrv`.
#[derive(Args, Debug)]
pub struct KvsrvArgs {
    /// Address to listen on, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// The server's data directory (created if missing).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Cluster name; clients must use the same one.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CLUSTER)]
    cluster_id: String,
}

/// Options shared by the client commands.
#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Server addresses, comma-separated; the i-th (from 1) is node i.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// Cluster name; must match the servers'.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CLUSTER)]
    cluster_id: String,
    /// Give up after this many milliseconds (exit 1).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `raftkv put`.
#[derive(Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The key.
    key: String,
    /// The value.
    #[arg(allow_hyphen_values = true)]
    value: String,
    /// The version the key must have (0 creates a missing key).
    #[arg(long, value_name = "N")]
    version: u64,
}

/// Arguments of `raftkv get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The key.
    key: String,
}

/// `raftkv lock` actions.
#[derive(Subcommand, Debug)]
pub enum LockAction {
    /// Wait until the lock is free, take it, and print `OWNER TOKEN`: the
    /// owner id to pass to `release --owner` and the fencing token. With
    /// `--owner` of the current holder it returns at once (with a lease:
    /// after renewing it).
    Acquire(AcquireArgs),
    /// Release the lock if `--owner` holds it (prints `released` either way:
    /// afterwards this owner does not hold it).
    Release(ReleaseArgs),
}

/// Arguments of both lock actions.
#[derive(Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The lock's name (the key that holds it).
    name: String,
    /// Lease in milliseconds: another client may take the lock over once the
    /// holder has not renewed it for this long (acquire again with the same
    /// `--owner` to renew). Only used by `acquire`.
    #[arg(long, value_name = "N")]
    lease_ms: Option<u64>,
}

/// Arguments of `raftkv lock acquire`.
#[derive(Args, Debug)]
pub struct AcquireArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// Owner id (at most 256 bytes); a fresh random one when absent.
    #[arg(long, value_name = "ID")]
    owner: Option<String>,
}

/// Arguments of `raftkv lock release`.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    lock: LockArgs,
    /// Owner id, as printed by `acquire`.
    #[arg(long, value_name = "ID")]
    owner: String,
}

/// FNV-1a (64 bits) of the cluster name: the numeric cluster id of the
/// TCP handshake. Stable across versions, so names keep working.
pub(crate) fn cluster_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

/// A current-thread runtime for `threads == 1`, else a work-stealing one
/// with `threads` workers.
pub(crate) fn runtime_with_threads(threads: u16) -> anyhow::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(threads))
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")
}

pub(crate) async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("cannot resolve {address:?}"))?
        .next()
        .with_context(|| format!("{address:?} resolves to no address"))
}

pub(crate) fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    Ok(())
}

/// `raftkv kvsrv`: serves until SIGINT or SIGTERM, then stops taking
/// requests, commits what is queued and closes the store.
pub fn kvsrv(args: KvsrvArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let listen = resolve(&args.listen).await?;
        let store = Store::open(&args.data_dir)
            .with_context(|| format!("cannot open {}", args.data_dir.display()))?;
        // A replicated node's directory keeps its map in the Raft log and
        // snapshots: served here it would look empty, and writes would fork it.
        if let Some(identity) = crate::cluster_cli::recorded_identity(&store)
            .with_context(|| format!("cannot read {}", args.data_dir.display()))?
        {
            anyhow::bail!(
                "data directory {} belongs to {identity} of a replicated cluster: \
                 run it with raftkv server, not kvsrv",
                args.data_dir.display()
            );
        }
        let config = TcpConfig::member(cluster_id(&args.cluster_id), KVSRV_NODE_ID, listen);
        let transport = TcpTransport::start(config).await?;
        let server = KvServer::start(&transport.endpoint(), store, KvServerConfig::default())?;
        // Handle the signals before announcing the address, so a script that
        // signals as soon as it reads the line gets a clean shutdown.
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let address = transport
            .local_address()
            .context("the server transport has no listen address")?;
        print_line(&format!("listening on {address}"))?;
        let signal_name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = signal_name, "kvsrv: shutting down");
        // Stop accepting first, then let the server commit what it holds.
        transport.endpoint().shutdown().await;
        server.shutdown().await;
        tracing::info!("kvsrv: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// A clerk over a fresh TCP client transport for `args.servers`.
async fn clerk(args: &ClientArgs) -> anyhow::Result<Clerk<EndpointRpc>> {
    let mut addresses = Vec::with_capacity(args.servers.len());
    for address in &args.servers {
        addresses.push(resolve(address).await?);
    }
    let deadline = Duration::from_millis(args.timeout_ms);
    clerk_for(cluster_id(&args.cluster_id), &addresses, deadline).await
}

/// A fresh TCP client transport for `args.servers`: the RPC layer to build
/// clerks on, the server ids (leader first, see [`leader_first`]) and the
/// clerk settings (`--timeout-ms` as the deadline).
pub(crate) async fn tcp_client(
    args: &ClientArgs,
) -> anyhow::Result<(EndpointRpc, Vec<NodeId>, ClerkConfig)> {
    let mut addresses = Vec::with_capacity(args.servers.len());
    for address in &args.servers {
        addresses.push(resolve(address).await?);
    }
    let (transport, ids) = client_transport(cluster_id(&args.cluster_id), &addresses).await?;
    let ids = leader_first(&transport.endpoint(), ids).await;
    let rpc = EndpointRpc::new(transport.endpoint(), CALL_TIMEOUT);
    let clerk_config = ClerkConfig {
        deadline: Some(Duration::from_millis(args.timeout_ms)),
        ..ClerkConfig::default()
    };
    Ok((rpc, ids, clerk_config))
}

/// A TCP client transport (with a random client node id) that knows
/// `servers`: the i-th address (from 1) is node i. Returns the transport and
/// the server ids.
pub(crate) async fn client_transport(
    cluster_id: u64,
    servers: &[SocketAddr],
) -> anyhow::Result<(TcpTransport, Vec<NodeId>)> {
    let node_id = CLIENT_ID_BASE + (rand::random::<u64>() >> 2);
    let mut config = TcpConfig::client(cluster_id, node_id);
    config.call_timeout = CALL_TIMEOUT;
    let mut ids = Vec::with_capacity(servers.len());
    for (index, address) in servers.iter().enumerate() {
        let id = index as NodeId + 1;
        config.peers.insert(id, *address);
        ids.push(id);
    }
    Ok((TcpTransport::start(config).await?, ids))
}

/// A clerk for the servers at `servers` (the i-th is node i) that gives up
/// on an operation after `deadline`. Its first RPC goes to the leader if a
/// server names one (see [`leader_first`]).
pub(crate) async fn clerk_for(
    cluster_id: u64,
    servers: &[SocketAddr],
    deadline: Duration,
) -> anyhow::Result<Clerk<EndpointRpc>> {
    let (transport, ids) = client_transport(cluster_id, servers).await?;
    let ids = leader_first(&transport.endpoint(), ids).await;
    let rpc = EndpointRpc::new(transport.endpoint(), CALL_TIMEOUT);
    let clerk_config = ClerkConfig {
        deadline: Some(deadline),
        ..ClerkConfig::default()
    };
    Ok(Clerk::new(rpc, ids, clerk_config)?)
}

/// `ids` rotated so that the leader comes first, if a server names one in
/// answer to the status RPC within [`LEADER_PROBE_TIMEOUT`] (all are asked at
/// once; the first answer naming a leader wins); else `ids` unchanged.
///
/// Why: it saves a one-shot `raftkv put`/`get` the round trip to a follower
/// that would only answer ErrWrongLeader with a hint. (A put resent after such
/// an answer still gets a precise ErrVersion: ErrWrongLeader says the follower
/// did nothing; only no reply or a lost leadership makes a resend ErrMaybe.)
async fn leader_first(endpoint: &Endpoint, mut ids: Vec<NodeId>) -> Vec<NodeId> {
    if ids.len() < 2 {
        return ids;
    }
    let mut answers: FuturesUnordered<_> = ids
        .iter()
        .map(|&id| fetch_status(endpoint, id, LEADER_PROBE_TIMEOUT))
        .collect();
    while let Some(answer) = answers.next().await {
        let Ok(status) = answer else { continue };
        let leader = if status.role == NodeRole::Leader {
            Some(status.id)
        } else {
            status.leader
        };
        if let Some(position) = leader.and_then(|leader| ids.iter().position(|&id| id == leader)) {
            ids.rotate_left(position);
            return ids;
        }
    }
    ids
}

/// Reports a failure (exit 1): on stderr, and with `--json` also as
/// `{"result":"Error","error":...}` on stdout.
fn failure(json: bool, message: String) -> anyhow::Result<ExitCode> {
    if json {
        print_line(&json!({ "result": "Error", "error": message }).to_string())?;
    }
    eprintln!("raftkv: {message}");
    Ok(ExitCode::FAILURE)
}

/// `raftkv put`.
pub fn put(args: PutArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let json = args.client.json;
        let clerk = clerk(&args.client).await?;
        let result = clerk
            .put(&args.key, Bytes::from(args.value), args.version)
            .await;
        let (word, code) = match result {
            Ok(()) => ("OK", 0),
            Err(KvError::Version) => ("ErrVersion", EXIT_ERR_VERSION),
            Err(KvError::NoKey) => ("ErrNoKey", EXIT_ERR_NO_KEY),
            Err(KvError::Maybe) => ("ErrMaybe", EXIT_ERR_MAYBE),
            Err(KvError::Timeout { .. }) => {
                let message = format!(
                    "no server answered within {} ms; the put may or may not have been applied",
                    args.client.timeout_ms
                );
                return failure(json, message);
            }
            Err(other) => return failure(json, other.to_string()),
        };
        if json {
            print_line(&json!({ "result": word }).to_string())?;
        } else {
            print_line(word)?;
        }
        Ok(ExitCode::from(code))
    })
}

/// `raftkv get`.
pub fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let json = args.client.json;
        let clerk = clerk(&args.client).await?;
        match clerk.get(&args.key).await {
            Ok(found) => {
                if json {
                    // JSON strings are Unicode: a value that is not UTF-8 is
                    // given as hex instead.
                    let object = match std::str::from_utf8(&found.value) {
                        Ok(text) => {
                            json!({ "key": args.key, "value": text, "version": found.version })
                        }
                        Err(_) => json!({
                            "key": args.key,
                            "value": null,
                            "value_hex": found.value.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                            "version": found.version,
                        }),
                    };
                    print_line(&object.to_string())?;
                } else {
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(&found.value)?;
                    stdout.write_all(b"\n")?;
                    stdout.flush()?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(KvError::NoKey) => {
                if json {
                    print_line(&json!({ "result": "ErrNoKey" }).to_string())?;
                } else {
                    print_line("ErrNoKey")?;
                }
                Ok(ExitCode::from(EXIT_ERR_NO_KEY))
            }
            Err(KvError::Timeout { .. }) => failure(
                json,
                format!("no server answered within {} ms", args.client.timeout_ms),
            ),
            Err(other) => failure(json, other.to_string()),
        }
    })
}

/// `raftkv lock acquire|release`.
pub fn lock(action: LockAction) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        match action {
            LockAction::Acquire(args) => acquire(args).await,
            LockAction::Release(args) => release(args).await,
        }
    })
}

fn lock_config(args: &LockArgs) -> LockConfig {
    LockConfig {
        lease: args.lease_ms.map(Duration::from_millis),
        ..LockConfig::default()
    }
}

async fn acquire(AcquireArgs { lock: args, owner }: AcquireArgs) -> anyhow::Result<ExitCode> {
    let json = args.client.json;
    let clerk = clerk(&args.client).await?;
    let config = lock_config(&args);
    let lock = match owner {
        Some(owner) => Lock::with_owner(clerk, args.name.clone(), owner, config)?,
        None => Lock::new(clerk, args.name.clone(), config),
    };
    let timeout = Duration::from_millis(args.client.timeout_ms);
    let grant = match tokio::time::timeout(timeout, lock.acquire()).await {
        Ok(Ok(grant)) => grant,
        Ok(Err(error)) => return failure(json, error.to_string()),
        Err(_elapsed) => {
            // A Put sent before the timeout may still install our record.
            let message = format!(
                "lock {:?} not acquired within {} ms; a delayed request may still take it \
                 for owner {}: release it with --owner {} to be sure",
                args.name,
                args.client.timeout_ms,
                lock.owner(),
                lock.owner()
            );
            return failure(json, message);
        }
    };
    if json {
        let object = json!({
            "lock": args.name,
            "owner": lock.owner(),
            "token": grant.token.0,
            "lease_ms": args.lease_ms,
        });
        print_line(&object.to_string())?;
    } else {
        print_line(&format!("{} {}", lock.owner(), grant.token.0))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn release(ReleaseArgs { lock: args, owner }: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let json = args.client.json;
    let clerk = clerk(&args.client).await?;
    let lock = Lock::with_owner(clerk, args.name.clone(), owner, lock_config(&args))?;
    let timeout = Duration::from_millis(args.client.timeout_ms);
    match tokio::time::timeout(timeout, lock.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return failure(json, error.to_string()),
        Err(_elapsed) => {
            let message = format!(
                "lock {:?} not released within {} ms",
                args.name, args.client.timeout_ms
            );
            return failure(json, message);
        }
    }
    if json {
        let object = json!({ "lock": args.name, "owner": lock.owner(), "result": "released" });
        print_line(&object.to_string())?;
    } else {
        print_line("released")?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The cluster id is FNV-1a 64 of the name (reference vectors), so a name maps to the same id
    // in every build.
    #[test]
    fn cluster_id_is_fnv1a_64() {
        assert_eq!(cluster_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(cluster_id("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(cluster_id("foobar"), 0x8594_4171_f739_67e8);
    }
}

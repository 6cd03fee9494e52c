//! The cluster commands of the `raftkv` binary (a module of `main.rs`, not of
//! the library): `server` runs one node of a replicated key/value cluster
//! over TCP, `status` asks every node of a cluster for its status, and `demo`
//! runs a 3-node cluster of child processes through a leader crash and a
//! restart.
//!
//! # Node ids
//! The nodes of an n-node cluster are 1..=n: `--cluster 1=A,2=B,3=C`, the
//! same list on every node. Clients (`put`, `get`, `lock`, `status`) number
//! servers by their position in `--servers`, so they list the addresses in
//! id order: `--servers A,B,C`. A client that lists them in another order
//! still works (the TCP handshake refuses a server that is not the node the
//! client expects, and the clerk moves on), but `status` reports such nodes
//! as unreachable and says why.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use raftkv::NodeId;
use raftkv::kv::{
    Clerk, EndpointRpc, NodeRole, NodeStatus, RaftKvConfig, RaftKvServer, fetch_status,
};
use raftkv::net::tcp::{
    BUSY_POLL_WINDOW_MAX, BusyPoll, CPU_LATENCY_DEVICE, IDLE_POLL_WINDOW_MAX, TcpConfig,
    TcpTransport,
};
use raftkv::net::{Endpoint, NetError, RemoteFault};
use raftkv::raft::{Role, Status};
use raftkv::storage::{
    KvStorage as _, RaftLogStorage as _, StateMachineId, Storage as _, Store, StoreConfig,
    StoreEngine, WriteBatch,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::Instant;

use crate::kv_cli::{DEFAULT_CLUSTER, clerk_for, client_transport, cluster_id, resolve, runtime};

/// Most nodes a `--cluster` may list.
const CLUSTER_NODES_MAX: usize = 9;
/// Default `--maxraftstate`: snapshot once the persisted log reaches 8 MiB.
const MAXRAFTSTATE_BYTES_DEFAULT: u64 = 8 << 20;
/// Longest a leader spends handing its leadership over on SIGTERM/SIGINT.
const HANDOVER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest one handover attempt (to one peer) waits; above Raft's transfer
/// timeout (30 ticks of 10 ms), so a failed attempt has ended when it expires.
const HANDOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a leader asks its peers for their status before a handover.
const HANDOVER_STATUS_TIMEOUT: Duration = Duration::from_millis(200);

/// Arguments of `raftkv server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// This node's id: one of the ids in --cluster.
    #[arg(long, value_name = "N")]
    id: NodeId,
    /// Every node of the cluster as ID=HOST:PORT, comma-separated, with ids
    /// 1..=n (for example 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003).
    /// Give every node the same list; this node listens on its own address.
    #[arg(
        long,
        value_name = "ID=HOST:PORT,...",
        value_delimiter = ',',
        required = true,
        value_parser = parse_member
    )]
    cluster: Vec<Member>,
    /// The node's data directory (created if missing). Restarting with the
    /// same directory resumes the node; give every node its own.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Cluster name; every node and client must use the same one.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CLUSTER)]
    cluster_id: String,
    /// Snapshot the key/value map and compact the log once the persisted Raft
    /// log reaches BYTES (0: never snapshot, the log grows without bound).
    #[arg(long, value_name = "BYTES", default_value_t = MAXRAFTSTATE_BYTES_DEFAULT)]
    maxraftstate: u64,
    /// Runtime threads: 1 runs the node on one thread (a current-thread
    /// runtime: the fastest on small machines); N > 1 a work-stealing runtime
    /// with N workers. A leader's storage flushes run on the node's own
    /// storage thread either way; a follower flushes on the runtime while
    /// nothing is queued on that thread (see `--inline-storage`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Commit storage on the runtime's own thread(s) instead of the node's
    /// storage thread: every flush then stalls the runtime (the baseline the
    /// storage thread is measured against).
    #[arg(long)]
    inline_storage: bool,
    /// Storage engine of a data directory this start creates: `wal` (every
    /// record in memory, each commit one append and one fdatasync of a log
    /// file; the Raft state is bounded by --maxraftstate) or `sled`. An
    /// existing directory keeps the engine it was created with.
    #[arg(long, value_name = "ENGINE", default_value = "wal", value_parser = parse_engine)]
    storage_engine: StoreEngine,
    /// While this node leads, keep its runtime thread polling the network
    /// for DURATION (for example 1ms) after every frame instead of sleeping
    /// between frames: every request then skips the thread wake-ups of the
    /// leader's hops, at the price of one CPU kept busy while clients are
    /// served (about 1 % more when idle, for the heartbeats). Off by
    /// default; at most 10ms; needs --threads 1.
    #[arg(long, value_name = "DURATION", value_parser = parse_busy_poll)]
    busy_poll: Option<Duration>,
    /// While frames flow, ask the kernel to keep idle CPUs polling instead
    /// of halting: a CPU latency request of 0 µs on /dev/cpu_dma_latency,
    /// taken at a frame and released once DURATION (for example 1ms) passes
    /// without one. The hops of a request then do not wait for a halted CPU
    /// to wake (tens of µs each on a VM). It takes no CPU time from tasks,
    /// but it is machine-wide and costs power (on a VM, host CPU) while
    /// held. Needs write access to the device (root), and a cpuidle driver
    /// that honours it (a warning says when there is none). Off by default;
    /// at most 50ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_idle_poll)]
    idle_poll: Option<Duration>,
    /// The CPU latency device --idle-poll writes to.
    #[arg(long, value_name = "PATH", default_value = CPU_LATENCY_DEVICE, requires = "idle_poll")]
    idle_poll_device: PathBuf,
}

/// Switches `poll` on while the node leads (the one node on every
/// request's path; polling on every node would take more CPUs than small
/// machines have) and off otherwise, until the node stops.
fn poll_while_leading(poll: BusyPoll, mut status: tokio::sync::watch::Receiver<Status>) {
    poll.set_enabled(false);
    tokio::spawn(async move {
        loop {
            let leading = {
                let now = status.borrow_and_update();
                now.role == Role::Leader && now.stopped.is_none()
            };
            poll.set_enabled(leading);
            if status.changed().await.is_err() {
                poll.set_enabled(false);
                return;
            }
        }
    });
}

fn parse_idle_poll(text: &str) -> Result<Duration, String> {
    parse_window(text, IDLE_POLL_WINDOW_MAX)
}

fn parse_busy_poll(text: &str) -> Result<Duration, String> {
    parse_window(text, BUSY_POLL_WINDOW_MAX)
}

/// A polling window: a duration (never 0: `parse_duration` refuses it) of
/// at most `max` (a whole number of ms).
fn parse_window(text: &str, max: Duration) -> Result<Duration, String> {
    let window = crate::bench_cli::parse_duration(text)?;
    if window > max {
        return Err(format!(
            "{text:?} is out of range: more than 0 and at most {}ms",
            max.as_millis()
        ));
    }
    Ok(window)
}

fn parse_engine(text: &str) -> Result<StoreEngine, String> {
    match text {
        "wal" => Ok(StoreEngine::Wal),
        "sled" => Ok(StoreEngine::Sled),
        other => Err(format!("unknown storage engine {other:?} (wal or sled)")),
    }
}

/// One `ID=HOST:PORT` of `--cluster`, checked for shape (not resolved yet).
#[derive(Clone, Debug)]
pub struct Member {
    id: NodeId,
    address: String,
}

fn parse_member(text: &str) -> Result<Member, String> {
    let (id, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not ID=HOST:PORT"))?;
    let id: NodeId = id
        .parse()
        .map_err(|_| format!("{id:?} in {text:?} is not a node id (1, 2, 3, ...)"))?;
    if id == 0 {
        return Err(format!("node ids start at 1 (got {text:?})"));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} has no port (expected HOST:PORT)"))?;
    if host.is_empty() {
        return Err(format!("{address:?} has no host (expected HOST:PORT)"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} in {address:?} is not a port number"))?;
    if port == 0 {
        return Err(format!(
            "node {id} has port 0: every node needs a fixed port its peers can reach"
        ));
    }
    Ok(Member {
        id,
        address: address.to_owned(),
    })
}

/// Checks that `members` make a cluster with node ids 1..=n, distinct
/// addresses, and `id` among them; resolves the addresses.
async fn check_cluster(
    members: &[Member],
    id: NodeId,
) -> anyhow::Result<BTreeMap<NodeId, SocketAddr>> {
    if members.len() > CLUSTER_NODES_MAX {
        bail!(
            "--cluster lists {} nodes; at most {CLUSTER_NODES_MAX} are supported",
            members.len()
        );
    }
    let n = members.len() as NodeId;
    let mut addresses: BTreeMap<NodeId, SocketAddr> = BTreeMap::new();
    for member in members {
        if addresses.contains_key(&member.id) {
            bail!("node {} is listed twice in --cluster", member.id);
        }
        if member.id > n {
            bail!(
                "--cluster lists {n} nodes, so their ids must be 1..={n} (clients number servers \
                 by their position in --servers), but it has node {}",
                member.id
            );
        }
        let address = resolve(&member.address)
            .await
            .with_context(|| format!("bad address for node {} in --cluster", member.id))?;
        if let Some((&other, _)) = addresses.iter().find(|(_, a)| **a == address) {
            bail!(
                "nodes {other} and {} have the same address {address} in --cluster",
                member.id
            );
        }
        addresses.insert(member.id, address);
    }
    if !addresses.contains_key(&id) {
        bail!("--id {id} is not in --cluster (its nodes are 1..={n})");
    }
    Ok(addresses)
}

/// `raftkv server`: serves until SIGINT or SIGTERM, then hands leadership
/// over (if it leads), stops the node and exits 0.
pub fn server(args: ServerArgs) -> anyhow::Result<ExitCode> {
    crate::kv_cli::runtime_with_threads(args.threads)?.block_on(serve(args))
}

/// KV namespace of a server's data directory that records which node of
/// which cluster the directory belongs to (the replicated service keeps its
/// own state in the Raft log and snapshots, never in KV namespaces).
pub const NODE_IDENTITY_NAMESPACE: StateMachineId = u64::MAX;
/// Key of the identity record.
const NODE_IDENTITY_KEY: &str = "node";

/// The identity a cluster node's data directory records, if any (see
/// [`NODE_IDENTITY_NAMESPACE`]).
pub fn recorded_identity(store: &Store) -> anyhow::Result<Option<String>> {
    Ok(store
        .kv_get(NODE_IDENTITY_NAMESPACE, NODE_IDENTITY_KEY.as_bytes())?
        .map(|recorded| String::from_utf8_lossy(&recorded.value).into_owned()))
}

/// What a data directory records about the node it belongs to: the cluster
/// id, the node id and the voters (addresses may change, these may not).
fn node_identity(cluster_id: &str, id: NodeId, voters: &[NodeId]) -> String {
    let voters: Vec<String> = voters.iter().map(NodeId::to_string).collect();
    format!(
        "cluster {cluster_id:?} node {id} voters {}",
        voters.join(",")
    )
}

/// Refuses a data directory made for another node or cluster: its votes and
/// log belong to that identity, and running it as another one could elect
/// two leaders in a term. A fresh directory, or one written before identity
/// records existed, gets the record.
fn check_identity(store: &Store, dir: &Path, identity: &str) -> anyhow::Result<()> {
    let recorded = recorded_identity(store)
        .with_context(|| format!("cannot read data directory {}", dir.display()))?;
    match recorded {
        Some(recorded) if recorded == identity => Ok(()),
        Some(recorded) => bail!(
            "data directory {} belongs to {recorded}, not {identity}: restart it with the --id, \
             --cluster and --cluster-id it was created with",
            dir.display(),
        ),
        None => {
            if store.last_index(0)? > 0 || store.hard_state(0)?.term > 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    identity,
                    "data directory without an identity record: recording this one unverified"
                );
            }
            let mut batch = WriteBatch::new();
            batch.kv_put(
                NODE_IDENTITY_NAMESPACE,
                NODE_IDENTITY_KEY,
                identity.to_owned(),
                1,
            );
            store
                .commit(batch)
                .with_context(|| format!("cannot write data directory {}", dir.display()))?;
            Ok(())
        }
    }
}

async fn serve(args: ServerArgs) -> anyhow::Result<ExitCode> {
    if args.busy_poll.is_some() && args.threads > 1 {
        bail!(
            "--busy-poll needs --threads 1 (on a multi-thread runtime the polling worker does not poll the sockets)"
        );
    }
    let id = args.id;
    let addresses = check_cluster(&args.cluster, id).await?;
    let voters: Vec<NodeId> = addresses.keys().copied().collect();
    let data_dir = args.data_dir.clone();
    let identity = node_identity(&args.cluster_id, id, &voters);
    let store_config = StoreConfig {
        engine: args.storage_engine,
        ..StoreConfig::default()
    };
    let store = tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
        let store = Store::open_with(&data_dir, &store_config)
            .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
        check_identity(&store, &data_dir, &identity)?;
        Ok(store)
    })
    .await
    .context("the store opening task failed")??;
    let mut tcp = TcpConfig::member(cluster_id(&args.cluster_id), id, addresses[&id]);
    tcp.busy_poll = args.busy_poll;
    tcp.idle_poll = args.idle_poll;
    tcp.idle_poll_device = args.idle_poll_device.clone();
    for (&peer, &address) in &addresses {
        if peer != id {
            tcp.peers.insert(peer, address);
        }
    }
    let transport = TcpTransport::start(tcp)
        .await
        .with_context(|| format!("cannot start node {id}"))?;
    let endpoint = transport.endpoint();
    let mut config = RaftKvConfig::default();
    // Distinct election timeouts on every node and every run.
    config.rsm.node.rng_seed = rand::random();
    // A leader flushes on the node's storage thread: the runtime keeps
    // reading the network and answering clients meanwhile. A follower with
    // nothing queued there flushes on the runtime (`followers_flush_inline`):
    // it only waits for the flush, and the thread hand-over costs more.
    config.rsm.node.storage_thread = !args.inline_storage;
    config.rsm.maxraftstate_bytes = (args.maxraftstate > 0).then_some(args.maxraftstate);
    let server = RaftKvServer::start(id, &voters, config, store, endpoint.clone())
        .with_context(|| format!("cannot start node {id}"))?;
    if let Some(poll) = transport.busy_poll() {
        poll_while_leading(poll.clone(), server.rsm().node().subscribe());
    }
    // Handle the signals before announcing the address, so a script that
    // signals as soon as it reads the line gets a clean shutdown.
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let bound = transport
        .local_address()
        .context("the server transport has no listen address")?;
    crate::kv_cli::print_line(&format!("listening on {bound}"))?;
    tracing::info!(
        node = id,
        cluster = ?addresses,
        data_dir = %args.data_dir.display(),
        "server: serving"
    );
    let mut status = server.rsm().node().subscribe();
    let stopped_by_itself = tokio::select! {
        _ = terminate.recv() => { tracing::info!("server: SIGTERM"); None }
        _ = interrupt.recv() => { tracing::info!("server: SIGINT"); None }
        stopped = status.wait_for(|s| s.stopped.is_some()) => {
            let reason = stopped.ok().and_then(|s| s.stopped.clone());
            Some(reason.map_or_else(|| "unknown".to_owned(), |r| format!("{r:?}")))
        }
    };
    if stopped_by_itself.is_none() {
        hand_over_leadership(&server, &endpoint, &voters).await;
    }
    server.shutdown().await;
    endpoint.shutdown().await;
    // The driver publishes its final counters when it stops.
    let metrics = server.rsm().node().status().metrics;
    tracing::info!(
        node = id,
        flushes = metrics.flushes,
        entries_persisted = metrics.entries_persisted,
        entries_per_flush = format_args!("{:.1}", metrics.entries_per_flush()),
        entries_per_append = format_args!("{:.1}", metrics.entries_per_append()),
        messages_sent = metrics.messages_sent,
        messages_received = metrics.messages_received,
        slow_commits = metrics.slow_commits,
        "server: stopped"
    );
    match stopped_by_itself {
        None => Ok(ExitCode::SUCCESS),
        Some(reason) => bail!("node {id} stopped: {reason}"),
    }
}

/// If this node leads, hands leadership to the most up-to-date reachable peer,
/// so clients wait for a transfer rather than an election timeout. Bounded by
/// [`HANDOVER_TIMEOUT`]; gives up quietly (the others will elect a leader).
async fn hand_over_leadership(server: &RaftKvServer, endpoint: &Endpoint, voters: &[NodeId]) {
    let node = server.rsm().node();
    if !node.state().1 {
        return;
    }
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    let peers: Vec<NodeId> = voters.iter().copied().filter(|&v| v != node.id()).collect();
    let answers = futures::future::join_all(
        peers
            .iter()
            .map(|&peer| fetch_status(endpoint, peer, HANDOVER_STATUS_TIMEOUT)),
    )
    .await;
    let mut targets: Vec<(u64, NodeId)> = answers
        .into_iter()
        .filter_map(Result::ok)
        .filter(|status| status.stopped.is_none())
        .map(|status| (status.last_index, status.id))
        .collect();
    targets.sort_unstable_by(|a, b| b.cmp(a));
    for (_, target) in targets {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if let Err(error) = node.transfer_leader(target).await {
            tracing::debug!(target, %error, "server: leadership transfer refused");
            continue;
        }
        let mut status = node.subscribe();
        let attempt_deadline = deadline.min(now + HANDOVER_ATTEMPT_TIMEOUT);
        let stepped_down = tokio::time::timeout_at(
            attempt_deadline,
            status.wait_for(|s| s.role != Role::Leader),
        )
        .await;
        if let Ok(Ok(now)) = stepped_down {
            tracing::info!(to = target, leader = ?now.leader, "server: no longer the leader");
            return;
        }
    }
    tracing::info!("server: no leadership handover; the others will elect a leader");
}

/// Arguments of `raftkv status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Server addresses, comma-separated, in node id order: the i-th (from 1)
    /// is node i.
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
    /// How long to wait for each node's answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    timeout_ms: u64,
    /// Print a JSON array, one object per node, instead of a table (with
    /// every node's work counters).
    #[arg(long)]
    json: bool,
    /// Also print each node's work counters since it started: flushes,
    /// entries written per flush, appends sent and entries per append,
    /// messages sent and received, slow commits.
    #[arg(long)]
    counters: bool,
}

/// What one node answered to the status request, or why it did not.
pub(crate) struct NodeReport {
    id: NodeId,
    address: SocketAddr,
    outcome: Result<NodeStatus, String>,
}

impl NodeReport {
    fn status(&self) -> Option<&NodeStatus> {
        self.outcome.as_ref().ok()
    }
}

/// Asks every node in `addresses` (the i-th is node i) for its status, all at
/// once, each within `timeout`.
async fn query_cluster(
    endpoint: &Endpoint,
    addresses: &[SocketAddr],
    timeout: Duration,
) -> Vec<NodeReport> {
    let queries = addresses.iter().enumerate().map(|(index, &address)| {
        let id = index as NodeId + 1;
        async move {
            let outcome = match fetch_status(endpoint, id, timeout).await {
                Ok(status) => Ok(status),
                Err(error) => Err(why_unreachable(&error, id, address, timeout).await),
            };
            NodeReport {
                id,
                address,
                outcome,
            }
        }
    });
    futures::future::join_all(queries).await
}

/// A short explanation of a failed status call, for an operator.
async fn why_unreachable(
    error: &NetError,
    id: NodeId,
    address: SocketAddr,
    timeout: Duration,
) -> String {
    match error {
        NetError::Refused {
            fault: RemoteFault::UnknownKind,
            ..
        } => return "answers, but has no status RPC (a single-node kvsrv?)".to_owned(),
        NetError::Refused {
            fault: RemoteFault::ShuttingDown,
            ..
        } => return "shutting down".to_owned(),
        NetError::Refused { fault, .. } => return format!("refused the request: {fault}"),
        NetError::NoReply { .. } => {
            return format!("no answer within {} ms", timeout.as_millis());
        }
        _ => {}
    }
    // The transport does not say why it could not connect: try by hand.
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Err(_elapsed) => format!("connecting timed out after {} ms", timeout.as_millis()),
        Ok(Err(io)) => io.to_string(),
        Ok(Ok(_stream)) => format!(
            "accepts connections but refused the handshake: another --cluster-id, or not node \
             {id} (list --servers in node id order)"
        ),
    }
}

/// Left-aligned columns as wide as their widest cell, two spaces apart.
fn render_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(&header);
    for row in rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// The status table: one row per node, then a line per node that did not answer.
fn render_status_table(reports: &[NodeReport]) -> String {
    let header = [
        "ID",
        "ADDRESS",
        "REACHABLE",
        "ROLE",
        "TERM",
        "LEADER",
        "COMMIT",
        "APPLIED",
        "LOG SIZE",
    ];
    let rows: Vec<[String; 9]> = reports
        .iter()
        .map(|report| {
            let (id, address) = (report.id.to_string(), report.address.to_string());
            match report.status() {
                Some(status) => [
                    id,
                    address,
                    "yes".into(),
                    if status.stopped.is_some() {
                        "stopped".into()
                    } else {
                        status.role.to_string()
                    },
                    status.term.to_string(),
                    status
                        .leader
                        .map_or_else(|| "-".to_owned(), |leader| leader.to_string()),
                    status.commit_index.to_string(),
                    status.applied_index.to_string(),
                    status
                        .raft_state_bytes
                        .map_or_else(|| "-".to_owned(), crate::human_bytes),
                ],
                None => [
                    id,
                    address,
                    "no".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ],
            }
        })
        .collect();
    let mut out = render_table(header, &rows);
    for report in reports {
        match &report.outcome {
            Err(why) => {
                let _ = writeln!(out, "node {} is unreachable: {why}", report.id);
            }
            Ok(status) => {
                if let Some(reason) = &status.stopped {
                    let _ = writeln!(out, "node {} has stopped: {reason}", report.id);
                }
            }
        }
    }
    out
}

/// The counters table: one row per node that answered.
fn render_counters_table(reports: &[NodeReport]) -> String {
    let header = [
        "ID",
        "FLUSHES",
        "ENTRIES/FLUSH",
        "APPENDS SENT",
        "ENTRIES/APPEND",
        "MSGS SENT",
        "MSGS RECEIVED",
        "APPLIED",
        "SLOW COMMITS",
    ];
    use crate::bench_cli::{one_decimal, ratio};
    let per = |entries: u64, batches: u64| one_decimal(ratio(entries, batches));
    let rows: Vec<[String; 9]> = reports
        .iter()
        .filter_map(|report| {
            let counters = &report.status()?.counters;
            Some([
                report.id.to_string(),
                counters.flushes.to_string(),
                per(counters.entries_persisted, counters.flushes),
                counters.append_messages_sent.to_string(),
                per(counters.append_entries_sent, counters.append_messages_sent),
                counters.messages_sent.to_string(),
                counters.messages_received.to_string(),
                counters.entries_applied.to_string(),
                counters.slow_commits.to_string(),
            ])
        })
        .collect();
    render_table(header, &rows)
}

fn status_json(reports: &[NodeReport]) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = reports
        .iter()
        .map(|report| match &report.outcome {
            Ok(status) => json!({
                "id": report.id,
                "address": report.address.to_string(),
                "reachable": true,
                "role": status.role.as_str(),
                "term": status.term,
                "leader": status.leader,
                "commit_index": status.commit_index,
                "applied_index": status.applied_index,
                "last_index": status.last_index,
                "snapshot_index": status.snapshot_index,
                "raft_state_bytes": status.raft_state_bytes,
                "stopped": status.stopped,
                "counters": status.counters,
            }),
            Err(why) => json!({
                "id": report.id,
                "address": report.address.to_string(),
                "reachable": false,
                "error": why,
            }),
        })
        .collect();
    serde_json::Value::Array(nodes)
}

/// `raftkv status`: prints one row per node; exits 1 only if none answered.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut addresses = Vec::with_capacity(args.servers.len());
        for (index, address) in args.servers.iter().enumerate() {
            let resolved = resolve(address)
                .await
                .with_context(|| format!("bad address for node {} in --servers", index + 1))?;
            addresses.push(resolved);
        }
        let (transport, _) = client_transport(cluster_id(&args.cluster_id), &addresses).await?;
        let endpoint = transport.endpoint();
        let timeout = Duration::from_millis(args.timeout_ms);
        let reports = query_cluster(&endpoint, &addresses, timeout).await;
        endpoint.shutdown().await;
        if args.json {
            say(&status_json(&reports).to_string());
        } else {
            say(render_status_table(&reports).trim_end());
            if args.counters {
                say("");
                say(render_counters_table(&reports).trim_end());
            }
        }
        if reports.iter().all(|report| report.outcome.is_err()) {
            eprintln!("raftkv: no node answered");
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Prints to stdout and flushes, ignoring a closed stdout (`raftkv demo | head`).
fn say(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
    let _ = stdout.flush();
}

/// Prints each line of `text` indented by two spaces (empty lines stay empty).
fn say_indented(text: &str) {
    for line in text.lines() {
        if line.is_empty() {
            say("");
        } else {
            say(&format!("  {line}"));
        }
    }
}

/// Arguments of `raftkv demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the nodes' data directories and logs; created, and must
    /// be empty if it exists. Default: a new directory in the system's
    /// temporary directory. Kept after the demo either way.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Cluster name of the demo's nodes.
const DEMO_CLUSTER: &str = "raftkv-demo";
/// Nodes in the demo cluster.
const DEMO_NODES: usize = 3;
/// Longest the demo waits for any one step (a server to start or stop, a
/// leader to be elected, a node to catch up).
const DEMO_STEP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the demo's clerk tries one put or get.
const DEMO_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two status polls while the demo waits for something.
const DEMO_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Status calls made while polling give up after this long.
const DEMO_STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// One node of the demo cluster: a child `raftkv server` process.
struct DemoNode {
    id: NodeId,
    child: Option<tokio::process::Child>,
}

/// The demo cluster's processes: its directory, addresses and nodes.
struct DemoCluster {
    exe: PathBuf,
    dir: PathBuf,
    addresses: Vec<SocketAddr>,
    nodes: Vec<DemoNode>,
}

/// The demo's client of the cluster: status calls and a clerk. Made once the
/// servers listen, so its first connections succeed.
struct DemoClient {
    addresses: Vec<SocketAddr>,
    endpoint: Endpoint,
    clerk: Clerk<EndpointRpc>,
}

/// `raftkv demo`.
pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.dir {
        Some(dir) => {
            if dir.exists()
                && std::fs::read_dir(&dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?
                    .next()
                    .is_some()
            {
                bail!(
                    "{} is not empty; give the demo a new or empty directory",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            dir
        }
        None => tempfile::Builder::new()
            .prefix("raftkv-demo-")
            .tempdir()
            .context("cannot create a temporary directory")?
            .keep(),
    };
    let exe = std::env::current_exe().context("cannot find the raftkv executable")?;
    runtime()?.block_on(async move {
        let result = run_demo(exe, &dir).await;
        result.with_context(|| {
            format!(
                "the demo failed; the nodes' logs are in {}/node-N.log",
                dir.display()
            )
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Free loopback ports, one per node: bound to port 0 together (so they
/// differ), then released for the servers to bind. Another process could
/// take one in between; that node then fails to start, with a clear error.
fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("cannot find free ports on 127.0.0.1")?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?))
        .collect()
}

impl DemoCluster {
    fn cluster_flag(&self) -> String {
        self.addresses
            .iter()
            .enumerate()
            .map(|(index, address)| format!("{}={address}", index + 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn servers_flag(&self) -> String {
        self.addresses
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    fn log_path(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("node-{id}.log"))
    }

    fn server_args(&self, id: NodeId) -> Vec<String> {
        vec![
            "server".into(),
            "--id".into(),
            id.to_string(),
            "--cluster".into(),
            self.cluster_flag(),
            "--data-dir".into(),
            self.data_dir(id).display().to_string(),
            "--cluster-id".into(),
            DEMO_CLUSTER.into(),
        ]
    }

    /// Starts node `id` and waits for its `listening on` line. Its stderr
    /// (the log) is appended to `node-ID.log`.
    async fn start(&mut self, id: NodeId) -> anyhow::Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .with_context(|| format!("cannot open {}", self.log_path(id).display()))?;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .args(self.server_args(id))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        let pid = child.id().context("the server exited at once")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let first = tokio::time::timeout(DEMO_STEP_TIMEOUT, async {
            BufReader::new(stdout).lines().next_line().await
        })
        .await;
        match first {
            Ok(Ok(Some(line))) if line.starts_with("listening on ") => {}
            Ok(_) => {
                let _ = child.kill().await;
                bail!(
                    "node {id} did not start: {}",
                    last_log_line(&self.log_path(id))
                );
            }
            Err(_elapsed) => bail!(
                "node {id} did not start within {} s",
                DEMO_STEP_TIMEOUT.as_secs()
            ),
        }
        self.nodes[id as usize - 1].child = Some(child);
        Ok(pid)
    }

    /// Starts node `id` again after a crash. Its port was free when the node
    /// died, but another program may hold it for a moment (an outgoing
    /// connection's ephemeral port): retry until the step deadline.
    async fn restart(&mut self, id: NodeId) -> anyhow::Result<u32> {
        let deadline = Instant::now() + DEMO_STEP_TIMEOUT;
        loop {
            match self.start(id).await {
                Ok(pid) => return Ok(pid),
                Err(error) if Instant::now() < deadline && is_address_in_use(&error) => {
                    tokio::time::sleep(DEMO_POLL_INTERVAL * 4).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// SIGKILLs node `id` and waits until it is gone.
    async fn kill(&mut self, id: NodeId) -> anyhow::Result<()> {
        let mut child = self.nodes[id as usize - 1]
            .child
            .take()
            .context("the node is not running")?;
        child.kill().await.context("cannot kill the node")?;
        Ok(())
    }

    /// SIGTERMs every running node and waits for each to exit; fails unless
    /// all exit 0.
    async fn stop_all(&mut self) -> anyhow::Result<()> {
        let mut children = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = node.child.take() {
                if let Some(pid) = child.id() {
                    terminate(pid)?;
                }
                children.push((node.id, child));
            }
        }
        for (id, mut child) in children {
            let exit = tokio::time::timeout(DEMO_STEP_TIMEOUT, child.wait())
                .await
                .with_context(|| {
                    format!(
                        "node {id} did not stop within {} s",
                        DEMO_STEP_TIMEOUT.as_secs()
                    )
                })??;
            if !exit.success() {
                bail!("node {id} exited with {exit}");
            }
        }
        Ok(())
    }
}

impl DemoClient {
    async fn connect(addresses: &[SocketAddr]) -> anyhow::Result<DemoClient> {
        let (transport, _) = client_transport(cluster_id(DEMO_CLUSTER), addresses).await?;
        let clerk = clerk_for(cluster_id(DEMO_CLUSTER), addresses, DEMO_CLIENT_TIMEOUT).await?;
        Ok(DemoClient {
            addresses: addresses.to_vec(),
            endpoint: transport.endpoint(),
            clerk,
        })
    }

    async fn statuses(&self) -> Vec<NodeReport> {
        query_cluster(&self.endpoint, &self.addresses, DEMO_STATUS_TIMEOUT).await
    }

    /// Polls until a node leads a term above `after_term`; returns its status.
    async fn wait_for_leader(&self, after_term: u64) -> anyhow::Result<NodeStatus> {
        let deadline = Instant::now() + DEMO_STEP_TIMEOUT;
        loop {
            let reports = self.statuses().await;
            let leader = reports
                .iter()
                .filter_map(NodeReport::status)
                .filter(|s| s.role == NodeRole::Leader && s.term > after_term)
                .max_by_key(|s| s.term);
            if let Some(leader) = leader {
                return Ok(leader.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no leader elected within {} s:\n{}",
                    DEMO_STEP_TIMEOUT.as_secs(),
                    render_status_table(&reports)
                );
            }
            tokio::time::sleep(DEMO_POLL_INTERVAL).await;
        }
    }

    /// Polls until node `id` has applied everything the leader has applied;
    /// returns that index.
    async fn wait_caught_up(&self, id: NodeId) -> anyhow::Result<u64> {
        let deadline = Instant::now() + DEMO_STEP_TIMEOUT;
        loop {
            let reports = self.statuses().await;
            let node = reports[id as usize - 1].status();
            let leader = reports
                .iter()
                .filter_map(NodeReport::status)
                .find(|s| s.role == NodeRole::Leader);
            if let (Some(node), Some(leader)) = (node, leader) {
                if node.applied_index >= leader.applied_index && leader.applied_index > 0 {
                    return Ok(node.applied_index);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "node {id} did not catch up within {} s:\n{}",
                    DEMO_STEP_TIMEOUT.as_secs(),
                    render_status_table(&reports)
                );
            }
            tokio::time::sleep(DEMO_POLL_INTERVAL).await;
        }
    }

    /// Puts `value` at `key` if its version is `version`; fails unless OK.
    async fn put(&self, key: &str, value: &str, version: u64) -> anyhow::Result<()> {
        let result = self
            .clerk
            .put(key, Bytes::from(value.to_owned()), version)
            .await;
        let creates = if version == 0 {
            " (creates the key)"
        } else {
            ""
        };
        match result {
            Ok(()) => {
                say(&format!(
                    "  put {key} = {value:?} at version {version}{creates} -> OK"
                ));
                Ok(())
            }
            Err(error) => bail!("put {key} at version {version} failed: {error}"),
        }
    }

    /// Gets `key` and prints it; returns (value, version).
    async fn get(&self, key: &str, note: &str) -> anyhow::Result<(String, u64)> {
        let found = self
            .clerk
            .get(key)
            .await
            .with_context(|| format!("get {key} failed"))?;
        let value = String::from_utf8_lossy(&found.value).into_owned();
        say(&format!(
            "  get {key} -> {value:?} (version {}){note}",
            found.version
        ));
        Ok((value, found.version))
    }
}

/// Whether a node failed to start because its port was taken.
fn is_address_in_use(error: &anyhow::Error) -> bool {
    error.to_string().contains("Address already in use")
}

/// The last non-empty line of a node's log, to explain why it failed.
fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("no log in {}", path.display()))
}

/// Sends SIGTERM to process `pid`.
fn terminate(pid: u32) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
    // SAFETY: kill(2) only sends a signal; it touches no memory of ours.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    if sent != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot send SIGTERM to process {pid}"));
    }
    Ok(())
}

fn seconds(since: Instant) -> String {
    format!("{:.2} s", since.elapsed().as_secs_f64())
}

async fn run_demo(exe: PathBuf, dir: &Path) -> anyhow::Result<()> {
    let addresses = free_ports(DEMO_NODES)?;
    let mut cluster = DemoCluster {
        exe,
        dir: dir.to_path_buf(),
        nodes: (1..=DEMO_NODES as NodeId)
            .map(|id| DemoNode { id, child: None })
            .collect(),
        addresses,
    };
    say(&format!(
        "raftkv demo: a replicated key/value cluster of {DEMO_NODES} nodes on this machine."
    ));
    say(&format!(
        "Data and logs go to {} (kept after the demo).",
        dir.display()
    ));

    say("");
    say(&format!(
        "step 1: start {DEMO_NODES} servers, each a process with its own data directory"
    ));
    say(&format!(
        "  $ raftkv server --id N --cluster {} --data-dir {}/node-N --cluster-id {DEMO_CLUSTER}",
        cluster.cluster_flag(),
        dir.display()
    ));
    let started = Instant::now();
    for id in 1..=DEMO_NODES as NodeId {
        let pid = cluster.start(id).await?;
        say(&format!(
            "  node {id} listening on {} (pid {pid}), data in {}",
            cluster.addresses[id as usize - 1],
            cluster.data_dir(id).display()
        ));
    }
    let client = DemoClient::connect(&cluster.addresses).await?;
    let leader = client.wait_for_leader(0).await?;
    say(&format!(
        "  the nodes elected node {} leader (term {}) in {}",
        leader.id,
        leader.term,
        seconds(started)
    ));

    say("");
    say(
        "step 2: write and read through the cluster (a put is acknowledged once a majority has it on disk)",
    );
    client.put("color", "blue", 0).await?;
    client.put("shape", "circle", 0).await?;
    client.put("color", "red", 1).await?;
    client.get("color", "").await?;
    client.get("shape", "").await?;

    say("");
    let old_leader = leader.id;
    say(&format!(
        "step 3: crash the leader: SIGKILL node {old_leader}"
    ));
    let killed = Instant::now();
    cluster.kill(old_leader).await?;
    let leader = client.wait_for_leader(leader.term).await?;
    say(&format!(
        "  the other two elected node {} leader (term {}) in {}",
        leader.id,
        leader.term,
        seconds(killed)
    ));
    client.put("size", "large", 0).await?;
    let (color, version) = client
        .get("color", ": the acknowledged writes survived")
        .await?;
    if (color.as_str(), version) != ("red", 2) {
        bail!("color is {color:?} at version {version}, expected \"red\" at version 2");
    }

    say("");
    say(&format!(
        "step 4: restart node {old_leader} with the same command; it catches up from the others"
    ));
    let restarted = Instant::now();
    let pid = cluster.restart(old_leader).await?;
    say(&format!(
        "  node {old_leader} listening on {} again (pid {pid})",
        cluster.addresses[old_leader as usize - 1]
    ));
    let applied = client.wait_caught_up(old_leader).await?;
    say(&format!(
        "  node {old_leader} has applied index {applied}, as the leader has: caught up in {}",
        seconds(restarted)
    ));
    say(&format!(
        "  $ raftkv status --servers {} --cluster-id {DEMO_CLUSTER}",
        cluster.servers_flag()
    ));
    say_indented(&render_status_table(&client.statuses().await));

    say("");
    say("step 5: stop the cluster: SIGTERM every node (each stops cleanly and exits 0)");
    cluster.stop_all().await?;
    say(&format!("  all {DEMO_NODES} nodes stopped"));
    client.endpoint.shutdown().await;

    say("");
    let inspected = cluster.data_dir(old_leader);
    say(&format!(
        "step 6: what node {old_leader}'s data directory holds"
    ));
    say(&format!(
        "  $ raftkv inspect {} --entries 4",
        inspected.display()
    ));
    let report = crate::inspect_text(&inspected, 4)?;
    say_indented(&report);
    say(
        "  (the replicated service keeps its map in the Raft log and snapshots, replayed at start,",
    );
    say("  so the store has no kv namespaces)");
    say("");
    say(
        "Done. Run a cluster yourself with `raftkv server` and watch it with `raftkv status`; see README.md.",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv::net::Transport as _;

    fn status(role: Role) -> Status {
        Status {
            id: 1,
            group: 0,
            term: 1,
            role,
            leader: None,
            commit_index: 0,
            applied_index: 0,
            last_index: 0,
            snapshot_index: 0,
            stopped: None,
            metrics: Default::default(),
        }
    }

    /// Yields until `poll.is_enabled() == enabled` (bounded).
    async fn until_enabled(poll: &BusyPoll, enabled: bool) {
        for _ in 0..1000 {
            if poll.is_enabled() == enabled {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the poller never became enabled = {enabled}");
    }

    // `--busy-poll` polls only while the node leads, and stops with the node.
    #[tokio::test(flavor = "current_thread")]
    async fn busy_polls_only_while_leading() {
        let mut config = TcpConfig::client(1, 1);
        config.busy_poll = Some(Duration::from_millis(1));
        let transport = TcpTransport::start(config).await.expect("client transport");
        let poll = transport.busy_poll().expect("configured").clone();
        let (statuses, watched) = tokio::sync::watch::channel(status(Role::Follower));
        poll_while_leading(poll.clone(), watched);
        // Let the watching task read the first status (a follower's).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!poll.is_enabled(), "off until the node leads");
        statuses.send_replace(status(Role::Leader));
        until_enabled(&poll, true).await;
        statuses.send_replace(status(Role::Follower));
        until_enabled(&poll, false).await;
        statuses.send_replace(status(Role::Leader));
        until_enabled(&poll, true).await;
        statuses.send_replace(status(Role::Candidate));
        until_enabled(&poll, false).await;
        statuses.send_replace(status(Role::Leader));
        until_enabled(&poll, true).await;
        let mut stopped = status(Role::Leader);
        stopped.stopped = Some(raftkv::raft::StopReason::Shutdown);
        statuses.send_replace(stopped);
        until_enabled(&poll, false).await;
        statuses.send_replace(status(Role::Leader));
        until_enabled(&poll, true).await;
        drop(statuses);
        until_enabled(&poll, false).await;
        transport.shutdown().await;
    }
}

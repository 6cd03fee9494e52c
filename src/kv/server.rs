//! The single-node key/value server: answers [`KvCommand`] RPCs on an
//! [`Endpoint`] (simulated network or TCP) from a versioned map kept in one
//! namespace of a [`KvStorage`] (a sled [`Store`](crate::storage::Store) in a
//! real node).
//!
//! # How a request is served
//! The RPC handler only queues the command on a bounded queue
//! ([`KvServerConfig::queue_requests_max`]; when full the request is answered
//! [`ServerUnavailable::Busy`] at once). One committer task takes the
//! requests in batches (group commit) and, on a blocking thread:
//! 1. executes them in queue order with [`execute`] (the Lab 2 rules of
//!    [`apply`](super::apply)), each command seeing the effect of the earlier
//!    ones of its batch;
//! 2. writes the changed keys as one [`WriteBatch`] with one
//!    [`Storage::commit`](crate::storage::Storage::commit) (one flush);
//! 3. only then replies to every request of the batch, Gets included.
//!
//! # Guarantees
//! - **Durable before acknowledged**: a Put's reply is sent after the commit
//!   of its batch returned, i.e. after the flush ([`Storage`](crate::storage::Storage)'s durability
//!   contract).
//! - **Atomic read-modify-write**: one task executes every command, in
//!   order, so two Puts on one key never both act on the same version (no
//!   lost updates), however many clients there are.
//! - **Reads see only durable state**: a Get reads the store after every
//!   earlier batch is durable, or reads a value of its own batch and is
//!   answered after that batch's flush. So no client ever sees a value that a
//!   crash could take back.
//! - **No per-client state**: the server keeps the queue, the batch being
//!   executed and counters; nothing grows with the number of clients. It
//!   does not de-duplicate re-sent Puts (the Clerk's ErrMaybe rule covers
//!   them).
//! - **Restart**: everything the server knows is in the store; a server
//!   started on a reopened store serves the same values and versions.
//! - **Fail-stop storage**: when a read or commit fails, every request of
//!   the batch is answered [`ServerUnavailable::StorageFailed`] (nothing of
//!   the batch was acknowledged); the store itself refuses further writes
//!   after a failed write until it is reopened.
//!
//! Time: the server reads no clock. Under tokio's paused test clock the
//! blocking commit does not let virtual time advance (tokio holds the clock
//! while a blocking task runs), so storage costs no virtual time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::rpc::{KvResponse, ServerUnavailable};
use super::state_machine::{VersionedMap, execute};
use super::types::{KvCommand, KvReply, Versioned};
use crate::net::{Endpoint, NetError};
use crate::storage::{KvStorage, StateMachineId, StorageError, WriteBatch};

/// Settings of a [`KvServer`]; every bound is here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvServerConfig {
    /// The store namespace holding the map (several maps can share a store).
    pub namespace: StateMachineId,
    /// Requests waiting for the committer; beyond this, requests are answered
    /// [`ServerUnavailable::Busy`] at once.
    pub queue_requests_max: usize,
    /// Most requests executed and committed as one batch (one flush).
    pub batch_requests_max: usize,
    /// A batch takes no further request once its keys and values add up to
    /// this many bytes (it always takes at least one request).
    pub batch_bytes_max: usize,
}

impl Default for KvServerConfig {
    fn default() -> Self {
        Self {
            namespace: 0,
            queue_requests_max: 4096,
            batch_requests_max: 1024,
            batch_bytes_max: 16 * 1024 * 1024,
        }
    }
}

impl KvServerConfig {
    /// Checks that every bound is usable.
    pub fn validate(&self) -> Result<(), KvServerError> {
        if self.queue_requests_max == 0 {
            return Err(KvServerError::Config(
                "queue_requests_max must be at least 1",
            ));
        }
        if self.batch_requests_max == 0 {
            return Err(KvServerError::Config(
                "batch_requests_max must be at least 1",
            ));
        }
        if self.batch_bytes_max == 0 {
            return Err(KvServerError::Config("batch_bytes_max must be at least 1"));
        }
        Ok(())
    }
}

/// Why a [`KvServer`] could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum KvServerError {
    /// A configuration bound is unusable.
    #[error("invalid kv server configuration: {0}")]
    Config(&'static str),
    /// The request handler could not be registered on the endpoint.
    #[error("cannot register the kv request handler: {0}")]
    Register(#[source] NetError),
}

/// Counters of a [`KvServer`], for tests and monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvServerStats {
    /// Put commands executed, whatever their outcome.
    pub puts: u64,
    /// Get commands executed.
    pub gets: u64,
    /// Puts that installed a new value.
    pub installs: u64,
    /// Batches executed (each answers 1..=`batch_requests_max` requests).
    pub batches: u64,
    /// Batches that wrote something: one store commit (one flush) each.
    pub commits: u64,
    /// Requests answered [`ServerUnavailable::Busy`] because the queue was full.
    pub rejected_busy: u64,
    /// Batches answered [`ServerUnavailable::StorageFailed`].
    pub storage_failures: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    installs: AtomicU64,
    batches: AtomicU64,
    commits: AtomicU64,
    rejected_busy: AtomicU64,
    storage_failures: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> KvServerStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        KvServerStats {
            puts: load(&self.puts),
            gets: load(&self.gets),
            installs: load(&self.installs),
            batches: load(&self.batches),
            commits: load(&self.commits),
            rejected_busy: load(&self.rejected_busy),
            storage_failures: load(&self.storage_failures),
        }
    }
}

/// A queued request and where its response goes.
struct Request {
    command: KvCommand,
    respond: oneshot::Sender<KvResponse>,
}

/// The single-node versioned key/value server (see the module docs).
///
/// ```
/// use std::time::Duration;
/// use raftkv::kv::{Clerk, ClerkConfig, EndpointRpc, KvServer, KvServerConfig};
/// use raftkv::net::sim::{SimConfig, SimNetwork};
/// use raftkv::storage::Store;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let network = SimNetwork::new(SimConfig::new(1));
/// let server = KvServer::start(&network.add_node(1)?, Store::open(dir.path())?, KvServerConfig::default())?;
/// let rpc = EndpointRpc::new(network.add_client(), Duration::from_secs(1));
/// let clerk = Clerk::new(rpc, vec![1], ClerkConfig::default())?;
/// clerk.put("k", "v".into(), 0).await?;
/// assert_eq!(clerk.get("k").await?.version, 1);
/// server.shutdown().await; // drains the queue and releases the store
/// # Ok(())
/// # }
/// ```
pub struct KvServer {
    counters: Arc<Counters>,
    stop: CancellationToken,
    committer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvServer")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl KvServer {
    /// Starts serving the map in `config.namespace` of `store` to requests
    /// arriving at `endpoint`.
    ///
    /// The server runs until [`KvServer::shutdown`], until it is dropped, or
    /// until the endpoint drops its handler (the endpoint shut down, or its
    /// simulated node crashed); it then finishes the requests already queued
    /// and drops `store`.
    ///
    /// # Panics
    /// Outside a tokio runtime (the committer is a spawned task).
    pub fn start<S: KvStorage + 'static>(
        endpoint: &Endpoint,
        store: S,
        config: KvServerConfig,
    ) -> Result<KvServer, KvServerError> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let (queue, requests) = mpsc::channel::<Request>(config.queue_requests_max);
        let handler_counters = counters.clone();
        endpoint
            .register(move |_from, command: KvCommand| {
                let (respond, response) = oneshot::channel();
                // Queue now, in the handler itself: the returned future then
                // holds no queue sender, so the queue closes as soon as the
                // endpoint drops this handler.
                let queued = match queue.try_send(Request { command, respond }) {
                    Ok(()) => Ok(response),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        Counters::add(&handler_counters.rejected_busy, 1);
                        Err(ServerUnavailable::Busy)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Err(ServerUnavailable::ShuttingDown)
                    }
                };
                async move {
                    match queued {
                        // A dropped responder means the committer stopped first.
                        Ok(response) => response
                            .await
                            .unwrap_or(Err(ServerUnavailable::ShuttingDown)),
                        Err(unavailable) => Err(unavailable),
                    }
                }
            })
            .map_err(KvServerError::Register)?;
        let stop = CancellationToken::new();
        let committer = tokio::spawn(run_committer(
            Arc::new(store),
            requests,
            config,
            counters.clone(),
            stop.clone(),
        ));
        tracing::info!(node = endpoint.id(), "kv server started");
        Ok(KvServer {
            counters,
            stop,
            committer: Some(committer),
        })
    }

    /// The server's counters.
    pub fn stats(&self) -> KvServerStats {
        self.counters.snapshot()
    }

    /// Stops the server: from now on requests are answered
    /// [`ServerUnavailable::ShuttingDown`]; requests already queued are
    /// executed and committed (their clients may or may not get the reply).
    /// Returns once the committer has stopped and dropped its store handle,
    /// so the data directory can be reopened. Does not shut the endpoint down.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(committer) = self.committer.take() {
            if let Err(error) = committer.await {
                if error.is_panic() {
                    // The committer only panics on a broken invariant: fail stop.
                    std::panic::resume_unwind(error.into_panic());
                }
                tracing::warn!(%error, "kv committer was cancelled");
            }
        }
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        // Without shutdown(): stop in the background, still draining the queue.
        self.stop.cancel();
    }
}

/// The committer task: takes requests in batches until stopped, then drains
/// what is queued.
async fn run_committer<S: KvStorage + 'static>(
    store: Arc<S>,
    mut requests: mpsc::Receiver<Request>,
    config: KvServerConfig,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            next = requests.recv() => match next {
                Some(request) => request,
                // The endpoint dropped the handler (shut down or crashed).
                None => break,
            },
        };
        let batch = take_batch(first, &mut requests, &config);
        run_batch(&store, config.namespace, batch, &counters).await;
    }
    requests.close();
    while let Some(first) = requests.recv().await {
        let batch = take_batch(first, &mut requests, &config);
        run_batch(&store, config.namespace, batch, &counters).await;
    }
    tracing::info!("kv server stopped");
}

/// `first` plus whatever is already queued, within the batch bounds.
fn take_batch(
    first: Request,
    requests: &mut mpsc::Receiver<Request>,
    config: &KvServerConfig,
) -> Vec<Request> {
    let mut bytes = request_bytes(&first.command);
    let mut batch = vec![first];
    while batch.len() < config.batch_requests_max && bytes < config.batch_bytes_max {
        match requests.try_recv() {
            Ok(request) => {
                bytes += request_bytes(&request.command);
                batch.push(request);
            }
            Err(_) => break,
        }
    }
    batch
}

fn request_bytes(command: &KvCommand) -> usize {
    match command {
        KvCommand::Put { key, value, .. } => key.len() + value.len(),
        KvCommand::Get { key } => key.len(),
    }
}

/// Executes and commits one batch on a blocking thread, then responds.
async fn run_batch<S: KvStorage + 'static>(
    store: &Arc<S>,
    namespace: StateMachineId,
    batch: Vec<Request>,
    counters: &Counters,
) {
    let (commands, responders): (Vec<KvCommand>, Vec<oneshot::Sender<KvResponse>>) = batch
        .into_iter()
        .map(|request| (request.command, request.respond))
        .unzip();
    let count = commands.len();
    let store = store.clone();
    let executed =
        tokio::task::spawn_blocking(move || execute_batch(&*store, namespace, &commands)).await;
    Counters::add(&counters.batches, 1);
    let responses: Vec<KvResponse> = match executed {
        Ok(Ok(executed)) => {
            Counters::add(&counters.puts, executed.puts);
            Counters::add(&counters.gets, executed.gets);
            Counters::add(&counters.installs, executed.installs);
            if executed.committed {
                Counters::add(&counters.commits, 1);
            }
            executed.replies.into_iter().map(Ok).collect()
        }
        Ok(Err(error)) => {
            tracing::error!(%error, requests = count, "kv server: storage failed; batch not executed");
            Counters::add(&counters.storage_failures, 1);
            vec![Err(ServerUnavailable::StorageFailed); count]
        }
        Err(error) if error.is_panic() => {
            // execute_batch only panics on a broken invariant: fail stop.
            std::panic::resume_unwind(error.into_panic())
        }
        Err(error) => {
            tracing::warn!(%error, "kv server: batch task cancelled");
            vec![Err(ServerUnavailable::ShuttingDown); count]
        }
    };
    assert_eq!(
        responses.len(),
        responders.len(),
        "one response per request"
    );
    for (responder, response) in responders.into_iter().zip(responses) {
        // The caller may have gone (timeout, crash): nothing to do then.
        let _ = responder.send(response);
    }
}

/// What one executed batch produced.
#[derive(Debug)]
struct Executed {
    replies: Vec<KvReply>,
    puts: u64,
    gets: u64,
    installs: u64,
    committed: bool,
}

/// Executes `commands` in order against the store and commits every change
/// as one durable batch. Nothing is committed if any read fails.
fn execute_batch<S: KvStorage + ?Sized>(
    store: &S,
    namespace: StateMachineId,
    commands: &[KvCommand],
) -> Result<Executed, StorageError> {
    let mut map = BatchMap {
        store,
        namespace,
        pending: BTreeMap::new(),
        installs: 0,
    };
    let mut replies = Vec::with_capacity(commands.len());
    let mut puts = 0;
    for command in commands {
        if matches!(command, KvCommand::Put { .. }) {
            puts += 1;
        }
        replies.push(execute(&mut map, command)?);
    }
    let BatchMap {
        pending, installs, ..
    } = map;
    let committed = !pending.is_empty();
    if committed {
        let mut batch = WriteBatch::with_capacity(pending.len());
        for (key, versioned) in pending {
            batch.kv_put(
                namespace,
                Bytes::from(key.into_bytes()),
                versioned.value,
                versioned.version,
            );
        }
        store.commit(batch)?;
    }
    Ok(Executed {
        replies,
        puts,
        gets: commands.len() as u64 - puts,
        installs,
        committed,
    })
}

/// The store as seen during one batch: the batch's own installs on top of the
/// durable map.
struct BatchMap<'a, S: ?Sized> {
    store: &'a S,
    namespace: StateMachineId,
    /// Keys installed by this batch, with their newest value.
    pending: BTreeMap<String, Versioned>,
    installs: u64,
}

impl<S: KvStorage + ?Sized> VersionedMap for BatchMap<'_, S> {
    type Error = StorageError;

    fn load(&self, key: &str) -> Result<Option<Versioned>, StorageError> {
        if let Some(pending) = self.pending.get(key) {
            return Ok(Some(pending.clone()));
        }
        let Some(stored) = self.store.kv_get(self.namespace, key.as_bytes())? else {
            return Ok(None);
        };
        // A stored key has version >= 1 (0 means missing): a 0 on disk is
        // bad input, not a reason to panic in the state machine.
        if stored.version == 0 {
            return Err(StorageError::Corruption {
                record: format!("kv namespace {} key {key:?}", self.namespace),
                detail: "stored with version 0".into(),
            });
        }
        Ok(Some(Versioned {
            value: stored.value,
            version: stored.version,
        }))
    }

    fn install(&mut self, key: &str, value: Versioned) -> Result<(), StorageError> {
        // Installs only ever move a key forward by exactly one version.
        let previous = self.load(key)?.map_or(0, |current| current.version);
        assert_eq!(value.version, previous + 1, "non-sequential install");
        self.pending.insert(key.to_owned(), value);
        self.installs += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

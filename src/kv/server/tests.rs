//! Unit tests of the server's batch execution, queue bound, storage failures
//! and shutdown, over a `MemStore` wrapped with faults and a commit gate.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::*;
use crate::kv::{KvError, KvReply};
use crate::net::sim::{SimConfig, SimNetwork};
use crate::storage::{MemDisk, MemStore, Storage, VersionedValue};

/// Holds every commit until the test lets it through.
struct Gate {
    entered: tokio::sync::mpsc::UnboundedSender<()>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// A `MemStore` with injectable faults.
#[derive(Clone)]
struct TestStore {
    inner: MemStore,
    fail_commits: Arc<AtomicBool>,
    fail_reads_of: Option<&'static str>,
    gate: Option<Arc<Gate>>,
}

impl TestStore {
    fn new() -> Self {
        Self {
            inner: MemStore::open(&MemDisk::new()).unwrap(),
            fail_commits: Arc::new(AtomicBool::new(false)),
            fail_reads_of: None,
            gate: None,
        }
    }
}

impl Storage for TestStore {
    fn commit(&self, batch: WriteBatch) -> Result<(), StorageError> {
        if let Some(gate) = &self.gate {
            let _ = gate.entered.send(());
            gate.release.lock().unwrap().recv().unwrap();
        }
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(StorageError::Io(std::io::Error::other("injected")));
        }
        self.inner.commit(batch)
    }
}

impl KvStorage for TestStore {
    fn kv_get(
        &self,
        ns: StateMachineId,
        key: &[u8],
    ) -> Result<Option<VersionedValue>, StorageError> {
        if self.fail_reads_of.is_some_and(|bad| bad.as_bytes() == key) {
            return Err(StorageError::Corruption {
                record: "test".into(),
                detail: "injected".into(),
            });
        }
        self.inner.kv_get(ns, key)
    }
    fn applied_index(&self, ns: StateMachineId) -> Result<u64, StorageError> {
        self.inner.applied_index(ns)
    }
    fn kv_scan(
        &self,
        ns: StateMachineId,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, VersionedValue)>, StorageError> {
        self.inner.kv_scan(ns, after, limit)
    }
    fn kv_key_count(&self, ns: StateMachineId) -> Result<u64, StorageError> {
        self.inner.kv_key_count(ns)
    }
    fn kv_namespaces(&self) -> Result<Vec<StateMachineId>, StorageError> {
        self.inner.kv_namespaces()
    }
}

fn put(key: &str, value: &'static str, version: u64) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: Bytes::from_static(value.as_bytes()),
        version,
    }
}

fn get(key: &str) -> KvCommand {
    KvCommand::Get { key: key.into() }
}

fn found(value: &'static str, version: u64) -> KvReply {
    KvReply::Get(Ok(Versioned {
        value: Bytes::from_static(value.as_bytes()),
        version,
    }))
}

// Commands of one batch see each other's effects in order, and the batch commits only final values.
#[test]
fn batch_executes_in_order_and_commits_once() {
    let store = TestStore::new();
    let commands = [
        put("k", "a", 0),
        put("k", "b", 1),
        get("k"),
        put("k", "x", 1),
        put("missing", "x", 5),
        get("missing"),
        put("j", "c", 0),
    ];
    let executed = execute_batch(&store, 3, &commands).unwrap();
    assert_eq!(
        executed.replies,
        vec![
            KvReply::Put(Ok(())),
            KvReply::Put(Ok(())),
            found("b", 2),
            KvReply::Put(Err(KvError::Version)),
            KvReply::Put(Err(KvError::NoKey)),
            KvReply::Get(Err(KvError::NoKey)),
            KvReply::Put(Ok(())),
        ]
    );
    assert_eq!((executed.puts, executed.gets, executed.installs), (5, 2, 3));
    assert!(executed.committed);
    let stored = store.inner.kv_get(3, b"k").unwrap().unwrap();
    assert_eq!((stored.value.as_ref(), stored.version), (&b"b"[..], 2));
    assert_eq!(store.inner.kv_key_count(3).unwrap(), 2);
    assert_eq!(
        store.inner.kv_key_count(0).unwrap(),
        0,
        "other namespace untouched"
    );
    // A batch of reads and failed puts writes nothing.
    let executed = execute_batch(&store, 3, &[get("k"), put("k", "z", 7)]).unwrap();
    assert!(!executed.committed);
    assert_eq!(executed.replies[0], found("b", 2));
}

// A failing read fails the whole batch and commits none of it, not even earlier commands.
#[test]
fn failed_read_commits_nothing() {
    let store = TestStore {
        fail_reads_of: Some("bad"),
        ..TestStore::new()
    };
    let result = execute_batch(&store, 0, &[put("k", "a", 0), get("bad")]);
    assert!(matches!(result, Err(StorageError::Corruption { .. })));
    assert_eq!(store.inner.kv_get(0, b"k").unwrap(), None);
}

// A key stored with version 0 is reported as corruption, not a panic of the state machine.
#[test]
fn version_zero_on_disk_is_corruption() {
    let store = TestStore::new();
    let mut batch = WriteBatch::new();
    batch.kv_put(0, "k", "v", 0);
    store.inner.commit(batch).unwrap();
    let result = execute_batch(&store, 0, &[get("k")]);
    assert!(
        matches!(&result, Err(StorageError::Corruption { record, .. }) if record.contains("\"k\"")),
        "{result:?}"
    );
}

// Bad configurations are rejected with the field named.
#[test]
fn config_is_validated() {
    for config in [
        KvServerConfig {
            queue_requests_max: 0,
            ..KvServerConfig::default()
        },
        KvServerConfig {
            batch_requests_max: 0,
            ..KvServerConfig::default()
        },
        KvServerConfig {
            batch_bytes_max: 0,
            ..KvServerConfig::default()
        },
    ] {
        assert!(matches!(
            config.validate(),
            Err(KvServerError::Config(message)) if message.contains("_max")
        ));
    }
    assert!(KvServerConfig::default().validate().is_ok());
}

/// A server on node 1 of a reliable simulated network over `store`, and a client endpoint.
fn serve(store: TestStore, config: KvServerConfig) -> (SimNetwork, KvServer, Endpoint) {
    let network = SimNetwork::new(SimConfig::new(1));
    let server = KvServer::start(&network.add_node(1).unwrap(), store, config).unwrap();
    let client = network.add_client();
    (network, server, client)
}

/// A store whose commits wait for the test, the sender that lets one through,
/// and the receiver that says a commit is waiting.
fn gated() -> (
    TestStore,
    std::sync::mpsc::Sender<()>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (entered, entered_rx) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let store = TestStore {
        gate: Some(Arc::new(Gate {
            entered,
            release: Mutex::new(release_rx),
        })),
        ..TestStore::new()
    };
    (store, release, entered_rx)
}

// With the committer busy, the queue holds exactly queue_requests_max requests; the next one is
// answered Busy at once and never executed; the queued ones are executed once the commit ends.
#[tokio::test]
async fn full_queue_answers_busy() {
    let (store, release, mut entered) = gated();
    let inner = store.inner.clone();
    let config = KvServerConfig {
        queue_requests_max: 2,
        batch_requests_max: 1,
        ..KvServerConfig::default()
    };
    let (_network, server, client) = serve(store, config);
    let first = client.call(1, &put("a", "1", 0));
    entered.recv().await.unwrap();
    // The committer holds the first request; two more fill the queue.
    let queued = [
        client.call(1, &put("b", "1", 0)),
        client.call(1, &put("c", "1", 0)),
    ];
    let rejected = client.call(1, &put("d", "1", 0)).await.unwrap();
    assert_eq!(rejected, Err(ServerUnavailable::Busy));
    assert_eq!(server.stats().rejected_busy, 1);
    for _ in 0..3 {
        release.send(()).unwrap();
    }
    assert_eq!(first.await.unwrap(), Ok(KvReply::Put(Ok(()))));
    for call in queued {
        assert_eq!(call.await.unwrap(), Ok(KvReply::Put(Ok(()))));
    }
    assert_eq!(inner.kv_get(0, b"d").unwrap(), None, "the rejected put ran");
    assert_eq!(inner.kv_key_count(0).unwrap(), 3);
    let stats = server.stats();
    assert_eq!((stats.puts, stats.commits, stats.batches), (3, 3, 3));
}

// A failed commit answers every request of its batch StorageFailed (none is acknowledged).
#[tokio::test]
async fn failed_commit_answers_storage_failed() {
    let store = TestStore::new();
    let fail = store.fail_commits.clone();
    let (_network, server, client) = serve(store, KvServerConfig::default());
    assert_eq!(
        client.call(1, &put("k", "a", 0)).await.unwrap(),
        Ok(KvReply::Put(Ok(())))
    );
    fail.store(true, Ordering::SeqCst);
    assert_eq!(
        client.call(1, &put("k", "b", 1)).await.unwrap(),
        Err(ServerUnavailable::StorageFailed)
    );
    // Reads that need no commit still work (this injected failure does not poison the store).
    assert_eq!(client.call(1, &get("k")).await.unwrap(), Ok(found("a", 1)));
    assert_eq!(server.stats().storage_failures, 1);
}

// Shutdown executes and commits what is queued, answers later requests ShuttingDown, and
// releases the store.
#[tokio::test]
async fn shutdown_drains_the_queue() {
    let (store, release, mut entered) = gated();
    let inner = store.inner.clone();
    let config = KvServerConfig {
        batch_requests_max: 1,
        ..KvServerConfig::default()
    };
    let (_network, server, client) = serve(store.clone(), config);
    // Both requests reach the queue before the committer takes the first one.
    let first = client.call(1, &put("a", "1", 0));
    let queued = client.call(1, &put("b", "1", 0));
    entered.recv().await.unwrap();
    // Polling shutdown once stops the server while the first commit is held.
    let mut stopping = Box::pin(server.shutdown());
    assert!(futures::poll!(&mut stopping).is_pending());
    release.send(()).unwrap();
    entered.recv().await.unwrap();
    release.send(()).unwrap();
    stopping.await;
    assert_eq!(first.await.unwrap(), Ok(KvReply::Put(Ok(()))));
    assert_eq!(queued.await.unwrap(), Ok(KvReply::Put(Ok(()))));
    assert_eq!(inner.kv_key_count(0).unwrap(), 2);
    assert_eq!(
        client.call(1, &put("c", "1", 0)).await.unwrap(),
        Err(ServerUnavailable::ShuttingDown)
    );
    // Only the test's own handle on the store is left.
    assert_eq!(Arc::strong_count(&store.fail_commits), 1);
}

//! Lab 2 scenario "many clients, memory": 100,000 clerks talk to the real
//! single-node server (sled store in a tempdir, simulated reliable network,
//! paused clock). Each clerk first sends Put("k", "", 1) and must get
//! ErrNoKey; then clerk i puts a 1000-byte value at version i and must get
//! OK. The server's memory may grow by at most 200 bytes per client.
//!
//! How memory is measured: this test binary installs a counting global
//! allocator, so `LIVE_BYTES` is the number of heap bytes currently allocated
//! by the whole process (like Go's HeapAlloc in the lab's test). The baseline
//! is taken after every clerk exists and has talked to the server once; the
//! second reading after the 100,000 puts. The difference is charged to the
//! server in full, although it also covers the simulated network and the
//! clerks, so it is an upper bound of the server's growth. sled's page cache
//! is capped at 1 MiB (`StoreConfig::cache_capacity_bytes`): a cache is a
//! bounded cost, not per-client state, and with sled's default cap the cache
//! alone could fill up to its cap with the 100 MB written here. Every Put is
//! still flushed before its reply (the default `FlushMode::EveryCommit`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use raftkv::NodeId;
use raftkv::kv::{Clerk, ClerkConfig, EndpointRpc, KvError, KvServer, KvServerConfig};
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::storage::{Store, StoreConfig};

/// Heap bytes currently allocated by the process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

struct CountingAllocator;

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the counter is only bookkeeping.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let pointer = unsafe { System.alloc_zeroed(layout) };
        if !pointer.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(pointer, layout) };
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let new_pointer = unsafe { System.realloc(pointer, layout, new_size) };
        if !new_pointer.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new_pointer
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A temporary directory for the store: on the tmpfs `/dev/shm` when there
/// is one, else in the system's temporary directory. The server flushes
/// every put either way; on a tmpfs the fsync under the flush costs almost
/// nothing, which keeps 100,000 sequential durable puts within the test time
/// budget. (Durability itself is tested by the restart and SIGKILL tests;
/// the store of this test stays around 2.5 MB on disk.)
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

const SERVER: NodeId = 1;
const CLIENTS: u64 = 100_000;
const VALUE_BYTES: usize = 1000;
const GROWTH_BYTES_PER_CLIENT_MAX: isize = 200;

// 100,000 clerks: each gets ErrNoKey for Put("k","",1), then clerk i's 1000-byte put at version i
// succeeds; the process heap (an upper bound of the server's memory) grows <= 200 bytes per client.
#[tokio::test(start_paused = true)]
async fn many_clients_memory() {
    let seed = std::env::var("KV_TEST_SEED").map_or(1, |seed| seed.parse().expect("u64 seed"));
    let dir = scratch_dir();
    let store_config = StoreConfig {
        cache_capacity_bytes: 1024 * 1024,
        ..StoreConfig::default()
    };
    let store = Store::open_with(dir.path(), &store_config).expect("open store");
    let network = SimNetwork::new(SimConfig::new(seed));
    let server = KvServer::start(
        &network.add_node(SERVER).expect("node"),
        store,
        KvServerConfig::default(),
    )
    .expect("start server");
    let clerks: Vec<Clerk<EndpointRpc>> = (0..CLIENTS)
        .map(|_| {
            let rpc = EndpointRpc::new(network.add_client(), Duration::from_secs(1));
            Clerk::new(rpc, vec![SERVER], ClerkConfig::default()).expect("clerk")
        })
        .collect();
    for (i, clerk) in clerks.iter().enumerate() {
        assert_eq!(
            clerk.put("k", Bytes::new(), 1).await,
            Err(KvError::NoKey),
            "seed {seed}: clerk {i}"
        );
    }
    let value = Bytes::from(vec![b'x'; VALUE_BYTES]);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for (i, clerk) in clerks.iter().enumerate() {
        assert_eq!(
            clerk.put("k", value.clone(), i as u64).await,
            Ok(()),
            "seed {seed}: clerk {i}"
        );
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let growth = after - before;
    let per_client = growth as f64 / CLIENTS as f64;
    eprintln!(
        "heap before {before} B, after {after} B: growth {growth} B = {per_client:.1} B per client"
    );
    assert!(
        growth <= GROWTH_BYTES_PER_CLIENT_MAX * CLIENTS as isize,
        "seed {seed}: heap grew by {growth} bytes ({per_client:.1} per client)"
    );
    // The meter is live: holding 200 bytes per client moves it by at least that much.
    let held: Vec<Vec<u8>> = (0..CLIENTS).map(|_| vec![0u8; 200]).collect();
    let with_held = LIVE_BYTES.load(Ordering::Relaxed);
    assert!(with_held - after >= GROWTH_BYTES_PER_CLIENT_MAX * CLIENTS as isize);
    drop(held);
    let stats = server.stats();
    assert_eq!(stats.installs, CLIENTS, "seed {seed}");
    assert_eq!(
        stats.commits, CLIENTS,
        "seed {seed}: one flush per sequential put"
    );
    let last = clerks[0].get("k").await.expect("k exists");
    assert_eq!((last.version, last.value), (CLIENTS, value), "seed {seed}");
    server.shutdown().await;
}

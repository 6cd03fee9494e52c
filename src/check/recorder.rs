//! Thread-safe recording of a history while clients run.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::kv::{KvCommand, KvReply};

use super::history::{ClientId, Completion, Operation};

/// Records operations of concurrent clients into one history.
///
/// Times come from tokio's clock (so a paused test clock works), made
/// strictly increasing across all records: if A's return is recorded before
/// B's call, A's return time is smaller, even when the clock did not move.
/// This keeps real-time order exact on a paused clock. Memory grows by one
/// [`Operation`] per recorded call; it is meant for tests and benchmarks.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    last_ns: u64,
    operations: Vec<Operation>,
}

/// An operation that has been called and not yet finished. Dropping it
/// without [`PendingCall::finish`] leaves the operation as never returned.
#[derive(Debug)]
#[must_use = "call finish() with the output, or the operation counts as never returned"]
pub struct PendingCall {
    recorder: Recorder,
    index: usize,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder whose clock starts now.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                start: Instant::now(),
                last_ns: 0,
                operations: Vec::new(),
            })),
        }
    }

    /// Records that `client` calls `input` now.
    pub fn begin(&self, client: ClientId, input: KvCommand) -> PendingCall {
        let mut inner = self.lock();
        let call_ns = inner.stamp();
        inner.operations.push(Operation {
            client,
            call_ns,
            input,
            completion: None,
        });
        PendingCall {
            recorder: self.clone(),
            index: inner.operations.len() - 1,
        }
    }

    /// A copy of the history so far; unfinished calls appear as never returned.
    pub fn history(&self) -> Vec<Operation> {
        self.lock().operations.clone()
    }

    /// How many operations have been called.
    pub fn len(&self) -> usize {
        self.lock().operations.len()
    }

    /// Whether no operation has been called.
    pub fn is_empty(&self) -> bool {
        self.lock().operations.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated
        // (every update is a single push or assignment), so poison is harmless.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// The current time in ns since `start`, strictly after every earlier stamp.
    fn stamp(&mut self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last_ns = elapsed.max(self.last_ns + 1);
        self.last_ns
    }
}

impl PendingCall {
    /// Records that the operation returned `output` now.
    pub fn finish(self, output: KvReply) {
        let mut inner = self.recorder.lock();
        let return_ns = inner.stamp();
        let operation = &mut inner.operations[self.index];
        assert!(operation.completion.is_none(), "operation finished twice");
        operation.completion = Some(Completion { return_ns, output });
    }
}

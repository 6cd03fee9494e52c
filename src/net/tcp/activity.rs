//! Frame activity shared by the transport and its pollers
//! ([`BusyPoll`](super::BusyPoll), [`IdlePoll`](super::IdlePoll)): a
//! counter the transport bumps on every frame, and a wake-up for a poller
//! that sleeps until the next one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Frames seen (any number; only changes matter).
    frames: AtomicU64,
    /// Set while a poller waits for a frame: the next one notifies it.
    pub(super) parked: AtomicBool,
    pub(super) wake: Notify,
}

impl Activity {
    /// A frame arrived: count it, and wake the poller if it sleeps.
    pub(super) fn touch(&self) {
        self.frames.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The frame count (compare two readings to see whether frames came).
    pub(super) fn frames(&self) -> u64 {
        self.frames.load(Ordering::SeqCst)
    }
}

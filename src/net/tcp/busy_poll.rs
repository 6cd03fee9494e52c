//! Busy polling: keep a runtime thread awake for a short window after
//! network activity instead of letting it sleep between frames.
//!
//! A thread that sleeps in `epoll_wait` is woken by the kernel when a frame
//! arrives; when its CPU was idle that wake-up costs an inter-processor
//! interrupt and, in a virtual machine, the host scheduling the halted vCPU
//! again — tens of µs per hop on small VMs, several times per request. A
//! [`BusyPoll`] task spawned on the transport's runtime yields in a loop
//! while frames came in within its window, so the runtime polls its sockets
//! without sleeping (`epoll_wait` with a zero timeout) and finds the next
//! frame as soon as it lands. After `window` without a frame the task parks
//! and the thread sleeps as usual; the next frame wakes it and polling
//! starts again.
//!
//! The price is one CPU kept busy while traffic flows (none when idle), so
//! it is off by default ([`TcpConfig::busy_poll`](super::TcpConfig::busy_poll))
//! and can be switched off and on at run time ([`BusyPoll::set_enabled`]):
//! `raftkv server --busy-poll` polls only while its node leads, the one
//! node on every request's path. It is meant for a current-thread runtime
//! (`raftkv server`'s default); on a work-stealing runtime it keeps one
//! worker busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::activity::Activity;

/// The handle of a transport's busy poller. Cheap to clone; every clone
/// controls the same poller.
#[derive(Clone, Debug)]
pub struct BusyPoll {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    window: Duration,
    enabled: AtomicBool,
    activity: Activity,
    /// Turns of the loop spent polling, for tests and monitoring.
    spins: AtomicU64,
    /// Times the poller went to sleep.
    parks: AtomicU64,
}

/// Counters of a [`BusyPoll`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusyPollStats {
    /// Turns of the polling loop (each one yield to the runtime).
    pub spins: u64,
    /// Times the poller stopped polling and slept until the next frame.
    pub parks: u64,
}

/// What the poller does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Yield to the runtime and look again.
    Spin,
    /// Sleep until a frame arrives or polling is enabled.
    Park,
}

/// The poller's decision: poll while enabled and the last frame is less
/// than `window` old.
fn decide(enabled: bool, since_activity: Duration, window: Duration) -> Step {
    if enabled && since_activity < window {
        Step::Spin
    } else {
        Step::Park
    }
}

impl BusyPoll {
    /// A poller with the given window, enabled, not yet running.
    pub(super) fn new(window: Duration) -> BusyPoll {
        BusyPoll {
            shared: Arc::new(Shared {
                window,
                enabled: AtomicBool::new(true),
                activity: Activity::default(),
                spins: AtomicU64::new(0),
                parks: AtomicU64::new(0),
            }),
        }
    }

    /// How long the poller keeps polling after the last frame.
    pub fn window(&self) -> Duration {
        self.shared.window
    }

    /// Switches polling on or off. Off, the poller sleeps and frames do not
    /// make it poll (a frame may still wake it for one look); on, it polls
    /// for a window from now and after every frame.
    pub fn set_enabled(&self, enabled: bool) {
        let was = self.shared.enabled.swap(enabled, Ordering::SeqCst);
        if enabled && !was {
            self.shared.activity.wake.notify_one();
        }
    }

    /// Whether polling is switched on.
    pub fn is_enabled(&self) -> bool {
        self.shared.enabled.load(Ordering::SeqCst)
    }

    /// The poller's counters.
    pub fn stats(&self) -> BusyPollStats {
        BusyPollStats {
            spins: self.shared.spins.load(Ordering::Relaxed),
            parks: self.shared.parks.load(Ordering::Relaxed),
        }
    }

    /// A frame arrived: poll for another window (waking the poller if it
    /// sleeps while enabled).
    pub(super) fn touch(&self) {
        self.shared.activity.touch();
    }

    /// The polling loop; ends when `shutdown` is cancelled.
    pub(super) async fn run(self, shutdown: CancellationToken) {
        let shared = &*self.shared;
        let mut seen = shared.activity.frames();
        let mut last = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now = Instant::now();
            let activity = shared.activity.frames();
            if activity != seen {
                seen = activity;
                last = now;
            }
            let enabled = shared.enabled.load(Ordering::SeqCst);
            if decide(enabled, now.saturating_duration_since(last), shared.window) == Step::Spin {
                shared.spins.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
                continue;
            }
            // Sleep. Enabled, the next frame wakes the poller (`parked` tells
            // `touch` to notify); disabled, only `set_enabled(true)` does.
            let notified = shared.activity.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if enabled {
                shared.activity.parked.store(true, Ordering::SeqCst);
                // A frame between the check above and `parked`: poll on.
                if shared.activity.frames() != seen {
                    shared.activity.parked.store(false, Ordering::SeqCst);
                    continue;
                }
            } else if shared.enabled.load(Ordering::SeqCst) {
                continue;
            }
            shared.parks.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return,
                () = notified => {}
            }
            shared.activity.parked.store(false, Ordering::SeqCst);
            // Woken by a frame or by enabling: poll a window from now.
            seen = shared.activity.frames();
            last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_while_enabled_and_within_the_window() {
        let window = Duration::from_micros(500);
        assert_eq!(decide(true, Duration::ZERO, window), Step::Spin);
        assert_eq!(decide(true, Duration::from_micros(499), window), Step::Spin);
        assert_eq!(decide(true, window, window), Step::Park);
        assert_eq!(decide(false, Duration::ZERO, window), Step::Park);
    }

    /// Yields to the runtime until `done` holds, at most `turns` times.
    async fn until(turns: usize, mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..turns {
            if done() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        done()
    }

    // Enabled it polls; disabled it parks and frames do not make it poll;
    // enabling makes it poll again; shutdown ends it.
    #[tokio::test(flavor = "current_thread")]
    async fn polls_while_enabled_and_parks_when_disabled() {
        // A window long enough that the test's own turns fall inside it.
        let poll = BusyPoll::new(Duration::from_secs(30));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poll.clone().run(shutdown.clone()));
        assert!(
            until(100, || poll.stats().spins >= 10).await,
            "{:?}",
            poll.stats()
        );

        poll.set_enabled(false);
        assert!(
            until(100, || poll.stats().parks == 1).await,
            "{:?}",
            poll.stats()
        );
        let spins = poll.stats().spins;
        for _ in 0..20 {
            poll.touch();
            tokio::task::yield_now().await;
        }
        assert_eq!(poll.stats().spins, spins, "disabled, frames do not wake it");

        poll.set_enabled(true);
        assert!(until(100, || poll.stats().spins >= spins + 10).await);

        shutdown.cancel();
        task.await.expect("the poller ends at shutdown");
    }

    // A frame starts a window of polling; once the window has passed
    // without another frame, the poller parks.
    #[tokio::test(flavor = "current_thread")]
    async fn parks_once_the_window_has_passed() {
        let poll = BusyPoll::new(Duration::from_millis(2));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poll.clone().run(shutdown.clone()));
        let parked = |at_least: u64| {
            let poll = poll.clone();
            async move {
                let started = Instant::now();
                while poll.stats().parks < at_least {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "no park: {:?}",
                        poll.stats()
                    );
                    tokio::task::yield_now().await;
                }
            }
        };
        parked(1).await;
        let before = poll.stats();
        poll.touch();
        parked(before.parks + 1).await;
        let after = poll.stats();
        assert!(
            after.spins > before.spins,
            "it polled in between: {after:?}"
        );
        shutdown.cancel();
        task.await.expect("the poller ends at shutdown");
    }

    // With a window of zero it never polls: it parks at once, and every
    // frame wakes it for one look only.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_wakes_a_parked_poller() {
        let poll = BusyPoll::new(Duration::ZERO);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poll.clone().run(shutdown.clone()));
        assert!(until(100, || poll.stats().parks == 1).await);
        poll.touch();
        assert!(
            until(100, || poll.stats().parks == 2).await,
            "{:?}",
            poll.stats()
        );
        assert_eq!(poll.stats().spins, 0);
        shutdown.cancel();
        task.await.expect("the poller ends at shutdown");
    }
}

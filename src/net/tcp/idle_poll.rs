//! Idle polling: while frames flow, ask the kernel to keep idle CPUs
//! polling instead of halting (Linux PM QoS, `/dev/cpu_dma_latency`).
//!
//! Every hop of a request wakes a thread that sleeps in `epoll_wait` or on
//! a futex. When that thread's CPU is idle, the CPU has halted: waking it
//! takes an inter-processor interrupt and, in a virtual machine, the host
//! scheduling the halted vCPU again — tens of µs per hop on small VMs,
//! several hops per request. A CPU whose idle loop polls instead notices
//! the wake-up at once, without an interrupt.
//!
//! The kernel's CPU latency QoS interface does exactly that on request: a
//! process that writes a latency of 0 µs to `/dev/cpu_dma_latency` keeps
//! every CPU in its shallowest idle state (polling) until it writes a
//! larger value or closes the file. Unlike [`BusyPoll`](super::BusyPoll),
//! which spins the transport's own thread, it takes no CPU time from the
//! machine's tasks: a polling idle CPU runs any task that becomes runnable.
//! Its price is power — and, in a VM, host CPU: every vCPU looks busy to
//! the host while the request is held. So [`IdlePoll`] takes it at the
//! first frame and releases it once a whole window
//! ([`TcpConfig::idle_poll`](super::TcpConfig::idle_poll)) has passed
//! without one — between one and two windows after the last frame (the
//! poller looks once per window while it holds the request); a node whose
//! only traffic is heartbeats holds it a few ms in every 100. The frame
//! that ends an idle period still finds the CPUs halted: the request helps
//! the hops that follow it.
//!
//! The request is machine-wide and needs write access to the device
//! (root, or a udev rule granting it); [`TcpTransport::start`](super::TcpTransport::start)
//! opens the device and fails with a clear error when it cannot. It only
//! changes anything where a cpuidle driver honours it (`haltpoll` on KVM
//! guests, `intel_idle`, `acpi_idle`); without one
//! (`/sys/devices/system/cpu/cpuidle/current_driver` reads `none`) idle
//! CPUs halt regardless, and the start logs a warning.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::activity::Activity;
use crate::net::NetError;

/// Where Linux takes CPU latency requests.
pub const CPU_LATENCY_DEVICE: &str = "/dev/cpu_dma_latency";

/// Names the cpuidle driver, which decides whether latency requests change
/// anything.
const CPUIDLE_DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";

/// The latency written while held: idle CPUs must wake within 0 µs, so
/// they poll.
const HELD_US: i32 = 0;

/// The latency written on release: larger than any idle state's exit
/// latency, so this request no longer constrains the idle states.
const RELEASED_US: i32 = i32::MAX;

/// The handle of a transport's idle poller. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IdlePoll {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    window: Duration,
    activity: Activity,
    /// Whether the latency request is held now.
    held: AtomicBool,
    /// Times the request was taken.
    holds: AtomicU64,
    /// Times a write to the device failed (after one, the poller stops).
    failures: AtomicU64,
}

/// Counters of an [`IdlePoll`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdlePollStats {
    /// Whether idle CPUs are asked to poll right now.
    pub held: bool,
    /// Times the request was taken (each one a window or more of frames).
    pub holds: u64,
    /// Writes to the device that failed; after the first the poller stops
    /// (and the request is dropped with the file).
    pub failures: u64,
}

/// The open latency request: a file whose last written value is this
/// process's request, dropped when the file closes.
#[derive(Debug)]
pub(super) struct CpuLatencyRequest {
    file: File,
    path: PathBuf,
}

impl CpuLatencyRequest {
    /// Opens the device (write-only). Opening does not constrain anything
    /// yet: the kernel starts the request at its default.
    pub(super) fn open(path: &Path) -> Result<CpuLatencyRequest, NetError> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| NetError::Io {
                context: format!(
                    "idle_poll needs write access to {} (the CPU latency QoS device; root or a udev rule)",
                    path.display()
                ),
                source: Arc::new(source),
            })?;
        match std::fs::read_to_string(CPUIDLE_DRIVER) {
            Ok(driver) if driver.trim() == "none" => tracing::warn!(
                "idle polling has no effect here: no cpuidle driver ({CPUIDLE_DRIVER} reads none)"
            ),
            Ok(driver) => tracing::debug!(driver = driver.trim(), "idle polling on"),
            Err(_) => {}
        }
        Ok(CpuLatencyRequest {
            file,
            path: path.to_owned(),
        })
    }

    /// Writes one request: the kernel reads a native-endian `i32` of µs.
    fn set(&mut self, latency_us: i32) -> std::io::Result<()> {
        self.file.write_all(&latency_us.to_ne_bytes())
    }
}

impl IdlePoll {
    /// A poller holding the request for `window` after each frame.
    pub(super) fn new(window: Duration) -> IdlePoll {
        IdlePoll {
            shared: Arc::new(Shared {
                window,
                activity: Activity::default(),
                held: AtomicBool::new(false),
                holds: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// How long the request is held after the last frame.
    pub fn window(&self) -> Duration {
        self.shared.window
    }

    /// The poller's counters.
    pub fn stats(&self) -> IdlePollStats {
        IdlePollStats {
            held: self.shared.held.load(Ordering::SeqCst),
            holds: self.shared.holds.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
        }
    }

    /// A frame arrived: hold the request for another window.
    pub(super) fn touch(&self) {
        self.shared.activity.touch();
    }

    /// Writes `latency_us`; false (logged and counted) when the write fails.
    fn write(&self, request: &mut CpuLatencyRequest, latency_us: i32) -> bool {
        match request.set(latency_us) {
            Ok(()) => true,
            Err(error) => {
                self.shared.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %request.path.display(), %error,
                    "cannot write a CPU latency request; idle polling stops");
                false
            }
        }
    }

    /// The poller's loop: holds the request while the last frame is less
    /// than a window old, releases it otherwise; ends (releasing it, and
    /// closing the device) when `shutdown` is cancelled or a write fails.
    pub(super) async fn run(self, mut request: CpuLatencyRequest, shutdown: CancellationToken) {
        let shared = &*self.shared;
        let mut seen = shared.activity.frames();
        // No frame yet: start released.
        let mut last: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now = Instant::now();
            let activity = shared.activity.frames();
            if activity != seen {
                seen = activity;
                last = Some(now);
            }
            let since = last.map(|at| now.saturating_duration_since(at));
            if let Some(since) = since.filter(|since| *since < shared.window) {
                if !shared.held.load(Ordering::SeqCst) {
                    if !self.write(&mut request, HELD_US) {
                        break;
                    }
                    shared.held.store(true, Ordering::SeqCst);
                    shared.holds.fetch_add(1, Ordering::Relaxed);
                }
                // Look again when the window would end without a frame.
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(shared.window - since) => {}
                }
                continue;
            }
            if shared.held.load(Ordering::SeqCst) {
                let released = self.write(&mut request, RELEASED_US);
                // Failed or not, the request ends: the file closes below.
                shared.held.store(false, Ordering::SeqCst);
                if !released {
                    break;
                }
            }
            // Sleep until the next frame (`parked` tells `touch` to notify).
            let notified = shared.activity.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            shared.activity.parked.store(true, Ordering::SeqCst);
            if shared.activity.frames() != seen {
                shared.activity.parked.store(false, Ordering::SeqCst);
                continue;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = notified => {}
            }
            shared.activity.parked.store(false, Ordering::SeqCst);
        }
        if shared.held.load(Ordering::SeqCst) {
            // Closing the file below drops the request anyway; writing the
            // release first keeps the device's last value truthful.
            let _released = self.write(&mut request, RELEASED_US);
            shared.held.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requests written to a stand-in device file, in order.
    fn written(path: &Path) -> Vec<i32> {
        std::fs::read(path)
            .expect("read the stand-in device")
            .chunks(4)
            .map(|bytes| i32::from_ne_bytes(bytes.try_into().expect("whole requests")))
            .collect()
    }

    async fn until(mut done: impl FnMut() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "condition not reached"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // No frame: nothing is held. A frame takes the request (0 µs); a window
    // without frames releases it; the next frame takes it again; shutdown
    // ends the poller with the request released.
    #[tokio::test(flavor = "current_thread")]
    async fn holds_the_request_for_a_window_after_each_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("cpu_dma_latency");
        std::fs::write(&device, b"").expect("create the stand-in device");
        let request = CpuLatencyRequest::open(&device).expect("open");
        let poll = IdlePoll::new(Duration::from_millis(20));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poll.clone().run(request, shutdown.clone()));
        until(|| poll.shared.activity.parked.load(Ordering::SeqCst)).await;
        assert_eq!(poll.stats(), IdlePollStats::default(), "no frame, no hold");
        assert!(written(&device).is_empty());

        poll.touch();
        until(|| poll.stats().held).await;
        assert_eq!(written(&device), vec![HELD_US]);
        // Frames within the window keep the one request.
        for _ in 0..5 {
            poll.touch();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        until(|| !poll.stats().held).await;
        assert_eq!(written(&device), vec![HELD_US, RELEASED_US]);
        assert_eq!(poll.stats().holds, 1);

        poll.touch();
        until(|| poll.stats().holds == 2).await;
        assert!(poll.stats().held);
        shutdown.cancel();
        task.await.expect("the poller ends at shutdown");
        assert_eq!(
            written(&device),
            vec![HELD_US, RELEASED_US, HELD_US, RELEASED_US]
        );
        assert!(!poll.stats().held);
        assert_eq!(poll.stats().failures, 0);
    }

    // A device that refuses writes (/dev/full: every write fails) stops the
    // poller after one failure, with nothing held; frames go on.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_write_stops_the_poller() {
        let request = CpuLatencyRequest::open(Path::new("/dev/full")).expect("open /dev/full");
        let poll = IdlePoll::new(Duration::from_millis(20));
        let task = tokio::spawn(poll.clone().run(request, CancellationToken::new()));
        // Frames count from the poller's start: touch once it waits for one.
        until(|| poll.shared.activity.parked.load(Ordering::SeqCst)).await;
        poll.touch();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the poller stops on a failed write")
            .expect("without panicking");
        assert_eq!(
            poll.stats(),
            IdlePollStats {
                held: false,
                holds: 0,
                failures: 1
            }
        );
        poll.touch();
    }

    #[test]
    fn a_device_it_cannot_open_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-such-device");
        let error = CpuLatencyRequest::open(&missing).expect_err("missing device");
        let text = error.to_string();
        assert!(text.contains("idle_poll needs write access"), "{text}");
        assert!(text.contains("no-such-device"), "{text}");
    }
}

//! Linearizability checking of recorded versioned key/value histories.
//!
//! A history is a list of [`Operation`]s: which client called what when, and
//! what it got back (if it returned). [`check_history`] splits it by key and
//! searches, for each key, for an order of the operations that respects
//! real time (an operation that returned before another was called comes
//! first) and the sequential model below; it uses the Wing–Gong–Lowe search
//! with memoisation of (linearized set, model state), as porcupine does.
//! [`Recorder`] records histories from concurrent clients.
//!
//! # The model of one key
//! State (value, version), starting at ("", 0); version 0 means "missing".
//! - Get → (value, version): legal iff both equal the state (version ≥ 1).
//! - Get → ErrNoKey: legal iff the key is missing.
//! - Put(v, n) → OK: legal iff n equals the state's version; state becomes (v, n + 1).
//! - Put(v, n) → ErrVersion: legal iff the key exists and n differs; no change.
//! - Put(v, n) → ErrNoKey: legal iff the key is missing and n > 0; no change.
//! - Put(v, n) → ErrMaybe: always legal; takes effect iff n equals the version.
//! - An operation that never returned may or may not have happened: a Put is
//!   searched with an infinite return time (so it can take effect at any
//!   point after its call, or never), a Get is left out. A Put that ended in
//!   the Clerk's Timeout (or ErrWrongLeader / LeadershipLost, should a
//!   recorder see them) is treated as never returned, since a delayed copy of
//!   it may still be applied.
//! - Outputs that say the operation had no effect and promise nothing
//!   (TooLarge; Timeout, ErrWrongLeader or LeadershipLost for a Get) are left
//!   out.
//!
//! This is stricter than the lab's porcupine model, which compares only the
//! value of a Get and does not check ErrNoKey; ours matches the exact Lab 2
//! semantics of `kv::state_machine`.
//!
//! This module must not depend on any transport or server; it only needs
//! the wire types of `kv`.

mod history;
mod model;
mod recorder;
mod report;
mod search;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use history::{ClientId, Completion, HISTORY_OPERATIONS_MAX, HistoryError, Operation};
pub use model::ModelState;
pub use recorder::{PendingCall, Recorder};
pub use report::{BlockedOperation, CheckOutcome, IllegalReport, ReportedOperation, UnknownReason};

/// Limits of one [`check_history`] run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckConfig {
    /// Wall-clock time the whole check may take before it answers
    /// [`CheckOutcome::Unknown`].
    pub time_budget: Duration,
    /// Approximate memory the memoisation cache of one key may use before
    /// the check answers [`CheckOutcome::Unknown`].
    pub cache_bytes_max: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            time_budget: Duration::from_secs(10),
            cache_bytes_max: 512 * 1024 * 1024,
        }
    }
}

/// Checks that `history` is linearizable with respect to the versioned
/// key/value model, key by key (in key order). Returns the first violation
/// found, or `Unknown` if a budget ran out first; a malformed history is an
/// error.
pub fn check_history(
    history: &[Operation],
    config: &CheckConfig,
) -> Result<CheckOutcome, HistoryError> {
    history::validate(history)?;
    let started = Instant::now();
    let budget = search::Budget {
        // A budget too large to represent means no deadline.
        deadline: started.checked_add(config.time_budget),
        cache_bytes_max: config.cache_bytes_max,
    };
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        by_key.entry(operation.input.key()).or_default().push(index);
    }
    for (key, indices) in &by_key {
        match search::check_key(key, history, indices, &budget) {
            search::KeyOutcome::Ok => {}
            search::KeyOutcome::Illegal(report) => {
                tracing::debug!(key, elapsed = ?started.elapsed(), "check: not linearizable");
                return Ok(CheckOutcome::Illegal(report));
            }
            search::KeyOutcome::Unknown(reason) => {
                return Ok(CheckOutcome::Unknown {
                    key: (*key).to_owned(),
                    reason,
                });
            }
        }
    }
    tracing::debug!(operations = history.len(), elapsed = ?started.elapsed(), "check: linearizable");
    Ok(CheckOutcome::Ok)
}

#[cfg(test)]
mod tests;

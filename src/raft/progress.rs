//! A leader's view of one follower's log: how far it matches, what to send
//! next, and how much may be in flight.

use std::collections::VecDeque;

use super::types::Snapshot;

/// How the leader replicates to a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProgressState {
    /// The leader does not know where the follower's log matches: one append
    /// at a time until one succeeds.
    Probe,
    /// The follower's log matches: appends are pipelined optimistically.
    Replicate,
    /// The follower needs entries the leader has compacted: send this
    /// snapshot chunk by chunk (one chunk in flight).
    Snapshot {
        /// The snapshot being sent (kept even if the leader snapshots again).
        snapshot: Snapshot,
        /// Next byte offset to send.
        offset: u64,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// Highest index known to match the leader's log.
    pub(crate) match_index: u64,
    /// Next index to send.
    pub(crate) next_index: u64,
    pub(crate) state: ProgressState,
    /// In probe or snapshot state: a message is out, wait for an answer or a heartbeat response.
    pub(crate) paused: bool,
    /// In replicate state: last index of every append in flight.
    inflight: VecDeque<u64>,
    /// Heard from the follower since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Highest read-index round the follower acknowledged.
    pub(crate) read_round: u64,
    /// Highest commit index the follower has been told (and can adopt).
    pub(crate) commit_sent: u64,
    /// Ticks since the leader last sent this follower anything.
    pub(crate) idle_ticks: u64,
}

impl Progress {
    pub(crate) fn new(next_index: u64) -> Self {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            paused: false,
            inflight: VecDeque::new(),
            recent_active: false,
            read_round: 0,
            commit_sent: 0,
            idle_ticks: 0,
        }
    }

    /// The follower holds entries up to a commit index (`committed`, the
    /// leader's) it has not been told yet.
    pub(crate) fn lacks_commit(&self, committed: u64) -> bool {
        self.commit_sent < self.match_index.min(committed)
    }

    pub(crate) fn is_paused(&self, inflight_max: usize) -> bool {
        match self.state {
            ProgressState::Probe | ProgressState::Snapshot { .. } => self.paused,
            ProgressState::Replicate => self.inflight.len() >= inflight_max,
        }
    }

    pub(crate) fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.next_index = self.match_index + 1;
        self.paused = false;
        self.inflight.clear();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index + 1;
        self.paused = false;
        self.inflight.clear();
    }

    pub(crate) fn become_snapshot(&mut self, snapshot: Snapshot) {
        self.state = ProgressState::Snapshot {
            snapshot,
            offset: 0,
        };
        self.paused = false;
        self.inflight.clear();
    }

    /// An append up to `last_index` was sent.
    pub(crate) fn sent_entries(&mut self, last_index: u64) {
        match self.state {
            ProgressState::Replicate => {
                self.next_index = last_index + 1;
                self.inflight.push_back(last_index);
            }
            ProgressState::Probe => self.paused = true,
            ProgressState::Snapshot { .. } => unreachable!("append sent in snapshot state"),
        }
    }

    /// The follower matches up to `index`; returns whether that is news.
    pub(crate) fn update_match(&mut self, index: u64) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.paused = false;
        }
        self.next_index = self.next_index.max(index + 1);
        while self.inflight.front().is_some_and(|&last| last <= index) {
            self.inflight.pop_front();
        }
        updated
    }

    /// The follower rejected an append at `rejected_index`; `hint` is where
    /// the leader should retry. Returns false for a stale rejection.
    pub(crate) fn back_off(&mut self, rejected_index: u64, hint: u64) -> bool {
        match self.state {
            ProgressState::Replicate => {
                if rejected_index <= self.match_index {
                    return false;
                }
                self.become_probe();
                self.next_index = hint.min(rejected_index).max(self.match_index + 1);
                true
            }
            ProgressState::Probe => {
                if rejected_index + 1 != self.next_index {
                    return false;
                }
                self.next_index = hint.min(rejected_index).max(self.match_index + 1);
                self.paused = false;
                true
            }
            ProgressState::Snapshot { .. } => false,
        }
    }

    /// A heartbeat response arrived: let a stalled probe or pipeline move.
    pub(crate) fn on_heartbeat_response(&mut self, inflight_max: usize) {
        self.paused = false;
        if self.state == ProgressState::Replicate && self.inflight.len() >= inflight_max {
            self.inflight.pop_front();
        }
    }
}

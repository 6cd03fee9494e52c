//! The in-memory Raft log: the latest snapshot plus every entry after it,
//! the commit and apply indexes, and what has not yet been handed to the
//! driver for persistence.
//!
//! The whole suffix after the last snapshot lives in memory; its size is
//! bounded by how often the service snapshots (the service is expected to
//! snapshot every few thousand entries or megabytes).

use std::collections::VecDeque;

use bytes::Bytes;

use super::types::{Entry, Snapshot, SnapshotMeta};

/// Most entries a returned `Vec` reserves room for up front; longer runs
/// (bounded by bytes, not count) grow as usual.
const ENTRIES_RESERVE_MAX: usize = 1024;

/// Result of offering a leader's entries to a follower's log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AppendCheck {
    /// The log matched at `prev_log_index`; it now matches up to `match_index`.
    Matched { match_index: u64 },
    /// No entry matches at `prev_log_index`; hints for fast backup.
    Conflict {
        conflict_index: u64,
        conflict_term: Option<u64>,
    },
    /// The leader's entries contradict a committed entry: a protocol violation.
    CommittedConflict { index: u64 },
}

#[derive(Debug)]
pub(crate) struct RaftLog {
    /// Latest snapshot; `meta.last_included_index` is the log's offset.
    snapshot: Snapshot,
    /// Entries `offset + 1 ..= last_index`.
    entries: VecDeque<Entry>,
    /// Highest index known committed.
    committed: u64,
    /// Highest index handed to the service (in a `Ready`).
    applied: u64,
    /// First index not yet handed to the driver for persistence.
    unstable_from: u64,
    /// The driver must delete stored entries at or above this index.
    truncate_from: Option<u64>,
    /// The snapshot has changed since the last `Ready`.
    snapshot_unpersisted: bool,
    /// The service must load the snapshot (received from a leader or found on restart).
    snapshot_unapplied: bool,
    /// Last index known durable in the driver's storage and consistent with this log.
    persisted_last: u64,
    /// How many times entries were removed from the end of the log (a
    /// conflicting suffix, or the whole log for a snapshot): persistence
    /// confirmations for Readies taken before a removal are not trusted.
    rewrites: u64,
}

impl RaftLog {
    /// A log restored from persisted state (validated by the caller).
    pub(crate) fn restore(snapshot: Option<Snapshot>, entries: Vec<Entry>) -> Self {
        let snapshot = snapshot.unwrap_or_default();
        let offset = snapshot.meta.last_included_index;
        let last = offset + entries.len() as u64;
        RaftLog {
            snapshot_unapplied: offset > 0,
            snapshot,
            entries: entries.into(),
            committed: offset,
            applied: offset,
            unstable_from: last + 1,
            truncate_from: None,
            snapshot_unpersisted: false,
            persisted_last: last,
            rewrites: 0,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.snapshot.meta.last_included_index
    }

    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.offset() + self.entries.len() as u64
    }

    pub(crate) fn last_term(&self) -> u64 {
        self.entries
            .back()
            .map_or(self.snapshot.meta.last_included_term, |e| e.term)
    }

    pub(crate) fn committed(&self) -> u64 {
        self.committed
    }

    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    pub(crate) fn persisted_last(&self) -> u64 {
        self.persisted_last
    }

    pub(crate) fn rewrites(&self) -> u64 {
        self.rewrites
    }

    /// Term of the entry at `index`, if the log still knows it (the snapshot's
    /// last entry counts; compacted and future indexes do not).
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        let offset = self.offset();
        if index == offset {
            return Some(self.snapshot.meta.last_included_term);
        }
        self.entry(index).map(|e| e.term)
    }

    pub(crate) fn entry(&self, index: u64) -> Option<&Entry> {
        let offset = self.offset();
        if index <= offset {
            return None;
        }
        self.entries.get((index - offset - 1) as usize)
    }

    /// Entries from `low` on, at most `count_max` of them and at most
    /// `bytes_max` bytes of data, but at least one if any exists.
    pub(crate) fn entries_from(&self, low: u64, count_max: usize, bytes_max: u64) -> Vec<Entry> {
        assert!(
            low > self.offset(),
            "entries_from({low}) below the snapshot"
        );
        let start = (low - self.offset() - 1) as usize;
        let available = self.entries.len().saturating_sub(start);
        let mut out = Vec::with_capacity(available.min(count_max).clamp(1, ENTRIES_RESERVE_MAX));
        let mut bytes = 0u64;
        for entry in self.entries.range(start.min(self.entries.len())..) {
            let size = entry.data.len() as u64;
            if !out.is_empty() && (out.len() >= count_max || bytes + size > bytes_max) {
                break;
            }
            bytes += size;
            out.push(entry.clone());
        }
        out
    }

    /// §5.4.1: is a log ending at (`last_index`, `last_term`) at least as
    /// up-to-date as this one?
    pub(crate) fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// Last index holding an entry of `term` or an earlier term (for fast backup).
    pub(crate) fn last_index_with_term_at_most(&self, term: u64) -> Option<u64> {
        let count = self.entries.partition_point(|e| e.term <= term);
        if count > 0 {
            return Some(self.offset() + count as u64);
        }
        (self.snapshot.meta.last_included_term <= term).then_some(self.offset())
    }

    /// A leader appends its own new entry.
    pub(crate) fn append_new(&mut self, entry: Entry) {
        assert_eq!(
            entry.index,
            self.last_index() + 1,
            "leader append not contiguous"
        );
        assert!(
            entry.term >= self.last_term(),
            "leader append with lower term"
        );
        self.entries.push_back(entry);
    }

    /// A follower offers the leader's entries (§5.3, Figure 2 receiver rules
    /// 2–4). `entries` must be contiguous after `prev_log_index` (checked by the caller).
    pub(crate) fn try_append(
        &mut self,
        prev_log_index: u64,
        prev_log_term: u64,
        entries: &[Entry],
    ) -> AppendCheck {
        let mut prev_log_index = prev_log_index;
        let mut prev_log_term = prev_log_term;
        let mut entries = entries;
        // Entries at or below our commit index are known to match (leader
        // completeness); compare what we still have and skip them.
        if prev_log_index < self.committed {
            let skip = ((self.committed - prev_log_index) as usize).min(entries.len());
            for entry in &entries[..skip] {
                if let Some(term) = self.term(entry.index) {
                    if term != entry.term {
                        return AppendCheck::CommittedConflict { index: entry.index };
                    }
                }
            }
            entries = &entries[skip..];
            prev_log_index = self.committed;
            prev_log_term = self
                .term(self.committed)
                .expect("committed entry is in the log");
        }
        match self.term(prev_log_index) {
            Some(term) if term == prev_log_term => {}
            Some(term) => {
                if prev_log_index <= self.committed {
                    return AppendCheck::CommittedConflict {
                        index: prev_log_index,
                    };
                }
                // First index of the conflicting term, but never inside the snapshot.
                let first_of_term = self
                    .last_index_with_term_at_most(term - 1)
                    .map_or(self.offset() + 1, |i| i + 1)
                    .max(self.offset() + 1);
                return AppendCheck::Conflict {
                    conflict_index: first_of_term.min(prev_log_index),
                    conflict_term: Some(term),
                };
            }
            None => {
                assert!(
                    prev_log_index > self.last_index(),
                    "compacted index above commit"
                );
                return AppendCheck::Conflict {
                    conflict_index: self.last_index() + 1,
                    conflict_term: None,
                };
            }
        }
        let match_index = prev_log_index + entries.len() as u64;
        for (position, entry) in entries.iter().enumerate() {
            match self.term(entry.index) {
                Some(term) if term == entry.term => continue,
                Some(_) => {
                    if entry.index <= self.committed {
                        return AppendCheck::CommittedConflict { index: entry.index };
                    }
                    self.truncate_suffix(entry.index);
                }
                None => {}
            }
            for new in &entries[position..] {
                self.entries.push_back(new.clone());
            }
            break;
        }
        AppendCheck::Matched { match_index }
    }

    /// Removes every entry at or above `index` (uncommitted only).
    fn truncate_suffix(&mut self, index: u64) {
        assert!(index > self.committed, "truncating committed entry {index}");
        assert!(index > self.offset(), "truncating into the snapshot");
        let keep = (index - self.offset() - 1) as usize;
        self.entries.truncate(keep);
        if index < self.unstable_from {
            self.truncate_from = Some(self.truncate_from.map_or(index, |t| t.min(index)));
            self.unstable_from = index;
        }
        self.persisted_last = self.persisted_last.min(index - 1);
        self.rewrites += 1;
    }

    pub(crate) fn commit_to(&mut self, index: u64) -> bool {
        if index <= self.committed {
            return false;
        }
        assert!(
            index <= self.last_index(),
            "commit index {index} above last index {}",
            self.last_index()
        );
        self.committed = index;
        true
    }

    /// The service has made a snapshot covering `..= index`: compact the log.
    pub(crate) fn compact(&mut self, index: u64, data: Bytes) {
        assert!(
            index > self.offset(),
            "compact({index}) not above the snapshot"
        );
        assert!(
            index <= self.applied,
            "compact({index}) above the applied index"
        );
        assert!(index < self.unstable_from, "compacting unpersisted entries");
        let term = self.term(index).expect("applied entry is in the log");
        let drop = (index - self.offset()) as usize;
        self.entries.drain(..drop);
        self.snapshot = Snapshot {
            meta: SnapshotMeta {
                last_included_index: index,
                last_included_term: term,
            },
            data,
        };
        self.snapshot_unpersisted = true;
    }

    /// Installs a snapshot received from a leader (§7, Figure 13 rules 6–8).
    /// Returns false when the log already commits everything it covers.
    pub(crate) fn install(&mut self, snapshot: Snapshot) -> bool {
        let index = snapshot.meta.last_included_index;
        if index <= self.committed {
            return false;
        }
        if self.term(index) == Some(snapshot.meta.last_included_term) {
            // Rule 6: keep the entries following the snapshot; those already
            // handed out stay persisted.
            let drop = (index - self.offset()) as usize;
            self.entries.drain(..drop);
            self.unstable_from = self.unstable_from.max(index + 1);
        } else {
            // Rule 7: discard the entire log. Whatever is appended after the
            // snapshot is new, however far the old log reached.
            self.entries.clear();
            self.truncate_from = Some(self.truncate_from.map_or(index + 1, |t| t.min(index + 1)));
            self.unstable_from = index + 1;
            self.persisted_last = self.persisted_last.min(self.committed);
            self.rewrites += 1;
        }
        self.snapshot = snapshot;
        self.committed = index;
        self.applied = index;
        self.snapshot_unpersisted = true;
        self.snapshot_unapplied = true;
        true
    }

    pub(crate) fn has_unpersisted(&self) -> bool {
        self.snapshot_unpersisted
            || self.truncate_from.is_some()
            || self.unstable_from <= self.last_index()
    }

    pub(crate) fn has_unapplied(&self) -> bool {
        self.snapshot_unapplied || self.applied < self.committed
    }

    /// Hands out what must be persisted: (snapshot, truncate_from, entries).
    pub(crate) fn take_unpersisted(&mut self) -> (Option<Snapshot>, Option<u64>, Vec<Entry>) {
        let snapshot =
            std::mem::take(&mut self.snapshot_unpersisted).then(|| self.snapshot.clone());
        let truncate_from = self.truncate_from.take();
        let from = self.unstable_from.max(self.offset() + 1);
        let entries: Vec<Entry> = if from <= self.last_index() {
            let start = (from - self.offset() - 1) as usize;
            self.entries.range(start..).cloned().collect()
        } else {
            Vec::new()
        };
        self.unstable_from = self.last_index() + 1;
        (snapshot, truncate_from, entries)
    }

    /// Hands out what the service must apply: (snapshot, committed entries).
    pub(crate) fn take_unapplied(&mut self, bytes_max: u64) -> (Option<Snapshot>, Vec<Entry>) {
        let snapshot = std::mem::take(&mut self.snapshot_unapplied).then(|| self.snapshot.clone());
        let unapplied = usize::try_from(self.committed - self.applied).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(unapplied.min(ENTRIES_RESERVE_MAX));
        let mut bytes = 0u64;
        while self.applied < self.committed {
            let entry = self
                .entry(self.applied + 1)
                .expect("committed entry above the snapshot is in the log");
            let size = entry.data.len() as u64;
            if !out.is_empty() && bytes + size > bytes_max {
                break;
            }
            bytes += size;
            out.push(entry.clone());
            self.applied += 1;
        }
        (snapshot, out)
    }

    /// The driver has made everything up to `last_index` durable.
    pub(crate) fn persisted_to(&mut self, last_index: u64) {
        self.persisted_last = last_index;
    }

    /// Fail-stop checks of the log's structural invariants.
    pub(crate) fn assert_invariants(&self) {
        assert!(
            self.applied <= self.committed,
            "applied {} > committed {}",
            self.applied,
            self.committed
        );
        assert!(
            self.committed <= self.last_index(),
            "committed {} > last index {}",
            self.committed,
            self.last_index()
        );
        assert!(
            self.offset() <= self.applied,
            "snapshot {} above applied {}",
            self.offset(),
            self.applied
        );
        assert!(
            self.persisted_last <= self.last_index(),
            "persisted {} > last index {}",
            self.persisted_last,
            self.last_index()
        );
        if let Some(first) = self.entries.front() {
            assert_eq!(
                first.index,
                self.offset() + 1,
                "first entry not after snapshot"
            );
        }
        if let Some(last) = self.entries.back() {
            assert_eq!(last.index, self.last_index(), "entries not contiguous");
        }
    }
}

//! [`MemLog`]: the log entries of a [`MemDisk`](super::MemDisk), one window
//! of slots per Raft group.
//!
//! The engine writes each group's log as one contiguous run of indexes: it
//! appends at the end, truncates a suffix and purges a prefix. A window (a
//! `VecDeque` indexed by `index - first`) makes each of those O(1), where an
//! ordered map pays a tree descent and node splits per entry. Any other
//! pattern still works: deleting inside the window leaves a hole, and an
//! entry too far from its group's window is refused by
//! [`try_insert`](MemLog::try_insert), for the caller to keep elsewhere.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

/// A log entry's key, `(group, index)`.
pub(super) type LogKey = (u64, u64);

/// Most empty slots an insert may open between a window and its new entry.
const GAP_SLOTS_MAX: u64 = 64;

/// One group's entries: `slots[k]` holds index `first + k`.
#[derive(Clone, Debug)]
struct Window {
    first: u64,
    slots: VecDeque<Option<Bytes>>,
}

impl Window {
    /// The slot of `index`, if the window covers it.
    fn offset(&self, index: u64) -> Option<usize> {
        let offset = index.checked_sub(self.first)?;
        (offset < self.slots.len() as u64).then_some(offset as usize)
    }

    /// Drops the empty slots at both ends.
    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            if self.slots.is_empty() {
                break;
            }
            // A slot remains at `first + 1`, so this cannot overflow.
            self.first += 1;
        }
        while matches!(self.slots.back(), Some(None)) {
            self.slots.pop_back();
        }
    }
}

/// The log entries of every group, by `(group, index)`.
#[derive(Clone, Debug, Default)]
pub(super) struct MemLog {
    groups: BTreeMap<u64, Window>,
    /// Number of entries stored (holes excluded).
    len: usize,
}

impl MemLog {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn get(&self, (group, index): LogKey) -> Option<&Bytes> {
        let window = self.groups.get(&group)?;
        window.slots[window.offset(index)?].as_ref()
    }

    /// Stores `value` at `at`, replacing what was there. Refuses (returns
    /// the value) when `at` lies more than [`GAP_SLOTS_MAX`] slots beyond
    /// either end of its group's window: the caller keeps such an entry
    /// elsewhere.
    pub(super) fn try_insert(&mut self, (group, index): LogKey, value: Bytes) -> Result<(), Bytes> {
        let Some(window) = self.groups.get_mut(&group) else {
            self.groups.insert(
                group,
                Window {
                    first: index,
                    slots: VecDeque::from([Some(value)]),
                },
            );
            self.len += 1;
            return Ok(());
        };
        if let Some(offset) = window.offset(index) {
            if window.slots[offset].replace(value).is_none() {
                self.len += 1;
            }
            return Ok(());
        }
        if index >= window.first {
            let gap = index - window.first - window.slots.len() as u64;
            if gap > GAP_SLOTS_MAX {
                return Err(value);
            }
            window.slots.extend((0..gap).map(|_| None));
            window.slots.push_back(Some(value));
        } else {
            let gap = window.first - index - 1;
            if gap > GAP_SLOTS_MAX {
                return Err(value);
            }
            for _ in 0..gap {
                window.slots.push_front(None);
            }
            window.slots.push_front(Some(value));
            window.first = index;
        }
        self.len += 1;
        Ok(())
    }

    /// Removes the entry at `at`; whether there was one.
    pub(super) fn remove(&mut self, (group, index): LogKey) -> bool {
        let Some(window) = self.groups.get_mut(&group) else {
            return false;
        };
        let Some(offset) = window.offset(index) else {
            return false;
        };
        if window.slots[offset].take().is_none() {
            return false;
        }
        self.len -= 1;
        window.trim();
        if window.slots.is_empty() {
            self.groups.remove(&group);
        }
        true
    }

    /// The entries from `start` (inclusive) to `end` (exclusive; `None`: to
    /// the end), in key order.
    pub(super) fn range(
        &self,
        start: LogKey,
        end: Option<LogKey>,
    ) -> impl DoubleEndedIterator<Item = (LogKey, &Bytes)> + '_ {
        let groups = match end {
            Some((end_group, _)) if end_group < start.0 => self.groups.range(1..1),
            Some((end_group, _)) => self.groups.range(start.0..=end_group),
            None => self.groups.range(start.0..),
        };
        groups.flat_map(move |(&group, window)| {
            // Index bounds within this group, as offsets into its window.
            let lo = if group == start.0 { start.1 } else { 0 };
            let hi: u128 = match end {
                Some((end_group, end_index)) if end_group == group => u128::from(end_index),
                _ => u128::from(u64::MAX) + 1,
            };
            let len = window.slots.len();
            let clip = |index: u128| {
                index
                    .saturating_sub(u128::from(window.first))
                    .min(len as u128) as usize
            };
            let (a, b) = (clip(u128::from(lo)), clip(hi));
            let b = b.max(a);
            let first = window.first;
            window
                .slots
                .range(a..b)
                .enumerate()
                .filter_map(move |(k, slot)| {
                    slot.as_ref()
                        .map(|value| ((group, first + (a + k) as u64), value))
                })
        })
    }

    /// Every entry, in key order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Bytes> + '_ {
        self.groups
            .values()
            .flat_map(|window| window.slots.iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(n: u64) -> Bytes {
        Bytes::from(n.to_be_bytes().to_vec())
    }

    fn keys<'a>(iter: impl Iterator<Item = (LogKey, &'a Bytes)>) -> Vec<LogKey> {
        iter.map(|(at, v)| {
            assert_eq!(v, &value(at.1));
            at
        })
        .collect()
    }

    /// The window behaves like an ordered map for the engine's patterns and
    /// for holes, both directions, and refuses far-away indexes.
    #[test]
    fn a_window_acts_like_an_ordered_map() {
        let mut log = MemLog::default();
        for index in 5..=10 {
            log.try_insert((1, index), value(index)).expect("fits");
        }
        log.try_insert((2, 1), value(1)).expect("a new group");
        log.try_insert((1, 4), value(4)).expect("just below");
        log.try_insert((1, 12), value(12)).expect("a small gap");
        assert!(
            log.try_insert((1, 12 + GAP_SLOTS_MAX + 2), value(0))
                .is_err()
        );
        assert!(log.try_insert((1, 0), value(0)).is_ok());
        assert_eq!(log.len(), 10);
        assert_eq!(log.get((1, 11)), None);
        assert_eq!(log.get((1, 12)), Some(&value(12)));
        assert!(log.remove((1, 7)));
        assert!(!log.remove((1, 7)));
        assert!(!log.remove((1, 11)));
        assert!(!log.remove((3, 1)));
        let all = keys(log.range((0, 0), None));
        let expected: Vec<LogKey> = [0, 4, 5, 6, 8, 9, 10, 12]
            .iter()
            .map(|&i| (1, i))
            .chain([(2, 1)])
            .collect();
        assert_eq!(all, expected);
        let mut reversed = expected.clone();
        reversed.reverse();
        assert_eq!(keys(log.range((0, 0), None).rev()), reversed);
        assert_eq!(
            keys(log.range((1, 6), Some((1, 10)))),
            vec![(1, 6), (1, 8), (1, 9)]
        );
        assert_eq!(
            keys(log.range((1, 9), Some((2, 2)))),
            vec![(1, 9), (1, 10), (1, 12), (2, 1)]
        );
        assert_eq!(keys(log.range((2, 0), Some((1, 0)))), vec![]);
        assert_eq!(keys(log.range((1, 13), Some((2, 1)))), vec![]);
        // Purging the prefix and truncating the suffix shrink the window.
        for index in [0, 4, 5, 6, 8] {
            assert!(log.remove((1, index)));
        }
        assert_eq!(log.groups[&1].first, 9);
        assert!(log.remove((1, 12)));
        assert_eq!(log.groups[&1].slots.len(), 2);
        assert!(log.remove((1, 9)) && log.remove((1, 10)));
        assert!(!log.groups.contains_key(&1));
        assert!(log.remove((2, 1)));
        assert!(log.is_empty() && log.groups.is_empty());
        // The extremes of the index space.
        log.try_insert((u64::MAX, u64::MAX), value(u64::MAX))
            .expect("fits");
        assert_eq!(
            keys(log.range((u64::MAX, 0), None)),
            vec![(u64::MAX, u64::MAX)]
        );
        assert_eq!(
            keys(log.range((u64::MAX, 0), Some((u64::MAX, u64::MAX)))),
            vec![]
        );
    }
}

//! Unit tests of the Raft core asserting its exact outputs for the rules of
//! the Raft paper (section in each test's name) and for the extensions
//! (pre-vote, check-quorum, read index, leadership transfer).

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::NodeId;

fn config() -> Config {
    Config {
        pre_vote: false,
        ..Config::default()
    }
}

fn core_with(id: NodeId, voters: &[NodeId], config: Config, persisted: PersistedState) -> RaftCore {
    RaftCore::new(id, voters, config, persisted, ChaCha8Rng::seed_from_u64(id)).expect("valid core")
}

fn core(id: NodeId, voters: &[NodeId]) -> RaftCore {
    core_with(id, voters, config(), PersistedState::default())
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("{index}/{term}")),
    }
}

/// Entries 1.. with the given terms.
fn log(terms: &[u64]) -> Vec<Entry> {
    terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(i as u64 + 1, t))
        .collect()
}

fn persisted(term: u64, voted_for: Option<NodeId>, entries: Vec<Entry>) -> PersistedState {
    PersistedState {
        hard_state: HardState { term, voted_for },
        snapshot: None,
        entries,
    }
}

/// What one Ready carried (copied out so the Ready can be advanced).
#[derive(Debug, Default)]
struct Out {
    hard_state: Option<HardState>,
    snapshot: Option<Snapshot>,
    log_truncate_from: Option<u64>,
    entries: Vec<Entry>,
    messages: Vec<Message>,
    snapshot_to_apply: Option<Snapshot>,
    committed: Vec<Entry>,
    reads: Vec<ReadState>,
}

/// Runs one Ready cycle (as a driver would after persisting) and returns its content.
fn cycle(core: &mut RaftCore) -> Out {
    let mut ready = core.ready();
    let out = Out {
        hard_state: ready.hard_state,
        snapshot: ready.snapshot.take(),
        log_truncate_from: ready.log_truncate_from,
        entries: std::mem::take(&mut ready.entries),
        messages: std::mem::take(&mut ready.messages),
        snapshot_to_apply: ready.snapshot_to_apply.take(),
        committed: std::mem::take(&mut ready.committed_entries),
        reads: std::mem::take(&mut ready.read_states),
    };
    core.advance(ready);
    out
}

fn msg(from: NodeId, to: NodeId, term: u64, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

fn success(from: NodeId, to: NodeId, term: u64, match_index: u64) -> Message {
    msg(
        from,
        to,
        term,
        MessageBody::AppendResponse {
            outcome: AppendOutcome::Success { match_index },
        },
    )
}

fn tick_until(core: &mut RaftCore, role: Role) -> u64 {
    for ticks in 1..=1000 {
        core.tick();
        if core.role() == role {
            return ticks;
        }
    }
    panic!("never became {role:?}");
}

/// Elects `core` (pre-vote off) with votes from `voters`, and drains its Ready.
fn elect(core: &mut RaftCore, voters: &[NodeId]) {
    tick_until(core, Role::Candidate);
    cycle(core);
    let term = core.term();
    for &v in voters {
        if v != core.id() && core.role() != Role::Leader {
            core.step(msg(
                v,
                core.id(),
                term,
                MessageBody::VoteResponse { granted: true },
            ))
            .expect("vote response");
        }
    }
    assert_eq!(core.role(), Role::Leader);
}

fn bodies_to(out: &Out, to: NodeId) -> Vec<MessageBody> {
    out.messages
        .iter()
        .filter(|m| m.to == to)
        .map(|m| m.body.clone())
        .collect()
}

// ----- §5.2 leader election ---------------------------------------------------

// §5.2: a follower that hears nothing within its randomized timeout becomes a
// candidate in a new term, votes for itself (persisted), and requests votes.
#[test]
fn s5_2_follower_times_out_and_requests_votes() {
    let mut n = core_with(1, &[1, 2, 3], config(), persisted(1, None, log(&[1, 1])));
    let ticks = tick_until(&mut n, Role::Candidate);
    assert!(
        (30..60).contains(&ticks),
        "timeout {ticks} outside [30, 60)"
    );
    assert_eq!(n.term(), 2);
    let out = cycle(&mut n);
    assert_eq!(
        out.hard_state,
        Some(HardState {
            term: 2,
            voted_for: Some(1)
        })
    );
    let vote = MessageBody::Vote {
        last_log_index: 2,
        last_log_term: 1,
        leadership_transfer: false,
    };
    assert_eq!(
        out.messages,
        vec![msg(1, 2, 2, vote.clone()), msg(1, 3, 2, vote)]
    );
}

// §5.2: election timeouts are randomized per node (seeded), within the configured range.
#[test]
fn s5_2_election_timeouts_are_randomized() {
    let timeouts: Vec<u64> = (1..=8)
        .map(|id| {
            let voters: Vec<NodeId> = (1..=8).collect();
            let mut n = core(id, &voters);
            tick_until(&mut n, Role::Candidate)
        })
        .collect();
    assert!(
        timeouts.iter().all(|t| (30..60).contains(t)),
        "{timeouts:?}"
    );
    let mut distinct = timeouts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 1, "all timeouts equal: {timeouts:?}");
}

// §5.2: a candidate with votes from a majority becomes leader and announces
// itself with empty appends, appending no entry of its own.
#[test]
fn s5_2_majority_makes_leader_without_appending() {
    let mut n = core(1, &[1, 2, 3]);
    tick_until(&mut n, Role::Candidate);
    cycle(&mut n);
    n.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: true }))
        .unwrap();
    assert_eq!(n.role(), Role::Leader);
    assert_eq!(n.last_index(), 0);
    let out = cycle(&mut n);
    assert!(out.entries.is_empty());
    let probe = MessageBody::Append {
        prev_log_index: 0,
        prev_log_term: 0,
        entries: vec![],
        leader_commit: 0,
    };
    assert_eq!(
        out.messages,
        vec![msg(1, 2, 1, probe.clone()), msg(1, 3, 1, probe)]
    );
    // The first proposal lands at index 1 (the labs expect 1, 2, 3).
    assert_eq!(n.propose(Bytes::from_static(b"a")), Ok((1, 1)));
}

// §5.2: a candidate rejected by a majority returns to follower in its term.
#[test]
fn s5_2_majority_rejection_makes_follower() {
    let mut n = core(1, &[1, 2, 3]);
    tick_until(&mut n, Role::Candidate);
    cycle(&mut n);
    n.step(msg(2, 1, 1, MessageBody::VoteResponse { granted: false }))
        .unwrap();
    assert_eq!(n.role(), Role::Candidate);
    n.step(msg(3, 1, 1, MessageBody::VoteResponse { granted: false }))
        .unwrap();
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.term(), 1);
}

// §5.2: at most one vote per term, persisted in the same Ready as the reply.
#[test]
fn s5_2_one_vote_per_term_persisted_before_reply() {
    let mut n = core(1, &[1, 2, 3]);
    let vote = |from| {
        msg(
            from,
            1,
            5,
            MessageBody::Vote {
                last_log_index: 0,
                last_log_term: 0,
                leadership_transfer: false,
            },
        )
    };
    n.step(vote(2)).unwrap();
    let out = cycle(&mut n);
    assert_eq!(
        out.hard_state,
        Some(HardState {
            term: 5,
            voted_for: Some(2)
        })
    );
    assert_eq!(
        out.messages,
        vec![msg(1, 2, 5, MessageBody::VoteResponse { granted: true })]
    );
    n.step(vote(3)).unwrap();
    let out = cycle(&mut n);
    assert_eq!(out.hard_state, None);
    assert_eq!(
        out.messages,
        vec![msg(1, 3, 5, MessageBody::VoteResponse { granted: false })]
    );
    // A repeated request from the same candidate is granted again (idempotent).
    n.step(vote(2)).unwrap();
    assert_eq!(
        cycle(&mut n).messages,
        vec![msg(1, 2, 5, MessageBody::VoteResponse { granted: true })]
    );
}

// §5.1/§5.2: a leader that sees a higher term steps down and adopts it.
#[test]
fn s5_2_higher_term_makes_leader_follower() {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n);
    n.step(msg(
        3,
        1,
        7,
        MessageBody::HeartbeatResponse { read_round: 0 },
    ))
    .unwrap();
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.term(), 7);
    assert_eq!(n.voted_for(), None);
    assert_eq!(
        n.propose(Bytes::new()),
        Err(ProposeError::NotLeader { leader_hint: None })
    );
}

// §5.2: a candidate receiving an append from a leader of its term becomes its follower.
#[test]
fn s5_2_candidate_yields_to_leader_of_same_term() {
    let mut n = core(1, &[1, 2, 3]);
    tick_until(&mut n, Role::Candidate);
    cycle(&mut n);
    n.step(msg(
        2,
        1,
        1,
        MessageBody::Append {
            prev_log_index: 0,
            prev_log_term: 0,
            entries: vec![],
            leader_commit: 0,
        },
    ))
    .unwrap();
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.leader(), Some(2));
    assert_eq!(
        n.propose(Bytes::new()),
        Err(ProposeError::NotLeader {
            leader_hint: Some(2)
        })
    );
}

// ----- §5.3 log replication ---------------------------------------------------

fn append(prev: (u64, u64), entries: Vec<Entry>, commit: u64) -> MessageBody {
    MessageBody::Append {
        prev_log_index: prev.0,
        prev_log_term: prev.1,
        entries,
        leader_commit: commit,
    }
}

// §5.3: a follower missing the entry at prev_log_index rejects with a hint
// pointing just past its log (fast backup).
#[test]
fn s5_3_reject_when_previous_entry_missing() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1, 1])));
    n.step(msg(1, 2, 2, append((5, 2), vec![entry(6, 2)], 0)))
        .unwrap();
    let out = cycle(&mut n);
    assert!(out.entries.is_empty());
    assert_eq!(
        out.messages,
        vec![msg(
            2,
            1,
            2,
            MessageBody::AppendResponse {
                outcome: AppendOutcome::Conflict {
                    rejected_index: 5,
                    conflict_index: 3,
                    conflict_term: None
                }
            }
        )]
    );
}

// §5.3: a term mismatch at prev_log_index is reported with the conflicting
// term and the first index the follower holds of it.
#[test]
fn s5_3_reject_with_conflicting_term_hint() {
    let mut n = core_with(
        2,
        &[1, 2, 3],
        config(),
        persisted(3, None, log(&[1, 2, 2, 2])),
    );
    n.step(msg(1, 2, 4, append((4, 3), vec![], 0))).unwrap();
    assert_eq!(
        cycle(&mut n).messages,
        vec![msg(
            2,
            1,
            4,
            MessageBody::AppendResponse {
                outcome: AppendOutcome::Conflict {
                    rejected_index: 4,
                    conflict_index: 2,
                    conflict_term: Some(2)
                }
            }
        )]
    );
}

// §5.3: a conflicting suffix is truncated (reported to the driver) and replaced.
#[test]
fn s5_3_conflicting_suffix_is_truncated() {
    let mut n = core_with(
        2,
        &[1, 2, 3],
        config(),
        persisted(2, None, log(&[1, 1, 2, 2])),
    );
    n.step(msg(1, 2, 3, append((2, 1), vec![entry(3, 3)], 0)))
        .unwrap();
    let out = cycle(&mut n);
    assert_eq!(out.log_truncate_from, Some(3));
    assert_eq!(out.entries, vec![entry(3, 3)]);
    assert_eq!(n.last_index(), 3);
    assert_eq!(out.messages, vec![success(2, 1, 3, 3)]);
}

// §5.3: an old (duplicated or reordered) append whose entries match must not
// truncate entries that follow them.
#[test]
fn s5_3_matching_old_append_does_not_truncate() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1, 1, 1])));
    n.step(msg(1, 2, 1, append((1, 1), vec![entry(2, 1)], 0)))
        .unwrap();
    let out = cycle(&mut n);
    assert_eq!(out.log_truncate_from, None);
    assert!(out.entries.is_empty());
    assert_eq!(n.last_index(), 3);
    assert_eq!(out.messages, vec![success(2, 1, 1, 2)]);
}

// §5.3: a follower commits min(leader_commit, last new entry) and hands
// committed entries out only in a Ready that also persists them.
#[test]
fn s5_3_follower_commit_bounded_by_last_new_entry() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1, 1, 1])));
    n.step(msg(1, 2, 2, append((1, 1), vec![entry(2, 1)], 3)))
        .unwrap();
    assert_eq!(n.commit_index(), 2);
    let out = cycle(&mut n);
    assert_eq!(out.committed, log(&[1, 1]));
}

// §5.3: the leader backs up past a whole conflicting term using the hints.
#[test]
fn s5_3_leader_fast_backup_skips_conflicting_term() {
    // Leader log terms: 1 1 1 4 4 5 5 6 6 6 (Figure 7), term 8.
    let terms = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6];
    let mut n = core_with(1, &[1, 2, 3], config(), persisted(7, None, log(&terms)));
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n);
    // Follower (Figure 7 f) holds 1 1 1 2 2 2 3 3 3 3 3: rejects prev 10 with term 3 from index 7.
    n.step(msg(
        2,
        1,
        8,
        MessageBody::AppendResponse {
            outcome: AppendOutcome::Conflict {
                rejected_index: 10,
                conflict_index: 7,
                conflict_term: Some(3),
            },
        },
    ))
    .unwrap();
    // The leader has no term 3: it jumps straight to the follower's hint.
    let out = cycle(&mut n);
    let sent = bodies_to(&out, 2);
    assert_eq!(sent.len(), 1);
    let MessageBody::Append { prev_log_index, .. } = &sent[0] else {
        panic!("expected an append, got {sent:?}");
    };
    assert_eq!(*prev_log_index, 6);
    // Next rejection says term 2 from index 4; the leader has no term 2 either.
    n.step(msg(
        2,
        1,
        8,
        MessageBody::AppendResponse {
            outcome: AppendOutcome::Conflict {
                rejected_index: 6,
                conflict_index: 4,
                conflict_term: Some(2),
            },
        },
    ))
    .unwrap();
    let out = cycle(&mut n);
    let MessageBody::Append {
        prev_log_index,
        entries,
        ..
    } = &bodies_to(&out, 2)[0]
    else {
        panic!("expected an append");
    };
    assert_eq!(*prev_log_index, 3);
    assert_eq!(entries.len(), 7);
    // A rejection that mentions a term the leader has backs up to its last entry of it.
    n.step(msg(
        3,
        1,
        8,
        MessageBody::AppendResponse {
            outcome: AppendOutcome::Conflict {
                rejected_index: 10,
                conflict_index: 4,
                conflict_term: Some(4),
            },
        },
    ))
    .unwrap();
    let out = cycle(&mut n);
    let MessageBody::Append { prev_log_index, .. } = &bodies_to(&out, 3)[0] else {
        panic!("expected an append");
    };
    assert_eq!(*prev_log_index, 5);
}

// §5.3: appends are batched, bounded by entry count and by bytes, and
// pipelined up to append_inflight_max messages per follower.
#[test]
fn s5_3_batching_and_pipelining_are_bounded() {
    let config = Config {
        append_entries_max: 3,
        append_bytes_max: 10,
        entry_bytes_max: 10,
        append_inflight_max: 2,
        ..config()
    };
    let mut n = core_with(1, &[1, 2], config, PersistedState::default());
    elect(&mut n, &[1, 2]);
    cycle(&mut n);
    n.step(success(2, 1, 1, 0)).unwrap(); // probe answered: replicate state
    for data in ["aaaa", "bbbb", "ccc", "d", "e", "f", "g", "h"] {
        n.propose(Bytes::from(data)).unwrap();
    }
    let out = cycle(&mut n);
    let batches: Vec<Vec<u64>> = bodies_to(&out, 2)
        .into_iter()
        .map(|b| match b {
            MessageBody::Append { entries, .. } => entries.iter().map(|e| e.index).collect(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // 4+4 bytes, then "ccc" would exceed 10 bytes; then 3 entries by count; then the pipeline is full.
    assert_eq!(batches, vec![vec![1, 2], vec![3, 4, 5]]);
    n.step(success(2, 1, 1, 2)).unwrap();
    let out = cycle(&mut n);
    let batches: Vec<Vec<u64>> = bodies_to(&out, 2)
        .into_iter()
        .filter_map(|b| match b {
            MessageBody::Append { entries, .. } => Some(entries.iter().map(|e| e.index).collect()),
            _ => None,
        })
        .collect();
    assert_eq!(batches, vec![vec![6, 7, 8]]);
}

// ----- §5.4.1 election restriction ------------------------------------------

// §5.4.1: votes go only to candidates whose log is at least as up-to-date.
#[test]
fn s5_4_1_vote_denied_to_less_up_to_date_log() {
    let cases = [
        // (candidate last index, last term, granted)
        (5, 1, false), // lower last term, longer log
        (2, 2, false), // same term, shorter log
        (3, 2, true),  // same term, same length
        (1, 3, true),  // higher last term, shorter log
    ];
    for (last_log_index, last_log_term, granted) in cases {
        let mut n = core_with(1, &[1, 2, 3], config(), persisted(2, None, log(&[1, 2, 2])));
        n.step(msg(
            2,
            1,
            3,
            MessageBody::Vote {
                last_log_index,
                last_log_term,
                leadership_transfer: false,
            },
        ))
        .unwrap();
        let out = cycle(&mut n);
        assert_eq!(
            out.messages,
            vec![msg(1, 2, 3, MessageBody::VoteResponse { granted })],
            "candidate log ({last_log_index}, {last_log_term})"
        );
        assert_eq!(n.voted_for(), granted.then_some(2));
    }
}

// ----- §5.4.2 commit rule -------------------------------------------------------

// §5.4.2 (Figure 8): a leader does not commit an entry of an earlier term by
// counting replicas; it commits it together with an entry of its own term.
#[test]
fn s5_4_2_previous_term_entry_commits_only_with_current_term_entry() {
    let mut n = core_with(1, &[1, 2, 3], config(), persisted(2, None, log(&[2])));
    elect(&mut n, &[1, 2, 3]);
    assert_eq!(n.term(), 3);
    cycle(&mut n);
    n.step(success(2, 1, 3, 1)).unwrap();
    n.step(success(3, 1, 3, 1)).unwrap();
    assert_eq!(
        n.commit_index(),
        0,
        "term-2 entry on all nodes must not commit"
    );
    assert!(cycle(&mut n).committed.is_empty());
    let (index, term) = n.propose(Bytes::from_static(b"x")).unwrap();
    assert_eq!((index, term), (2, 3));
    cycle(&mut n); // the leader persists entry 2
    n.step(success(2, 1, 3, 2)).unwrap();
    assert_eq!(n.commit_index(), 2);
    let out = cycle(&mut n);
    assert_eq!(
        out.committed.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

// §5.4.2 with persistence: the leader counts itself only for entries it has
// persisted (acknowledged by advance), so a single node commits after its flush.
#[test]
fn s5_4_2_leader_counts_itself_only_after_persisting() {
    let mut n = core(1, &[1]);
    tick_until(&mut n, Role::Leader);
    cycle(&mut n);
    n.propose(Bytes::from_static(b"x")).unwrap();
    assert_eq!(n.commit_index(), 0);
    let mut ready = n.ready();
    assert_eq!(ready.entries.len(), 1);
    assert!(ready.committed_entries.is_empty());
    assert_eq!(n.commit_index(), 0);
    ready.entries.clear();
    n.advance(ready);
    assert_eq!(n.commit_index(), 1);
    assert_eq!(cycle(&mut n).committed.len(), 1);
}

/// Node 1 leading 2 and 3 in term 1, both probes answered: appends flow.
fn replicating_leader() -> RaftCore {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n); // the empty probes
    n.step(success(2, 1, 1, 0)).unwrap();
    n.step(success(3, 1, 1, 0)).unwrap();
    cycle(&mut n);
    n
}

// A commit reaches the followers with the next append, or at the next tick
// when no append goes out first: no message of its own per commit (under
// load that would double the messages per round trip).
#[test]
fn commit_index_travels_with_the_next_append_or_tick() {
    let mut n = replicating_leader();
    n.propose(Bytes::from_static(b"a")).unwrap();
    let out = cycle(&mut n);
    for to in [2, 3] {
        assert!(matches!(
            bodies_to(&out, to)[..],
            [MessageBody::Append { leader_commit: 0, ref entries, .. }] if entries.len() == 1
        ));
    }
    n.step(success(2, 1, 1, 1)).unwrap();
    n.step(success(3, 1, 1, 1)).unwrap();
    assert_eq!(n.commit_index(), 1);
    let out = cycle(&mut n);
    assert_eq!(out.committed.len(), 1);
    assert!(out.messages.is_empty(), "{:?}", out.messages);
    assert!(!n.has_ready());
    // A proposal's append carries the commit ...
    n.propose(Bytes::from_static(b"b")).unwrap();
    let out = cycle(&mut n);
    for to in [2, 3] {
        assert!(matches!(
            bodies_to(&out, to)[..],
            [MessageBody::Append {
                leader_commit: 1,
                ..
            }]
        ));
    }
    n.step(success(2, 1, 1, 2)).unwrap();
    assert_eq!(n.commit_index(), 2);
    let out = cycle(&mut n);
    assert_eq!(out.committed.len(), 1);
    assert!(out.messages.is_empty(), "{:?}", out.messages);
    // ... and with no append pending, the next tick tells each follower
    // what it has not heard of, bounded by what it holds: 2 learns index 2;
    // 3 (which acknowledged only 1) already knows 1 and gets nothing early.
    n.tick();
    let out = cycle(&mut n);
    assert_eq!(
        bodies_to(&out, 2),
        vec![MessageBody::Heartbeat {
            leader_commit: 2,
            read_round: 0
        }]
    );
    assert!(bodies_to(&out, 3).is_empty(), "{:?}", bodies_to(&out, 3));
    n.tick();
    assert!(cycle(&mut n).messages.is_empty(), "told once");
}

// A leadership-transfer target hears of every commit it holds before
// TimeoutNow (on an ordered link), so as the new leader it applies them at
// once instead of after an entry of its own term commits.
#[test]
fn transfer_target_learns_the_commit_before_timeout_now() {
    let mut n = replicating_leader();
    n.propose(Bytes::from_static(b"a")).unwrap();
    cycle(&mut n); // entry 1 goes to both with commit 0
    n.transfer_leader(2).unwrap();
    n.step(success(3, 1, 1, 1)).unwrap();
    assert_eq!(n.commit_index(), 1);
    // Only the transfer's own probe of 2, sent before the commit.
    let sent = bodies_to(&cycle(&mut n), 2);
    assert!(
        matches!(
            sent[..],
            [MessageBody::Append {
                leader_commit: 0,
                ..
            }]
        ),
        "{sent:?}"
    );
    // Target 2 catches up: the commit, then TimeoutNow.
    n.step(success(2, 1, 1, 1)).unwrap();
    assert_eq!(
        bodies_to(&cycle(&mut n), 2),
        vec![
            MessageBody::Heartbeat {
                leader_commit: 1,
                read_round: 0
            },
            MessageBody::TimeoutNow
        ]
    );
}

// ----- §7 log compaction ---------------------------------------------------

fn snapshot(index: u64, term: u64, data: &'static [u8]) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            last_included_index: index,
            last_included_term: term,
        },
        data: Bytes::from_static(data),
    }
}

// §7: the service's snapshot compacts the log and is handed out for persisting
// with the truncation; stale or unapplied snapshots are refused.
#[test]
fn s7_service_snapshot_compacts_the_log() {
    let mut n = core_with(1, &[1], config(), persisted(1, Some(1), log(&[1, 1, 1, 1])));
    tick_until(&mut n, Role::Leader);
    n.propose(Bytes::from_static(b"x")).unwrap();
    cycle(&mut n);
    let out = cycle(&mut n);
    assert_eq!(out.committed.len(), 5);
    assert_eq!(
        n.snapshot(6, Bytes::new()),
        Err(SnapshotError::NotApplied {
            index: 6,
            applied: 5
        })
    );
    n.snapshot(3, Bytes::from_static(b"state@3")).unwrap();
    assert_eq!(
        n.snapshot(3, Bytes::new()),
        Err(SnapshotError::Stale {
            index: 3,
            snapshot_index: 3
        })
    );
    assert_eq!(n.entry(3), None);
    assert_eq!(n.entry_term(3), Some(1));
    assert_eq!(n.entry(4).map(|e| e.index), Some(4));
    let out = cycle(&mut n);
    assert_eq!(out.snapshot, Some(snapshot(3, 1, b"state@3")));
    assert_eq!(
        out.snapshot_to_apply, None,
        "the service already has its own state"
    );
    assert_eq!(out.log_truncate_from, None);
}

// §7: a leader sends a follower that needs compacted entries its snapshot, in
// chunks of at most snapshot_chunk_bytes_max, one at a time, then resumes appends.
#[test]
fn s7_leader_sends_snapshot_in_chunks() {
    let config = Config {
        snapshot_chunk_bytes_max: 4,
        ..config()
    };
    let state = PersistedState {
        hard_state: HardState {
            term: 2,
            voted_for: None,
        },
        snapshot: Some(snapshot(5, 2, b"0123456789")),
        entries: vec![entry(6, 2)],
    };
    let mut n = core_with(1, &[1, 2, 3], config, state);
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n);
    // Follower 2 is empty.
    n.step(msg(
        2,
        1,
        3,
        MessageBody::AppendResponse {
            outcome: AppendOutcome::Conflict {
                rejected_index: 6,
                conflict_index: 1,
                conflict_term: None,
            },
        },
    ))
    .unwrap();
    let meta = SnapshotMeta {
        last_included_index: 5,
        last_included_term: 2,
    };
    let chunk = |offset: u64, data: &'static [u8], done| MessageBody::InstallSnapshot {
        meta,
        total_bytes: 10,
        offset,
        data: Bytes::from_static(data),
        done,
    };
    assert_eq!(bodies_to(&cycle(&mut n), 2), vec![chunk(0, b"0123", false)]);
    let ack = |next_offset, done| {
        msg(
            2,
            1,
            3,
            MessageBody::InstallSnapshotResponse {
                last_included_index: 5,
                next_offset,
                done,
            },
        )
    };
    n.step(ack(4, false)).unwrap();
    assert_eq!(bodies_to(&cycle(&mut n), 2), vec![chunk(4, b"4567", false)]);
    n.step(ack(8, false)).unwrap();
    assert_eq!(bodies_to(&cycle(&mut n), 2), vec![chunk(8, b"89", true)]);
    n.step(ack(10, true)).unwrap();
    assert_eq!(n.follower_progress(2), Some((5, 6)));
    let sent = bodies_to(&cycle(&mut n), 2);
    assert_eq!(sent, vec![append((5, 2), vec![entry(6, 2)], 5)]);
}

fn install_chunks(n: &mut RaftCore, term: u64, snap: &Snapshot, chunk: usize) -> Vec<Message> {
    let mut replies = Vec::new();
    let total = snap.data.len();
    let mut offset = 0;
    loop {
        let end = (offset + chunk).min(total);
        n.step(msg(
            1,
            n.id(),
            term,
            MessageBody::InstallSnapshot {
                meta: snap.meta,
                total_bytes: total as u64,
                offset: offset as u64,
                data: snap.data.slice(offset..end),
                done: end == total,
            },
        ))
        .unwrap();
        offset = end;
        if end == total {
            return replies;
        }
        replies.extend(cycle(n).messages);
    }
}

// §7 (Figure 13 rule 7): a snapshot that does not match the log replaces it entirely.
#[test]
fn s7_install_discards_conflicting_log() {
    let mut n = core_with(
        2,
        &[1, 2, 3],
        config(),
        persisted(1, None, log(&[1, 1, 1, 1])),
    );
    let snap = snapshot(3, 2, b"abcdefg");
    let replies = install_chunks(&mut n, 2, &snap, 3);
    assert_eq!(
        replies.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
        vec![
            MessageBody::InstallSnapshotResponse {
                last_included_index: 3,
                next_offset: 3,
                done: false
            },
            MessageBody::InstallSnapshotResponse {
                last_included_index: 3,
                next_offset: 6,
                done: false
            },
        ]
    );
    let out = cycle(&mut n);
    assert_eq!(out.snapshot, Some(snap.clone()));
    assert_eq!(out.log_truncate_from, Some(4));
    assert_eq!(out.snapshot_to_apply, Some(snap));
    assert!(out.committed.is_empty());
    assert_eq!(
        (n.last_index(), n.commit_index(), n.applied_index()),
        (3, 3, 3)
    );
    assert_eq!(
        out.messages,
        vec![msg(
            2,
            1,
            2,
            MessageBody::InstallSnapshotResponse {
                last_included_index: 3,
                next_offset: 7,
                done: true
            }
        )]
    );
}

// §7 regression (simulation seed 17476): entries appended right after an
// install that discarded a longer conflicting log must be handed out for
// persisting, even at indexes the old log had already persisted.
#[test]
fn s7_entries_after_discarding_install_are_persisted() {
    let mut n = core_with(
        2,
        &[1, 2, 3],
        config(),
        persisted(1, None, log(&[1, 1, 1, 1, 1])),
    );
    let snap = snapshot(3, 2, b"s");
    install_chunks(&mut n, 2, &snap, 100);
    n.step(msg(
        1,
        2,
        2,
        append((3, 2), vec![entry(4, 2), entry(5, 2)], 5),
    ))
    .unwrap();
    let out = cycle(&mut n);
    assert_eq!(out.snapshot, Some(snap));
    assert_eq!(out.log_truncate_from, Some(4));
    assert_eq!(out.entries, vec![entry(4, 2), entry(5, 2)]);
    assert_eq!(out.committed, vec![entry(4, 2), entry(5, 2)]);
}

// §7 (Figure 13 rule 6): entries following a matching snapshot are retained.
#[test]
fn s7_install_keeps_matching_suffix() {
    let mut n = core_with(
        2,
        &[1, 2, 3],
        config(),
        persisted(1, None, log(&[1, 1, 1, 1, 1])),
    );
    let snap = snapshot(3, 1, b"xyz");
    install_chunks(&mut n, 1, &snap, 100);
    let out = cycle(&mut n);
    assert_eq!(out.snapshot, Some(snap));
    assert_eq!(out.log_truncate_from, None);
    assert_eq!(n.last_index(), 5);
    assert_eq!(n.entry(4), Some(&entry(4, 1)));
    assert_eq!(n.entry(3), None);
}

// §7: a snapshot covering only committed entries is acknowledged, not installed.
#[test]
fn s7_snapshot_behind_commit_is_ignored() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1, 1, 1])));
    n.step(msg(1, 2, 1, append((3, 1), vec![], 3))).unwrap();
    cycle(&mut n);
    let snap = snapshot(2, 1, b"old");
    install_chunks(&mut n, 1, &snap, 100);
    let out = cycle(&mut n);
    assert_eq!(out.snapshot, None);
    assert_eq!(out.snapshot_to_apply, None);
    assert_eq!(
        out.messages[0].body,
        MessageBody::InstallSnapshotResponse {
            last_included_index: 2,
            next_offset: 3,
            done: true
        }
    );
}

// §7: on restart the persisted snapshot goes to the service first, and the
// commit index restarts at the snapshot.
#[test]
fn s7_restart_hands_snapshot_to_service() {
    let state = PersistedState {
        hard_state: HardState {
            term: 4,
            voted_for: Some(2),
        },
        snapshot: Some(snapshot(10, 3, b"s")),
        entries: vec![entry(11, 4)],
    };
    let mut n = core_with(1, &[1, 2, 3], config(), state);
    assert_eq!((n.term(), n.voted_for()), (4, Some(2)));
    assert_eq!(
        (n.commit_index(), n.applied_index(), n.last_index()),
        (10, 10, 11)
    );
    let out = cycle(&mut n);
    assert_eq!(out.snapshot_to_apply, Some(snapshot(10, 3, b"s")));
    assert_eq!(out.hard_state, None);
    assert!(out.entries.is_empty());
}

// ----- pre-vote, check-quorum -------------------------------------------------

// Pre-vote (thesis §9.6): a node that times out asks for pre-votes at term+1
// without changing (or persisting) its own term.
#[test]
fn prevote_does_not_change_term() {
    let config = Config {
        pre_vote: true,
        ..config()
    };
    let mut n = core_with(1, &[1, 2, 3], config, persisted(3, None, log(&[3])));
    tick_until(&mut n, Role::PreCandidate);
    assert_eq!(n.term(), 3);
    let out = cycle(&mut n);
    assert_eq!(out.hard_state, None);
    let pre_vote = MessageBody::PreVote {
        last_log_index: 1,
        last_log_term: 3,
    };
    assert_eq!(
        out.messages,
        vec![msg(1, 2, 4, pre_vote.clone()), msg(1, 3, 4, pre_vote)]
    );
    // A quorum of pre-votes starts the real election.
    n.step(msg(2, 1, 4, MessageBody::PreVoteResponse { granted: true }))
        .unwrap();
    assert_eq!(n.role(), Role::Candidate);
    assert_eq!(n.term(), 4);
}

// Pre-vote and check-quorum: a follower that hears from a leader ignores
// (pre-)vote requests, so a rejoining partitioned node cannot disrupt it.
#[test]
fn leader_lease_ignores_disruptive_vote_requests() {
    let config = Config {
        pre_vote: true,
        ..config()
    };
    let mut n = core_with(2, &[1, 2, 3], config, PersistedState::default());
    n.step(msg(1, 2, 1, append((0, 0), vec![], 0))).unwrap();
    cycle(&mut n);
    for body in [
        MessageBody::PreVote {
            last_log_index: 9,
            last_log_term: 1,
        },
        MessageBody::Vote {
            last_log_index: 9,
            last_log_term: 1,
            leadership_transfer: false,
        },
    ] {
        n.step(msg(3, 2, 2, body)).unwrap();
        assert_eq!(n.term(), 1);
        assert!(cycle(&mut n).messages.is_empty());
    }
    // Once the lease expires, the pre-vote is granted (without adopting the term).
    for _ in 0..30 {
        n.tick();
    }
    cycle(&mut n);
    n.step(msg(
        3,
        2,
        2,
        MessageBody::PreVote {
            last_log_index: 9,
            last_log_term: 1,
        },
    ))
    .unwrap();
    assert_eq!(n.term(), 1);
    assert_eq!(
        cycle(&mut n).messages,
        vec![msg(2, 3, 2, MessageBody::PreVoteResponse { granted: true })]
    );
}

// Check-quorum (thesis §6.2): a leader that has not heard from a quorum for an
// election timeout steps down; one that has stays.
#[test]
fn check_quorum_steps_down_isolated_leader() {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    for _ in 0..29 {
        n.tick();
    }
    n.step(msg(
        2,
        1,
        1,
        MessageBody::HeartbeatResponse { read_round: 0 },
    ))
    .unwrap();
    n.tick(); // first check: 2 of 3 active
    assert_eq!(n.role(), Role::Leader);
    for _ in 0..30 {
        n.tick();
    }
    assert_eq!(n.role(), Role::Follower);
    assert_eq!(n.term(), 1);
}

// A stale leader's append is answered with the current term so it steps down.
#[test]
fn stale_leader_learns_new_term() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(5, None, vec![]));
    n.step(msg(1, 2, 3, append((0, 0), vec![], 0))).unwrap();
    assert_eq!(
        cycle(&mut n).messages,
        vec![msg(
            2,
            1,
            5,
            MessageBody::HeartbeatResponse { read_round: 0 }
        )]
    );
}

// Heartbeats: an idle leader sends each peer one heartbeat per heartbeat
// interval (≤ 10/s at 10 ms ticks), and a peer that was just sent an append
// gets its next heartbeat an interval after that append.
#[test]
fn heartbeats_once_per_interval_when_idle() {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n);
    let mut heartbeat_ticks = Vec::new();
    for tick in 1..=120 {
        n.tick();
        if tick == 105 {
            n.propose(Bytes::from_static(b"x")).unwrap();
        }
        let out = cycle(&mut n);
        for m in &out.messages {
            if let MessageBody::Heartbeat { read_round, .. } = m.body {
                if m.to == 2 {
                    heartbeat_ticks.push(tick);
                }
                n.step(msg(
                    m.to,
                    1,
                    1,
                    MessageBody::HeartbeatResponse { read_round },
                ))
                .unwrap();
            }
        }
        assert_eq!(n.role(), Role::Leader);
    }
    assert_eq!(
        heartbeat_ticks,
        vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 115]
    );
}

// ----- read index ---------------------------------------------------------------

// ReadIndex (thesis §6.4): a new leader without a committed entry of its term
// appends a Noop, and answers once it commits and a quorum confirms leadership.
#[test]
fn read_index_waits_for_commit_in_term_and_quorum() {
    let mut n = core_with(1, &[1, 2, 3], config(), persisted(1, None, log(&[1])));
    elect(&mut n, &[1, 2, 3]);
    cycle(&mut n);
    n.read_index(77).unwrap();
    assert_eq!(n.last_index(), 2);
    assert_eq!(n.entry(2).map(|e| e.kind), Some(EntryKind::Noop));
    assert_eq!(n.read_index(78), Ok(()), "a second read reuses the Noop");
    assert_eq!(n.last_index(), 2);
    cycle(&mut n);
    n.step(success(2, 1, 2, 2)).unwrap();
    assert_eq!(n.commit_index(), 2);
    let out = cycle(&mut n);
    assert!(out.reads.is_empty(), "needs a confirmation round first");
    let round = bodies_to(&out, 2)
        .into_iter()
        .find_map(|b| match b {
            MessageBody::Heartbeat { read_round, .. } => Some(read_round),
            _ => None,
        })
        .expect("confirmation heartbeat");
    n.step(msg(
        2,
        1,
        2,
        MessageBody::HeartbeatResponse {
            read_round: round - 1,
        },
    ))
    .unwrap();
    assert!(
        cycle(&mut n).reads.is_empty(),
        "an older round does not confirm"
    );
    n.step(msg(
        3,
        1,
        2,
        MessageBody::HeartbeatResponse { read_round: round },
    ))
    .unwrap();
    assert_eq!(
        cycle(&mut n).reads,
        vec![
            ReadState {
                context: 77,
                result: Ok(2)
            },
            ReadState {
                context: 78,
                result: Ok(2)
            }
        ]
    );
}

// ReadIndex: a leader that loses leadership fails its pending reads; a
// follower refuses reads with a leader hint.
#[test]
fn read_index_fails_when_leadership_is_lost() {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    n.read_index(5).unwrap();
    cycle(&mut n);
    n.step(msg(2, 1, 9, append((0, 0), vec![], 0))).unwrap();
    assert_eq!(
        cycle(&mut n).reads,
        vec![ReadState {
            context: 5,
            result: Err(ReadLost {
                leader_hint: Some(2)
            })
        }]
    );
    assert_eq!(
        n.read_index(6),
        Err(ReadIndexError::NotLeader {
            leader_hint: Some(2)
        })
    );
}

// ----- leadership transfer --------------------------------------------------

// Transfer (thesis §3.10): the leader refuses proposals, sends TimeoutNow once
// the target is caught up, and the target campaigns at once, bypassing
// pre-vote and other followers' leases.
#[test]
fn transfer_leader_hands_over_to_caught_up_target() {
    let mut leader = core(1, &[1, 2, 3]);
    elect(&mut leader, &[1, 2, 3]);
    leader.propose(Bytes::from_static(b"x")).unwrap();
    cycle(&mut leader);
    leader.transfer_leader(2).unwrap();
    assert_eq!(
        leader.propose(Bytes::new()),
        Err(ProposeError::TransferInProgress)
    );
    assert!(!bodies_to(&cycle(&mut leader), 2).contains(&MessageBody::TimeoutNow));
    leader.step(success(2, 1, 1, 1)).unwrap();
    let out = cycle(&mut leader);
    let sent = bodies_to(&out, 2);
    assert_eq!(
        sent.iter()
            .filter(|b| **b == MessageBody::TimeoutNow)
            .count(),
        1,
        "{sent:?}"
    );

    let config = Config {
        pre_vote: true,
        ..config()
    };
    let mut target = core_with(
        2,
        &[1, 2, 3],
        config.clone(),
        persisted(1, Some(1), log(&[1])),
    );
    target.step(msg(1, 2, 1, MessageBody::TimeoutNow)).unwrap();
    assert_eq!(target.role(), Role::Candidate);
    assert_eq!(target.term(), 2);
    let vote = cycle(&mut target).messages[0].clone();
    assert_eq!(
        vote.body,
        MessageBody::Vote {
            last_log_index: 1,
            last_log_term: 1,
            leadership_transfer: true
        }
    );
    // A follower inside its leader lease still grants a transfer vote.
    let mut other = core_with(3, &[1, 2, 3], config, persisted(1, Some(1), log(&[1])));
    other.step(msg(1, 3, 1, append((1, 1), vec![], 1))).unwrap();
    cycle(&mut other);
    other.step(Message { to: 3, ..vote }).unwrap();
    assert_eq!(
        cycle(&mut other).messages,
        vec![msg(3, 2, 2, MessageBody::VoteResponse { granted: true })]
    );
}

// Transfer: an unfinished transfer is abandoned after transfer_timeout_ticks.
#[test]
fn transfer_leader_times_out() {
    let mut n = core(1, &[1, 2, 3]);
    elect(&mut n, &[1, 2, 3]);
    assert_eq!(
        n.transfer_leader(9),
        Err(TransferError::UnknownNode { id: 9 })
    );
    n.transfer_leader(3).unwrap();
    for _ in 0..29 {
        n.tick();
    }
    assert_eq!(
        n.propose(Bytes::new()),
        Err(ProposeError::TransferInProgress)
    );
    // Keep the quorum alive so check-quorum does not interfere.
    n.step(msg(
        2,
        1,
        1,
        MessageBody::HeartbeatResponse { read_round: 0 },
    ))
    .unwrap();
    n.tick();
    assert!(n.propose(Bytes::new()).is_ok());
}

// ----- limits and bad input ---------------------------------------------------

// Every limit is validated; the defaults are valid and give ≤ 10 heartbeats/s at 10 ms ticks.
#[test]
fn config_validation() {
    let default = Config::default();
    assert_eq!(default.validate(), Ok(()));
    assert!(default.heartbeat_interval_ticks >= 10);
    assert!(default.pre_vote && default.check_quorum);
    let bad = |f: fn(&mut Config)| {
        let mut c = Config::default();
        f(&mut c);
        c.validate()
    };
    assert_eq!(
        bad(|c| c.heartbeat_interval_ticks = 0),
        Err(ConfigError::HeartbeatIntervalZero)
    );
    assert_eq!(
        bad(|c| c.election_timeout_ticks_min = 10),
        Err(ConfigError::ElectionTimeoutNotAboveHeartbeat {
            election_min: 10,
            heartbeat: 10
        })
    );
    assert_eq!(
        bad(|c| c.election_timeout_ticks_max = 30),
        Err(ConfigError::ElectionTimeoutRangeEmpty { min: 30, max: 30 })
    );
    assert_eq!(
        bad(|c| c.append_inflight_max = 0),
        Err(ConfigError::LimitZero {
            field: "append_inflight_max"
        })
    );
    assert!(matches!(
        bad(|c| c.entry_bytes_max = c.append_bytes_max + 1),
        Err(ConfigError::LimitOrder {
            smaller: "entry_bytes_max",
            ..
        })
    ));
    let error = RaftCore::new(
        1,
        &[1],
        Config {
            snapshot_chunk_bytes_max: 0,
            ..Config::default()
        },
        PersistedState::default(),
        ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap_err();
    assert!(matches!(
        error,
        NewError::Config(ConfigError::LimitZero { .. })
    ));
}

// Corrupted persisted state and bad membership are typed errors, not panics.
#[test]
fn restart_rejects_inconsistent_state() {
    let new = |voters: &[NodeId], state| {
        RaftCore::new(1, voters, config(), state, ChaCha8Rng::seed_from_u64(0)).map(|_| ())
    };
    assert_eq!(
        new(&[2, 3], PersistedState::default()),
        Err(NewError::SelfNotVoter { id: 1 })
    );
    assert_eq!(
        new(&[1, 2, 2], PersistedState::default()),
        Err(NewError::DuplicateVoter { id: 2 })
    );
    let gap = persisted(2, None, vec![entry(1, 1), entry(3, 1)]);
    assert!(matches!(
        new(&[1, 2, 3], gap),
        Err(NewError::PersistedState { .. })
    ));
    let future = persisted(1, None, log(&[1, 2]));
    assert!(matches!(
        new(&[1, 2, 3], future),
        Err(NewError::PersistedState { .. })
    ));
    let decreasing = persisted(3, None, log(&[2, 1]));
    assert!(matches!(
        new(&[1, 2, 3], decreasing),
        Err(NewError::PersistedState { .. })
    ));
}

// Malformed or misaddressed messages are typed errors and change nothing.
#[test]
fn malformed_messages_are_rejected() {
    let mut n = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1])));
    let before = (n.term(), n.last_index(), n.commit_index());
    let cases = [
        msg(1, 3, 1, append((1, 1), vec![], 0)),
        msg(9, 2, 1, append((1, 1), vec![], 0)),
        msg(1, 2, 1, append((1, 1), vec![entry(3, 1)], 0)),
        msg(1, 2, 1, append((1, 1), vec![entry(2, 5)], 0)),
        msg(
            1,
            2,
            1,
            MessageBody::InstallSnapshot {
                meta: SnapshotMeta {
                    last_included_index: 4,
                    last_included_term: 1,
                },
                total_bytes: 2 << 30,
                offset: 0,
                data: Bytes::new(),
                done: false,
            },
        ),
    ];
    for m in cases {
        assert!(n.step(m.clone()).is_err(), "accepted {m:?}");
        assert!(!n.has_ready());
    }
    assert_eq!(before, (n.term(), n.last_index(), n.commit_index()));
    // Terms and indexes no cluster reaches: `term + 1` at u64::MAX would wrap
    // to 0 and wedge every node that took the term.
    let huge = [
        msg(
            1,
            2,
            u64::MAX,
            MessageBody::Heartbeat {
                leader_commit: 0,
                read_round: 0,
            },
        ),
        msg(
            1,
            2,
            TERM_INDEX_MAX,
            MessageBody::Vote {
                last_log_index: 1,
                last_log_term: 1,
                leadership_transfer: false,
            },
        ),
        msg(1, 2, 2, append((TERM_INDEX_MAX, 1), vec![], 0)),
        msg(1, 2, 2, append((1, 1), vec![], u64::MAX)),
        msg(
            1,
            2,
            2,
            MessageBody::InstallSnapshot {
                meta: SnapshotMeta {
                    last_included_index: u64::MAX,
                    last_included_term: 1,
                },
                total_bytes: 1,
                offset: 0,
                data: Bytes::from_static(b"x"),
                done: true,
            },
        ),
    ];
    for m in huge {
        assert!(
            matches!(n.step(m.clone()), Err(StepError::Malformed { reason, .. }) if reason.contains("beyond")),
            "accepted {m:?}"
        );
        assert!(!n.has_ready());
    }
    assert_eq!(before, (n.term(), n.last_index(), n.commit_index()));
    // Just below the bound is a term like any other.
    let mut high = core_with(2, &[1, 2, 3], config(), persisted(1, None, log(&[1])));
    let term = TERM_INDEX_MAX - 1;
    high.step(msg(
        1,
        2,
        term,
        MessageBody::Heartbeat {
            leader_commit: 0,
            read_round: 0,
        },
    ))
    .expect("a high term");
    assert_eq!(high.term(), term);
    // A leader refuses responses about indexes it never sent.
    let mut leader = core_with(1, &[1, 2, 3], config(), persisted(1, None, log(&[1])));
    elect(&mut leader, &[1, 2, 3]);
    cycle(&mut leader);
    for outcome in [
        AppendOutcome::Success { match_index: 2 },
        AppendOutcome::Conflict {
            rejected_index: 9,
            conflict_index: 9,
            conflict_term: None,
        },
    ] {
        assert!(matches!(
            leader.step(msg(2, 1, 2, MessageBody::AppendResponse { outcome })),
            Err(StepError::Malformed { .. })
        ));
    }
    assert_eq!(leader.follower_progress(2), Some((0, 2)));
    // An append that would overwrite a committed entry is a protocol violation.
    n.step(msg(1, 2, 1, append((1, 1), vec![], 1))).unwrap();
    cycle(&mut n);
    assert_eq!(
        n.step(msg(1, 2, 2, append((0, 0), vec![entry(1, 2)], 1))),
        Err(StepError::CommittedConflict { from: 1, index: 1 })
    );
}

// Proposal limits: entry size and uncommitted bytes are bounded.
#[test]
fn proposal_limits() {
    let config = Config {
        entry_bytes_max: 4,
        uncommitted_bytes_max: 6,
        ..config()
    };
    let mut n = core_with(1, &[1, 2, 3], config, PersistedState::default());
    elect(&mut n, &[1, 2, 3]);
    assert_eq!(
        n.propose(Bytes::from_static(b"12345")),
        Err(ProposeError::EntryTooLarge { bytes: 5, max: 4 })
    );
    n.propose(Bytes::from_static(b"1234")).unwrap();
    assert_eq!(
        n.propose(Bytes::from_static(b"123")),
        Err(ProposeError::UncommittedFull { max: 6 })
    );
    cycle(&mut n);
    n.step(success(2, 1, 1, 1)).unwrap();
    assert_eq!(n.commit_index(), 1);
    n.propose(Bytes::from_static(b"123")).unwrap();
}

// Messages survive the driver's wire encoding (postcard) unchanged, and
// garbage bytes decode to an error rather than a panic.
#[test]
fn messages_round_trip_through_postcard() {
    let messages = [
        msg(1, 2, 3, append((4, 2), vec![entry(5, 3)], 4)),
        msg(
            2,
            1,
            3,
            MessageBody::AppendResponse {
                outcome: AppendOutcome::Conflict {
                    rejected_index: 4,
                    conflict_index: 2,
                    conflict_term: Some(1),
                },
            },
        ),
        msg(
            1,
            3,
            3,
            MessageBody::InstallSnapshot {
                meta: SnapshotMeta {
                    last_included_index: 9,
                    last_included_term: 2,
                },
                total_bytes: 3,
                offset: 0,
                data: Bytes::from_static(b"abc"),
                done: true,
            },
        ),
        msg(3, 1, 4, MessageBody::TimeoutNow),
    ];
    for m in messages {
        let bytes = postcard::to_allocvec(&m).expect("encode");
        let back: Message = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, m);
        assert!(postcard::from_bytes::<Message>(&bytes[..bytes.len() - 1]).is_err());
    }
}

// ----- asynchronous persistence --------------------------------------------

fn append_from(from: NodeId, term: u64, entries: Vec<Entry>) -> Message {
    msg(
        from,
        1,
        term,
        MessageBody::Append {
            prev_log_index: 0,
            prev_log_term: 0,
            entries,
            leader_commit: 0,
        },
    )
}

#[test]
fn async_persistence_counts_a_ready_only_while_its_entries_stand() {
    // Five voters: node 2 leads term 1, node 3 term 2, node 2 again term 3.
    let mut core = core(1, &[1, 2, 3, 4, 5]);
    // R1: (1,1) (2,1).
    core.step(append_from(2, 1, vec![entry(1, 1), entry(2, 1)]))
        .unwrap();
    let r1 = core.ready();
    assert_eq!(r1.entries.len(), 2);
    let t1 = core.advance_unpersisted(r1);
    assert_eq!(
        core.persisted_index(),
        0,
        "nothing counts before it is durable"
    );
    // R2: the leader of term 2 replaces them with (1,2).
    core.step(append_from(3, 2, vec![entry(1, 2)])).unwrap();
    let r2 = core.ready();
    assert_eq!(r2.log_truncate_from, Some(1));
    let t2 = core.advance_unpersisted(r2);
    // R3: the leader of term 3 brings (1,1) (2,1) back and adds (3,3).
    core.step(append_from(
        2,
        3,
        vec![entry(1, 1), entry(2, 1), entry(3, 3)],
    ))
    .unwrap();
    let r3 = core.ready();
    let t3 = core.advance_unpersisted(r3);
    // R1 and R2 are durable, R3 not: the disk holds [(1,2)] only, so the
    // equal (2,1) in the log now must not count.
    core.persisted(t1);
    core.persisted(t2);
    assert!(
        core.persisted_index() <= 1,
        "counts {} durable; the disk holds [(1, 2)]",
        core.persisted_index()
    );
    core.persisted(t3);
    assert_eq!(core.persisted_index(), 3);
}

#[test]
fn async_persistence_lets_a_leader_count_itself_only_once_durable() {
    let mut core = core(1, &[1, 2, 3]);
    elect(&mut core, &[1, 2, 3]);
    let (index, _) = core.propose(Bytes::from_static(b"x")).unwrap();
    let ready = core.ready();
    let token = core.advance_unpersisted(ready);
    // One follower has it: with the leader's own copy not yet durable, that
    // is one durable copy of three.
    core.step(success(2, 1, core.term(), index)).unwrap();
    assert!(
        core.commit_index() < index,
        "committed before a majority had it"
    );
    core.persisted(token);
    assert_eq!(core.commit_index(), index);
}

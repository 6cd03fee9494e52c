//! The Raft protocol state machine: roles, elections, replication, commit,
//! snapshots, read index and leadership transfer. Pure and deterministic:
//! it owns no clock (time is `tick()`), no I/O (output is a [`Ready`]) and no
//! global randomness (a seeded RNG is passed in).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tracing::{debug, info};

use super::config::Config;
use super::error::{
    NewError, ProposeError, ReadIndexError, SnapshotError, StepError, TransferError,
};
use super::log::{AppendCheck, RaftLog};
use super::message::{AppendOutcome, Message, MessageBody};
use super::progress::{Progress, ProgressState};
use super::ready::{ReadLost, ReadState, Ready};
use super::types::{Entry, EntryKind, HardState, PersistedState, Snapshot, SnapshotMeta};
use crate::NodeId;

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks for pre-votes before starting an election (term unchanged).
    PreCandidate,
    /// Asks for votes in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// A read-index request waiting for a quorum to confirm the leadership.
#[derive(Debug)]
struct PendingRead {
    context: u64,
    index: u64,
    round: u64,
}

/// A leadership transfer in progress.
#[derive(Debug)]
struct Transfer {
    to: NodeId,
    elapsed_ticks: u64,
    timeout_now_sent: bool,
}

/// A snapshot being received chunk by chunk from a leader.
#[derive(Debug)]
struct IncomingSnapshot {
    term: u64,
    meta: SnapshotMeta,
    total_bytes: u64,
    data: Vec<u8>,
}

/// What [`RaftCore::advance_unpersisted`] returns: the end of the log when
/// the `Ready` was taken, to hand back to [`RaftCore::persisted`] once the
/// `Ready` is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "hand the token to RaftCore::persisted once the Ready is durable"]
pub struct PersistToken {
    index: u64,
    term: u64,
    /// The log's removal count then (see `RaftLog::rewrites`).
    rewrites: u64,
}

/// The Raft protocol core of one node. See the [module docs](crate::raft)
/// for the driving loop and [`Ready`] for the durability contract.
#[derive(Debug)]
pub struct RaftCore {
    id: NodeId,
    voters: Vec<NodeId>,
    config: Config,
    rng: ChaCha8Rng,

    term: u64,
    voted_for: Option<NodeId>,
    role: Role,
    leader: Option<NodeId>,
    log: RaftLog,

    /// Follower/candidate: ticks since the leader was last heard or the
    /// election started. Leader: ticks since the last check-quorum round.
    election_elapsed: u64,
    election_timeout: u64,
    votes: BTreeMap<NodeId, bool>,

    progress: BTreeMap<NodeId, Progress>,
    broadcast_pending: bool,
    uncommitted_bytes: u64,
    transfer: Option<Transfer>,
    read_round: u64,
    read_round_fresh: bool,
    pending_reads: VecDeque<PendingRead>,
    reads_awaiting_commit: Vec<u64>,

    incoming_snapshot: Option<IncomingSnapshot>,

    outbox: Vec<Message>,
    read_states: Vec<ReadState>,
    hard_state_handed: HardState,
    ready_number: u64,
    /// (number, last index) of the Ready handed out and not yet advanced.
    pending_ready: Option<(u64, u64)>,
}

impl RaftCore {
    /// Builds the core of node `id` in a cluster of `voters`, from what the
    /// node persisted (`PersistedState::default()` for a brand-new node).
    ///
    /// On restart the core starts as a follower in the persisted term with the
    /// persisted vote; commit and applied indexes start at the snapshot's
    /// index, and the first [`Ready`] hands the snapshot to the service
    /// (`snapshot_to_apply`). Committed entries after it are re-applied as the
    /// commit index is learned again.
    pub fn new(
        id: NodeId,
        voters: &[NodeId],
        config: Config,
        persisted: PersistedState,
        rng: ChaCha8Rng,
    ) -> Result<Self, NewError> {
        config.validate()?;
        let mut sorted = voters.to_vec();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(NewError::DuplicateVoter { id: pair[0] });
        }
        if !sorted.contains(&id) {
            return Err(NewError::SelfNotVoter { id });
        }
        validate_persisted(&persisted, &sorted)?;
        let PersistedState {
            hard_state,
            snapshot,
            entries,
        } = persisted;
        let snapshot = snapshot.filter(|s| s.meta.last_included_index > 0);
        let mut core = RaftCore {
            id,
            voters: sorted,
            config,
            rng,
            term: hard_state.term,
            voted_for: hard_state.voted_for,
            role: Role::Follower,
            leader: None,
            log: RaftLog::restore(snapshot, entries),
            election_elapsed: 0,
            election_timeout: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            broadcast_pending: false,
            uncommitted_bytes: 0,
            transfer: None,
            read_round: 0,
            read_round_fresh: false,
            pending_reads: VecDeque::new(),
            reads_awaiting_commit: Vec::new(),
            incoming_snapshot: None,
            outbox: Vec::new(),
            read_states: Vec::new(),
            hard_state_handed: hard_state,
            ready_number: 0,
            pending_ready: None,
        };
        core.reset_election_timer();
        core.assert_invariants();
        Ok(core)
    }

    // ----- observers -------------------------------------------------------

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The voters of the cluster, sorted.
    pub fn voters(&self) -> &[NodeId] {
        &self.voters
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Vote cast in the current term.
    pub fn voted_for(&self) -> Option<NodeId> {
        self.voted_for
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True when this node is the leader of its current term.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// The leader of the current term, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Highest index known committed.
    pub fn commit_index(&self) -> u64 {
        self.log.committed()
    }

    /// Highest index handed to the service for applying.
    pub fn applied_index(&self) -> u64 {
        self.log.applied()
    }

    /// Index of the last log entry (or of the snapshot when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }

    /// The last index this node counts as durable on its own disk (what a
    /// leader counts toward commit for itself).
    pub fn persisted_index(&self) -> u64 {
        self.log.persisted_last()
    }

    /// Where the latest snapshot sits.
    pub fn snapshot_meta(&self) -> SnapshotMeta {
        self.log.snapshot().meta
    }

    /// Term of the entry at `index`, if the log still holds it (the snapshot's
    /// last included index counts).
    pub fn entry_term(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }

    /// The entry at `index`, if the log holds it (not compacted, not beyond the end).
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        self.log.entry(index)
    }

    /// The leader's view of a follower: (match index, next index). None on a
    /// non-leader or for an unknown peer.
    pub fn follower_progress(&self, peer: NodeId) -> Option<(u64, u64)> {
        self.progress
            .get(&peer)
            .map(|p| (p.match_index, p.next_index))
    }

    // ----- inputs ----------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.assert_no_pending_ready();
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.election_timeout {
                self.campaign(false);
            }
        }
        self.assert_invariants();
    }

    /// Proposes a command. On the leader, returns the index and term the
    /// entry will have if it commits; the service learns the outcome when an
    /// entry at that index is applied (same term: committed; other term: lost).
    pub fn propose(&mut self, data: Bytes) -> Result<(u64, u64), ProposeError> {
        self.assert_no_pending_ready();
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if self.transfer.is_some() {
            return Err(ProposeError::TransferInProgress);
        }
        let bytes = data.len() as u64;
        if bytes > self.config.entry_bytes_max {
            return Err(ProposeError::EntryTooLarge {
                bytes,
                max: self.config.entry_bytes_max,
            });
        }
        if self.uncommitted_bytes + bytes > self.config.uncommitted_bytes_max {
            return Err(ProposeError::UncommittedFull {
                max: self.config.uncommitted_bytes_max,
            });
        }
        let index = self.append_as_leader(EntryKind::Normal, data);
        self.assert_invariants();
        Ok((index, self.term))
    }

    /// Asks for a linearizable read (ReadIndex, §6.4 of the thesis). On the
    /// leader the request is queued; its [`ReadState`] appears in a later
    /// [`Ready`] once a quorum has confirmed this node still leads, with the
    /// commit index the service must have applied before serving the read.
    ///
    /// A leader may only answer once it has committed an entry of its own
    /// term. Because elections do not append an entry (so that the first
    /// proposals land at indexes 1, 2, 3), a leader that has none appends a
    /// `Noop` entry now and answers once it commits.
    pub fn read_index(&mut self, context: u64) -> Result<(), ReadIndexError> {
        self.assert_no_pending_ready();
        if self.role != Role::Leader {
            return Err(ReadIndexError::NotLeader {
                leader_hint: self.leader,
            });
        }
        let pending = self.pending_reads.len() + self.reads_awaiting_commit.len();
        if pending >= self.config.read_index_pending_max {
            return Err(ReadIndexError::TooManyPending {
                max: self.config.read_index_pending_max,
            });
        }
        if self.committed_in_current_term() {
            self.register_read(context);
        } else {
            if self.log.last_term() != self.term {
                self.append_as_leader(EntryKind::Noop, Bytes::new());
            }
            self.reads_awaiting_commit.push(context);
        }
        self.assert_invariants();
        Ok(())
    }

    /// Hands leadership to `to` (§3.10 of the thesis): the leader stops
    /// accepting proposals, brings `to` up to date and tells it to campaign
    /// at once (TimeoutNow). Abandoned after `transfer_timeout_ticks`.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), TransferError> {
        self.assert_no_pending_ready();
        if self.role != Role::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader,
            });
        }
        if !self.voters.contains(&to) {
            return Err(TransferError::UnknownNode { id: to });
        }
        if to == self.id || self.transfer.as_ref().is_some_and(|t| t.to == to) {
            return Ok(());
        }
        info!(
            id = self.id,
            term = self.term,
            to,
            "leadership transfer started"
        );
        self.transfer = Some(Transfer {
            to,
            elapsed_ticks: 0,
            timeout_now_sent: false,
        });
        self.maybe_send_timeout_now(to);
        if self.transfer.as_ref().is_some_and(|t| !t.timeout_now_sent) {
            self.send_append(to, true);
        }
        self.assert_invariants();
        Ok(())
    }

    /// The service has made a snapshot of its state covering every entry up
    /// to `index` (which it has applied). The core keeps it (to send to
    /// lagging followers), drops the entries it covers, and hands it to the
    /// driver to persist in the next [`Ready::snapshot`] together with the
    /// log truncation.
    pub fn snapshot(&mut self, index: u64, data: Bytes) -> Result<(), SnapshotError> {
        self.assert_no_pending_ready();
        let snapshot_index = self.log.offset();
        if index <= snapshot_index {
            return Err(SnapshotError::Stale {
                index,
                snapshot_index,
            });
        }
        if index > self.log.applied() {
            return Err(SnapshotError::NotApplied {
                index,
                applied: self.log.applied(),
            });
        }
        let bytes = data.len() as u64;
        if bytes > self.config.snapshot_bytes_max {
            return Err(SnapshotError::TooLarge {
                bytes,
                max: self.config.snapshot_bytes_max,
            });
        }
        self.log.compact(index, data);
        debug!(id = self.id, index, "log compacted by service snapshot");
        self.assert_invariants();
        Ok(())
    }

    /// Feeds a message received from a peer. A misaddressed or malformed
    /// message ([`StepError::WrongRecipient`], [`StepError::UnknownSender`],
    /// [`StepError::Malformed`]) is dropped without effect. A message that
    /// proves another node broke the protocol ([`StepError::CommittedConflict`],
    /// [`StepError::SecondLeader`]) is refused after its term was taken into
    /// account. The driver logs errors and carries on.
    pub fn step(&mut self, message: Message) -> Result<(), StepError> {
        self.assert_no_pending_ready();
        let result = self.step_inner(message);
        self.assert_invariants();
        result
    }

    /// True when [`ready`](Self::ready) would return work.
    pub fn has_ready(&self) -> bool {
        if self.pending_ready.is_some() {
            return false;
        }
        if self.role == Role::Leader && self.broadcast_pending && !self.progress.is_empty() {
            return true;
        }
        self.hard_state() != self.hard_state_handed
            || self.log.has_unpersisted()
            || self.log.has_unapplied()
            || !self.outbox.is_empty()
            || !self.read_states.is_empty()
    }

    /// Collects the work accumulated since the last call. Follow the contract
    /// in [`Ready`], then call [`advance`](Self::advance).
    pub fn ready(&mut self) -> Ready {
        self.assert_no_pending_ready();
        if self.role == Role::Leader && self.broadcast_pending {
            self.broadcast_append();
        }
        self.broadcast_pending = false;
        self.read_round_fresh = false;
        let hard_state = self.hard_state();
        let hard_state = (hard_state != self.hard_state_handed).then(|| {
            self.hard_state_handed = hard_state;
            hard_state
        });
        let (snapshot, log_truncate_from, entries) = self.log.take_unpersisted();
        let (snapshot_to_apply, committed_entries) =
            self.log.take_unapplied(self.config.apply_batch_bytes_max);
        self.ready_number += 1;
        self.pending_ready = Some((self.ready_number, self.log.last_index()));
        self.assert_invariants();
        Ready {
            number: self.ready_number,
            hard_state,
            snapshot,
            log_truncate_from,
            entries,
            messages: std::mem::take(&mut self.outbox),
            snapshot_to_apply,
            committed_entries,
            read_states: std::mem::take(&mut self.read_states),
        }
    }

    /// Acknowledges that `ready` has been persisted (and its messages sent
    /// and its entries applied). The leader counts its own now-durable
    /// entries toward commit here.
    pub fn advance(&mut self, ready: Ready) {
        let (number, last_index) = self
            .pending_ready
            .take()
            .expect("advance() without a pending ready()");
        assert_eq!(number, ready.number, "advance() with a different Ready");
        self.log.persisted_to(last_index);
        if self.role == Role::Leader {
            self.maybe_commit();
        }
        self.assert_invariants();
    }

    /// Like [`advance`](Self::advance), for a driver that persists `ready`
    /// in the background and goes on taking inputs and `Ready`s meanwhile
    /// (etcd's asynchronous storage writes). Everything of the contract
    /// holds except that step (1) may still be running: the driver must
    /// persist `Ready`s in the order it took them, hold back the messages of
    /// step (2) until this one is durable, and then hand the returned token
    /// to [`persisted`](Self::persisted). Until then this node does not
    /// count the Ready's entries as its own durable copies (a leader does not
    /// count itself toward their commit).
    pub fn advance_unpersisted(&mut self, ready: Ready) -> PersistToken {
        let (number, last_index) = self
            .pending_ready
            .take()
            .expect("advance() without a pending ready()");
        assert_eq!(number, ready.number, "advance() with a different Ready");
        let token = PersistToken {
            index: last_index,
            term: self.log.term(last_index).unwrap_or(0),
            rewrites: self.log.rewrites(),
        };
        self.assert_invariants();
        token
    }

    /// The `Ready` that [`advance_unpersisted`](Self::advance_unpersisted)
    /// returned `token` for is durable (and so is every earlier one). Counts
    /// its entries as durable unless entries were removed from the log since
    /// it was taken (a conflicting append or a snapshot replaced them, maybe
    /// with equal ones again: the later `Ready`s that wrote the replacements
    /// bring their own tokens).
    pub fn persisted(&mut self, token: PersistToken) {
        self.assert_no_pending_ready();
        let still_there = token.rewrites == self.log.rewrites()
            && token.index <= self.log.last_index()
            && self.log.term(token.index) == Some(token.term);
        if still_there && token.index > self.log.persisted_last() {
            self.log.persisted_to(token.index);
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
        self.assert_invariants();
    }

    // ----- message handling ----------------------------------------------

    fn step_inner(&mut self, m: Message) -> Result<(), StepError> {
        if m.to != self.id {
            return Err(StepError::WrongRecipient {
                to: m.to,
                id: self.id,
            });
        }
        if m.from == self.id || !self.voters.contains(&m.from) {
            return Err(StepError::UnknownSender { from: m.from });
        }
        self.validate(&m)?;

        if m.term > self.term {
            if let MessageBody::PreVote { .. } | MessageBody::Vote { .. } = m.body {
                let forced = matches!(
                    m.body,
                    MessageBody::Vote {
                        leadership_transfer: true,
                        ..
                    }
                );
                let in_lease = self.config.check_quorum
                    && self.leader.is_some()
                    && self.election_elapsed < self.config.election_timeout_ticks_min;
                if !forced && in_lease {
                    debug!(
                        id = self.id,
                        from = m.from,
                        "vote request ignored: leader lease"
                    );
                    return Ok(());
                }
            }
            match m.body {
                // A pre-vote does not change anyone's term; a granted pre-vote
                // response carries the term we would campaign in.
                MessageBody::PreVote { .. } => {}
                MessageBody::PreVoteResponse { granted: true } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    self.become_follower(m.term, Some(m.from));
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                // A stale leader (e.g. back from a partition) must learn the
                // new term, or with pre-vote and check-quorum it could linger.
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::InstallSnapshot { .. } => {
                    self.send(m.from, MessageBody::HeartbeatResponse { read_round: 0 });
                }
                MessageBody::PreVote { .. } => {
                    self.send(m.from, MessageBody::PreVoteResponse { granted: false });
                }
                _ => {}
            }
            return Ok(());
        }

        match m.body {
            MessageBody::PreVote {
                last_log_index,
                last_log_term,
            } => self.handle_vote_request(m.from, m.term, true, last_log_index, last_log_term),
            MessageBody::Vote {
                last_log_index,
                last_log_term,
                ..
            } => self.handle_vote_request(m.from, m.term, false, last_log_index, last_log_term),
            MessageBody::PreVoteResponse { granted } => {
                if self.role == Role::PreCandidate {
                    self.tally_vote(m.from, granted);
                }
            }
            MessageBody::VoteResponse { granted } => {
                if self.role == Role::Candidate && m.term == self.term {
                    self.tally_vote(m.from, granted);
                }
            }
            MessageBody::Append {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
            } => {
                self.accept_leader(m.from)?;
                return self.handle_append(
                    m.from,
                    prev_log_index,
                    prev_log_term,
                    &entries,
                    leader_commit,
                );
            }
            MessageBody::Heartbeat {
                leader_commit,
                read_round,
            } => {
                self.accept_leader(m.from)?;
                let commit = leader_commit.min(self.log.last_index());
                self.log.commit_to(commit);
                self.send(m.from, MessageBody::HeartbeatResponse { read_round });
            }
            MessageBody::InstallSnapshot {
                meta,
                total_bytes,
                offset,
                data,
                done,
            } => {
                self.accept_leader(m.from)?;
                self.handle_install_snapshot(m.from, m.term, meta, total_bytes, offset, data, done);
            }
            MessageBody::AppendResponse { outcome } => {
                if self.role == Role::Leader {
                    return self.handle_append_response(m.from, outcome);
                }
            }
            MessageBody::HeartbeatResponse { read_round } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(m.from, read_round);
                }
            }
            MessageBody::InstallSnapshotResponse {
                last_included_index,
                next_offset,
                done,
            } => {
                if self.role == Role::Leader {
                    self.handle_snapshot_response(m.from, last_included_index, next_offset, done);
                }
            }
            MessageBody::TimeoutNow => {
                if self.role != Role::Leader {
                    info!(
                        id = self.id,
                        term = self.term,
                        "TimeoutNow: campaigning for transfer"
                    );
                    self.campaign(true);
                }
            }
        }
        Ok(())
    }

    /// Rejects messages that contradict themselves (bad input, not a bug here).
    fn validate(&self, m: &Message) -> Result<(), StepError> {
        let malformed = |kind: &'static str, reason: &'static str| StepError::Malformed {
            from: m.from,
            kind,
            reason,
        };
        if largest_number(m) >= TERM_INDEX_MAX {
            return Err(malformed(
                "any",
                "a term or index beyond any a cluster reaches",
            ));
        }
        match &m.body {
            MessageBody::PreVote { last_log_term, .. }
            | MessageBody::Vote { last_log_term, .. }
                if *last_log_term > m.term =>
            {
                return Err(malformed("vote", "last log term above message term"));
            }
            MessageBody::Append {
                prev_log_index,
                prev_log_term,
                entries,
                ..
            } => {
                if *prev_log_term > m.term {
                    return Err(malformed("append", "previous term above message term"));
                }
                if *prev_log_index == 0 && *prev_log_term != 0 {
                    return Err(malformed("append", "nonzero term at index 0"));
                }
                let mut term = *prev_log_term;
                for (k, entry) in entries.iter().enumerate() {
                    if entry.index != prev_log_index + 1 + k as u64 {
                        return Err(malformed("append", "entries not contiguous"));
                    }
                    if entry.term < term || entry.term > m.term {
                        return Err(malformed("append", "entry terms out of order"));
                    }
                    term = entry.term;
                }
            }
            MessageBody::InstallSnapshot {
                meta,
                total_bytes,
                offset,
                data,
                done,
            } => {
                if meta.last_included_index == 0 || meta.last_included_term == 0 {
                    return Err(malformed("snapshot", "empty snapshot position"));
                }
                if meta.last_included_term > m.term {
                    return Err(malformed("snapshot", "snapshot term above message term"));
                }
                if *total_bytes > self.config.snapshot_bytes_max {
                    return Err(malformed("snapshot", "larger than snapshot_bytes_max"));
                }
                let end = offset.checked_add(data.len() as u64);
                if end.is_none_or(|end| end > *total_bytes) {
                    return Err(malformed("snapshot", "chunk beyond total size"));
                }
                if *done != (end == Some(*total_bytes)) {
                    return Err(malformed("snapshot", "done flag disagrees with size"));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A message only a leader sends arrived at the current term.
    fn accept_leader(&mut self, from: NodeId) -> Result<(), StepError> {
        if self.role == Role::Leader {
            return Err(StepError::SecondLeader {
                from,
                term: self.term,
            });
        }
        if self.role != Role::Follower {
            self.become_follower(self.term, Some(from));
        }
        self.leader = Some(from);
        self.election_elapsed = 0;
        Ok(())
    }

    fn handle_vote_request(
        &mut self,
        from: NodeId,
        term: u64,
        pre_vote: bool,
        last_log_index: u64,
        last_log_term: u64,
    ) {
        let can_vote = self.voted_for == Some(from)
            || (self.voted_for.is_none() && self.leader.is_none())
            || (pre_vote && term > self.term);
        let up_to_date = self.log.is_up_to_date(last_log_index, last_log_term);
        let granted = can_vote && up_to_date;
        if pre_vote {
            let reply_term = if granted { term } else { self.term };
            self.send_with_term(from, reply_term, MessageBody::PreVoteResponse { granted });
            return;
        }
        if granted {
            // §5.2: at most one vote per term; persisted before the reply leaves.
            self.voted_for = Some(from);
            self.election_elapsed = 0;
        }
        self.send(from, MessageBody::VoteResponse { granted });
    }

    fn tally_vote(&mut self, from: NodeId, granted: bool) {
        self.votes.entry(from).or_insert(granted);
        let yes = self.votes.values().filter(|&&v| v).count();
        let no = self.votes.len() - yes;
        if yes >= self.quorum() {
            match self.role {
                Role::PreCandidate => self.become_candidate(false),
                Role::Candidate => self.become_leader(),
                _ => unreachable!("tally outside an election"),
            }
        } else if no >= self.quorum() {
            self.become_follower(self.term, None);
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        prev_log_index: u64,
        prev_log_term: u64,
        entries: &[Entry],
        leader_commit: u64,
    ) -> Result<(), StepError> {
        match self.log.try_append(prev_log_index, prev_log_term, entries) {
            AppendCheck::Matched { match_index } => {
                self.log.commit_to(leader_commit.min(match_index));
                self.send(
                    from,
                    MessageBody::AppendResponse {
                        outcome: AppendOutcome::Success { match_index },
                    },
                );
                Ok(())
            }
            AppendCheck::Conflict {
                conflict_index,
                conflict_term,
            } => {
                self.send(
                    from,
                    MessageBody::AppendResponse {
                        outcome: AppendOutcome::Conflict {
                            rejected_index: prev_log_index,
                            conflict_index,
                            conflict_term,
                        },
                    },
                );
                Ok(())
            }
            AppendCheck::CommittedConflict { index } => {
                Err(StepError::CommittedConflict { from, index })
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_install_snapshot(
        &mut self,
        from: NodeId,
        term: u64,
        meta: SnapshotMeta,
        total_bytes: u64,
        offset: u64,
        data: Bytes,
        done: bool,
    ) {
        let index = meta.last_included_index;
        let reply = |core: &mut Self, next_offset: u64, done: bool| {
            core.send(
                from,
                MessageBody::InstallSnapshotResponse {
                    last_included_index: index,
                    next_offset,
                    done,
                },
            );
        };
        if index <= self.log.committed() {
            // Everything the snapshot covers is already committed here.
            self.incoming_snapshot = None;
            reply(self, total_bytes, true);
            return;
        }
        if offset == 0 {
            self.incoming_snapshot = Some(IncomingSnapshot {
                term,
                meta,
                total_bytes,
                data: Vec::new(),
            });
        }
        let Some(incoming) = self.incoming_snapshot.as_mut() else {
            reply(self, 0, false);
            return;
        };
        let same =
            incoming.term == term && incoming.meta == meta && incoming.total_bytes == total_bytes;
        if !same {
            reply(self, 0, false);
            return;
        }
        if incoming.data.len() as u64 != offset {
            let expected = incoming.data.len() as u64;
            reply(self, expected, false);
            return;
        }
        incoming.data.extend_from_slice(&data);
        if !done {
            let expected = incoming.data.len() as u64;
            reply(self, expected, false);
            return;
        }
        let incoming = self.incoming_snapshot.take().expect("checked above");
        let snapshot = Snapshot {
            meta: incoming.meta,
            data: Bytes::from(incoming.data),
        };
        if self.log.install(snapshot) {
            info!(id = self.id, index, "installed snapshot from leader");
        }
        reply(self, total_bytes, true);
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        outcome: AppendOutcome,
    ) -> Result<(), StepError> {
        let last_index = self.log.last_index();
        match outcome {
            AppendOutcome::Success { match_index } => {
                if match_index > last_index {
                    return Err(StepError::Malformed {
                        from,
                        kind: "append response",
                        reason: "match index beyond the leader's log",
                    });
                }
                let pr = self.progress.get_mut(&from).expect("voter has progress");
                pr.recent_active = true;
                let updated = pr.update_match(match_index);
                match &pr.state {
                    ProgressState::Probe if match_index == pr.match_index => pr.become_replicate(),
                    ProgressState::Snapshot { snapshot, .. }
                        if pr.match_index >= snapshot.meta.last_included_index =>
                    {
                        pr.become_probe()
                    }
                    _ => {}
                }
                if updated {
                    self.maybe_commit();
                }
                self.maybe_send_timeout_now(from);
                while self.send_append(from, false) {
                    if self.progress[&from].state != ProgressState::Replicate {
                        break;
                    }
                }
            }
            AppendOutcome::Conflict {
                rejected_index,
                conflict_index,
                conflict_term,
            } => {
                if rejected_index == 0 || rejected_index > last_index {
                    return Err(StepError::Malformed {
                        from,
                        kind: "append response",
                        reason: "rejected index outside the leader's log",
                    });
                }
                // Fast backup: skip the follower's whole conflicting term.
                let hint = match conflict_term {
                    Some(term) => match self.log.last_index_with_term_at_most(term) {
                        Some(index) if self.log.term(index) == Some(term) => index + 1,
                        _ => conflict_index,
                    },
                    None => conflict_index,
                };
                let pr = self.progress.get_mut(&from).expect("voter has progress");
                pr.recent_active = true;
                if pr.back_off(rejected_index, hint.max(1)) {
                    debug!(id = self.id, to = from, next = pr.next_index, "backing off");
                    self.send_append(from, true);
                }
            }
        }
        Ok(())
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, read_round: u64) {
        let inflight_max = self.config.append_inflight_max;
        let last_index = self.log.last_index();
        let pr = self.progress.get_mut(&from).expect("voter has progress");
        pr.recent_active = true;
        pr.on_heartbeat_response(inflight_max);
        pr.read_round = pr.read_round.max(read_round);
        let behind =
            pr.match_index < last_index || matches!(pr.state, ProgressState::Snapshot { .. });
        if behind {
            self.send_append(from, true);
        }
        self.release_reads();
    }

    fn handle_snapshot_response(&mut self, from: NodeId, index: u64, next_offset: u64, done: bool) {
        let pr = self.progress.get_mut(&from).expect("voter has progress");
        pr.recent_active = true;
        if done {
            let updated = pr.update_match(index.min(self.log.last_index()));
            if let ProgressState::Snapshot { snapshot, .. } = &pr.state {
                if pr.match_index >= snapshot.meta.last_included_index {
                    pr.become_probe();
                }
            }
            if updated {
                self.maybe_commit();
            }
            self.send_append(from, true);
            return;
        }
        let chunk_max = self.config.snapshot_chunk_bytes_max;
        if let ProgressState::Snapshot { snapshot, offset } = &mut pr.state {
            let total = snapshot.data.len() as u64;
            if snapshot.meta.last_included_index != index || next_offset > total {
                return;
            }
            // Only the acknowledgement of the chunk last sent moves the
            // transfer on; answers to duplicates just record where the
            // follower is (a heartbeat response resends from there), so
            // duplicate chunks never multiply into parallel streams.
            let acknowledged = next_offset == (*offset + chunk_max).min(total);
            *offset = next_offset;
            if acknowledged {
                pr.paused = false;
                self.send_append(from, true);
            }
        }
    }

    // ----- leader machinery ----------------------------------------------

    fn tick_leader(&mut self) {
        self.election_elapsed += 1;
        if self.election_elapsed >= self.config.election_timeout_ticks_min {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                let active = 1 + self.progress.values().filter(|p| p.recent_active).count();
                for pr in self.progress.values_mut() {
                    pr.recent_active = false;
                }
                if active < self.quorum() {
                    info!(
                        id = self.id,
                        term = self.term,
                        "check quorum failed: stepping down"
                    );
                    self.become_follower(self.term, None);
                    return;
                }
            }
        }
        if let Some(transfer) = self.transfer.as_mut() {
            transfer.elapsed_ticks += 1;
            if transfer.elapsed_ticks >= self.config.transfer_timeout_ticks {
                info!(
                    id = self.id,
                    to = transfer.to,
                    "leadership transfer abandoned"
                );
                self.transfer = None;
            }
        }
        // Heartbeats go to idle peers, and to peers that have not heard of
        // a commit yet: the next tick tells them, unless an append (which
        // carries the commit index) goes out first.
        let interval = self.config.heartbeat_interval_ticks;
        let committed = self.log.committed();
        let due: Vec<NodeId> = self
            .progress
            .iter_mut()
            .filter_map(|(&id, pr)| {
                pr.idle_ticks += 1;
                (pr.idle_ticks >= interval || pr.lacks_commit(committed)).then_some(id)
            })
            .collect();
        for peer in due {
            self.send_heartbeat(peer);
        }
    }

    fn append_as_leader(&mut self, kind: EntryKind, data: Bytes) -> u64 {
        let index = self.log.last_index() + 1;
        self.uncommitted_bytes += data.len() as u64;
        self.log.append_new(Entry {
            index,
            term: self.term,
            kind,
            data,
        });
        self.broadcast_pending = true;
        index
    }

    /// Sends every follower what it lacks, pipelining up to the inflight bound.
    fn broadcast_append(&mut self) {
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for peer in peers {
            while self.send_append(peer, false) {
                if self.progress[&peer].state != ProgressState::Replicate {
                    break;
                }
            }
        }
    }

    /// Sends one append (or snapshot chunk) to `to` unless its flow is paused.
    /// Returns whether a message carrying entries or snapshot data was sent.
    fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let committed = self.log.committed();
        let last_index = self.log.last_index();
        let pr = self.progress.get_mut(&to).expect("voter has progress");
        if pr.is_paused(self.config.append_inflight_max) {
            return false;
        }
        if !matches!(pr.state, ProgressState::Snapshot { .. }) {
            let prev_log_index = pr.next_index - 1;
            match self.log.term(prev_log_index) {
                Some(prev_log_term) => {
                    let entries = if pr.next_index <= last_index {
                        self.log.entries_from(
                            pr.next_index,
                            self.config.append_entries_max,
                            self.config.append_bytes_max,
                        )
                    } else {
                        Vec::new()
                    };
                    if entries.is_empty() && !send_if_empty {
                        return false;
                    }
                    let last_sent = prev_log_index + entries.len() as u64;
                    pr.commit_sent = pr.commit_sent.max(committed.min(last_sent));
                    pr.idle_ticks = 0;
                    let carried = !entries.is_empty();
                    if carried {
                        pr.sent_entries(last_sent);
                    } else if pr.state == ProgressState::Probe {
                        pr.paused = true;
                    }
                    self.send(
                        to,
                        MessageBody::Append {
                            prev_log_index,
                            prev_log_term,
                            entries,
                            leader_commit: committed,
                        },
                    );
                    return carried;
                }
                None => {
                    assert!(
                        prev_log_index < self.log.offset(),
                        "next index {} beyond the log",
                        pr.next_index
                    );
                    debug!(id = self.id, to, "follower needs the snapshot");
                    pr.become_snapshot(self.log.snapshot().clone());
                }
            }
        }
        let ProgressState::Snapshot { snapshot, offset } = &pr.state else {
            unreachable!("snapshot state set above");
        };
        let total = snapshot.data.len() as u64;
        let end = (offset + self.config.snapshot_chunk_bytes_max).min(total);
        let body = MessageBody::InstallSnapshot {
            meta: snapshot.meta,
            total_bytes: total,
            offset: *offset,
            data: snapshot.data.slice(*offset as usize..end as usize),
            done: end == total,
        };
        pr.paused = true;
        pr.idle_ticks = 0;
        self.send(to, body);
        true
    }

    fn send_heartbeat(&mut self, to: NodeId) {
        let committed = self.log.committed();
        let read_round = self.read_round;
        let pr = self.progress.get_mut(&to).expect("voter has progress");
        let leader_commit = pr.match_index.min(committed);
        pr.commit_sent = pr.commit_sent.max(leader_commit);
        pr.idle_ticks = 0;
        self.send(
            to,
            MessageBody::Heartbeat {
                leader_commit,
                read_round,
            },
        );
    }

    /// §5.3/§5.4.2: commit the highest index stored on a quorum, but only
    /// if it belongs to the current term (earlier terms commit with it).
    fn maybe_commit(&mut self) -> bool {
        let mut matches: smallvec::SmallVec<[u64; 8]> =
            self.progress.values().map(|p| p.match_index).collect();
        matches.push(self.log.persisted_last());
        matches.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matches[self.quorum() - 1];
        let old = self.log.committed();
        if candidate <= old || self.log.term(candidate) != Some(self.term) {
            return false;
        }
        let committed_bytes: u64 = (old + 1..=candidate)
            .filter_map(|i| self.log.entry(i))
            .map(|e| e.data.len() as u64)
            .sum();
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(committed_bytes);
        self.log.commit_to(candidate);
        for context in std::mem::take(&mut self.reads_awaiting_commit) {
            self.register_read(context);
        }
        true
    }

    fn committed_in_current_term(&self) -> bool {
        self.log.term(self.log.committed()) == Some(self.term)
    }

    fn register_read(&mut self, context: u64) {
        let index = self.log.committed();
        if self.voters.len() == 1 {
            self.read_states.push(ReadState {
                context,
                result: Ok(index),
            });
            return;
        }
        if !self.read_round_fresh {
            // Start a new confirmation round: only acknowledgements of
            // heartbeats sent after this request prove leadership for it.
            self.read_round += 1;
            self.read_round_fresh = true;
            let peers: Vec<NodeId> = self.progress.keys().copied().collect();
            for peer in peers {
                self.send_heartbeat(peer);
            }
        }
        self.pending_reads.push_back(PendingRead {
            context,
            index,
            round: self.read_round,
        });
    }

    fn release_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        let mut rounds: Vec<u64> = self.progress.values().map(|p| p.read_round).collect();
        rounds.push(self.read_round);
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        let confirmed = rounds[self.quorum() - 1];
        while self
            .pending_reads
            .front()
            .is_some_and(|r| r.round <= confirmed)
        {
            let read = self.pending_reads.pop_front().expect("checked");
            self.read_states.push(ReadState {
                context: read.context,
                result: Ok(read.index),
            });
        }
    }

    fn maybe_send_timeout_now(&mut self, peer: NodeId) {
        let last_index = self.log.last_index();
        let ready = match self.transfer.as_ref() {
            Some(t) => t.to == peer && !t.timeout_now_sent,
            None => false,
        };
        if ready && self.progress[&peer].match_index == last_index {
            self.transfer.as_mut().expect("checked").timeout_now_sent = true;
            // The target first learns every commit it holds (links keep
            // order): as the new leader it then applies them at once, not
            // only after an entry of its own term commits.
            if self.progress[&peer].lacks_commit(self.log.committed()) {
                self.send_heartbeat(peer);
            }
            self.send(peer, MessageBody::TimeoutNow);
        }
    }

    // ----- role changes --------------------------------------------------

    fn campaign(&mut self, transfer: bool) {
        if self.config.pre_vote && !transfer {
            self.become_pre_candidate();
        } else {
            self.become_candidate(transfer);
        }
    }

    fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        assert!(term >= self.term, "term went backwards");
        if term > self.term {
            self.term = term;
            self.voted_for = None;
        }
        if self.role == Role::Leader {
            self.drop_leader_state(leader);
        }
        if self.role != Role::Follower || leader.is_some() {
            debug!(id = self.id, term, ?leader, "becoming follower");
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.votes.clear();
        self.reset_election_timer();
    }

    fn become_pre_candidate(&mut self) {
        debug!(id = self.id, term = self.term, "starting pre-vote");
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.id, true);
        self.reset_election_timer();
        if self.quorum() == 1 {
            self.become_candidate(false);
            return;
        }
        let body = MessageBody::PreVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
        };
        for peer in self.peers() {
            self.send_with_term(peer, self.term + 1, body.clone());
        }
    }

    fn become_candidate(&mut self, transfer: bool) {
        self.term += 1;
        self.voted_for = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.id, true);
        self.reset_election_timer();
        debug!(id = self.id, term = self.term, "starting election");
        if self.quorum() == 1 {
            self.become_leader();
            return;
        }
        let body = MessageBody::Vote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
            leadership_transfer: transfer,
        };
        for peer in self.peers() {
            self.send(peer, body.clone());
        }
    }

    fn become_leader(&mut self) {
        assert_eq!(
            self.role,
            Role::Candidate,
            "only a candidate becomes leader"
        );
        assert_eq!(self.voted_for, Some(self.id), "a leader voted for itself");
        info!(id = self.id, term = self.term, "became leader");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        self.votes.clear();
        self.election_elapsed = 0;
        self.uncommitted_bytes = 0;
        self.read_round = 0;
        self.read_round_fresh = false;
        self.incoming_snapshot = None;
        let next = self.log.last_index() + 1;
        self.progress = self
            .peers()
            .into_iter()
            .map(|p| (p, Progress::new(next)))
            .collect();
        // No entry is appended: announce leadership with empty probes.
        for peer in self.peers() {
            self.send_append(peer, true);
        }
        self.maybe_commit();
    }

    fn drop_leader_state(&mut self, leader_hint: Option<NodeId>) {
        self.progress.clear();
        self.transfer = None;
        self.broadcast_pending = false;
        let lost = ReadLost { leader_hint };
        let contexts: Vec<u64> = self
            .reads_awaiting_commit
            .drain(..)
            .chain(self.pending_reads.drain(..).map(|r| r.context))
            .collect();
        for context in contexts {
            self.read_states.push(ReadState {
                context,
                result: Err(lost),
            });
        }
    }

    // ----- helpers -------------------------------------------------------

    fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        self.election_timeout = self.rng.random_range(
            self.config.election_timeout_ticks_min..self.config.election_timeout_ticks_max,
        );
    }

    fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    fn peers(&self) -> Vec<NodeId> {
        self.voters
            .iter()
            .copied()
            .filter(|&v| v != self.id)
            .collect()
    }

    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            voted_for: self.voted_for,
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_with_term(to, self.term, body);
    }

    fn send_with_term(&mut self, to: NodeId, term: u64, body: MessageBody) {
        self.outbox.push(Message {
            from: self.id,
            to,
            term,
            body,
        });
    }

    fn assert_no_pending_ready(&self) {
        assert!(
            self.pending_ready.is_none(),
            "input to the Raft core between ready() and advance()"
        );
    }

    fn assert_invariants(&self) {
        self.log.assert_invariants();
        assert!(
            self.log.last_term() <= self.term,
            "last log term {} above current term {}",
            self.log.last_term(),
            self.term
        );
        match self.role {
            Role::Leader => {
                assert_eq!(self.leader, Some(self.id), "leader does not know itself");
                assert_eq!(
                    self.voted_for,
                    Some(self.id),
                    "leader did not vote for itself"
                );
                assert_eq!(
                    self.progress.len(),
                    self.voters.len() - 1,
                    "progress per peer"
                );
            }
            _ => {
                assert!(self.progress.is_empty(), "non-leader keeps progress");
                assert!(self.pending_reads.is_empty(), "non-leader keeps reads");
            }
        }
        if self.role == Role::Candidate {
            assert_eq!(
                self.voted_for,
                Some(self.id),
                "candidate did not vote for itself"
            );
        }
    }
}

/// Terms and log indexes from here on are refused in messages: no cluster
/// gets near them (2^62 elections or entries), and the arithmetic on them
/// (`term + 1`, `index + 1`) must never wrap, whatever a peer sends.
pub const TERM_INDEX_MAX: u64 = 1 << 62;

/// The largest term or log index a message carries (its entries' indexes
/// through the last one's; their terms are checked against the message's).
fn largest_number(m: &Message) -> u64 {
    let body = match &m.body {
        MessageBody::PreVote {
            last_log_index,
            last_log_term,
        }
        | MessageBody::Vote {
            last_log_index,
            last_log_term,
            ..
        } => (*last_log_index).max(*last_log_term),
        MessageBody::Append {
            prev_log_index,
            prev_log_term,
            entries,
            leader_commit,
        } => prev_log_index
            .saturating_add(entries.len() as u64)
            .max(*prev_log_term)
            .max(*leader_commit),
        MessageBody::AppendResponse { outcome } => match outcome {
            AppendOutcome::Success { match_index } => *match_index,
            AppendOutcome::Conflict {
                rejected_index,
                conflict_index,
                conflict_term,
            } => (*rejected_index)
                .max(*conflict_index)
                .max(conflict_term.unwrap_or(0)),
        },
        MessageBody::Heartbeat { leader_commit, .. } => *leader_commit,
        MessageBody::InstallSnapshot { meta, .. } => {
            meta.last_included_index.max(meta.last_included_term)
        }
        MessageBody::InstallSnapshotResponse {
            last_included_index,
            ..
        } => *last_included_index,
        MessageBody::PreVoteResponse { .. }
        | MessageBody::VoteResponse { .. }
        | MessageBody::HeartbeatResponse { .. }
        | MessageBody::TimeoutNow => 0,
    };
    body.max(m.term)
}

/// Checks that a persisted state is internally consistent (storage corruption
/// or a driver bug must not silently become a Raft safety violation).
fn validate_persisted(persisted: &PersistedState, voters: &[NodeId]) -> Result<(), NewError> {
    let bad = |reason: String| Err(NewError::PersistedState { reason });
    let hard_state = persisted.hard_state;
    if let Some(vote) = hard_state.voted_for {
        if !voters.contains(&vote) {
            return bad(format!("voted for unknown node {vote}"));
        }
    }
    let (mut index, mut term) = match &persisted.snapshot {
        Some(s) => (s.meta.last_included_index, s.meta.last_included_term),
        None => (0, 0),
    };
    if (index == 0) != (term == 0) {
        return bad(format!("snapshot at index {index} with term {term}"));
    }
    if term > hard_state.term {
        return bad(format!(
            "snapshot term {term} above current term {}",
            hard_state.term
        ));
    }
    for entry in &persisted.entries {
        if entry.index != index + 1 {
            return bad(format!("entry {} follows index {index}", entry.index));
        }
        if entry.term < term || entry.term == 0 || entry.term > hard_state.term {
            return bad(format!(
                "entry {} has term {} (previous {term}, current {})",
                entry.index, entry.term, hard_state.term
            ));
        }
        index = entry.index;
        term = entry.term;
    }
    Ok(())
}

//! The simulated network's shared state and its control surface for tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::NodeId;
use crate::net::Kind;
use crate::net::dispatch::Dispatch;
use crate::net::endpoint::Endpoint;
use crate::net::sim::node::SimNode;
use crate::net::transport::MessageRole;

/// Ids handed out by [`SimNetwork::add_client`] start here, far above any
/// server id a test would pick.
pub const CLIENT_ID_BASE: NodeId = 1 << 62;

/// Configuration of a simulated network.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of the generator behind every random choice of the network.
    pub seed: u64,
    /// Default timeout of a call when the caller gives none. `None` (the
    /// default) waits for the network's own verdict, like the reference.
    pub call_timeout: Option<Duration>,
    /// One-way messages waiting on one directed link; more are dropped.
    pub link_queue_messages_max: usize,
    /// Events kept by [`SimNetwork::trace`]; 0 (the default) records none.
    pub trace_events_max: usize,
}

impl SimConfig {
    /// The reference configuration with the given seed.
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            call_timeout: None,
            link_queue_messages_max: 10_000,
            trace_events_max: 0,
        }
    }
}

/// What happened to one request, reply or one-way message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOutcome {
    /// The link was disabled or the callee missing: the call reported no reply.
    CallUnreachable,
    /// The unreliable network dropped the request.
    RequestDropped,
    /// The request reached the callee's handler.
    Dispatched,
    /// The callee crashed or the link was cut while handling: reply suppressed.
    ReplySuppressed,
    /// The unreliable network dropped the reply.
    ReplyDropped,
    /// The reply (or the callee's refusal) reached the caller.
    ReplyDelivered,
    /// A one-way message was lost (cut link, missing node, drop, full link queue).
    MessageDropped,
    /// A one-way message was handed to the receiving node.
    MessageDelivered,
}

/// One entry of the network's trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimEvent {
    /// Time since the network was created.
    pub at: Duration,
    /// Sender.
    pub from: NodeId,
    /// Receiver.
    pub to: NodeId,
    /// Kind of the request or message.
    pub kind: Kind,
    /// What happened.
    pub outcome: SimOutcome,
}

/// One live (or dead) instance of a node: a crash kills it for good and a
/// restart creates a new one.
pub(super) struct Incarnation {
    pub(super) id: NodeId,
    pub(super) dispatch: Dispatch,
    pub(super) dead: CancellationToken,
}

/// A one-way message waiting on its link.
pub(super) struct QueuedMessage {
    pub(super) deliver_at: Instant,
    pub(super) target: Arc<Incarnation>,
    pub(super) kind: Kind,
    pub(super) payload: Bytes,
    pub(super) role: MessageRole,
}

/// The FIFO of one directed link. It exists only while messages wait on it;
/// exactly one pump task drains it while `pumping`.
pub(super) struct LinkQueue {
    pub(super) queue: VecDeque<QueuedMessage>,
    /// Delivery time of the last message queued; later ones never go earlier.
    pub(super) last_deliver_at: Instant,
    pub(super) pumping: bool,
}

/// How a call will go, decided when it is sent.
pub(super) enum CallPlan {
    /// Cut link or missing callee: report no reply after `wait`.
    Lost { wait: Duration },
    /// Reaches the callee (unless dropped).
    Deliver(Delivery),
}

/// The fate of a call that reaches the network.
pub(super) struct Delivery {
    pub(super) target: Arc<Incarnation>,
    pub(super) delay: Duration,
    pub(super) drop_request: bool,
    pub(super) drop_reply: bool,
    pub(super) reorder: Option<Duration>,
}

pub(super) struct State {
    rng: ChaCha8Rng,
    reliable: bool,
    long_reordering: bool,
    long_delays: bool,
    /// One-way messages are delivered like labrpc calls: each on its own
    /// delay, in no particular order (see `SimNetwork::set_unordered_messages`).
    unordered_messages: bool,
    /// Live incarnations.
    nodes: BTreeMap<NodeId, Arc<Incarnation>>,
    /// Every id ever added: the "all others" of `connect`/`disconnect`.
    known: BTreeSet<NodeId>,
    /// Disabled directed links; every other link is enabled.
    disabled: HashSet<(NodeId, NodeId)>,
    received: HashMap<NodeId, u64>,
    total_rpcs: u64,
    total_bytes: u64,
    next_client_id: NodeId,
    pub(super) links: HashMap<(NodeId, NodeId), LinkQueue>,
    trace: Vec<SimEvent>,
}

impl State {
    /// Counts a one-way message reaching node `to`: a request in the
    /// receiver's RPC count, a response in the bytes (like a delivered reply).
    pub(super) fn count_message(&mut self, to: NodeId, role: MessageRole, payload_bytes: usize) {
        match role {
            MessageRole::Request => *self.received.entry(to).or_default() += 1,
            MessageRole::Response => self.total_bytes += payload_bytes as u64,
        }
    }
}

pub(super) struct Shared {
    state: Mutex<State>,
    pub(super) runtime: Handle,
    pub(super) config: SimConfig,
    start: Instant,
}

/// What `send` must do once the state lock is released.
pub(super) enum SendAction {
    /// Nothing more (dropped, or queued behind a running pump).
    Done,
    /// Deliver to the target at once.
    DeliverNow(Arc<Incarnation>),
    /// Start the pump of this link.
    StartPump,
    /// Deliver on its own after `delay`, outside the link's FIFO (unordered
    /// messages).
    DeliverAfter {
        /// The receiving incarnation.
        target: Arc<Incarnation>,
        /// How long the message travels.
        delay: Duration,
    },
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any call
        // that could panic, so a poisoned lock can be used as is.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    pub(super) fn record(
        &self,
        state: &mut State,
        from: NodeId,
        to: NodeId,
        kind: Kind,
        outcome: SimOutcome,
    ) {
        if state.trace.len() < self.config.trace_events_max {
            let at = Instant::now().saturating_duration_since(self.start);
            state.trace.push(SimEvent {
                at,
                from,
                to,
                kind,
                outcome,
            });
        }
    }

    /// Counts the request, draws its fate (in the reference's order) and
    /// takes a snapshot of link and callee.
    pub(super) fn plan_call(&self, from: NodeId, to: NodeId, payload_bytes: usize) -> CallPlan {
        let mut state = self.lock();
        let state = &mut *state;
        state.total_rpcs += 1;
        state.total_bytes += payload_bytes as u64;
        let target = if state.disabled.contains(&(from, to)) {
            None
        } else {
            state.nodes.get(&to).cloned()
        };
        let Some(target) = target else {
            let wait_ms = if state.long_delays {
                state.rng.random_range(0..7000)
            } else {
                state.rng.random_range(0..100)
            };
            return CallPlan::Lost {
                wait: Duration::from_millis(wait_ms),
            };
        };
        let mut delivery = Delivery {
            target,
            delay: Duration::ZERO,
            drop_request: false,
            drop_reply: false,
            reorder: None,
        };
        if !state.reliable {
            delivery.delay = Duration::from_millis(state.rng.random_range(0..27));
            if state.rng.random_range(0..1000) < 100 {
                delivery.drop_request = true;
                return CallPlan::Deliver(delivery);
            }
        }
        if !state.reliable && state.rng.random_range(0..1000) < 100 {
            delivery.drop_reply = true;
        } else if state.long_reordering && state.rng.random_range(0..900) < 600 {
            let upper = 1 + state.rng.random_range(0..2000);
            let ms = 200 + state.rng.random_range(0..upper);
            delivery.reorder = Some(Duration::from_millis(ms));
        }
        CallPlan::Deliver(delivery)
    }

    /// Counts a one-way message (a request as one RPC with its bytes; a
    /// response's bytes only once delivered), draws its fate and queues it on
    /// its link.
    pub(super) fn plan_send(
        &self,
        from: NodeId,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        role: MessageRole,
    ) -> SendAction {
        let mut guard = self.lock();
        let state = &mut *guard;
        if role == MessageRole::Request {
            state.total_rpcs += 1;
            state.total_bytes += payload.len() as u64;
        }
        let target = if state.disabled.contains(&(from, to)) {
            None
        } else {
            state.nodes.get(&to).cloned()
        };
        let Some(target) = target else {
            self.record(state, from, to, kind, SimOutcome::MessageDropped);
            return SendAction::Done;
        };
        let mut delay = Duration::ZERO;
        if !state.reliable {
            delay = Duration::from_millis(state.rng.random_range(0..27));
            if state.rng.random_range(0..1000) < 100 {
                self.record(state, from, to, kind, SimOutcome::MessageDropped);
                return SendAction::Done;
            }
        }
        if state.unordered_messages {
            // Like a labrpc call: its own delay, and a response-like message
            // may be held back as a reply is under long reordering.
            if role == MessageRole::Response
                && state.long_reordering
                && state.rng.random_range(0..900) < 600
            {
                let upper = 1 + state.rng.random_range(0..2000);
                delay += Duration::from_millis(200 + state.rng.random_range(0..upper));
            }
            if delay.is_zero() {
                state.count_message(to, role, payload.len());
                self.record(state, from, to, kind, SimOutcome::MessageDelivered);
                return SendAction::DeliverNow(target);
            }
            return SendAction::DeliverAfter { target, delay };
        }
        let key = (from, to);
        if delay.is_zero()
            && self.config.link_queue_messages_max > 0
            && !state.links.contains_key(&key)
        {
            // Nothing queued on the link: due now, and nothing to overtake.
            state.count_message(to, role, payload.len());
            self.record(state, from, to, kind, SimOutcome::MessageDelivered);
            return SendAction::DeliverNow(target);
        }
        let now = Instant::now();
        let link = state.links.entry(key).or_insert_with(|| LinkQueue {
            queue: VecDeque::new(),
            last_deliver_at: now,
            pumping: false,
        });
        if link.queue.len() >= self.config.link_queue_messages_max {
            tracing::warn!(from, to, %kind, "simulated link queue full: one-way message dropped");
            self.record(state, from, to, kind, SimOutcome::MessageDropped);
            return SendAction::Done;
        }
        let deliver_at = (now + delay).max(link.last_deliver_at);
        link.last_deliver_at = deliver_at;
        if deliver_at <= now && link.queue.is_empty() && !link.pumping {
            state.links.remove(&key);
            state.count_message(to, role, payload.len());
            self.record(state, from, to, kind, SimOutcome::MessageDelivered);
            return SendAction::DeliverNow(target);
        }
        link.queue.push_back(QueuedMessage {
            deliver_at,
            target,
            kind,
            payload,
            role,
        });
        if link.pumping {
            SendAction::Done
        } else {
            link.pumping = true;
            SendAction::StartPump
        }
    }

    /// Counts a request reaching its handler.
    pub(super) fn count_received(&self, from: NodeId, to: NodeId, kind: Kind) {
        let mut state = self.lock();
        *state.received.entry(to).or_default() += 1;
        self.record(&mut state, from, to, kind, SimOutcome::Dispatched);
    }

    /// Counts a delivered reply's bytes.
    pub(super) fn count_reply(&self, from: NodeId, to: NodeId, kind: Kind, reply_bytes: usize) {
        let mut state = self.lock();
        state.total_bytes += reply_bytes as u64;
        self.record(&mut state, from, to, kind, SimOutcome::ReplyDelivered);
    }

    /// Records an outcome that changes no counter.
    pub(super) fn note(&self, from: NodeId, to: NodeId, kind: Kind, outcome: SimOutcome) {
        let mut state = self.lock();
        self.record(&mut state, from, to, kind, outcome);
    }

    /// The reference's "is the server dead" check after a handler returns:
    /// the callee was crashed (or replaced), or the caller's link to it cut.
    pub(super) fn reply_suppressed(&self, from: NodeId, target: &Arc<Incarnation>) -> bool {
        let state = self.lock();
        let replaced = match state.nodes.get(&target.id) {
            Some(current) => !Arc::ptr_eq(current, target),
            None => true,
        };
        target.dead.is_cancelled() || replaced || state.disabled.contains(&(from, target.id))
    }

    /// Kills an incarnation: it leaves the network if it is the live one.
    pub(super) fn kill(&self, incarnation: &Arc<Incarnation>) {
        {
            let mut state = self.lock();
            let is_current = state
                .nodes
                .get(&incarnation.id)
                .is_some_and(|current| Arc::ptr_eq(current, incarnation));
            if is_current {
                state.nodes.remove(&incarnation.id);
            }
        }
        incarnation.dead.cancel();
        incarnation.dispatch.close();
    }
}

/// The simulated network: creates nodes and lets a test cut links, crash and
/// restart nodes, switch faults on and off and read counters.
///
/// Cheap to clone; all clones control the same network.
#[derive(Clone)]
pub struct SimNetwork {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork")
            .field("seed", &self.shared.config.seed)
            .finish()
    }
}

impl SimNetwork {
    /// A reliable network with every link enabled, no long delays and no
    /// long reordering (the reference's defaults).
    ///
    /// # Panics
    /// When called outside a tokio runtime: the network spawns its delivery
    /// tasks on the runtime it was created in.
    pub fn new(config: SimConfig) -> Self {
        let state = State {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            reliable: true,
            long_reordering: false,
            long_delays: false,
            unordered_messages: false,
            nodes: BTreeMap::new(),
            known: BTreeSet::new(),
            disabled: HashSet::new(),
            received: HashMap::new(),
            total_rpcs: 0,
            total_bytes: 0,
            next_client_id: CLIENT_ID_BASE,
            links: HashMap::new(),
            trace: Vec::new(),
        };
        let shared = Shared {
            state: Mutex::new(state),
            runtime: Handle::current(),
            config,
            start: Instant::now(),
        };
        SimNetwork {
            shared: Arc::new(shared),
        }
    }

    fn insert_node(&self, state: &mut State, id: NodeId) -> Endpoint {
        let incarnation = Arc::new(Incarnation {
            id,
            dispatch: Dispatch::default(),
            dead: CancellationToken::new(),
        });
        state.nodes.insert(id, incarnation.clone());
        state.known.insert(id);
        Endpoint::new(Arc::new(SimNode::new(self.shared.clone(), incarnation)))
    }

    /// Adds node `id` and returns its endpoint; fails if `id` is live.
    pub fn add_node(&self, id: NodeId) -> Result<Endpoint, crate::net::NetError> {
        let mut state = self.shared.lock();
        if state.nodes.contains_key(&id) {
            return Err(crate::net::NetError::NodeExists(id));
        }
        Ok(self.insert_node(&mut state, id))
    }

    /// Adds a client node with a fresh id (from [`CLIENT_ID_BASE`] upwards,
    /// in order) and returns its endpoint.
    pub fn add_client(&self) -> Endpoint {
        let mut state = self.shared.lock();
        let id = state.next_client_id;
        state.next_client_id += 1;
        self.insert_node(&mut state, id)
    }

    /// Crashes node `id`: its handlers stop, replies in flight from it are
    /// suppressed, its inboxes close and its endpoint fails from now on. Links
    /// are not changed (cut them first to mirror the reference's crash).
    /// Nothing happens when `id` is not live.
    pub fn crash(&self, id: NodeId) {
        let incarnation = self.shared.lock().nodes.get(&id).cloned();
        if let Some(incarnation) = incarnation {
            self.shared.kill(&incarnation);
        }
    }

    /// Crashes node `id` if live and starts a fresh incarnation of it with a
    /// new endpoint.
    pub fn restart(&self, id: NodeId) -> Endpoint {
        self.crash(id);
        let mut state = self.shared.lock();
        // No await between the crash and here, and the network only adds
        // nodes through these methods: the slot must be empty.
        assert!(
            !state.nodes.contains_key(&id),
            "node {id} live right after its crash"
        );
        self.insert_node(&mut state, id)
    }

    /// Whether node `id` has a live incarnation.
    pub fn is_live(&self, id: NodeId) -> bool {
        self.shared.lock().nodes.contains_key(&id)
    }

    /// Reliable (the default) or unreliable mode.
    pub fn set_reliable(&self, reliable: bool) {
        self.shared.lock().reliable = reliable;
    }

    /// Long reordering of replies on or off (off by default).
    pub fn set_long_reordering(&self, long_reordering: bool) {
        self.shared.lock().long_reordering = long_reordering;
    }

    /// One-way messages delivered in order per link (the default, `false`),
    /// or each on its own like a labrpc call (`true`): in unreliable mode
    /// each takes its own 0–26 ms delay, so later messages may overtake
    /// earlier ones, and under long reordering 600 of 900
    /// [`Response`](crate::net::MessageRole::Response) messages are held back
    /// 200 ms + rand(0..1 + rand(0..2000)) ms like replies. This is how a
    /// protocol that uses one-way messages (Raft here) meets the reordering
    /// that labrpc gives RPC-based implementations.
    pub fn set_unordered_messages(&self, unordered: bool) {
        self.shared.lock().unordered_messages = unordered;
    }

    /// Long delays (0–7000 ms) before a cut link reports no reply, instead of
    /// 0–100 ms (off by default).
    pub fn set_long_delays(&self, long_delays: bool) {
        self.shared.lock().long_delays = long_delays;
    }

    /// Enables or disables the directed link `from -> to`. A disabled link
    /// carries no request and no message; a reply still being computed when
    /// the link of its caller is disabled is suppressed.
    pub fn set_link(&self, from: NodeId, to: NodeId, enabled: bool) {
        let mut state = self.shared.lock();
        if enabled {
            state.disabled.remove(&(from, to));
        } else {
            state.disabled.insert((from, to));
        }
    }

    /// Enables or disables both links between `a` and `b`.
    pub fn set_connected(&self, a: NodeId, b: NodeId, enabled: bool) {
        self.set_link(a, b, enabled);
        self.set_link(b, a, enabled);
    }

    fn set_all_links_of(&self, id: NodeId, enabled: bool) {
        let mut state = self.shared.lock();
        let others: Vec<NodeId> = state
            .known
            .iter()
            .copied()
            .filter(|&other| other != id)
            .collect();
        for other in others {
            for link in [(id, other), (other, id)] {
                if enabled {
                    state.disabled.remove(&link);
                } else {
                    state.disabled.insert(link);
                }
            }
        }
    }

    /// Cuts every link between `id` and every other node ever added.
    pub fn disconnect(&self, id: NodeId) {
        self.set_all_links_of(id, false);
    }

    /// Enables every link between `id` and every other node ever added.
    pub fn connect(&self, id: NodeId) {
        self.set_all_links_of(id, true);
    }

    /// Partitions the listed nodes: links within a group are enabled, links
    /// between groups disabled. Links of unlisted nodes are unchanged.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut state = self.shared.lock();
        for (index_a, group_a) in groups.iter().enumerate() {
            for (index_b, group_b) in groups.iter().enumerate() {
                for &a in group_a.iter() {
                    for &b in group_b.iter() {
                        if index_a == index_b {
                            state.disabled.remove(&(a, b));
                        } else {
                            state.disabled.insert((a, b));
                        }
                    }
                }
            }
        }
    }

    /// Enables every link.
    pub fn heal(&self) {
        self.shared.lock().disabled.clear();
    }

    /// Requests and one-way messages that reached node `id`'s handlers or
    /// inboxes, over all its incarnations.
    pub fn rpc_count(&self, id: NodeId) -> u64 {
        self.shared.lock().received.get(&id).copied().unwrap_or(0)
    }

    /// Requests and one-way messages sent, whatever became of them.
    pub fn total_rpcs(&self) -> u64 {
        self.shared.lock().total_rpcs
    }

    /// Bytes of every request and message payload sent plus every reply
    /// payload delivered.
    pub fn total_bytes(&self) -> u64 {
        self.shared.lock().total_bytes
    }

    /// The events recorded so far (at most [`SimConfig::trace_events_max`]).
    pub fn trace(&self) -> Vec<SimEvent> {
        self.shared.lock().trace.clone()
    }
}

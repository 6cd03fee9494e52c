//! The Wing–Gong–Lowe search for one key, with memoisation of (set of
//! linearized operations, model state) as in porcupine.
//!
//! Events (calls and returns) sit in a doubly linked list in time order. The
//! search walks the list from the front: at a call it tries to linearize that
//! operation now (model step legal, configuration not seen before), lifting
//! its call and return out of the list; reaching a return means that
//! operation's deadline passed unlinearized, so it backtracks. Never-returned
//! operations have their return at infinity.
//!
//! Two prunings keep uncertain operations from blowing up the search, both
//! sound because they only drop orders that some kept order can replace:
//! - an inert candidate (see `model::is_inert`: a Get, a failed Put, an
//!   ErrMaybe Put whose version is already passed) is never tried at another
//!   position: if the search fails after it, the configuration fails;
//! - a never-returned Put is only linearized where it takes effect; once
//!   every returned operation is linearized the rest go at the end;
//! - among identical operations that could come next, only the one that
//!   returns first is tried (see `Twins`).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::history::Operation;
use super::model::{self, Prepared, State, Step, Values};
use super::report::{BlockedOperation, IllegalReport, ReportedOperation, UnknownReason};

/// Marks the end of the event list.
const NIL: u32 = u32::MAX;
/// The list's head sentinel.
const HEAD: u32 = 0;
/// How many search steps run between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u64 = 1024;
/// How many blocked operations a report lists.
const BLOCKED_SHOWN_MAX: usize = 20;

/// The verdict for one key.
pub(crate) enum KeyOutcome {
    Ok,
    Illegal(Box<IllegalReport>),
    Unknown(UnknownReason),
}

/// Limits of one search.
pub(crate) struct Budget {
    /// `None`: no time limit.
    pub(crate) deadline: Option<Instant>,
    pub(crate) cache_bytes_max: usize,
}

/// An operation taking part in the search.
struct Searched {
    /// Index in the full history.
    index: usize,
    call: u64,
    /// `u64::MAX` for operations that never returned.
    ret: u64,
    /// Never returned: may take effect after its call, or never.
    pending: bool,
    step: Step,
}

/// One linearized operation on the search stack.
struct Frame {
    /// Its call node.
    call: u32,
    /// The model state before it.
    before: State,
    /// Whether it was inert (see `model::is_inert`) when linearized.
    inert: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bitset(Box<[u64]>);

impl Bitset {
    fn new(bits: usize) -> Self {
        Self(vec![0; bits.div_ceil(64)].into_boxed_slice())
    }
    fn set(&mut self, bit: usize) {
        self.0[bit / 64] |= 1 << (bit % 64);
    }
    fn clear(&mut self, bit: usize) {
        self.0[bit / 64] &= !(1 << (bit % 64));
    }
    fn get(&self, bit: usize) -> bool {
        self.0[bit / 64] & (1 << (bit % 64)) != 0
    }
}

/// The event list: node 0 is the head; nodes 1..=2n are events.
struct Events {
    next: Vec<u32>,
    prev: Vec<u32>,
    /// The operation of each node.
    op: Vec<u32>,
    /// For call nodes, their return node; `NIL` for return nodes.
    return_node: Vec<u32>,
    /// The time of each node's event.
    time: Vec<u64>,
}

impl Events {
    fn new(ops: &[Searched]) -> Self {
        let n = ops.len();
        // (time, 0 = call / 1 = return, op): at equal times calls come first,
        // so an operation called when another returns counts as concurrent.
        let mut events: Vec<(u64, u8, u32)> = Vec::with_capacity(2 * n);
        for (id, op) in ops.iter().enumerate() {
            let id = u32::try_from(id).expect("too many operations on one key");
            events.push((op.call, 0, id));
            events.push((op.ret, 1, id));
        }
        events.sort_unstable();
        let nodes = 2 * n + 1;
        let mut list = Events {
            next: (1..=nodes as u32).collect(),
            prev: Vec::with_capacity(nodes),
            op: vec![NIL; nodes],
            return_node: vec![NIL; nodes],
            time: vec![0; nodes],
        };
        list.next[nodes - 1] = NIL;
        list.prev.push(NIL);
        list.prev.extend(0..(nodes - 1) as u32);
        let mut return_of_op = vec![NIL; n];
        for (position, &(time, kind, id)) in events.iter().enumerate() {
            let node = position + 1;
            list.op[node] = id;
            list.time[node] = time;
            if kind == 1 {
                return_of_op[id as usize] = node as u32;
            }
        }
        for (position, &(_, kind, id)) in events.iter().enumerate() {
            if kind == 0 {
                list.return_node[position + 1] = return_of_op[id as usize];
                assert!(
                    return_of_op[id as usize] as usize > position + 1,
                    "a return event sorted before its call"
                );
            }
        }
        list
    }

    fn is_call(&self, node: u32) -> bool {
        self.return_node[node as usize] != NIL
    }

    /// The time of the first return event left in the list: an operation
    /// can be linearized next iff its call is at or before it.
    fn frontier(&self) -> u64 {
        let mut node = self.next[HEAD as usize];
        while node != NIL {
            if !self.is_call(node) {
                return self.time[node as usize];
            }
            node = self.next[node as usize];
        }
        u64::MAX
    }

    fn unlink(&mut self, node: u32) {
        let (prev, next) = (self.prev[node as usize], self.next[node as usize]);
        self.next[prev as usize] = next;
        if next != NIL {
            self.prev[next as usize] = prev;
        }
    }

    fn relink(&mut self, node: u32) {
        let (prev, next) = (self.prev[node as usize], self.next[node as usize]);
        self.next[prev as usize] = node;
        if next != NIL {
            self.prev[next as usize] = node;
        }
    }

    /// Removes a call and its return from the list.
    fn lift(&mut self, call: u32) {
        self.unlink(call);
        self.unlink(self.return_node[call as usize]);
    }

    /// Undoes [`Events::lift`]; lifts must be undone in reverse order.
    fn unlift(&mut self, call: u32) {
        self.relink(self.return_node[call as usize]);
        self.relink(call);
    }
}

/// Checks the operations `indices` of `history` (all on `key`).
pub(crate) fn check_key(
    key: &str,
    history: &[Operation],
    indices: &[usize],
    budget: &Budget,
) -> KeyOutcome {
    let mut values = Values::new();
    let mut ops = Vec::new();
    for &index in indices {
        let operation = &history[index];
        if let Prepared::Search { step, pending } = model::prepare(operation, &mut values) {
            // Infinity is reserved for pending operations, so that every
            // finite return sorts before every pending one.
            let ret = match (&operation.completion, pending) {
                (Some(completion), false) => completion.return_ns.min(u64::MAX - 1),
                _ => u64::MAX,
            };
            ops.push(Searched {
                index,
                call: operation.call_ns,
                ret,
                pending,
                step,
            });
        }
    }
    if ops.is_empty() {
        return KeyOutcome::Ok;
    }

    let mut events = Events::new(&ops);
    let twins = Twins::new(&ops);
    // `events.frontier()` for the current configuration, once computed.
    let mut frontier: Option<u64> = None;
    let mut linearized = Bitset::new(ops.len());
    let mut cache: HashSet<(Bitset, State)> = HashSet::new();
    let cache_entry_bytes = std::mem::size_of::<(Bitset, State)>() + 8 * linearized.0.len() + 16;
    let mut state = State::INITIAL;
    let mut stack: Vec<Frame> = Vec::new();
    // The longest prefix seen, for the report; `stack[..low_water]` has not
    // changed since it was last copied into `best`.
    let mut best: Vec<u32> = Vec::new();
    let mut best_state = State::INITIAL;
    let mut low_water = 0usize;

    // Operations with a finite return not yet linearized. Once none is
    // left, the pending ones go at the end (in any order, each taking effect
    // or not), so the history is linearizable.
    let mut finite_left = ops.iter().filter(|op| !op.pending).count();
    let mut entry = events.next[HEAD as usize];
    let mut steps: u64 = 0;
    while finite_left > 0 {
        steps += 1;
        if steps % STEPS_PER_CLOCK_CHECK == 0 {
            if budget
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                return KeyOutcome::Unknown(UnknownReason::TimeBudget);
            }
            if cache.len().saturating_mul(cache_entry_bytes) > budget.cache_bytes_max {
                return KeyOutcome::Unknown(UnknownReason::CacheFull);
            }
        }
        assert_ne!(entry, NIL, "walked past the last return event");
        let op = events.op[entry as usize];
        if events.is_call(entry) {
            let Searched { step, pending, .. } = &ops[op as usize];
            if twins.has_earlier(op, &ops, &linearized, || {
                *frontier.get_or_insert_with(|| events.frontier())
            }) {
                entry = events.next[entry as usize];
                continue;
            }
            let mut dead_end = false;
            // A pending operation is only ever linearized where it takes
            // effect: where it would not, it can as well go at the end.
            let next = model::apply(state, step).filter(|&next| !*pending || next != state);
            if let Some(next_state) = next {
                let inert = model::is_inert(state, step);
                linearized.set(op as usize);
                if cache.insert((linearized.clone(), next_state)) {
                    stack.push(Frame {
                        call: entry,
                        before: state,
                        inert,
                    });
                    finite_left -= usize::from(!*pending);
                    state = next_state;
                    events.lift(entry);
                    frontier = None;
                    entry = events.next[HEAD as usize];
                    if stack.len() > best.len() {
                        best.truncate(low_water);
                        best.extend(
                            stack[low_water..]
                                .iter()
                                .map(|frame| events.op[frame.call as usize]),
                        );
                        best_state = state;
                        low_water = stack.len();
                    }
                    continue;
                }
                linearized.clear(op as usize);
                // Seen before, so it failed; for an inert operation that
                // means the current configuration fails too.
                dead_end = inert;
            }
            if !dead_end {
                entry = events.next[entry as usize];
                continue;
            }
        }
        assert!(
            events.is_call(entry) || !ops[op as usize].pending,
            "reached a pending return while finite operations are left"
        );
        // Either `op` reached its return unlinearized, or the configuration
        // is a dead end: backtrack. Undoing an inert step also undoes the
        // frame below it, since inert steps never need to be tried elsewhere.
        loop {
            let Some(frame) = stack.pop() else {
                return KeyOutcome::Illegal(Box::new(report(
                    key, history, &ops, &values, &best, best_state,
                )));
            };
            low_water = low_water.min(stack.len());
            state = frame.before;
            let popped = events.op[frame.call as usize] as usize;
            finite_left += usize::from(!ops[popped].pending);
            linearized.clear(popped);
            events.unlift(frame.call);
            frontier = None;
            if !frame.inert {
                entry = events.next[frame.call as usize];
                break;
            }
        }
    }
    assert!(
        stack.len() <= ops.len(),
        "linearized more operations than there are"
    );
    KeyOutcome::Ok
}

/// Operations with identical steps ("twins"), for symmetry pruning: among
/// twins that could all be linearized next, only the one that returns first
/// (then the lowest id) is tried. Any order starting with another twin `X`
/// stays valid after swapping `X` with that one `Y` (same step; `Y` returns
/// no later, so it may take `X`'s place now and `X` may take `Y`'s later).
struct Twins {
    /// For each operation: its class, and its rank in the class by (return, id).
    class_and_rank: Vec<(u32, u32)>,
    /// The members of each class sorted by (return, id).
    members: Vec<Vec<u32>>,
}

impl Twins {
    fn new(ops: &[Searched]) -> Self {
        let mut class_of_step: HashMap<Step, u32> = HashMap::new();
        let mut members: Vec<Vec<u32>> = Vec::new();
        for (id, op) in ops.iter().enumerate() {
            let next_class = members.len() as u32;
            let class = *class_of_step.entry(op.step).or_insert(next_class);
            if class == next_class {
                members.push(Vec::new());
            }
            members[class as usize].push(id as u32);
        }
        let mut class_and_rank = vec![(0, 0); ops.len()];
        for (class, twins) in members.iter_mut().enumerate() {
            twins.sort_by_key(|&id| (ops[id as usize].ret, id));
            for (rank, &id) in twins.iter().enumerate() {
                class_and_rank[id as usize] = (class as u32, rank as u32);
            }
        }
        Self {
            class_and_rank,
            members,
        }
    }

    /// Whether a twin of `op` that sorts before it could be linearized next
    /// (it is not linearized and its call is at or before the frontier).
    fn has_earlier(
        &self,
        op: u32,
        ops: &[Searched],
        linearized: &Bitset,
        frontier: impl FnOnce() -> u64,
    ) -> bool {
        let (class, rank) = self.class_and_rank[op as usize];
        let earlier = &self.members[class as usize][..rank as usize];
        let mut unlinearized = earlier
            .iter()
            .filter(|&&twin| !linearized.get(twin as usize))
            .peekable();
        if unlinearized.peek().is_none() {
            return false;
        }
        let frontier = frontier();
        unlinearized.any(|&twin| ops[twin as usize].call <= frontier)
    }
}

/// Builds the report from the longest linearizable prefix found.
fn report(
    key: &str,
    history: &[Operation],
    ops: &[Searched],
    values: &Values,
    best: &[u32],
    best_state: State,
) -> IllegalReport {
    let reported = |id: u32| {
        let index = ops[id as usize].index;
        ReportedOperation {
            index,
            operation: history[index].clone(),
        }
    };
    let mut done = vec![false; ops.len()];
    for &id in best {
        done[id as usize] = true;
    }
    // An operation can come next iff no other remaining one returned before its call.
    let mut earliest_returns: [(u64, u32); 2] = [(u64::MAX, NIL); 2];
    for (id, op) in ops.iter().enumerate() {
        if done[id] {
            continue;
        }
        let candidate = (op.ret, id as u32);
        if candidate < earliest_returns[0] {
            earliest_returns = [candidate, earliest_returns[0]];
        } else if candidate < earliest_returns[1] {
            earliest_returns[1] = candidate;
        }
    }
    // Pending operations are left out: they can always go at the end.
    let mut next: Vec<u32> = (0..ops.len() as u32)
        .filter(|&id| !done[id as usize] && !ops[id as usize].pending)
        .filter(|&id| {
            let others_earliest = if earliest_returns[0].1 == id {
                earliest_returns[1].0
            } else {
                earliest_returns[0].0
            };
            ops[id as usize].call <= others_earliest
        })
        .collect();
    next.sort_by_key(|&id| (ops[id as usize].call, ops[id as usize].index));
    let blocked_omitted = next.len().saturating_sub(BLOCKED_SHOWN_MAX);
    next.truncate(BLOCKED_SHOWN_MAX);
    IllegalReport {
        key: key.to_owned(),
        operations_on_key: ops.len(),
        linearized: best.iter().map(|&id| reported(id)).collect(),
        state_after: values.resolve(best_state),
        blocked: next
            .into_iter()
            .map(|id| BlockedOperation {
                operation: reported(id),
                reason: model::explain(best_state, values, &ops[id as usize].step),
            })
            .collect(),
        blocked_omitted,
    }
}

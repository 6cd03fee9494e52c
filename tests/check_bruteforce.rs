//! The linearizability checker against a brute-force checker that tries
//! every order of the operations respecting real time, on small random
//! histories (several keys, never-returned operations, ErrMaybe, timeouts).
//!
//! Seeded: the seed is fixed (override with PROPTEST_RNG_SEED=N); a failure
//! prints the minimal history. Replay: `cargo test --release --test check_bruteforce`.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use raftkv::check::{CheckConfig, CheckOutcome, Completion, Operation, check_history};
use raftkv::kv::{KvCommand, KvError, KvReply, MemoryKv, Versioned};

const SEED: u64 = 0x6b76_6368_6563_6b31;

fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::with_cases(cases);
    if matches!(config.rng_seed, RngSeed::Random) {
        config.rng_seed = RngSeed::Fixed(SEED);
    }
    config
}

/// What one operation means for the brute force, written from the spec.
enum Kind {
    /// No effect, no constraint: left out.
    Ignored,
    /// May happen at any point after its call, or never.
    Pending,
    /// Returned with a definite output.
    Returned(u64),
}

fn kind(operation: &Operation) -> Kind {
    let Some(completion) = &operation.completion else {
        return match operation.input {
            KvCommand::Get { .. } => Kind::Ignored,
            KvCommand::Put { .. } => Kind::Pending,
        };
    };
    match &completion.output {
        KvReply::Put(Err(KvError::TooLarge { .. })) => Kind::Ignored,
        KvReply::Put(Err(
            KvError::Timeout { .. } | KvError::WrongLeader { .. } | KvError::LeadershipLost { .. },
        )) => Kind::Pending,
        KvReply::Get(Err(
            KvError::Timeout { .. }
            | KvError::TooLarge { .. }
            | KvError::WrongLeader { .. }
            | KvError::LeadershipLost { .. },
        )) => Kind::Ignored,
        _ => Kind::Returned(completion.return_ns),
    }
}

type KeyState = (Bytes, u64);

/// The sequential model: the key's next state, or `None` if illegal.
fn step(state: &KeyState, operation: &Operation) -> Option<KeyState> {
    let (value, version) = state;
    let output = operation.completion.as_ref().map(|c| &c.output);
    match (&operation.input, output) {
        (KvCommand::Get { .. }, Some(KvReply::Get(Ok(found)))) => {
            (*version > 0 && found.value == *value && found.version == *version)
                .then(|| state.clone())
        }
        (KvCommand::Get { .. }, Some(KvReply::Get(Err(KvError::NoKey)))) => {
            (*version == 0).then(|| state.clone())
        }
        (KvCommand::Get { .. }, _) => None,
        (
            KvCommand::Put {
                value: new,
                version: asked,
                ..
            },
            output,
        ) => {
            let matches = asked == version;
            let installed = (new.clone(), version + 1);
            match output {
                Some(KvReply::Put(Ok(()))) => matches.then_some(installed),
                Some(KvReply::Put(Err(KvError::Version))) => {
                    (!matches && *version > 0).then(|| state.clone())
                }
                Some(KvReply::Put(Err(KvError::NoKey))) => {
                    (!matches && *version == 0).then(|| state.clone())
                }
                // ErrMaybe, never returned, timed out: takes effect iff the versions match.
                _ => Some(if matches { installed } else { state.clone() }),
            }
        }
    }
}

/// Whether some order of the operations respecting real time is legal.
fn brute_force(history: &[Operation]) -> bool {
    let ops: Vec<(&Operation, Option<u64>)> = history
        .iter()
        .filter_map(|op| match kind(op) {
            Kind::Ignored => None,
            Kind::Pending => Some((op, None)),
            Kind::Returned(at) => Some((op, Some(at))),
        })
        .collect();
    let mut placed = vec![false; ops.len()];
    let mut states: BTreeMap<String, KeyState> = BTreeMap::new();
    search(&ops, &mut placed, &mut states)
}

fn search(
    ops: &[(&Operation, Option<u64>)],
    placed: &mut [bool],
    states: &mut BTreeMap<String, KeyState>,
) -> bool {
    // Done once every returned operation is placed; pending ones "never happened".
    if ops
        .iter()
        .zip(placed.iter())
        .all(|((_, ret), &p)| p || ret.is_none())
    {
        return true;
    }
    for next in 0..ops.len() {
        if placed[next] {
            continue;
        }
        let (operation, _) = ops[next];
        // Everything that returned before this call must already be placed.
        let blocked = ops.iter().zip(placed.iter()).any(|((other, ret), &p)| {
            !p && ret.is_some_and(|ret| ret < operation.call_ns) && !std::ptr::eq(*other, operation)
        });
        if blocked {
            continue;
        }
        let key = operation.input.key().to_owned();
        let before = states.get(&key).cloned().unwrap_or_default();
        let Some(after) = step(&before, operation) else {
            continue;
        };
        placed[next] = true;
        states.insert(key.clone(), after);
        if search(ops, placed, states) {
            return true;
        }
        states.insert(key, before);
        placed[next] = false;
    }
    false
}

const VALUES: [&str; 3] = ["", "x", "y"];
const KEYS: [&str; 2] = ["a", "b"];

fn value(index: usize) -> Bytes {
    Bytes::from_static(VALUES[index].as_bytes())
}

/// A random input with random times (not yet an output).
fn arbitrary_call() -> impl Strategy<Value = (u64, u64, u64, KvCommand)> {
    let input = prop_oneof![
        (0..KEYS.len()).prop_map(|k| KvCommand::Get {
            key: KEYS[k].into()
        }),
        (0..KEYS.len(), 0..VALUES.len(), 0u64..4).prop_map(|(k, v, version)| KvCommand::Put {
            key: KEYS[k].into(),
            value: value(v),
            version,
        }),
    ];
    (0u64..4, 0u64..20, 0u64..10, input)
}

/// A random output of the right kind for `input`.
fn arbitrary_output(input: &KvCommand) -> BoxedStrategy<Option<KvReply>> {
    let output = match input {
        KvCommand::Put { .. } => prop_oneof![
            Just(KvReply::Put(Ok(()))),
            Just(KvReply::Put(Err(KvError::Version))),
            Just(KvReply::Put(Err(KvError::NoKey))),
            Just(KvReply::Put(Err(KvError::Maybe))),
            Just(KvReply::Put(Err(KvError::Timeout { attempts: 1 }))),
        ]
        .boxed(),
        KvCommand::Get { .. } => prop_oneof![
            Just(KvReply::Get(Err(KvError::NoKey))),
            (0..VALUES.len(), 1u64..4).prop_map(|(v, version)| KvReply::Get(Ok(Versioned {
                value: value(v),
                version
            }))),
        ]
        .boxed(),
    };
    proptest::option::weighted(0.8, output).boxed()
}

fn operation(
    client: u64,
    call: u64,
    duration: u64,
    input: KvCommand,
    output: Option<KvReply>,
) -> Operation {
    Operation {
        client,
        call_ns: call,
        input,
        completion: output.map(|output| Completion {
            return_ns: call + duration,
            output,
        }),
    }
}

/// Fully random histories: mostly illegal, with every output kind.
fn random_history() -> impl Strategy<Value = Vec<Operation>> {
    proptest::collection::vec(
        arbitrary_call().prop_flat_map(|(client, call, duration, input)| {
            arbitrary_output(&input)
                .prop_map(move |output| operation(client, call, duration, input.clone(), output))
        }),
        1..=7,
    )
}

/// Histories produced by a linearizable execution (each operation takes
/// effect at a random point inside its interval on a real MemoryKv), with
/// some outputs weakened to ErrMaybe or dropped, and sometimes one output
/// corrupted so they sit near the legal/illegal boundary.
fn executed_history() -> impl Strategy<Value = Vec<Operation>> {
    let op = (arbitrary_call(), 0u64..1000, 0u8..10);
    (
        proptest::collection::vec(op, 1..=7),
        any::<Option<(prop::sample::Index, u8)>>(),
    )
        .prop_map(|(calls, corruption)| {
            let mut points: Vec<(u64, usize)> = calls
                .iter()
                .enumerate()
                .map(|(i, ((_, call, duration, _), fraction, _))| {
                    (call * 1000 + duration * fraction, i)
                })
                .collect();
            points.sort();
            let mut kv = MemoryKv::new();
            let mut outputs: Vec<Option<KvReply>> = vec![None; calls.len()];
            for &(_, i) in &points {
                outputs[i] = Some(kv.apply(&calls[i].0.3));
            }
            let mut history: Vec<Operation> = calls
                .iter()
                .zip(outputs)
                .map(|(((client, call, duration, input), _, weaken), output)| {
                    let output = output.expect("every operation executed");
                    let output = match (weaken, output) {
                        (0, _) => None,
                        (1, KvReply::Put(_)) => Some(KvReply::Put(Err(KvError::Maybe))),
                        (2, KvReply::Put(Err(KvError::Version))) => {
                            Some(KvReply::Put(Err(KvError::Maybe)))
                        }
                        (_, output) => Some(output),
                    };
                    operation(*client, call * 1000, duration * 1000, input.clone(), output)
                })
                .collect();
            if let Some((index, how)) = corruption {
                let target = &mut history[index.index(calls.len())];
                if let Some(completion) = &mut target.completion {
                    completion.output = match (&completion.output, how % 3) {
                        (KvReply::Put(_), 0) => KvReply::Put(Ok(())),
                        (KvReply::Put(_), 1) => KvReply::Put(Err(KvError::Version)),
                        (KvReply::Put(_), _) => KvReply::Put(Err(KvError::NoKey)),
                        (KvReply::Get(_), 0) => KvReply::Get(Err(KvError::NoKey)),
                        (KvReply::Get(_), n) => KvReply::Get(Ok(Versioned {
                            value: value(n as usize),
                            version: 1 + u64::from(how % 2),
                        })),
                    };
                }
            }
            history
        })
}

fn assert_agrees(history: &[Operation]) -> Result<(), TestCaseError> {
    let outcome = check_history(history, &CheckConfig::default()).expect("well-formed");
    let expected = brute_force(history);
    prop_assert!(
        !matches!(outcome, CheckOutcome::Unknown { .. }),
        "checker gave up on a tiny history"
    );
    prop_assert_eq!(outcome.is_ok(), expected, "checker said {}", outcome);
    if let CheckOutcome::Illegal(report) = &outcome {
        // The reported prefix is itself legal and ends in the reported state.
        let mut state: KeyState = Default::default();
        for reported in &report.linearized {
            prop_assert_eq!(reported.operation.input.key(), report.key.as_str());
            prop_assert_eq!(&history[reported.index], &reported.operation);
            state = step(&state, &reported.operation).expect("prefix step is legal");
        }
        prop_assert_eq!(
            state,
            (report.state_after.value.clone(), report.state_after.version)
        );
        prop_assert!(
            !report.blocked.is_empty(),
            "an illegal history has a blocked operation"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(20_000))]

    // On random histories the checker's verdict equals the brute force's.
    #[test]
    fn agrees_on_random_histories(history in random_history()) {
        assert_agrees(&history)?;
    }

    // On executed (mostly legal, sometimes corrupted) histories the verdicts agree too.
    #[test]
    fn agrees_on_executed_histories(history in executed_history()) {
        assert_agrees(&history)?;
    }
}

// The generators produce both verdicts often enough for the comparison to mean something.
#[test]
fn generators_cover_both_verdicts() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for (name, strategy) in [
        ("random", random_history().boxed()),
        ("executed", executed_history().boxed()),
    ] {
        let mut legal = 0;
        let total = 500;
        for _ in 0..total {
            let history = strategy.new_tree(&mut runner).unwrap().current();
            legal += usize::from(brute_force(&history));
        }
        assert!(legal * 10 >= total, "{name}: only {legal}/{total} legal");
        assert!(legal * 10 <= total * 9, "{name}: {legal}/{total} legal");
    }
}

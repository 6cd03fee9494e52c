//! The sequential model of one key that histories are checked against,
//! written from the specification independently of `kv::state_machine`.
//!
//! State: (value, version), starting at ("", 0); version 0 means "missing".
//! Values are interned per key, so a state is two integers and cheap to hash.

use std::collections::HashMap;

use bytes::Bytes;

use crate::kv::{KvCommand, KvError, KvReply, Version, Versioned};

use super::history::Operation;

/// The state of one key in the model: version 0 means the key is missing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ModelState {
    /// The key's value ("" while missing).
    pub value: Bytes,
    /// The key's version (0 while missing).
    pub version: Version,
}

/// A model state with its value interned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct State {
    pub(crate) version: Version,
    pub(crate) value: u32,
}

impl State {
    pub(crate) const INITIAL: State = State {
        version: 0,
        value: 0,
    };
}

/// Interns the values of one key; id 0 is always "".
#[derive(Debug)]
pub(crate) struct Values {
    ids: HashMap<Bytes, u32>,
    values: Vec<Bytes>,
}

impl Values {
    pub(crate) fn new() -> Self {
        let mut values = Self {
            ids: HashMap::new(),
            values: Vec::new(),
        };
        let empty = values.intern(&Bytes::new());
        assert_eq!(empty, 0, "the empty value must be id 0");
        values
    }

    pub(crate) fn intern(&mut self, value: &Bytes) -> u32 {
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        let id = u32::try_from(self.values.len()).expect("more than u32::MAX distinct values");
        self.ids.insert(value.clone(), id);
        self.values.push(value.clone());
        id
    }

    pub(crate) fn resolve(&self, state: State) -> ModelState {
        ModelState {
            value: self.values[state.value as usize].clone(),
            version: state.version,
        }
    }
}

/// What a Put's output says about its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PutOutcome {
    /// Applied: legal only if the versions matched.
    Ok,
    /// ErrVersion: legal only on an existing key with another version.
    Version,
    /// ErrNoKey: legal only on a missing key (and then the versions differ).
    NoKey,
    /// ErrMaybe, or no answer: applied iff the versions matched; always legal.
    Either,
}

/// One operation as the search sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Step {
    /// A Get that returned this value (interned) and version.
    GetFound { value: u32, version: Version },
    /// A Get that returned ErrNoKey.
    GetNoKey,
    /// A Get with an output a Get can never produce.
    GetImpossible,
    /// A Put of `value` (interned) at `version`.
    Put {
        value: u32,
        version: Version,
        outcome: PutOutcome,
    },
}

/// How an operation takes part in the search.
pub(crate) enum Prepared {
    /// It neither constrains nor changes the state (e.g. a Get that never
    /// returned, a Put rejected as too large): left out of the search.
    Skip,
    /// It is searched; `pending` operations get an infinite return time.
    Search { step: Step, pending: bool },
}

/// Classifies an operation (see the `check` module docs for the rules).
pub(crate) fn prepare(operation: &Operation, values: &mut Values) -> Prepared {
    let output = operation.completion.as_ref().map(|c| &c.output);
    match &operation.input {
        KvCommand::Get { .. } => {
            let step = match output {
                None => return Prepared::Skip,
                Some(KvReply::Get(Ok(Versioned { value, version }))) => Step::GetFound {
                    value: values.intern(value),
                    version: *version,
                },
                Some(KvReply::Get(Err(KvError::NoKey))) => Step::GetNoKey,
                Some(KvReply::Get(Err(
                    KvError::Timeout { .. }
                    | KvError::TooLarge { .. }
                    | KvError::WrongLeader { .. }
                    | KvError::LeadershipLost { .. },
                ))) => return Prepared::Skip,
                Some(KvReply::Get(Err(KvError::Version | KvError::Maybe))) => Step::GetImpossible,
                Some(KvReply::Put(_)) => unreachable!("validated: output kind matches input"),
            };
            Prepared::Search {
                step,
                pending: false,
            }
        }
        KvCommand::Put { value, version, .. } => {
            let (outcome, pending) = match output {
                None => (PutOutcome::Either, true),
                Some(KvReply::Put(Ok(()))) => (PutOutcome::Ok, false),
                Some(KvReply::Put(Err(KvError::Version))) => (PutOutcome::Version, false),
                Some(KvReply::Put(Err(KvError::NoKey))) => (PutOutcome::NoKey, false),
                Some(KvReply::Put(Err(KvError::Maybe))) => (PutOutcome::Either, false),
                // The client gave up; a delayed request may still be applied later.
                Some(KvReply::Put(Err(
                    KvError::Timeout { .. }
                    | KvError::WrongLeader { .. }
                    | KvError::LeadershipLost { .. },
                ))) => (PutOutcome::Either, true),
                Some(KvReply::Put(Err(KvError::TooLarge { .. }))) => return Prepared::Skip,
                Some(KvReply::Get(_)) => unreachable!("validated: output kind matches input"),
            };
            Prepared::Search {
                step: Step::Put {
                    value: values.intern(value),
                    version: *version,
                    outcome,
                },
                pending,
            }
        }
    }
}

/// The model's transition: the state after `step`, or `None` if the
/// operation's output is impossible in `state`.
pub(crate) fn apply(state: State, step: &Step) -> Option<State> {
    match *step {
        Step::GetFound { value, version } => {
            (version >= 1 && state.version == version && state.value == value).then_some(state)
        }
        Step::GetNoKey => (state.version == 0).then_some(state),
        Step::GetImpossible => None,
        Step::Put {
            value,
            version,
            outcome,
        } => {
            let matches = state.version == version;
            let installed = || {
                Some(State {
                    version: version.checked_add(1)?,
                    value,
                })
            };
            match outcome {
                PutOutcome::Ok if matches => installed(),
                PutOutcome::Ok => None,
                PutOutcome::Version => (!matches && state.version > 0).then_some(state),
                PutOutcome::NoKey => (!matches && state.version == 0).then_some(state),
                PutOutcome::Either if matches => installed(),
                PutOutcome::Either => Some(state),
            }
        }
    }
}

/// Whether `step`, legal in `state`, is inert: it leaves `state` unchanged
/// and would leave unchanged every state reachable from it (versions never
/// decrease). Linearizing an inert candidate at once loses no solution: in
/// any linearization it can be moved to the front without changing a state
/// or breaking real-time order (it is a candidate, so everything that must
/// precede it is already linearized). The search uses this to prune.
pub(crate) fn is_inert(state: State, step: &Step) -> bool {
    match *step {
        Step::GetFound { .. } | Step::GetNoKey | Step::GetImpossible => true,
        Step::Put {
            outcome, version, ..
        } => match outcome {
            PutOutcome::Version | PutOutcome::NoKey => true,
            PutOutcome::Ok => false,
            PutOutcome::Either => version < state.version,
        },
    }
}

/// Why `step` cannot be the next operation in `state`, for reports.
pub(crate) fn explain(state: State, values: &Values, step: &Step) -> String {
    let shown = values.resolve(state);
    let holds = if shown.version == 0 {
        "the key is missing".to_owned()
    } else {
        format!(
            "the key holds {} at version {}",
            show_value(&shown.value),
            shown.version
        )
    };
    if apply(state, step).is_some() {
        return format!(
            "{holds}: legal here, but no order of the remaining operations works after it"
        );
    }
    match *step {
        Step::GetFound { .. } => format!("{holds}, which is not what the Get returned"),
        Step::GetNoKey => format!("{holds}, but the Get returned ErrNoKey"),
        Step::GetImpossible => "a Get can never return this".to_owned(),
        Step::Put {
            version, outcome, ..
        } => match outcome {
            PutOutcome::Ok => format!("{holds}, so a Put at version {version} cannot succeed"),
            PutOutcome::Version if shown.version == version => {
                format!("{holds}, so a Put at version {version} cannot fail with ErrVersion")
            }
            PutOutcome::Version => {
                format!("{holds}, so a Put fails with ErrNoKey, not ErrVersion")
            }
            PutOutcome::NoKey if shown.version == 0 => {
                format!(
                    "{holds}, so a Put at version 0 creates it instead of failing with ErrNoKey"
                )
            }
            PutOutcome::NoKey => format!("{holds}, so a Put cannot fail with ErrNoKey"),
            // Only reachable if the version would overflow u64.
            PutOutcome::Either => format!("{holds}, and version {version} cannot be incremented"),
        },
    }
}

/// A value for humans: quoted text if printable UTF-8, else its length and
/// first bytes in hex; long values are cut.
pub(crate) fn show_value(value: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 40;
    match std::str::from_utf8(value) {
        Ok(text) if !text.chars().any(char::is_control) => {
            if text.len() <= SHOWN_BYTES_MAX {
                format!("{text:?}")
            } else {
                let mut end = SHOWN_BYTES_MAX;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{:?}… ({} bytes)", &text[..end], text.len())
            }
        }
        _ => {
            let hex: String = value
                .iter()
                .take(SHOWN_BYTES_MAX / 2)
                .map(|byte| format!("{byte:02x}"))
                .collect();
            let more = if value.len() > SHOWN_BYTES_MAX / 2 {
                "…"
            } else {
                ""
            };
            format!("0x{hex}{more} ({} bytes)", value.len())
        }
    }
}

//! A history of key/value operations as observed by clients: what each
//! client asked, when, and what it got back (if anything).

use serde::{Deserialize, Serialize};

use crate::kv::{KvCommand, KvReply};

/// Identifies the client (one sequential caller) that issued an operation.
pub type ClientId = u64;

/// One client operation: its call, and its completion if it returned.
///
/// Times are nanoseconds on one monotonic clock shared by all clients of the
/// history (any origin). Operation A precedes operation B in real time iff
/// A returned strictly before B was called; equal times count as concurrent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The client that issued the operation.
    pub client: ClientId,
    /// When the client called the operation.
    pub call_ns: u64,
    /// What the client asked; its key decides the partition it is checked in.
    pub input: KvCommand,
    /// `None`: the operation never returned (it may or may not have taken effect).
    pub completion: Option<Completion>,
}

/// How an operation returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    /// When the operation returned to the client (≥ the call time).
    pub return_ns: u64,
    /// What the client got: the Clerk's result. How each outcome constrains
    /// the history is described in the [`check`](crate::check) module docs.
    pub output: KvReply,
}

/// Most operations a history may hold (the search indexes events with `u32`).
pub const HISTORY_OPERATIONS_MAX: usize = (u32::MAX / 2 - 1) as usize;

/// A history that cannot be checked because it is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The history holds more than [`HISTORY_OPERATIONS_MAX`] operations.
    #[error("history of {len} operations exceeds the limit of {HISTORY_OPERATIONS_MAX}")]
    TooLong {
        /// Number of operations in the history.
        len: usize,
    },
    /// An operation returned before it was called.
    #[error("operation #{index} returns at {return_ns} ns, before its call at {call_ns} ns")]
    ReturnBeforeCall {
        /// Index of the operation in the history.
        index: usize,
        /// Its call time.
        call_ns: u64,
        /// Its return time.
        return_ns: u64,
    },
    /// An operation's output is for the other kind of operation (Put vs Get).
    #[error("operation #{index} has a {input} input but a {output} output")]
    KindMismatch {
        /// Index of the operation in the history.
        index: usize,
        /// Kind of the input.
        input: &'static str,
        /// Kind of the output.
        output: &'static str,
    },
}

/// Checks that every operation is well-formed.
pub(crate) fn validate(history: &[Operation]) -> Result<(), HistoryError> {
    if history.len() > HISTORY_OPERATIONS_MAX {
        return Err(HistoryError::TooLong { len: history.len() });
    }
    for (index, operation) in history.iter().enumerate() {
        let Some(completion) = &operation.completion else {
            continue;
        };
        if completion.return_ns < operation.call_ns {
            return Err(HistoryError::ReturnBeforeCall {
                index,
                call_ns: operation.call_ns,
                return_ns: completion.return_ns,
            });
        }
        let (input, output) = match (&operation.input, &completion.output) {
            (KvCommand::Put { .. }, KvReply::Put(_)) | (KvCommand::Get { .. }, KvReply::Get(_)) => {
                continue;
            }
            (KvCommand::Put { .. }, KvReply::Get(_)) => ("put", "get"),
            (KvCommand::Get { .. }, KvReply::Put(_)) => ("get", "put"),
        };
        return Err(HistoryError::KindMismatch {
            index,
            input,
            output,
        });
    }
    Ok(())
}

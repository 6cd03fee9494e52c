//! The outcome of a check and the report that explains a violation.

use std::fmt;
use std::time::Duration;

use crate::kv::{KvCommand, KvError, KvReply};

use super::history::Operation;
use super::model::{ModelState, show_value};

/// The result of checking a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Every key's history is linearizable.
    Ok,
    /// Some key's history is not linearizable; the report says why.
    Illegal(Box<IllegalReport>),
    /// The checker ran out of budget before it could decide.
    Unknown {
        /// The key being checked when the budget ran out.
        key: String,
        /// Which budget ran out.
        reason: UnknownReason,
    },
}

impl CheckOutcome {
    /// Whether the history was found linearizable.
    pub fn is_ok(&self) -> bool {
        matches!(self, CheckOutcome::Ok)
    }

    /// Whether the history was found not linearizable.
    pub fn is_illegal(&self) -> bool {
        matches!(self, CheckOutcome::Illegal(_))
    }
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckOutcome::Ok => f.write_str("linearizable"),
            CheckOutcome::Illegal(report) => report.fmt(f),
            CheckOutcome::Unknown { key, reason } => {
                write!(f, "unknown: {reason} while checking key {key:?}")
            }
        }
    }
}

/// Which budget of [`CheckConfig`](super::CheckConfig) ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownReason {
    /// The time budget passed.
    TimeBudget,
    /// The memoisation cache reached its size limit.
    CacheFull,
}

impl fmt::Display for UnknownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnknownReason::TimeBudget => "the time budget ran out",
            UnknownReason::CacheFull => "the cache size limit was reached",
        })
    }
}

/// An operation of the checked history, with its index in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedOperation {
    /// Index of the operation in the history given to the checker.
    pub index: usize,
    /// The operation.
    pub operation: Operation,
}

/// An operation that could not be the next one after the longest
/// linearizable prefix, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockedOperation {
    /// The operation.
    pub operation: ReportedOperation,
    /// Why it cannot come next (in the state after the prefix).
    pub reason: String,
}

/// Why one key's history is not linearizable.
///
/// The checker found no order of the key's operations that respects real
/// time and the model. The report gives the longest prefix of such an order
/// it found, the key's state after that prefix, and every returned operation
/// that could come next in real-time order, each with the reason it cannot
/// (operations that never returned are not listed: they can always go last).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IllegalReport {
    /// The key whose history is not linearizable.
    pub key: String,
    /// How many operations on this key took part in the search.
    pub operations_on_key: usize,
    /// The longest linearizable prefix found, in linearization order.
    pub linearized: Vec<ReportedOperation>,
    /// The key's state after `linearized`.
    pub state_after: ModelState,
    /// The returned operations that could come next in real-time order; none can.
    pub blocked: Vec<BlockedOperation>,
    /// How many further blocked operations were left out of `blocked`.
    pub blocked_omitted: usize,
}

/// How many operations of the prefix the text report shows.
const PREFIX_SHOWN_MAX: usize = 10;

impl fmt::Display for IllegalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "not linearizable: key {:?} ({} operations checked on it)",
            self.key, self.operations_on_key
        )?;
        let state = if self.state_after.version == 0 {
            "the key is missing".to_owned()
        } else {
            format!(
                "the key holds {} at version {}",
                show_value(&self.state_after.value),
                self.state_after.version
            )
        };
        writeln!(
            f,
            "longest linearizable prefix: {} operations, after which {state}",
            self.linearized.len()
        )?;
        let skipped = self.linearized.len().saturating_sub(PREFIX_SHOWN_MAX);
        if skipped > 0 {
            writeln!(f, "  … {skipped} earlier operations")?;
        }
        for operation in &self.linearized[skipped..] {
            writeln!(f, "  {}", DisplayOperation(operation))?;
        }
        writeln!(f, "no operation can come next:")?;
        for blocked in &self.blocked {
            writeln!(
                f,
                "  {}\n      {}",
                DisplayOperation(&blocked.operation),
                blocked.reason
            )?;
        }
        if self.blocked_omitted > 0 {
            writeln!(f, "  … and {} more", self.blocked_omitted)?;
        }
        Ok(())
    }
}

/// One line for an operation: index, client, input, output and interval.
struct DisplayOperation<'a>(&'a ReportedOperation);

impl fmt::Display for DisplayOperation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ReportedOperation { index, operation } = self.0;
        write!(f, "#{index} client {}: ", operation.client)?;
        match &operation.input {
            KvCommand::Get { .. } => write!(f, "get")?,
            KvCommand::Put { value, version, .. } => {
                write!(f, "put({}, version {version})", show_value(value))?
            }
        }
        let call = Duration::from_nanos(operation.call_ns);
        match &operation.completion {
            None => write!(f, " -> never returned  [called {call:?}]"),
            Some(completion) => {
                let output = match &completion.output {
                    KvReply::Put(Ok(())) => "OK".to_owned(),
                    KvReply::Get(Ok(found)) => {
                        format!("{} at version {}", show_value(&found.value), found.version)
                    }
                    KvReply::Put(Err(error)) | KvReply::Get(Err(error)) => short_error(error),
                };
                let returned = Duration::from_nanos(completion.return_ns);
                write!(f, " -> {output}  [{call:?} .. {returned:?}]")
            }
        }
    }
}

fn short_error(error: &KvError) -> String {
    match error {
        KvError::NoKey => "ErrNoKey".to_owned(),
        KvError::Version => "ErrVersion".to_owned(),
        KvError::Maybe => "ErrMaybe".to_owned(),
        other => other.to_string(),
    }
}

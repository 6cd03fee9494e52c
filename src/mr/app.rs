//! The application interface: what a user implements to run a MapReduce job.

use std::fmt;

/// An error returned by an application's map, combine or reduce function. It fails the task
/// (which the coordinator retries up to `task_failures_max` times).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppError {
    message: String,
}

impl AppError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        AppError {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for AppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AppError {}

/// A MapReduce application: a map function, a reduce function and an optional combiner.
///
/// Keys and values are byte strings. The value encoding between map, combine and reduce is the
/// application's own business (the built-in `wc` uses 8-byte little-endian counts); only the
/// reduce output is text, written as one `key value` line per key.
///
/// Contract:
/// - `map` is called with whole lines: a file is split at line boundaries into map tasks, and
///   a map task hands its byte range to `map` in chunks of about `map_chunk_bytes`, each ending
///   at a line boundary (or at the end of the file). A file no larger than both the split size
///   and the chunk size is passed in one call, exactly as the reference labs do; `filename` is
///   the input path as given to the job.
/// - `reduce` is called once per distinct key, in byte order of keys within a reduce task, with
///   every value emitted for that key (or combined from them) in an unspecified but
///   deterministic order.
/// - Map and reduce may run more than once for the same input (retries, timeouts); only one
///   run's output is used.
pub trait App: Send + Sync {
    /// The application's registered name (workers of different applications must not join the
    /// same job).
    fn name(&self) -> &str;

    /// Emits key/value pairs for `contents`, a run of whole lines of `filename`.
    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError>;

    /// Reduces all values of `key` to one output value, appended to `output` (which arrives
    /// empty). The output line is `key`, a space, `output`, a newline.
    fn reduce(
        &self,
        key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError>;

    /// The combiner, if the application has one. Default: none.
    fn combiner(&self) -> Option<&dyn Combiner> {
        None
    }
}

/// Merges values of one key on the map side so that less data goes to the reduce tasks.
///
/// The combined value must be in the same encoding as a value map emits, and `reduce` must
/// produce the same output whether the combiner ran zero, one or many times on any grouping of
/// the values (the operation must be associative and commutative).
pub trait Combiner: Send + Sync {
    /// Folds `value` into `accumulator`, both values of `key`.
    fn combine(&self, key: &[u8], accumulator: &mut Vec<u8>, value: &[u8]) -> Result<(), AppError>;

    /// Declares that [`combine`](Combiner::combine) is a standard operation, which the map task
    /// then runs itself on a native representation instead of calling `combine` once per value
    /// (`wc` spends most of its map time combining). Only an optimisation: the declared
    /// operation must compute exactly what `combine` computes. Default: none.
    fn op(&self) -> Option<CombineOp> {
        None
    }
}

/// A combine operation the map task knows how to run natively (see [`Combiner::op`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CombineOp {
    /// Every value is a u64 as 8 little-endian bytes and combining is checked addition. A value
    /// of another length, or a sum over `u64::MAX`, fails the map task.
    SumU64Le,
}

/// Where map sends its key/value pairs.
///
/// Emitting never fails from the application's point of view: an error of the underlying sink
/// (a full disk, an oversized record) is kept and fails the task after `map` returns; further
/// pairs are dropped until then.
pub struct Emitter<'a> {
    sink: &'a mut dyn FnMut(&[u8], &[u8]),
}

impl<'a> Emitter<'a> {
    /// An emitter that hands every pair to `sink` (for example a closure collecting into a
    /// `Vec`, to unit-test a map function).
    pub fn new(sink: &'a mut dyn FnMut(&[u8], &[u8])) -> Self {
        Emitter { sink }
    }

    /// Emits one key/value pair.
    #[inline]
    pub fn emit(&mut self, key: &[u8], value: &[u8]) {
        (self.sink)(key, value);
    }
}

/// A source of the values of one key, one at a time. Implemented by the reduce executor's
/// in-memory groups and merge streams, and by slice iterators (for unit tests).
pub trait ValueSource {
    /// The next value, or `None` when the key has no more values.
    fn next_value(&mut self) -> Option<&[u8]>;
}

impl<T: AsRef<[u8]>> ValueSource for std::slice::Iter<'_, T> {
    fn next_value(&mut self) -> Option<&[u8]> {
        self.next().map(AsRef::as_ref)
    }
}

/// The values of one key, handed to `reduce`. Each value borrows a buffer that the next call
/// reuses, so values stream from disk without being collected; copy what must be kept.
///
/// A read error while streaming values ends the sequence early and fails the task after
/// `reduce` returns; the partial output is discarded.
pub struct Values<'a> {
    source: &'a mut dyn ValueSource,
}

impl<'a> Values<'a> {
    /// Values read from `source`.
    pub fn new(source: &'a mut dyn ValueSource) -> Self {
        Values { source }
    }

    /// The next value, or `None` at the end.
    #[inline]
    pub fn next_value(&mut self) -> Option<&[u8]> {
        self.source.next_value()
    }
}

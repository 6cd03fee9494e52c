//! Configuration of task execution on a worker: directories and memory budgets.

use std::path::PathBuf;

use super::error::MrError;

/// Where a worker reads and writes, and how much memory a task may use.
///
/// A map task holds about `map_chunk_bytes` of input (more only for a longer line, up to
/// `map_line_bytes_max`), a combine table of about `combine_buffer_bytes_max` and
/// `map_write_buffer_bytes` of write buffers. A reduce task holds at most
/// `sort_buffer_bytes_max` of records to sort plus one read buffer per merged run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecConfig {
    /// Directory of intermediate files `mr-<m>-a<attempt>` (shared by all workers).
    pub intermediate_dir: PathBuf,
    /// Directory of the outputs `mr-out-<r>`.
    pub output_dir: PathBuf,
    /// Input bytes handed to one map call (extended to the end of the line).
    pub map_chunk_bytes: usize,
    /// Longest input line accepted; a longer one fails the map task.
    pub map_line_bytes_max: usize,
    /// Memory for the map-side combine table; it is flushed to the write buffers when full.
    pub combine_buffer_bytes_max: usize,
    /// Write buffer of a map task, shared evenly by its R reduce tasks (at least 4 KiB each);
    /// a reduce task's buffer is written to the intermediate file as one block when full.
    pub map_write_buffer_bytes: usize,
    /// Memory for records a reduce task sorts at once; more data is spilled as sorted runs.
    pub sort_buffer_bytes_max: usize,
    /// Most runs merged at once; more runs are merged in several passes.
    pub merge_fan_in_max: usize,
    /// Largest key + value accepted from map, in bytes.
    pub record_bytes_max: usize,
    /// Apply the application's combiner (if it has one). Turning it off must not change output.
    pub use_combiner: bool,
    /// `fsync` intermediate and output files before renaming them into place, and their
    /// directory after, so a completed task survives a machine crash, not only a process crash.
    pub sync_files: bool,
}

impl ExecConfig {
    /// Defaults: outputs in `output_dir`, intermediates in `output_dir/.mr-intermediate`,
    /// 4 MiB map chunks, 64 MiB longest line, 32 MiB combine table, 4 MiB of map write buffers,
    /// 64 MiB sort buffer, fan-in 64, 16 MiB records, combiner on, fsync on.
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        let output_dir = output_dir.into();
        ExecConfig {
            intermediate_dir: output_dir.join(".mr-intermediate"),
            output_dir,
            map_chunk_bytes: 4 << 20,
            map_line_bytes_max: 64 << 20,
            combine_buffer_bytes_max: 32 << 20,
            map_write_buffer_bytes: 4 << 20,
            sort_buffer_bytes_max: 64 << 20,
            merge_fan_in_max: 64,
            record_bytes_max: 16 << 20,
            use_combiner: true,
            sync_files: true,
        }
    }

    /// Checks that the limits are usable together.
    pub fn validate(&self) -> Result<(), MrError> {
        let fail = |message: String| Err(MrError::Config(message));
        if self.map_chunk_bytes == 0 {
            return fail("map_chunk_bytes must be positive".into());
        }
        if self.map_line_bytes_max < self.map_chunk_bytes {
            return fail(format!(
                "map_line_bytes_max ({}) must be at least map_chunk_bytes ({})",
                self.map_line_bytes_max, self.map_chunk_bytes
            ));
        }
        if self.merge_fan_in_max < 2 {
            return fail("merge_fan_in_max must be at least 2".into());
        }
        if self.record_bytes_max == 0 {
            return fail("record_bytes_max must be positive".into());
        }
        // Half the sort buffer holds keys and values; it must fit at least two of the largest
        // records, or a record would need a run of its own.
        if self.sort_buffer_bytes_max / 4 < self.record_bytes_max {
            return fail(format!(
                "sort_buffer_bytes_max ({}) must be at least 4 × record_bytes_max ({})",
                self.sort_buffer_bytes_max, self.record_bytes_max
            ));
        }
        Ok(())
    }
}

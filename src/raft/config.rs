//! Tunables of the Raft protocol core. Every limit the core enforces is a
//! field here, and [`Config::validate`] rejects combinations that would make
//! the protocol unsafe or unable to make progress.
//!
//! Time is counted in ticks: the driver calls [`RaftCore::tick`] at a fixed
//! period (10 ms is the intended period; the defaults below are chosen for it).
//!
//! [`RaftCore::tick`]: crate::raft::RaftCore::tick

use thiserror::Error;

/// Configuration of one [`RaftCore`](crate::raft::RaftCore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Lower bound (inclusive) of the randomized election timeout, in ticks.
    /// Also the length of the check-quorum window and of a follower's leader
    /// lease (during which it ignores vote requests). Default 30 (300 ms at 10 ms ticks).
    pub election_timeout_ticks_min: u64,
    /// Upper bound (exclusive) of the randomized election timeout, in ticks.
    /// Default 60 (600 ms at 10 ms ticks).
    pub election_timeout_ticks_max: u64,
    /// A leader sends a heartbeat to a peer after this many ticks without
    /// sending it anything. Default 10 (10 heartbeats per second per peer at
    /// 10 ms ticks, the maximum the labs allow). A commit the peer has not
    /// heard of goes with the next append, or else (typically) in a heartbeat
    /// at the next tick; if that message is lost, with a later append or
    /// idle heartbeat.
    pub heartbeat_interval_ticks: u64,
    /// Run a pre-vote round (§9.6 of Ongaro's thesis) before incrementing the
    /// term, so a partitioned node cannot disrupt the cluster. Default on.
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum within
    /// `election_timeout_ticks_min`, and followers ignore vote requests while
    /// they hear from a leader (§6.2 of the thesis). Default on.
    pub check_quorum: bool,
    /// Most entries in one append message. Default 4096.
    pub append_entries_max: usize,
    /// Most bytes of entry data in one append message (one entry is always
    /// sent, and no entry is larger than `entry_bytes_max`). Default 1 MiB.
    pub append_bytes_max: u64,
    /// Most append messages carrying entries in flight to one follower in
    /// the replicate state (pipelining). Default 64.
    pub append_inflight_max: usize,
    /// Largest command a proposal may carry, in bytes. Default 1 MiB.
    pub entry_bytes_max: u64,
    /// A leader refuses proposals while its uncommitted entries hold more
    /// than this many bytes of data. Default 64 MiB.
    pub uncommitted_bytes_max: u64,
    /// Most bytes of snapshot data in one InstallSnapshot message. Default 1 MiB.
    pub snapshot_chunk_bytes_max: u64,
    /// Largest snapshot the core accepts from the service or receives from a
    /// leader, in bytes. Default 1 GiB.
    pub snapshot_bytes_max: u64,
    /// Most bytes of committed entry data handed out in one `Ready` (one
    /// entry is always handed out). Default 64 MiB.
    pub apply_batch_bytes_max: u64,
    /// Most read-index requests a leader holds waiting for confirmation. Default 10,000.
    pub read_index_pending_max: usize,
    /// A leadership transfer that has not completed after this many ticks is
    /// abandoned and the leader accepts proposals again. Default 30.
    pub transfer_timeout_ticks: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_timeout_ticks_min: 30,
            election_timeout_ticks_max: 60,
            heartbeat_interval_ticks: 10,
            pre_vote: true,
            check_quorum: true,
            append_entries_max: 4096,
            append_bytes_max: 1 << 20,
            append_inflight_max: 64,
            entry_bytes_max: 1 << 20,
            uncommitted_bytes_max: 64 << 20,
            snapshot_chunk_bytes_max: 1 << 20,
            snapshot_bytes_max: 1 << 30,
            apply_batch_bytes_max: 64 << 20,
            read_index_pending_max: 10_000,
            transfer_timeout_ticks: 30,
        }
    }
}

/// Why a [`Config`] was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The heartbeat interval must be at least one tick.
    #[error("heartbeat_interval_ticks must be at least 1")]
    HeartbeatIntervalZero,
    /// Followers would time out between two heartbeats of a healthy leader.
    #[error(
        "election_timeout_ticks_min ({election_min}) must be greater than heartbeat_interval_ticks ({heartbeat})"
    )]
    ElectionTimeoutNotAboveHeartbeat {
        /// The configured lower bound.
        election_min: u64,
        /// The configured heartbeat interval.
        heartbeat: u64,
    },
    /// The randomized election timeout range is empty.
    #[error(
        "election_timeout_ticks_max ({max}) must be greater than election_timeout_ticks_min ({min})"
    )]
    ElectionTimeoutRangeEmpty {
        /// The configured lower bound.
        min: u64,
        /// The configured upper bound.
        max: u64,
    },
    /// A count or size limit is zero, so nothing could ever be sent or accepted.
    #[error("{field} must be at least 1")]
    LimitZero {
        /// Name of the offending field.
        field: &'static str,
    },
    /// One limit must not exceed another (e.g. an entry must fit in an append).
    #[error("{smaller} ({smaller_value}) must not exceed {larger} ({larger_value})")]
    LimitOrder {
        /// Name of the field that must be the smaller one.
        smaller: &'static str,
        /// Its value.
        smaller_value: u64,
        /// Name of the field that must be the larger one.
        larger: &'static str,
        /// Its value.
        larger_value: u64,
    },
}

impl Config {
    /// Checks every field; the core refuses to start with an invalid config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ticks == 0 {
            return Err(ConfigError::HeartbeatIntervalZero);
        }
        if self.election_timeout_ticks_min <= self.heartbeat_interval_ticks {
            return Err(ConfigError::ElectionTimeoutNotAboveHeartbeat {
                election_min: self.election_timeout_ticks_min,
                heartbeat: self.heartbeat_interval_ticks,
            });
        }
        if self.election_timeout_ticks_max <= self.election_timeout_ticks_min {
            return Err(ConfigError::ElectionTimeoutRangeEmpty {
                min: self.election_timeout_ticks_min,
                max: self.election_timeout_ticks_max,
            });
        }
        let nonzero: [(&'static str, u64); 10] = [
            ("append_entries_max", self.append_entries_max as u64),
            ("append_bytes_max", self.append_bytes_max),
            ("append_inflight_max", self.append_inflight_max as u64),
            ("entry_bytes_max", self.entry_bytes_max),
            ("uncommitted_bytes_max", self.uncommitted_bytes_max),
            ("snapshot_chunk_bytes_max", self.snapshot_chunk_bytes_max),
            ("snapshot_bytes_max", self.snapshot_bytes_max),
            ("apply_batch_bytes_max", self.apply_batch_bytes_max),
            ("read_index_pending_max", self.read_index_pending_max as u64),
            ("transfer_timeout_ticks", self.transfer_timeout_ticks),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::LimitZero { field });
            }
        }
        let ordered: [(&'static str, u64, &'static str, u64); 3] = [
            (
                "entry_bytes_max",
                self.entry_bytes_max,
                "append_bytes_max",
                self.append_bytes_max,
            ),
            (
                "entry_bytes_max",
                self.entry_bytes_max,
                "uncommitted_bytes_max",
                self.uncommitted_bytes_max,
            ),
            (
                "snapshot_chunk_bytes_max",
                self.snapshot_chunk_bytes_max,
                "snapshot_bytes_max",
                self.snapshot_bytes_max,
            ),
        ];
        for (smaller, smaller_value, larger, larger_value) in ordered {
            if smaller_value > larger_value {
                return Err(ConfigError::LimitOrder {
                    smaller,
                    smaller_value,
                    larger,
                    larger_value,
                });
            }
        }
        Ok(())
    }
}

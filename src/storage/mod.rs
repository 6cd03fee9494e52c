//! Durable state of a node: one sled database per data directory holding Raft
//! hard state, log entries and snapshots per Raft group, the versioned key/value
//! map with its applied index, and MapReduce job state.

//! Transport and request/response RPC between nodes: a simulated faulty
//! network for deterministic tests, and TCP for real clusters.

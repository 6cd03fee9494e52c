//! Versioned key/value service: the state machine, the single-node server,
//! the Clerk (with its ErrMaybe rule) and the lock built on it.

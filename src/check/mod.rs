//! Linearizability checking of recorded versioned key/value histories.

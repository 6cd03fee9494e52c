//! The versioned key/value state machine, written once as a pure function over
//! "the key's current versioned value" so that the single-node server on sled,
//! the replicated state machine on Raft and the in-memory map all share it.
//!
//! The rules (Lab 2): Put(k, v, 0) on a missing key creates it at version 1;
//! Put with the key's current version installs v and adds 1; Put with any other
//! version is ErrVersion; Put(k, v, n > 0) on a missing key is ErrNoKey; Get on
//! a missing key is ErrNoKey. No per-client state is kept.

use std::collections::HashMap;
use std::convert::Infallible;

use super::types::{KvCommand, KvError, KvReply, Versioned};

/// What applying one command to one key does: the reply to send, and the new
/// versioned value to store (`None` = leave the key unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The reply for the client.
    pub reply: KvReply,
    /// The value to install for the command's key, if it changes.
    pub install: Option<Versioned>,
}

/// Applies `command` to its key, whose current value is `current` (`None` =
/// missing). Pure and deterministic: the only place the Lab 2 rules live.
///
/// Oversized keys or values get [`KvError::TooLarge`] and change nothing.
pub fn apply(current: Option<&Versioned>, command: &KvCommand) -> Applied {
    if let Err(error) = command.check_size() {
        let reply = match command {
            KvCommand::Put { .. } => KvReply::Put(Err(error)),
            KvCommand::Get { .. } => KvReply::Get(Err(error)),
        };
        return Applied {
            reply,
            install: None,
        };
    }
    match command {
        KvCommand::Get { .. } => Applied {
            reply: KvReply::Get(current.cloned().ok_or(KvError::NoKey)),
            install: None,
        },
        KvCommand::Put { value, version, .. } => {
            let current_version = current.map_or(0, |stored| stored.version);
            if current.is_some() {
                // A stored key always has a version ≥ 1; 0 would make it look missing.
                assert!(current_version >= 1, "stored key with version 0");
            }
            if *version == current_version {
                let next = current_version
                    .checked_add(1)
                    .expect("key version overflowed u64");
                Applied {
                    reply: KvReply::Put(Ok(())),
                    install: Some(Versioned {
                        value: value.clone(),
                        version: next,
                    }),
                }
            } else if current.is_none() {
                // Here `version` > 0, since version 0 matched the missing key above.
                Applied {
                    reply: KvReply::Put(Err(KvError::NoKey)),
                    install: None,
                }
            } else {
                Applied {
                    reply: KvReply::Put(Err(KvError::Version)),
                    install: None,
                }
            }
        }
    }
}

/// A map from keys to versioned values that [`execute`] can run commands on.
/// Implemented by [`MemoryKv`]; a sled-backed map implements it too.
///
/// Contract: `install` must make the value visible to every later `load`
/// (and, for a durable map, durable before the caller replies to a client).
/// Callers must run `execute` for one key at a time (`&mut self` enforces it
/// for one map), otherwise a concurrent Put could read a stale version.
pub trait VersionedMap {
    /// Error of the underlying storage.
    type Error;
    /// The current value of `key`, or `None` if it does not exist.
    fn load(&self, key: &str) -> Result<Option<Versioned>, Self::Error>;
    /// Stores `value` as the current value of `key`.
    fn install(&mut self, key: &str, value: Versioned) -> Result<(), Self::Error>;
}

/// Runs `command` against `map`: load the key, [`apply`], install the result.
pub fn execute<M: VersionedMap>(map: &mut M, command: &KvCommand) -> Result<KvReply, M::Error> {
    let current = map.load(command.key())?;
    let applied = apply(current.as_ref(), command);
    if let Some(value) = applied.install {
        map.install(command.key(), value)?;
    }
    Ok(applied.reply)
}

/// An in-memory versioned key/value map: the state machine for tests, the
/// simulated server and the replicated service's in-memory state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryKv {
    entries: HashMap<String, Versioned>,
}

impl MemoryKv {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one command and returns the reply.
    pub fn apply(&mut self, command: &KvCommand) -> KvReply {
        match execute(self, command) {
            Ok(reply) => reply,
            Err(never) => match never {},
        }
    }

    /// The current value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<&Versioned> {
        self.entries.get(key)
    }

    /// Sets `key` to `value` as is (any version): rebuilds a map from a
    /// snapshot. Not a state-machine operation.
    pub fn restore(&mut self, key: String, value: Versioned) {
        self.entries.insert(key, value);
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All keys with their values, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Versioned)> {
        self.entries
            .iter()
            .map(|(key, value)| (key.as_str(), value))
    }
}

impl VersionedMap for MemoryKv {
    type Error = Infallible;

    fn load(&self, key: &str) -> Result<Option<Versioned>, Infallible> {
        Ok(self.entries.get(key).cloned())
    }

    fn install(&mut self, key: &str, value: Versioned) -> Result<(), Infallible> {
        // Installs only ever move a key forward by exactly one version.
        let previous = self.entries.get(key).map_or(0, |stored| stored.version);
        assert_eq!(value.version, previous + 1, "non-sequential install");
        match self.entries.get_mut(key) {
            Some(stored) => *stored = value,
            None => {
                self.entries.insert(key.to_owned(), value);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::kv::types::{KEY_BYTES_MAX, SizeLimitedField, VALUE_BYTES_MAX, Version};

    fn put(key: &str, value: &'static str, version: Version) -> KvCommand {
        KvCommand::Put {
            key: key.into(),
            value: Bytes::from_static(value.as_bytes()),
            version,
        }
    }

    fn get(key: &str) -> KvCommand {
        KvCommand::Get { key: key.into() }
    }

    fn found(value: &'static str, version: Version) -> KvReply {
        KvReply::Get(Ok(Versioned {
            value: Bytes::from_static(value.as_bytes()),
            version,
        }))
    }

    // Put(k, v, 0) on a missing key creates it at version 1.
    #[test]
    fn put_version_zero_creates_at_version_one() {
        let mut kv = MemoryKv::new();
        assert_eq!(kv.apply(&put("k", "a", 0)), KvReply::Put(Ok(())));
        assert_eq!(kv.apply(&get("k")), found("a", 1));
    }

    // A Put with the current version installs the value and adds 1.
    #[test]
    fn put_current_version_installs_and_increments() {
        let mut kv = MemoryKv::new();
        kv.apply(&put("k", "a", 0));
        assert_eq!(kv.apply(&put("k", "b", 1)), KvReply::Put(Ok(())));
        assert_eq!(kv.apply(&get("k")), found("b", 2));
        assert_eq!(kv.apply(&put("k", "", 2)), KvReply::Put(Ok(())));
        assert_eq!(kv.apply(&get("k")), found("", 3));
    }

    // A Put with a version other than the current one (older, newer or 0) is ErrVersion and changes nothing.
    #[test]
    fn put_other_version_is_err_version() {
        let mut kv = MemoryKv::new();
        kv.apply(&put("k", "a", 0));
        kv.apply(&put("k", "b", 1));
        for wrong in [0, 1, 3, 100] {
            assert_eq!(
                kv.apply(&put("k", "x", wrong)),
                KvReply::Put(Err(KvError::Version)),
                "version {wrong}"
            );
        }
        assert_eq!(kv.apply(&get("k")), found("b", 2));
    }

    // Put(k, v, n > 0) on a missing key is ErrNoKey and does not create the key.
    #[test]
    fn put_positive_version_on_missing_key_is_err_no_key() {
        let mut kv = MemoryKv::new();
        assert_eq!(
            kv.apply(&put("k", "", 1)),
            KvReply::Put(Err(KvError::NoKey))
        );
        assert!(kv.is_empty());
        assert_eq!(kv.apply(&get("k")), KvReply::Get(Err(KvError::NoKey)));
    }

    // Get on a missing key is ErrNoKey; keys are independent.
    #[test]
    fn get_missing_key_is_err_no_key() {
        let mut kv = MemoryKv::new();
        kv.apply(&put("a", "1", 0));
        assert_eq!(kv.apply(&get("b")), KvReply::Get(Err(KvError::NoKey)));
        assert_eq!(kv.apply(&get("a")), found("1", 1));
        assert_eq!(kv.len(), 1);
    }

    // Oversized keys and values are rejected with TooLarge and change nothing.
    #[test]
    fn oversized_commands_are_rejected() {
        let mut kv = MemoryKv::new();
        let big_value = KvCommand::Put {
            key: "k".into(),
            value: Bytes::from(vec![0u8; VALUE_BYTES_MAX + 1]),
            version: 0,
        };
        assert_eq!(
            kv.apply(&big_value),
            KvReply::Put(Err(KvError::TooLarge {
                field: SizeLimitedField::Value,
                len: VALUE_BYTES_MAX as u64 + 1,
                max: VALUE_BYTES_MAX as u64,
            }))
        );
        let big_key = get(&"k".repeat(KEY_BYTES_MAX + 1));
        assert!(matches!(
            kv.apply(&big_key),
            KvReply::Get(Err(KvError::TooLarge {
                field: SizeLimitedField::Key,
                ..
            }))
        ));
        assert!(kv.is_empty());
    }

    // The pure function reports exactly the value to install, and nothing for Gets and failures.
    #[test]
    fn apply_reports_the_install() {
        let current = Versioned {
            value: Bytes::from_static(b"a"),
            version: 5,
        };
        let applied = apply(Some(&current), &put("k", "b", 5));
        assert_eq!(
            applied.install,
            Some(Versioned {
                value: Bytes::from_static(b"b"),
                version: 6
            })
        );
        assert_eq!(apply(Some(&current), &put("k", "b", 4)).install, None);
        assert_eq!(apply(Some(&current), &get("k")).install, None);
        assert_eq!(apply(None, &put("k", "b", 4)).install, None);
    }

    // A map whose storage fails passes the error through and installs nothing.
    #[test]
    fn execute_propagates_storage_errors() {
        struct Broken;
        impl VersionedMap for Broken {
            type Error = &'static str;
            fn load(&self, _key: &str) -> Result<Option<Versioned>, &'static str> {
                Ok(None)
            }
            fn install(&mut self, _key: &str, _value: Versioned) -> Result<(), &'static str> {
                Err("disk full")
            }
        }
        assert_eq!(execute(&mut Broken, &put("k", "a", 0)), Err("disk full"));
        assert_eq!(
            execute(&mut Broken, &get("k")),
            Ok(KvReply::Get(Err(KvError::NoKey)))
        );
    }
}

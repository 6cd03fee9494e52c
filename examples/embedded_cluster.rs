//! Embedding raftkv: an application with its own replicated state machine (a
//! bank ledger), run as a 3-node cluster inside one process over TCP on
//! loopback, each node on its own sled store. Run it with
//! `cargo run --release --example embedded_cluster`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::rsm::{CodecError, Rsm, RsmConfig, StateMachine, SubmitError};
use raftkv::storage::Store;
use serde::{Deserialize, Serialize};

/// The application's commands: what goes into the replicated log.
#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Deposit {
        account: String,
        amount: u64,
    },
    Transfer {
        from: String,
        to: String,
        amount: u64,
    },
}

/// The application's state: every replica applies the same ops in the same order.
#[derive(Default)]
struct Ledger {
    balances: BTreeMap<String, u64>,
}

impl StateMachine for Ledger {
    type Command = Op;
    /// The new balance of the account credited, or why the op was refused.
    type Output = Result<u64, String>;

    fn encode_command(op: &Op) -> Bytes {
        postcard::to_allocvec(op).expect("ops encode").into()
    }

    fn decode_command(data: &[u8]) -> Result<Op, CodecError> {
        postcard::from_bytes(data).map_err(|error| CodecError::new("op", error))
    }

    fn apply(&mut self, _index: u64, op: Op) -> Result<u64, String> {
        match op {
            Op::Deposit { account, amount } => {
                let balance = self.balances.entry(account).or_default();
                *balance += amount;
                Ok(*balance)
            }
            Op::Transfer { from, to, amount } => {
                let available = self.balances.get(&from).copied().unwrap_or(0);
                if available < amount {
                    return Err(format!("{from} has {available}, cannot send {amount}"));
                }
                self.balances.insert(from, available - amount);
                let balance = self.balances.entry(to).or_default();
                *balance += amount;
                Ok(*balance)
            }
        }
    }

    fn snapshot(&self) -> Bytes {
        postcard::to_allocvec(&self.balances)
            .expect("maps encode")
            .into()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.balances = postcard::from_bytes(data).map_err(|e| CodecError::new("ledger", e))?;
        Ok(())
    }
}

/// Submits `op` to whichever node leads, retrying while an election runs.
async fn submit(nodes: &[Rsm<Ledger>], op: Op) -> Result<u64, String> {
    loop {
        for node in nodes {
            match node.submit(&op).await {
                Ok(output) => return output,
                Err(SubmitError::NotLeader { .. } | SubmitError::LeadershipLost { .. }) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // no leader yet
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = tempfile::tempdir()?;
    let ids = [1, 2, 3];
    // One TCP transport per node on a free loopback port; then each learns the others' addresses.
    let mut transports = Vec::new();
    for id in ids {
        let config = TcpConfig::member(0xba2c, id, "127.0.0.1:0".parse()?);
        transports.push(TcpTransport::start(config).await?);
    }
    for transport in &transports {
        for (id, peer) in ids.iter().zip(&transports) {
            transport.set_peer_address(*id, peer.local_address().expect("members listen"));
        }
    }
    // One replica per node, each on its own store; snapshots keep the log under 64 KiB.
    let mut nodes = Vec::new();
    for (id, transport) in ids.iter().zip(&transports) {
        let store = Store::open(data.path().join(format!("node-{id}")))?;
        let mut config = RsmConfig {
            maxraftstate_bytes: Some(64 * 1024),
            ..RsmConfig::default()
        };
        config.node.rng_seed = *id;
        nodes.push(Rsm::start(
            *id,
            &ids,
            config,
            store,
            transport.endpoint(),
            Ledger::default(),
        )?);
    }

    let deposit = |account: &str, amount| Op::Deposit {
        account: account.into(),
        amount,
    };
    let transfer = |from: &str, to: &str, amount| Op::Transfer {
        from: from.into(),
        to: to.into(),
        amount,
    };
    assert_eq!(submit(&nodes, deposit("alice", 100)).await, Ok(100));
    assert_eq!(submit(&nodes, transfer("alice", "bob", 30)).await, Ok(30));
    let refused = submit(&nodes, transfer("bob", "carol", 50)).await;
    assert_eq!(refused, Err("bob has 30, cannot send 50".to_string()));

    // A linearizable read (ReadIndex) on the leader, then every replica's own copy.
    let leader = nodes.iter().find(|n| n.node().state().1).expect("a leader");
    let alice = leader
        .read(|ledger| ledger.balances.get("alice").copied())
        .await?;
    assert_eq!(alice, Some(70));
    let applied = leader.applied_index();
    for node in &nodes {
        node.wait_applied(applied).await?;
        let balances = node.read_local(|ledger| ledger.balances.clone());
        println!("node {}: {balances:?}", node.node().id());
        assert_eq!(balances.get("bob"), Some(&30));
    }
    for node in &nodes {
        node.shutdown().await;
    }
    for transport in &transports {
        transport.endpoint().shutdown().await;
    }
    Ok(())
}

//! Message types and cluster builders shared by the net test suites.
#![allow(dead_code)]

use std::sync::Arc;

use raftkv::NodeId;
use raftkv::net::sim::{SimConfig, SimNetwork};
use raftkv::net::tcp::{TcpConfig, TcpTransport};
use raftkv::net::{Endpoint, Kind, Message, Rpc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// A request answered with its own contents and the caller's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub seq: u64,
    pub body: Vec<u8>,
}

/// The reply to [`Echo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    pub seq: u64,
    pub body: Vec<u8>,
    pub from: NodeId,
    pub server: NodeId,
}

impl Rpc for Echo {
    const KIND: Kind = Kind::new(0xf001, 1);
    type Reply = EchoReply;
}

/// A request whose handler never returns until released.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hang;

impl Rpc for Hang {
    const KIND: Kind = Kind::new(0xf002, 1);
    type Reply = ();
}

/// A one-way message carrying a sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seq(pub u64);

impl Message for Seq {
    const KIND: Kind = Kind::new(0xf003, 1);
}

/// Registers the [`Echo`] handler on `endpoint`.
pub fn serve_echo(endpoint: &Endpoint) {
    let server = endpoint.id();
    endpoint
        .register(move |from, Echo { seq, body }: Echo| async move {
            EchoReply {
                seq,
                body,
                from,
                server,
            }
        })
        .expect("echo registers once");
}

/// Registers a [`Hang`] handler: it reports on `started` when it runs and
/// returns when `release` is notified.
pub fn serve_hang(
    endpoint: &Endpoint,
    started: tokio::sync::mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
) {
    endpoint
        .register(move |_from, _: Hang| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                let _ = started.send(());
                release.notified().await;
            }
        })
        .expect("hang registers once");
}

/// Servers `1..=servers` and one client, on either network.
pub struct Cluster {
    /// Server endpoints; `servers[i]` has id `i + 1`.
    pub servers: Vec<Endpoint>,
    /// A client endpoint (not a server).
    pub client: Endpoint,
    pub sim: Option<SimNetwork>,
    pub tcp: Vec<TcpTransport>,
}

pub const CLUSTER_ID: u64 = 0x5eed;
pub const TCP_CLIENT_ID: NodeId = 1000;

impl Cluster {
    /// A reliable simulated network.
    pub fn sim(servers: usize, seed: u64) -> Cluster {
        let network = SimNetwork::new(SimConfig::new(seed));
        let servers: Vec<Endpoint> = (1..=servers as NodeId)
            .map(|id| network.add_node(id).expect("fresh id"))
            .collect();
        let client = network.add_client();
        Cluster {
            servers,
            client,
            sim: Some(network),
            tcp: Vec::new(),
        }
    }

    /// TCP members on 127.0.0.1 port 0 plus a client without listen address.
    pub async fn tcp(servers: usize) -> Cluster {
        Self::tcp_with(servers, |config| config).await
    }

    /// Like [`Cluster::tcp`], with each config adjusted by `adjust`.
    pub async fn tcp_with(servers: usize, adjust: impl Fn(TcpConfig) -> TcpConfig) -> Cluster {
        let mut transports = Vec::new();
        for id in 1..=servers as NodeId {
            let config = adjust(TcpConfig::member(
                CLUSTER_ID,
                id,
                "127.0.0.1:0".parse().expect("address"),
            ));
            transports.push(TcpTransport::start(config).await.expect("member starts"));
        }
        let client = TcpTransport::start(adjust(TcpConfig::client(CLUSTER_ID, TCP_CLIENT_ID)))
            .await
            .expect("client starts");
        for (index, transport) in transports.iter().enumerate() {
            let address = transport.local_address().expect("members listen");
            let id = index as NodeId + 1;
            client.set_peer_address(id, address);
            for other in &transports {
                other.set_peer_address(id, address);
            }
        }
        let servers = transports.iter().map(TcpTransport::endpoint).collect();
        let client_endpoint = client.endpoint();
        transports.push(client);
        Cluster {
            servers,
            client: client_endpoint,
            sim: None,
            tcp: transports,
        }
    }

    /// Crashes server `id`: a simulated crash, or a TCP shutdown.
    pub async fn crash(&self, id: NodeId) {
        match &self.sim {
            Some(network) => network.crash(id),
            None => raftkv::net::Transport::shutdown(&self.tcp[id as usize - 1]).await,
        }
    }
}

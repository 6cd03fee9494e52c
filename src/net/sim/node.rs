//! A node's transport on the simulated network.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::NodeId;
use crate::net::sim::network::{CallPlan, Delivery, Incarnation, SendAction, Shared, SimOutcome};
use crate::net::transport::{CallFuture, MessageRole, RawHandler, RawInbox, Transport};
use crate::net::{Kind, NetError};

/// How often the reference checks whether the callee of a running handler
/// died; it notices a crash only at the next check.
const DEATH_POLL: Duration = Duration::from_millis(100);

/// One incarnation's transport.
pub(super) struct SimNode {
    shared: Arc<Shared>,
    me: Arc<Incarnation>,
}

impl SimNode {
    pub(super) fn new(shared: Arc<Shared>, me: Arc<Incarnation>) -> Self {
        SimNode { shared, me }
    }
}

/// Carries one request through the network and returns what the caller sees.
async fn run_call(
    shared: Arc<Shared>,
    from: NodeId,
    to: NodeId,
    kind: Kind,
    payload: Bytes,
    plan: CallPlan,
) -> Result<Bytes, NetError> {
    match plan {
        CallPlan::Lost { wait } => {
            tokio::time::sleep(wait).await;
            shared.note(from, to, kind, SimOutcome::CallUnreachable);
            Err(NetError::NoReply { to })
        }
        CallPlan::Deliver(delivery) => {
            deliver_call(&shared, from, to, kind, payload, delivery).await
        }
    }
}

async fn deliver_call(
    shared: &Arc<Shared>,
    from: NodeId,
    to: NodeId,
    kind: Kind,
    payload: Bytes,
    delivery: Delivery,
) -> Result<Bytes, NetError> {
    let Delivery {
        target,
        delay,
        drop_request,
        drop_reply,
        reorder,
    } = delivery;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if drop_request {
        shared.note(from, to, kind, SimOutcome::RequestDropped);
        return Err(NetError::NoReply { to });
    }
    if target.dead.is_cancelled() {
        // The reference would run the dead instance's handler and then
        // suppress its reply; a dead incarnation here runs nothing.
        shared.note(from, to, kind, SimOutcome::ReplySuppressed);
        return Err(NetError::NoReply { to });
    }
    shared.count_received(from, to, kind);
    let dispatched_at = Instant::now();
    let outcome = match target.dispatch.handle(from, kind, payload) {
        Err(fault) => Some(Err(fault)),
        Ok(handler) => {
            let (done, result) = oneshot::channel();
            let dead = target.dead.clone();
            // The handler runs on its own, as on a real server: the caller
            // giving up does not stop it; a crash of the callee does.
            shared.runtime.spawn(async move {
                tokio::select! {
                    biased;
                    () = dead.cancelled() => {}
                    reply = handler => {
                        let _ = done.send(reply);
                    }
                }
            });
            tokio::select! {
                biased;
                reply = result => reply.ok(),
                () = target.dead.cancelled() => None,
            }
        }
    };
    let Some(outcome) = outcome else {
        if !target.dead.is_cancelled() {
            tracing::error!(from, to, %kind, "simulated handler ended without a reply (panicked?)");
        }
        let polls = dispatched_at.elapsed().as_millis() / DEATH_POLL.as_millis() + 1;
        let noticed_at = dispatched_at + DEATH_POLL * u32::try_from(polls).unwrap_or(u32::MAX);
        tokio::time::sleep_until(noticed_at).await;
        shared.note(from, to, kind, SimOutcome::ReplySuppressed);
        return Err(NetError::NoReply { to });
    };
    if shared.reply_suppressed(from, &target) {
        shared.note(from, to, kind, SimOutcome::ReplySuppressed);
        return Err(NetError::NoReply { to });
    }
    if drop_reply {
        shared.note(from, to, kind, SimOutcome::ReplyDropped);
        return Err(NetError::NoReply { to });
    }
    if let Some(reorder) = reorder {
        tokio::time::sleep(reorder).await;
    }
    match outcome {
        Ok(reply) => {
            shared.count_reply(from, to, kind, reply.len());
            Ok(reply)
        }
        Err(fault) => {
            shared.count_reply(from, to, kind, 0);
            Err(NetError::Refused { to, kind, fault })
        }
    }
}

/// Drains the FIFO of link `(from, to)` at each message's delivery time.
async fn pump(shared: Arc<Shared>, from: NodeId, to: NodeId) {
    let key = (from, to);
    loop {
        let next_at = {
            let mut state = shared.lock();
            let front = state
                .links
                .get(&key)
                .and_then(|link| link.queue.front().map(|message| message.deliver_at));
            match front {
                Some(at) => at,
                None => {
                    state.links.remove(&key);
                    return;
                }
            }
        };
        tokio::time::sleep_until(next_at).await;
        let message = {
            let mut guard = shared.lock();
            let state = &mut *guard;
            let link = state
                .links
                .get_mut(&key)
                .expect("a pumped link keeps its queue until its pump ends");
            let message = link
                .queue
                .pop_front()
                .expect("only the pump removes queued messages");
            let outcome = if message.target.dead.is_cancelled() {
                SimOutcome::MessageDropped
            } else {
                SimOutcome::MessageDelivered
            };
            if outcome == SimOutcome::MessageDelivered {
                state.count_message(to, message.role, message.payload.len());
            }
            shared.record(state, from, to, message.kind, outcome);
            (outcome == SimOutcome::MessageDelivered).then_some(message)
        };
        if let Some(message) = message {
            let _ = message
                .target
                .dispatch
                .deliver(from, message.kind, message.payload);
        }
    }
}

impl Transport for SimNode {
    fn local_id(&self) -> NodeId {
        self.me.id
    }

    fn call(
        &self,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        timeout: Option<Duration>,
    ) -> CallFuture {
        if self.me.dead.is_cancelled() {
            return Box::pin(std::future::ready(Err(NetError::Shutdown)));
        }
        let from = self.me.id;
        let plan = self.shared.plan_call(from, to, payload.len());
        let (reply_sender, reply) = oneshot::channel();
        let shared = self.shared.clone();
        // Spawned now, so the request travels even if the caller never awaits.
        self.shared.runtime.spawn(async move {
            let result = run_call(shared, from, to, kind, payload, plan).await;
            let _ = reply_sender.send(result);
        });
        let timeout = timeout.or(self.shared.config.call_timeout);
        let dead = self.me.dead.clone();
        Box::pin(async move {
            let reply = async { reply.await.unwrap_or(Err(NetError::NoReply { to })) };
            let reply = async {
                match timeout {
                    Some(timeout) => tokio::time::timeout(timeout, reply)
                        .await
                        .unwrap_or(Err(NetError::NoReply { to })),
                    None => reply.await,
                }
            };
            tokio::select! {
                biased;
                result = reply => result,
                () = dead.cancelled() => Err(NetError::Shutdown),
            }
        })
    }

    fn send(
        &self,
        to: NodeId,
        kind: Kind,
        payload: Bytes,
        role: MessageRole,
    ) -> Result<(), NetError> {
        if self.me.dead.is_cancelled() {
            return Err(NetError::Shutdown);
        }
        let from = self.me.id;
        match self.shared.plan_send(from, to, kind, payload.clone(), role) {
            SendAction::Done => {}
            SendAction::DeliverNow(target) => {
                let _ = target.dispatch.deliver(from, kind, payload);
            }
            SendAction::StartPump => {
                self.shared
                    .runtime
                    .spawn(pump(self.shared.clone(), from, to));
            }
            SendAction::DeliverAfter { target, delay } => {
                let shared = self.shared.clone();
                self.shared.runtime.spawn(async move {
                    tokio::time::sleep(delay).await;
                    let delivered = {
                        let mut guard = shared.lock();
                        let state = &mut *guard;
                        let alive = !target.dead.is_cancelled();
                        if alive {
                            state.count_message(to, role, payload.len());
                        }
                        let outcome = if alive {
                            SimOutcome::MessageDelivered
                        } else {
                            SimOutcome::MessageDropped
                        };
                        shared.record(state, from, to, kind, outcome);
                        alive
                    };
                    if delivered {
                        let _ = target.dispatch.deliver(from, kind, payload);
                    }
                });
            }
        }
        Ok(())
    }

    fn register(&self, kind: Kind, handler: RawHandler) -> Result<(), NetError> {
        self.me.dispatch.register(kind, handler)
    }

    fn open_inbox(&self, kind: Kind, capacity_messages: usize) -> Result<RawInbox, NetError> {
        self.me.dispatch.open_inbox(kind, capacity_messages)
    }

    fn shutdown(&self) -> BoxFuture<'static, ()> {
        self.shared.kill(&self.me);
        Box::pin(std::future::ready(()))
    }
}

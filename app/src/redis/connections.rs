//! The connections to Redis, to one server or to a cluster: [`Publisher`] for commands (the
//! history scripts) and [`open`] for the subscriber's pub/sub connection.
//!
//! With one server, the subscription is a RESP2 pub/sub connection (`SUBSCRIBE`) and the
//! publisher a reconnecting multiplexed connection. With a cluster (see `cluster`), both are
//! cluster connections that route every command by hash slot and follow the slot map as it
//! changes: a room's script runs on the shard that owns its keys, and its channel is a shard
//! channel (`SSUBSCRIBE`, one command per channel, since one may only name channels of one
//! slot), subscribed on the node that owns it. The subscription's [`Event`]s are the same
//! either way, plus the two a cluster adds: a node's connection lost ([`Event::Lost`]) and a
//! shard channel the server dropped because its slot moved to another node
//! ([`Event::Dropped`]).

use futures_util::StreamExt;
use futures_util::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, Msg, Pipeline, PushInfo, PushKind, RedisFuture, RedisResult, Value};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::server::RedisServer;

/// The connection every room publishes and reads its history on; cheap to clone.
#[derive(Clone)]
pub enum Publisher {
    /// One server, reconnecting on failure.
    Single(ConnectionManager),
    /// A cluster, each command routed to the node owning its keys.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Publisher {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Publisher::Single(c) => c.req_packed_command(cmd),
            Publisher::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Publisher::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Publisher::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Publisher::Single(c) => c.get_db(),
            Publisher::Cluster(c) => c.get_db(),
        }
    }
}

/// What the subscription brings.
pub enum Event {
    /// A message on a subscribed channel.
    Message(Msg),
    /// The server unsubscribed this shard channel (its slot moved to another node).
    Dropped(String),
    /// A cluster node's connection was lost: subscriptions on it may be gone.
    Lost,
}

/// The subscription's outgoing side: subscribes, unsubscribes and pings.
pub enum Subscriptions {
    /// One server's pub/sub connection.
    Single(PubSubSink),
    /// A cluster connection that routes each shard channel to its node.
    Cluster(ClusterConnection),
}

/// The subscription's incoming side.
pub enum Inbox {
    /// One server's messages.
    Single(PubSubStream),
    /// Every push message of the cluster connection.
    Cluster(UnboundedReceiver<PushInfo>),
}

/// Opens the subscriber's connection to `server`.
pub async fn open(server: &RedisServer) -> RedisResult<(Subscriptions, Inbox)> {
    match server {
        RedisServer::Single(client) => {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            Ok((Subscriptions::Single(sink), Inbox::Single(stream)))
        }
        RedisServer::Cluster(seeds) => {
            let (tx, rx) = unbounded_channel();
            let connection = seeds.client(Some(tx))?.get_async_connection().await?;
            Ok((Subscriptions::Cluster(connection), Inbox::Cluster(rx)))
        }
    }
}

impl Subscriptions {
    /// Subscribes to `channels`.
    pub async fn subscribe(&mut self, channels: &[&str]) -> RedisResult<()> {
        match self {
            Subscriptions::Single(sink) => sink.subscribe(channels).await,
            Subscriptions::Cluster(connection) => {
                try_join_all(channels.iter().map(|channel| {
                    let mut connection = connection.clone();
                    async move { connection.ssubscribe(*channel).await }
                }))
                .await?;
                Ok(())
            }
        }
    }

    /// Unsubscribes from `channels`.
    pub async fn unsubscribe(&mut self, channels: &[String]) -> RedisResult<()> {
        match self {
            Subscriptions::Single(sink) => sink.unsubscribe(channels).await,
            Subscriptions::Cluster(connection) => {
                try_join_all(channels.iter().map(|channel| {
                    let mut connection = connection.clone();
                    async move { connection.sunsubscribe(channel).await }
                }))
                .await?;
                Ok(())
            }
        }
    }

    /// Checks that the connection (every primary's, for a cluster) answers.
    pub async fn ping(&mut self) -> RedisResult<()> {
        match self {
            Subscriptions::Single(sink) => sink.ping::<Value>().await.map(drop),
            Subscriptions::Cluster(connection) => connection
                .route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    )),
                )
                .await
                .map(drop),
        }
    }
}

impl Inbox {
    /// The next event; `None` when the connection is gone.
    pub async fn next(&mut self) -> Option<Event> {
        match self {
            Inbox::Single(stream) => stream.next().await.map(Event::Message),
            Inbox::Cluster(rx) => loop {
                let push = rx.recv().await?;
                if let Some(event) = cluster_event(push) {
                    return Some(event);
                }
            },
        }
    }
}

/// What a cluster push message means to the subscriber, if anything (subscription
/// confirmations do not matter to it).
fn cluster_event(push: PushInfo) -> Option<Event> {
    match push.kind {
        PushKind::SMessage | PushKind::Message => Msg::from_push_info(push).map(Event::Message),
        PushKind::SUnsubscribe => match push.data.first() {
            Some(Value::BulkString(channel)) => Some(Event::Dropped(
                String::from_utf8_lossy(channel).into_owned(),
            )),
            _ => None,
        },
        PushKind::Disconnection => Some(Event::Lost),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(kind: PushKind, data: &[&[u8]]) -> PushInfo {
        PushInfo {
            kind,
            data: data.iter().map(|d| Value::BulkString(d.to_vec())).collect(),
        }
    }

    #[test]
    fn cluster_pushes_become_the_events_the_subscriber_acts_on() {
        match cluster_event(push(PushKind::SMessage, &[b"simple-chat:r", b"{}"])) {
            Some(Event::Message(m)) => {
                assert_eq!(m.get_channel_name(), "simple-chat:r");
                assert_eq!(m.get_payload_bytes(), b"{}");
            }
            _ => panic!("a shard message is a message"),
        }
        assert!(matches!(
            cluster_event(push(PushKind::SUnsubscribe, &[b"simple-chat:r"])),
            Some(Event::Dropped(channel)) if channel == "simple-chat:r"
        ));
        assert!(matches!(
            cluster_event(push(PushKind::Disconnection, &[])),
            Some(Event::Lost)
        ));
        assert!(cluster_event(push(PushKind::SSubscribe, &[b"simple-chat:r"])).is_none());
    }
}

//! A real Redis Cluster on loopback: `redis-server --cluster-enabled yes` nodes on ephemeral
//! ports (client and bus), joined with `redis-cli --cluster create`, each in its own directory
//! with an append-only file. A test can ask which primary owns a key or channel, kill a node
//! (its replica takes over), and move a slot to another primary under load the way
//! `redis-cli --cluster reshard` does (`SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE`,
//! `SETSLOT NODE`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use redis::aio::MultiplexedConnection;
use tempfile::TempDir;
use tokio::process::Command;

use testkit::process::{Proc, Ready, system_bin};
use testkit::redis::free_port;
use testkit::wait::eventually;

/// How long a node takes to suspect a silent peer (a failover follows about twice that).
const NODE_TIMEOUT: Duration = Duration::from_millis(2000);
/// Longest wait for the cluster to agree on its shape (after creation, failover, migration).
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// One node.
struct Node {
    port: u16,
    bus: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// A running cluster.
pub struct RedisCluster {
    _dir: TempDir,
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` primaries with `replicas` replicas each, and waits until every node
    /// reports the cluster up with all slots served.
    pub async fn start(masters: usize, replicas: usize) -> Result<RedisCluster> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut node = Node {
                port: free_port()?,
                bus: free_port()?,
                dir: node_dir,
                proc: None,
            };
            node.spawn().await?;
            nodes.push(node);
        }
        let cluster = RedisCluster { _dir: dir, nodes };
        let mut create = Command::new(system_bin("redis-cli", "redis-tools")?);
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .context("cannot run redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_settled().await?;
        Ok(cluster)
    }

    /// The URL an app uses: every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The process ids of the running nodes, in node order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().and_then(Proc::pid))
            .collect()
    }

    /// A plain connection to node `i`.
    pub async fn node(&self, i: usize) -> Result<MultiplexedConnection> {
        let port = self
            .nodes
            .get(i)
            .ok_or_else(|| anyhow!("no node {i}"))?
            .port;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// The hash slot of a key or shard channel.
    pub async fn slot(&self, key: &str) -> Result<u16> {
        let mut conn = self.any_live().await?;
        Ok(redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await?)
    }

    /// The node (index) that owns `slot`, as a live node sees it.
    pub async fn owner(&self, slot: u16) -> Result<usize> {
        let mut conn = self.any_live().await?;
        let shards: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        for shard in shards {
            let redis::Value::Array(parts) = shard else {
                continue;
            };
            let (Some(start), Some(end), Some(master)) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                continue;
            };
            let (redis::Value::Int(start), redis::Value::Int(end)) = (start, end) else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot)) {
                let redis::Value::Array(master) = master else {
                    continue;
                };
                if let Some(redis::Value::Int(port)) = master.get(1) {
                    return self
                        .nodes
                        .iter()
                        .position(|n| i64::from(n.port) == *port)
                        .ok_or_else(|| anyhow!("slot {slot} is served by unknown port {port}"));
                }
            }
        }
        bail!("no node serves slot {slot}")
    }

    /// The primaries, as node indices.
    pub async fn masters(&self) -> Result<Vec<usize>> {
        let mut masters = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_none() {
                continue;
            }
            let mut conn = self.node(i).await?;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                masters.push(i);
            }
        }
        Ok(masters)
    }

    /// Kills node `i` (SIGKILL, as a crash would).
    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes.get_mut(i)
            && let Some(mut proc) = node.proc.take()
        {
            proc.kill().await;
        }
    }

    /// Waits until a live node other than `dead` owns `slot` and every live node reports the
    /// cluster up; returns the new owner.
    pub async fn wait_failover(&self, slot: u16, dead: usize) -> Result<usize> {
        eventually(
            &format!("a replica serving slot {slot}"),
            SETTLE_WITHIN,
            || async move { Ok(self.owner(slot).await? != dead && self.settled().await?) },
        )
        .await?;
        self.owner(slot).await
    }

    /// Moves `slot`, with its keys, from its owner to primary `to`.
    pub async fn migrate(&self, slot: u16, to: usize) -> Result<()> {
        let from = self.owner(slot).await?;
        if from == to {
            bail!("node {to} already owns slot {slot}");
        }
        let (mut source, mut target) = (self.node(from).await?, self.node(to).await?);
        let (source_id, target_id) = (self.id(from).await?, self.id(to).await?);
        setslot(&mut target, slot, "IMPORTING", &source_id).await?;
        setslot(&mut source, slot, "MIGRATING", &target_id).await?;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut source)
                .await?;
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async::<()>(&mut source)
                .await
                .context("MIGRATE")?;
        }
        // The new owner first, then the old one (which then drops the slot's shard channel
        // subscriptions), then every other primary.
        setslot(&mut target, slot, "NODE", &target_id).await?;
        setslot(&mut source, slot, "NODE", &target_id).await?;
        for i in self.masters().await? {
            if i != from && i != to {
                setslot(&mut self.node(i).await?, slot, "NODE", &target_id).await?;
            }
        }
        eventually(
            &format!("the cluster agreeing on slot {slot}'s move"),
            SETTLE_WITHIN,
            || async move { Ok(self.owner(slot).await? == to && self.settled().await?) },
        )
        .await
    }

    async fn id(&self, i: usize) -> Result<String> {
        Ok(redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.node(i).await?)
            .await?)
    }

    async fn any_live(&self) -> Result<MultiplexedConnection> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.proc.is_some()
                && let Ok(conn) = self.node(i).await
            {
                return Ok(conn);
            }
        }
        bail!("no cluster node is up")
    }

    /// True when every live node reports the cluster up with every slot served, and every
    /// live replica is in sync with its primary (a replica that never synced would not take
    /// over: its data counts as too old).
    async fn settled(&self) -> Result<bool> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].proc.is_none() {
                continue;
            }
            let mut conn = self.node(i).await?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut conn)
                .await?;
            if !(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                return Ok(false);
            }
            let replication: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await?;
            if replication.contains("role:slave") && !replication.contains("master_link_status:up")
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn wait_settled(&self) -> Result<()> {
        eventually("the cluster up", SETTLE_WITHIN, || self.settled()).await
    }
}

impl Node {
    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(system_bin("redis-server", "redis-server")?);
        let dir = self.dir.to_string_lossy().into_owned();
        cmd.current_dir(&self.dir)
            .args(["--bind", "127.0.0.1", "--save", "", "--dir", &dir])
            .args(["--port", &self.port.to_string()])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &self.bus.to_string()])
            .args([
                "--cluster-node-timeout",
                &NODE_TIMEOUT.as_millis().to_string(),
            ])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"]);
        self.proc = Some(
            Proc::spawn(
                &format!("redis-server:{}", self.port),
                cmd,
                Ready::Line("Ready to accept connections"),
            )
            .await?,
        );
        Ok(())
    }
}

async fn setslot(
    conn: &mut MultiplexedConnection,
    slot: u16,
    state: &str,
    node_id: &str,
) -> Result<()> {
    redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(node_id)
        .query_async::<()>(conn)
        .await
        .with_context(|| format!("CLUSTER SETSLOT {slot} {state}"))
}

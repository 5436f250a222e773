//! Redis Cluster addresses: the `redis+cluster://` seed list and the cluster clients built from it.
//!
//! `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS)
//! names one or more seed nodes of a Redis Cluster (Redis 7 or later, or Valkey); the rest of
//! the cluster, and which node owns which hash slot, is learned from them and followed as it
//! changes. The clients speak RESP3, which sharded pub/sub (`SSUBSCRIBE`) over a cluster
//! connection needs.

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, PushInfo, RedisResult};
use tokio::sync::mpsc::UnboundedSender;

/// The cluster schemes and the node scheme each stands for.
const SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a command is retried (after a `MOVED`, a lost node, a slot without a primary during
/// a failover), and the bounds of the jittered wait before each retry, in milliseconds: short,
/// so a command finds the new primary within a fraction of a second of its promotion (the
/// crate's defaults wait at least 1.28 s per retry), and all retries together within the
/// subscriber's few seconds per attempt.
const RETRIES: u32 = 12;
const MIN_RETRY_WAIT_MS: u64 = 50;
const MAX_RETRY_WAIT_MS: u64 = 400;

/// The seed nodes of a cluster, and the CA for TLS.
#[derive(Clone)]
pub struct Seeds {
    nodes: Vec<ConnectionInfo>,
    certs: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

impl Seeds {
    /// Whether `url` names a cluster (by its scheme).
    pub fn is_cluster_url(url: &str) -> bool {
        SCHEMES
            .iter()
            .any(|(scheme, _)| starts_with_ignore_case(url, scheme))
    }

    /// The seed nodes `url` lists; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Seeds, String> {
        let (rest, node_scheme) = SCHEMES
            .iter()
            .find(|(scheme, _)| starts_with_ignore_case(url, scheme))
            .map(|(scheme, node)| (&url[scheme.len()..], *node))
            .ok_or("expected redis+cluster:// or rediss+cluster://")?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        if hosts.is_empty() {
            return Err("names no node; expected host:port[,host:port...]".into());
        }
        let mut nodes = Vec::new();
        for host in hosts.split(',') {
            if host.is_empty() {
                return Err(
                    "lists an empty node; separate host:port pairs with single commas".into(),
                );
            }
            let node_url = match userinfo {
                Some(userinfo) => format!("{node_scheme}{userinfo}@{host}{tail}"),
                None => format!("{node_scheme}{host}{tail}"),
            };
            let info = node_url.as_str().into_connection_info().map_err(|e| {
                format!(
                    "node {host} is not usable ({})",
                    e.detail().unwrap_or("invalid address")
                )
            })?;
            if info.redis_settings().db() != 0 {
                return Err("names a database; a cluster has only database 0".into());
            }
            nodes.push(info);
        }
        Ok(Seeds { nodes, certs: None })
    }

    /// Verifies the nodes' TLS certificates with the CA in `pem` instead of the system roots.
    pub fn with_ca(mut self, pem: Vec<u8>) -> Seeds {
        self.certs = Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        self
    }

    /// Whether the nodes are reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.nodes
            .first()
            .is_some_and(|node| matches!(node.addr(), ConnectionAddr::TcpTls { .. }))
    }

    /// The seed list without credentials, for logs.
    pub fn display(&self) -> String {
        let scheme = if self.is_tls() {
            "rediss+cluster://"
        } else {
            "redis+cluster://"
        };
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|node| node.addr().to_string())
            .collect();
        format!("{scheme}{}", hosts.join(","))
    }

    /// The connection every room publishes and reads history on: connects in the background,
    /// and again after losing nodes.
    pub fn publisher(&self) -> RedisResult<ClusterConnection> {
        Ok(self.client(None)?.get_pending_async_connection_with_config(
            ClusterConfig::new()
                .set_connection_timeout(CONNECT_TIMEOUT)
                .set_response_timeout(RESPONSE_TIMEOUT),
        ))
    }

    /// A client for the cluster; with `push`, every push message of its connections (sharded
    /// messages, subscription changes, lost connections) is sent there.
    pub fn client(&self, push: Option<UnboundedSender<PushInfo>>) -> RedisResult<ClusterClient> {
        let mut builder = ClusterClientBuilder::new(self.nodes.clone())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(RETRIES)
            .min_retry_wait(MIN_RETRY_WAIT_MS)
            .max_retry_wait(MAX_RETRY_WAIT_MS);
        if let Some(certs) = &self.certs {
            builder = builder.certs(certs.clone());
        }
        if let Some(push) = push {
            builder = builder.push_sender(push);
        }
        builder.build()
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    text.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_list_gives_every_node_the_credentials() {
        let seeds = Seeds::parse("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        assert_eq!(seeds.nodes.len(), 2);
        assert_eq!(seeds.nodes[1].addr().to_string(), "10.0.0.2:7001");
        for node in &seeds.nodes {
            assert_eq!(node.redis_settings().password(), Some("secret"));
        }
        assert!(!seeds.is_tls());
        assert_eq!(
            seeds.display(),
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001"
        );
        assert!(seeds.client(None).is_ok());
    }

    #[test]
    fn the_tls_scheme_gives_tls_nodes() {
        let seeds = Seeds::parse("REDISS+CLUSTER://user:pw@cache.example:6379").unwrap();
        assert!(seeds.is_tls());
        assert_eq!(seeds.nodes[0].redis_settings().username(), Some("user"));
        assert!(seeds.display().starts_with("rediss+cluster://"));
    }

    #[test]
    fn bad_seed_lists_are_refused_with_the_reason() {
        for (url, reason) in [
            ("redis+cluster://a:1,,b:2", "empty node"),
            ("redis+cluster://a:1,b:notaport", "node b:notaport"),
            ("redis+cluster://a:1/2", "database"),
            ("redis+cluster://:pw@", "names no node"),
            ("redis://a:1", "expected redis+cluster://"),
        ] {
            let e = Seeds::parse(url).err().unwrap_or_default();
            assert!(e.contains(reason), "{url}: {e}");
        }
        assert!(Seeds::is_cluster_url("Redis+Cluster://a:1"));
        assert!(!Seeds::is_cluster_url("redis://a:1"));
    }
}

#!/bin/sh
# One-shot service of compose.cluster.yaml: forms the Redis Cluster from REDIS_NODES (host:port
# ..., a multiple of 1 + REDIS_REPLICAS nodes) the first time, then waits until it serves every
# slot. A cluster already formed (the nodes keep nodes.conf in their volumes) is left as it is.
set -eu

nodes=${REDIS_NODES:?REDIS_NODES: the nodes, host:port separated by spaces}
replicas=${REDIS_REPLICAS:-1}
first=${nodes%% *}
host=${first%:*}
port=${first##*:}

info() { redis-cli -h "$host" -p "$port" cluster info | tr -d '\r' | sed -n "s/^$1:\(.*\)$/\1/p"; }

known=$(info cluster_known_nodes)
if [ "$known" = 1 ]; then
  echo "forming the cluster: $nodes, $replicas replica(s) per primary"
  # shellcheck disable=SC2086 # one argument per node
  redis-cli --cluster create $nodes --cluster-replicas "$replicas" --cluster-yes
else
  echo "$first already knows $known nodes: the cluster is formed, not creating it again"
fi

# Every slot served, and every node agreeing (a node that just joined may lag a moment).
tries=0
until [ "$(info cluster_state)" = ok ] && redis-cli --cluster check "$first" >/dev/null; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    echo "the cluster is not ok after 60 s:" >&2
    redis-cli --cluster check "$first" >&2 || true
    exit 1
  fi
  sleep 1
done
echo "cluster ok: $(info cluster_known_nodes) nodes, $(info cluster_size) shards"

# ElastiCache Redis shared by the app instances, TLS in transit, an AUTH token, encrypted at
# rest, in one of two forms:
#
#   redis_cluster_mode = false (default): a primary and a replica in the two zones. The apps
#     connect to the primary endpoint with rediss:// and the token; on failover the endpoint's
#     name moves and the apps reconnect.
#   redis_cluster_mode = true: cluster mode enabled, redis_shards shards of a primary and
#     redis_replicas_per_shard replicas each, spread over the two zones. The apps connect to the
#     configuration endpoint with rediss+cluster:// and the token, learn the slot map from it and
#     follow it (failovers, resharding); each chat room (its channel, a shard channel, and its
#     history) lives on one shard, so rooms spread the load over the shards.
#
# The chat history (a Stream per room) lives here too: a replica takes over with what it had
# replicated (asynchronously: the last writes before a failover can be lost, and the history's
# epoch then tells resuming clients their gap cannot be filled).

resource "random_password" "redis_auth" {
  count = var.redis_auth_token == null ? 1 : 0

  length  = 64
  special = false
}

locals {
  redis_auth_token = var.redis_auth_token != null ? var.redis_auth_token : random_password.redis_auth[0].result

  # What the apps connect to: the primary endpoint, or a cluster's configuration endpoint.
  redis_endpoint = (var.redis_cluster_mode
    ? aws_elasticache_replication_group.redis.configuration_endpoint_address
    : aws_elasticache_replication_group.redis.primary_endpoint_address
  )
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_elasticache_replication_group" "redis" {
  # Its own id per form: switching forms replaces the group instead of converting it in place.
  replication_group_id = var.redis_cluster_mode ? "${var.name}-redis-cluster" : "${var.name}-redis"
  description          = "${var.name} chat pub/sub"

  engine         = "redis"
  engine_version = var.redis_engine_version
  node_type      = var.redis_node_type
  port           = 6379

  # One primary and one replica, or cluster mode with its shards and their replicas (the
  # .cluster.on parameter group of the engine's family turns cluster-enabled on).
  num_cache_clusters      = var.redis_cluster_mode ? null : 2
  cluster_mode            = var.redis_cluster_mode ? "enabled" : null
  num_node_groups         = var.redis_cluster_mode ? var.redis_shards : null
  replicas_per_node_group = var.redis_cluster_mode ? var.redis_replicas_per_shard : null
  parameter_group_name    = var.redis_cluster_mode ? "default.redis${split(".", var.redis_engine_version)[0]}.cluster.on" : null

  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.redis.name
  security_group_ids = [aws_security_group.redis.id]

  transit_encryption_enabled = true
  auth_token                 = local.redis_auth_token
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.main.arn

  # Pub/sub keeps no data; one daily snapshot is cheap and keeps the backup policy uniform.
  snapshot_retention_limit   = 1
  auto_minor_version_upgrade = true
  apply_immediately          = false
}

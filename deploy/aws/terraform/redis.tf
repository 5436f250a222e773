# ElastiCache Redis shared by the app instances: a primary and a replica in the two zones,
# TLS in transit, an AUTH token, encrypted at rest. The apps connect to the primary endpoint
# with rediss:// and the token; on failover the endpoint's name moves and the apps reconnect.
# The chat history (a Stream per channel) lives here too: the replica takes over with what it
# had replicated (asynchronously: the last writes before a failover can be lost, and the
# history's epoch then tells resuming clients their gap cannot be filled).

resource "random_password" "redis_auth" {
  count = var.redis_auth_token == null ? 1 : 0

  length  = 64
  special = false
}

locals {
  redis_auth_token = var.redis_auth_token != null ? var.redis_auth_token : random_password.redis_auth[0].result
}

resource "aws_elasticache_subnet_group" "redis" {
  name       = "${var.name}-redis"
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_elasticache_replication_group" "redis" {
  replication_group_id = "${var.name}-redis"
  description          = "${var.name} chat pub/sub"

  engine         = "redis"
  engine_version = var.redis_engine_version
  node_type      = var.redis_node_type
  port           = 6379

  num_cache_clusters         = 2
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

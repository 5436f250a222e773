# The two Redis forms, planned and "applied" against a mocked aws provider (no account, no
# network): `terraform init && terraform test` here; deploy/check runs it offline when a local
# mirror holds the aws provider. ElastiCache's computed endpoints are given by overrides.

mock_provider "aws" {
  # Arguments the provider checks as ARNs get ARN-shaped mock values.
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:flow" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/instance" }
  }
  mock_resource "aws_iam_instance_profile" {
    defaults = { arn = "arn:aws:iam::123456789012:instance-profile/instance" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/mock" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{}" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
}

variables {
  ami_id           = "ami-0123456789abcdef0"
  front            = "lb"
  redis_auth_token = "t0ken-t0ken-t0ken-t0ken"
}

run "single_redis" {
  command = apply

  override_resource {
    target = aws_elasticache_replication_group.redis
    values = { primary_endpoint_address = "master.scaleout-redis.mock.cache.amazonaws.com", port = 6379 }
  }

  assert {
    condition     = aws_elasticache_replication_group.redis.replication_group_id == "scaleout-redis" && aws_elasticache_replication_group.redis.num_cache_clusters == 2
    error_message = "the default form is one replication group of a primary and a replica"
  }
  assert {
    condition     = alltrue([for app in aws_instance.app : strcontains(app.user_data, "REDIS_URL=rediss://:t0ken-t0ken-t0ken-t0ken@master.scaleout-redis.mock.cache.amazonaws.com:6379\n")])
    error_message = "the apps get rediss:// to the primary endpoint"
  }
  assert {
    condition     = output.redis_endpoint == "master.scaleout-redis.mock.cache.amazonaws.com" && output.redis_primary_endpoint == output.redis_endpoint && output.redis_configuration_endpoint == null
    error_message = "outputs of the default form"
  }
}

run "redis_cluster" {
  command   = apply
  state_key = "cluster"

  variables {
    redis_cluster_mode       = true
    redis_shards             = 4
    redis_replicas_per_shard = 2
  }

  override_resource {
    target = aws_elasticache_replication_group.redis
    values = { configuration_endpoint_address = "clustercfg.scaleout-redis-cluster.mock.cache.amazonaws.com", port = 6379 }
  }

  assert {
    condition = (
      aws_elasticache_replication_group.redis.replication_group_id == "scaleout-redis-cluster"
      && aws_elasticache_replication_group.redis.cluster_mode == "enabled"
      && aws_elasticache_replication_group.redis.num_node_groups == 4
      && aws_elasticache_replication_group.redis.replicas_per_node_group == 2
      && aws_elasticache_replication_group.redis.parameter_group_name == "default.redis7.cluster.on"
    )
    error_message = "cluster mode: its own id, 4 shards of a primary and 2 replicas, the cluster.on parameter group"
  }
  assert {
    condition = (
      aws_elasticache_replication_group.redis.transit_encryption_enabled
      && aws_elasticache_replication_group.redis.at_rest_encryption_enabled
      && aws_elasticache_replication_group.redis.automatic_failover_enabled
      && aws_elasticache_replication_group.redis.multi_az_enabled
    )
    error_message = "cluster mode keeps TLS, encryption at rest and automatic Multi-AZ failover"
  }
  assert {
    condition     = alltrue([for app in aws_instance.app : strcontains(app.user_data, "REDIS_URL=rediss+cluster://:t0ken-t0ken-t0ken-t0ken@clustercfg.scaleout-redis-cluster.mock.cache.amazonaws.com:6379\n")])
    error_message = "the apps get rediss+cluster:// to the configuration endpoint"
  }
  assert {
    condition     = output.redis_endpoint == "clustercfg.scaleout-redis-cluster.mock.cache.amazonaws.com" && output.redis_configuration_endpoint == output.redis_endpoint && output.redis_primary_endpoint == null
    error_message = "outputs of the cluster form"
  }
}

run "cluster_sizes_are_validated" {
  command = plan

  variables {
    redis_cluster_mode       = true
    redis_shards             = 0
    redis_replicas_per_shard = 6
  }

  expect_failures = [var.redis_shards, var.redis_replicas_per_shard]
}

run "a_cluster_channel_has_no_braces" {
  command = plan

  variables {
    redis_cluster_mode = true
    redis_channel      = "chat{1}"
  }

  expect_failures = [var.redis_channel]
}

run "braces_are_fine_without_a_cluster" {
  command = plan

  variables {
    redis_channel = "chat{1}"
  }
}

# What an operator needs after `terraform apply`.

output "url" {
  description = "The chat's URL."
  value       = "https://${local.front_host}/"
}

output "front" {
  description = "Which front serves the URL: alb or lb."
  value       = var.front
}

output "front_address" {
  description = "The ALB's DNS name (front = \"alb\") or the lb instance's elastic IP (front = \"lb\")."
  value       = local.front_address
}

output "app_instance_ids" {
  description = "The two app instances (aws ssm start-session --target ID when ssm_access is on)."
  value       = aws_instance.app[*].id
}

output "lb_instance_id" {
  description = "The lb instance (front = \"lb\"), null otherwise."
  value       = one(aws_instance.lb[*].id)
}

output "redis_endpoint" {
  description = "The ElastiCache endpoint the apps use (TLS and AUTH on port 6379): the primary endpoint, or with redis_cluster_mode the configuration endpoint."
  value       = local.redis_endpoint
}

output "redis_primary_endpoint" {
  description = "ElastiCache primary endpoint (TLS and AUTH on port 6379); null with redis_cluster_mode, where each shard has its own primary (see redis_configuration_endpoint)."
  value       = var.redis_cluster_mode ? null : aws_elasticache_replication_group.redis.primary_endpoint_address
}

output "redis_configuration_endpoint" {
  description = "ElastiCache configuration endpoint of the cluster (TLS and AUTH on port 6379), with redis_cluster_mode; null otherwise."
  value       = var.redis_cluster_mode ? aws_elasticache_replication_group.redis.configuration_endpoint_address : null
}

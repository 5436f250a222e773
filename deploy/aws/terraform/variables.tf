# Every input of the layout. Required: ami_id, and for front = "alb" also domain_name and
# route53_zone_name. Everything else has a default that works.

variable "name" {
  description = "Name prefix for every resource, and the Project tag."
  type        = string
  default     = "scaleout"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2 to 21 characters, lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "region" {
  description = "AWS region to deploy into (the first two available zones are used)."
  type        = string
  default     = "eu-west-1"
}

variable "availability_zones" {
  description = "The two availability zones, such as [\"eu-west-1a\", \"eu-west-1b\"]; null means the region's zones a and b."
  type        = list(string)
  default     = null

  validation {
    condition     = var.availability_zones == null ? true : length(var.availability_zones) == 2
    error_message = "availability_zones: exactly two zone names."
  }
}

variable "tags" {
  description = "Extra tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "front" {
  description = "What faces the internet: \"alb\" (an Application Load Balancer with an ACM certificate and a Route53 alias) or \"lb\" (an instance running our lb, with an elastic IP)."
  type        = string
  default     = "alb"

  validation {
    condition     = contains(["alb", "lb"], var.front)
    error_message = "front must be \"alb\" or \"lb\"."
  }
}

variable "allow_cidr" {
  description = "IPv4 CIDR blocks allowed to reach the front on 443 and 80 (0.0.0.0/0 for a public chat)."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.allow_cidr) > 0 && alltrue([for c in var.allow_cidr : can(cidrnetmask(c))])
    error_message = "allow_cidr: one or more IPv4 CIDR blocks, such as 203.0.113.0/24."
  }
}

variable "domain_name" {
  description = "Public DNS name of the chat, such as chat.example.com. Required for front = \"alb\" (the ACM certificate's name); optional for front = \"lb\" (an A record to the elastic IP)."
  type        = string
  default     = null
}

variable "route53_zone_name" {
  description = "Existing public Route53 hosted zone that holds domain_name, such as example.com. Required for front = \"alb\" (the ACM certificate is validated there); optional for front = \"lb\" (without it, point domain_name at the elastic IP yourself)."
  type        = string
  default     = null

  validation {
    condition     = var.front != "alb" || (var.domain_name != null && var.route53_zone_name != null)
    error_message = "front = \"alb\" needs domain_name and route53_zone_name: the ALB's certificate is issued by ACM and validated in that Route53 zone."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC; the four subnets are /24s carved from it."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && try(tonumber(split("/", var.vpc_cidr)[1]) <= 22, false)
    error_message = "vpc_cidr: an IPv4 CIDR block of /22 or larger."
  }
}

variable "ami_id" {
  description = "AMI built by deploy/aws/packer (Debian 12 with lb, app, their units and the scaleout user). Used by the app instances and, with front = \"lb\", by the lb instance."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id: an AMI id such as ami-0123456789abcdef0."
  }
}

variable "app_instance_type" {
  description = "EC2 instance type of the two app instances (the AMI's architecture, x86_64 unless you built for arm64)."
  type        = string
  default     = "t3.small"
}

variable "lb_instance_type" {
  description = "EC2 instance type of the lb instance (front = \"lb\" only)."
  type        = string
  default     = "t3.small"
}

variable "redis_node_type" {
  description = "ElastiCache node type of every Redis node: the primary and its replica, or with redis_cluster_mode each shard's primary and replicas."
  type        = string
  default     = "cache.t4g.micro"
}

variable "redis_cluster_mode" {
  description = "false: one primary and one replica, the apps on the primary endpoint (rediss://). true: a Redis Cluster (ElastiCache cluster mode enabled) of redis_shards shards, each a primary and redis_replicas_per_shard replicas, the apps on the configuration endpoint (rediss+cluster://) with each chat room on one shard. Switching replaces the replication group (a new id) and the app instances: the chat history starts over."
  type        = bool
  default     = false
}

variable "redis_shards" {
  description = "Shards (node groups) of the Redis Cluster (redis_cluster_mode only). Changing it later reshards online: rooms move with their slots and the apps follow."
  type        = number
  default     = 3

  validation {
    condition     = var.redis_shards >= 1 && var.redis_shards <= 500 && floor(var.redis_shards) == var.redis_shards
    error_message = "redis_shards: a whole number from 1 to 500 (ElastiCache's default quota is 90 nodes per cluster)."
  }
}

variable "redis_replicas_per_shard" {
  description = "Replicas of each shard's primary (redis_cluster_mode only), spread over the two zones; a replica takes over when its primary fails."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_replicas_per_shard >= 1 && var.redis_replicas_per_shard <= 5 && floor(var.redis_replicas_per_shard) == var.redis_replicas_per_shard
    error_message = "redis_replicas_per_shard: a whole number from 1 to 5 (automatic failover and Multi-AZ need at least one replica per shard)."
  }
}

variable "redis_engine_version" {
  description = "ElastiCache Redis engine version: 7.0 or later (what the product is tested with; the chat history needs 6.2 at least; AUTH tokens with in-transit encryption)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+", var.redis_engine_version)) && try(tonumber(split(".", var.redis_engine_version)[0]) >= 7, false)
    error_message = "redis_engine_version must be 7.0 or later (the release the product is tested with)."
  }
}

variable "redis_channel" {
  description = "Redis pub/sub channel the app instances share (the original's default is simple-chat). With redis_cluster_mode it is also the hash tag of each room's keys, so it must not contain { or }."
  type        = string
  default     = "simple-chat"

  validation {
    condition     = length(var.redis_channel) > 0 && !(var.redis_cluster_mode && can(regex("[{}]", var.redis_channel)))
    error_message = "redis_channel: not empty, and without { or } when redis_cluster_mode is on (app refuses such a channel with a cluster)."
  }
}

variable "redis_auth_token" {
  description = "ElastiCache AUTH token (16 to 128 printable characters, none of / \" @ or space). Leave null to have Terraform generate one. Pass it with TF_VAR_redis_auth_token, never in a committed file; it is kept in the state, so the state must be encrypted and access-controlled."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.redis_auth_token == null || can(regex("^[!-~]{16,128}$", var.redis_auth_token)) && !can(regex("[/\"@]", var.redis_auth_token))
    error_message = "redis_auth_token: 16 to 128 printable ASCII characters, without / \" @ or spaces."
  }
}

variable "ssm_access" {
  description = "Give the instances an SSM Session Manager path (AmazonSSMManagedInstanceCore and VPC endpoints for ssm, ssmmessages, ec2messages). There is no SSH: without this there is no shell on the instances."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Protect the ALB against deletion. Set to false before terraform destroy."
  type        = bool
  default     = true
}

variable "alb_access_logs_bucket" {
  description = "Existing S3 bucket (with the ELB log delivery policy) for the ALB's access logs; null leaves access logs off."
  type        = string
  default     = null
}

variable "log_retention_days" {
  description = "Days to keep VPC flow logs in CloudWatch Logs."
  type        = number
  default     = 365
}

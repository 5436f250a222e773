# Providers and the Terraform version this layout is written for.
terraform {
  required_version = ">= 1.9.0" # variable validations that refer to other variables

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.70"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, { Project = var.name })
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  # Two zones, named explicitly: one public and one private subnet in each.
  azs = var.availability_zones != null ? var.availability_zones : ["${var.region}a", "${var.region}b"]

  use_alb = var.front == "alb"
  use_lb  = var.front == "lb"

  # The front's public name: the Route53 name when one is given, else the lb's elastic IP.
  front_address = local.use_lb ? one(aws_eip.lb[*].public_ip) : one(aws_lb.front[*].dns_name)
  front_host    = var.domain_name != null ? var.domain_name : local.front_address
}

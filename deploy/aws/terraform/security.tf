# Security groups: the only paths are
#   allow_cidr -> front :443 and :80
#   front      -> app   :80
#   app        -> Redis :6379
#   app, lb    -> SSM endpoints :443   (ssm_access only)
# Groups are declared empty and each path is one rule resource, so the groups can refer to
# each other without a cycle.

resource "aws_security_group" "front" {
  name        = "${var.name}-front"
  description = "The front (ALB or lb instance): 443 and 80 from allow_cidr, out to the apps on 80"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-front" }
}

resource "aws_security_group" "app" {
  name        = "${var.name}-app"
  description = "App instances: 80 from the front, out to Redis on 6379"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-app" }
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "ElastiCache Redis: 6379 from the app instances only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-redis" }
}

resource "aws_security_group" "endpoints" {
  name        = "${var.name}-endpoints"
  description = "SSM VPC endpoints: 443 from the instances"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-endpoints" }
}

locals {
  front_ingress = {
    for pair in setproduct(var.allow_cidr, [443, 80]) :
    "${pair[0]}-${pair[1]}" => { cidr = pair[0], port = pair[1] }
  }

  # Instances that talk to the SSM endpoints.
  ssm_clients = var.ssm_access ? merge(
    { app = aws_security_group.app.id },
    local.use_lb ? { lb = aws_security_group.front.id } : {},
  ) : {}
}

resource "aws_vpc_security_group_ingress_rule" "front_from_allowed" {
  for_each = local.front_ingress

  #checkov:skip=CKV_AWS_260: the front is the public entry point: 80 from allow_cidr (default everyone) only answers a redirect to 443

  security_group_id = aws_security_group.front.id
  description       = "HTTPS and the HTTP redirect from allow_cidr"
  ip_protocol       = "tcp"
  from_port         = each.value.port
  to_port           = each.value.port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "front_to_app" {
  security_group_id            = aws_security_group.front.id
  description                  = "To the app instances on 80"
  ip_protocol                  = "tcp"
  from_port                    = 80
  to_port                      = 80
  referenced_security_group_id = aws_security_group.app.id
}

resource "aws_vpc_security_group_ingress_rule" "app_from_front" {
  #checkov:skip=CKV_AWS_260: the source is the front's security group (referenced_security_group_id), not a CIDR; this check reads only CIDR fields
  security_group_id            = aws_security_group.app.id
  description                  = "Chat and health checks from the front on 80"
  ip_protocol                  = "tcp"
  from_port                    = 80
  to_port                      = 80
  referenced_security_group_id = aws_security_group.front.id
}

resource "aws_vpc_security_group_egress_rule" "app_to_redis" {
  security_group_id            = aws_security_group.app.id
  description                  = "To Redis on 6379 (TLS)"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.redis.id
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_app" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis (TLS) from the app instances"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.app.id
}

resource "aws_vpc_security_group_egress_rule" "to_endpoints" {
  for_each = local.ssm_clients

  security_group_id            = each.value
  description                  = "To the SSM VPC endpoints on 443"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.endpoints.id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_instances" {
  for_each = local.ssm_clients

  security_group_id            = aws_security_group.endpoints.id
  description                  = "SSM agent traffic from the instances"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = each.value
}

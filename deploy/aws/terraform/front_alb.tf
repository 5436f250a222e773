# front = "alb": an internet-facing Application Load Balancer in the public subnets, TLS with
# an ACM certificate validated through Route53, HTTP redirected to HTTPS, the two apps as
# targets checked on /healthz, and a Route53 alias for domain_name.

data "aws_route53_zone" "main" {
  count = var.route53_zone_name != null ? 1 : 0

  name         = var.route53_zone_name
  private_zone = false
}

resource "aws_acm_certificate" "front" {
  count = local.use_alb ? 1 : 0

  domain_name       = var.domain_name
  validation_method = "DNS"

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_route53_record" "acm_validation" {
  for_each = local.use_alb ? {
    for o in aws_acm_certificate.front[0].domain_validation_options : o.domain_name => o
  } : {}

  zone_id         = data.aws_route53_zone.main[0].zone_id
  name            = each.value.resource_record_name
  type            = each.value.resource_record_type
  records         = [each.value.resource_record_value]
  ttl             = 300
  allow_overwrite = true
}

resource "aws_acm_certificate_validation" "front" {
  count = local.use_alb ? 1 : 0

  certificate_arn         = aws_acm_certificate.front[0].arn
  validation_record_fqdns = [for r in aws_route53_record.acm_validation : r.fqdn]
}

resource "aws_lb" "front" {
  count = local.use_alb ? 1 : 0

  #checkov:skip=CKV2_AWS_28: a WAF web ACL is a per-deployment policy and cost choice; the chat's inputs are validated by app itself (SPEC section 3). Attach one with aws_wafv2_web_acl_association where policy asks for it.
  #checkov:skip=CKV_AWS_91: access logs need an S3 bucket with the ELB delivery policy; set alb_access_logs_bucket to an existing one to turn them on (dynamic block below).
  name               = "${var.name}-front"
  load_balancer_type = "application"
  internal           = false
  subnets            = aws_subnet.public[*].id
  security_groups    = [aws_security_group.front.id]

  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
  # WebSocket tunnels stay open while idle: one hour, like HAProxy's "timeout tunnel".
  idle_timeout = 3600

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket != null ? [var.alb_access_logs_bucket] : []
    content {
      bucket  = access_logs.value
      prefix  = var.name
      enabled = true
    }
  }
}

resource "aws_lb_target_group" "app" {
  count = local.use_alb ? 1 : 0

  #checkov:skip=CKV_AWS_378: TLS ends at the ALB; app speaks plain HTTP on 80 in private subnets that only the front's security group reaches (the on-prem layout's lb -> app hop).
  name     = "${var.name}-app"
  vpc_id   = aws_vpc.main.id
  port     = 80
  protocol = "HTTP"

  # Long-lived WebSockets: each new request goes to the target with the fewest in progress
  # (ALB's nearest to lb's least-connections).
  load_balancing_algorithm_type = "least_outstanding_requests"
  # On deregistration app drains: /healthz says 503 and clients get 1001 within its grace.
  deregistration_delay = 30

  health_check {
    path                = "/healthz"
    matcher             = "200"
    interval            = 5
    timeout             = 2
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_target_group_attachment" "app" {
  count = local.use_alb ? 2 : 0

  target_group_arn = aws_lb_target_group.app[0].arn
  target_id        = aws_instance.app[count.index].id
  port             = 80
}

resource "aws_lb_listener" "https" {
  count = local.use_alb ? 1 : 0

  load_balancer_arn = aws_lb.front[0].arn
  port              = 443
  protocol          = "HTTPS"
  # TLS 1.2 and 1.3 with forward-secret AEAD suites only, as lb's own policy.
  ssl_policy      = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"
  certificate_arn = aws_acm_certificate_validation.front[0].certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.app[0].arn
  }
}

resource "aws_lb_listener" "http_redirect" {
  count = local.use_alb ? 1 : 0

  load_balancer_arn = aws_lb.front[0].arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      port        = "443"
      protocol    = "HTTPS"
      status_code = "HTTP_301"
    }
  }
}

resource "aws_route53_record" "front_alb" {
  count = local.use_alb ? 1 : 0

  zone_id = data.aws_route53_zone.main[0].zone_id
  name    = var.domain_name
  type    = "A"

  alias {
    name                   = aws_lb.front[0].dns_name
    zone_id                = aws_lb.front[0].zone_id
    evaluate_target_health = true
  }
}

# front = "lb": an instance running our lb in a public subnet, reached through an elastic IP
# (and a Route53 A record when domain_name is given). Its user_data writes lb.toml with the
# two apps' private addresses, generates a certificate for the public name on first boot, and
# starts lb.service. Replace the generated certificate with one from your CA and run
# `systemctl reload lb` (see deploy/README.md, "Deploy").

resource "aws_instance" "lb" {
  count = local.use_lb ? 1 : 0

  ami                    = var.ami_id
  instance_type          = var.lb_instance_type
  subnet_id              = aws_subnet.public[0].id
  vpc_security_group_ids = [aws_security_group.front.id]
  iam_instance_profile   = aws_iam_instance_profile.instance.name

  # The public address is the elastic IP below, not one assigned at launch.
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    encrypted   = true
    kms_key_id  = aws_kms_key.main.arn
    volume_type = "gp3"
    volume_size = 8
  }

  user_data = templatefile("${path.module}/templates/lb-user-data.sh.tftpl", {
    lb_toml = templatefile("${path.module}/templates/lb.toml.tftpl", {
      backends = [for i in aws_instance.app : "${i.private_ip}:80"]
    })
    # Names the generated certificate covers: the Route53 name when given, and the elastic IP.
    cert_hosts = compact([var.domain_name, aws_eip.lb[0].public_ip])
  })
  user_data_replace_on_change = true

  tags = { Name = "${var.name}-lb" }
}

resource "aws_eip" "lb" {
  count = local.use_lb ? 1 : 0

  domain = "vpc"

  tags = { Name = "${var.name}-lb" }
}

resource "aws_eip_association" "lb" {
  count = local.use_lb ? 1 : 0

  instance_id   = aws_instance.lb[0].id
  allocation_id = aws_eip.lb[0].id
}

resource "aws_route53_record" "front_lb" {
  count = local.use_lb && var.domain_name != null && var.route53_zone_name != null ? 1 : 0

  zone_id = data.aws_route53_zone.main[0].zone_id
  name    = var.domain_name
  type    = "A"
  ttl     = 300
  records = [aws_eip.lb[0].public_ip]
}

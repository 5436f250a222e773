# The app instances (one per zone, private subnets) and what they share with the lb
# instance: the AMI from deploy/aws/packer, an instance role, IMDSv2, encrypted volumes.
# Each instance gets its Redis endpoint and token from Terraform through user_data, which
# writes /etc/scaleout/app.toml and /etc/scaleout/app.env (0600) and starts app.service.

data "aws_iam_policy_document" "instance_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# The instances call no AWS API themselves: the role carries only the SSM agent's policy,
# and nothing at all when ssm_access is off.
resource "aws_iam_role" "instance" {
  name               = "${var.name}-instance"
  assume_role_policy = data.aws_iam_policy_document.instance_assume.json
}

resource "aws_iam_role_policy_attachment" "ssm_core" {
  count = var.ssm_access ? 1 : 0

  role       = aws_iam_role.instance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_instance_profile" "instance" {
  name = "${var.name}-instance"
  role = aws_iam_role.instance.name
}

locals {
  # One Redis: its primary endpoint. A cluster: its configuration endpoint, the seed from which
  # app learns every shard's nodes.
  redis_url = format(
    "%s://:%s@%s:%d",
    var.redis_cluster_mode ? "rediss+cluster" : "rediss",
    urlencode(local.redis_auth_token),
    local.redis_endpoint,
    aws_elasticache_replication_group.redis.port,
  )
}

resource "aws_instance" "app" {
  count = 2

  ami                    = var.ami_id
  instance_type          = var.app_instance_type
  subnet_id              = aws_subnet.private[count.index].id
  vpc_security_group_ids = [aws_security_group.app.id]
  iam_instance_profile   = aws_iam_instance_profile.instance.name

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

  user_data = templatefile("${path.module}/templates/app-user-data.sh.tftpl", {
    redis_url     = local.redis_url
    redis_channel = var.redis_channel
  })
  # A new token or endpoint replaces the instance rather than leaving it on the old one.
  user_data_replace_on_change = true

  tags = { Name = "${var.name}-app${count.index + 1}" }
}

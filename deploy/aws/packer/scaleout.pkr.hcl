# The scaleout AMI: Debian 12 with lb, app, their systemd units and the scaleout user. Both
# units are installed disabled; the instance's user_data (deploy/aws/terraform/templates)
# writes the host's config and secrets, then enables one of them.
#
# Build the binaries first, for the instance architecture (x86_64 by default):
#   cargo build --release --locked -p lb -p app
#   packer init deploy/aws/packer
#   packer build -var region=eu-west-1 deploy/aws/packer
# The AMI id it prints is Terraform's ami_id.

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = "~> 1.3"
    }
  }
}

variable "region" {
  description = "AWS region the AMI is built and registered in."
  type        = string
  default     = "eu-west-1"
}

variable "instance_type" {
  description = "Instance type of the temporary build instance (its architecture must match the binaries')."
  type        = string
  default     = "t3.small"
}

variable "architecture" {
  description = "Debian base image architecture: amd64 (x86_64 binaries) or arm64 (aarch64 binaries)."
  type        = string
  default     = "amd64"
}

variable "binaries_dir" {
  description = "Directory holding the release binaries lb and app, relative to the repository root."
  type        = string
  default     = "target/release"
}

locals {
  repo      = "${path.root}/../../.."
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "debian" {
  region        = var.region
  instance_type = var.instance_type
  ami_name      = "scaleout-${local.timestamp}"
  ssh_username  = "admin"

  # Debian 12 "bookworm", published by Debian's own AWS account.
  source_ami_filter {
    filters = {
      name                = "debian-12-${var.architecture}-*"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"]
    most_recent = true
  }

  # The build instance: IMDSv2 only, reachable for SSH from the build host's address only.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support                              = "v2.0"
  temporary_security_group_source_public_ip = true

  # The image's snapshot is encrypted (account's default EBS key unless kms_key_id is added).
  encrypt_boot = true

  tags = {
    Name    = "scaleout"
    Project = "scaleout"
  }
}

build {
  sources = ["source.amazon-ebs.debian"]

  provisioner "file" {
    sources = [
      "${local.repo}/${var.binaries_dir}/lb",
      "${local.repo}/${var.binaries_dir}/app",
      "${local.repo}/deploy/systemd/lb.service",
      "${local.repo}/deploy/systemd/app.service",
      "${local.repo}/README.md",
    ]
    destination = "/tmp/"
  }

  provisioner "shell" {
    execute_command = "sudo sh -eux '{{ .Path }}'"
    inline = [
      "apt-get update",
      "DEBIAN_FRONTEND=noninteractive apt-get -y upgrade",
      "DEBIAN_FRONTEND=noninteractive apt-get -y install ca-certificates",
      "useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin scaleout",
      "install -m 0755 /tmp/lb /tmp/app /usr/local/bin/",
      "install -m 0644 /tmp/lb.service /tmp/app.service /etc/systemd/system/",
      "install -D -m 0644 /tmp/README.md /usr/local/share/doc/scaleout/README.md",
      "install -d -m 0755 /etc/scaleout",
      "systemctl daemon-reload",
      "systemd-analyze verify /etc/systemd/system/lb.service /etc/systemd/system/app.service",
      "rm -f /tmp/lb /tmp/app /tmp/lb.service /tmp/app.service /tmp/README.md",
      "apt-get clean",
    ]
  }
}

# One customer-managed key for the layout's data at rest: Redis, flow logs, instance volumes.

data "aws_iam_policy_document" "kms" {
  # In a key policy, Resource "*" means this key and nothing else; these IAM-policy checks
  # read it as "every resource".
  #checkov:skip=CKV_AWS_109: key policy; "*" is this key only, administered by the account as AWS's default key policy does
  #checkov:skip=CKV_AWS_111: key policy; "*" is this key only, and CloudWatch Logs' use is bound to the flow log group by encryption context
  #checkov:skip=CKV_AWS_356: key policy; "*" is this key only
  # The account administers the key (the default key policy).
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  # CloudWatch Logs encrypts the flow log group with it, for that log group only.
  statement {
    sid = "CloudWatchLogsUse"
    actions = [
      "kms:Encrypt*",
      "kms:Decrypt*",
      "kms:ReEncrypt*",
      "kms:GenerateDataKey*",
      "kms:Describe*",
    ]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnEquals"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${data.aws_partition.current.partition}:logs:${var.region}:${data.aws_caller_identity.current.account_id}:log-group:/${var.name}/vpc-flow-logs"]
    }
  }
}

resource "aws_kms_key" "main" {
  description             = "${var.name}: Redis at rest, flow logs, instance volumes"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.main.key_id
}

"""Everything cluster.yaml needs in an AWS account, created once, with exactly the rules kd_ray means.

    pip install boto3
    python jobs/cluster/aws_setup.py create --region us-west-2 --ssh-cidr 203.0.113.7/32 --bucket my-bucket
    python jobs/cluster/aws_setup.py check cluster.yaml      # exit 2, one line per value still unset

``create`` makes (or finds, so it can run again):

* the security group ``kd-ray`` in the region's default VPC (or ``--vpc-id``): SSH (TCP 22) from
  ``--ssh-cidr`` only, and all traffic between the group's own members (the head and its workers:
  GCS, object store, dashboard). Nothing else is open: the dashboard and the Jobs API are reached
  through ``ray dashboard cluster.yaml`` (an SSH tunnel). cluster.yaml names this group on every
  node type (``SecurityGroupIds``): Ray then creates no group of its own -- a group Ray creates
  from ``provider.security_group`` gets SSH from 0.0.0.0/0 before the config's own rules (Ray 2.60,
  ``_create_default_inbound_rules``; tests/test_cluster_aws.py shows both);
* the IAM roles ``kd-ray-head`` and ``kd-ray-worker`` with EC2's trust policy, their inline policies
  from ``cluster-iam/*.json`` (``YOUR-BUCKET`` replaced by ``--bucket``), and instance profiles of
  the same names holding them.

It prints the two values cluster.yaml marks SET-ME besides the AMI.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GROUP_NAME = "kd-ray"
ROLES = {"kd-ray-head": "head-policy.json", "kd-ray-worker": "worker-policy.json"}
EC2_TRUST = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                                     "Action": "sts:AssumeRole"}]}
UNSET = re.compile(r"SET-ME")


def create_security_group(ec2, ssh_cidr: str, vpc_id: str | None = None) -> str:
    """The group's id: SSH from ``ssh_cidr``, everything from its own members, nothing else."""
    if ssh_cidr in ("0.0.0.0/0", "::/0") or "/" not in ssh_cidr:
        raise ValueError(f"--ssh-cidr {ssh_cidr!r}: give your own address as a CIDR, e.g. 203.0.113.7/32")
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ValueError("this region has no default VPC: pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [GROUP_NAME]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    if found:
        return found[0]["GroupId"]
    sg = ec2.create_security_group(GroupName=GROUP_NAME, VpcId=vpc_id,
                                   Description="kd_ray: SSH from one address, all traffic within the cluster")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": ssh_cidr}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
    ])
    return sg


def create_roles(iam, bucket: str) -> dict[str, str]:
    """The instance profiles by name (each holding its role with EC2's trust policy): ``{name: arn}``."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"--bucket {bucket!r}: give the bucket's name (no s3:// and no path)")
    profiles = {}
    for name, policy_file in ROLES.items():
        policy = (ROOT / "cluster-iam" / policy_file).read_text().replace("YOUR-BUCKET", bucket)
        try:
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
                            Description="kd_ray " + name.rsplit("-", 1)[-1])
        except iam.exceptions.EntityAlreadyExistsException:
            iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(EC2_TRUST))
        iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=policy)
        try:
            iam.create_instance_profile(InstanceProfileName=name)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        if name not in [r["RoleName"] for r in profile["Roles"]]:
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        profiles[name] = profile["Arn"]
    return profiles


def unset_values(path: Path) -> list[str]:
    """One line per value cluster.yaml still marks SET-ME: its line number and key."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        if UNSET.search(code):
            out.append(f"{path}:{i}: {code.strip()} -- set this value (see the comments in {path.name})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="the security group, IAM roles and instance profiles")
    c.add_argument("--region", required=True)
    c.add_argument("--ssh-cidr", required=True, help="your address, e.g. 203.0.113.7/32")
    c.add_argument("--bucket", required=True, help="the bucket of runtime.storage_path")
    c.add_argument("--vpc-id", default=None)
    k = sub.add_parser("check", help="fail naming every value cluster.yaml still marks SET-ME")
    k.add_argument("cluster_yaml", type=Path)
    args = p.parse_args(argv)
    if args.command == "check":
        missing = unset_values(args.cluster_yaml)
        for line in missing:
            print(line, file=sys.stderr)
        if not missing:
            print(f"{args.cluster_yaml}: every value is set")
        return 2 if missing else 0
    import boto3

    try:
        sg = create_security_group(boto3.client("ec2", region_name=args.region), args.ssh_cidr, args.vpc_id)
        profiles = create_roles(boto3.client("iam", region_name=args.region), args.bucket)
    except ValueError as e:
        print(f"aws_setup: {e}", file=sys.stderr)
        return 2
    print(f"security group {GROUP_NAME}: {sg}  -> cluster.yaml: SecurityGroupIds: [{sg}]")
    for name, arn in profiles.items():
        print(f"instance profile {name}: {arn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

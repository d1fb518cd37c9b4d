"""cluster.yaml's security in fact: Ray's own AWS bootstrap (what `ray up` runs before it launches
anything) against a local AWS mock (moto's EC2 and IAM), after jobs/cluster/aws_setup.py made the
security group, roles and instance profiles. No Ray cluster is started."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REGION = "us-west-2"
MY_CIDR = "203.0.113.7/32"
WORLD = {"0.0.0.0/0", "::/0"}


def _setup_module():
    spec = importlib.util.spec_from_file_location("aws_setup", ROOT / "jobs" / "cluster" / "aws_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aws_setup = _setup_module()


@pytest.fixture
def aws(monkeypatch, tmp_path):
    """moto's in-process AWS; HOME in a temporary folder (Ray's bootstrap writes the SSH key there)."""
    from moto import mock_aws

    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                 "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        yield


def _bootstrap(cfg: dict) -> dict:
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    return bootstrap_aws(prepare_config(copy.deepcopy(cfg)))


def _ami(ec2) -> str:
    return ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def _ingress_sources(group: dict) -> list[tuple]:
    """(protocol, from port, to port, CIDR) for every address range a group lets in."""
    return [(p["IpProtocol"], p.get("FromPort"), p.get("ToPort"), r.get("CidrIp") or r.get("CidrIpv6"))
            for p in group["IpPermissions"] for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", [])]


def test_rays_bootstrap_of_cluster_yaml_opens_ssh_to_one_address_and_nothing_to_the_world(aws):
    import boto3

    ec2, iam = boto3.client("ec2", region_name=REGION), boto3.client("iam", region_name=REGION)
    sg = aws_setup.create_security_group(ec2, MY_CIDR)
    assert aws_setup.create_security_group(ec2, MY_CIDR) == sg  # running the set-up again finds it
    aws_setup.create_roles(iam, "kd-runs")
    aws_setup.create_roles(iam, "kd-runs")
    text = (ROOT / "cluster.yaml").read_text()
    filled = text.replace("ImageId: &ami SET-ME", f"ImageId: &ami {_ami(ec2)}").replace("[SET-ME]", f"[{sg}]")
    assert not [ln for ln in filled.splitlines() if "SET-ME" in ln.split("#", 1)[0]]
    out = _bootstrap(yaml.safe_load(filled))

    assert {g for t in out["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]} == {sg}
    groups = ec2.describe_security_groups()["SecurityGroups"]
    assert sorted(g["GroupName"] for g in groups) == ["default", "kd-ray"]  # Ray created no group of its own
    for g in groups:  # nothing anywhere lets the world in
        assert not [s for s in _ingress_sources(g) if s[3] in WORLD], g["GroupName"]
    ours = next(g for g in groups if g["GroupId"] == sg)
    assert _ingress_sources(ours) == [("tcp", 22, 22, MY_CIDR)]  # SSH from one address; no 8265, 6379, ...
    within = [p for p in ours["IpPermissions"] if p.get("UserIdGroupPairs")]
    assert within == [{"IpProtocol": "-1", "IpRanges": [], "Ipv6Ranges": [], "PrefixListIds": [],
                       "UserIdGroupPairs": [{"GroupId": sg, "UserId": within[0]["UserIdGroupPairs"][0]["UserId"]}]}]

    # the instance profiles cluster.yaml names, each holding its role, which EC2 may assume
    for node_type, name in (("head", "kd-ray-head"), ("gpu_worker", "kd-ray-worker")):
        assert out["available_node_types"][node_type]["node_config"]["IamInstanceProfile"]["Name"] == name
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [name]
        trust = iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
        policy = iam.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"]
        policy = json.dumps(policy) if not isinstance(policy, str) else policy
        assert "arn:aws:s3:::kd-runs/*" in policy and "YOUR-BUCKET" not in policy
    head_policy = iam.get_role_policy(RoleName="kd-ray-head", PolicyName="kd-ray-head")["PolicyDocument"]
    assert "role/kd-ray-worker" in json.dumps(head_policy) and "ec2:RunInstances" in json.dumps(head_policy)


def test_a_group_ray_creates_from_provider_security_group_lets_ssh_in_from_anywhere(aws):
    """Why cluster.yaml names its groups: given only `provider.security_group` with SSH from one
    address, Ray 2.60's bootstrap creates the group with SSH from 0.0.0.0/0 added before it."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION)
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for t in cfg["available_node_types"].values():
        t["node_config"]["ImageId"] = _ami(ec2)
        del t["node_config"]["SecurityGroupIds"]
    cfg["provider"]["security_group"] = {"GroupName": "ssh-only", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": MY_CIDR}]}]}
    _bootstrap(cfg)
    made = next(g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] == "ssh-only")
    assert ("tcp", 22, 22, "0.0.0.0/0") in _ingress_sources(made)


def test_the_set_up_refuses_a_world_cidr_and_check_names_each_unset_value(tmp_path, capsys):
    with pytest.raises(ValueError, match="give your own address"):
        aws_setup.create_security_group(None, "0.0.0.0/0")
    with pytest.raises(ValueError, match="the bucket's name"):
        aws_setup.create_roles(None, "s3://kd-runs/x")
    assert aws_setup.main(["check", str(ROOT / "cluster.yaml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "ImageId" in err[0] and "SecurityGroupIds" in err[1]
    done = tmp_path / "cluster.yaml"
    done.write_text((ROOT / "cluster.yaml").read_text().replace("SET-ME", "ami-0123"))
    assert aws_setup.main(["check", str(done)]) == 0

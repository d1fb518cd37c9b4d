"""Ray Jobs against a real head node (`ray start --head` + `ray job submit`), and cluster.yaml.

The head is this test's own Ray instance, so the test is ``isolated``: it runs after the shared
cluster has shut down, and stops its head by signalling the head's own process (never
``ray stop``, which would kill every Ray process on the machine).
"""
import copy
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.fixtures.jobs import wait_job
from tests.fixtures.network import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_cluster_yaml_passes_rays_validation_and_has_a_gpu_worker_type():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(types[t]["min_workers"] == 0 for t in gpu_types)  # they autoscale
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0  # a CPU head
    assert any("pip install -e" in c for c in cfg["setup_commands"])  # installs this project
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_cluster_yaml_can_launch_workers_and_keeps_auth_on():
    """Beyond Ray's schema: what a real `ray up` needs to launch GPU workers that reach the bucket."""
    import json

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for n, t in types.items() if n != cfg["head_node_type"]]
    head_profile = head["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {w["node_config"]["IamInstanceProfile"]["Name"] for w in workers}
    assert head_profile not in worker_profiles
    head_policy = json.loads((ROOT / "cluster-iam" / "head-policy.json").read_text())
    actions = {a for st in head_policy["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str)
                                                             else st["Action"])}
    assert {"ec2:RunInstances", "ec2:DescribeInstances", "ec2:TerminateInstances", "ec2:CreateTags",
            "iam:PassRole", "s3:PutObject"} <= actions
    passrole = next(st for st in head_policy["Statement"] if st["Action"] == "iam:PassRole")
    assert all(p in passrole["Resource"] for p in worker_profiles)  # the head may pass the workers' role
    worker_policy = (ROOT / "cluster-iam" / "worker-policy.json").read_text()
    assert "s3:PutObject" in worker_policy and "ec2:" not in worker_policy
    assert {".venv", "runs", ".git"} <= set(cfg["rsync_exclude"])
    # every node type names the set-up's security group and one AMI (tests/test_cluster_aws.py runs
    # Ray's bootstrap on it); Ray would open SSH to the world on a group it makes itself
    assert "security_group" not in cfg["provider"]
    assert len({str(t["node_config"]["SecurityGroupIds"]) for t in types.values()}) == 1
    assert len({t["node_config"]["ImageId"] for t in types.values()}) == 1
    assert all("kd_ray_venv" in c for c in cfg["setup_commands"][2:5])  # a virtual environment (PEP 668)
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=disabled" not in starts and "RAY_AUTH_MODE=token" in starts
    assert "~/.ray/auth_token" in cfg["file_mounts"].values()
    assert any("/home/ubuntu/data" in c for c in cfg["setup_commands"])  # data the ubuntu user can write


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture
def ray_head(no_ray, head_process):
    """A real head on 127.0.0.1 with free ports and its own temp dir; yields its dashboard URL."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    port = free_port()
    temp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    head_process(["--port=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--num-cpus=4",
                  "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"], env, temp)
    address = f"http://127.0.0.1:{port}"
    _wait_for(f"{address}/api/version", timeout=120)
    yield address, env


def _submit(address: str, env: dict, *args: str) -> str:
    sid = f"kd-{uuid.uuid4().hex[:8]}"
    subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", sid, "--working-dir", ".",
                    "--no-wait", "--", sys.executable, "jobs/pipeline.py", *args],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return sid


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_ray_job_submit_runs_the_pipeline_and_reports_a_bad_config(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    address, env = ray_head
    client = JobSubmissionClient(address)
    runs = tmp_path / "runs"
    smoke = ["--config", "kd_ray/configs/digits.yaml", "--set", f"runtime.storage_path={runs}", "--set", "name=smoke",
             "--set", "teachers.count=2", "--set", "teachers.epochs=1", "--set", "teachers.model_args={hidden: [32]}",
             "--set", "student.epochs=1", "--set", "student.model_args={hidden: [32]}",
             "--set", "sweep.fractions=[1.0]", "--set", "sweep.targets=[soft]", "--set", "sweep.seeds=[0]"]
    good = _submit(address, env, *smoke)
    bad = _submit(address, env, "--config", "kd_ray/configs/digits.yaml", "--set", "student.alpha=3")

    assert wait_job(client, bad, timeout=120) == "FAILED"
    bad_logs = client.get_job_logs(bad)
    assert "config error" in bad_logs and "student.alpha" in bad_logs

    status = wait_job(client, good, timeout=400)
    logs = client.get_job_logs(good)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "kd-ray run finished in" in logs
    root = runs / "smoke"
    for name in ("results.parquet", "summary.md", "accuracy_vs_fraction.png", "teachers/t0/model.pt"):
        assert (root / name).exists(), name


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_kd_ray_joins_a_cluster_already_running_here_without_passing_resources(ray_head, tmp_path):
    # no address anywhere: kd_ray finds the running head (runtime.num_cpus would be an error there)
    env = {k: v for k, v in ray_head[1].items() if k != "RAY_ADDRESS"}
    code = ("import ray; from kd_ray.core.config_files import load_config; from kd_ray.stages.cluster import init_ray; "
            f"init_ray(load_config(None, ['runtime.num_cpus=2', 'runtime.storage_path={tmp_path}'])); "
            "print('CPUS', ray.cluster_resources()['CPU'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "joined the Ray cluster at" in out.stderr and "CPUS 4.0" in out.stdout  # the head's 4 CPUs, not 2


def test_session_files_of_a_killed_cluster_are_not_a_cluster(monkeypatch):
    from ray._private import services

    from kd_ray.stages.cluster import _live_local_cluster

    # /tmp/ray/ray_current_cluster still names a cluster, but no GCS process is alive
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: set())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: "127.0.0.1:6379")
    assert _live_local_cluster() is None  # kd_ray starts its own cluster
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: {"127.0.0.1:6379", "127.0.0.1:7000"})
    assert _live_local_cluster() == "127.0.0.1:6379"  # the latest `ray start`, when it is alive

"""The cluster path on Ray's fake multi-node autoscaler: a CPU-only head, a GPU worker type from 0
to 2 nodes (logical GPUs; torch runs on the CPU), storage on a real S3 server on 127.0.0.1.

The head is this test's own Ray instance (`ray start --head` on port 6379, which the fake
nodes join), so the test is ``isolated`` and stops only what it started: the head's process
group, whose monitor owns the fake worker nodes.
"""
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.jobs import wait_job

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
GPU_TYPE = "gpu_worker"

FAKE_CLUSTER = {
    "cluster_name": "kd-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 4}, "node_config": {}, "max_workers": 0},
        GPU_TYPE: {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    # the monitor reads these even when a fake provider ignores them (Ray's example.yaml is not in the wheel)
    "auth": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


@pytest.fixture
def fake_cluster(no_ray, s3, head_process):
    """`ray start --head` with the fake autoscaler; yields (dashboard address, env, temp dir)."""
    temp = tempfile.mkdtemp(prefix="kdf", dir="/tmp")  # short: Ray's socket paths have a length limit
    config = Path(temp) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(FAKE_CLUSTER))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head_process(["--port=6379", "--dashboard-host=127.0.0.1", "--dashboard-port=8299", f"--autoscaling-config={config}",
                  f"--temp-dir={temp}", "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats"], env, temp)
    deadline = time.time() + 120
    while time.time() < deadline and "Ray runtime started" not in (Path(temp) / "head.log").read_text():
        time.sleep(1)
    yield "http://127.0.0.1:8299", env, temp
    # the fake worker nodes are raylets the monitor started in sessions of their own: stop those
    # whose command line names this test's temp dir (and only those); head_process stops the head
    subprocess.run(["pkill", "-TERM", "-f", temp], check=False)


def _job(address, env, *args, timeout=900):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    # `local://`: the checkout in place. The fake nodes share this machine's disk, and Ray unpacks an
    # uploaded working_dir afresh (rmtree first) on each node's first use, which would delete the
    # driver's own working directory under it; a real cluster's nodes each have their own disk.
    sid = client.submit_job(entrypoint=shlex.join([sys.executable, "jobs/pipeline.py", *args]),
                            runtime_env={"working_dir": f"local://{ROOT}"})
    return wait_job(client, sid, timeout), client.get_job_logs(sid)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_gpu_stages_scale_a_gpu_worker_type_from_zero(fake_cluster, s3):
    from kd_ray.core import storage

    address, env, _ = fake_cluster
    root = storage.join(s3, "fake")
    tiny = ["--set", f"runtime.storage_path={root}", "--set", "name=gpu", "--set", "teachers.count=2",
            "--set", "teachers.epochs=1", "--set", "teachers.model_args={hidden: [32]}",
            "--set", "teachers.num_gpus=1", "--set", "teachers.num_cpus=1",
            "--set", "soft_targets.num_gpus=1", "--set", "soft_targets.num_cpus=1",
            "--set", "student.epochs=1", "--set", "student.model_args={hidden: [32]}",
            "--set", "sweep.fractions=[1.0]", "--set", "sweep.seeds=[0]", "--set", "runtime.scale_timeout_s=300"]
    # a request no node type can hold fails at once, naming the field and the largest node type
    status, logs = _job(address, env, *tiny, "--set", "teachers.num_gpus=8", timeout=180)
    assert status == "FAILED" and "teachers.num_gpus" in logs and f"node type '{GPU_TYPE}'" in logs, logs[-3000:]
    # a feasible request (no GPU node is up yet) that does not arrive in time fails at the deadline
    status, logs = _job(address, env, *tiny, "--set", "runtime.scale_timeout_s=0.5", "--set", "name=late", timeout=180)
    assert status == "FAILED" and "waiting for the autoscaler: 2 teachers need 1 GPU each, 0 GPU nodes up" in logs
    assert "teachers: no node with 1 GPU (teachers.num_gpus) joined within runtime.scale_timeout_s=0.5 s" in logs

    t0 = time.time()
    status, logs = _job(address, env, *tiny)
    wall = time.time() - t0
    assert status == "SUCCEEDED", logs[-4000:]
    print(f"\nfake-autoscaler pipeline job: {wall:.0f} s wall")
    import ray

    ray.init(address="auto")
    try:
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}
    finally:
        ray.shutdown()
    assert gpu_nodes, "the autoscaler added no GPU node"
    ensemble = storage.read_json(storage.join(root, "gpu", "teachers", "ensemble.json"))
    assert len(ensemble["placement"]) == 2
    for where in ensemble["placement"].values():  # each teacher on a GPU node, with a GPU id
        assert where["node_id"] in gpu_nodes and where["gpu_ids"]
    sweep = storage.read_json(storage.join(root, "gpu", "sweep.json"))
    assert sweep["complete"] and sweep["student_gpu"]
    students = storage.list_files(storage.join(root, "gpu", "students"), "result.json")
    assert len(students) == 2
    for path in students:  # each student's Train worker on a GPU node, with a GPU id
        m = storage.read_json(path)["metrics"]
        assert m["worker_node"] in gpu_nodes and m["worker_gpu_ids"]
    assert storage.exists(storage.join(root, "gpu", "summary.md"))  # the report, in the bucket

"""The cluster path on Ray's fake multi-node autoscaler (tests/fixtures/fake_cluster.py): GPU
stages scale a GPU worker type from zero, storage on a real S3 server on 127.0.0.1."""
import time

import pytest

from tests.fixtures.fake_cluster import GPU_TYPE, submit


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_gpu_stages_scale_a_gpu_worker_type_from_zero(fake_cluster, s3):
    from kd_ray.core import storage

    address, _ = fake_cluster
    root = storage.join(s3, "fake")
    tiny = ["--set", f"runtime.storage_path={root}", "--set", "name=gpu", "--set", "teachers.count=2",
            "--set", "teachers.epochs=1", "--set", "teachers.model_args={hidden: [32]}",
            "--set", "teachers.num_gpus=1", "--set", "teachers.num_cpus=1",
            "--set", "soft_targets.num_gpus=1", "--set", "soft_targets.num_cpus=1",
            "--set", "student.epochs=1", "--set", "student.model_args={hidden: [32]}",
            "--set", "sweep.fractions=[1.0]", "--set", "sweep.seeds=[0]", "--set", "runtime.scale_timeout_s=300"]
    # a request no node type can hold fails at once, naming the field and the largest node type
    status, logs = submit(address, *tiny, "--set", "teachers.num_gpus=8", timeout=180)
    assert status == "FAILED" and "teachers.num_gpus" in logs and f"node type '{GPU_TYPE}'" in logs, logs[-3000:]
    # a feasible request (no GPU node is up yet) that does not arrive in time fails at the deadline
    status, logs = submit(address, *tiny, "--set", "runtime.scale_timeout_s=0.5", "--set", "name=late", timeout=180)
    assert status == "FAILED" and "waiting for the autoscaler: 2 teachers need 1 GPU each, 0 GPU nodes up" in logs
    assert "teachers: no node with 1 GPU (teachers.num_gpus) joined within runtime.scale_timeout_s=0.5 s" in logs

    t0 = time.time()
    status, logs = submit(address, *tiny)
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

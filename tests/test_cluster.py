"""Cluster-wide checks: storage that every node can reach, teachers spread over nodes.

The 2-node tests start their own ``ray.cluster_utils.Cluster`` (isolated: they run last, after
the shared cluster has shut down, since two Ray instances on one machine break Ray Train).
"""
import pytest

from kd_ray.core import storage
from kd_ray.core.config_files import load_config
from kd_ray.stages.cluster import check_storage


def test_a_file_uri_works_like_a_local_path(tmp_path):
    plain, uri = str(tmp_path / "a"), f"file://{tmp_path}/b"
    for root in (plain, uri):
        assert storage.is_local(root)
        storage.write_json(storage.join(root, "x", "m.json"), {"k": 1})
        storage.write_bytes(storage.join(root, "x", "y.bin"), b"abc")
        assert storage.exists(storage.join(root, "x", "m.json"))
        assert storage.read_json(storage.join(root, "x", "m.json")) == {"k": 1}
        assert [p.rsplit("/", 1)[1] for p in storage.list_files(root)] == ["m.json", "y.bin"]
        storage.delete_dir(storage.join(root, "x"))
        assert not storage.exists(storage.join(root, "x"))
    assert storage.absolute(uri) == uri and storage.absolute("rel") != "rel"


def _autoscaling():
    """A CPU-only head alive now and a GPU worker type the autoscaler may launch, 0 to 2 nodes."""
    from kd_ray.stages.cluster import Capacity, NodeKind

    head = NodeKind("node 10.0.0.1 (head)", {"CPU": 2.0, "memory": 8e9})
    gpu = NodeKind("node type 'gpu_worker'", {"CPU": 8.0, "GPU": 1.0}, max_count=2)
    return Capacity([head], [gpu])


def test_feasibility_counts_the_node_types_the_autoscaler_may_launch():
    from kd_ray.stages.cluster import Capacity, check_feasible

    cap = _autoscaling()
    gpu_teacher = {"CPU": 1.0, "GPU": 1.0}
    assert cap.could_fit(gpu_teacher) and not cap.fits_now(gpu_teacher)  # feasible: wait, do not fail
    check_feasible(cap, gpu_teacher, {"CPU": "teachers.num_cpus", "GPU": "teachers.num_gpus"}, "teacher t0")
    with pytest.raises(ValueError, match=r"teacher t0 asks for 8 GPUs \(teachers.num_gpus\) but the largest node or "
                                         r"node type \(node type 'gpu_worker'\) has 1"):
        check_feasible(cap, {"CPU": 1.0, "GPU": 8.0}, {"CPU": "teachers.num_cpus", "GPU": "teachers.num_gpus"},
                       "teacher t0")
    assert cap.max_nodes() == 2 and cap.max_resources()["GPU"] == 2 and cap.has_gpus()
    fixed = Capacity(cap.alive, [])  # a fixed cluster is its alive nodes
    assert not fixed.could_fit(gpu_teacher) and fixed.max_nodes() == 1 and not fixed.has_gpus()
    with pytest.raises(ValueError, match=r"teacher t0 asks for 1 GPUs \(teachers.num_gpus\) but the largest node \("):
        check_feasible(fixed, gpu_teacher, {"CPU": "teachers.num_cpus", "GPU": "teachers.num_gpus"}, "teacher t0")


def test_local_storage_is_refused_when_the_cluster_may_grow_and_gpus_follow_the_cluster(tmp_path):
    from kd_ray.stages.cluster import Capacity, student_uses_gpu

    cfg = load_config(None, [f"runtime.storage_path={tmp_path}"])
    with pytest.raises(ValueError, match="is a local path, but the cluster may grow to 2 nodes"):
        check_storage(cfg, _autoscaling())
    check_storage(cfg, Capacity(_autoscaling().alive, []))  # one node, fixed: a local folder is fine
    check_storage(load_config(None, ["runtime.storage_path=s3://bucket/runs"]), _autoscaling())
    # students train on GPU workers when a GPU node type exists, whatever the driver's torch sees
    assert student_uses_gpu(cfg, _autoscaling())
    assert not student_uses_gpu(cfg, Capacity(_autoscaling().alive, []))
    assert not student_uses_gpu(load_config(None, ["student.use_gpu=false"]), _autoscaling())


@pytest.fixture
def two_nodes(no_ray):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
@pytest.mark.isolated
def test_two_nodes_refuse_local_storage_and_spread_teachers(two_nodes, tmp_path):
    import ray

    from kd_ray.stages.teachers import train_ensemble

    for path in (str(tmp_path), f"file://{tmp_path}"):
        cfg = load_config(None, [f"runtime.storage_path={path}"])
        with pytest.raises(ValueError, match="is a local path, but the cluster has 2 nodes") as e:
            check_storage(cfg)
        assert "s3://" in str(e.value) and "shared_filesystem: true" in str(e.value)
    # a local path that every node mounts, declared as such, is accepted (as is any s3:// URI)
    cfg = load_config(None, [f"runtime.storage_path={tmp_path}", "runtime.shared_filesystem=true",
                             "teachers.count=2", "teachers.epochs=1", "teachers.model_args={hidden: [32]}",
                             "teachers.spread=true"])
    check_storage(cfg)
    result = train_ensemble(cfg)
    nodes = {t["node_id"] for t in result.teachers}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and len(nodes) == 2

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

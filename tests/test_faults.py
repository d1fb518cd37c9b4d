"""Faults on the cluster path, each end to end on Ray's fake autoscaler with storage on a real S3
server (tests/fixtures/fake_cluster.py): a GPU node lost while teachers and then sweep trials run
on it, the job's driver killed mid-sweep, and the object store's endpoint gone during a stage.
Nothing finished is lost and nothing is taken for finished that is not. Each phase prints how long
the fault cost and what was recomputed (docs/pipeline.md, "Faults: what each one costs").

Run by `make test-faults` (CI runs it after `make test`).
"""
import json
import os
import subprocess
import time

import pytest

from tests.fixtures.fake_cluster import start_job, submit
from tests.fixtures.jobs import wait_job
from tests.fixtures.network import TcpProxy

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.isolated, pytest.mark.faults]

BUCKET = "kd-runs"


def _s3():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def _keys(prefix: str, suffix: str = "") -> dict[str, float]:
    """{key: last-modified time} of the objects under ``prefix`` (read past any proxy)."""
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["LastModified"].timestamp() for p in pages for o in p.get("Contents", [])
            if o["Key"].endswith(suffix)}


def _json(key: str) -> dict:
    return json.loads(_s3().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def _wait_for(what: str, check, timeout: float = 300):
    deadline = time.time() + timeout
    while not (found := check()):
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)
    return found


def _alive(address: str, **filters) -> list:
    from ray.util.state import list_actors

    actors = list_actors(address=address, limit=10000, raise_on_missing_output=False)
    return [a for a in actors if a.state == "ALIVE" and all(v in str(getattr(a, k)) for k, v in filters.items())]


def _gpu_nodes(address: str) -> set[str]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, limit=10000, raise_on_missing_output=False)
    return {n.node_id for n in nodes if n.state == "ALIVE" and n.resources_total.get("GPU", 0) > 0}


def _lose_node(temp: str, node_id: str) -> float:
    """A spot reclaim: every process of one fake node killed at once (its raylet and what it
    started), and the provider told the instance is gone; the time it happened."""
    subprocess.run(["pkill", "-KILL", "-f", f"node.id={node_id}"], check=False)
    with open(os.path.join(temp, "reclaimed"), "a") as f:
        f.write(node_id + "\n")
    return time.time()


ARGS = ["--set", "teachers.count=2", "--set", "teachers.num_gpus=1", "--set", "teachers.num_cpus=1",
        "--set", "teachers.max_restarts=2", "--set", "soft_targets.num_gpus=1", "--set", "soft_targets.num_cpus=1",
        "--set", "student.report_every=1",
        "--set", "student.max_failures=1", "--set", "sweep.fractions=[1.0]", "--set", "sweep.targets=[soft]",
        "--set", "sweep.max_concurrent_trials=2", "--set", "runtime.scale_timeout_s=300"]


def test_a_lost_gpu_node_a_killed_driver_and_an_object_store_outage_lose_nothing(fake_cluster, s3):
    address, temp = fake_cluster
    root = f"{s3}/faults"

    # 1. A GPU node lost mid-teachers, then one lost mid-sweep: the teacher actor restarts on the
    # node the autoscaler adds and goes on from its checkpoint; so does the Tune trial.
    spot = [*ARGS, "--set", f"runtime.storage_path={root}", "--set", "name=spot", "--set", "teachers.epochs=60",
            "--set", "teachers.model_args={hidden: [1200, 1200]}", "--set", "teachers.batch_size=32"]
    run = [*spot, "--set", "student.epochs=150", "--set", "sweep.seeds=[0, 1]"]  # trials long enough to lose
    t_start = time.time()
    client, sid = start_job(address, *run)
    _wait_for("teacher checkpoint", lambda: _keys("faults/spot/teachers/t0/checkpoint.pt"))
    teacher = _wait_for("teacher actor", lambda: _alive(address, class_name="Teacher"))[0]
    first_nodes, lost_teacher_node = _gpu_nodes(address), teacher.node_id
    t_lost = _lose_node(temp, lost_teacher_node)
    _wait_for("a GPU node the autoscaler adds", lambda: _gpu_nodes(address) - first_nodes)
    t_replaced = time.time()
    _wait_for("a student checkpoint", lambda: _keys("faults/spot/students/", "student.pt"), timeout=600)
    trial = _wait_for("a running trial", lambda: _alive(address, class_name="ImplicitFunc"), timeout=60)[0]
    sweep_nodes, lost_trial_node = _gpu_nodes(address), trial.node_id
    t_lost_trial = _lose_node(temp, lost_trial_node)
    status = wait_job(client, sid, 900)
    logs = client.get_job_logs(sid)
    t_done = time.time()
    assert status == "SUCCEEDED", logs[-4000:]
    ensemble = _json("faults/spot/teachers/ensemble.json")
    resumed = {tid: m for tid, m in ((t, _json(f"faults/spot/teachers/{t}/meta.json")) for t in ensemble["placement"])
               if any(h.get("resumed_from", 0) > 0 for h in m["history"])}
    assert resumed, "no teacher went on from a checkpoint after its node was lost"
    for tid, meta in resumed.items():  # finished on a node that joined after the loss
        assert ensemble["placement"][tid]["node_id"] not in first_nodes and meta["epoch"] == 60
    resumed_from = {tid: max(h.get("resumed_from", 0) for h in m["history"]) for tid, m in resumed.items()}
    results = {k: _json(k) for k in _keys("faults/spot/students/", "result.json")}
    assert len(results) == 2
    histories = [r["history"] for r in results.values()]
    retried = [r for r in results.values() if any(h["resumed_from"] > 0 for h in r["history"])]
    assert retried, "no trial went on from its checkpoint"
    assert all(r["metrics"]["worker_node"] not in sweep_nodes for r in retried)  # on a node added after the loss
    assert all(hist[-1]["epoch"] == 150 for hist in histories)
    print(f"\n[faults] lost GPU node, teachers: replacement GPU node up {t_replaced - t_lost:.0f} s after the loss; "
          f"teacher(s) resumed after epoch {resumed_from} of 60 (the epoch in progress is redone); "
          f"lost GPU node, sweep: the trial resumed after epoch "
          f"{max(h['resumed_from'] for r in retried for h in r['history'])} of 150, job done "
          f"{t_done - t_lost_trial:.0f} s after the loss; whole job {t_done - t_start:.0f} s")

    # 2. The job's driver killed mid-sweep: the same command submitted again finishes the sweep,
    # and the trials that had finished are not run again.
    more = [*spot, "--set", "student.epochs=40", "--set", "sweep.seeds=[0, 1, 2, 3]", "--set",
            "sweep.max_concurrent_trials=1"]  # a sweep of its own, on the same teachers
    before = _keys("faults/spot/students/", "result.json")
    client, sid = start_job(address, *more)
    _wait_for("a finished new trial", lambda: len(_keys("faults/spot/students/", "result.json")) > len(before),
              timeout=600)
    finished = _keys("faults/spot/students/", "result.json")
    driver = int(client.get_job_info(sid).driver_info.pid)
    os.kill(driver, 9)
    t_killed = time.time()
    assert wait_job(client, sid, 120) == "FAILED"
    status, logs = submit(address, *more)
    t_again = time.time()
    assert status == "SUCCEEDED", logs[-4000:]
    after = _keys("faults/spot/students/", "result.json")
    assert len(after) == len(before) + 4
    # a student that had finished is read back, not trained again, even when the driver died before
    # its trial's row was written (then the sweep counts it as to run, and it takes 0 s)
    assert all(after[k] == t for k, t in finished.items()), "a trial that had finished was run again"
    kept = len(finished) - len(before)
    print(f"[faults] killed driver: resubmitted job done {t_again - t_killed:.0f} s after the kill; "
          f"{kept} of 4 students kept, {4 - kept} trained by the second job")

    # 3. The object store's endpoint gone during the soft-target stage, longer than kd_ray retries:
    # the job fails in one line naming it; submitted again when it is back, the job reuses the
    # teachers and builds the soft targets anew (the interrupted cache was never marked complete).
    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    proxy.up()
    through = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "KD_RAY_STORAGE_RETRY_S": "4"}
    tiny = [*ARGS, "--set", f"runtime.storage_path={root}", "--set", "name=outage", "--set", "teachers.epochs=2",
            "--set", "teachers.model_args={hidden: [32]}", "--set", "student.model_args={hidden: [32]}",
            "--set", "student.epochs=2", "--set", "sweep.seeds=[0]"]
    client, sid = start_job(address, *tiny, env_vars=through)
    _wait_for("the teachers", lambda: _keys("faults/outage/teachers/ensemble.json"), timeout=600)
    proxy.down()
    t_down = time.time()
    assert wait_job(client, sid, 300) == "FAILED"
    logs = client.get_job_logs(sid)
    last = [line for line in logs.splitlines() if line.strip()][-1]
    assert last.startswith(f"kd_ray pipeline: failed: storage: s3://{BUCKET} at http://127.0.0.1:{proxy.port} "
                           f"unreachable"), logs[-3000:]
    proxy.up()
    t_up = time.time()
    status, logs = submit(address, *tiny, env_vars=through)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "0 to train, 2 complete and reused" in logs and "built at" in logs
    print(f"[faults] object store down: failed {t_up - t_down:.0f} s into the outage with one line; "
          f"resubmitted job done {time.time() - t_up:.0f} s after it came back; teachers reused, soft targets rebuilt")

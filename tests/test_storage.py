"""Storage on local folders and on a real S3 protocol server (moto's server mode on 127.0.0.1)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_ray.core import storage
from tests.fixtures.network import TcpProxy, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs" / "bench"))  # make_synthetic


def test_storage_round_trips_on_s3(s3):
    root = storage.join(s3, "exp")
    storage.write_json(storage.join(root, "a", "m.json"), {"k": 1})
    storage.save_torch(storage.join(root, "a", "t.pt"), {"x": [1, 2]})
    assert storage.read_json(storage.join(root, "a", "m.json")) == {"k": 1}
    assert storage.load_torch(storage.join(root, "a", "t.pt")) == {"x": [1, 2]}
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(root)] == ["m.json", "t.pt"]
    storage.check_writable(root)
    storage.delete_dir(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a", "m.json"))


def test_unwritable_or_unreachable_storage_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    from kd_ray.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
        locked = tmp_path / "a-file"
        locked.write_text("")
    assert main(["teachers", "--set", f"runtime.storage_path={locked}/runs"]) == 2
    err = capsys.readouterr().err
    assert "runtime.storage_path=" in err and "is not writable or not reachable" in err and "Traceback" not in err
    import ray

    already = ray.is_initialized()  # the shared test cluster may be up; kd_ray must not start one
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    assert main(["run", "--set", "runtime.storage_path=s3://kd-runs/exp"]) == 2
    err = capsys.readouterr().err
    assert "runtime.storage_path='s3://kd-runs/exp' is not writable or not reachable" in err
    assert ray.is_initialized() == already  # nothing started


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_pipeline_on_s3_then_everything_reused_then_an_interrupted_sweep_finished(s3, no_ray, capsys, interrupt,
                                                                                 monkeypatch, tmp_path):
    from kd_ray.cli import main

    # the endpoint from runtime.storage_options, not the environment: Ray's workers get it too
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    root = storage.join(s3, "exp")
    argv = ["run", "--set", f"runtime.storage_path={root}", "--set", "runtime.num_cpus=4",
            "--set", f"runtime.storage_options={{endpoint_url: '{endpoint}'}}",
            "--set", "teachers.count=2", "--set", "teachers.epochs=2", "--set", "teachers.model_args={hidden: [32]}",
            "--set", "student.epochs=2", "--set", "student.model_args={hidden: [32]}",
            "--set", "sweep.fractions=[0.5]", "--set", "sweep.seeds=[0]"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "2 to train" in first
    for name in ("results.parquet", "summary.md", "accuracy_vs_fraction.png", "sweep.json", "teachers/ensemble.json"):
        assert storage.exists(storage.join(root, "digits", name)), name
    students = [p for p in storage.list_files(storage.join(root, "digits", "students"), "result.json")]
    assert len(students) == 2  # Ray Train's runs and their results went to the bucket
    assert main(argv) == 0  # again: every stage found finished in the bucket
    again = capsys.readouterr().out
    assert "0 to train, 2 complete and reused" in again and "reused at s3://" in again
    assert "2 already finished, 0 to run" in again

    # a sweep interrupted after one trial, then finished from the bucket
    from kd_ray.core.config_files import load_config
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep
    from kd_ray.stages.teachers import train_ensemble

    cfg = load_config(None, argv[2::2] + ["sweep.seeds=[1]", "sweep.targets=[hard]", "sweep.fractions=[0.3, 0.5]",
                                          "sweep.max_concurrent_trials=1"])
    st = build_soft_targets(cfg, train_ensemble(cfg))
    assert not run_sweep(cfg, st, callbacks=[interrupt(after=1)]).complete
    done = run_sweep(cfg, st)
    assert done.complete and set(done.results["status"]) == {"done"} and len(done.results) == 2
    assert storage.exists(storage.join(root, "digits", "results.parquet"))

    # a cached-views student, from a views cache in the bucket (no teacher passes while it trains)
    from kd_ray.stages.distill import distill

    vcfg = load_config(None, argv[2::2] + ["soft_targets.views=2", "soft_targets.jitter=1",
                                           "student.teaching=cached_views", "student.fraction=0.3"])
    vst = build_soft_targets(vcfg, train_ensemble(vcfg))
    assert vst.path.startswith("s3://") and vst.manifest["rows"]["views"] == 2 * len(vst.transfer)
    out = distill(vcfg, vst)
    assert out.metrics["teaching"] == "cached_views" and out.metrics["teacher_passes"] == 0
    assert 0 < out.metrics["test_accuracy"] <= 1
    assert storage.exists(storage.join(root, "digits", "students", out.run_name, "result.json"))

    # a streamed parquet source in the bucket -> its top-k cache in the bucket -> a student's rows
    import make_synthetic
    from common import untrained_teachers

    from kd_ray.stages.datasets import from_dataset
    from kd_ray.stages.sources import open_source
    from kd_ray.stages.streamed_targets import build_streamed_targets, student_rows

    data = storage.join(s3, "synthetic")
    make_synthetic.write(data, rows=600, test_rows=100, classes=20, shard_rows=300, seed=0)
    scfg = load_config(None, argv[2::2] + ["data.name=parquet", f"data.root={data}", "data.image_shape=[3, 32, 32]",
                                           "soft_targets.teacher_logits=topk", "soft_targets.top_k=4"])
    source = open_source(scfg.data, subsets=[(0.5, 0)])
    soft = build_streamed_targets(
        scfg, untrained_teachers(tmp_path, source.input_shape, 20, 3, "cnn", {"channels": [8, 16]})[1], source)
    path, manifest = soft.path, soft.manifest
    assert path.startswith("s3://") and manifest["rows"] == source.rows and source.rows["test"] == 100
    got = from_dataset(student_rows(source, path, 0.5, 0), ("id", "teacher_topk_values"))
    want = from_dataset(source.split("train", 0.5, 0), ("id",))["id"]
    assert np.array_equal(np.sort(got["id"]), np.sort(want)) and got["teacher_topk_values"].shape[1:] == (3, 4)


def test_an_object_store_outage_is_waited_out_then_named_in_one_line(s3, monkeypatch):
    """Every storage call is safe to repeat: during an outage it retries with backoff; an outage
    longer than storage.RETRY_S fails in one line naming the endpoint."""
    import threading
    import time

    from kd_ray.core import storage

    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    proxy.up()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    storage.write_json(f"{s3}/outage/before.json", {"ok": 1})
    proxy.down()
    threading.Timer(3.0, proxy.up).start()  # back after 3 s
    t0 = time.monotonic()
    storage.write_json(f"{s3}/outage/during.json", {"ok": 2})  # waits the outage out
    assert time.monotonic() - t0 >= 2.5 and storage.read_json(f"{s3}/outage/during.json") == {"ok": 2}
    proxy.down()
    monkeypatch.setattr(storage, "RETRY_S", 2.0)
    with pytest.raises(storage.StorageUnreachable) as e:
        storage.read_json(f"{s3}/outage/before.json")
    assert str(e.value).startswith(f"storage: s3://kd-runs at http://127.0.0.1:{proxy.port} unreachable for 2 s")
    assert "\n" not in str(e.value)


def test_a_stage_that_lost_its_object_store_fails_in_one_line_naming_it(monkeypatch):
    """Ray Data's and Tune's own reads and writes are not retried by kd_ray: when one fails
    because the endpoint went away, the stage's error is one line naming the endpoint and stage."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    aws = OSError("When reading information for key 'kd/teachers/t0/model.pt' in bucket 'kd-runs': AWS Error "
                  "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Couldn't connect to server")
    try:
        try:
            raise aws
        except OSError as inner:
            raise RuntimeError("Task failed: ReadParquet->MapBatches(EnsemblePredictor)\n  Traceback ...") from inner
    except RuntimeError as wrapped:
        down = storage.unreachable(wrapped, "s3://kd-runs/kd", "soft-targets")
    assert isinstance(down, storage.StorageUnreachable) and "\n" not in str(down)
    assert str(down).startswith("storage: s3://kd-runs at http://127.0.0.1:9 unreachable during stage soft-targets "
                                "(When reading information for key")
    assert storage.unreachable(aws, "/local/runs", "soft-targets") is None  # a local folder has no endpoint
    assert storage.unreachable(RuntimeError("CUDA out of memory"), "s3://kd-runs/kd", "sweep") is None


def test_the_storage_check_probes_each_path_once_per_process(tmp_path):
    """A stage after the first finds the store as the pre-flight left it: when it has gone since,
    that is an outage for the stage's own (retried) calls to name, not a bad setting."""
    path = str(tmp_path / "runs")
    storage.check_writable(path)
    (tmp_path / "runs").rename(tmp_path / "moved")
    (tmp_path / "runs").write_text("")  # a file where the folder was: a fresh probe would fail
    storage.check_writable(path)  # passed once in this process: not probed again
    with pytest.raises(ValueError, match="is not writable or not reachable"):
        storage.check_writable(str(tmp_path / "runs" / "sub"))  # a new path is probed

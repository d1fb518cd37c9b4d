"""Teacher ensemble on a real local Ray cluster: GPU-aware queueing, restarts that resume,
reuse of complete teachers, spreading over nodes, and bad input."""
import time

import pytest
import torch

from kd_ray.core import storage
from kd_ray.core.config import ConfigError
from kd_ray.core.models import build_model
from kd_ray.stages.teachers import EnsembleError, EnsembleRun, train_ensemble

pytestmark = pytest.mark.ray


def _max_concurrency(teachers):
    events = sorted([(t["start"], 1) for t in teachers] + [(t["end"], -1) for t in teachers])
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


@pytest.mark.slow
def test_gpu_teachers_queue_two_at_a_time_and_reuse(ray_session, digits_cfg):
    cfg = digits_cfg("teachers.count=4", "teachers.num_gpus=1", "teachers.epochs=3")
    result = train_ensemble(cfg)
    assert len(result.teachers) == 4
    assert _max_concurrency(result.teachers) <= 2  # 2 logical GPUs on the shared cluster
    for t in result.teachers:
        assert len(t["gpu_ids"]) == 1 and t["device"] == "cpu"  # torch sees no real GPU
        assert t["torch_threads"] == 1
    # teachers that overlapped in time held different GPUs
    for a in result.teachers:
        for b in result.teachers:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["gpu_ids"] != b["gpu_ids"]
    assert 0.5 < result.val_accuracy <= 1.0
    summary = result.summary()
    assert list(summary.columns) == ["teacher", "model", "parameters", "val_accuracy", "epochs", "epochs_run", "seconds"]

    # running again trains no epoch
    again = train_ensemble(cfg)
    assert [t["epochs_run"] for t in again.teachers] == [0, 0, 0, 0]
    assert again.val_accuracy == result.val_accuracy

    # a changed seed retrains only that teacher (heterogeneous specs: t2 gets seed 99)
    changed = cfg.model_copy(deep=True)
    changed.teachers.specs = [{}, {}, {"seed": 99}, {}]
    for i, spec in enumerate(changed.teachers.specs):
        spec.setdefault("seed", i)
    third = train_ensemble(changed)
    assert [t["epochs_run"] for t in third.teachers] == [0, 0, 3, 0]


@pytest.mark.slow
def test_killed_teacher_resumes_from_its_checkpoint(ray_session, digits_cfg):
    import ray

    cfg = digits_cfg("teachers.count=2", "teachers.epochs=25", "teachers.model_args={hidden: [1200, 1200]}",
                     "teachers.batch_size=32", "teachers.max_restarts=2")
    run = EnsembleRun(cfg)
    ckpt = storage.join(cfg.runtime.storage_path, cfg.name, "teachers", "t0", "checkpoint.pt")
    deadline = time.time() + 120
    while not storage.exists(ckpt):
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    ray.kill(run.actors["t0"], no_restart=False)  # dies mid-training; Ray restarts it
    result = run.wait()
    t0 = result.teachers[0]
    assert t0["resumed_from_epoch"] >= 1
    assert t0["epochs_run"] < 25 == t0["epoch"]
    assert any("resumed after epoch" in line for line in t0["log"])
    blob = storage.load_torch(t0["model_path"])
    model = build_model(blob["model"], blob["input_shape"], blob["num_classes"], **blob["model_args"])
    model.load_state_dict(blob["state_dict"])
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert result.teachers[1]["epochs_run"] == 25


def test_too_many_gpus_fails_at_once(ray_session, digits_cfg):
    t = time.time()
    with pytest.raises(ValueError, match=r"teacher t0 asks for 4 GPUs .* largest node .* has 2"):
        train_ensemble(digits_cfg("teachers.num_gpus=4"))
    with pytest.raises(ValueError, match=r"teacher t0 asks for 64 CPUs .* largest node"):
        train_ensemble(digits_cfg("teachers.num_cpus=64"))
    assert time.time() - t < 30


def test_bad_specs_rejected_before_work(digits_cfg):
    with pytest.raises(ConfigError, match="teachers.count"):
        digits_cfg("teachers.count=0")
    with pytest.raises(ConfigError, match="unknown model 'transformer'"):
        digits_cfg("teachers.model=transformer")


@pytest.mark.slow
def test_diverging_teacher_is_named_and_others_kept(ray_session, digits_cfg):
    cfg = digits_cfg("teachers.count=3", "teachers.specs=[{}, {lr: 1.0e+12, momentum: 0.0}, {}]")
    with pytest.raises(EnsembleError, match=r"t1: TeacherError: teacher t1: training loss became nan") as e:
        train_ensemble(cfg)
    assert "t0" not in str(e.value).split("failed:")[1].split(".")[0]
    base = storage.join(cfg.runtime.storage_path, cfg.name, "teachers")
    for tid in ("t0", "t2"):
        blob = storage.load_torch(storage.join(base, tid, "model.pt"))
        assert blob["teacher_id"] == tid
    assert not storage.exists(storage.join(base, "t1", "model.pt"))

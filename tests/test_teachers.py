"""Teacher ensemble on a real local Ray cluster: GPU-aware queueing, restarts that resume,
reuse of complete teachers, spreading over nodes, and bad input."""
import time

import pytest
import torch

from kd_ray.core import storage
from kd_ray.core.config import ConfigError
from kd_ray.core.data import load_splits
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
    assert list(summary.columns) == ["teacher", "model", "parameters", "val_accuracy", "epochs", "kept_epoch",
                                     "epochs_run", "seconds"]
    for t in result.teachers:  # each keeps its best validation epoch (the first of equals), as students do
        accs = [h["val_accuracy"] for h in t["history"]]
        assert t["kept_epoch"] == 1 + accs.index(max(accs)) and t["val_accuracy"] == max(accs)
    val_labels = torch.from_numpy(load_splits(cfg.data).val.labels)
    for t in result.teachers:  # ... and the saved model is that epoch's: its validation logits say so
        kept = storage.load_torch(t["model_path"])["val_logits"].argmax(1)
        assert t["val_accuracy"] == pytest.approx(float((kept == val_labels).float().mean()))

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


@pytest.mark.slow
def test_imported_and_timm_teachers_distil_a_timm_student_with_tracking(ray_session, tmp_path, capsys, monkeypatch):
    """Three teachers trained elsewhere (two state dicts, one TorchScript file) build soft targets and
    teach a timm student without any teacher training; then a fourth teacher, a timm model trained
    here, joins them (a mixed ensemble). MLflow holds one run per trial, TensorBoard their curves."""
    import hashlib
    import warnings

    from mlflow.tracking import MlflowClient

    from kd_ray.cli import main
    from kd_ray.core.config import DataConfig
    from kd_ray.core.data import load_splits
    from tests.fixtures.factories import teacher_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = teacher_files(tmp_path, load_splits(DataConfig()))
    sha = {k: hashlib.sha256(open(p, "rb").read()).hexdigest() for k, p in files.items()}
    specs = (f"[{{checkpoint: '{files['mlp_state']}', model: mlp, model_args: {{hidden: [64]}}}}, "
             f"{{checkpoint: '{files['timm_state']}', model: 'timm:test_efficientnet'}}, "
             f"{{checkpoint: '{files['torchscript']}'}}")
    root = tmp_path / "runs"
    argv = ["run", "--set", f"runtime.storage_path={root}", "--set", f"teachers.specs={specs}]", "--set", "teachers.count=3",
            "--set", "student.model=timm:test_efficientnet", "--set", "student.model_args={}",
            "--set", "student.epochs=1", "--set", "student.use_gpu=false",
            "--set", "sweep.fractions=[1.0]", "--set", "sweep.seeds=[0]",
            "--set", "runtime.tracking=[tensorboard, mlflow]", "--set", "runtime.stages=[teachers, soft-targets, sweep]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "teacher t2 imported from" in out and "0 to train, 3 complete and reused" in out
    exp = root / "digits"
    manifest = storage.read_json(str(exp / "teachers" / "ensemble.json"))
    assert len(manifest["model_paths"]) == 3
    assert {k: hashlib.sha256(open(p, "rb").read()).hexdigest() for k, p in files.items()} == sha  # never overwritten
    # one MLflow run per trial (soft and hard), each with its validation curve and the config
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store
    client = MlflowClient(f"file://{exp / 'mlruns'}")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    students = [r for r in runs if r.data.tags["kd_ray_kind"] == "student"]
    assert len(students) == 2 and {r.data.params["targets"] for r in students} == {"soft", "hard"}
    assert all(r.data.params["model"] == "timm:test_efficientnet" and "val_accuracy" in r.data.metrics for r in students)
    assert len(list((exp / "tensorboard" / "students").iterdir())) == 2
    assert (exp / "config.yaml").exists()

    # a mixed ensemble: the three imported teachers and a timm teacher fine-tuned here from pretrained
    # weights (a file; at a learning rate of ~0 its weights stay those it started from)
    argv[4] = (f"teachers.specs={specs}, {{model: 'timm:test_efficientnet', epochs: 1, lr: 1.0e-12, "
               f"pretrained_file: '{files['timm_state']}'}}]")
    argv[6] = "teachers.count=4"
    assert main(argv[:-2] + ["--set", "runtime.stages=[teachers]"]) == 0
    out = capsys.readouterr().out
    assert "1 to train, 3 complete and reused" in out and "teacher t3 done" in out
    tuned = storage.load_torch(str(exp / "teachers" / "t3" / "model.pt"))["state_dict"]
    start = torch.load(files["timm_state"], weights_only=True)
    weights = [k for k in start if k in tuned and "running_" not in k and "num_batches" not in k]  # BN stats move
    assert len(weights) > 10 and all(torch.allclose(tuned[k], start[k], atol=1e-5) for k in weights)
    assert list((exp / "tensorboard" / "teachers" / "t3").iterdir())
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert [r.data.tags["kd_ray_run"] for r in runs if r.data.tags["kd_ray_kind"] == "teacher"] == ["t3"]


@pytest.mark.slow
def test_the_same_teachers_twice_are_bit_identical_under_load_and_say_where_they_ran(ray_session, tmp_path):
    """Determinism on one machine: torch's threads follow the CPUs an actor holds (not the node's),
    so extra load on the machine changes timing, never numbers; each teacher records the versions,
    threads and CPU that produced it."""
    import subprocess
    import sys

    from kd_ray.core.config_files import load_config

    def run(where):
        cfg = load_config(None, [f"runtime.storage_path={tmp_path / where}", "teachers.count=2", "teachers.epochs=2",
                                 "teachers.model_args={hidden: [32]}", "teachers.jitter=1"])
        return train_ensemble(cfg)

    first = run("quiet")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy core beside the teachers
    try:
        second = run("loaded")
    finally:
        hog.kill()
    for a, b in zip(first.teachers, second.teachers):
        sa, sb = (storage.load_torch(t["model_path"])["state_dict"] for t in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        env = b["environment"]
        assert env["torch_threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"]

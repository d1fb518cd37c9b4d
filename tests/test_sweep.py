"""The Ray Tune sweep: its grid and resources (pure), and real sweeps on the shared cluster."""
import json
import os

import numpy as np
import pytest

from kd_ray.cli import main
from kd_ray.core.config import ConfigError
from kd_ray.core.config_files import build_config, load_config
from kd_ray.stages.sweep import max_concurrent, trial_resources

SMALL = ["student.model_args={hidden: [64]}", "student.epochs=3", "student.batch_size=32", "student.lr=0.05"]


def _cfg(base, name, *overrides):
    return build_config(base.model_dump(mode="json"), [f"name={name}", *SMALL, *overrides])


# --------------------------------------------------------------------------- pure
def test_consistent_trials_also_hold_their_predictor_actors():
    cfg = load_config(None, ["soft_targets.jitter=1", "sweep.teaching=[cached, consistent]"])
    cached = {"teaching": "cached"}
    consistent = {"teaching": "consistent"}
    assert trial_resources(cfg, False, cached) == {"CPU": 1.0, "GPU": 0.0}
    assert trial_resources(cfg, False, consistent) == {"CPU": 2.0, "GPU": 0.0}
    # 2 cores: two cached trials at a time, but one consistent trial (its worker + its actor)
    assert max_concurrent(cfg, {"CPU": 2.0}, False, 24, cached) == 2
    assert max_concurrent(cfg, {"CPU": 2.0}, False, 24, consistent) == 1
    gpu = build_config(cfg.model_dump(mode="json"), ["soft_targets.num_gpus=0.5", "soft_targets.num_cpus=0.5"])
    assert trial_resources(gpu, True, consistent) == {"CPU": 1.5, "GPU": 1.5}
    assert max_concurrent(gpu, {"CPU": 8.0, "GPU": 2.0}, True, 24, consistent) == 1
    with pytest.raises(ConfigError, match="plus its predictor actors"):
        max_concurrent(cfg, {"CPU": 1.0}, False, 4, consistent)
    # a streamed source's trials keep a CPU free for their read/decode/join tasks
    streamed = load_config(None, ["data.name=parquet", "data.root=/data", "data.stream=true"])
    assert trial_resources(streamed, False, cached) == {"CPU": 2.0, "GPU": 0.0}
    assert max_concurrent(streamed, {"CPU": 2.0}, False, 24, cached) == 1


def test_concurrency_follows_the_cluster_and_the_cap():
    cfg = load_config(None, [])
    assert max_concurrent(cfg, {"CPU": 2.0}, use_gpu=False, n_trials=24) == 2
    assert max_concurrent(cfg, {"CPU": 8.0}, use_gpu=False, n_trials=3) == 3
    capped = load_config(None, ["sweep.max_concurrent_trials=1"])
    assert max_concurrent(capped, {"CPU": 8.0}, use_gpu=False, n_trials=24) == 1
    two = load_config(None, ["student.num_workers=2"])
    assert max_concurrent(two, {"CPU": 5.0}, use_gpu=False, n_trials=24) == 2
    assert max_concurrent(two, {"CPU": 8.0, "GPU": 2.0}, use_gpu=True, n_trials=24) == 1
    with pytest.raises(ConfigError, match="one sweep trial needs"):
        max_concurrent(load_config(None, ["student.num_workers=3"]), {"CPU": 2.0}, use_gpu=False, n_trials=4)
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent(cfg, {"CPU": 8.0}, use_gpu=True, n_trials=4)


def test_sweep_identity_ignores_the_grid_and_concurrency_but_not_the_student():
    from types import SimpleNamespace

    from kd_ray.stages.sweep import sweep_name

    soft = SimpleNamespace(manifest={"fingerprint": "abc"})
    name = sweep_name(load_config(None, []), soft)
    # a grown grid or another concurrency: the same sweep, so finished trials are reused
    assert sweep_name(load_config(None, ["sweep.seeds=[0, 1, 2]", "sweep.fractions=[0.5]",
                                         "sweep.max_concurrent_trials=3"]), soft) == name
    assert sweep_name(load_config(None, ["sweep.lrs=[0.01, 0.1]"]), soft) == name  # learning rates are grid keys
    assert sweep_name(load_config(None, ["student.batch_size=32"]), soft) != name
    assert sweep_name(load_config(None, ["student.early_stopping_patience=3"]), soft) != name
    assert sweep_name(load_config(None, ["soft_targets.jitter=2"]), soft) != name
    assert sweep_name(load_config(None, []), SimpleNamespace(manifest={"fingerprint": "other"})) != name


@pytest.mark.parametrize("override, message", [
    ("sweep.fractions=[]", "the grid is empty"),
    ("sweep.fractions=[0, 0.5]", "every fraction must be in (0, 1]"),
    ("sweep.fractions=[0.5, 1.5]", "every fraction must be in (0, 1]"),
    ("sweep.seeds=[]", "the grid is empty"),
    ("sweep.metric=accuracy", "unknown metric 'accuracy'"),
])
def test_bad_sweep_input_fails_before_any_work(tmp_path, capsys, override, message):
    runs = tmp_path / "runs"
    assert main(["run", "--set", f"runtime.storage_path={runs}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "sweep." in err
    assert not runs.exists()  # nothing trained, nothing written


# --------------------------------------------------------------------------- on the shared cluster
@pytest.mark.ray
@pytest.mark.slow
def test_small_sweep_results_report_and_teacher_passes(tiny_ensemble, capsys):
    from kd_ray.report import write_report
    from kd_ray.stages.counters import forward_passes
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep

    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "sweepsmall", "sweep.fractions=[0.03, 0.1]", "sweep.seeds=[0]", "sweep.max_concurrent_trials=4",
               "sweep.losses=[kd, logit_matching]")
    st = build_soft_targets(cfg, ensemble)
    n_rows = sum(st.manifest["rows"].values())
    assert forward_passes(cfg.name) == st.manifest["rows"]  # one pass over train, val and test
    result = run_sweep(cfg, st)
    df = result.results
    assert result.complete and len(df) == 6 and set(df["status"]) == {"done"}
    # progress without --verbose: a line per finished trial, k of N, its setting, its val accuracy
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[kd_ray] sweep ") and "/6 " in ln]
    assert len(lines) == 6 and lines[-1].startswith("[kd_ray] sweep 6/6 f0.")
    assert all("val_accuracy 0." in ln and "elapsed" in ln for ln in lines) and "ETA" in lines[0]
    assert sorted(zip(df["fraction"], df["targets"], df["loss"])) == [
        (f, t, loss) for f in (0.03, 0.1) for t, loss in (("hard", "kd"), ("soft", "kd"), ("soft", "logit_matching"))]
    for col in ("fraction", "targets", "temperature", "alpha", "seed", "test_accuracy", "test_fidelity",
                "val_accuracy", "wall_s", "checkpoint_path", "train_rows_total", "status"):
        assert col in df.columns, col
    assert df["test_accuracy"].between(0, 1).all() and (df["wall_s"] > 0).all()
    # every trial read the cache: the teachers' forward passes stayed N (x K teachers each)
    assert sum(forward_passes(cfg.name).values()) == n_rows
    for name in ("results.parquet", "results.csv", "sweep.json"):
        assert os.path.exists(os.path.join(result.path, name)), name
    text = write_report(result.path)
    assert "| 3.0% |" in text and "gap recovered" in text.lower() and "logit matching" in text
    assert os.path.getsize(os.path.join(result.path, "accuracy_vs_fraction.png")) > 1000

    # what the workers trained on: nested (3 % inside 10 %), every class in each
    label_of = dict(zip(st.transfer.ids.tolist(), st.transfer.labels.tolist()))
    seen = {}
    for row in df.itertuples():
        ids = np.load(os.path.join(row.checkpoint_path, "rows_rank0.npy"))
        assert len(ids) == row.train_rows_total
        seen.setdefault(row.fraction, []).append(set(ids.tolist()))
    small, large = seen[0.03], seen[0.1]
    assert all(s == small[0] for s in small) and all(s == large[0] for s in large)  # soft and hard: same rows
    assert small[0] < large[0]
    assert {label_of[i] for i in small[0]} == set(range(10))


@pytest.mark.ray
@pytest.mark.slow
def test_cached_views_trials_share_one_labelling_of_every_view(tiny_ensemble):
    """Mixed cached views (shifted, then mixed with a partner of the cache's rows): every trial reads
    one labelling; a student trains on the very images the teachers labelled."""
    import torch

    from kd_ray.core.augment import cached_view, chosen_views, view_mixup
    from kd_ray.core.ensemble import build_teacher, load_teacher_files
    from kd_ray.core.losses import ensemble_average
    from kd_ray.stages.counters import forward_passes
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep

    base, ensemble = tiny_ensemble
    V = 4
    cfg = _cfg(base, "sweepviews", "soft_targets.jitter=1", f"soft_targets.views={V}", "sweep.fractions=[0.1, 0.3]",
               "sweep.teaching=[cached_views]", "sweep.seeds=[0]", "sweep.epochs=[2]", "sweep.max_concurrent_trials=4",
               "soft_targets.views_fraction=0.3", "soft_targets.mixup=1.0")  # views of the largest fraction only
    st = build_soft_targets(cfg, ensemble)
    pool = st.transfer.fraction(0.3, base.data.seed)
    stored = st.datasets["views"].to_pandas()
    assert np.isin(stored["mix_id"], pool.ids).all() and stored["mix_weight"].between(0, 1).all()
    N, K = len(st.transfer.fraction(0.3, base.data.seed)), len(ensemble.model_paths)
    from kd_ray.stages.distill import distill

    with pytest.raises(ValueError, match="views cache does not hold"):  # rows beyond its fraction
        distill(_cfg(base, "sweepviews", "soft_targets.jitter=1", f"soft_targets.views={V}",
                     "soft_targets.views_fraction=0.3", "student.teaching=cached_views", "student.fraction=0.3"),
                st, ids=st.transfer.ids)
    result = run_sweep(cfg, st)
    df = result.results
    # soft and matched hard trials on the views, and the plain hard baseline, per fraction
    assert result.complete and set(df["status"]) == {"done"} and len(df) == 6
    assert sorted(set(zip(df["targets"], df["teaching"]))) == [("hard", "cached_views"), ("hard", "none"),
                                                               ("soft", "cached_views")]
    # the whole sweep's teacher passes: V x N x K once (N: the rows of its largest fraction), none in training
    assert (df["teacher_passes"] == 0).all()
    assert forward_passes(cfg.name)["views"] * K == V * N * K
    # the soft student's last epoch trained on the views chosen for that epoch, rebuilt bit for bit,
    # against the teachers' soft targets of those very images
    row = df[(df["targets"] == "soft") & (df["fraction"] == 0.1)].iloc[0]
    b = dict(np.load(os.path.join(row["checkpoint_path"], "first_batch_rank0.npz")))
    views = chosen_views(b["id"], V, 0, epoch=1)
    partner, weight = view_mixup(b["id"], views, np.sort(pool.ids), 1.0, st.manifest["view_seed"])
    order = np.argsort(st.transfer.ids)

    def source(ids):
        return st.transfer.images[order[np.searchsorted(st.transfer.ids, ids, sorter=order)]]
    rebuilt = cached_view(source(b["id"]), b["id"], views, 1, st.manifest["view_seed"],
                          (source(partner), partner, weight))
    assert np.array_equal(b["mix_weight"], weight) and np.array_equal(b["image"], rebuilt)
    teachers = [build_teacher(f.blob, torch.device("cpu")) for f in load_teacher_files(ensemble.model_paths)]
    with torch.no_grad():
        want = ensemble_average(torch.stack([m(torch.from_numpy(rebuilt)) for m in teachers]), st.temperature, "probs")
    assert np.abs(b["soft_targets"] - want.numpy()).max() <= 1e-5


@pytest.mark.ray
@pytest.mark.slow
def test_consistent_teaching_sweep_streams_the_students_view_through_the_teachers(tiny_ensemble):
    import torch

    from kd_ray.core.augment import mix, seeded_mixup, seeded_shift
    from kd_ray.core.ensemble import build_teacher, load_teacher_files
    from kd_ray.core.losses import ensemble_average
    from kd_ray.stages.counters import forward_passes
    from kd_ray.stages.distill import subset_ids
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep

    base, ensemble = tiny_ensemble
    # mixup: consistent teaching mixes each shifted image with another of the subset
    cfg = _cfg(base, "sweepconsistent", "soft_targets.jitter=1", "soft_targets.mixup=1.0",
               "sweep.fractions=[0.1]", "sweep.targets=[soft]", "sweep.teaching=[cached, inconsistent, consistent]",
               "sweep.seeds=[0]", "sweep.epochs=[2]", "sweep.max_concurrent_trials=4")
    st = build_soft_targets(cfg, ensemble)
    cache_passes = sum(forward_passes(cfg.name).values())
    result = run_sweep(cfg, st)
    df = result.results.set_index("teaching")
    assert result.complete and set(df["status"]) == {"done"}
    assert sorted(df.index) == ["cached", "consistent", "inconsistent"]
    K, n = len(ensemble.model_paths), int(df.loc["consistent", "train_rows_total"])
    # the consistent trial ran every row of its subset through the K teachers once per epoch
    assert df.loc["consistent", "teacher_passes"] == 2 * n * K
    assert df.loc["cached", "teacher_passes"] == 0 and df.loc["inconsistent", "teacher_passes"] == 0
    assert forward_passes(cfg.name)["train"] == st.manifest["rows"]["train"] + 2 * n
    assert sum(forward_passes(cfg.name).values()) == cache_passes + 2 * n

    # what the consistent student trained on in its last epoch (epoch index 1): the seeded shift
    # of its rows mixed with the shifted partner seeded_mixup chose, and the teachers' soft
    # targets of that very mixed image
    def trained_on(teaching):
        b = dict(np.load(os.path.join(df.loc[teaching, "checkpoint_path"], "first_batch_rank0.npz")))
        rows = st.transfer_rows(b["id"])
        where = {i: k for k, i in enumerate(rows["id"].tolist())}
        return b, rows["image"][[where[i] for i in b["id"].tolist()]]

    teachers = [build_teacher(f.blob, torch.device("cpu")) for f in load_teacher_files(ensemble.model_paths)]

    def soft_targets_of(images):
        with torch.no_grad():
            logits = torch.stack([m(torch.from_numpy(images)) for m in teachers])
        return ensemble_average(logits, st.temperature, "probs").numpy()

    b, original = trained_on("consistent")
    rows = st.transfer_rows(subset_ids(st, 0.1, cfg.data.seed))  # the stream's rows, in its positions
    p = np.array([rows["id"].tolist().index(i) for i in b["id"].tolist()])
    partner, lam = seeded_mixup(len(rows["id"]), 1.0, seed=0, epoch=1)
    q = partner[p]
    view = mix(seeded_shift(rows["image"][p], rows["id"][p], 1, seed=0, epoch=1),
               seeded_shift(rows["image"][q], rows["id"][q], 1, seed=0, epoch=1), lam[p])
    assert np.allclose(b["image"], view, atol=1e-6) and np.array_equal(b["mix_weight"], lam[p])
    assert not np.allclose(b["image"], seeded_shift(original, b["id"], 1, seed=0, epoch=1))
    assert np.abs(b["soft_targets"] - soft_targets_of(b["image"])).max() <= 1e-5
    assert np.abs(b["soft_targets"] - soft_targets_of(original)).max() > 1e-3
    # inconsistent: the same shifted view, but the cached targets of the original image
    b, original = trained_on("inconsistent")
    assert np.array_equal(b["image"], seeded_shift(original, b["id"], 1, seed=0, epoch=1))
    assert np.abs(b["soft_targets"] - soft_targets_of(original)).max() <= 1e-5
    # cached: the original image and its cached targets
    b, original = trained_on("cached")
    assert np.array_equal(b["image"], original)
    assert np.abs(b["soft_targets"] - soft_targets_of(original)).max() <= 1e-5


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_sweep_finishes_the_rest_when_run_again(tiny_ensemble, interrupt):
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep

    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "sweepsmall", "sweep.fractions=[0.03, 0.1]", "sweep.targets=[hard]", "sweep.seeds=[1]",
               "sweep.max_concurrent_trials=1")
    st = build_soft_targets(cfg, ensemble)
    first = run_sweep(cfg, st, callbacks=[interrupt(after=1)])
    assert not first.complete
    done = first.results[first.results["status"] == "done"]
    assert len(done) == 1
    finished = done.iloc[0]
    result_json = os.path.join(os.path.dirname(finished["checkpoint_path"]), "result.json")
    stamp = os.stat(result_json).st_mtime_ns

    second = run_sweep(cfg, st)
    assert second.complete and len(second.results) == 2 and set(second.results["status"]) == {"done"}
    again = second.results.set_index("fraction").loc[finished["fraction"]]
    # the finished trial was kept as it was: not re-run, not even re-read from the student's result
    assert again["wall_s"] == finished["wall_s"] and again["checkpoint_path"] == finished["checkpoint_path"]
    assert os.stat(result_json).st_mtime_ns == stamp
    assert json.load(open(os.path.join(second.path, "sweep.json")))["complete"] is True


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_trial_resumes_from_its_checkpoint_and_tensorboard_follows_it_live(tiny_ensemble):
    """A light trial that fails mid-training is retried by Tune (student.max_failures) and goes on
    from its checkpoint; its TensorBoard scalars are on storage while it still trains."""
    from ray import tune

    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep

    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "retried", "sweep.fractions=[0.1]", "sweep.targets=[soft]", "sweep.seeds=[0]",
               "student.epochs=3", "student.max_failures=1", "runtime.tracking=[tensorboard]")
    tb = os.path.join(cfg.runtime.storage_path, cfg.name, "tensorboard", "students")

    class Watch(tune.Callback):
        live = []  # event files seen at each result the trial reported while running

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not result.get("final"):
                Watch.live.append(sum(len(f) for _, _, f in os.walk(tb)))

    result = run_sweep(cfg, build_soft_targets(cfg, ensemble), callbacks=[Watch()], fail_after_epoch=1)
    row = result.results.iloc[0]
    assert result.complete and row["status"] == "done"
    history = json.load(open(os.path.join(os.path.dirname(row["checkpoint_path"]), "result.json")))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and [h["resumed_from"] for h in history] == [0, 1, 1]
    assert Watch.live and all(n > 0 for n in Watch.live)


@pytest.mark.ray
@pytest.mark.slow
def test_a_diverged_trial_is_a_visible_row_and_the_others_finish(tiny_ensemble, tmp_path, capsys):
    import yaml

    base, _ = tiny_ensemble
    cfg = _cfg(base, "tiny", "sweep.fractions=[0.1]", "sweep.targets=[hard]", "sweep.seeds=[0]",
               "sweep.lrs=[0.05, 1000000.0]", "sweep.max_concurrent_trials=2",
               "student.grad_clip_norm=null",  # clipping would bound even these steps
               "runtime.stages=[soft-targets, sweep, report]")
    path = tmp_path / "diverge.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["run", str(path)]) == 1  # the user is told: the exit status says a trial failed to train
    err = capsys.readouterr().err
    assert "DIVERGED in epoch" in err and "lr=1e+06" in err
    out = os.path.join(cfg.runtime.storage_path, cfg.name)
    import pandas as pd

    df = pd.read_parquet(os.path.join(out, "results.parquet")).set_index("lr")
    assert df.loc[0.05, "status"] == "done" and 0 < df.loc[0.05, "test_accuracy"] <= 1
    assert df.loc[1e6, "status"] == "diverged" and df.loc[1e6, "diverged_epoch"] >= 1
    assert np.isnan(df.loc[1e6, "test_accuracy"])  # no figures from a diverged model
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## Diverged trials" in summary and "hard lr=1e+06" in summary
    assert json.load(open(os.path.join(out, "sweep.json")))["complete"] is True  # finished: not re-run
    assert yaml.safe_load(path.read_text())["sweep"]["lrs"] == [0.05, 1e6]


@pytest.mark.ray
@pytest.mark.slow
def test_kd_ray_run_end_to_end_with_asha_and_again(ray_session, tmp_path, capsys, monkeypatch):
    import pandas as pd

    default_config = "digits"  # a shipped config, by name
    monkeypatch.chdir(tmp_path)  # a relative storage path, as in the shipped configs
    runs = tmp_path / "runs"
    argv = ["run", default_config, "--set", "runtime.storage_path=./runs", "--set", "teachers.count=2",
            "--set", "teachers.epochs=2",
            "--set", "teachers.model_args={hidden: [64]}", "--set", "student.model_args={hidden: [64]}",
            "--set", "student.epochs=4", "--set", "student.report_every=1",  # ASHA sees 4 reports
            "--set", "sweep.fractions=[0.5]", "--set", "sweep.seeds=[0]", "--set", "sweep.scheduler=asha"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kd-ray run finished in" in out and "| fraction | train rows | targets |" in out
    assert list((root := runs / "digits").glob("students/student-*/result.json"))  # not under a trial folder
    for name in ("results.parquet", "results.csv", "summary.md", "accuracy_vs_fraction.png"):
        assert (root / name).exists(), name
    df = pd.read_parquet(root / "results.parquet")
    # ASHA (grace period 1 epoch) may stop the weaker trial early; the better one always finishes
    assert len(df) == 2 and set(df["status"]) <= {"done", "stopped"} and (df["status"] == "done").any()
    assert df.loc[df["status"] == "stopped", "test_accuracy"].isna().all()  # never reached its test pass
    summary = (root / "summary.md").read_text()

    assert main(argv) == 0  # again: every stage is found finished, ASHA's stops included
    out = capsys.readouterr().out
    assert "0 to train, 2 complete and reused" in out
    assert "reused at" in out  # the soft-target cache
    assert "2 already finished, 0 to run" in out
    assert (root / "summary.md").read_text() == summary

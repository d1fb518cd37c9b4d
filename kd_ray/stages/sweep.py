"""Stage 4: a Ray Tune sweep of students over data fraction x targets x T x alpha x seed.

Each Tune trial distils one student with :func:`kd_ray.stages.distill.distill` (:func:`_trial`)
and reports the final metrics with ``ray.tune.report``. The teachers and the soft-target cache
are computed once, before the sweep; every trial reads the same cache (cached mode), so the
teachers' forward passes do not grow with the number of trials.

Light trials (``student.light``: one worker, the default): the student trains inside its trial's
process, which holds the student's CPU (or GPU) and, for consistent teaching, the bundles of its
predictor actors (:func:`trial_bundles`); ``reuse_actors`` keeps torch imported per slot; every
validation goes to ``ray.tune.report``; its checkpoint is on storage, so a trial Tune retries
(``student.max_failures``) resumes from it. Its rows come with the soft targets as arrays, read
once by the driver (no Ray Data execution per trial). Several workers (DDP): the trial is a small
driver holding no CPU (DRIVER_RESOURCES) around a TorchTrainer whose per-epoch reports reach Tune
through ``TuneReportCallback``. :func:`max_concurrent` caps the concurrent trials at what the
cluster can host at once, so trials cannot deadlock holding every CPU.

Resume: a sweep is named after what its trials' results depend on besides their grid values
(:func:`sweep_name`), and each trial records its final row under
``<storage>/<name>/sweeps/<sweep>/trials/`` before it reports. Running the sweep again runs only
the grid's trials without a record (in a new Tune run beside the old ones), so finished trials
are never repeated (and a grown grid runs only its new trials), and an unfinished student
resumes from its own checkpoint (student run names are deterministic). This holds after
Ctrl+C and after the driver was killed outright. (``Tuner.restore`` was tried first: on Ray
2.60 a restored grid search with ``max_concurrent_trials`` did not generate the trials it had
not created before the interruption.)

Progress: :class:`~kd_ray.stages.progress.Progress`, a line per finished trial and a heartbeat.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.tune
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.config import ConfigError, ExperimentConfig
from kd_ray.core.environment import environment
from kd_ray.core.grid import GRID_KEYS, trial_config, trial_grid, trial_key, trial_teaching
from kd_ray.core.plan import digest, sweep_identity
from kd_ray.stages.cluster import capacity, student_uses_gpu
from kd_ray.stages.distill import check_classes, distill
from kd_ray.stages.progress import Progress
from kd_ray.stages.soft_targets import SoftTargets

# A DDP trial's driver only waits on its TorchTrainer: no CPU, but it reserves the memory a Train
# run's controller and bookkeeping take on the head (~0.5 GB each, Ray issue #65443), and Tune
# needs a non-empty resource request.
DRIVER_RESOURCES = {"cpu": 0, "memory": 512 * 1024**2}
# the columns of results.parquet after the grid keys (final metrics of each student)
METRIC_COLUMNS = ("test_accuracy", "test_errors", "test_nll", "test_fidelity", "val_accuracy", "val_errors",
                  "val_nll", "val_fidelity", "train_accuracy", "epoch", "best_epoch", "train_rows_total",
                  "parameters", "teacher_passes", "train_seconds", "diverged_epoch")


# --------------------------------------------------------------------------- pure helpers
def trial_bundles(cfg: ExperimentConfig, use_gpu: bool, trial: dict | None = None) -> list[dict[str, float]]:
    """What one trial holds while it runs, as placement-group bundles: its student's workers (a
    light trial's own process is its one worker; a DDP trial's driver holds nothing), for
    consistent teaching the predictor actors its workers stream through (one pool each), for a
    streamed source a CPU for its data tasks."""
    n = cfg.student.num_workers
    bundles = [{"CPU": 1.0, "GPU": 1.0 if use_gpu else 0.0} for _ in range(n)]
    if trial is not None and trial_teaching(trial).teacher_passes:
        st = cfg.soft_targets
        bundles += [{"CPU": float(st.num_cpus), "GPU": float(st.num_gpus)} for _ in range(n * st.actors)]
    if cfg.data.stream:  # room for the trial's Ray Data tasks (read, decode, join): workers holding every CPU starve them
        bundles.append({"CPU": 1.0, "GPU": 0.0})
    return bundles


def trial_resources(cfg: ExperimentConfig, use_gpu: bool, trial: dict | None = None) -> dict[str, float]:
    """The sum of :func:`trial_bundles`."""
    bundles = trial_bundles(cfg, use_gpu, trial)
    return {r: sum(b[r] for b in bundles) for r in ("CPU", "GPU")}


def _with_resources(trainable, cfg: ExperimentConfig, use_gpu: bool, trial: dict):
    """The trainable holding what one trial like ``trial`` needs: a light trial its bundles (its
    predictor actors and data tasks run inside them); a DDP trial's driver only memory."""
    if not cfg.student.light:
        return tune.with_resources(trainable, DRIVER_RESOURCES)
    bundles = [{r: v for r, v in b.items() if v > 0} for b in trial_bundles(cfg, use_gpu, trial)]
    return tune.with_resources(trainable, tune.PlacementGroupFactory(bundles))


def max_concurrent(cfg: ExperimentConfig, cluster: dict[str, float], use_gpu: bool, n_trials: int,
                   trial: dict | None = None) -> int:
    """How many trials (like ``trial``) may run at once: the config's cap, the cluster's room,
    the number of trials."""
    need = trial_resources(cfg, use_gpu, trial)
    room = min(math.floor(cluster.get(r, 0.0) / v + 1e-9) for r, v in need.items() if v > 0)
    if room < 1:
        have = {r: cluster.get(r, 0.0) for r in need}
        raise ConfigError(f"one sweep trial needs {need} (student.num_workers={cfg.student.num_workers}"
                          + (", plus its predictor actors" if trial and trial_teaching(trial).teacher_passes else "")
                          + f") but the cluster has {have}; lower student.num_workers or add resources")
    cap = cfg.sweep.max_concurrent_trials or room
    return max(1, min(cap, room, n_trials))


def metric_mode(metric: str) -> str:
    return "min" if metric.endswith("nll") else "max"


def sweep_name(cfg: ExperimentConfig, soft: SoftTargets) -> str:
    """The digest of :func:`kd_ray.core.plan.sweep_identity`. Trials of sweeps with the same name are
    interchangeable, so growing the grid (another seed, another fraction) runs only the new
    trials, and the concurrency can change between runs."""
    return "sweep-" + digest(sweep_identity(cfg, soft.manifest["fingerprint"], GRID_KEYS), 10)


# --------------------------------------------------------------------------- the trial
def _trial(config: dict, base: ExperimentConfig, soft: SoftTargets, record_dir: str,
           fail_after_epoch: int | None = None) -> None:
    """One Tune trial: distil one student -- here (light), or with a TorchTrainer whose epochs
    reach Tune via TuneReportCallback.

    The finished trial's row is written to ``record_dir`` before the final report, so a
    later run of the same sweep knows it is done whatever happens to Tune afterwards.
    """
    t0 = time.time()
    trial = config["trial"]
    cfg = trial_config(base, trial)
    if cfg.student.light:
        result = distill(cfg, soft, report=ray.tune.report, fail_after_epoch=fail_after_epoch)
    else:
        result = distill(cfg, soft, callbacks=[TuneReportCallback()], fail_after_epoch=fail_after_epoch)
    m = result.metrics
    row = {**trial, **{k: m[k] for k in METRIC_COLUMNS if k in m}}
    row["train_seconds"] = float(result.history["seconds"].sum()) if len(result.history) else 0.0
    row.update({"status": "diverged" if result.diverged_epoch else "done", "error": "", "wall_s": time.time() - t0, "reused": result.reused,
                "run_name": result.run_name, "checkpoint_path": result.checkpoint_path,
                "trial_path": ray.tune.get_context().get_trial_dir()})
    storage.write_json(storage.join(record_dir, trial_key(trial) + ".json"), row)
    # Tune needs the sweep's metric in every report: a diverged trial has no validation metrics
    ray.tune.report({base.sweep.metric: float("nan")} | {k: v for k, v in row.items() if k not in trial} | {"final": True})


# --------------------------------------------------------------------------- the driver
@dataclass
class SweepResult:
    results: pd.DataFrame  # one row per trial
    path: str  # <storage>/<name>: results.parquet, results.csv, sweep.json (and the report)
    experiment_path: str  # the folder of this sweep's Tune runs and finished-trial records
    complete: bool  # False when interrupted or a trial failed: run again to finish
    seconds: float

    @property
    def diverged(self) -> pd.DataFrame:
        """The trials whose training loss became NaN or infinite (finished: running again repeats them)."""
        return self.results[self.results["status"] == "diverged"]

    @property
    def ok(self) -> bool:
        """Complete, and no trial diverged: what `kd-ray run` exits 0 on."""
        return self.complete and self.diverged.empty


def _tune_run(cfg: ExperimentConfig, trainable, group: list[dict], sweep_dir: str, callbacks: list,
              use_gpu: bool, run: str) -> dict[str, dict]:
    """One Tune run over trials that hold the same resources; the rows of those that did not finish."""
    metric = cfg.sweep.metric
    # the cluster at its largest: an autoscaler adds nodes for the trials that wait
    concurrency = max_concurrent(cfg, capacity().max_resources(), use_gpu, len(group), group[0])
    scheduler = None
    if cfg.sweep.scheduler == "asha":
        # a trial reports each epoch, Train's final (test) report, then the driver's own
        reports = math.ceil(max(t["epochs"] for t in group) / cfg.student.report_every)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports + 2, grace_period=max(1, reports // 4))
    print(f"[kd_ray] {len(group)} trials, up to {concurrency} at a time, each holding "
          f"{dict(trial_resources(cfg, use_gpu, group[0]))} (Tune run {run})", flush=True)
    grid = tune.Tuner(
        _with_resources(trainable, cfg, use_gpu, group[0]), param_space={"trial": tune.grid_search(group)},
        # reuse_actors: a light trial's process (torch imported, Ray connected) serves the next trial
        tune_config=tune.TuneConfig(metric=metric, mode=metric_mode(metric), scheduler=scheduler,
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=run, storage_path=storage.absolute(sweep_dir), callbacks=callbacks,
                                  verbose=1 if cfg.runtime.verbose else 0,
                                  # a light trial Tune retries resumes from its student's checkpoint
                                  failure_config=tune.FailureConfig(
                                      max_failures=cfg.student.max_failures if cfg.student.light else 0)),
    ).fit()
    return unfinished_rows(grid, asha=scheduler is not None)


def run_sweep(cfg: ExperimentConfig, soft: SoftTargets, callbacks: list | None = None,
              fail_after_epoch: int | None = None) -> SweepResult:
    """Run the sweep over ``cfg.sweep``'s grid on ``soft`` (only its unfinished trials); save
    the results table and ``sweep.json`` under ``<storage>/<name>/``. ``fail_after_epoch``:
    every trial's first attempt fails after that epoch (fault-injection tests)."""
    t0 = time.time()
    trials = trial_grid(cfg)
    check_classes(cfg.student, soft)  # before any trial starts
    use_gpu = student_uses_gpu(cfg)
    # resolved once, here: every trial's Train workers use the driver's decision
    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"use_gpu": use_gpu})})
    metric = cfg.sweep.metric
    name = sweep_name(cfg, soft)
    sweep_dir = layout.sweep_dir(cfg, name)
    record_dir = storage.join(sweep_dir, "trials")
    done = finished_trials(record_dir)
    todo = [t for t in trials if trial_key(t) not in done]
    print(f"[kd_ray] sweep {name}: {len(trials)} trials, {len(trials) - len(todo)} already finished, "
          f"{len(todo)} to run; metric {metric}", flush=True)
    others: dict[str, dict] = {}  # the latest Tune run's trials that did not finish
    if todo:
        _read_rows_once(cfg, soft, todo)
        trainable = tune.with_parameters(_trial, base=cfg, soft=soft, record_dir=record_dir,
                                         fail_after_epoch=fail_after_epoch)
        progress = Progress(len(trials), len(trials) - len(todo), describe=lambda c: trial_key(c["trial"]),
                            metric=metric)
        # Trials that hold the same resources run in one Tune run, with the concurrency that
        # fits them (consistent-teaching trials also hold predictor actors, so fewer fit).
        groups: dict[tuple, list[dict]] = {}
        for t in todo:
            groups.setdefault(tuple(sorted(trial_resources(cfg, use_gpu, t).items())), []).append(t)
        for i, group in enumerate(groups.values()):
            left = _tune_run(cfg, trainable, group, sweep_dir, [progress, *(callbacks or [])], use_gpu,
                             time.strftime("run-%Y%m%d-%H%M%S") + (f"-{i}" if len(groups) > 1 else ""))
            for key, row in left.items():
                if row["status"] == "stopped":  # ASHA's decision is final: recorded like a finished trial
                    storage.write_json(storage.join(record_dir, key + ".json"), row)
            others.update(left)
            if any(r["status"] == "unfinished" for r in left.values()):
                break  # interrupted: the next run of the sweep picks up the rest
        done = finished_trials(record_dir)
    rows = []
    for t in trials:
        key = trial_key(t)
        rows.append(done.get(key) or others.get(key) or {**t, "status": "unfinished", "error": ""})
    df = results_frame(rows)
    complete = bool(df["status"].isin(["done", "stopped", "diverged"]).all())
    out = layout.experiment_dir(cfg)
    save_results(df, out)
    storage.write_json(storage.join(out, "sweep.json"), {
        "sweep": name, "experiment_path": sweep_dir, "metric": metric, "trials": len(trials), "complete": complete,
        "seconds": round(time.time() - t0, 1), "student_gpu": use_gpu, **_sweep_facts(cfg, soft)})
    return SweepResult(df, out, sweep_dir, complete, time.time() - t0)


def _sweep_facts(cfg: ExperimentConfig, soft: SoftTargets) -> dict:
    """What the report says of a sweep besides its rows: the ensemble, the targets, the training."""
    e = soft.manifest["ensemble"]
    return {"ensemble_test_accuracy": e["test_accuracy"], "ensemble_val_accuracy": e["val_accuracy"],
            "teacher_test_accuracy": e.get("teacher_test_accuracy", []), "teachers": len(soft.model_paths),
            "temperature": soft.temperature, "rule": soft.manifest["rule"], "soft_targets": soft.path,
            "transfer_rows": soft.manifest["rows"]["train"], "test_rows": soft.manifest["rows"]["test"],
            "jitter": cfg.soft_targets.jitter, "mixup": cfg.soft_targets.mixup, "min_steps": cfg.student.min_steps,
            "init": cfg.student.init, "checkpoint_rule": "best validation epoch (val_accuracy)",
            "environment": environment()}  # the driver's; each teacher's is in teachers/ensemble.json


def _read_rows_once(cfg: ExperimentConfig, soft: SoftTargets, todo: list[dict]) -> None:
    """Read the rows every trial needs into ``soft`` on the driver, once: validation and test, and
    for light trials the cached training rows (or views) when they fit ``student.max_in_memory_mb``;
    ``tune.with_parameters`` then ships them to every trial in one object."""
    if soft.source is not None:
        return
    for split in ("val", "test"):
        soft.eval_arrays(split)
    if cfg.student.light:
        splits = {trial_teaching(t).split for t in todo} - {"none"}
        for split in splits:
            if soft.rows_fit(split, cfg.student.max_in_memory_mb):
                soft.train_arrays(split)


def finished_trials(record_dir: str) -> dict[str, dict]:
    """The rows of this sweep's trials that finished or ASHA stopped (any earlier run), by key."""
    if not storage.exists(record_dir):
        return {}
    rows = [storage.read_json(p) for p in storage.list_files(record_dir, ".json")]
    return {trial_key(r): r for r in rows}


def unfinished_rows(grid: Any, asha: bool = False) -> dict[str, dict]:
    """Rows for the trials of a Tune run that did not finish: failed, stopped by ASHA, or cut off."""
    rows = {}
    for r in grid:
        m = r.metrics or {}
        if m.get("final"):
            continue
        trial = dict(r.config["trial"])
        row: dict[str, Any] = {**trial, "trial_path": r.path, "error": ""}
        if r.error is not None:
            row.update(status="error", error=str(r.error).strip().splitlines()[-1][:300])
        elif asha and m.get("training_iteration"):
            row["status"] = "stopped"  # ASHA ended it early: its last epoch's validation metrics only
            row.update({k: m[k] for k in ("val_accuracy", "val_nll", "val_fidelity", "epoch") if k in m})
        else:
            row["status"] = "unfinished"
        rows[trial_key(trial)] = row
    return rows


def results_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per trial: the grid values, the final metrics, wall time, checkpoint, status."""
    columns = [*GRID_KEYS, *METRIC_COLUMNS, "status", "error", "wall_s", "reused", "run_name", "checkpoint_path",
               "trial_path"]
    df = pd.DataFrame([{c: r.get(c, np.nan) for c in columns} for r in rows], columns=columns)
    for c in ("status", "error", "run_name", "checkpoint_path", "trial_path"):
        df[c] = df[c].fillna("").astype(str)
    df["reused"] = df["reused"].fillna(False).astype(bool)
    return df


def save_results(df: pd.DataFrame, out: str) -> None:
    """``results.parquet`` and ``results.csv`` under ``out`` (atomic writes)."""
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(out, "results.parquet"), buf.getvalue())
    storage.write_bytes(storage.join(out, "results.csv"), df.to_csv(index=False).encode())


def read_results(out: str) -> pd.DataFrame:
    """The saved results table of ``out`` (``<storage>/<name>``)."""
    import io

    path = storage.join(out, "results.parquet")
    if not storage.exists(path):
        raise FileNotFoundError(f"no sweep results at {path}; run `kd-ray sweep` (or `kd-ray run`) first")
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        return pd.read_parquet(io.BytesIO(f.read()))


def load_results(out: str) -> tuple[pd.DataFrame, dict]:
    """The saved results table and sweep.json of ``out`` (what the report needs)."""
    return read_results(out), storage.read_json(storage.join(out, "sweep.json"))

"""Experiment tracking (``runtime.tracking``): each teacher and student, logged while it trains or
after it finished (:func:`track`), once.

* ``tensorboard``: event files under ``<storage>/<name>/tensorboard/<teachers|students>/<run>/``
  (tensorboardX; on an object store written locally and copied up after every row). A student's
  scalars are written per validation while it trains (:class:`LiveTracker`).
* ``wandb``: one Weights & Biases run per teacher and per student, with the same metrics as
  MLflow's; offline by default (files under ``<storage>/<name>/wandb``, ``wandb sync`` later).
* ``mlflow``: one MLflow run per teacher and per student (so one per sweep trial) in the experiment
  ``<name>``, with its parameters, per-validation metrics as they come, final metrics and the
  resolved config as the artifact ``config.yaml``. The tracking URI is ``runtime.mlflow_uri``, by default MLflow's file
  store ``<storage>/<name>/mlruns`` (MLflow 3 keeps that store in maintenance mode and asks for
  ``MLFLOW_ALLOW_FILE_STORE``, which kd_ray sets for the URI it chose). A run is found again by its
  kd_ray key, so logging it twice leaves one run.

The resolved config of every run is saved as ``<storage>/<name>/config.yaml`` (:func:`save_config`).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig
from kd_ray.layout import experiment_dir


def save_config(cfg: ExperimentConfig) -> str:
    path = storage.join(experiment_dir(cfg), "config.yaml")
    storage.write_bytes(path, cfg.to_yaml().encode())
    return path


def mlflow_uri(cfg: ExperimentConfig) -> str:
    return cfg.runtime.mlflow_uri or "file://" + storage.join(experiment_dir(cfg), "mlruns")


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def track(cfg: ExperimentConfig, kind: str, name: str, key: str, params: dict[str, Any],
          history: list[dict], final: dict[str, Any]) -> None:
    """Log one finished teacher or student (``kind``: "teachers" or "students") after the fact;
    nothing when it was logged before."""
    tracker = LiveTracker(cfg, kind, name, key, params)
    if tracker.logged_before():
        return
    for row in history:
        tracker.log(row)
    tracker.finish(final)


class LiveTracker:
    """One teacher's or student's run as it trains: :meth:`log` writes each validation row
    (TensorBoard scalars, MLflow metrics) when it comes, so ``tensorboard --logdir`` and the MLflow
    UI follow a running sweep; :meth:`finish` adds the final metrics and closes the run.

    A copy travels to the process that trains (a Tune trial, a Ray task): each process opens its
    own writers (event files named with its pid; the MLflow run found again by its kd_ray key).
    On an object store the event file is written locally and copied up after every row."""

    def __init__(self, cfg: ExperimentConfig, kind: str, name: str, key: str, params: dict[str, Any]):
        self.cfg, self.kind, self.name, self.key, self.params = cfg, kind, name, key, params
        self._tb = None  # (SummaryWriter, the folder it writes to)
        self._run = None  # (MlflowClient, run id), or False: logged before
        self._wandb = None  # the W&B run

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tb": None, "_run": None, "_wandb": None}

    @property
    def tensorboard_dir(self) -> str:
        return storage.join(experiment_dir(self.cfg), "tensorboard", self.kind, self.name)

    def logged_before(self) -> bool:
        """Whether a finished run of this key was logged already (every backend that is on)."""
        done = []
        if "tensorboard" in self.cfg.runtime.tracking:
            done.append(storage.exists(self.tensorboard_dir) and bool(storage.list_files(self.tensorboard_dir)))
        if "mlflow" in self.cfg.runtime.tracking:
            done.append(self._mlflow() is False)
        return bool(done) and all(done)

    def log(self, row: dict) -> None:
        step = int(row.get("epoch", 0))
        values = {k: v for k, v in _numbers(row).items() if k != "epoch"}
        self._scalars(values, step)
        if "wandb" in self.cfg.runtime.tracking:
            self._wandb_run().log(values, step=step)
        run = self._mlflow()
        if run:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            run[0].log_batch(run[1], metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def finish(self, final: dict[str, Any]) -> None:
        self._scalars({f"final/{k}": v for k, v in _numbers(final).items()}, 0)
        if "wandb" in self.cfg.runtime.tracking:
            run = self._wandb_run()
            run.summary.update({f"final_{k}": v for k, v in _numbers(final).items()})
            run.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb[0].close()
            self._sync()
            self._tb = None
        run = self._mlflow()
        if run:
            from mlflow.entities import Metric

            client, rid = run
            client.log_batch(rid, metrics=[Metric(f"final_{k}", v, 0, 0) for k, v in _numbers(final).items()])
            client.log_text(rid, self.cfg.to_yaml(), "config.yaml")
            client.set_terminated(rid)
            self._run = False

    # ------------------------------------------------------------------ TensorBoard
    def _scalars(self, values: dict[str, float], step: int) -> None:
        if "tensorboard" not in self.cfg.runtime.tracking:
            return
        if self._tb is None:
            from tensorboardX import SummaryWriter

            out = self.tensorboard_dir
            local = storage.resolve(out)[1] if storage.is_local(out) else tempfile.mkdtemp(prefix="kd_ray_tb_")
            self._tb = (SummaryWriter(local, filename_suffix=f".{os.getpid()}"), local)
        writer = self._tb[0]
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()
        self._sync()

    def _sync(self) -> None:
        """Copy the local event files up when the run's folder is on an object store."""
        if self._tb is None or storage.is_local(self.tensorboard_dir):
            return
        for f in Path(self._tb[1]).rglob("*"):
            if f.is_file():
                storage.write_bytes(storage.join(self.tensorboard_dir, str(f.relative_to(self._tb[1]))), f.read_bytes())

    # ------------------------------------------------------------------ Weights & Biases
    def _wandb_run(self):
        """This run's W&B run: its id a hash of its kd_ray key, so a retried or resumed run (and
        :meth:`finish` from another process) goes on in the same W&B run."""
        if self._wandb is None:
            import hashlib

            import wandb

            rt = self.cfg.runtime
            out = experiment_dir(self.cfg)
            folder = storage.resolve(out)[1] if storage.is_local(out) else tempfile.mkdtemp(prefix="kd_ray_wandb_")
            os.makedirs(folder, exist_ok=True)
            self._wandb = wandb.init(
                project=rt.wandb_project or os.environ.get("WANDB_PROJECT") or self.cfg.name,
                entity=rt.wandb_entity or os.environ.get("WANDB_ENTITY"), dir=folder,
                mode=rt.wandb_mode or os.environ.get("WANDB_MODE") or "offline",
                id=hashlib.sha256(f"{self.kind}/{self.key}".encode()).hexdigest()[:16], resume="allow",
                name=f"{self.kind[:-1]} {self.name}", group=self.kind, config=self.params,
                reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        return self._wandb

    # ------------------------------------------------------------------ MLflow
    def _mlflow(self):
        """This run's (client, run id): found by its kd_ray key, created with its parameters when new;
        False when it finished and was logged before, or MLflow is off."""
        if self._run is not None or "mlflow" not in self.cfg.runtime.tracking:
            return self._run or False
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(self.cfg)
        if uri.startswith("file:"):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        client = MlflowClient(uri)
        exp_id = _experiment_id(client, self.cfg.name)
        tag = f"{self.kind}/{self.key}"
        found = client.search_runs([exp_id], filter_string=f"tags.kd_ray_key = '{tag}'", max_results=1)
        if found and found[0].info.status == "FINISHED":
            self._run = False
            return False
        if found:  # a retried or resumed run goes on logging into its run
            self._run = (client, found[0].info.run_id)
            return self._run
        run = client.create_run(exp_id, run_name=f"{self.kind[:-1]} {self.name}",
                                tags={"kd_ray_key": tag, "kd_ray_kind": self.kind[:-1], "kd_ray_run": self.name})
        flat = [Param(k, str(v)[:500]) for k, v in sorted(self.params.items())]
        for i in range(0, len(flat), 90):  # MLflow's batch limit: 100 params
            client.log_batch(run.info.run_id, params=flat[i:i + 90])
        self._run = (client, run.info.run_id)
        return self._run


def _experiment_id(client, name: str) -> str:
    """The MLflow experiment ``name``, created on first use (trials and teachers in several processes
    may race to create it: the loser reads the winner's)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 -- created by another process meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id

"""Experiment tracking (``runtime.tracking``): each finished teacher and student, logged once by the
process that waited for it, from the per-epoch history it returns.

* ``tensorboard``: event files under ``<storage>/<name>/tensorboard/<teachers|students>/<run>/``
  (written to a temporary folder with tensorboardX, then copied, so object stores work too).
  Sweep trials also have Tune's own live event files in their trial folders. Logged once per run.
* ``mlflow``: one MLflow run per teacher and per student (so one per sweep trial) in the experiment
  ``<name>``, with its parameters, per-epoch metrics, final metrics and the resolved config as the
  artifact ``config.yaml``. The tracking URI is ``runtime.mlflow_uri``, by default MLflow's file
  store ``<storage>/<name>/mlruns`` (MLflow 3 keeps that store in maintenance mode and asks for
  ``MLFLOW_ALLOW_FILE_STORE``, which kd_ray sets for the URI it chose). A run is found again by its
  kd_ray key, so logging it twice leaves one run.

The resolved config of every run is saved as ``<storage>/<name>/config.yaml`` (:func:`save_config`).
"""
from __future__ import annotations

import math
import os
import tempfile
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
    """Log one finished teacher or student (``kind``: "teachers" or "students")."""
    if "tensorboard" in cfg.runtime.tracking:
        _tensorboard(storage.join(experiment_dir(cfg), "tensorboard", kind, name), history, final)
    if "mlflow" in cfg.runtime.tracking:
        _mlflow(cfg, kind, name, key, params, history, final)


def _tensorboard(out: str, history: list[dict], final: dict[str, Any]) -> None:
    from tensorboardX import SummaryWriter

    if storage.exists(out) and storage.list_files(out):
        return  # logged before
    with tempfile.TemporaryDirectory() as tmp:
        with SummaryWriter(tmp) as writer:
            for row in history:
                step = int(row.get("epoch", 0))
                for k, v in _numbers(row).items():
                    if k != "epoch":
                        writer.add_scalar(k, v, step)
            for k, v in _numbers(final).items():
                writer.add_scalar(f"final/{k}", v, 0)
        for f in Path(tmp).rglob("*"):
            if f.is_file():
                storage.write_bytes(storage.join(out, str(f.relative_to(tmp))), f.read_bytes())


def _mlflow(cfg: ExperimentConfig, kind: str, name: str, key: str, params: dict[str, Any],
            history: list[dict], final: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(cfg)
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.name)
    tag = f"tags.kd_ray_key = '{kind}/{key}'"
    if client.search_runs([exp_id], filter_string=tag, max_results=1):
        return  # logged before
    run = client.create_run(exp_id, run_name=f"{kind[:-1]} {name}",
                            tags={"kd_ray_key": f"{kind}/{key}", "kd_ray_kind": kind[:-1], "kd_ray_run": name})
    rid = run.info.run_id
    metrics = [Metric(k, v, 0, int(row.get("epoch", 0))) for row in history for k, v in _numbers(row).items()
               if k != "epoch"]
    metrics += [Metric(f"final_{k}", v, 0, 0) for k, v in _numbers(final).items()]
    flat = [Param(k, str(v)[:500]) for k, v in sorted(params.items())]
    for i in range(0, len(flat), 90):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(rid, params=flat[i:i + 90])
    for i in range(0, len(metrics), 900):
        client.log_batch(rid, metrics=metrics[i:i + 900])
    client.log_text(rid, cfg.to_yaml(), "config.yaml")
    client.set_terminated(rid)

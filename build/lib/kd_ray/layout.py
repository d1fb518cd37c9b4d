"""The storage layout of one experiment, in one place (no Ray):

    <runtime.storage_path>/<name>/
        config.yaml                      the resolved config of the latest run
        teachers/<tid>/                  checkpoint.pt, model.pt, meta.json; ensemble.json
        soft_targets/<fingerprint>/      {train,val,test}/*.parquet, manifest.json (written last)
        students/<run name>/             Ray Train run folders, result.json when finished
        sweeps/<sweep name>/             Tune runs and trials/<trial key>.json records
        results.parquet, results.csv, sweep.json, summary.md, *.png
"""
from __future__ import annotations

from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig


def experiment_dir(cfg: ExperimentConfig) -> str:
    return storage.join(cfg.runtime.storage_path, cfg.name)


def teachers_dir(cfg: ExperimentConfig) -> str:
    return storage.join(experiment_dir(cfg), "teachers")


def ensemble_file(cfg: ExperimentConfig) -> str:
    """The finished ensemble's record: its teachers' checkpoint paths and accuracies."""
    return storage.join(teachers_dir(cfg), "ensemble.json")


def ensemble_paths(cfg: ExperimentConfig) -> list[str]:
    """The checkpoint paths of a finished run's teachers (for scripts that run them without Ray)."""
    return storage.read_json(ensemble_file(cfg))["model_paths"]


def soft_targets_dir(cfg: ExperimentConfig) -> str:
    return storage.join(experiment_dir(cfg), "soft_targets")


def students_dir(run_dir: str) -> str:
    """Student runs of the experiment at ``run_dir`` (``<storage>/<name>``)."""
    return storage.join(run_dir, "students")


def sweep_dir(cfg: ExperimentConfig, sweep_name: str) -> str:
    return storage.join(experiment_dir(cfg), "sweeps", sweep_name)

"""One experiment = one validated config object (pydantic v2, unknown keys rejected), a section
per module here: data, training (teachers, student), soft_targets, sweep, runtime.

:mod:`kd_ray.core.config_files` loads it from YAML with ``--set section.key=value`` overrides and
checks the cross-field policy (:func:`kd_ray.core.plan.check`). Every later stage receives this
object; none re-reads the YAML or invents a default of its own.
"""
from __future__ import annotations

import yaml
from pydantic import field_validator

from kd_ray.core.config.base import ConfigError, Section, field_line
from kd_ray.core.config.data import DATASETS, DataConfig, Normalization
from kd_ray.core.config.runtime import RuntimeConfig, StorageOptions
from kd_ray.core.config.soft_targets import SoftTargetsConfig
from kd_ray.core.config.sweep import METRICS, SweepConfig
from kd_ray.core.config.training import (
    InputAdapt,
    StudentConfig,
    TeacherSpec,
    TeachersConfig,
    TrainSpec,
    loss_params,
)

__all__ = ["DATASETS", "METRICS", "ConfigError", "DataConfig", "ExperimentConfig", "InputAdapt", "Normalization",
           "RuntimeConfig", "SoftTargetsConfig", "StorageOptions", "StudentConfig", "SweepConfig", "TeacherSpec",
           "TeachersConfig", "TrainSpec", "field_line", "loss_params"]


class ExperimentConfig(Section):
    name: str = "digits"
    data: DataConfig = DataConfig()
    teachers: TeachersConfig = TeachersConfig()
    soft_targets: SoftTargetsConfig = SoftTargetsConfig()
    student: StudentConfig = StudentConfig()
    sweep: SweepConfig = SweepConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {v!r}")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

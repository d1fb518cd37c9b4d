"""``sweep``: the grid of students and how trials are chosen (on validation only)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from kd_ray.core.config.base import Section
from kd_ray.core.teaching import teaching

# Metrics a sweep can optimise: validation only (the test split never chooses anything)
METRICS = ("val_accuracy", "val_nll", "val_fidelity")


class SweepConfig(Section):
    fractions: list[float] = [0.03, 0.1, 0.3, 1.0]
    targets: list[Literal["soft", "hard"]] = ["soft", "hard"]
    temperatures: list[float] = []  # empty: the student's temperature
    alphas: list[float] = []  # empty: the student's alpha
    lrs: list[float] = []  # learning rates, for soft and hard trials alike; empty: the student's lr
    losses: list[str] = []  # soft trials' loss; empty: the student's
    # a grid over loss parameters, {parameter: [values]}: each applies to the swept losses that declare it
    loss_args: dict[str, list[Any]] = {}
    seeds: list[int] = [0]
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    metric: str = "val_accuracy"  # what the sweep (and ASHA) optimises; *_nll is minimised
    scheduler: Literal["none", "asha"] = "none"
    # soft-target trials per teaching mode (student.teaching); empty: the student's mode
    teaching: list[str] = []
    # epoch budgets to sweep; empty: student.epochs. The plain hard-label baseline runs once, with
    # the largest budget. Every trial, soft or hard, keeps its best validation epoch and stops by
    # the same rule (student.early_stopping_patience).
    epochs: list[int] = []

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("the grid is empty: give at least one fraction")
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"every fraction must be in (0, 1]; got {bad}")
        return v

    @field_validator("targets", "seeds")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("the grid is empty: give at least one value")
        return v

    @field_validator("temperatures", "epochs", "lrs")
    @classmethod
    def _positive(cls, v: list, info) -> list:
        bad = [t for t in v if not t > 0]
        if bad:
            what = {"temperatures": "temperature", "epochs": "epoch budget", "lrs": "learning rate"}[info.field_name]
            raise ValueError(f"every {what} must be > 0; got {bad}")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"every alpha must be in [0, 1]; got {bad}")
        return v

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[str]) -> list[str]:
        from kd_ray.core.student_losses import loss_class

        for name in v:
            loss_class(name)
        return v

    @field_validator("teaching")
    @classmethod
    def _teachings(cls, v: list[str]) -> list[str]:
        return [teaching(name).name for name in v]

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v.startswith("test_"):
            raise ValueError(f"{v!r} is a test metric: the test split never chooses anything; use one of {list(METRICS)}")
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known metrics: {list(METRICS)}")
        return v

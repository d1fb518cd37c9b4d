"""The student losses: ``student.loss`` names one, ``student.loss_args`` holds its parameters.

Each loss is one module here (a :class:`~kd_ray.core.student_losses.base.Loss` subclass declaring
its parameters, what it reads and its terms); the trainer, the config's checks, the sweep's grid
and trial names and the report read those declarations. A new loss: write its module, add its
class to ``LOSSES``.
"""
from __future__ import annotations

from kd_ray.core.student_losses.base import Loss, Targets
from kd_ray.core.student_losses.dkd import DKD
from kd_ray.core.student_losses.kd import KD
from kd_ray.core.student_losses.logit_matching import LogitMatching
from kd_ray.core.student_losses.per_teacher import PerTeacher

LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (KD, LogitMatching, PerTeacher, DKD)}

__all__ = ["LOSSES", "Loss", "Targets", "loss_class", "make_loss"]


def loss_class(name: str) -> type[Loss]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}")
    return LOSSES[name]


def make_loss(name: str, args: dict | None = None) -> Loss:
    """The loss ``name`` with its parameters ``args`` (validated: unknown or out-of-range ones raise)."""
    return loss_class(name)(**(args or {}))

"""What every student loss declares, and what it is handed: the interface of the registry.

A loss is the *soft term* of a student's objective; the trainer adds the hard-label term:
``alpha * sum(loss terms) + (1 - alpha) * CE(label)``. A loss declares its parameters (a pydantic
model: ``student.loss_args`` in YAML, checked before Ray starts), what it reads of a batch, whether
the temperature plays a part, and returns its terms by name (each logged as ``train_<term>``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

# what a loss may read besides the student's logits and the labels:
#   soft_targets     the ensemble's soft targets at the student's T [B, C] (stored, or re-softened
#                    from stored teacher logits when the student's T differs)
#   teacher_logits   each teacher's logits [B, K, C] (dense, or rebuilt from a top-k cache);
#                    needs soft_targets.teacher_logits: dense or topk
Reads = Literal["soft_targets", "teacher_logits"]


@dataclass(frozen=True)
class Targets:
    """One batch's targets, at the student's temperature ``T`` (a field is None unless the loss reads it)."""

    T: float
    labels: torch.Tensor  # each row's class [B] (a mixed view: its own image's class)
    soft_targets: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Loss:
    """A soft term: subclass it in a module of its own and add the class to ``LOSSES``."""

    name: ClassVar[str]
    reads: ClassVar[Reads] = "soft_targets"
    uses_temperature: ClassVar[bool] = True  # False: T plays no part (reports leave it out)
    Params: ClassVar[type[BaseModel]] = NoParams  # its parameters (student.loss_args), validated

    def __init__(self, **args):
        self.params = self.Params(**args)

    def __call__(self, student_logits: torch.Tensor, t: Targets) -> dict[str, torch.Tensor]:
        """The soft term's parts by name (their sum is the term; each carries its own weight)."""
        raise NotImplementedError

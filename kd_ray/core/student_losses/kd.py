"""Hinton, Vinyals & Dean (2015): ``T^2 * KL(p || softmax(z / T))``, p the ensemble's soft targets."""
from __future__ import annotations

import torch

from kd_ray.core.losses import soft_cross_term
from kd_ray.core.student_losses.base import Loss, Targets


class KD(Loss):
    name = "kd"
    reads = "soft_targets"

    def __call__(self, student_logits: torch.Tensor, t: Targets) -> dict[str, torch.Tensor]:
        if t.soft_targets.shape != student_logits.shape:
            raise ValueError(f"kd: soft targets have shape {tuple(t.soft_targets.shape)} but the student's logits "
                             f"have {tuple(student_logits.shape)}: the class counts must match")
        return {"kl": (t.T * t.T) * soft_cross_term(student_logits, t.soft_targets, t.T)}

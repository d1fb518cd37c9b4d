"""The paper's high-temperature limit (section 2.1): the squared distance of zero-mean logits to
the teachers' mean logit (``losses.logit_matching_loss``); the temperature plays no part."""
from __future__ import annotations

import torch

from kd_ray.core.losses import logit_matching_loss
from kd_ray.core.student_losses.base import Loss, Targets


class LogitMatching(Loss):
    name = "logit_matching"
    reads = "teacher_logits"
    uses_temperature = False

    def __call__(self, student_logits: torch.Tensor, t: Targets) -> dict[str, torch.Tensor]:
        return {"logit_matching": logit_matching_loss(student_logits, t.teacher_logits.float().mean(dim=1))}

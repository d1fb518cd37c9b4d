"""Per-teacher distillation: the mean over the K teachers of ``T^2 * KL(softmax(v_k / T) || q)``.

Beside ``kd`` (the KL to the averaged ensemble) the two differ by ``H(mean_k p_k) - mean_k H(p_k)``,
the teachers' disagreement (a generalised Jensen-Shannon divergence), which does not depend on
the student: with ``soft_targets.rule: probs`` both give the student the same gradient, and the
logged value differs by that amount; with ``rule: logits`` (the cache averages logits) they
are different objectives. docs/losses.md measures both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_ray.core.student_losses.base import Loss, Targets


class PerTeacher(Loss):
    name = "per_teacher"
    reads = "teacher_logits"

    def __call__(self, student_logits: torch.Tensor, t: Targets) -> dict[str, torch.Tensor]:
        log_q = F.log_softmax(student_logits.float() / t.T, dim=-1).unsqueeze(1)  # [B, 1, C]
        p = torch.softmax(t.teacher_logits.float() / t.T, dim=-1)  # [B, K, C]
        kl = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # [B, K]
        return {"kl": (t.T * t.T) * kl.mean()}

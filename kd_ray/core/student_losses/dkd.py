"""Decoupled knowledge distillation (Zhao et al. 2022, "Decoupled Knowledge Distillation").

KD's KL splits into a target-class term and a non-target term: with ``b = (p_t, 1 - p_t)`` the
binary target/rest probabilities and ``p^`` the distribution over the non-target classes,
``KL(p || q) = KL(b^T || b^S) + (1 - p_t^T) * KL(p^^T || p^^S)``. DKD weights the two freely:
``T^2 * (tckd * TCKD + nckd * NCKD)``, dropping the factor ``(1 - p_t^T)`` that suppresses NCKD when the
teacher is confident. Read from the cache's soft targets (the ensemble's averaged probabilities at
T), so it needs no teacher logits. The paper's linear warm-up of the term is not applied (kd_ray
clips the gradient norm instead, student.grad_clip_norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from kd_ray.core.student_losses.base import Loss, Targets

_TINY = 1e-12  # a teacher certain of the target class leaves no non-target mass: that row's NCKD is 0


class DKDParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tckd: float = Field(1.0, ge=0)  # weight of the target-class term (the paper's alpha)
    nckd: float = Field(8.0, ge=0)  # weight of the non-target term (the paper's beta; 8 on CIFAR-100)


class DKD(Loss):
    name = "dkd"
    reads = "soft_targets"
    Params = DKDParams

    def __call__(self, student_logits: torch.Tensor, t: Targets) -> dict[str, torch.Tensor]:
        tckd, nckd = dkd_terms(student_logits, t.soft_targets, t.labels, t.T)
        return {"tckd": self.params.tckd * (t.T * t.T) * tckd, "nckd": self.params.nckd * (t.T * t.T) * nckd}


def dkd_terms(student_logits: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TCKD and NCKD (batch means, without T^2 or weights) of logits z [B, C] against teacher
    probabilities p at T [B, C] for the classes ``labels`` [B]."""
    target = F.one_hot(labels.long(), p.shape[-1]).bool()
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    p = p.float()
    p_t = p[target]  # [B]
    b_teacher = torch.stack([p_t, (1 - p_t).clamp_min(0)], dim=-1)
    log_b_student = torch.stack([log_q[target], torch.logsumexp(log_q.masked_fill(target, -torch.inf), dim=-1)], dim=-1)
    tckd = (torch.xlogy(b_teacher, b_teacher) - b_teacher * log_b_student).sum(-1).mean()
    p_rest = p.masked_fill(target, 0) / b_teacher[:, 1:].clamp_min(_TINY)  # the teacher's non-target distribution
    log_q_rest = F.log_softmax((student_logits.float() / T).masked_fill(target, -torch.inf), dim=-1)
    nckd = (torch.xlogy(p_rest, p_rest) - p_rest * log_q_rest.masked_fill(target, 0)).sum(-1).mean()
    return tckd, nckd

"""The distillation math (Hinton, Vinyals & Dean 2015), pure torch, no Ray.

Shapes: ``B`` batch, ``C`` classes, ``K`` teachers. Every function works in float32
internally (log-softmax for stability), so float16 inputs such as stored teacher logits are
accepted.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Rule = Literal["probs", "logits"]
RULES: tuple[str, ...] = ("probs", "logits")


def _check_temperature(T: float) -> None:
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got {T}")


def soften(logits: torch.Tensor, T: float) -> torch.Tensor:
    """``softmax(z / T)`` over the last axis: the paper's soft targets ``q``."""
    _check_temperature(T)
    return torch.softmax(logits.float() / T, dim=-1)


def ensemble_average(logits: torch.Tensor, T: float = 1.0, rule: Rule = "probs") -> torch.Tensor:
    """Average K teachers' predictions. ``logits`` is [K, B, C]; returns probabilities [B, C].

    ``rule="probs"`` (the paper's choice): mean over k of softmax(z_k / T).
    ``rule="logits"``: softmax of the mean logit, softmax(mean_k z_k / T).
    """
    if logits.dim() != 3:
        raise ValueError(f"ensemble_average expects logits of shape [K, B, C], got {tuple(logits.shape)}")
    if rule == "probs":
        return soften(logits, T).mean(dim=0)
    if rule == "logits":
        return soften(logits.float().mean(dim=0), T)
    raise ValueError(f"unknown averaging rule {rule!r}; use one of {RULES}")


def resoften(teacher_logits: torch.Tensor, T: float, rule: Rule = "probs") -> torch.Tensor:
    """Soft targets at temperature ``T`` from stored per-row teacher logits [B, K, C].

    This is how a student at another temperature reuses a cache without running the
    teachers again (the cache stores ``teacher_logits`` row-major, one [K, C] per sample).
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"resoften expects teacher logits of shape [B, K, C], got {tuple(teacher_logits.shape)}")
    return ensemble_average(teacher_logits.transpose(0, 1), T, rule)


def top_k_logits(teacher_logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What the cache keeps of per-row teacher logits [B, K, C] with ``teacher_logits: topk``: each
    teacher's k largest logits (``values``, float16) and their classes (``index``, int16), and one
    ``tail`` logit per teacher (float32): the value that C - k equal logits would need to carry the
    left-out classes' softmax mass at T = 1, ``logsumexp(rest) - log(C - k)``."""
    z = teacher_logits.float()
    C = z.shape[-1]
    if not 0 < k < C:
        raise ValueError(f"top_k must be in (0, {C}) for {C} classes, got {k}")
    values, index = z.topk(k, dim=-1)
    rest = z.scatter(-1, index, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - math.log(C - k)
    return {"values": values.half(), "index": index.to(torch.int16), "tail": tail}


def dense_from_top_k(values: torch.Tensor, index: torch.Tensor, tail: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-row teacher logits [B, K, C] rebuilt from :func:`top_k_logits`: the k kept logits in
    their classes, the tail logit in every other class. Softened at T = 1 this gives exactly the
    kept classes' probabilities and the tail's total mass; at other T the tail mass is that of C - k
    equal logits (docs/results.md measures the error against the dense logits)."""
    dense = tail.float().unsqueeze(-1).expand(*tail.shape, num_classes).clone()
    return dense.scatter(-1, index.long(), values.float())


def soft_cross_term(student_logits: torch.Tensor, soft_targets: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p || q) with p the soft targets and q = softmax(z / T); summed over classes,
    averaged over the batch; *without* the T^2 factor. Its gradient w.r.t. z is (q - p) / T / B.
    """
    _check_temperature(T)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    p = soft_targets.float()
    # xlogy gives 0 * log 0 = 0, so one-hot or underflowed targets are fine.
    kl = torch.xlogy(p, p) - p * log_q
    return kl.sum(dim=-1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    soft_targets: torch.Tensor | None,
    labels: torch.Tensor | None,
    T: float,
    alpha: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * T^2 * KL(soft_teacher || soft_student) + (1 - alpha) * CE(labels)``.

    ``soft_targets`` are probabilities (not logits, not log-probabilities). ``labels`` are class
    indices [B], or class probabilities [B, C] (mixup's mixed labels, see :func:`mixed_labels`). With ``alpha=1``
    labels may be None; with ``alpha=0`` soft targets may be None (plain hard-label training).
    Returns the total loss and its named terms (detached) for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    zero = student_logits.new_zeros((), dtype=torch.float32)
    soft = zero
    hard = zero
    if alpha > 0:
        if soft_targets is None:
            raise ValueError("kd_loss: alpha > 0 needs soft_targets")
        if soft_targets.shape != student_logits.shape:
            raise ValueError(
                f"kd_loss: soft targets have shape {tuple(soft_targets.shape)} but the student's "
                f"logits have {tuple(student_logits.shape)}: the class counts must match"
            )
        soft = (T * T) * soft_cross_term(student_logits, soft_targets, T)
    if alpha < 1:
        if labels is None:
            raise ValueError("kd_loss: alpha < 1 needs labels")
        hard = F.cross_entropy(student_logits.float(), labels.float() if labels.is_floating_point() else labels.long())
    total = alpha * soft + (1.0 - alpha) * hard
    return total, {"soft": soft.detach(), "hard": hard.detach()}


def mixed_labels(labels: torch.Tensor, mix_labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The label distribution of mixed images: ``w * onehot(labels) + (1 - w) * onehot(mix_labels)``, [B, C]."""
    w = weights.float().unsqueeze(1)
    return w * F.one_hot(labels.long(), num_classes) + (1 - w) * F.one_hot(mix_labels.long(), num_classes)


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Caruana-style logit matching, the high-temperature limit of the soft term (paper 2.1).

    ``0.5 / C * ||(z - mean z) - (v - mean v)||^2`` averaged over the batch; its gradient
    w.r.t. zero-mean logits z is (z - v) / C, which ``T^2 * dKL/dz`` approaches as T grows.
    """
    z = student_logits.float()
    v = teacher_logits.float()
    d = (z - z.mean(dim=-1, keepdim=True)) - (v - v.mean(dim=-1, keepdim=True))
    return 0.5 * (d * d).sum(dim=-1).mean() / z.shape[-1]

"""Ensemble inference, no Ray: teacher checkpoints on storage, their logits, the averaged soft targets.

A teacher checkpoint (``model.pt``) is self-describing: model name and args, class count, input
shape and weights, loaded with ``weights_only=True``. The Ray predictor pool, the analysis
scripts and the benchmarks' plain baselines all build teachers here.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.losses import ensemble_average
from kd_ray.core.models import build_model

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.core.config import TeacherSpec


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits for a tensor of images, batched, returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    outs = [model(images[i: i + batch_size].to(device, non_blocking=True)).float().cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0)


def save_teacher_model(path: str, teacher_id: str, key: str, spec: TeacherSpec, model: nn.Module,
                       num_classes: int, input_shape, val_logits: torch.Tensor) -> None:
    """The self-describing artifact the soft-target stage loads (``weights_only``-safe types)."""
    storage.save_torch(path, {
        "teacher_id": teacher_id, "key": key, "model": spec.model, "model_args": spec.model_args,
        "num_classes": int(num_classes), "input_shape": [int(d) for d in input_shape],
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "val_logits": val_logits,
    })


@dataclass
class TeacherFile:
    path: str
    sha256: str
    blob: dict


def load_teacher_files(paths: Sequence[str]) -> list[TeacherFile]:
    """Read every teacher checkpoint once (weights only); check they agree on classes and input."""
    if not paths:
        raise ValueError("no teacher checkpoints given")
    out = []
    for p in paths:
        if not storage.exists(p):
            raise FileNotFoundError(f"teacher checkpoint not found: {p}; run `kd-ray teachers` first")
        raw = storage.read_bytes(p)
        blob = storage.load_torch(p, raw)
        missing = [k for k in ("model", "model_args", "num_classes", "input_shape", "state_dict") if k not in blob]
        if missing:
            raise ValueError(f"corrupt checkpoint {p}: missing {missing}; delete it to retrain that teacher")
        out.append(TeacherFile(p, hashlib.sha256(raw).hexdigest(), blob))
    classes = {f.path: int(f.blob["num_classes"]) for f in out}
    if len(set(classes.values())) > 1:
        raise ValueError(f"teachers disagree on the number of classes: {classes}; an ensemble needs one label space")
    shapes = {f.path: tuple(f.blob["input_shape"]) for f in out}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"teachers disagree on the input shape: {shapes}")
    return out


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # SoftTargetsConfig.precision


def build_teacher(blob: dict, device: torch.device, precision: str = "float32") -> torch.nn.Module:
    """A teacher in eval mode on ``device``, its weights cast to ``precision``."""
    model = build_model(blob["model"], blob["input_shape"], blob["num_classes"], **blob["model_args"])
    model.load_state_dict(blob["state_dict"])
    return model.to(device=device, dtype=PRECISIONS[precision]).eval()


@torch.no_grad()
def teacher_logits(models: Sequence[torch.nn.Module], images: torch.Tensor) -> torch.Tensor:
    """The K teachers' logits ``[K, B, C]`` in float32; each teacher gets the images in its own
    precision (:func:`build_teacher`)."""
    return torch.stack([m(images.to(next(m.parameters()).dtype)).float() for m in models])


@torch.no_grad()
def averaged_soft_targets(models: Sequence[torch.nn.Module], images: torch.Tensor, T: float,
                          rule: str = "probs", batch_size: int = 1024) -> torch.Tensor:
    """The ensemble's averaged soft targets ``[N, C]`` on ``images``, ``batch_size`` images at
    a time: the plain-PyTorch path (analysis scripts, benchmarks' baselines). One call on a
    whole split would hold every image's conv activations at once (GBs for a CNN teacher)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.cat([ensemble_average(teacher_logits(models, images[i: i + batch_size]), T, rule)
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def ensemble_outputs(models: Sequence[torch.nn.Module], images: torch.Tensor, T: float, rule: str,
                     keep_teacher_logits: bool) -> dict[str, np.ndarray]:
    """The K teachers on one batch -> the columns a soft-target row gets."""
    logits = teacher_logits(models, images)  # [K, B, C]
    out = {
        "soft_targets": ensemble_average(logits, T, rule).cpu().numpy().astype(np.float32),
        "ensemble_pred": ensemble_average(logits, 1.0, rule).argmax(1).cpu().numpy().astype(np.int64),
    }
    if keep_teacher_logits:
        out["teacher_logits"] = logits.transpose(0, 1).half().cpu().numpy()  # [B, K, C]
    return out




def load_ensemble(paths: Sequence[str], device: torch.device = torch.device("cpu"),
                  precision: str = "float32") -> list[torch.nn.Module]:
    """The teachers at ``paths``, each built in eval mode in ``precision`` (analysis scripts, benchmarks)."""
    return [build_teacher(f.blob, device, precision) for f in load_teacher_files(paths)]

"""Ensemble inference, no Ray: teacher checkpoints on storage, their logits, the averaged soft targets.

A teacher checkpoint (``model.pt``) is self-describing: model reference and args, input
adaptation, class count, input shape and weights (a state dict, or the bytes of a TorchScript
file for an imported one), loaded with ``weights_only=True``. The Ray predictor pool, the
analysis scripts and the benchmarks' plain baselines all build teachers here;
:func:`import_teacher` reads and checks a teacher trained elsewhere.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.losses import ensemble_average, top_k_logits
from kd_ray.core.models import InputAdapter, build_model, inner_model

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
        **_describe(spec, num_classes, input_shape), "teacher_id": teacher_id, "key": key,
        "state_dict": {k: v.cpu() for k, v in inner_model(model).state_dict().items()}, "val_logits": val_logits,
    })


def _describe(spec: TeacherSpec, num_classes: int, input_shape) -> dict:
    return {"model": spec.model, "model_args": spec.model_args,
            "input_adapt": spec.input_adapt.model_dump() if spec.input_adapt else None,
            "num_classes": int(num_classes), "input_shape": [int(d) for d in input_shape]}


def is_torchscript(raw: bytes) -> bool:
    """A TorchScript archive (``torch.jit.save``) rather than a pickled state dict (``torch.save``)."""
    try:
        return any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(io.BytesIO(raw)).namelist())
    except zipfile.BadZipFile:
        return False


def import_teacher(spec: TeacherSpec, field: str, num_classes: int, input_shape,
                   val_images: torch.Tensor) -> tuple[dict, nn.Module, torch.Tensor]:
    """A teacher trained elsewhere (``spec.checkpoint``: a state dict of ``spec.model``, or a
    TorchScript file) as a ``model.pt`` blob, the model built from it (CPU, eval mode) and its
    validation logits. Every check names
    ``field`` and the file: it loads (``weights_only``), it accepts the data's input shape (behind
    ``input_adapt``), and it predicts ``num_classes`` classes."""
    path = spec.checkpoint
    if not storage.exists(path):
        raise FileNotFoundError(f"{field}: teacher file not found: {path}")
    raw = storage.read_bytes(path)
    blob = {**_describe(spec, num_classes, input_shape), "source": path, "sha256": hashlib.sha256(raw).hexdigest()}
    if is_torchscript(raw):
        blob["torchscript"] = raw
    else:
        state = storage.load_torch(path, raw)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{field}: {path} holds neither a state dict nor a TorchScript model")
        blob["state_dict"] = state
    try:
        model = build_teacher(blob, torch.device("cpu"))
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise ValueError(f"{field}: {path} does not fit model {spec.model} {spec.model_args}: "
                         f"{str(e).splitlines()[0]}") from None
    try:
        logits = predict_logits(model, val_images[:2])
    except Exception as e:  # noqa: BLE001 - any failure of a foreign model on our input
        raise ValueError(f"{field}: {path} does not accept inputs of shape {tuple(input_shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; declare the "
                         f"teacher's input_adapt (channels, size)") from None
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"{field}: {path} predicts {tuple(logits.shape[1:])} outputs per image but the data "
                         f"has {num_classes} classes")
    return blob, model, predict_logits(model, val_images)


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
        missing = [k for k in ("model", "model_args", "num_classes", "input_shape") if k not in blob]
        missing += [] if "state_dict" in blob or "torchscript" in blob else ["state_dict"]
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
    adapt = blob.get("input_adapt")
    if "torchscript" in blob:
        model = torch.jit.load(io.BytesIO(blob["torchscript"]), map_location="cpu")
        if adapt:
            model = InputAdapter(model, adapt.get("channels"), adapt.get("size"))
    else:
        model = build_model(blob["model"], blob["input_shape"], blob["num_classes"], input_adapt=adapt,
                            **blob["model_args"])
        inner_model(model).load_state_dict(blob["state_dict"])
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
                     keep: str = "dense", top_k: int = 32) -> dict[str, np.ndarray]:
    """The K teachers on one batch -> the columns a soft-target row gets; ``keep`` is
    ``soft_targets.teacher_logits`` (none, dense or topk)."""
    logits = teacher_logits(models, images)  # [K, B, C]
    out = {
        "soft_targets": ensemble_average(logits, T, rule).cpu().numpy().astype(np.float32),
        "ensemble_pred": ensemble_average(logits, 1.0, rule).argmax(1).cpu().numpy().astype(np.int64),
    }
    per_row = logits.transpose(0, 1)  # [B, K, C]
    if keep == "dense":
        out["teacher_logits"] = per_row.half().cpu().numpy()
    elif keep == "topk" and top_k < per_row.shape[-1]:
        kept = top_k_logits(per_row, top_k)
        out.update({f"teacher_topk_{k}": v.cpu().numpy() for k, v in kept.items()})
    elif keep == "topk":  # k >= C: every logit is kept, which is the dense column
        out["teacher_logits"] = per_row.half().cpu().numpy()
    return out




def load_ensemble(paths: Sequence[str], device: torch.device = torch.device("cpu"),
                  precision: str = "float32") -> list[torch.nn.Module]:
    """The teachers at ``paths``, each built in eval mode in ``precision`` (analysis scripts, benchmarks)."""
    return [build_teacher(f.blob, device, precision) for f in load_teacher_files(paths)]

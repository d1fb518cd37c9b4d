"""``teachers`` and ``student``: a model and its optimiser (:class:`TrainSpec`), the teachers'
specs, and the student's distillation settings (its loss from :mod:`kd_ray.core.student_losses`,
its teaching mode from :mod:`kd_ray.core.teaching`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from kd_ray.core.config.base import Section, field_line
from kd_ray.core.models import check_model
from kd_ray.core.teaching import teaching


class InputAdapt(Section):
    """What a model expects of its input, when the data differs: channels (one is repeated) and size."""

    channels: Optional[int] = Field(None, ge=1)
    size: Optional[list[int]] = Field(None, min_length=2, max_length=2)


class TrainSpec(Section):
    """What the training engine needs of a teacher or a student: the model and its optimiser."""

    # a built-in name (mlp, cnn, resnet18), timm:<name>, torchvision:<name> or package.module:factory
    model: str = "mlp"
    model_args: dict[str, Any] = {}
    input_adapt: Optional[InputAdapt] = None  # e.g. {channels: 3, size: [224, 224]} for an ImageNet model
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    # Start from weights instead of a fresh initialisation: ``pretrained`` true (the model's
    # published weights: timm / torchvision, fetched by the library) or a torchvision weights name /
    # timm tag; ``pretrained_file`` a state dict or safetensors file, a path or URI (machines without
    # internet). Tensors whose name and shape match are loaded; the rest (a classifier for the
    # data's classes) stay new. ``freeze_backbone``: only the new tensors train.
    pretrained: Union[bool, str] = False
    pretrained_file: Optional[str] = None
    freeze_backbone: bool = False

    @model_validator(mode="after")
    def _model_fits(self) -> "TrainSpec":
        check_model(self.model, self.model_args)  # before Ray starts: the reference and its arguments
        if self.pretrained and self.pretrained_file:
            raise ValueError("pretrained_file: give pretrained or pretrained_file, not both")
        if self.freeze_backbone and not (self.pretrained or self.pretrained_file):
            raise ValueError("freeze_backbone: needs pretrained weights (pretrained or pretrained_file)")
        if self.pretrained_file and "://" not in self.pretrained_file and not Path(self.pretrained_file).is_file():
            raise ValueError(f"pretrained_file: no file {self.pretrained_file}")
        return self

    def build(self, input_shape, num_classes: int, log=print, weights: bool = True):
        """This spec's model for data of ``input_shape`` (behind its input adapter, if any), from its
        pretrained weights when it names some (``log`` says which tensors were loaded and which are
        new); ``weights=False``: the architecture alone (no file read, e.g. to count parameters)."""
        from kd_ray.core.models import build_model, load_matching, published_weights, read_weights

        adapt = self.input_adapt.model_dump() if self.input_adapt else None
        model = build_model(self.model, input_shape, num_classes, input_adapt=adapt, **self.model_args)
        if not weights or not (self.pretrained or self.pretrained_file):
            return model
        source = self.pretrained_file or f"{self.model} published weights ({self.pretrained})"
        state = read_weights(self.pretrained_file) if self.pretrained_file else published_weights(self.model, self.pretrained)
        loaded, new = load_matching(model, state)
        if not loaded:
            raise ValueError(f"pretrained_file: no tensor of {source} fits {self.model} (names or shapes differ)")
        if self.freeze_backbone:
            for name, p in model.named_parameters():
                p.requires_grad_(name.removeprefix("model.") not in loaded)
        log(f"[kd_ray] {self.model}: {len(loaded)} tensors loaded from {source}; new: {new or 'none'}"
            + ("; backbone frozen" if self.freeze_backbone else ""))
        return model


class TeacherSpec(TrainSpec):
    """One teacher. ``teachers.specs`` entries override the ``teachers`` defaults field by field."""

    seed: int = 0
    # an imported teacher: a state dict (of ``model``) or a TorchScript file, a path or URI; it is
    # validated before Ray starts and never trained or overwritten
    checkpoint: Optional[str] = None
    fraction: float = Field(1.0, gt=0, le=1)  # nested stratified share of the training set
    bootstrap: bool = False  # resample the (fraction of the) training set with replacement
    jitter: int = Field(0, ge=0)  # pixel shifts applied to the teacher's training batches
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, gt=0)


class TeachersConfig(TeacherSpec):
    count: int = Field(5, ge=1)
    max_restarts: int = Field(2, ge=0)
    spread: bool = False  # place teachers on different nodes (soft SPREAD strategy)
    specs: list[dict[str, Any]] = []  # heterogeneous ensemble: one override dict per teacher

    @model_validator(mode="after")
    def _count_matches_specs(self) -> "TeachersConfig":
        if self.specs and "count" in self.model_fields_set and self.count != len(self.specs):
            raise ValueError(
                f"teachers.count ({self.count}) differs from the number of teachers.specs "
                f"({len(self.specs)}); drop count or make them agree"
            )
        self.resolved()  # validate every spec now, before any work starts
        return self

    def resolved(self) -> list[TeacherSpec]:
        """The K teacher specs: K seeds of one spec, or the listed heterogeneous specs."""
        base = {k: getattr(self, k) for k in TeacherSpec.model_fields}
        if not self.specs:
            return [TeacherSpec(**{**base, "seed": self.seed + i}) for i in range(self.count)]
        out = []
        for i, override in enumerate(self.specs):
            merged = {**base, "seed": self.seed + i, **override}
            if "model" in override and "model_args" not in override:  # another model: not the default's arguments
                merged["model_args"] = {}
            try:
                out.append(TeacherSpec(**merged))
            except ValidationError as e:  # one line per field: teachers.specs[0].lr: ...
                raise ValueError("\n".join(_spec_error(i, err) for err in e.errors())) from None
        return out


def _spec_error(i: int, err: dict) -> str:
    """One line per field: ``teachers.specs[0].lr: ...``."""
    loc = ".".join(str(p) for p in err["loc"])
    return field_line(f"teachers.specs[{i}]" + (f".{loc}" if loc else ""), err["msg"].removeprefix("Value error, "))


class StudentConfig(TrainSpec):
    model_args: dict[str, Any] = {"hidden": [800, 800]}
    epochs: int = Field(20, gt=0)
    # The global gradient norm is clipped to this before every step (None: no clipping). The soft
    # term's gradient w.r.t. the logits is T * (q - p), up to T times a cross-entropy gradient: at
    # the paper's T = 20 on standardised inputs an unclipped SGD step diverges in the first epoch
    # (docs/results.md, "The paper's MNIST setting"). Hard and soft trials are clipped alike.
    grad_clip_norm: Optional[float] = Field(5.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the soft term
    # the soft term, a registered loss (kd_ray/core/student_losses: kd, logit_matching, per_teacher,
    # dkd) and its parameters, e.g. {loss: dkd, loss_args: {nckd: 8}}
    loss: str = "kd"
    loss_args: dict[str, Any] = {}
    temperature: Optional[float] = Field(None, gt=0)  # None: the soft targets' temperature
    targets: Literal["soft", "hard"] = "soft"
    fraction: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    num_classes: Optional[int] = Field(None, gt=1)  # None: the soft targets' class count
    num_workers: int = Field(1, ge=1)
    use_gpu: Optional[bool] = None  # None: when the cluster has or may get a GPU node (never the driver's CUDA)
    max_failures: int = Field(0, ge=0)
    # Where a one-worker student trains: "auto" runs it in its own Tune trial (a sweep) or Ray task
    # (`kd-ray distill`) with no Ray Train start-up; "torch_trainer" always starts a TorchTrainer,
    # as several workers (DDP) do. Results are the same; it is not part of a run's identity.
    trainer: Literal["auto", "torch_trainer"] = "auto"
    early_stopping_patience: Optional[int] = Field(None, gt=0)  # epochs without a better validation
    # validate, report and checkpoint every N epochs (and after the last): on a few dozen rows an
    # epoch is one step, and a report with its checkpoint costs more than the step
    report_every: int = Field(1, gt=0)
    # patience counted in optimizer steps: a run on a small subset (one step per epoch) gets
    # more epochs, at least ceil(min_steps / steps per epoch); None: exactly ``epochs``
    min_steps: Optional[int] = Field(None, gt=0)
    # a worker whose share of the cached rows fits this reads it once into memory; larger
    # shares (or 0) stream from Ray Data every epoch
    max_in_memory_mb: float = Field(2048, ge=0)
    # How soft targets meet augmentation: a mode of kd_ray/core/teaching.py (cached, inconsistent,
    # consistent, cached_views). None: consistent when soft_targets augment without a views cache,
    # else cached.
    teaching: Optional[str] = None
    # Where the student's weights start:
    #   scratch  a fresh initialisation (torch.manual_seed(seed))
    #   teacher  a copy of ensemble member number ``seed % K`` (it needs the teachers' model and
    #            model_args); the student then learns the whole ensemble's function, and a hard
    #            trial starting from the same member is its control
    init: Literal["scratch", "teacher"] = "scratch"

    @field_validator("teaching")
    @classmethod
    def _teaching_known(cls, v: str | None) -> str | None:
        return v if v is None else teaching(v).name

    @model_validator(mode="after")
    def _loss_declared(self) -> "StudentConfig":
        loss_params(self.loss, self.loss_args)
        return self

    @property
    def light(self) -> bool:
        """One worker and no TorchTrainer asked for: the student trains in its trial's (or task's) process."""
        return self.num_workers == 1 and self.trainer == "auto"


def loss_params(name: str, args: dict, where: str = "loss_args") -> dict:
    """The parameters of loss ``name`` given ``args``, defaults filled in (what names a run); a bad
    name or argument raises one line per field (``loss_args.nckd: ...``)."""
    from kd_ray.core.student_losses import loss_class

    try:
        cls = loss_class(name)
    except ValueError as e:
        raise ValueError(f"loss: {e}") from None
    try:
        return cls.Params(**args).model_dump(mode="json")
    except ValidationError as e:
        raise ValueError("\n".join(f"{where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                    + (f" (loss {name} takes {sorted(cls.Params.model_fields)})"
                                       if err["type"] == "extra_forbidden" else "") for err in e.errors())) from None

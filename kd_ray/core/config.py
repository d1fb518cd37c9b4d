"""One experiment = one validated config object (pydantic v2, unknown keys rejected).

:mod:`kd_ray.core.config_files` loads it from YAML with ``--set section.key=value`` overrides. Every
later stage receives this object; none re-reads the YAML or invents a default of its own.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kd_ray.core.models import check_model

DATASETS = ("digits", "mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100", "parquet", "image_folder", "hf")
# Metrics a sweep can optimise: validation only (the test split never chooses anything)
METRICS = ("val_accuracy", "val_nll", "val_fidelity")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Normalization(_Section):
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _matching(self) -> "Normalization":
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("give one mean and one std (> 0) per channel")
        return self


class DataConfig(_Section):
    name: str = "digits"
    root: Optional[str] = None  # folder (or URI for parquet) holding the files
    download: bool = False  # torchvision sources only: download into root when missing
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # carved from the training set, stratified
    seed: int = 0  # seed of the validation split and of the nested fractions
    image_column: str = "image"  # parquet and hf sources
    label_column: str = "label"
    # hf: a Hugging Face `datasets` folder (save_to_disk, or the hub's parquet files) and its split names
    train_split: str = "train"
    test_split: str = "test"
    image_shape: Optional[list[int]] = None  # parquet: reshape flat images to (C, H, W)
    image_size: Optional[list[int]] = None  # image_folder: resize to (H, W)
    omit_classes: list[int] = []  # transfer-set filter (the paper's omitted-digit experiment)
    keep_classes: Optional[list[int]] = None  # transfer-set filter: keep only these classes
    stream: bool = False  # parquet, image_folder: stream the rows from the files in every stage, never load the source
    # per-channel {mean: [...], std: [...]} of the training images on the [0, 1] scale, when known
    # (ImageNet's, say): used instead of computing them (a streamed source skips its statistics pass)
    normalization: Optional[Normalization] = None


    @field_validator("name")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; known datasets: {list(DATASETS)}")
        return v

    @model_validator(mode="after")
    def _root_when_needed(self) -> "DataConfig":
        if self.name in ("parquet", "image_folder", "hf") and not self.root:
            raise ValueError(f"data.root is required for the {self.name!r} source")
        if self.stream and self.name == "hf":
            raise ValueError("stream: an hf source is read into memory; for data larger than memory give its parquet "
                             "files as data.name: parquet (the {bytes, path} image column reads there too)")
        if self.stream and self.name not in ("parquet", "image_folder"):
            raise ValueError(f"stream: streamed sources are parquet or image_folder; data.name is {self.name!r}")
        return self


class InputAdapt(_Section):
    """What a model expects of its input, when the data differs: channels (one is repeated) and size."""

    channels: Optional[int] = Field(None, ge=1)
    size: Optional[list[int]] = Field(None, min_length=2, max_length=2)


class TrainSpec(_Section):
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


_NAMES_ITS_FIELD = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*: ")


def field_line(where: str, msg: str) -> str:
    """An error line under ``where`` (a section, a spec or a field): a message that starts with the
    field it is about (``model: ...``, ``model_args.hidden: ...``, from a model validator) is
    joined to it with a dot, any other after a colon."""
    return f"{where}.{msg}" if _NAMES_ITS_FIELD.match(msg) else f"{where}: {msg}"


def _spec_error(i: int, err: dict) -> str:
    """One line per field: ``teachers.specs[0].lr: ...``."""
    loc = ".".join(str(p) for p in err["loc"])
    return field_line(f"teachers.specs[{i}]" + (f".{loc}" if loc else ""), err["msg"].removeprefix("Value error, "))


class SoftTargetsConfig(_Section):
    temperature: float = Field(4.0, gt=0)
    rule: Literal["probs", "logits"] = "probs"  # losses.RULES
    mode: Optional[Literal["cached", "streaming"]] = None  # None: streaming iff augmentation without views
    jitter: int = Field(0, ge=0)  # streaming mode: shift up to k pixels, same view for both
    # consistent teaching: mix each (shifted) image with another of the student's subset, weight ~
    # Beta(mixup, mixup), and let the teachers label the mixed image (Beyer et al. 2022's "function
    # matching"); cached views: each view mixed with a partner of the views cache's rows (its id and
    # weight stored). 0: no mixup. With jitter 0 the views are mixed, not shifted.
    mixup: float = Field(0.0, ge=0)
    # what the cache keeps of each teacher's logits (to re-soften at another T, or match logits):
    #   none    nothing beyond the averaged soft targets
    #   dense   all C logits per teacher, float16 (K x C x 2 bytes a row)
    #   topk    the top_k largest logits and their classes, and one tail logit per teacher
    #           (K x (4 x top_k + 4) bytes a row; losses.top_k_logits says how the tail is kept)
    teacher_logits: Literal["none", "dense", "topk"] = "dense"
    top_k: int = Field(32, ge=1)
    # cached mode: V shifted (and with ``mixup``, mixed) views of every transfer image, each a pure
    # function of (data seed, view, id), labelled once by the ensemble and cached without the image;
    # student.teaching: cached_views trains on them (consistent teaching, no teacher passes). 0: none
    views: int = Field(0, ge=0)
    # label views of this nested fraction of the transfer set only (the data seed's, as students
    # pick theirs): a sweep of small fractions pays V x its largest fraction, not V x every row
    views_fraction: float = Field(1.0, gt=0, le=1)
    # the teachers' arithmetic in the predictor (bfloat16: faster on CPUs with AVX512-BF16, soft
    # targets within ~1e-4 of float32's; docs/notes.md); averaging and softmax stay in float32
    precision: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(512, gt=0)
    actors: int = Field(1, ge=1)  # size of the EnsemblePredictor actor pool
    num_gpus: float = Field(0.0, ge=0)  # per predictor actor
    num_cpus: float = Field(1.0, gt=0)  # per predictor actor
    wait_for_actors_s: float = Field(60.0, gt=0)  # fail (not hang) if the pool cannot start

    @property
    def keeps_logits(self) -> bool:
        return self.teacher_logits != "none"

    @property
    def augments(self) -> bool:
        """Whether the transfer set is augmented (shifts, mixup or both)."""
        return self.jitter > 0 or self.mixup > 0

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("streaming" if self.augments and not self.views else "cached")


# StudentConfig fields added after runs were named: at these values they stay out of run names
_NAMELESS_DEFAULTS = {"min_steps": None, "init": "scratch", "grad_clip_norm": None, "loss": "kd",
                      "input_adapt": None, "pretrained": False, "pretrained_file": None, "freeze_backbone": False}


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
    # How soft targets meet augmentation (shifts of up to soft_targets.jitter pixels):
    #   cached        the fixed cached soft targets of the un-augmented images, no augmentation
    #   inconsistent  the cached soft targets, but the student alone sees a shifted image
    #   consistent    every epoch the teachers label the very shifted view the student trains on
    #                 (streaming through an EnsemblePredictor actor pool; Beyer et al. 2022)
    # None: consistent in streaming mode, cached otherwise.
    #   cached_views  each epoch one of the V cached views of each row (soft_targets.views), rebuilt
    #                 from the source image: consistent teaching with no teacher passes in training
    teaching: Optional[Literal["cached", "inconsistent", "consistent", "cached_views"]] = None
    # Where the student's weights start:
    #   scratch  a fresh initialisation (torch.manual_seed(seed))
    #   teacher  a copy of ensemble member number ``seed % K`` (it needs the teachers' model and
    #            model_args); the student then learns the whole ensemble's function, and a hard
    #            trial starting from the same member is its control
    init: Literal["scratch", "teacher"] = "scratch"

    def identity(self, exclude: set[str] = frozenset()) -> dict:
        """The fields a run's result depends on (JSON), for run and sweep names (not ``trainer``:
        both paths give the same result). ``min_steps``
        and ``init`` count only when not the default, so runs from before them keep their names."""
        out = self.model_dump(mode="json", exclude=set(exclude) | {"trainer"})
        for key, default in _NAMELESS_DEFAULTS.items():
            if key in out and out[key] == default:
                del out[key]
        return out

    @model_validator(mode="after")
    def _loss_declared(self) -> "StudentConfig":
        loss_params(self.loss, self.loss_args)
        return self

    @property
    def light(self) -> bool:
        """One worker and no TorchTrainer asked for: the student trains in its trial's (or task's) process."""
        return self.num_workers == 1 and self.trainer == "auto"


class SweepConfig(_Section):
    fractions: list[float] = [0.03, 0.1, 0.3, 1.0]
    targets: list[Literal["soft", "hard"]] = ["soft", "hard"]
    temperatures: list[float] = []  # empty: the student's temperature
    alphas: list[float] = []  # empty: the student's alpha
    lrs: list[float] = []  # learning rates, for soft and hard trials alike; empty: the student's lr
    losses: list[str] = []  # soft trials' loss; empty: the student's
    # a grid over loss parameters, {parameter: [values]}: each applies to the swept losses that declare it
    loss_args: dict[str, list[Any]] = {}
    seeds: list[int] = [0]
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    metric: str = "val_accuracy"  # what the sweep (and ASHA) optimises; *_nll is minimised
    scheduler: Literal["none", "asha"] = "none"
    # soft-target trials per teaching mode (student.teaching); empty: the student's mode
    teaching: list[Literal["cached", "inconsistent", "consistent", "cached_views"]] = []
    # epoch budgets to sweep; empty: student.epochs. The plain hard-label baseline runs once, with
    # the largest budget. Every trial, soft or hard, keeps its best validation epoch and stops by
    # the same rule (student.early_stopping_patience).
    epochs: list[int] = []

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("the grid is empty: give at least one fraction")
        bad = [f for f in v if not 0 < f <= 1]
        if bad:
            raise ValueError(f"every fraction must be in (0, 1]; got {bad}")
        return v

    @field_validator("targets", "seeds")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("the grid is empty: give at least one value")
        return v

    @field_validator("temperatures", "epochs", "lrs")
    @classmethod
    def _positive(cls, v: list, info) -> list:
        bad = [t for t in v if not t > 0]
        if bad:
            what = {"temperatures": "temperature", "epochs": "epoch budget", "lrs": "learning rate"}[info.field_name]
            raise ValueError(f"every {what} must be > 0; got {bad}")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"every alpha must be in [0, 1]; got {bad}")
        return v

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[str]) -> list[str]:
        from kd_ray.core.student_losses import loss_class

        for name in v:
            loss_class(name)
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v.startswith("test_"):
            raise ValueError(f"{v!r} is a test metric: the test split never chooses anything; use one of {list(METRICS)}")
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; known metrics: {list(METRICS)}")
        return v


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


class StorageOptions(_Section):
    endpoint_url: Optional[str] = None  # e.g. http://minio.internal:9000 (sets AWS_ENDPOINT_URL)
    region: Optional[str] = None  # sets AWS_DEFAULT_REGION

    def env(self) -> dict[str, str]:
        """The standard AWS variables these options stand for (pyarrow, Ray and boto3 read them)."""
        names = {"endpoint_url": "AWS_ENDPOINT_URL", "region": "AWS_DEFAULT_REGION"}
        return {names[k]: v for k, v in self.model_dump().items() if v is not None}


class RuntimeConfig(_Section):
    address: Optional[str] = None  # Ray address; None: RAY_ADDRESS, else a local cluster
    # local folder or s3:// / gs:// / file:// URI. A relative folder is made absolute against
    # the directory the config is loaded in: Ray actors and Tune trials (which run in their
    # trial folders) have other working directories, and must all write to the same place.
    storage_path: str = Field("./runs", validate_default=True)
    num_cpus: Optional[int] = Field(None, gt=0)  # only for a local cluster started by kd_ray
    num_gpus: Optional[int] = Field(None, ge=0)
    shared_filesystem: bool = False  # a local storage_path that every node mounts (NFS)
    # an S3-compatible endpoint for storage_path, instead of the AWS variables (credentials stay
    # in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance profile, never in a config)
    storage_options: StorageOptions = StorageOptions()
    # Ray's worker logs, Ray Data's progress bars and Tune's trial tables on the console (else
    # they go to Ray's log files under /tmp/ray/session_latest/logs); `kd-ray --verbose` sets it
    verbose: bool = False
    # how long a stage waits for the autoscaler to add the nodes it needs before failing
    scale_timeout_s: float = Field(600.0, gt=0)
    # autocast for teachers', students' and predictors' forward passes: "auto" is bf16 on a GPU
    # and float32 on a CPU; "fp16" also scales the loss (torch.amp.GradScaler)
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # where finished teachers' and students' per-epoch metrics go (kd_ray/stages/tracking.py)
    tracking: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    # MLflow tracking URI (a server, sqlite:///..., or a folder); None: <storage_path>/<name>/mlruns
    mlflow_uri: Optional[str] = None
    # Weights & Biases: project and entity (None: WANDB_PROJECT / WANDB_ENTITY, else the experiment's
    # name and your default entity); mode online, or offline (files under <storage>/<name>/wandb,
    # `wandb sync` them later); None: WANDB_MODE, else offline
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: Optional[Literal["online", "offline"]] = None
    # what `kd-ray run` and jobs/pipeline.py run, in this order (a stage computes what it
    # needs from earlier ones when missing, and reuses what is finished)
    stages: list[Literal["teachers", "soft-targets", "sweep", "report"]] = ["teachers", "soft-targets", "sweep", "report"]

    @field_validator("storage_path")
    @classmethod
    def _storage_path(cls, v: str) -> str:
        from kd_ray.core.storage import absolute

        if not v:
            raise ValueError("give a folder or an s3:// / gs:// URI")
        return absolute(v)

    @model_validator(mode="after")
    def _mlflow(self) -> "RuntimeConfig":
        import importlib.util

        from kd_ray.core.storage import is_local

        if "wandb" in self.tracking and importlib.util.find_spec("wandb") is None:
            raise ValueError("tracking: wandb is not installed; `pip install wandb` or drop wandb")
        if "mlflow" not in self.tracking:
            return self
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError("tracking: mlflow is not installed; `pip install mlflow-skinny` or drop mlflow")
        if self.mlflow_uri is None and not is_local(self.storage_path):
            raise ValueError(f"mlflow_uri: MLflow's file store needs a folder, but storage_path is "
                             f"{self.storage_path}; give an MLflow server, sqlite:///... or a folder")
        return self

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one stage")
        order = ["teachers", "soft-targets", "sweep", "report"]
        if v != sorted(set(v), key=order.index):
            raise ValueError(f"stages must be distinct and in pipeline order {order}; got {v}")
        return v


class ExperimentConfig(_Section):
    name: str = "digits"
    data: DataConfig = DataConfig()
    teachers: TeachersConfig = TeachersConfig()
    soft_targets: SoftTargetsConfig = SoftTargetsConfig()
    student: StudentConfig = StudentConfig()
    sweep: SweepConfig = SweepConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _losses(self) -> "ExperimentConfig":
        """Each soft loss can read what it declares; each swept loss parameter is some swept loss's."""
        from kd_ray.core.student_losses import loss_class

        losses = self.sweep.losses or [self.student.loss]
        for name in losses:
            if loss_class(name).reads == "teacher_logits" and not self.soft_targets.keeps_logits:
                where = "sweep.losses" if self.sweep.losses else "student.loss"
                raise ValueError(f"{where}: {name} reads the teachers' logits, but soft_targets.teacher_logits is "
                                 f"none: set it to dense or topk")
        for key, values in self.sweep.loss_args.items():
            takers = [n for n in losses if key in loss_class(n).Params.model_fields]
            if not takers or not values:
                raise ValueError(f"sweep.loss_args.{key}: " + ("give at least one value" if takers else
                                 f"no swept loss ({losses}) takes it"))
            for name in takers:
                for v in values:
                    loss_params(name, {key: v}, where="sweep.loss_args")
        return self

    @model_validator(mode="after")
    def _teaching(self) -> "ExperimentConfig":
        modes = set(self.sweep.teaching) | {self.student.teaching or "cached"}
        st = self.soft_targets
        if "inconsistent" in modes and st.jitter <= 0:
            raise ValueError("inconsistent teaching shifts the student's images: set soft_targets.jitter to "
                             "the largest shift in pixels (e.g. 1)")
        if "consistent" in modes and not st.augments:
            raise ValueError("consistent teaching augments the images teacher and student share: set "
                             "soft_targets.jitter to the largest shift in pixels (e.g. 1), soft_targets.mixup "
                             "to a Beta parameter (e.g. 1.0), or both")
        if "cached_views" in modes and not (st.views > 0 and st.augments and st.resolved_mode == "cached"):
            raise ValueError("cached_views teaching trains on cached augmented views: set soft_targets.views to "
                             "their number (e.g. 8), soft_targets.jitter to the largest shift (e.g. 1) and/or "
                             "soft_targets.mixup to a Beta parameter, and soft_targets.mode: cached")
        fractions = (self.sweep.fractions if "cached_views" in self.sweep.teaching else []) + (
            [self.student.fraction] if self.student.teaching == "cached_views" else [])
        if fractions and max(fractions) > st.views_fraction:
            raise ValueError(f"cached_views students train on fractions up to {max(fractions):g} but the views "
                             f"cache holds soft_targets.views_fraction={st.views_fraction:g} of the rows: raise it")
        if st.resolved_mode == "streaming" and modes & {"cached", "inconsistent"} and (
                self.student.teaching or self.sweep.teaching):
            raise ValueError("cached and inconsistent teaching read cached soft targets of the transfer set: "
                             "set soft_targets.mode: cached (consistent trials stream either way)")
        if self.data.stream:
            self._streamable(modes)
        return self

    def _streamable(self, modes: set[str]) -> None:
        """A streamed source feeds cached teaching (soft and hard students) and teachers trained here."""
        if modes - {"cached"} or self.soft_targets.resolved_mode != "cached" or self.soft_targets.views:
            raise ValueError(f"data.stream: a streamed source serves cached teaching only (teaching {sorted(modes)}, "
                             f"soft_targets.views {self.soft_targets.views}); set sweep.teaching: [cached] and "
                             f"soft_targets.mode: cached, views: 0")
        for i, spec in enumerate(self.teachers.resolved()):
            if spec.bootstrap or spec.checkpoint:
                where = f"teachers.specs[{i}]" if self.teachers.specs else "teachers"
                raise ValueError(f"data.stream: {where}.{'bootstrap' if spec.bootstrap else 'checkpoint'} needs the "
                                 f"source in memory; drop it or set data.stream: false")

    def teaching(self, targets: str | None = None) -> str:
        """The resolved teaching mode of a student with ``targets`` (default: student.targets). A
        hard-label student needs no teachers: with cached rows its "consistent" views are the
        in-worker shifts ("inconsistent")."""
        streaming = self.soft_targets.resolved_mode == "streaming"
        mode = self.student.teaching or ("consistent" if streaming else "cached")
        # without mixup a hard student's "consistent" views are plain shifts, made in the worker;
        # mixed views (and their mixed labels) come from the predictor pool's stream
        if (mode == "consistent" and (targets or self.student.targets) == "hard" and not streaming
                and self.soft_targets.mixup == 0):
            return "inconsistent"
        return mode

    def student_temperature(self) -> float:
        """The student's effective T: its own, else the soft targets' (re-softened when they differ)."""
        return self.student.temperature or self.soft_targets.temperature

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

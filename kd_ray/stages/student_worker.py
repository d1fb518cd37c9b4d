"""The student's side of the Ray seam: what the process that trains one student runs.

* :class:`StudentJob` is everything that process needs, typed: the student's config, its
  temperature, the classes and input shape, where its rows come from.
  :func:`kd_ray.stages.distill.distill` (the driver) builds it.
* :func:`run_student` is the one per-worker function. It talks to Ray only through a seam:
  (1) resume from the last checkpoint, (2) prepare the model (DDP when world > 1), (3) this
  worker's rows, (4) every report with a checkpoint. :class:`TrainSeam` is a Ray Train worker of
  a TorchTrainer (``student.num_workers > 1``); :class:`LightSeam` is one worker in the calling
  process (a Tune trial, a Ray task), checkpointing to storage itself.
  :class:`kd_ray.core.train.Engine` runs the epochs.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch

from kd_ray.core import storage
from kd_ray.core.augment import cached_view, chosen_views, seeded_shift
from kd_ray.core.config import (
    METRICS,
    SoftTargetsConfig,
    StudentConfig,
)
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.core.environment import environment
from kd_ray.core.models import inner_model
from kd_ray.core.plan import StudentPlan
from kd_ray.core.rows import in_id_order
from kd_ray.core.schema import TARGET_COLUMNS
from kd_ray.core.student_losses import make_loss
from kd_ray.core.train import (
    Diverged,
    Engine,
    EpochStream,
    amp_dtype,
    eval_batches,
    evaluate,
    shuffled_batches,
    student_loss,
    to_tensor,
)
from kd_ray.stages.consistent import consistent_stream, streamed_consistent, worker_share
from kd_ray.stages.sources import StreamedSource

# A consistent-teaching worker iterates its stream itself, so Ray Data's scheduling thread runs in
# the worker's process; a short switch interval hands the GIL back to the training thread sooner
# when that thread spins on backpressured tasks (docs/consistent_teaching.md).
STREAM_SWITCH_INTERVAL_S = 1e-4


@dataclass
class StreamJob:
    """Consistent teaching: the subset's rows (object store) or, for a streamed source, the source
    and the subset its rows come from; and the predictor pool that labels each view."""

    rows: Any  # ObjectRef of {id, image, label}; None for a streamed source
    ids: np.ndarray | None
    soft_targets: SoftTargetsConfig
    model_paths: list[str]
    counters: list[str]  # pass counters: the experiment's and this run's
    source: dict | None = None  # a streamed source (StreamedSource.plain()) ...
    fraction: float = 1.0  # ... and the nested fraction of its transfer set, under the data seed
    data_seed: int = 0


@dataclass
class StudentJob:
    """What crosses into the process that trains a student (trial, task or Train worker), typed."""

    plan: StudentPlan  # the student resolved on the driver; its epochs already scheduled (student.min_steps)
    targets_temperature: float  # the T of the stored soft targets (re-softened when it differs)
    rule: str
    num_classes: int
    input_shape: list[int]
    eval: dict[str, Any]  # ObjectRefs of the val and test arrays {image, label, ensemble_pred}; {}: streamed
    init_path: str | None = None  # student.init: teacher
    stream: StreamJob | None = None
    in_memory: bool = False  # read the cached shard once into tensors
    train_arrays: dict[str, np.ndarray] | None = None  # light path: the rows themselves, no Ray Data
    eval_in_memory: bool = False  # a streamed source: read its val and test rows once (else every validation)
    cpus_per_worker: int = 1
    fail_after_epoch: int | None = None  # fault injection (tests)
    mixed_precision: str = "auto"  # runtime.mixed_precision
    views: int = 0  # cached_views teaching: the cache's V views per row ...
    view_seed: int = 0  # ... and the seed their shifts are a function of
    views_axis: bool = False  # a streamed source's rows carry all V views' targets ([B, V, ...])

    @property
    def student(self) -> StudentConfig:
        return self.plan.student


class TrainSeam:
    """A Ray Train worker of a TorchTrainer: Train's checkpoints, shards and DDP."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @staticmethod
    def device() -> torch.device:
        """This worker's GPU when torch can use it; the CPU where Ray's GPUs are logical (tests,
        fake autoscaler) or the worker's torch has no CUDA."""
        return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")

    def restore(self) -> dict | None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(os.path.join(d, "student.pt"), map_location="cpu", weights_only=True)

    def prepare(self, model: torch.nn.Module, device) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=device)

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, write: Callable[[str], None] | None) -> None:
        if write is None:
            return ray.train.report(dict(metrics))
        with tempfile.TemporaryDirectory() as d:
            write(d)
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))


@dataclass
class LightSeam:
    """One worker in this process (a Tune trial, a Ray task): its checkpoint is a folder on
    storage, rewritten at every report (``student.pt`` last, so a half-written one is never
    read as newer), and every report also goes to ``on_report`` (``ray.tune.report`` in a trial)."""

    checkpoint_dir: str
    datasets: dict[str, Any] = field(default_factory=dict)
    on_report: Callable[[dict], None] = lambda metrics: None
    rank: int = 0
    world: int = 1

    @staticmethod
    def device() -> torch.device:  # a trial holding a GPU sees it as cuda:0 (CUDA_VISIBLE_DEVICES)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def restore(self) -> dict | None:
        path = storage.join(self.checkpoint_dir, "student.pt")
        return storage.load_torch(path) if storage.exists(path) else None

    def prepare(self, model: torch.nn.Module, device) -> torch.nn.Module:
        return model.to(device)

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, write: Callable[[str], None] | None) -> None:
        with tempfile.TemporaryDirectory() as d:
            if write is not None:
                write(d)
            files = sorted(Path(d).iterdir(), key=lambda f: f.name == "student.pt")
            for f in files:
                storage.write_bytes(storage.join(self.checkpoint_dir, f.name), f.read_bytes())
        self.on_report(dict(metrics))


def train_loop_per_worker(config: dict) -> dict:
    """The TorchTrainer's per-worker function."""
    return run_student(config["job"], TrainSeam())


def run_student(job: StudentJob, seam: TrainSeam | LightSeam) -> dict:
    """Train one student (this worker's share of it) to the end; its history and final metrics."""
    s = job.student
    # Per-epoch iteration bars from every worker drown the output; kd_ray prints its own progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rank, device = seam.rank, seam.device()
    torch.set_num_threads(max(1, job.cpus_per_worker))
    engine, patience = _student_engine(job, device), s.early_stopping_patience
    state = seam.restore()  # (1) resume
    if state is not None:
        engine.load_state_dict(state)
    start_epoch = engine.epoch
    engine.model = seam.prepare(engine.model, device)  # (2) DDP when world > 1

    epoch_rows = _epoch_rows(job, seam, start_epoch, device)  # (3) this worker's rows
    seen = {"ids": [], "sample": None}  # the epoch's row ids and first batch, kept in its checkpoint

    def batches(epoch: int):
        seen["ids"], seen["sample"] = [], None
        for b in epoch_rows(epoch):
            if job.plan.teaching.view == "shift":  # the student alone sees the shifted view
                b["image"] = seeded_shift(b["image"], b["id"], job.plan.jitter, s.seed, epoch)
            if seen["sample"] is None:
                seen["sample"] = {k: b[k].cpu().numpy() for k in ("id", "image", "soft_targets", "mix_weight") if k in b}
            seen["ids"].append(b["id"].cpu().numpy())
            yield b

    val_rows = _eval_rows(job, seam, "val", device)

    def validate(m) -> dict:
        return {f"val_{k}": v for k, v in evaluate(m, val_rows(), device).items()}

    def report(row: dict) -> None:  # (4) metrics and checkpoint, every rank
        seam.report(row, _checkpoint_writer(engine, rank, seen))
        if job.fail_after_epoch == row["epoch"] and start_epoch == 0:
            raise RuntimeError(f"injected failure after epoch {row['epoch']} (fault-injection test)")

    try:
        engine.fit(s.epochs, batches, validate, report, s.report_every, patience)
    except Diverged as e:  # a finished run that says so: no test metrics, the earlier checkpoints kept
        final = {"epoch": e.epoch, "best_epoch": engine.best.epoch, "final": True, "diverged_epoch": e.epoch,
                 # Tune wants the sweep's metric in every report; a diverged model has none
                 **{m: float("nan") for m in METRICS}}
        seam.report(final, None)
        return {"history": engine.history, "final": final}

    final = _final_metrics(engine, job, seam, validate, device)
    seam.report(final, _checkpoint_writer(engine, rank, seen))
    return {"history": engine.history, "final": final, "environment": environment()}


def _final_metrics(engine: Engine, job: StudentJob, seam, validate, device) -> dict:
    """The best validation epoch's model (val_accuracy) on validation and, read once here, test;
    and where this worker ran."""
    engine.restore_best()
    last = engine.history[-1] if engine.history else {}
    final = {"epoch": last.get("epoch", 0), "best_epoch": engine.best.epoch, "final": True,
             **{k: v for k, v in last.items() if k.startswith(("val_", "train_"))}, **validate(engine.plain),
             "worker_node": ray.get_runtime_context().get_node_id(),
             "worker_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    test = evaluate(engine.plain, _eval_rows(job, seam, "test", device)(), device)
    return {**final, **{f"test_{k}": v for k, v in test.items()}}


def _eval_rows(job: StudentJob, seam, split: str, device):
    """``() -> batches`` of the val or test split: arrays from the object store, or (a streamed
    source) the split's rows streamed from its files and the cache at every call."""
    if job.eval:
        rows = eval_batches(ray.get(job.eval[split]), device)
        return lambda: rows
    shard = seam.dataset(split)
    if job.eval_in_memory:
        rows = eval_batches(_read_columns(shard), device)
        return lambda: rows
    return lambda: shard.iter_torch_batches(batch_size=1024, device=device)


def _student_engine(job: StudentJob, device) -> Engine:
    """The student model (fresh, or a copy of a teacher) and its engine with the distillation loss."""
    s = job.student
    torch.manual_seed(s.seed)
    model = s.build(job.input_shape, job.num_classes)
    if job.init_path:  # student.init: teacher (a resumed run's checkpoint overrides it)
        inner_model(model).load_state_dict(load_teacher_files([job.init_path])[0].blob["state_dict"])
    alpha = s.alpha if job.plan.soft else 0.0
    loss_fn = student_loss(make_loss(s.loss, job.plan.loss_args), job.plan.temperature, alpha, job.num_classes,
                           job.targets_temperature, job.rule)
    amp = amp_dtype(job.mixed_precision, device)
    # one checkpoint rule for every student, soft or hard: the best validation epoch's weights
    return Engine(model, s, loss_fn, keep_best=True, amp=amp)


def _epoch_rows(job: StudentJob, seam, start_epoch: int, device):
    """``epoch -> batches`` of this worker's rows: the consistent-teaching stream, the rows given
    as arrays (light path), the cached shard read once into memory, or the shard streamed from
    Ray Data every epoch."""
    s, rank, world = job.student, seam.rank, seam.world
    if job.stream:  # consistent teaching: every remaining epoch through one predictor pool
        sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
        st, epochs = job.stream, range(start_epoch, s.epochs)
        if st.source is None:
            ds = consistent_stream(st.rows, worker_share(st.ids, rank, world), st.soft_targets, st.model_paths,
                                   epochs, s.seed, st.counters)
        else:
            ds = streamed_consistent(StreamedSource.from_plain(st.source), st.fraction, st.data_seed, rank, world,
                                     st.soft_targets, st.model_paths, epochs, s.seed, st.counters)
        return EpochStream(ds.iter_batches(batch_size=None, batch_format="numpy"), s.batch_size, device).epoch
    # each epoch's view of a row: one of its V cached views (all V rows of an id held together, or a
    # streamed row carrying all V views' targets), or the row as it is
    pick = _pick_view if job.views_axis else _one_view_each if job.plan.teaching.view == "cached_view" else None
    if job.train_arrays is not None:  # no Ray Data execution: the rows came with the job
        rows = {k: to_tensor(v).to(device) for k, v in job.train_arrays.items()}
    elif job.in_memory or pick is _one_view_each:  # the shard, read once, reshuffled every epoch
        rows = _read_shard(seam.dataset("train"), device)
    else:  # the shard streamed from Ray Data every epoch
        shard = seam.dataset("train")

        def streamed(e: int):
            batches = shard.iter_torch_batches(batch_size=s.batch_size, device=device, local_shuffle_buffer_size=4096,
                                               local_shuffle_seed=s.seed * 1000 + e)
            return batches if pick is None else (pick(b, job, e) for b in batches)
        return streamed
    return lambda e: shuffled_batches(rows if pick is None else pick(rows, job, e), s.batch_size, s.seed * 1000 + e)


def _one_view_each(rows: dict[str, torch.Tensor], job: StudentJob, epoch: int) -> dict[str, torch.Tensor]:
    """The rows of the view each id trains on in ``epoch``, with that view's image rebuilt from
    the source image (and a mixed view's partner image): the very image the teachers labelled."""
    ids = rows["id"].cpu().numpy()
    want = torch.from_numpy(chosen_views(ids, job.views, job.student.seed, epoch)).to(rows["view"].device)
    keep = rows["view"] == want
    out = {k: v[keep] for k, v in rows.items()}
    mixed = (out.pop("mix_image"), out.pop("mix_id"), out["mix_weight"]) if "mix_image" in out else None
    out["image"] = cached_view(out["image"], out["id"], out["view"], job.plan.jitter, job.view_seed, mixed)
    return out


def _pick_view(rows: dict[str, torch.Tensor], job: StudentJob, epoch: int) -> dict[str, torch.Tensor]:
    """Rows carrying all V views' targets -> each row's view for ``epoch`` (the one
    :func:`_one_view_each` picks), its image rebuilt from the source image."""
    ids = rows["id"]
    v = torch.from_numpy(chosen_views(ids.cpu().numpy(), job.views, job.student.seed, epoch)).to(ids.device)
    at = torch.arange(len(ids), device=ids.device)
    out = {k: t[at, v] if k in TARGET_COLUMNS else t for k, t in rows.items()}
    out["image"] = cached_view(rows["image"], ids, v, job.plan.jitter, job.view_seed)
    return out


def _read_shard(shard, device) -> dict[str, torch.Tensor]:
    """Every training row of a Ray Data shard as one tensor per column, in id order (as the light
    path's arrays: the same student whatever order the blocks came in)."""
    return {k: to_tensor(v).to(device) for k, v in in_id_order(_read_columns(shard)).items()}


def _read_columns(shard) -> dict[str, np.ndarray]:
    """Every row of a Ray Data shard as one numpy array per column."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in shard.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _checkpoint_writer(engine: Engine, rank: int, seen: dict) -> Callable[[str], None]:
    """What a report's checkpoint holds: rank 0 the engine's state; every rank the ids of its rows
    and the epoch's first batch as trained on (image after augmentation, soft targets)."""
    def write(d: str) -> None:
        if rank == 0:
            torch.save(engine.state_dict(), os.path.join(d, "student.pt"))
        np.save(os.path.join(d, f"rows_rank{rank}.npy"),
                np.concatenate(seen["ids"]) if seen["ids"] else np.zeros(0, np.int64))
        if seen["sample"] is not None:
            np.savez(os.path.join(d, f"first_batch_rank{rank}.npz"), **seen["sample"])
    return write

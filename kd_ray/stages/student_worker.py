"""The student's side of Ray Train: what one Train worker runs.

* :class:`StudentJob` is everything a worker needs, typed: the student's config, its temperature,
  the classes and input shape, where its rows come from. :func:`kd_ray.stages.distill.distill`
  (the driver) builds it.
* :func:`train_loop_per_worker` is the Ray seam: (1) resume from the last checkpoint, (2)
  ``prepare_model``, (3) this worker's rows (the consistent-teaching stream, the cached shard, or
  one stored view of each row per epoch), (4) every report goes to ``ray.train.report`` with a
  checkpoint; :class:`kd_ray.core.train.Engine` runs the epochs.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import ray.train.torch
import torch

from kd_ray.core.augment import cached_view, chosen_views, seeded_shift
from kd_ray.core.config import (
    METRICS,
    SoftTargetsConfig,
    StudentConfig,
)
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.core.models import inner_model
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
from kd_ray.stages.consistent import consistent_stream, worker_share

# A consistent-teaching worker iterates its stream itself, so Ray Data's scheduling thread runs in
# the worker's process; a short switch interval hands the GIL back to the training thread sooner
# when that thread spins on backpressured tasks (docs/consistent_teaching.md).
STREAM_SWITCH_INTERVAL_S = 1e-4


@dataclass
class StreamJob:
    """Consistent teaching: the subset's rows (object store) and the predictor pool that labels each view."""

    rows: Any  # ObjectRef of {id, image, label}
    ids: np.ndarray
    soft_targets: SoftTargetsConfig
    model_paths: list[str]
    counters: list[str]  # pass counters: the experiment's and this run's


@dataclass
class StudentJob:
    """What crosses the Ray Train boundary: one student run, typed."""

    student: StudentConfig  # epochs already scheduled (student.min_steps)
    temperature: float  # the student's effective T
    targets_temperature: float  # the T of the stored soft targets (re-softened when it differs)
    rule: str
    num_classes: int
    input_shape: list[int]
    teaching: str  # ExperimentConfig.teaching()
    jitter: int
    eval: dict[str, Any]  # ObjectRefs of the val and test arrays {image, label, ensemble_pred}; {}: streamed
    init_path: str | None = None  # student.init: teacher
    stream: StreamJob | None = None
    in_memory: bool = False  # read the cached shard once into tensors
    eval_in_memory: bool = False  # a streamed source: read its val and test rows once (else every validation)
    cpus_per_worker: int = 1
    fail_after_epoch: int | None = None  # fault injection (tests)
    mixed_precision: str = "auto"  # runtime.mixed_precision
    views: int = 0  # cached_views teaching: the cache's V views per row ...
    view_seed: int = 0  # ... and the seed their shifts are a function of


def train_loop_per_worker(config: dict) -> dict:
    job: StudentJob = config["job"]
    s = job.student
    # Per-epoch iteration bars from every worker drown the output; Train and Tune report epochs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device()
    torch.set_num_threads(max(1, job.cpus_per_worker))
    engine, patience = _student_engine(job), s.early_stopping_patience
    ckpt = ray.train.get_checkpoint()  # (1) resume
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_state_dict(torch.load(os.path.join(d, "student.pt"), map_location="cpu", weights_only=True))
    start_epoch = engine.epoch
    engine.model = ray.train.torch.prepare_model(engine.model, move_to_device=device)  # (2) DDP when world > 1

    epoch_rows = _epoch_rows(job, rank, world, start_epoch, device)  # (3) this worker's rows
    seen = {"ids": [], "sample": None}  # the epoch's row ids and first batch, kept in its checkpoint

    def batches(epoch: int):
        seen["ids"], seen["sample"] = [], None
        for b in epoch_rows(epoch):
            if job.teaching == "inconsistent":  # the student alone sees the shifted view
                b["image"] = seeded_shift(b["image"], b["id"], job.jitter, s.seed, epoch)
            if seen["sample"] is None:
                seen["sample"] = {k: b[k].cpu().numpy() for k in ("id", "image", "soft_targets", "mix_weight") if k in b}
            seen["ids"].append(b["id"].cpu().numpy())
            yield b

    val_rows = _eval_rows(job, "val", device)

    def validate(m) -> dict:
        return {f"val_{k}": v for k, v in evaluate(m, val_rows(), device).items()}

    def report(row: dict) -> None:  # (4) metrics and checkpoint, every rank
        _report(row, engine, rank, seen)
        if job.fail_after_epoch == row["epoch"] and start_epoch == 0:
            raise RuntimeError(f"injected failure after epoch {row['epoch']} (fault-injection test)")

    try:
        engine.fit(s.epochs, batches, validate, report, s.report_every, patience)
    except Diverged as e:  # a finished run that says so: no test metrics, the earlier checkpoints kept
        final = {"epoch": e.epoch, "best_epoch": engine.best.epoch, "final": True, "diverged_epoch": e.epoch,
                 # Tune wants the sweep's metric in every report; a diverged model has none
                 **{m: float("nan") for m in METRICS}}
        ray.train.report(final)
        return {"history": engine.history, "final": final}

    final = _final_metrics(engine, job, validate, device)
    _report(final, engine, rank, seen)
    return {"history": engine.history, "final": final}


def _final_metrics(engine: Engine, job: StudentJob, validate, device) -> dict:
    """The best validation epoch's model (val_accuracy) on validation and, read once here, test;
    and where this worker ran."""
    engine.restore_best()
    last = engine.history[-1] if engine.history else {}
    final = {"epoch": last.get("epoch", 0), "best_epoch": engine.best.epoch, "final": True,
             **{k: v for k, v in last.items() if k.startswith(("val_", "train_"))}, **validate(engine.plain),
             "worker_node": ray.get_runtime_context().get_node_id(),
             "worker_gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    test = evaluate(engine.plain, _eval_rows(job, "test", device)(), device)
    return {**final, **{f"test_{k}": v for k, v in test.items()}}


def _eval_rows(job: StudentJob, split: str, device):
    """``() -> batches`` of the val or test split: arrays from the object store, or (a streamed
    source) the split's rows streamed from its files and the cache at every call."""
    if job.eval:
        rows = eval_batches(ray.get(job.eval[split]), device)
        return lambda: rows
    shard = ray.train.get_dataset_shard(split)
    if job.eval_in_memory:
        rows = eval_batches(_read_columns(shard), device)
        return lambda: rows
    return lambda: shard.iter_torch_batches(batch_size=1024, device=device)


def _device() -> torch.device:
    """This worker's GPU when torch can use it; the CPU where Ray's GPUs are logical (tests, fake
    autoscaler) or the worker's torch has no CUDA."""
    return ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")


def _student_engine(job: StudentJob) -> Engine:
    """The student model (fresh, or a copy of a teacher) and its engine with the distillation loss."""
    s = job.student
    torch.manual_seed(s.seed)
    model = s.build(job.input_shape, job.num_classes)
    if job.init_path:  # student.init: teacher (a resumed run's checkpoint overrides it)
        inner_model(model).load_state_dict(load_teacher_files([job.init_path])[0].blob["state_dict"])
    alpha = 0.0 if s.targets == "hard" else s.alpha
    loss_fn = student_loss(job.temperature, alpha, job.num_classes, job.targets_temperature, job.rule, s.loss)
    amp = amp_dtype(job.mixed_precision, _device())
    # one checkpoint rule for every student, soft or hard: the best validation epoch's weights
    return Engine(model, s, loss_fn, keep_best=True, amp=amp)


def _epoch_rows(job: StudentJob, rank: int, world: int, start_epoch: int, device):
    """``epoch -> batches`` of this worker's rows: the consistent-teaching stream, the cached shard
    read once into memory, or the shard streamed from Ray Data every epoch."""
    s = job.student
    if job.stream:  # consistent teaching: every remaining epoch through one predictor pool
        sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
        st = job.stream
        ds = consistent_stream(st.rows, worker_share(st.ids, rank, world), st.soft_targets, st.model_paths,
                               range(start_epoch, s.epochs), s.seed, st.counters)
        return EpochStream(ds.iter_batches(batch_size=None, batch_format="numpy"), s.batch_size, device).epoch
    shard = ray.train.get_dataset_shard("train")
    if job.teaching == "cached_views":  # all V views of each row, read once; one of them per epoch
        rows = _read_shard(shard, device)
        return lambda e: shuffled_batches(_one_view_each(rows, job, e), s.batch_size, s.seed * 1000 + e)
    if job.in_memory:  # the shard, read once, reshuffled every epoch
        rows = _read_shard(shard, device)
        return lambda e: shuffled_batches(rows, s.batch_size, s.seed * 1000 + e)
    return lambda e: shard.iter_torch_batches(batch_size=s.batch_size, device=device, local_shuffle_buffer_size=4096,
                                              local_shuffle_seed=s.seed * 1000 + e)


def _one_view_each(rows: dict[str, torch.Tensor], job: StudentJob, epoch: int) -> dict[str, torch.Tensor]:
    """The rows of the view each id trains on in ``epoch``, with that view's image rebuilt from
    the source image (and a mixed view's partner image): the very image the teachers labelled."""
    ids = rows["id"].cpu().numpy()
    want = torch.from_numpy(chosen_views(ids, job.views, job.student.seed, epoch)).to(rows["view"].device)
    keep = rows["view"] == want
    out = {k: v[keep] for k, v in rows.items()}
    mixed = (out.pop("mix_image"), out.pop("mix_id"), out["mix_weight"]) if "mix_image" in out else None
    out["image"] = cached_view(out["image"], out["id"], out["view"], job.jitter, job.view_seed, mixed)
    return out


def _read_shard(shard, device) -> dict[str, torch.Tensor]:
    """Every row of a Ray Data shard as one tensor per column (numeric columns only)."""
    return {k: to_tensor(v).to(device) for k, v in _read_columns(shard).items()}


def _read_columns(shard) -> dict[str, np.ndarray]:
    """Every row of a Ray Data shard as one numpy array per column."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in shard.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _report(metrics: dict, engine: Engine, rank: int, seen: dict) -> None:
    """A checkpoint with every report: rank 0 saves the engine's state; every rank the ids of its
    rows and the epoch's first batch as trained on (image after augmentation, soft targets)."""
    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save(engine.state_dict(), os.path.join(d, "student.pt"))
        np.save(os.path.join(d, f"rows_rank{rank}.npy"),
                np.concatenate(seen["ids"]) if seen["ids"] else np.zeros(0, np.int64))
        if seen["sample"] is not None:
            np.savez(os.path.join(d, f"first_batch_rank{rank}.npz"), **seen["sample"])
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))

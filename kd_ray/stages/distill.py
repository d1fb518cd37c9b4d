"""Stage 3: distil one student with Ray Train (TorchTrainer) around the core engine.

* :class:`StudentJob` is everything a Train worker needs, typed: the student's config, its
  temperature, the classes and input shape, where its rows come from.
* :func:`train_loop_per_worker` is the Ray seam: (1) its shard of rows, (2) ``prepare_model``,
  (3) :class:`kd_ray.core.train.Engine` runs the epochs, (4) every report goes to
  ``ray.train.report`` with a checkpoint, from which a restarted worker resumes.
* :func:`distill` is the driver: it picks the rows (a nested stratified fraction of the transfer
  set), names the run deterministically (so running again resumes, and a finished run is read
  back instead of retrained), launches the TorchTrainer and returns the final metrics, the
  checkpoint path and the per-epoch history.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchConfig, TorchTrainer

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.augment import cached_view, chosen_views, seeded_shift
from kd_ray.core.config import (
    METRICS,
    ExperimentConfig,
    SoftTargetsConfig,
    StudentConfig,
)
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.core.models import count_parameters, inner_model
from kd_ray.core.subsets import select_fraction
from kd_ray.core.train import (
    Diverged,
    Engine,
    EpochStream,
    amp_dtype,
    eval_batches,
    evaluate,
    schedule_epochs,
    shuffled_batches,
    student_loss,
    to_tensor,
)
from kd_ray.stages.cluster import student_uses_gpu
from kd_ray.stages.counters import forward_passes, pass_counter
from kd_ray.stages.soft_targets import (
    SoftTargets,
    consistent_stream,
    take_ids,
    worker_share,
)
from kd_ray.stages.streamed_targets import student_rows
from kd_ray.stages.tracking import track


class StudentError(RuntimeError):
    pass


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


# --------------------------------------------------------------------------- the Train loop
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


# --------------------------------------------------------------------------- the driver
@dataclass
class DistillResult:
    metrics: dict[str, Any]  # final: val_* and test_* (accuracy, errors, nll, fidelity), epochs
    checkpoint_path: str
    history: pd.DataFrame  # one row per epoch
    run_name: str
    reused: bool = False

    @property
    def diverged_epoch(self) -> int | None:
        """The epoch whose training loss became NaN or infinite (the run stopped there), or None."""
        return self.metrics.get("diverged_epoch")


def run_name(cfg: ExperimentConfig, soft: SoftTargets) -> str:
    s, T, teaching = cfg.student, cfg.student_temperature(), cfg.teaching()
    key = {"student": s.identity(), "T": T, "soft": soft.manifest["fingerprint"],
           "data_seed": cfg.data.seed, "teaching": teaching,
           "jitter": cfg.soft_targets.jitter if teaching != "cached" else 0}
    if teaching == "consistent" and cfg.soft_targets.mixup > 0:
        key["mixup"] = cfg.soft_targets.mixup
    key = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    mode = ("" if teaching == "cached" else f"{teaching}-") + ("" if s.init == "scratch" else f"from-{s.init}-")
    return f"student-{s.targets}-{mode}f{s.fraction:g}-T{T:g}-a{s.alpha:g}-e{s.epochs}-s{s.seed}-{digest}"


def check_classes(s: StudentConfig, soft: SoftTargets) -> None:
    """A student must predict the soft targets' classes."""
    if s.num_classes is not None and s.num_classes != soft.num_classes:
        raise ValueError(f"student.num_classes={s.num_classes} but the soft targets have {soft.num_classes} "
                         f"classes ({soft.path}); use the teachers' label space")


def init_teacher_path(s: StudentConfig, soft: SoftTargets) -> str | None:
    """The teacher checkpoint a ``student.init: teacher`` run starts from (member ``seed % K``),
    or None for ``scratch``. The student must be that teacher's model with its model_args."""
    if s.init == "scratch":
        return None
    path = soft.model_paths[s.seed % len(soft.model_paths)]
    blob = load_teacher_files([path])[0].blob
    if blob["model"] != s.model or dict(blob["model_args"]) != dict(s.model_args):
        raise ValueError(f"student.init=teacher copies teacher {path} ({blob['model']} {blob['model_args']}) but the "
                         f"student is {s.model} {s.model_args}: give the student the teachers' model and "
                         f"model_args, or set student.init: scratch")
    return path


def subset_ids(soft: SoftTargets, fraction: float, seed: int) -> np.ndarray:
    """The transfer-set ids a run at ``fraction`` trains on (nested, stratified)."""
    return select_fraction(soft.transfer.ids, soft.transfer.labels, fraction, seed)


def _training_ids(cfg: ExperimentConfig, soft: SoftTargets, ids: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """The transfer-set ids this student trains on (None for a streamed source, whose subset is
    decided row by row) and their number, after the checks that need no Ray."""
    s, teaching = cfg.student, cfg.teaching()
    check_classes(s, soft)
    _check_temperature(cfg, soft)
    if soft.source is not None:
        if ids is not None:
            raise ValueError("a streamed source (data.stream) trains students on student.fraction; explicit ids need "
                             "the source in memory")
        rows = soft.source.count(s.fraction if s.fraction < 1 else None, cfg.data.seed, transfer=True)
        if rows == 0:
            raise ValueError("the student's training subset is empty (check data.omit_classes / data.keep_classes)")
        return None, rows
    if teaching != "consistent" and soft.mode == "streaming":
        raise ValueError(f"student.teaching={teaching} reads cached soft targets, but {soft.path} is a "
                         f"streaming-mode cache (no transfer rows): set soft_targets.mode: cached")
    if teaching == "cached_views" and "views" not in soft.datasets:
        raise ValueError(f"student.teaching=cached_views trains on cached views, but {soft.path} has none: "
                         f"set soft_targets.views (e.g. 8)")
    ids = subset_ids(soft, s.fraction, cfg.data.seed) if ids is None else np.asarray(ids, dtype=np.int64)
    ids = ids[np.isin(ids, soft.transfer.ids)]
    if len(ids) == 0:
        raise ValueError("the student's training subset is empty: no requested id is in the transfer set")
    covered = float(soft.manifest.get("views_fraction", 1.0))
    if teaching == "cached_views" and not np.isin(ids, subset_ids(soft, covered, cfg.data.seed)).all():
        raise ValueError(f"the student trains on rows the views cache does not hold ({soft.path} labels "
                         f"soft_targets.views_fraction={covered:g} of the transfer set): raise views_fraction")
    return ids, len(ids)


def _check_temperature(cfg: ExperimentConfig, soft: SoftTargets) -> None:
    """A student whose T differs from the cache's needs kept logits; logit matching needs them too."""
    s, T, teaching = cfg.student, cfg.student_temperature(), cfg.teaching()
    if s.targets == "soft" and s.alpha > 0 and abs(T - soft.temperature) > 1e-12 and not soft.manifest["keep_teacher_logits"]:
        raise ValueError(f"student.temperature={T} differs from the soft targets' {soft.temperature}: "
                         f"set soft_targets.teacher_logits: dense or topk to re-soften")
    keeps = cfg.soft_targets.keeps_logits if teaching == "consistent" else soft.manifest["keep_teacher_logits"]
    if s.targets == "soft" and s.alpha > 0 and s.loss == "logit_matching" and not keeps:
        raise ValueError("student.loss=logit_matching matches the teachers' logits, but the soft targets keep "
                         "none: set soft_targets.teacher_logits: dense or topk")


def distill(cfg: ExperimentConfig, soft: SoftTargets, ids: np.ndarray | None = None,
            fail_after_epoch: int | None = None, callbacks: list | None = None) -> DistillResult:
    """Train one student (``cfg.student``) on ``soft``; resumable, and reused when finished.

    ``ids`` overrides the rows (default: ``student.fraction`` of the transfer set).
    ``fail_after_epoch`` injects a worker failure once, for fault-tolerance tests.
    """
    s, T, teaching = cfg.student, cfg.student_temperature(), cfg.teaching()
    ids, rows = _training_ids(cfg, soft, ids)
    name = run_name(cfg, soft)
    runs = layout.students_dir(layout.experiment_dir(cfg))
    done_path = storage.join(runs, name, "result.json")
    if storage.exists(done_path):
        done = storage.read_json(done_path)
        return DistillResult(done["metrics"], done["checkpoint_path"], pd.DataFrame(done["history"]), name, reused=True)

    s = s.model_copy(update={"epochs": schedule_epochs(s, rows)})  # what the workers train
    # Validation and test rows go to the workers as arrays in the object store: every worker
    # evaluates on all of them (a Ray Data pass per split costs seconds of start-up per run).
    job = StudentJob(student=s, temperature=T, targets_temperature=soft.temperature, rule=soft.manifest["rule"],
                     num_classes=soft.num_classes, input_shape=soft.manifest["input_shape"], teaching=teaching,
                     jitter=cfg.soft_targets.jitter, init_path=init_teacher_path(s, soft),
                     eval={} if soft.source else {split: ray.put(soft.eval_arrays(split)) for split in ("val", "test")},
                     fail_after_epoch=fail_after_epoch, mixed_precision=cfg.runtime.mixed_precision,
                     views=int(soft.manifest.get("views", 0)), view_seed=int(soft.manifest.get("view_seed", 0)))
    datasets = {}
    counter = f"{cfg.name}/{name}"  # this run's teacher passes (consistent teaching)
    if teaching == "consistent":
        # the subset's rows go to the predictor actors once, through the object store; the
        # workers send (epoch, position) rows and get back the view and its soft targets
        job.stream = StreamJob(ray.put(soft.transfer_rows(ids)), ids, cfg.soft_targets, soft.model_paths,
                               [cfg.name, counter])
        pass_counter(counter)
    elif soft.source is not None:  # a streamed source: its rows joined to the cache, val and test too
        for split in ("train", "val", "test"):
            datasets[split] = student_rows(soft.source, soft.path, s.fraction, cfg.data.seed, split)
            datasets[split].context.enable_progress_bars = False
        row_bytes = 4 * int(np.prod(soft.manifest["input_shape"])) + soft.manifest["bytes_per_row"]["train"]
        fits = s.max_in_memory_mb * 1024**2
        job.in_memory = rows * row_bytes / s.num_workers <= fits
        job.eval_in_memory = max(soft.manifest["rows"]["val"], soft.manifest["rows"]["test"]) * row_bytes <= fits
    elif teaching == "cached_views":  # every view of the subset's rows; the worker picks one per epoch
        datasets["train"] = take_ids(soft.datasets["views"], ids).materialize()
        datasets["train"].context.enable_progress_bars = False
    else:
        datasets["train"] = soft.epoch_dataset(0, ids=ids).materialize()
        # A dataset carries the DataContext it was made with into the workers: without progress
        # bars, or every epoch of every worker prints one.
        datasets["train"].context.enable_progress_bars = False
        job.in_memory = datasets["train"].size_bytes() / s.num_workers <= s.max_in_memory_mb * 1024**2
    trainer = _trainer(cfg, job, datasets, soft.mode, name, runs, callbacks)
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Train V2 raises TrainingFailedError when the run fails
        error = e
    if error is not None:
        raise StudentError(f"student run {name} failed: {error}") from None
    teacher_rows = forward_passes(counter).get("train", 0) if teaching == "consistent" else 0
    ckpt_path = result.checkpoint.path if result.checkpoint else ""
    out = _record(done_path, name, job, soft, result.return_value, rows, teacher_rows, ckpt_path)
    track(cfg, "students", name, name, {**s.model_dump(mode="json"), "temperature": T, "teaching": teaching},
          out.history.to_dict(orient="records"), out.metrics)
    return out


def _trainer(cfg: ExperimentConfig, job: StudentJob, datasets: dict, soft_mode: str, name: str, runs: str,
             callbacks: list | None) -> TorchTrainer:
    """The Ray Train run of one student: its workers, GPUs, failure budget and checkpoints."""
    s = job.student
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": job}, datasets=datasets,
        # one worker reads the whole dataset itself (no split-coordinator actor to start)
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if soft_mode == "cached" and s.num_workers > 1 else []),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=student_uses_gpu(cfg)),
        # one worker needs no collective: gloo also runs where the GPUs are logical (tests) or a
        # worker's torch has no CUDA; several GPU workers use NCCL
        torch_config=TorchConfig(backend="gloo") if s.num_workers == 1 else None,
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage.absolute(runs), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )


def _record(done_path: str, name: str, job: StudentJob, soft: SoftTargets, out: dict, rows: int,
            teacher_rows: int, ckpt_path: str) -> DistillResult:
    """The finished run's metrics, written to ``result.json`` (what a rerun, export and serving read)."""
    s, C = job.student, soft.num_classes
    history = pd.DataFrame(out["history"])
    metrics = {**out["final"], "train_rows_total": int(rows), "temperature": job.temperature, "alpha": s.alpha,
               "targets": s.targets, "fraction": s.fraction, "seed": s.seed, "teaching": job.teaching, "init": s.init,
               "epochs": s.epochs, "teacher_rows": int(teacher_rows),
               # teacher forward passes during this run (each row through K teachers)
               "teacher_passes": int(teacher_rows) * len(soft.model_paths),
               "parameters": count_parameters(s.build(soft.manifest["input_shape"], C))}
    storage.write_json(done_path, {"metrics": metrics, "checkpoint_path": ckpt_path,
                                   "history": history.to_dict(orient="records"),
                                   # what export and serving need to rebuild the model
                                   "student": s.model_dump(mode="json"), "input_shape": soft.manifest["input_shape"],
                                   "normalization": soft.manifest.get("normalization", {}), "num_classes": C,
                                   "temperature": job.temperature, "soft_targets": soft.path,
                                   "ensemble": soft.manifest["ensemble"]})
    return DistillResult(metrics, ckpt_path, history, name)

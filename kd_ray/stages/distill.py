"""Stage 3, the driver: distil one student.

:func:`distill` picks the rows (a nested stratified fraction of the transfer set), names the run
deterministically (so running again resumes, and a finished run is read back instead of
retrained), builds the typed :class:`~kd_ray.stages.student_worker.StudentJob` and runs
:func:`~kd_ray.stages.student_worker.run_student` where the student's workers are:

* one worker (``student.light``): in this process when it is a Tune trial (``report`` given), else
  in one Ray task holding the student's CPU or GPU -- no Ray Train start-up, checkpoints under
  ``<run>/checkpoint/`` on storage, resumed from there when a failed attempt is retried;
* several workers (or ``student.trainer: torch_trainer``): a TorchTrainer (DDP).

It returns the final metrics, the checkpoint path and the per-epoch history.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pandas as pd
import ray
import ray.data
import ray.train
import ray.train.torch
from ray.train.torch import TorchConfig, TorchTrainer

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.config import (
    ExperimentConfig,
    StudentConfig,
)
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.core.models import count_parameters
from kd_ray.core.plan import StudentPlan, digest, plan_student, student_identity
from kd_ray.core.student_losses import loss_class
from kd_ray.core.subsets import select_fraction
from kd_ray.core.train import (
    schedule_epochs,
)
from kd_ray.stages.cluster import student_uses_gpu
from kd_ray.stages.counters import forward_passes, pass_counter
from kd_ray.stages.progress import Heartbeat
from kd_ray.stages.soft_targets import (
    SoftTargets,
    take_ids,
)
from kd_ray.stages.streamed_targets import student_rows, student_views
from kd_ray.stages.student_worker import LightSeam, StreamJob, StudentJob, run_student, train_loop_per_worker
from kd_ray.stages.tracking import LiveTracker


class StudentError(RuntimeError):
    pass


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


def run_name(plan: StudentPlan, soft: SoftTargets) -> str:
    """A student run's folder: readable settings and the digest of its identity (:func:`plan.student_identity`)."""
    s = plan.student
    key = digest(student_identity(plan, soft.manifest["fingerprint"]), 10)
    init = "" if s.init == "scratch" else f"from-{s.init}-"
    return (f"student-{s.targets}-{plan.teaching.name}-{init}f{s.fraction:g}-T{plan.temperature:g}-a{s.alpha:g}"
            f"-e{s.epochs}-s{s.seed}-{key}")


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


def _training_ids(plan: StudentPlan, soft: SoftTargets, ids: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """The transfer-set ids this student trains on (None for a streamed source, whose subset is
    decided row by row) and their number, after the checks that need no Ray."""
    s, mode = plan.student, plan.teaching
    check_classes(s, soft)
    _check_targets(plan, soft)
    if soft.source is not None:
        if ids is not None:
            raise ValueError("a streamed source (data.stream) trains students on student.fraction; explicit ids need "
                             "the source in memory")
        rows = soft.source.count(s.fraction if s.fraction < 1 else None, plan.data_seed, transfer=True)
        if rows == 0:
            raise ValueError("the student's training subset is empty (check data.omit_classes / data.keep_classes)")
        return None, rows
    if mode.split == "views" and not soft.manifest["files"].get("views"):
        raise ValueError(f"student.teaching={mode.name} trains on cached views, but {soft.path} has none: "
                         f"set soft_targets.views (e.g. 8)")
    ids = subset_ids(soft, s.fraction, plan.data_seed) if ids is None else np.asarray(ids, dtype=np.int64)
    ids = ids[np.isin(ids, soft.transfer.ids)]
    if len(ids) == 0:
        raise ValueError("the student's training subset is empty: no requested id is in the transfer set")
    covered = float(soft.manifest.get("views_fraction", 1.0))
    if mode.split == "views" and not np.isin(ids, subset_ids(soft, covered, plan.data_seed)).all():
        raise ValueError(f"the student trains on rows the views cache does not hold ({soft.path} labels "
                         f"soft_targets.views_fraction={covered:g} of the transfer set): raise views_fraction")
    return ids, len(ids)


def _check_targets(plan: StudentPlan, soft: SoftTargets) -> None:
    """A student whose T differs from the cache's needs kept logits, as does a loss that reads them."""
    s, T = plan.student, plan.temperature
    keeps = soft.manifest["teacher_logits"] != "none"
    if plan.soft and abs(T - soft.temperature) > 1e-12 and not keeps:
        raise ValueError(f"student.temperature={T} differs from the soft targets' {soft.temperature}: "
                         f"set soft_targets.teacher_logits: dense or topk to re-soften")
    if plan.soft and loss_class(s.loss).reads == "teacher_logits" and not keeps:
        raise ValueError(f"student.loss={s.loss} reads the teachers' logits, but the soft targets keep "
                         f"none: set soft_targets.teacher_logits: dense or topk")


def distill(cfg: ExperimentConfig, soft: SoftTargets, ids: np.ndarray | None = None,
            fail_after_epoch: int | None = None, callbacks: list | None = None,
            report: Callable[[dict], None] | None = None) -> DistillResult:
    """Train one student (``cfg.student``) on ``soft``; resumable, and reused when finished.

    ``ids`` overrides the rows (default: ``student.fraction`` of the transfer set).
    ``fail_after_epoch`` injects a worker failure once, for fault-tolerance tests.
    ``report``: this process is a Tune trial; a one-worker student trains here and every
    validation goes to ``report``. ``callbacks``: Train callbacks of a TorchTrainer run.
    """
    plan = plan_student(cfg)
    s = plan.student
    ids, rows = _training_ids(plan, soft, ids)
    name = run_name(plan, soft)
    runs = layout.students_dir(layout.experiment_dir(cfg))
    done_path = storage.join(runs, name, "result.json")
    if storage.exists(done_path):
        done = storage.read_json(done_path)
        return DistillResult(done["metrics"], done["checkpoint_path"], pd.DataFrame(done["history"]), name, reused=True)

    s = s.model_copy(update={"epochs": schedule_epochs(s, rows)})  # what the workers train
    plan = replace(plan, student=s)
    # Validation and test rows go to the workers as arrays in the object store: every worker
    # evaluates on all of them (a Ray Data pass per split costs seconds of start-up per run).
    job = StudentJob(plan=plan, targets_temperature=soft.temperature, rule=soft.manifest["rule"],
                     num_classes=soft.num_classes, input_shape=soft.manifest["input_shape"],
                     init_path=init_teacher_path(s, soft),
                     eval={} if soft.source else {split: ray.put(soft.eval_arrays(split)) for split in ("val", "test")},
                     fail_after_epoch=fail_after_epoch, mixed_precision=cfg.runtime.mixed_precision,
                     views=int(soft.manifest.get("views", 0)), view_seed=int(soft.manifest.get("view_seed", 0)))
    counter = f"{cfg.name}/{name}"  # this run's teacher passes (consistent teaching)
    datasets = _training_data(cfg, soft, job, ids, rows, counter)
    tracker = LiveTracker(cfg, "students", name, name, s.model_dump(mode="json"))
    if s.light:
        ckpt_path = storage.join(runs, name, "checkpoint")
        seam = LightSeam(ckpt_path, datasets, _Reporter(tracker, report))
        out = _run_light(job, seam, name, use_gpu=student_uses_gpu(cfg), in_process=report is not None)
    else:
        out, ckpt_path = _run_trainer(_trainer(cfg, job, datasets, name, runs, callbacks), name)
    teacher_rows = forward_passes(counter).get("train", 0) if plan.teaching.teacher_passes else 0
    result = _record(done_path, name, job, soft, out, rows, teacher_rows, ckpt_path)
    if not s.light:  # a light run logged every validation as it came
        for row in result.history.to_dict(orient="records"):
            tracker.log(row)
    tracker.finish(result.metrics)
    return result


@dataclass
class _Reporter:
    """A light run's reports: to the live tracker and, in a Tune trial, to Tune (without the
    ``final`` flag: the trial reports its final row itself once its record is written)."""

    tracker: LiveTracker
    tune_report: Callable[[dict], None] | None

    def __call__(self, metrics: dict) -> None:
        if not metrics.get("final"):
            self.tracker.log(metrics)
        if self.tune_report is not None:
            self.tune_report({k: v for k, v in metrics.items() if k != "final"})


def _run_light(job: StudentJob, seam: LightSeam, name: str, use_gpu: bool, in_process: bool) -> dict:
    """One worker: here (a Tune trial holds its resources), or in a Ray task holding a CPU or GPU
    that Ray retries up to ``student.max_failures`` times (each try resumes from the checkpoint)."""
    if in_process:
        return run_student(job, seam)
    task = ray.remote(run_student).options(num_cpus=job.cpus_per_worker, num_gpus=1 if use_gpu else 0,
                                           max_retries=job.student.max_failures, retry_exceptions=True)
    ref, heart = task.remote(job, seam), Heartbeat("student", 1)
    heart.running = {name: ""}
    try:
        while not ray.wait([ref], timeout=5.0)[0]:  # a line a minute while it trains
            heart.beat()
        return ray.get(ref)
    except Exception as e:  # the task's error after its retries
        raise StudentError(f"student run {name} failed: {str(e).strip().splitlines()[-1]}") from None


def _run_trainer(trainer: TorchTrainer, name: str) -> tuple[dict, str]:
    """A TorchTrainer run: rank 0's return value and the last checkpoint's path."""
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Train V2 raises TrainingFailedError when the run fails
        error = e
    if error is not None:
        raise StudentError(f"student run {name} failed: {error}") from None
    return result.return_value, result.checkpoint.path if result.checkpoint else ""


def _training_data(cfg: ExperimentConfig, soft: SoftTargets, job: StudentJob, ids: np.ndarray, rows: int,
                   counter: str) -> dict:
    """The Ray Datasets the workers read for ``job`` (setting where its rows come from): the
    consistent-teaching stream, a streamed source joined to its cache, every stored view of the
    subset's rows, or the cached subset."""
    s, mode, datasets = job.student, job.plan.teaching, {}
    if soft.source is not None:  # a streamed source: its rows joined to the cache, val and test too
        for split in ("val", "test"):
            datasets[split] = student_rows(soft.source, soft.path, s.fraction, cfg.data.seed, split)
        if mode.split == "views":  # each row with all V views' targets; the worker keeps one per epoch
            datasets["train"] = student_views(soft.source, soft.path, job.views, s.fraction, cfg.data.seed)
            job.views_axis = True
        elif mode.view != "stream":
            datasets["train"] = student_rows(soft.source, soft.path, s.fraction, cfg.data.seed, "train")
        for ds in datasets.values():
            ds.context.enable_progress_bars = False
        per_row = soft.manifest["bytes_per_row"]["views"] * job.views if job.views_axis else \
            soft.manifest["bytes_per_row"]["train"]
        row_bytes = 4 * int(np.prod(soft.manifest["input_shape"])) + per_row
        fits = s.max_in_memory_mb * 1024**2
        job.in_memory = rows * row_bytes / s.num_workers <= fits
        job.eval_in_memory = max(soft.manifest["rows"]["val"], soft.manifest["rows"]["test"]) * row_bytes <= fits
    if mode.view == "stream":
        # the subset's rows go to the predictor actors once, through the object store (a streamed
        # source's: read from its files every epoch); the workers get back each view and its targets
        rows_ref = None if soft.source is not None else ray.put(soft.transfer_rows(ids))
        job.stream = StreamJob(rows_ref, ids, cfg.soft_targets, soft.model_paths, [cfg.name, counter],
                               source=soft.source.plain() if soft.source is not None else None,
                               fraction=s.fraction, data_seed=cfg.data.seed)
        pass_counter(counter)
    if mode.view == "stream" or soft.source is not None:
        return datasets
    if s.light and soft.rows_fit(mode.split, s.max_in_memory_mb):
        # the rows as arrays, with the job: no Ray Data execution (a sweep's driver read them once)
        job.train_arrays = soft.train_arrays(mode.split, ids)
    elif mode.split == "views":  # every view of the subset's rows; the worker picks one per epoch
        datasets["train"] = take_ids(soft.datasets["views"], ids).materialize()
        datasets["train"].context.enable_progress_bars = False
    else:
        datasets["train"] = soft.cached_rows(ids).materialize()
        # A dataset carries the DataContext it was made with into the workers: without progress
        # bars, or every epoch of every worker prints one.
        datasets["train"].context.enable_progress_bars = False
        job.in_memory = datasets["train"].size_bytes() / s.num_workers <= s.max_in_memory_mb * 1024**2
    return datasets


def _trainer(cfg: ExperimentConfig, job: StudentJob, datasets: dict, name: str, runs: str,
             callbacks: list | None) -> TorchTrainer:
    """The Ray Train run of one student: its workers, GPUs, failure budget and checkpoints."""
    s = job.student
    return TorchTrainer(
        train_loop_per_worker, train_loop_config={"job": job}, datasets=datasets,
        # one worker reads the whole dataset itself (no split-coordinator actor to start)
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if "train" in datasets and s.num_workers > 1 else []),
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
    metrics = {**out["final"], "train_rows_total": int(rows), "temperature": job.plan.temperature, "alpha": s.alpha,
               "targets": s.targets, "fraction": s.fraction, "seed": s.seed, "teaching": s.teaching, "init": s.init,
               "loss": s.loss, "loss_args": job.plan.loss_args,
               "epochs": s.epochs, "teacher_rows": int(teacher_rows),
               # teacher forward passes during this run (each row through K teachers)
               "teacher_passes": int(teacher_rows) * len(soft.model_paths),
               "parameters": count_parameters(s.build(soft.manifest["input_shape"], C, weights=False))}
    storage.write_json(done_path, {"metrics": metrics, "checkpoint_path": ckpt_path,
                                   "history": history.to_dict(orient="records"),
                                   # what export and serving need to rebuild the model
                                   "student": s.model_dump(mode="json"), "input_shape": soft.manifest["input_shape"],
                                   "normalization": soft.manifest.get("normalization", {}), "num_classes": C,
                                   "temperature": job.plan.temperature, "soft_targets": soft.path,
                                   "ensemble": soft.manifest["ensemble"],
                                   "environment": out.get("environment")})  # where it trained (rank 0)
    return DistillResult(metrics, ckpt_path, history, name)

"""Stage 3: distil one student with Ray Train (TorchTrainer).

* :func:`train_loop_per_worker` runs on every Train worker: it builds the student, reads its
  shard of the soft-target rows, trains with :func:`kd_ray.losses.kd_loss` (soft, hard, or
  mixed by alpha; re-softening stored teacher logits when the student's T differs from the
  cache's), evaluates on the validation set every epoch, checkpoints every epoch (reported
  with the metrics) and resumes from ``ray.train.get_checkpoint()``.
* :func:`distill` is the driver: it picks the rows (a nested stratified fraction of the
  transfer set), names the run deterministically (so running again resumes, and a finished
  run is read back instead of retrained), launches the TorchTrainer and returns the final
  metrics, the checkpoint path and the per-epoch history as a DataFrame.
* :func:`bias_adjustment` is the paper's omitted-class fix (section 3), pure torch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from kd_ray import storage
from kd_ray.config import ExperimentConfig, StudentConfig
from kd_ray.data import select_fraction
from kd_ray.losses import kd_loss, mixed_labels, resoften
from kd_ray.models import build_model, count_parameters
from kd_ray.augment import seeded_shift
from kd_ray.soft_targets import (SoftTargets, consistent_stream, forward_passes, load_teacher_files, pass_counter,
                                 worker_share)
from kd_ray.teachers import make_optimizer, make_scheduler


class StudentError(RuntimeError):
    pass


# A consistent-teaching worker iterates its stream itself, so Ray Data's scheduling thread runs
# in the worker's process. When the teachers produce faster than the student trains (bfloat16
# teachers), every predictor task ends up backpressured, and that loop then spins with nothing
# to wait on, holding the GIL ~30 % of the time (py-spy --gil); each torch call of the training
# thread waits up to Python's 5 ms switch interval to get it back. A 0.1 ms interval hands it
# back sooner (docs/consistent_teaching.md, "80,000 steps with bfloat16 teachers").
STREAM_SWITCH_INTERVAL_S = 1e-4


# --------------------------------------------------------------------------- pure helpers
@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device) -> dict[str, float]:
    """Accuracy, error count, NLL and fidelity (top-1 agreement with the ensemble)."""
    model.eval()
    n = correct = agree = 0
    nll = 0.0
    for b in batches:
        logits = model(b["image"].to(device)).float()
        y = b["label"].to(device)
        pred = logits.argmax(1)
        n += len(y)
        correct += int((pred == y).sum())
        agree += int((pred == b["ensemble_pred"].to(device)).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    if n == 0:
        return {"accuracy": float("nan"), "errors": 0, "nll": float("nan"), "fidelity": float("nan"), "n": 0}
    return {"accuracy": correct / n, "errors": n - correct, "nll": nll / n, "fidelity": agree / n, "n": n}


def bias_adjustment(val_logits: torch.Tensor, val_labels: torch.Tensor, cls: int,
                    grid: np.ndarray | None = None) -> float:
    """The delta added to class ``cls``'s logit (output bias) that maximises validation accuracy
    (ties: the smallest |delta|)."""
    grid = np.round(np.arange(-2.0, 20.0001, 0.25), 4) if grid is None else grid
    best, best_acc = 0.0, -1.0
    for d in sorted(grid, key=abs):
        z = val_logits.clone()
        z[:, cls] += float(d)
        acc = float((z.argmax(1) == val_labels).float().mean())
        if acc > best_acc + 1e-12:
            best, best_acc = float(d), acc
    return best


class EpochStream:
    """Cuts one ordered stream of numpy blocks spanning several epochs (an ``epoch`` column, not
    decreasing) into each epoch's batches of ``batch_size`` rows (an epoch's last may be short),
    as tensors on ``device``. Consistent teaching streams all epochs through one dataset."""

    def __init__(self, blocks, batch_size: int, device="cpu"):
        self._blocks, self._head = iter(blocks), None
        self.batch_size, self.device = batch_size, device

    def epoch(self, e: int):
        pending: dict[str, np.ndarray] | None = None
        while True:
            if self._head is None:
                self._head = next(self._blocks, None)
                if self._head is None:
                    break
            block = self._head
            ep = block["epoch"]
            j = int(np.searchsorted(ep, e, side="left"))  # rows of an epoch left early: skipped
            k = int(np.searchsorted(ep, e, side="right"))
            self._head = {c: v[k:] for c, v in block.items()} if k < len(ep) else None
            if j == k and k < len(ep):
                break  # the next epoch's rows
            part = {c: v[j:k] for c, v in block.items()}
            pending = part if pending is None else {c: np.concatenate([pending[c], part[c]]) for c in part}
            while len(pending["epoch"]) >= self.batch_size:
                yield self._tensors({c: v[:self.batch_size] for c, v in pending.items()})
                pending = {c: v[self.batch_size:] for c, v in pending.items()}
        if pending is not None and len(pending["epoch"]):
            yield self._tensors(pending)

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {c: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for c, v in batch.items()}


def _targets(batch: dict, T: float, cache_T: float, rule: str) -> torch.Tensor:
    """Soft targets at the student's T: the cached column, or re-softened stored logits."""
    if abs(T - cache_T) < 1e-12:
        return batch["soft_targets"]
    if "teacher_logits" not in batch:
        raise StudentError(f"student.temperature={T} differs from the soft targets' T={cache_T} and the "
                           f"cache has no teacher_logits; set soft_targets.keep_teacher_logits: true")
    return resoften(batch["teacher_logits"], T, rule)


# --------------------------------------------------------------------------- the Train loop
def train_loop_per_worker(config: dict) -> dict:
    import ray.data
    import ray.train
    import ray.train.torch

    # Per-epoch iteration bars from every worker drown the output; Train and Tune report
    # epochs. (Datasets made here, in streaming mode, use this context.)
    ray.data.DataContext.get_current().enable_progress_bars = False
    s = StudentConfig(**config["student"])
    T, alpha = config["temperature"], (0.0 if s.targets == "hard" else s.alpha)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    torch.manual_seed(s.seed)
    model = build_model(s.model, config["input_shape"], config["num_classes"], **s.model_args)
    if config.get("init_path"):  # student.init: teacher (a resumed run's checkpoint overrides it below)
        model.load_state_dict(load_teacher_files([config["init_path"]])[0].blob["state_dict"])
    opt = make_optimizer(model.parameters(), s)
    sched = make_scheduler(opt, s)
    start_epoch, history, best = 0, [], {"val_accuracy": -1.0, "epoch": 0, "state": None}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "student.pt"), map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        best = {"val_accuracy": state["best_val_accuracy"], "epoch": state["best_epoch"], "state": state["best_model"]}
    model = ray.train.torch.prepare_model(model)  # device move; DDP when world > 1
    plain = model.module if hasattr(model, "module") else model

    teaching, jitter = config["teaching"], config["jitter"]
    stream = config.get("stream")
    train_shard = None if stream else ray.train.get_dataset_shard("train")
    if stream:  # consistent teaching: every remaining epoch through one predictor pool
        sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
        ds = consistent_stream(stream["rows"], worker_share(stream["ids"], rank, world), stream["cfg"],
                               stream["paths"], range(start_epoch, s.epochs), s.seed, stream["counters"])
        epochs = EpochStream(ds.iter_batches(batch_size=None, batch_format="numpy"), s.batch_size, device)
    # A cached shard that fits student.max_in_memory_mb is read once into tensors: iterating it
    # with Ray Data every epoch ran at 0.78 of a plain loop's speed, in memory at 1.00 (bench_distill).
    in_memory = _read_shard(train_shard, device) if train_shard is not None and config.get("in_memory") else None
    # validation rows come as arrays from the object store, kept as tensors for every epoch
    val_rows = eval_batches(ray.get(config["eval"]["val"]), device)
    batch_kw = dict(batch_size=s.batch_size, device=device)
    patience = s.early_stopping_patience
    stopped = False
    last_seen = last_sample = None  # the last epoch's row ids and first batch, kept in the final checkpoint too
    t_report = time.time()  # a history row's seconds: training and validation since the last report
    for epoch in range(start_epoch, s.epochs):
        model.train()
        if stream:  # a fresh augmented view, labelled by the teachers; this worker's share
            batches = epochs.epoch(epoch)
        elif in_memory is not None:  # the shard, read once, reshuffled every epoch
            batches = shuffled_batches(in_memory, s.batch_size, s.seed * 1000 + epoch)
        else:
            batches = train_shard.iter_torch_batches(**batch_kw, local_shuffle_buffer_size=4096,
                                                     local_shuffle_seed=s.seed * 1000 + epoch)
        n = correct = 0
        loss_sum = torch.zeros((), device=device)
        seen, sample = [], None
        for b in batches:
            if teaching == "inconsistent":  # the student alone sees the shifted view
                b["image"] = seeded_shift(b["image"], b["id"], jitter, s.seed, epoch)
            if sample is None:  # the epoch's first batch, kept in the final checkpoint
                sample = {k: b[k].cpu().numpy() for k in ("id", "image", "soft_targets", "mix_weight") if k in b}
            logits = model(b["image"])
            soft = _targets(b, T, config["cache_temperature"], config["rule"]) if alpha > 0 else None
            labels = (mixed_labels(b["label"], b["mix_label"], b["mix_weight"], config["num_classes"])
                      if "mix_weight" in b else b["label"])  # a mixed image's hard label is mixed too
            loss, _ = kd_loss(logits, soft, labels, T, alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(logits)
            n += len(logits)
            correct += int((logits.argmax(1) == b["label"]).sum())
            seen.append(b["id"].cpu().numpy())
        sched.step()
        train_loss = float(loss_sum) / max(n, 1)
        if not math.isfinite(train_loss):
            raise StudentError(f"student loss became {train_loss} in epoch {epoch + 1}; lower student.lr "
                               f"(now {s.lr}). The last good checkpoint (epoch {epoch}) is kept.")
        last_seen = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        last_sample = sample
        if (epoch + 1) % s.report_every and epoch + 1 < s.epochs:
            continue  # validation, report and checkpoint every student.report_every epochs
        val = evaluate(plain, val_rows, device)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": correct / max(n, 1),
               "train_rows": n, **{f"val_{k}": v for k, v in val.items()},
               "resumed_from": start_epoch, "seconds": time.time() - t_report}
        t_report = time.time()
        history.append(row)
        if val["accuracy"] > best["val_accuracy"]:
            # the best weights are kept (and checkpointed) only when early stopping will use them
            best = {"val_accuracy": val["accuracy"], "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in plain.state_dict().items()}
                    if patience is not None else None}
        stopped = patience is not None and epoch + 1 - best["epoch"] >= patience
        _report(row, plain, opt, sched, epoch + 1, history, best, rank, last_seen, sample)
        if config.get("fail_after_epoch") == epoch + 1 and start_epoch == 0:
            raise RuntimeError(f"injected failure after epoch {epoch + 1} (fault-injection test)")
        if stopped:
            break

    # the final model: the best on validation (early stopping) or the last epoch
    if patience is not None and best["state"] is not None:
        plain.load_state_dict(best["state"])
    final = {"epoch": history[-1]["epoch"] if history else 0, "best_epoch": best["epoch"], "final": True,
             **{k: v for k, v in history[-1].items() if k.startswith(("val_", "train_"))}}
    if patience is not None:
        val = evaluate(plain, val_rows, device)
        final.update({f"val_{k}": v for k, v in val.items()})
    test = evaluate(plain, eval_batches(ray.get(config["eval"]["test"]), device), device)
    final.update({f"test_{k}": v for k, v in test.items()})
    _report(final, plain, opt, sched, final["epoch"], history, best, rank, last_seen, last_sample)
    return {"history": history, "final": final}


def _read_shard(shard, device) -> dict[str, torch.Tensor]:
    """Every row of a Ray Data shard as one tensor per column (numeric columns only)."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in shard.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: torch.from_numpy(np.ascontiguousarray(np.concatenate(v))).to(device) for k, v in parts.items()}


def shuffled_batches(rows: dict[str, torch.Tensor], batch_size: int, seed: int):
    """One epoch over in-memory rows: a seeded permutation cut into batches (the last may be short)."""
    n = len(rows["id"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size].to(rows["id"].device)
        yield {k: v[idx] for k, v in rows.items()}


def eval_batches(cols: dict[str, np.ndarray], device, size: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Evaluation columns cut into batches for :func:`evaluate` (one batch of a whole split would
    hold every image's conv activations at once)."""
    return [{k: torch.from_numpy(np.ascontiguousarray(v[i:i + size])).to(device) for k, v in cols.items()}
            for i in range(0, len(cols["label"]), size)]


def _report(metrics: dict, model, opt, sched, epoch: int, history: list, best: dict, rank: int, seen_ids,
            sample: dict | None = None) -> None:
    """A checkpoint with every report: rank 0 saves the model; every rank the ids of its rows
    and the epoch's first batch as trained on (image after augmentation, soft targets)."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        if rank == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch, "history": history, "best_val_accuracy": best["val_accuracy"],
                        "best_epoch": best["epoch"], "best_model": best["state"]}, os.path.join(d, "student.pt"))
        if seen_ids is not None:
            np.save(os.path.join(d, f"rows_rank{rank}.npy"), seen_ids)
        if sample is not None:
            np.savez(os.path.join(d, f"first_batch_rank{rank}.npz"), **sample)
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))


# --------------------------------------------------------------------------- the driver
@dataclass
class DistillResult:
    metrics: dict[str, Any]  # final: val_* and test_* (accuracy, errors, nll, fidelity), epochs
    checkpoint_path: str
    history: pd.DataFrame  # one row per epoch
    run_name: str
    reused: bool = False


def run_name(cfg: ExperimentConfig, soft: SoftTargets, T: float) -> str:
    s = cfg.student
    teaching = teaching_mode(cfg, soft)
    key = {"student": s.identity(), "T": T, "soft": soft.manifest["fingerprint"],
           "data_seed": cfg.data.seed, "teaching": teaching,
           "jitter": cfg.soft_targets.jitter if teaching != "cached" else 0}
    if teaching == "consistent" and cfg.soft_targets.mixup > 0:
        key["mixup"] = cfg.soft_targets.mixup
    key = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    mode = ("" if teaching == "cached" else f"{teaching}-") + ("" if s.init == "scratch" else f"from-{s.init}-")
    return f"student-{s.targets}-{mode}f{s.fraction:g}-T{T:g}-a{s.alpha:g}-e{s.epochs}-s{s.seed}-{digest}"


def teaching_mode(cfg: ExperimentConfig, soft: SoftTargets) -> str:
    """How this student meets augmentation (StudentConfig.teaching). A hard-label student needs
    no teachers: with cached rows its "consistent" views are the in-worker shifts."""
    mode = cfg.teaching()
    if mode == "consistent" and cfg.student.targets == "hard" and soft.mode == "cached":
        return "inconsistent"
    if mode != "consistent" and soft.mode == "streaming":
        raise ValueError(f"student.teaching={mode} reads cached soft targets, but {soft.path} is a streaming-mode "
                         f"cache (no transfer rows): set soft_targets.mode: cached")
    return mode


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


def uses_gpu(s: StudentConfig) -> bool:
    """GPU Train workers: as configured, else only when this process's torch sees CUDA."""
    return s.use_gpu if s.use_gpu is not None else torch.cuda.is_available()


def schedule_epochs(s: StudentConfig, rows: int) -> int:
    """Epochs a run on ``rows`` rows trains: ``student.epochs``, or more when ``student.min_steps``
    asks for more optimizer steps than that gives (each worker steps over its share)."""
    if s.min_steps is None:
        return s.epochs
    steps_per_epoch = math.ceil(math.ceil(rows / s.num_workers) / s.batch_size)
    return max(s.epochs, math.ceil(s.min_steps / steps_per_epoch))


def subset_ids(soft: SoftTargets, fraction: float, seed: int) -> np.ndarray:
    """The transfer-set ids a run at ``fraction`` trains on (nested, stratified)."""
    return select_fraction(soft.transfer.ids, soft.transfer.labels, fraction, seed)


def distill(cfg: ExperimentConfig, soft: SoftTargets, ids: np.ndarray | None = None,
            fail_after_epoch: int | None = None, callbacks: list | None = None) -> DistillResult:
    """Train one student (``cfg.student``) on ``soft``; resumable, and reused when finished.

    ``ids`` overrides the rows (default: ``student.fraction`` of the transfer set).
    ``fail_after_epoch`` injects a worker failure once, for fault-tolerance tests.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    s = cfg.student
    T = s.temperature or soft.temperature
    C = soft.num_classes
    check_classes(s, soft)
    ids = subset_ids(soft, s.fraction, cfg.data.seed) if ids is None else np.asarray(ids, dtype=np.int64)
    ids = ids[np.isin(ids, soft.transfer.ids)]
    if len(ids) == 0:
        raise ValueError("the student's training subset is empty: no requested id is in the transfer set")
    if s.targets == "soft" and s.alpha > 0 and abs(T - soft.temperature) > 1e-12 and not soft.manifest["keep_teacher_logits"]:
        raise ValueError(f"student.temperature={T} differs from the soft targets' {soft.temperature}: "
                         f"set soft_targets.keep_teacher_logits: true to re-soften")
    name = run_name(cfg, soft, T)
    runs = storage.join(cfg.runtime.storage_path, cfg.name, "students")
    done_path = storage.join(runs, name, "result.json")
    if storage.exists(done_path):
        done = storage.read_json(done_path)
        return DistillResult(done["metrics"], done["checkpoint_path"], pd.DataFrame(done["history"]), name, reused=True)

    use_gpu = uses_gpu(s)
    teaching = teaching_mode(cfg, soft)
    s = s.model_copy(update={"epochs": schedule_epochs(s, len(ids))})  # what the workers train
    config = {"student": s.model_dump(mode="json"), "temperature": T, "cache_temperature": soft.temperature,
              "rule": soft.manifest["rule"], "num_classes": C, "input_shape": soft.manifest["input_shape"],
              "fail_after_epoch": fail_after_epoch, "cpus_per_worker": 1, "teaching": teaching,
              "jitter": cfg.soft_targets.jitter, "init_path": init_teacher_path(s, soft)}
    # Validation and test rows go to the workers as arrays in the object store: every worker
    # evaluates on all of them, and a Ray Data pass per split would cost seconds of start-up
    # per run. The training rows are a Ray Dataset, materialized once (epochs iterate blocks).
    config["eval"] = {split: ray.put(soft.eval_arrays(split)) for split in ("val", "test")}
    datasets = {}
    counter = f"{cfg.name}/{name}"  # this run's teacher passes (consistent teaching)
    if teaching == "consistent":
        # the subset's rows go to the predictor actors once, through the object store; the
        # workers send (epoch, position) rows and get back the view and its soft targets
        config["stream"] = {"rows": ray.put(soft.transfer_rows(ids)), "ids": ids, "cfg": cfg,
                            "paths": soft.model_paths, "counters": [cfg.name, counter]}
        pass_counter(counter)
    else:
        datasets["train"] = soft.epoch_dataset(0, ids=ids).materialize()
        # A dataset carries the DataContext it was made with into the workers: without progress
        # bars, or every epoch of every worker prints one (on small data the bars cost more than
        # the epoch itself: 2.75 s -> 0.17 s per epoch for 126 rows, measured).
        datasets["train"].context.enable_progress_bars = False
        config["in_memory"] = datasets["train"].size_bytes() / s.num_workers <= s.max_in_memory_mb * 1024**2
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config, datasets=datasets,
        # one worker reads the whole dataset itself (no split-coordinator actor to start)
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train"] if soft.mode == "cached" and s.num_workers > 1 else []),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage.absolute(runs), callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
        error = result.error
    except Exception as e:  # Train V2 raises TrainingFailedError when the run fails
        error = e
    if error is not None:
        raise StudentError(f"student run {name} failed: {error}") from None
    out = result.return_value
    history = pd.DataFrame(out["history"])
    teacher_rows = forward_passes(counter).get("train", 0) if teaching == "consistent" else 0
    metrics = {**out["final"], "train_rows_total": int(len(ids)), "temperature": T, "alpha": s.alpha,
               "targets": s.targets, "fraction": s.fraction, "seed": s.seed, "teaching": teaching, "init": s.init,
               "epochs": s.epochs, "teacher_rows": int(teacher_rows),
               # teacher forward passes during this run (each row through K teachers)
               "teacher_passes": int(teacher_rows) * len(soft.model_paths),
               "parameters": count_parameters(build_model(s.model, soft.manifest["input_shape"], C, **s.model_args))}
    ckpt_path = result.checkpoint.path if result.checkpoint else ""
    storage.write_json(done_path, {"metrics": metrics, "checkpoint_path": ckpt_path,
                                   "history": history.to_dict(orient="records"),
                                   # what export and serving need to rebuild the model
                                   "student": s.model_dump(mode="json"), "input_shape": soft.manifest["input_shape"],
                                   "normalization": soft.manifest.get("normalization", {}), "num_classes": C, "temperature": T, "soft_targets": soft.path,
                                   "ensemble": soft.manifest["ensemble"]})
    return DistillResult(metrics, ckpt_path, history, name)


def load_student(checkpoint_path: str, soft: SoftTargets, s: StudentConfig) -> torch.nn.Module:
    state = storage.load_torch(storage.join(checkpoint_path, "student.pt"))
    model = build_model(s.model, soft.manifest["input_shape"], soft.num_classes, **s.model_args)
    model.load_state_dict(state["model"])
    return model.eval()


def omitted_class_report(cfg: ExperimentConfig, soft: SoftTargets, result: DistillResult) -> dict:
    """The paper's bias adjustment for the one class left out of the transfer set."""
    if len(cfg.data.omit_classes) != 1:
        raise ValueError("the omitted-class report needs exactly one class in data.omit_classes")
    c = int(cfg.data.omit_classes[0])
    model = load_student(result.checkpoint_path, soft, cfg.student)
    def logits_of(split: str):
        cols = soft.eval_arrays(split)
        with torch.no_grad():
            return model(torch.from_numpy(cols["image"])), torch.from_numpy(cols["label"])

    zv, yv = logits_of("val")
    zt, yt = logits_of("test")
    delta = bias_adjustment(zv, yv, c)

    def errors(z, y, d):
        z = z.clone()
        z[:, c] += d
        wrong = z.argmax(1) != y
        return int(wrong.sum()), int((wrong & (y == c)).sum()), int((y == c).sum())

    before, after = errors(zt, yt, 0.0), errors(zt, yt, delta)
    return {"class": c, "delta": delta, "test_errors_before": before[0], "test_errors_after": after[0],
            "class_errors_before": before[1], "class_errors_after": after[1], "class_count": before[2]}

"""THE training engine (no Ray): one epoch loop for teachers, students, analysis scripts and the
benchmarks' plain baselines.

A run is a model, an optimiser and schedule built from a spec (a ``TeacherSpec`` or a
``StudentConfig``: both carry optimizer, lr, momentum, weight_decay, schedule, epochs and
grad_clip_norm), a loss ``loss_fn(model, batch) -> (loss, logits)`` and, per epoch, an iterable of
batches (dicts of tensors with at least ``label``). :class:`Engine` runs the epochs, clips the
gradient norm, validates every ``report_every`` epochs, tracks the best validation epoch, stops
early, stops at a non-finite loss (:class:`Diverged`) and hands every report to a callback that
checkpoints it; :meth:`Engine.state_dict` resumes a run where it stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from kd_ray.core.augment import random_shift
from kd_ray.core.losses import (
    dense_from_top_k,
    mixed_labels,
    resoften,
)
from kd_ray.core.models import constrained
from kd_ray.core.schema import TEACHER_LOGIT_COLUMNS
from kd_ray.core.student_losses import Loss, Targets

Batch = dict[str, torch.Tensor]
# (model, batch) -> (loss, logits, its terms by name, detached: each logged as train_<term>)
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; ``epoch`` is the 1-based epoch it happened in."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"the training loss became {loss} in epoch {epoch}")
        self.epoch, self.loss = epoch, loss


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor, sharing its memory when it is writable and contiguous; a copy
    otherwise (arrays from Ray's object store and Arrow are read-only)."""
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))


def pick_device() -> torch.device:
    """CUDA when torch really sees a GPU (Ray may hand out logical GPUs torch cannot see)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``runtime.mixed_precision`` on ``device``: "auto" is bf16 on CUDA and
    off elsewhere (CPU autocast is slower than float32 on most CPUs); "off" is float32."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AMP_DTYPES.get(setting)


def make_optimizer(params, spec) -> torch.optim.Optimizer:
    """The optimiser a teacher or student spec names."""
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                           nesterov=spec.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, spec) -> torch.optim.lr_scheduler.LRScheduler:
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def cross_entropy_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The hard-label loss (teachers)."""
    logits = model(batch["image"])
    return nn.functional.cross_entropy(logits, batch["label"]), logits, {}


def student_loss(loss: Loss, T: float, alpha: float, num_classes: int, targets_T: float | None = None,
                 rule: str = "probs") -> LossFn:
    """A student's objective on a batch ``{image, label, soft_targets?, teacher_logits?, mix_label?,
    mix_weight?}``: ``alpha * loss(...) + (1 - alpha) * CE(label)``, ``loss`` a registered student
    loss (:mod:`kd_ray.core.student_losses`) at the student's ``T``. It is handed what it declares it
    reads: soft targets (stored at ``targets_T``; re-softened from the batch's teacher logits when
    the two temperatures differ, or the cache is top-k) or the teachers' logits. A mixed image's
    label is mixed too. Its terms come back by name, with ``hard`` (the cross-entropy)."""
    targets_T = T if targets_T is None else targets_T

    def fn(model: nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logits = model(b["image"])
        labels = mixed_labels(b["label"], b["mix_label"], b["mix_weight"], num_classes) if "mix_weight" in b else b["label"]
        terms, total = {}, logits.new_zeros((), dtype=torch.float32)
        if alpha > 0:
            terms = loss(logits, Targets(T, b["label"], **_what_it_reads(loss, b, T, targets_T, rule, num_classes)))
            total = alpha * sum(terms.values())
        if alpha < 1:
            hard = nn.functional.cross_entropy(logits.float(), labels.float() if labels.is_floating_point() else labels.long())
            total, terms = total + (1.0 - alpha) * hard, {**terms, "hard": hard}
        return total, logits, {k: v.detach() for k, v in terms.items()}

    return fn


def _what_it_reads(loss: Loss, b: Batch, T: float, targets_T: float, rule: str, num_classes: int) -> dict:
    """The batch's soft targets at ``T``, or its teachers' logits [B, K, C], as ``loss`` reads."""
    logits = b.get("teacher_logits")
    topk = TEACHER_LOGIT_COLUMNS["topk"]
    if topk[0] in b:  # soft_targets.teacher_logits: topk -> [B, K, C] with the tail (kd_ray.core.schema)
        logits = dense_from_top_k(*(b[c] for c in topk), num_classes)
    if loss.reads == "teacher_logits":
        if logits is None:
            raise ValueError(f"student.loss={loss.name} reads the teachers' logits: set soft_targets.teacher_logits: "
                             f"dense or topk")
        return {"teacher_logits": logits}
    if abs(T - targets_T) < 1e-12 and "soft_targets" in b:
        return {"soft_targets": b["soft_targets"]}
    if logits is None:
        raise ValueError(f"student.temperature={T} differs from the soft targets' T={targets_T} and the cache has "
                         f"no teacher logits; set soft_targets.teacher_logits: dense or topk")
    return {"soft_targets": resoften(logits, T, rule)}


def schedule_epochs(s, rows: int) -> int:
    """Epochs a run on ``rows`` rows trains: ``student.epochs``, or more when ``student.min_steps``
    asks for more optimizer steps than that gives (each worker steps over its share)."""
    if s.min_steps is None:
        return s.epochs
    steps_per_epoch = math.ceil(math.ceil(rows / s.num_workers) / s.batch_size)
    return max(s.epochs, math.ceil(s.min_steps / steps_per_epoch))


@dataclass
class Best:
    """The best validation epoch so far (its weights only when the run keeps them)."""

    metric: float = -math.inf
    epoch: int = 0
    state: dict | None = None


class Engine:
    """One model's training run. ``model`` may be replaced by a wrapped copy (DDP) after a resume;
    :attr:`plain` is always the bare module (what is evaluated and checkpointed)."""

    def __init__(self, model: nn.Module, spec, loss_fn: LossFn, metric: str = "val_accuracy",
                 keep_best: bool = False, amp: torch.dtype | None = None):
        self.model, self.spec, self.loss_fn, self.metric, self.keep_best = model, spec, loss_fn, metric, keep_best
        self.opt = make_optimizer(model.parameters(), spec)
        self.sched = make_scheduler(self.opt, spec)
        self.grad_clip_norm = getattr(spec, "grad_clip_norm", None)
        self.constrained = constrained(self.plain)  # max-norm layers, projected after each step
        # mixed precision: the forward pass and loss under autocast; float16 scales the loss
        self.amp = amp
        self.scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        self.epoch, self.resumed_from, self.history, self.best = 0, 0, [], Best()

    @property
    def plain(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {"model": self.plain.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "epoch": self.epoch, "history": self.history,
                "best_metric": self.best.metric, "best_epoch": self.best.epoch, "best_model": self.best.state}

    def load_state_dict(self, state: dict) -> None:
        self.plain.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.epoch = self.resumed_from = int(state["epoch"])
        self.history = list(state["history"])
        self.best = Best(state.get("best_metric", -math.inf), state.get("best_epoch", 0), state.get("best_model"))

    # ------------------------------------------------------------------ the loop
    def train_epoch(self, batches: Iterable[Batch]) -> dict:
        """One pass over ``batches``; raises :class:`Diverged` when the epoch's loss is not finite."""
        self.model.train()
        device = next(self.plain.parameters()).device
        loss_sum = torch.zeros((), device=device)
        term_sums: dict[str, torch.Tensor] = {}
        n = correct = 0
        for b in batches:
            with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, logits, terms = self.loss_fn(self.model, b)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.grad_clip_norm is not None:  # bounds the step when soft targets at high T pull hard
                self.scaler.unscale_(self.opt)
                nn.utils.clip_grad_norm_(self.plain.parameters(), self.grad_clip_norm)
            self.scaler.step(self.opt)
            self.scaler.update()
            for layer in self.constrained:
                layer.constrain()
            loss_sum += loss.detach() * len(logits)
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v.float() * len(logits)
            n += len(logits)
            correct += int((logits.argmax(1) == b["label"]).sum())
        self.sched.step()
        self.epoch += 1
        train_loss = float(loss_sum) / max(n, 1)
        if not math.isfinite(train_loss):
            raise Diverged(self.epoch, train_loss)
        return {"train_loss": train_loss, "train_accuracy": correct / max(n, 1), "train_rows": n,
                **{f"train_{k}": float(v) / max(n, 1) for k, v in term_sums.items()}}

    def fit(self, epochs: int, batches_for: Callable[[int], Iterable[Batch]],
            evaluate: Callable[[nn.Module], dict], on_report: Callable[[dict], None] = lambda row: None,
            report_every: int = 1, patience: int | None = None) -> bool:
        """Train from :attr:`epoch` to ``epochs``; validate and report every ``report_every`` epochs
        (and after the last). Returns True when early stopping (``patience`` reports without a
        better validation ``metric``) ended the run."""
        t_report = time.time()  # a row's seconds: training and validation since the last report
        while self.epoch < epochs:
            row = self.train_epoch(batches_for(self.epoch))
            if self.epoch % report_every and self.epoch < epochs:
                continue
            row = {"epoch": self.epoch, **row, **evaluate(self.plain), "resumed_from": self.resumed_from,
                   "seconds": time.time() - t_report}
            t_report = time.time()
            self.history.append(row)
            if row[self.metric] > self.best.metric:
                state = {k: v.detach().cpu().clone() for k, v in self.plain.state_dict().items()}
                self.best = Best(row[self.metric], self.epoch, state if self.keep_best else None)
            on_report(row)
            if patience is not None and self.epoch - self.best.epoch >= patience:
                return True
        return False

    def restore_best(self) -> None:
        """Load the best validation epoch's weights (kept only with ``keep_best``)."""
        if self.best.state is not None:
            self.plain.load_state_dict(self.best.state)


# ---------------------------------------------------------------------- batches and evaluation
def shuffled_batches(rows: dict[str, torch.Tensor], batch_size: int, seed: int):
    """One epoch over in-memory rows: a seeded permutation cut into batches (the last may be short)."""
    n = len(rows["id"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size].to(rows["id"].device)
        yield {k: v[idx] for k, v in rows.items()}


def teacher_batches(spec, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """One epoch of a teacher's batches: a seeded order, shifted by up to ``spec.jitter`` pixels;
    dropout and shifts are seeded per epoch, so a resumed teacher sees what it would have seen."""
    torch.manual_seed(spec.seed * 100_003 + epoch)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(spec.seed * 7919 + epoch)).to(x.device)
    for i in range(0, len(x), spec.batch_size):
        idx = order[i: i + spec.batch_size]
        yield _teacher_batch(spec, x[idx], y[idx])


def streamed_teacher_batches(spec, blocks: Iterable[dict[str, np.ndarray]], epoch: int, device):
    """:func:`teacher_batches` over a stream of row blocks (a file order seeded by the caller),
    shuffled within a buffer of ``SHUFFLE_BUFFER_ROWS`` rows."""
    torch.manual_seed(spec.seed * 100_003 + epoch)
    for b in buffered_batches(blocks, spec.batch_size, SHUFFLE_BUFFER_ROWS, spec.seed * 7919 + epoch):
        yield _teacher_batch(spec, torch.from_numpy(b["image"]).to(device), torch.from_numpy(b["label"]).to(device))


def _teacher_batch(spec, x: torch.Tensor, y: torch.Tensor) -> Batch:
    return {"image": random_shift(x, spec.jitter) if spec.jitter else x, "label": y}


SHUFFLE_BUFFER_ROWS = 4096  # a streamed epoch is shuffled within this many rows (as Ray Data's local shuffle)


def buffered_batches(blocks: Iterable[dict[str, np.ndarray]], batch_size: int, buffer_rows: int, seed: int):
    """Batches of ``batch_size`` rows from a stream of row blocks, shuffled within a buffer of at
    least ``buffer_rows`` rows (seeded); the stream's last batch may be short."""
    rng = np.random.default_rng(seed)
    pending: dict[str, np.ndarray] | None = None

    def cut(rows: dict[str, np.ndarray], final: bool):
        n = len(next(iter(rows.values())))
        order = rng.permutation(n)
        rows = {k: v[order] for k, v in rows.items()}
        end = n if final else n - n % batch_size
        for i in range(0, end, batch_size):
            yield {k: v[i:i + batch_size] for k, v in rows.items()}
        return {k: v[end:] for k, v in rows.items()}

    for block in blocks:
        pending = block if pending is None else {k: np.concatenate([pending[k], v]) for k, v in block.items()}
        if len(next(iter(pending.values()))) >= buffer_rows:
            pending = yield from cut(pending, final=False)
    if pending is not None and len(next(iter(pending.values()))):
        yield from cut(pending, final=True)


def eval_batches(cols: dict[str, np.ndarray], device, size: int = 1024) -> list[Batch]:
    """Evaluation columns cut into batches for :func:`evaluate` (one batch of a whole split would
    hold every image's conv activations at once)."""
    return [{k: to_tensor(v[i:i + size]).to(device) for k, v in cols.items()}
            for i in range(0, len(cols["label"]), size)]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device) -> dict[str, float]:
    """Accuracy, error count, NLL and fidelity (top-1 agreement with the ensemble's ``ensemble_pred``)."""
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
        nll += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    if n == 0:
        return {"accuracy": float("nan"), "errors": 0, "nll": float("nan"), "fidelity": float("nan"), "n": 0}
    return {"accuracy": correct / n, "errors": n - correct, "nll": nll / n, "fidelity": agree / n, "n": n}


BIAS_GRID = np.round(np.arange(-20.0, 20.0001, 0.25), 4)


def bias_adjustment(val_logits: torch.Tensor, val_labels: torch.Tensor, classes: list[int],
                    grid: np.ndarray = BIAS_GRID) -> float:
    """The paper's fix for classes a transfer set lacked or over-represented: the one delta added
    to the logits (output biases) of ``classes`` that maximises validation accuracy (ties: the
    smallest |delta|). Raising an omitted class's bias is a positive delta; lowering the only
    classes a student saw (the paper's 7s and 8s) a negative one."""
    best, best_acc = 0.0, -1.0
    for d in sorted(grid, key=abs):
        z = val_logits.clone()
        z[:, list(classes)] += float(d)
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
        return {c: to_tensor(v).to(self.device) for c, v in batch.items()}

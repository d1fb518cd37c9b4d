"""One teacher's training, plain PyTorch: what a teacher's Ray actor (:mod:`kd_ray.stages.teachers`) runs.

:class:`TeacherTrainer` trains one teacher spec, evaluates on the validation set every epoch and
checkpoints every epoch to ``<storage>/<name>/teachers/<teacher_id>/`` (``checkpoint.pt`` to resume,
``model.pt`` when complete, ``meta.json``; each written atomically). A checkpoint whose key
(:func:`spec_key`: spec + data + starting weights) matches is resumed; a complete one is reused;
anything else starts over.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_ray.core import storage
from kd_ray.core.config import TeacherSpec
from kd_ray.core.ensemble import predict_logits, save_teacher_model
from kd_ray.core.environment import environment
from kd_ray.core.models import count_parameters
from kd_ray.core.plan import digest, teacher_identity
from kd_ray.core.subsets import bootstrap_counts, select_fraction
from kd_ray.core.train import (
    Diverged,
    Engine,
    amp_dtype,
    cross_entropy_loss,
    pick_device,
    streamed_teacher_batches,
    teacher_batches,
)
from kd_ray.stages.sources import StreamedSource


class TeacherError(RuntimeError):
    """A teacher failed (diverged, bad input); the message names the teacher."""


def spec_key(spec: TeacherSpec, data_identity: dict) -> str:
    """What a checkpoint must match to be resumed or reused (:func:`kd_ray.core.plan.teacher_identity`)."""
    return digest(teacher_identity(spec, data_identity), 16)


@dataclass
class TeacherTrainer:
    """Train (or resume, or reuse) one teacher. Plain PyTorch; storage paths may be URIs."""

    teacher_id: str
    spec: TeacherSpec
    key: str
    out_dir: str
    num_classes: int
    input_shape: tuple[int, ...]
    mixed_precision: str = "auto"  # runtime.mixed_precision
    progress: Any = None  # an object with .update(n) (a tqdm bar), or None
    tracker: Any = None  # a LiveTracker: each epoch's row as it comes, the final metrics at the end
    log: list[str] = field(default_factory=list)

    @property
    def checkpoint_path(self) -> str:
        return storage.join(self.out_dir, "checkpoint.pt")

    @property
    def model_path(self) -> str:
        return storage.join(self.out_dir, "model.pt")

    @property
    def meta_path(self) -> str:
        return storage.join(self.out_dir, "meta.json")

    def completed(self) -> dict | None:
        """The meta of a complete teacher with this key, or None."""
        if not (storage.exists(self.meta_path) and storage.exists(self.model_path)):
            return None
        meta = storage.read_json(self.meta_path)
        # "kept_epoch": teachers from before the best-validation rule kept their last epoch: retrained
        return meta if meta.get("key") == self.key and meta.get("complete") and "kept_epoch" in meta else None

    def _subset(self, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Row indices of this teacher's training set: a nested fraction, optionally bootstrapped
        (n draws with replacement; a streamed source's resample: :func:`bootstrap_counts`)."""
        rows = np.arange(len(ids))
        if self.spec.fraction < 1:
            rows = rows[np.isin(ids, select_fraction(ids, labels, self.spec.fraction, self.spec.seed))]
        if self.spec.bootstrap:
            rows = np.random.default_rng(self.spec.seed).choice(rows, size=len(rows), replace=True)
        return rows

    def _rows(self, train: dict | None, val: dict | None, source: StreamedSource | None, device):
        """(training rows, ``epoch -> batches``, ``() -> validation blocks``): from in-memory columns,
        or streamed from ``source`` in this process (a seeded file order per epoch)."""
        spec = self.spec
        if source is None:
            rows = self._subset(train["id"], train["label"])
            x = torch.from_numpy(train["image"][rows]).to(device)
            y = torch.from_numpy(train["label"][rows]).to(device)
            return len(x), lambda epoch: teacher_batches(spec, x, y, epoch), lambda: [val]
        fraction = spec.fraction if spec.fraction < 1 else None

        def epoch_batches(epoch: int):
            blocks = source.iter_rows("train", fraction, spec.seed, order_seed=spec.seed * 7919 + epoch)
            if spec.bootstrap:  # each row k ~ Poisson(1) times, k a function of (seed, id): the same every epoch
                blocks = ({c: np.repeat(v, bootstrap_counts(b["id"], spec.seed), axis=0) for c, v in b.items()}
                          for b in blocks)
            return streamed_teacher_batches(spec, blocks, epoch, device)

        return source.count(fraction, spec.seed), epoch_batches, lambda: source.iter_rows("val")

    def run(self, train: dict[str, np.ndarray] | None = None, val: dict[str, np.ndarray] | None = None,
            source: StreamedSource | None = None) -> dict:
        """Train on in-memory ``train``/``val`` columns, or on a streamed ``source`` read in this
        process one call's rows at a time (then the model keeps no validation logits)."""
        started = time.time()
        done = self.completed()
        if done is not None:
            return {**done, "epochs_run": 0, "resumed_from_epoch": done["epoch"], "start": started, "end": time.time()}

        spec = self.spec
        device = pick_device()
        torch.manual_seed(spec.seed)
        model = spec.build(self.input_shape, self.num_classes, log=self.log.append).to(device)  # weights loaded: logged
        # a teacher keeps its best validation epoch's weights, as students do
        engine = Engine(model, spec, cross_entropy_loss, keep_best=True, amp=amp_dtype(self.mixed_precision, device))
        if storage.exists(self.checkpoint_path):
            ckpt = storage.load_torch(self.checkpoint_path)
            if ckpt.get("key") == self.key:
                engine.load_state_dict(ckpt)
                self.log.append(f"{self.teacher_id}: resumed after epoch {engine.epoch}")
        start_epoch = engine.epoch
        if self.progress is not None and start_epoch:
            self.progress.update(start_epoch)

        size, epoch_batches, val_blocks = self._rows(train, val, source, device)
        if size == 0:
            raise TeacherError(f"teacher {self.teacher_id}: its training subset is empty")

        def validate(m: nn.Module) -> dict:
            n = right = 0
            for b in val_blocks():
                n, right = n + len(b["label"]), right + int((predict_logits(m, torch.from_numpy(b["image"])).argmax(1)
                                                            == torch.from_numpy(b["label"])).sum())
            return {"val_accuracy": right / n if n else float("nan")}

        def checkpoint(row: dict) -> None:
            storage.save_torch(self.checkpoint_path, {"key": self.key, **engine.state_dict()})
            if self.progress is not None:
                self.progress.update(1)
            if self.tracker is not None:
                self.tracker.log(row)

        try:
            engine.fit(spec.epochs, epoch_batches, validate, checkpoint)
        except Diverged as e:
            raise TeacherError(
                f"teacher {self.teacher_id}: training loss became {e.loss} in epoch {e.epoch}; "
                f"lower its lr (now {spec.lr}) or check the inputs. Its last good checkpoint "
                f"(epoch {e.epoch - 1}) and the other teachers' checkpoints are kept."
            ) from None
        meta = self._save(engine, None if source is not None else val, size, str(device), started)
        if self.tracker is not None:
            self.tracker.finish({"val_accuracy": meta["val_accuracy"], "kept_epoch": meta["kept_epoch"]})
        return {**meta, "epochs_run": spec.epochs - start_epoch, "resumed_from_epoch": start_epoch,
                "start": started, "end": time.time()}

    def _save(self, engine: Engine, val: dict | None, size: int, device: str, started: float) -> dict:
        """The best validation epoch's model (with its validation logits, in memory) and the meta
        that marks the teacher complete, written last."""
        engine.restore_best()
        model = engine.plain
        save_teacher_model(self.model_path, self.teacher_id, self.key, self.spec, model, self.num_classes,
                           self.input_shape, predict_logits(model, torch.from_numpy(val["image"])) if val else None)
        meta = {
            "teacher_id": self.teacher_id, "key": self.key, "spec": self.spec.model_dump(mode="json"),
            "complete": True, "epoch": self.spec.epochs, "history": engine.history,
            "val_accuracy": engine.best.metric if engine.history else float("nan"), "kept_epoch": engine.best.epoch,
            "params": count_parameters(model), "model_path": self.model_path, "train_size": size,
            "device": device, "seconds": time.time() - started,
            "environment": environment(),  # where it trained: versions, threads, CPU/GPU model
        }
        storage.write_json(self.meta_path, meta)
        return meta

"""Stage 1: train an ensemble of K teachers in parallel, one Ray actor per teacher.

Read top to bottom:

* :class:`~kd_ray.stages.teacher_worker.TeacherTrainer` is plain PyTorch: it trains one teacher
  spec, checkpointing every epoch (resumed, or reused when complete).
* :class:`TeacherActor` wraps it in a Ray actor: resources from the spec, GPU when torch sees
  one, torch threads = the actor's CPUs, a Ray progress bar, restarts that resume.
* :func:`import_teachers` brings in teachers trained elsewhere (``checkpoint`` in a spec), in the
  driver before Ray starts: each is checked against the data and stored as a complete teacher,
  so the stages after it cannot tell it from one trained here.
* :class:`EnsembleRun` launches all K actors at once (Ray queues what does not fit), collects
  them with ``ray.wait`` as each finishes and summarises; :func:`train_ensemble` is the one call.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch
from ray.experimental.tqdm_ray import tqdm

from kd_ray.core import storage
from kd_ray.core.config import DataConfig, ExperimentConfig, TeacherSpec
from kd_ray.core.data import Splits, load_splits
from kd_ray.core.ensemble import import_teacher
from kd_ray.core.losses import ensemble_average
from kd_ray.core.models import count_parameters
from kd_ray.layout import ensemble_file, teachers_dir
from kd_ray.stages.cluster import wait_for
from kd_ray.stages.progress import Heartbeat
from kd_ray.stages.sources import StreamedSource
from kd_ray.stages.teacher_worker import TeacherTrainer, spec_key
from kd_ray.stages.tracking import LiveTracker



class EnsembleError(RuntimeError):
    """One or more teachers failed; the others' checkpoints are intact."""


class TeacherActor:
    """One teacher in a Ray actor (made remote in :func:`_actor_class`)."""

    def __init__(self, teacher_id: str, spec: dict, key: str, out_dir: str, num_classes: int,
                 input_shape: list[int], data: dict, mixed_precision: str = "auto", source: dict | None = None,
                 experiment: dict | None = None):
        torch.set_num_threads(max(1, int(spec["num_cpus"])))
        # the actor reads its data itself, so a restart needs nothing from the object store; the
        # arguments are plain data (unpickling a config object would import torch in a second thread)
        self.teacher_id, self.data, self.source = teacher_id, DataConfig(**data), source  # source: a streamed one
        self.trainer = TeacherTrainer(teacher_id, TeacherSpec(**spec), key, out_dir, num_classes, tuple(input_shape),
                                      mixed_precision)
        self.experiment = experiment  # the config as plain data, when runtime.tracking logs its epochs

    def train(self) -> dict:
        ctx = ray.get_runtime_context()
        placement = {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                     "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
        bar = tqdm(total=self.trainer.spec.epochs, desc=f"teacher {self.teacher_id}")
        self.trainer.progress = bar
        if self.experiment is not None:  # live tracking from this process, epoch by epoch
            t = self.trainer
            t.tracker = LiveTracker(ExperimentConfig(**self.experiment), "teachers", t.teacher_id, t.key,
                                    t.spec.model_dump(mode="json"))
        try:
            if self.source is not None:
                out = self.trainer.run(source=StreamedSource.from_plain(self.source))
            else:
                splits = load_splits(self.data)
                out = self.trainer.run(splits.train.columns(), splits.val.columns())
        finally:
            bar.close()
        return {**out, **placement, "log": self.trainer.log}


_REMOTE = None


def _actor_class():
    global _REMOTE
    if _REMOTE is None:
        _REMOTE = ray.remote(TeacherActor)
    return _REMOTE


def teacher_ids(specs: list[TeacherSpec]) -> list[str]:
    return [f"t{i}" for i in range(len(specs))]


def import_teachers(cfg: ExperimentConfig, data: Splits | StreamedSource) -> dict[str, dict]:
    """The imported teachers (specs with a ``checkpoint``), checked and stored as complete teachers
    under ``<storage>/<name>/teachers/<id>/``; plain PyTorch, in the driver (before Ray starts for
    data in memory). The source file is only read: an imported teacher is never trained or
    overwritten. A streamed source's teachers are checked on a few validation rows; their
    accuracies come from the soft-target pass, which labels every row anyway."""
    out: dict[str, dict] = {}
    specs = cfg.teachers.resolved()
    if isinstance(data, StreamedSource):  # one block of validation rows, read here: enough to check the files
        probe = next(data.iter_rows("val"))
        xv, yv = torch.from_numpy(probe["image"][:2]), None
    else:
        xv, yv = torch.from_numpy(data.val.images), torch.from_numpy(data.val.labels)
    for i, (tid, spec) in enumerate(zip(teacher_ids(specs), specs)):
        if not spec.checkpoint:
            continue
        field = f"teachers.specs[{i}].checkpoint" if cfg.teachers.specs else "teachers.checkpoint"
        started = time.time()
        blob, model, val_logits = import_teacher(spec, field, data.num_classes, data.input_shape, xv)
        key = spec_key(spec, {**data.identity(), "sha256": blob["sha256"]})
        trainer = TeacherTrainer(tid, spec, key, storage.join(teachers_dir(cfg), tid), data.num_classes,
                                 data.input_shape)
        meta = trainer.completed()
        if meta is None:
            if yv is None:  # streamed: no validation logits kept (as for teachers trained on the stream)
                val_logits = val_logits[:0]
            storage.save_torch(trainer.model_path, {**blob, "teacher_id": tid, "key": key, "val_logits": val_logits})
            acc = float((val_logits.argmax(1) == yv).float().mean()) if yv is not None and len(yv) else float("nan")
            meta = {"teacher_id": tid, "key": key, "spec": spec.model_dump(mode="json"), "complete": True,
                    "imported_from": spec.checkpoint, "epoch": 0, "kept_epoch": 0, "history": [], "val_accuracy": acc,
                    "params": count_parameters(model),
                    "model_path": trainer.model_path, "train_size": 0, "device": "cpu",
                    "seconds": time.time() - started}
            storage.write_json(trainer.meta_path, meta)
        acc = ("val accuracy: the soft-target pass measures it" if np.isnan(meta["val_accuracy"])
               else f"val accuracy {meta['val_accuracy']:.4f}")
        print(f"[kd_ray] teacher {tid} imported from {spec.checkpoint}: {acc}", flush=True)
        out[tid] = {**meta, "epochs_run": 0, "resumed_from_epoch": 0, "start": started, "end": time.time()}
    return out


def check_resources(cfg: ExperimentConfig, specs: list[TeacherSpec], ids: list[str]) -> None:
    """Fail at once when no node type could ever hold a teacher; wait (for the autoscaler) while
    none is up yet."""
    if not specs:  # every teacher imported or complete
        return
    wait_for([{"CPU": s.num_cpus, "GPU": s.num_gpus} for s in specs],
             {"CPU": "teachers.num_cpus", "GPU": "teachers.num_gpus"}, "teachers", cfg.runtime.scale_timeout_s,
             names=[f"teacher {tid}" for tid in ids])


@dataclass
class EnsembleResult:
    teachers: list[dict]  # one dict per teacher: id, paths, metrics, timing, placement
    val_accuracy: float  # the ensemble's (probability averaging, T = 1)
    seconds: float

    @property
    def model_paths(self) -> list[str]:
        return [t["model_path"] for t in self.teachers]

    def summary(self) -> pd.DataFrame:
        rows = [{"teacher": t["teacher_id"], "model": t["spec"]["model"], "parameters": t["params"],
                 "val_accuracy": round(t["val_accuracy"], 4), "epochs": t["epoch"],
                 "kept_epoch": t.get("kept_epoch", t["epoch"]), "epochs_run": t["epochs_run"], "seconds": round(t["end"] - t["start"], 1)} for t in self.teachers]
        return pd.DataFrame(rows)


class EnsembleRun:
    """All K teachers launched at once; :meth:`wait` collects them as each finishes."""

    def __init__(self, cfg: ExperimentConfig, data: Splits | StreamedSource | None = None,
                 imported: dict[str, dict] | None = None):
        self.cfg = cfg
        self.started = time.time()
        self.data = data or load_splits(cfg.data)  # in memory, or a streamed source (data.stream)
        streamed = isinstance(self.data, StreamedSource)
        specs = cfg.teachers.resolved()
        self.ids = teacher_ids(specs)
        if imported is None:
            imported = import_teachers(cfg, self.data)
        self.reused: dict[str, dict] = dict(imported)
        todo = [(tid, spec) for tid, spec in zip(self.ids, specs) if tid not in self.reused]
        check_resources(cfg, [spec for _, spec in todo], [tid for tid, _ in todo])
        identity = self.data.identity()
        out = teachers_dir(cfg)
        self.actors: dict[str, Any] = {}
        self.refs: dict[Any, str] = {}
        for tid, spec in todo:
            key = spec_key(spec, identity)
            done = TeacherTrainer(tid, spec, key, storage.join(out, tid), self.data.num_classes,
                                  self.data.input_shape).completed()
            if done is not None:  # complete in storage with the same spec and data: reuse
                self.reused[tid] = {**done, "epochs_run": 0, "resumed_from_epoch": done["epoch"],
                                    "start": self.started, "end": self.started}
                continue
            options = dict(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
                           max_restarts=cfg.teachers.max_restarts, max_task_retries=cfg.teachers.max_restarts)
            if cfg.teachers.spread:
                options["scheduling_strategy"] = "SPREAD"
            actor = _actor_class().options(**options).remote(
                tid, spec.model_dump(mode="json"), key, storage.join(out, tid),
                self.data.num_classes, list(self.data.input_shape), cfg.data.model_dump(mode="json"),
                cfg.runtime.mixed_precision, self.data.plain() if streamed else None,
                cfg.model_dump(mode="json") if cfg.runtime.tracking else None)
            self.actors[tid] = actor
            self.refs[actor.train.remote()] = tid
        print(f"[kd_ray] teachers -> {out}: {len(self.refs)} to train, {len(self.reused)} complete and reused",
              flush=True)

    def _outcome(self, ref, tid: str, calls: dict[str, int]):
        """A teacher's finished call: its result, its error, or (its actor unavailable because its
        node went away, and restarts left) the ref of the same call on the restarted actor, which
        goes on from the teacher's checkpoint."""
        try:
            return ray.get(ref)
        except ray.exceptions.ActorUnavailableError as e:
            if calls[tid] > self.cfg.teachers.max_restarts:
                return e
            calls[tid] += 1
            again = self.actors[tid].train.remote()
            self.refs[again] = tid
            print(f"[kd_ray] teacher {tid}: its actor is unavailable ({str(e).splitlines()[0][:120]}); "
                  f"calling it again once Ray has restarted it", flush=True)
            return again
        except Exception as e:  # RayTaskError wraps the teacher's own error
            return e

    def wait(self) -> EnsembleResult:
        results: dict[str, dict] = dict(self.reused)
        failures: dict[str, str] = {}
        pending = list(self.refs)
        calls = {tid: 1 for tid in self.refs.values()}
        heart = Heartbeat("teachers", len(self.ids), already=len(self.reused))
        heart.running = {f"teacher {tid}": "" for tid in self.refs.values()}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=5.0)
            if not ready:  # a line at least every minute while teachers train
                heart.beat()
                continue
            tid = self.refs[ready[0]]
            heart.last = time.time()
            r = self._outcome(ready[0], tid, calls)
            if isinstance(r, ray.ObjectRef):  # called again on its restarted actor
                pending.append(r)
                continue
            heart.running.pop(f"teacher {tid}", None)
            ray.kill(self.actors[tid])
            if isinstance(r, Exception):
                cause = getattr(r, "cause", None) or r
                failures[tid] = f"{type(cause).__name__}: {cause}"
                print(f"[kd_ray] teacher {tid} FAILED: {failures[tid]}", flush=True)
                continue
            results[tid] = r
            for line in r.get("log", []):  # what its actor noted: pretrained tensors loaded, a resume
                print(line if line.startswith("[kd_ray]") else f"[kd_ray] {line}", flush=True)
            print(f"[kd_ray] teacher {tid} done ({len(results) + len(failures)}/{len(self.ids)}): "
                  f"val accuracy {r['val_accuracy']:.4f}, {r['epochs_run']} epochs run", flush=True)
        if failures:
            raise EnsembleError("teacher(s) failed: " + "; ".join(f"{t}: {m}" for t, m in failures.items())
                                + f". Completed teachers are kept under {teachers_dir(self.cfg)}.")
        teachers = [results[t] for t in self.ids]
        acc = float("nan")  # streamed teachers keep no validation logits: the soft-target pass measures the ensemble
        if not isinstance(self.data, StreamedSource):
            logits = torch.stack([storage.load_torch(t["model_path"])["val_logits"] for t in teachers])
            acc = float((ensemble_average(logits, 1.0, "probs").argmax(1) == torch.from_numpy(self.data.val.labels)).float().mean())
        result = EnsembleResult(teachers, acc, time.time() - self.started)
        storage.write_json(ensemble_file(self.cfg), {
            "val_accuracy": acc, "model_paths": result.model_paths,
            "teachers": result.summary().to_dict(orient="records"),
            # where each teacher trained in this run (reused teachers: not placed)
            "placement": {t["teacher_id"]: {"node_id": t.get("node_id"), "gpu_ids": t.get("gpu_ids", []),
                                            "environment": t.get("environment")} for t in result.teachers},
        })
        return result


def train_ensemble(cfg: ExperimentConfig, data: Splits | StreamedSource | None = None,
                   imported: dict[str, dict] | None = None) -> EnsembleResult:
    """Train (or resume, or reuse) the K teachers in parallel; print a summary table. ``data``:
    the splits in memory or a streamed source (default: ``load_splits``); ``imported``: what
    :func:`import_teachers` returned (imported here when None)."""
    result = EnsembleRun(cfg, data, imported).wait()
    print(result.summary().to_string(index=False), flush=True)
    acc = ("measured by the soft-target pass" if np.isnan(result.val_accuracy)
           else f"val accuracy {result.val_accuracy:.4f}")
    print(f"[kd_ray] ensemble of {len(result.teachers)}: {acc} ({result.seconds:.1f} s)", flush=True)
    return result

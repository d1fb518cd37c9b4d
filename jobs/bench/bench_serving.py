"""Serving: the exported student vs the K-teacher ensemble it was distilled from, on CPU.

    kd-ray run kd_ray/configs/digits.yaml            # first: teachers, soft targets, the sweep
    python jobs/bench/bench_serving.py [--config kd_ray/configs/digits.yaml] [--set ...]

The student is the sweep's best finished trial (chosen on validation), exported with ``kd-ray
export``; the ensemble is the K teachers averaging their softmax outputs (what serving it costs).
Like with like, in two forms: both eager PyTorch (the student rebuilt from its checkpoint), and
both TorchScript (the exported ``student.ts`` loaded with ``torch.jit.load``; the ensemble traced).
All run in this process with the same torch threads. Measured per form: latency at batch 1
(median and p99 of ``--calls`` calls after warm-up) and throughput at batch 256 (samples/s over
``--seconds``), plus test accuracy on the whole test split.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from kd_ray.core import storage  # noqa: E402
from kd_ray.core.config_files import load_config  # noqa: E402
from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.ensemble import build_teacher, load_teacher_files  # noqa: E402
from kd_ray.export import export_student, load_exportable  # noqa: E402
from kd_ray.layout import experiment_dir  # noqa: E402


class Ensemble(torch.nn.Module):
    """K teachers, softmax averaged: the model the student replaces."""

    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x).softmax(-1) for m in self.models]).mean(0)


@torch.no_grad()
def latency(model, x1: torch.Tensor, calls: int) -> tuple[float, float]:
    for _ in range(20):
        model(x1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model(x1)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3), float(np.percentile(times, 99) * 1e3)


@torch.no_grad()
def throughput(model, xb: torch.Tensor, seconds: float) -> float:
    for _ in range(3):
        model(xb)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(xb)
        n += len(xb)
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    preds = torch.cat([model(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return float((preds == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="kd_ray/configs/digits.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    run_dir = experiment_dir(cfg)
    card = export_student(run_dir)  # -> <run_dir>/export/student.ts + student_card.json
    scripted_student = torch.jit.load(storage.join(card["path"], card["artifact"])).eval()
    eager_student = load_exportable(card["source"])[0]
    sweep = storage.read_json(storage.join(run_dir, "sweep.json"))
    manifest = storage.read_json(storage.join(sweep["soft_targets"], "manifest.json"))
    teachers = [build_teacher(t.blob, torch.device("cpu")) for t in
                load_teacher_files([t["path"] for t in manifest["teachers"]])]
    ensemble = Ensemble(teachers).eval()

    splits = load_splits(cfg.data)
    x, y = torch.from_numpy(splits.test.images), torch.from_numpy(splits.test.labels)
    xb = x[:256] if len(x) >= 256 else x.repeat((256 // len(x)) + 1, 1, 1, 1)[:256]
    with torch.no_grad():
        scripted_ensemble = torch.jit.trace(ensemble, x[:2]).eval()
    res = {"threads": torch.get_num_threads(), "dataset": cfg.data.name, "teachers": len(teachers),
           "student_parameters": card["parameters"],
           "ensemble_parameters": sum(p.numel() for p in ensemble.parameters())}
    for form, models in (("eager", (("student", eager_student), ("ensemble", ensemble))),
                         ("torchscript", (("student", scripted_student), ("ensemble", scripted_ensemble)))):
        for name, model in models:
            key = f"{form}_{name}"
            res[f"{key}_accuracy"] = accuracy(model, x, y)
            res[f"{key}_latency_ms_median"], res[f"{key}_latency_ms_p99"] = latency(model, x[:1], args.calls)
            res[f"{key}_throughput"] = throughput(model, xb, args.seconds)
        res[f"{form}_throughput_ratio"] = res[f"{form}_student_throughput"] / res[f"{form}_ensemble_throughput"]
    res["student_accuracy"], res["ensemble_accuracy"] = res["eager_student_accuracy"], res["eager_ensemble_accuracy"]
    res["accuracy_drop_points"] = 100 * (res["ensemble_accuracy"] - res["student_accuracy"])
    res["target_met"] = bool(res["eager_throughput_ratio"] >= 10 and res["accuracy_drop_points"] <= 0.5)
    emit("serving", [
        ("dataset / threads", f"{cfg.data.name} / {res['threads']}"),
        ("student", f"{card['model']} {card['model_args']}, {res['student_parameters']:,} parameters, "
                    f"trained on {card['fraction']:g} of the data ({card['targets']} targets)"),
        ("ensemble", f"{len(teachers)} teachers, {res['ensemble_parameters']:,} parameters"),
        ("test accuracy", f"student {res['student_accuracy']:.4f}, ensemble {res['ensemble_accuracy']:.4f} "
                          f"({res['accuracy_drop_points']:+.2f} points below)"),
        *[(f"{form}: latency batch 1 (median / p99)",
           f"student {res[f'{form}_student_latency_ms_median']:.3f} / {res[f'{form}_student_latency_ms_p99']:.3f} ms, "
           f"ensemble {res[f'{form}_ensemble_latency_ms_median']:.3f} / {res[f'{form}_ensemble_latency_ms_p99']:.3f} ms")
          for form in ("eager", "torchscript")],
        *[(f"{form}: throughput batch 256",
           f"student {res[f'{form}_student_throughput']:,.0f} samples/s, ensemble "
           f"{res[f'{form}_ensemble_throughput']:,.0f} samples/s, ratio {res[f'{form}_throughput_ratio']:.1f}x")
          for form in ("eager", "torchscript")],
        ("target (>= 10x eager at <= 0.5 points)", "met" if res["target_met"] else "MISSED"),
    ], res)


if __name__ == "__main__":
    main()

"""K teachers trained one after another in plain PyTorch (all cores) vs kd_ray's parallel actors.

    python jobs/bench/bench_teachers.py [--teachers 4] [--epochs 2]

Both train the paper's 2 x 1200 ReLU MLP with the same optimiser, batch size and epochs and
evaluate on the validation set every epoch. kd_ray's time includes actor start-up and its
per-epoch checkpoints, and excludes Ray's own start-up (reported separately).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_config, emit  # noqa: E402

from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.models import build_model  # noqa: E402


def plain_pytorch(splits, k: int, epochs: int, batch_size: int, lr: float) -> float:
    """What a user would write: train K models in a loop, all cores to torch."""
    torch.set_num_threads(os.cpu_count())
    x, y = torch.from_numpy(splits.train.images), torch.from_numpy(splits.train.labels)
    xv, yv = torch.from_numpy(splits.val.images), torch.from_numpy(splits.val.labels)
    t0 = time.perf_counter()
    for seed in range(k):
        torch.manual_seed(seed)
        model = build_model("mlp", splits.input_shape, splits.num_classes, hidden=[1200, 1200])
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x))
            for i in range(0, len(x), batch_size):
                idx = order[i: i + batch_size]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            model.eval()
            with torch.no_grad():
                acc = (model(xv).argmax(1) == yv).float().mean().item()
        print(f"plain teacher {seed}: val accuracy {acc:.4f}", flush=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    cfg, data_name = bench_config("bench_teachers", [
        f"teachers.count={args.teachers}", f"teachers.epochs={args.epochs}",
        "teachers.model_args={hidden: [1200, 1200]}", f"teachers.batch_size={args.batch_size}",
        "teachers.lr=0.05", "teachers.jitter=0", "teachers.num_cpus=1"])
    splits = load_splits(cfg.data)
    plain_s = plain_pytorch(splits, args.teachers, args.epochs, args.batch_size, cfg.teachers.lr)

    import ray

    from kd_ray.stages.teachers import train_ensemble

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
    ray_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_ensemble(cfg, splits)
    kd_s = time.perf_counter() - t0
    busy = [t["end"] - t["start"] for t in result.teachers]
    ray.shutdown()
    ratio = (ray_start_s + kd_s) / plain_s  # end to end: what a user waits for, Ray's start-up included
    emit("bench_teachers", [
        ("dataset", f"{data_name}: {len(splits.train)} train rows, {len(splits.val)} val rows"),
        ("teachers x epochs", f"{args.teachers} x {args.epochs} (MLP 1200-1200, batch {args.batch_size})"),
        ("plain PyTorch, sequential", f"{plain_s:.1f} s"),
        ("kd_ray parallel actors", f"{kd_s:.1f} s (incl. actor start-up; per-teacher busy {min(busy):.1f}-{max(busy):.1f} s)"),
        ("Ray start-up", f"{ray_start_s:.1f} s"),
        ("ratio kd_ray / plain, end to end", f"{ratio:.2f} (Ray start-up included; target <= 0.70)"),
        ("ratio kd_ray / plain, actors only", f"{kd_s / plain_s:.2f}"),
        ("ensemble val accuracy", f"{result.val_accuracy:.4f}"),
    ], {"dataset": data_name, "teachers": args.teachers, "epochs": args.epochs, "plain_s": round(plain_s, 2),
        "kd_ray_s": round(kd_s, 2), "ray_start_s": round(ray_start_s, 2), "ratio_e2e": round(ratio, 3),
        "ratio_actors_only": round(kd_s / plain_s, 3),
        "target": 0.7, "met": bool(ratio <= 0.7)})


if __name__ == "__main__":
    main()

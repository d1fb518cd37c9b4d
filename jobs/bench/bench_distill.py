"""One student, the same data and epochs: a plain PyTorch loop over in-memory tensors vs
kd_ray's ``distill`` (a light student in one Ray task, or with ``--trainer torch_trainer`` a
TorchTrainer of 1 worker), in one script.

    python jobs/bench/bench_distill.py [--epochs 4] [--batch-size 256] [--max-in-memory-mb 0] [--trainer torch_trainer]

Both train the paper's 800-800 MLP student with kd_loss (T = 4, alpha = 0.9) on the same
cached soft targets and evaluate on the validation set every epoch. The headline is end to
end: the plain loop's total time against the wall time of kd_ray's ``distill`` call (its task's
or Train's start-up included; the cluster itself is up). Beside it, per-epoch samples/s (training rows /
epoch seconds, epoch 1 excluded as warm-up); kd_ray's fixed start-up = wall time - the sum of
its epoch times. Teachers are untrained 1200-1200 MLPs:
the student's cost does not depend on what the targets say.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench_config, emit, untrained_teachers  # noqa: E402

from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.losses import kd_loss  # noqa: E402
from kd_ray.core.models import build_model  # noqa: E402
from kd_ray.stages.datasets import from_dataset  # noqa: E402


def plain_pytorch(rows: dict, val: dict, input_shape, epochs: int, batch_size: int, lr: float) -> list[float]:
    torch.set_num_threads(1)  # the same CPU share as kd_ray's one Train worker
    x, y, p = (torch.from_numpy(rows[k]) for k in ("image", "label", "soft_targets"))
    xv, yv = torch.from_numpy(val["image"]), torch.from_numpy(val["label"])
    torch.manual_seed(0)
    model = build_model("mlp", input_shape, 10, hidden=[800, 800])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    seconds = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i: i + batch_size]
            loss, _ = kd_loss(model(x[idx]), p[idx], y[idx], 4.0, 0.9)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        seconds.append(time.perf_counter() - t0)
        print(f"plain epoch {epoch + 1}: {seconds[-1]:.2f} s, val accuracy {acc:.4f}", flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-in-memory-mb", type=float, default=2048,
                    help="student.max_in_memory_mb: 0 streams the shard from Ray Data every epoch")
    ap.add_argument("--trainer", default="auto", choices=["auto", "torch_trainer"], help="student.trainer")
    args = ap.parse_args()
    cfg, data_name = bench_config("bench_distill", [
        "soft_targets.temperature=4", "soft_targets.teacher_logits=none",
        "soft_targets.batch_size=2048", "student.model_args={hidden: [800, 800]}",
        f"student.epochs={args.epochs}", f"student.batch_size={args.batch_size}",
        "student.lr=0.05", "student.alpha=0.9", "student.schedule=constant", "student.grad_clip_norm=null",
        f"student.max_in_memory_mb={args.max_in_memory_mb}", f"student.trainer={args.trainer}"])
    splits = load_splits(cfg.data)

    import ray

    from kd_ray.stages.distill import distill
    from kd_ray.stages.soft_targets import build_soft_targets

    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
    _, paths = untrained_teachers(cfg.runtime.storage_path, splits.input_shape, splits.num_classes, 3)
    st = build_soft_targets(cfg, paths, splits)
    rows = from_dataset(st.datasets["train"], ("image", "label", "soft_targets"))
    val = from_dataset(st.datasets["val"], ("image", "label"))
    n = len(rows["label"])

    plain = plain_pytorch(rows, val, splits.input_shape, args.epochs, args.batch_size, cfg.student.lr)
    t0 = time.perf_counter()
    result = distill(cfg, st)
    wall = time.perf_counter() - t0
    ray.shutdown()
    kd = list(result.history["seconds"])
    plain_rate = n / np.mean(plain[1:])
    kd_rate = n / np.mean(kd[1:])
    startup = wall - sum(kd)
    emit("bench_distill", [
        ("dataset", f"{data_name}: {n} training rows, student MLP 800-800, batch {args.batch_size}, {args.epochs} epochs"),
        ("kd_ray shard", "in memory (read once)" if args.max_in_memory_mb * 1024**2 >= st.datasets["train"].size_bytes()
         else "streamed from Ray Data every epoch"),
        ("plain PyTorch, per epoch", f"{plain_rate:,.0f} samples/s ({', '.join(f'{s:.2f}' for s in plain)} s)"),
        (f"kd_ray ({'light task' if args.trainer == 'auto' else 'TorchTrainer'}), per epoch", f"{kd_rate:,.0f} samples/s ({', '.join(f'{s:.2f}' for s in kd)} s)"),
        ("ratio kd_ray / plain, end to end", f"{sum(plain) / wall:.2f} ({sum(plain):.1f} s vs {wall:.1f} s; target >= 0.90)"),
        ("ratio kd_ray / plain, steady epochs", f"{kd_rate / plain_rate:.2f}"),
        ("kd_ray fixed start-up", f"{startup:.1f} s (its task or TorchTrainer, dataset setup, final test eval)"),
        ("student test accuracy", f"{result.metrics['test_accuracy']:.4f}"),
    ], {"dataset": data_name, "trainer": args.trainer, "rows": n, "epochs": args.epochs, "max_in_memory_mb": args.max_in_memory_mb, "plain_samples_s": round(plain_rate),
        "kd_ray_samples_s": round(kd_rate), "ratio_steady": round(kd_rate / plain_rate, 3),
        "ratio_e2e": round(sum(plain) / wall, 3), "plain_s": round(sum(plain), 2), "kd_ray_wall_s": round(wall, 2),
        "startup_s": round(startup, 1), "target": 0.9, "met": bool(sum(plain) / wall >= 0.9)})


if __name__ == "__main__":
    main()

"""Soft targets for K teachers over >= 60,000 samples: a plain PyTorch inference loop vs
kd_ray's Ray Data pipeline (EnsemblePredictor actor pool), in one run.

    python jobs/bench/bench_soft_targets.py [--teachers 5] [--actors 2] [--batch-size 1024] [--precision bfloat16]

Teachers are the paper's 2 x 1200 MLPs (untrained weights: inference costs the same).
The headline is end to end, as a user waits for it: Ray's start-up plus kd_ray's pass over the
full set (run first, on a fresh cluster). Beside it, steady state = rows / (full - start-up),
with kd_ray's fixed start-up (actor pool, model loading) timed on a 1-batch dataset afterwards.
With ``--precision bfloat16`` both run the teachers in bfloat16 (``soft_targets.precision``),
and the plain loop is timed in float32 as well: the speed-up bfloat16 buys, and how far its
soft targets move from float32's.
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

from kd_ray.core.data import Split, load_splits  # noqa: E402
from kd_ray.core.ensemble import PRECISIONS, averaged_soft_targets  # noqa: E402
from kd_ray.stages.datasets import to_dataset  # noqa: E402


def plain_pytorch(models, images: np.ndarray, T: float, batch_size: int) -> tuple[float, np.ndarray]:
    torch.set_num_threads(os.cpu_count())
    x = torch.from_numpy(images)
    t0 = time.perf_counter()
    out = averaged_soft_targets(models, x, T, "probs", batch_size).numpy()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teachers", type=int, default=5)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="float32")
    args = ap.parse_args()
    cfg, data_name = bench_config("bench_soft", [
        f"soft_targets.actors={args.actors}", f"soft_targets.num_cpus={args.cpus_per_actor}",
        f"soft_targets.batch_size={args.batch_size}", "soft_targets.temperature=4",
        f"soft_targets.precision={args.precision}"])
    splits = load_splits(cfg.data)
    images = np.concatenate([splits.train.images, splits.val.images])
    ids = np.concatenate([splits.train.ids, splits.val.ids])
    rows = Split(ids, images, np.concatenate([splits.train.labels, splits.val.labels]))
    models, paths = untrained_teachers(cfg.runtime.storage_path, splits.input_shape, splits.num_classes, args.teachers)

    fp32_s, fp32_out = plain_pytorch(models, images, 4.0, args.batch_size)
    plain_s, plain_out = fp32_s, fp32_out
    if args.precision != "float32":  # the baseline in the same precision
        plain_s, plain_out = plain_pytorch([m.to(PRECISIONS[args.precision]) for m in models], images, 4.0,
                                           args.batch_size)

    import ray

    from kd_ray.stages.predictor import predict

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1")
    ray_start_s = time.perf_counter() - t0
    full = to_dataset(rows, blocks=max(4, len(rows) // (4 * args.batch_size)))
    t0 = time.perf_counter()
    done = predict(full, paths, cfg.soft_targets, "train", [cfg.name]).materialize()
    full_s = time.perf_counter() - t0
    tiny = to_dataset(rows.take(rows.ids[: args.batch_size]))
    t0 = time.perf_counter()
    predict(tiny, paths, cfg.soft_targets, "train", [cfg.name]).materialize()
    startup_s = time.perf_counter() - t0
    df = done.select_columns(["id", "soft_targets"]).to_pandas()
    got = np.stack(df["soft_targets"].to_numpy())[np.argsort(df["id"].to_numpy())]
    want = plain_out[np.argsort(ids)]
    max_diff = float(np.abs(got - want).max())
    vs_fp32 = float(np.abs(got - fp32_out[np.argsort(ids)]).max())
    ray.shutdown()

    n = len(rows)
    plain_rate = n / plain_s
    steady_rate = n / max(full_s - startup_s, 1e-9)
    e2e_rate = n / (ray_start_s + full_s)
    emit("bench_soft_targets", [
        ("dataset", f"{data_name}: {n} rows, K = {args.teachers} MLP 1200-1200 teachers, batch {args.batch_size}"),
        ("teachers' precision", args.precision),
        ("plain PyTorch loop", f"{plain_rate:,.0f} samples/s ({plain_s:.1f} s, {os.cpu_count()} threads)"),
        ("plain loop, float32", f"{n / fp32_s:,.0f} samples/s (ratio {fp32_s / plain_s:.2f} for {args.precision})"),
        ("kd_ray end to end", f"{e2e_rate:,.0f} samples/s ({ray_start_s:.1f} s Ray start-up + {full_s:.1f} s, "
                              f"{args.actors} actors x {args.cpus_per_actor:g} CPU)"),
        ("ratio end to end / plain", f"{e2e_rate / plain_rate:.2f} (target >= 0.90)"),
        ("kd_ray fixed start-up", f"{startup_s:.1f} s (1-batch run: actor pool + model loading)"),
        ("kd_ray steady state", f"{steady_rate:,.0f} samples/s, ratio to plain {steady_rate / plain_rate:.2f}"),
        ("max |kd_ray - plain|", f"{max_diff:.2e}"),
        ("max |kd_ray - float32 plain|", f"{vs_fp32:.2e}"),
    ], {"dataset": data_name, "rows": n, "teachers": args.teachers, "precision": args.precision,
        "plain_samples_s": round(plain_rate), "plain_fp32_samples_s": round(n / fp32_s), "max_abs_diff_fp32": vs_fp32,
        "kd_ray_steady_samples_s": round(steady_rate), "kd_ray_e2e_samples_s": round(e2e_rate),
        "startup_s": round(startup_s, 2), "ray_start_s": round(ray_start_s, 2),
        "ratio_e2e": round(e2e_rate / plain_rate, 3), "ratio_steady": round(steady_rate / plain_rate, 3),
        "target": 0.9, "met": bool(e2e_rate / plain_rate >= 0.9), "max_abs_diff": max_diff})


if __name__ == "__main__":
    main()

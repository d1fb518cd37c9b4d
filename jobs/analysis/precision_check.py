"""What ``soft_targets.precision: bfloat16`` costs and buys on a finished run's teachers (no Ray).

    python jobs/analysis/precision_check.py kd_ray/configs/fashion_mnist_consistent.yaml --storage runs \
        --set teachers.epochs=15 --set teachers.jitter=0 [--fraction 0.1]

Prints, for float32 and bfloat16 teachers: one thread's time for the K teachers on a batch of
``student.batch_size`` images (and the student's optimizer step, for scale), in the
channels-last layout ``build_model`` gives conv nets and, for comparison, channels-first
(``*_channels_first``; the same for fully connected nets), and per image at batches of 256 and
1024 (float32, channels-first); the ensemble's
validation and test accuracy and how many test predictions change; and how far the soft targets
at ``soft_targets.temperature`` move on the mixed views consistent teaching feeds a ``--fraction``
subset (one epoch of seeded mixup, weight ~ Beta(1, 1)).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from kd_ray.core.augment import mix, seeded_mixup
from kd_ray.core.config_files import load_config
from kd_ray.core.data import load_splits
from kd_ray.core.ensemble import averaged_soft_targets, load_ensemble, teacher_logits
from kd_ray.core.losses import kd_loss
from kd_ray.core.models import build_model
from kd_ray.core.subsets import select_fraction
from kd_ray.core.train import make_optimizer
from kd_ray.layout import ensemble_paths


def ms_per_call(fn, repeats: int = 50) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1000


def channels_first(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its weights in PyTorch's default (NCHW) layout."""
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--storage", help="runtime.storage_path of the run that trained the teachers")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--set", action="append", default=[], help="config overrides, as kd-ray --set")
    args = ap.parse_args()
    sets = list(args.set) + ([f"runtime.storage_path={args.storage}"] if args.storage else [])
    torch.set_num_threads(1)
    cfg = {p: load_config(args.config, sets + [f"soft_targets.precision={p}"]) for p in ("float32", "bfloat16")}
    teachers = {p: load_ensemble(ensemble_paths(c), precision=c.soft_targets.precision) for p, c in cfg.items()}
    c, s = cfg["float32"], cfg["float32"].student
    splits = load_splits(c.data)
    T = c.soft_targets.temperature
    batch = torch.from_numpy(splits.test.images[: s.batch_size])

    def student_step(student, opt):
        loss = kd_loss(student(batch), None, torch.zeros(len(batch), dtype=torch.long), T, 0.0)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    for layout, lay in (("", lambda m: m), ("_channels_first", channels_first)):
        student = lay(build_model(s.model, list(splits.input_shape), splits.num_classes, **s.model_args))
        opt = make_optimizer(student.parameters(), s)
        out[f"student_step_ms{layout}"] = round(ms_per_call(lambda: student_step(student, opt)), 1)

    subset = splits.train.take(select_fraction(splits.train.ids, splits.train.labels, args.fraction, c.data.seed))
    x = torch.from_numpy(subset.images)
    partner, lam = seeded_mixup(len(x), 1.0, 0, 0)
    mixed = mix(x, x[partner], torch.from_numpy(lam))
    preds, soft, first = {}, {}, {}
    for p, models in teachers.items():
        out[f"{p}_teachers_ms_per_batch"] = round(ms_per_call(lambda: teacher_logits(models, batch)), 1)
        first[p] = [channels_first(m) for m in models]
        out[f"{p}_teachers_ms_per_batch_channels_first"] = round(ms_per_call(lambda: teacher_logits(first[p], batch)), 1)
        for split in ("val", "test"):
            part = getattr(splits, split)
            pred = averaged_soft_targets(models, torch.from_numpy(part.images), 1.0).argmax(1).numpy()
            out[f"{p}_{split}_accuracy"] = round(float((pred == part.labels).mean()), 4)
            preds[p, split] = pred
        soft[p] = averaged_soft_targets(models, mixed, T, c.soft_targets.rule)
    # per image, the predictor's batch size matters for conv nets: large batches spill the caches
    for size in (256, 1024):
        images = torch.from_numpy(splits.test.images[:size])
        ms = ms_per_call(lambda: teacher_logits(first["float32"], images), repeats=3)
        out[f"float32_channels_first_ms_per_image_batch_{size}"] = round(ms / size, 3)
    diff = (soft["float32"] - soft["bfloat16"]).abs()
    out.update({"speed_up": round(out["float32_teachers_ms_per_batch"] / out["bfloat16_teachers_ms_per_batch"], 2),
                "speed_up_over_float32_channels_first": round(
                    out["float32_teachers_ms_per_batch_channels_first"] / out["bfloat16_teachers_ms_per_batch"], 2),
                "test_predictions_changed": int((preds["float32", "test"] != preds["bfloat16", "test"]).sum()),
                "mixed_views": len(mixed), "soft_target_diff_mean": float(diff.mean()),
                "soft_target_diff_max": float(diff.max())})
    print(json.dumps(out))


if __name__ == "__main__":
    main()

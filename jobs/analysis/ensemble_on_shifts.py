"""The ensemble's accuracy on the un-augmented images and on the seeded shifted views that
consistent teaching labels (no Ray; reads a finished run's teachers).

    python jobs/analysis/ensemble_on_shifts.py kd_ray/configs/digits_consistent.yaml [--storage runs] [--epochs 0 1] \
        [--set soft_targets.jitter=2]

Answers one question from the consistent-teaching results: are the teachers' labels on the
shifted views worse than on the originals?
"""
from __future__ import annotations

import argparse
import json

import torch

from kd_ray.core.augment import seeded_shift
from kd_ray.core.config_files import load_config
from kd_ray.core.data import load_splits
from kd_ray.core.ensemble import averaged_soft_targets, load_ensemble
from kd_ray.layout import ensemble_paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--storage", help="runtime.storage_path of the finished run (default: the config's)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config overrides, as kd-ray --set")
    args = ap.parse_args()
    cfg = load_config(args.config, list(args.set) + ([f"runtime.storage_path={args.storage}"] if args.storage else []))
    teachers = load_ensemble(ensemble_paths(cfg), precision=cfg.soft_targets.precision)
    splits = load_splits(cfg.data)
    out = {}
    for name, part in (("train", splits.train), ("test", splits.test)):
        views = {"original": part.images, **{f"shift epoch {e}": seeded_shift(
            part.images, part.ids, cfg.soft_targets.jitter, args.seed, e) for e in args.epochs}}
        for view, images in views.items():
            pred = averaged_soft_targets(teachers, torch.from_numpy(images), 1.0).argmax(1).numpy()
            acc = float((pred == part.labels).mean())
            out[f"{name} {view}"] = round(acc, 4)
            print(f"{name:5s} {view:15s} ensemble accuracy {acc:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

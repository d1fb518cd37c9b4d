"""The mnist_paper teacher for a few epochs with and without max-norm constraints, at two
learning rates: does the constraint bind, and does it keep a high learning rate stable?

    python jobs/analysis/max_norm_screen.py --root <mnist root> [--epochs 6]

Trains kd_ray's own teacher (``build_model("mlp", ...)`` with the config's dropout and jitter,
the training engine, a cosine schedule over ``--epochs``) in one process, no Ray, and prints one
JSON line per arm: its lr, max_norm and validation errors after each epoch (or the epoch whose
loss diverged). A screen on validation; it chooses nothing that is reported on test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_ray.core.config_files import load_config  # noqa: E402
from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.models import build_model  # noqa: E402
from kd_ray.core.train import Diverged, Engine, cross_entropy_loss, eval_batches, evaluate, teacher_batches  # noqa: E402

ARMS = [(0.05, None), (0.05, 3.5), (0.3, 3.5), (0.3, None)]  # (lr, max_norm)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("mnist_paper", [f"data.root={args.root}"])
    splits = load_splits(cfg.data)
    x, y = torch.from_numpy(splits.train.images), torch.from_numpy(splits.train.labels)
    n_val = len(splits.val.labels)
    val = eval_batches({"image": splits.val.images, "label": splits.val.labels,
                        "ensemble_pred": splits.val.labels}, "cpu")
    for lr, max_norm in ARMS:
        torch.manual_seed(0)
        model_args = dict(cfg.teachers.model_args, **({"max_norm": max_norm} if max_norm else {}))
        model = build_model("mlp", splits.input_shape, splits.num_classes, **model_args)
        spec = cfg.teachers.model_copy(update={"lr": lr, "epochs": args.epochs})
        engine = Engine(model, spec, cross_entropy_loss, keep_best=True)
        started, diverged = time.time(), None
        try:
            engine.fit(args.epochs, lambda e: teacher_batches(spec, x, y, e),
                       lambda m: {f"val_{k}": v for k, v in evaluate(m, val, "cpu").items()})
        except Diverged as e:
            diverged = e.epoch
        print(json.dumps({"lr": lr, "max_norm": max_norm, "diverged_epoch": diverged,
                          "val_errors": [round((1 - r["val_accuracy"]) * n_val) for r in engine.history],
                          "seconds": round(time.time() - started)}), flush=True)


if __name__ == "__main__":
    main()

"""One sweep trial's student, in a plain single-process PyTorch loop (no Ray): a fast way to
try distillation settings on a small subset before a sweep spends its minutes on them.

    python jobs/analysis/small_data_kd.py kd_ray/configs/digits_consistent.yaml --fraction 0.03 \
        --teaching consistent --set student.alpha=1 --set soft_targets.mixup=1 --set student.min_steps=2000

It reads a finished run's teachers, takes the same nested stratified subset as the sweep
(``select_fraction`` with the data seed, as ``distill`` does) and trains the config's student on it:

- ``hard``: labels only (the sweep's baseline, here without early stopping);
- ``cached``: the ensemble's soft targets of the un-augmented images, fixed;
- ``consistent``: every step the teachers label the very view the student trains on: a seeded
  shift of up to ``soft_targets.jitter`` pixels and, with ``soft_targets.mixup`` A > 0, a mix
  of two subset images with weight ~ Beta(A, A) (Beyer et al. 2022's "function matching").

Prints test accuracy per seed and the mean, and the student's fidelity (agreement with the
ensemble's class) on the test images and on the subset's own images. The figures in docs/consistent_teaching.md
come from ``kd-ray run`` sweeps; this script only chooses what those sweeps try.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kd_ray.core.augment import mix, seeded_mixup, seeded_shift
from kd_ray.core.config_files import load_config
from kd_ray.core.data import load_splits
from kd_ray.core.ensemble import averaged_soft_targets, load_ensemble
from kd_ray.core.losses import kd_loss, mixed_labels
from kd_ray.core.models import build_model
from kd_ray.core.plan import plan_student
from kd_ray.core.subsets import select_fraction
from kd_ray.core.train import (
    Engine,
    eval_batches,
    evaluate,
    schedule_epochs,
    shuffled_batches,
)
from kd_ray.layout import ensemble_paths


def train_student(cfg, teachers, subset, test, teaching: str, seed: int) -> dict[str, float]:
    """The sweep trial's student in one process: the same engine, model, optimiser, schedule, loss and views."""
    s = cfg.student
    T, alpha = plan_student(cfg).temperature, (0.0 if teaching == "hard" else s.alpha)
    st = cfg.soft_targets
    torch.manual_seed(seed)
    model = build_model(s.model, list(subset.images.shape[1:]), 10, **s.model_args)
    s = s.model_copy(update={"epochs": schedule_epochs(s, len(subset))})
    images, labels, ids = torch.from_numpy(subset.images), torch.from_numpy(subset.labels), subset.ids

    def teach(x):
        return averaged_soft_targets(teachers, x, T, st.rule)

    cached, n = teach(images), len(ids)

    def batches(epoch: int):
        view, rows = images, {"id": torch.from_numpy(ids), "label": labels, "soft_targets": cached}
        if teaching == "consistent":  # ConsistentTeacher's view: shifted, then mixed
            view = seeded_shift(images, ids, st.jitter, seed, epoch)
            if st.mixup > 0:
                partner, lam = seeded_mixup(n, st.mixup, seed, epoch)
                view = mix(view, view[partner], torch.from_numpy(lam))
                rows.update(mix_label=labels[partner], mix_weight=torch.from_numpy(lam))
        for b in shuffled_batches({**rows, "image": view}, s.batch_size, seed * 1000 + epoch):  # the trial's order
            if teaching == "consistent" and alpha > 0:
                b["soft_targets"] = teach(b["image"])
            yield b

    def loss_fn(m, b):
        logits = m(b["image"])
        target = mixed_labels(b["label"], b["mix_label"], b["mix_weight"], 10) if "mix_weight" in b else b["label"]
        return kd_loss(logits, b["soft_targets"] if alpha > 0 else None, target, T, alpha)[0], logits, {}

    engine = Engine(model, s, loss_fn)
    engine.fit(s.epochs, batches, lambda m: {"val_accuracy": float("nan")}, report_every=s.epochs)
    # accuracy and fidelity (top-1 agreement with the ensemble; Stanton et al. 2021), as the sweep
    # reports them, on the test images and on the subset's own (un-augmented) images
    test_pred = teach(torch.from_numpy(test.images)).argmax(1).numpy()
    on_test = evaluate(model, eval_batches({"image": test.images, "label": test.labels, "ensemble_pred": test_pred},
                                           "cpu"), "cpu")
    on_subset = evaluate(model, eval_batches({"image": subset.images, "label": subset.labels,
                                              "ensemble_pred": cached.argmax(1).numpy()}, "cpu"), "cpu")
    return {"test_accuracy": on_test["accuracy"], "test_fidelity": on_test["fidelity"],
            "subset_fidelity": on_subset["fidelity"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--storage", help="runtime.storage_path of the run that trained the teachers")
    ap.add_argument("--fraction", type=float, default=0.03)
    ap.add_argument("--teaching", choices=["hard", "cached", "consistent"], default="consistent")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="config overrides, as kd-ray --set")
    args = ap.parse_args()
    sets = list(args.set) + ([f"runtime.storage_path={args.storage}"] if args.storage else [])
    cfg = load_config(args.config, sets)
    torch.set_num_threads(1)
    teachers = load_ensemble(ensemble_paths(cfg), precision=cfg.soft_targets.precision)
    splits = load_splits(cfg.data)
    t0 = time.time()
    # the sweep's subset: nested, stratified, chosen by the data seed (the same for every trial seed)
    subset = splits.train.take(select_fraction(splits.train.ids, splits.train.labels, args.fraction, cfg.data.seed))
    runs = [train_student(cfg, teachers, subset, splits.test, args.teaching, seed) for seed in args.seeds]
    out = {"fraction": args.fraction, "teaching": args.teaching, "set": args.set,
           **{k: [round(r[k], 4) for r in runs] for k in runs[0]},
           "mean": round(float(np.mean([r["test_accuracy"] for r in runs])), 4),
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

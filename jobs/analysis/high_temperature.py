"""Does distillation at the paper's T = 20 stay finite? The paper's student (2 x 800, SGD with
Nesterov momentum 0.9, lr 0.05, batch 128, alpha 0.9) on a teacher's soft targets, with and without
each remedy, in kd_ray's own training engine (no Ray).

    python jobs/analysis/high_temperature.py --root /usr/share/datasets/fashion-mnist --dataset fashion_mnist

It trains one 2 x 1200 teacher (dropout, 2-pixel jitter, as mnist_paper.yaml) for --teacher-epochs,
then the student for --student-epochs per remedy: none, gradient-norm clipping at 1 / 5 / 10, and a
linear learning-rate warm-up over 500 steps. Prints, per remedy and epoch, the training loss and
validation accuracy (or the epoch it diverged in), and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from kd_ray.core.config_files import load_config
from kd_ray.core.data import load_splits
from kd_ray.core.losses import soften
from kd_ray.core.models import build_model
from kd_ray.core.plan import plan_student
from kd_ray.core.student_losses import make_loss
from kd_ray.core.train import (
    Diverged,
    Engine,
    cross_entropy_loss,
    shuffled_batches,
    student_loss,
    teacher_batches,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--student-epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config("mnist_paper", [f"data.name={args.dataset}", f"data.root={args.root}"])
    splits = load_splits(cfg.data)
    rows = {"id": torch.from_numpy(splits.train.ids), "image": torch.from_numpy(splits.train.images),
            "label": torch.from_numpy(splits.train.labels)}
    xv, yv = torch.from_numpy(splits.val.images), torch.from_numpy(splits.val.labels)

    def accuracy(m) -> dict:
        with torch.no_grad():
            m.eval()
            return {"val_accuracy": float((m(xv).argmax(1) == yv).float().mean())}

    t = cfg.teachers.model_copy(update={"epochs": args.teacher_epochs})
    torch.manual_seed(0)
    teacher = Engine(build_model(t.model, splits.input_shape, splits.num_classes, **t.model_args), t, cross_entropy_loss)
    t0 = time.time()
    teacher.fit(t.epochs, lambda e: teacher_batches(t, rows["image"], rows["label"], e), accuracy)
    with torch.no_grad():
        teacher.plain.eval()
        logits = torch.cat([teacher.plain(rows["image"][i:i + 4096]) for i in range(0, len(rows["id"]), 4096)])
    confident = float((torch.softmax(logits, 1).max(1).values >= 0.999).float().mean())
    print(f"teacher: {t.epochs} epochs in {time.time() - t0:.0f} s, val accuracy {accuracy(teacher.plain)['val_accuracy']:.4f}, "
          f"rows with top-1 probability >= 0.999: {confident:.3f}", flush=True)

    T, s = plan_student(cfg).temperature, cfg.student.model_copy(update={"epochs": args.student_epochs})
    rows["soft_targets"] = soften(logits, T)
    out = {"teacher_val_accuracy": accuracy(teacher.plain)["val_accuracy"], "confident_rows": confident, "T": T}
    for name, clip, warmup in [("none", None, 0), ("clip 1", 1.0, 0), ("clip 5", 5.0, 0), ("clip 10", 10.0, 0),
                               ("warm-up 500 steps", None, 500)]:
        torch.manual_seed(0)
        spec = s.model_copy(update={"grad_clip_norm": clip})
        engine = Engine(build_model(spec.model, splits.input_shape, splits.num_classes, **spec.model_args), spec,
                        student_loss(make_loss("kd"), T, spec.alpha, splits.num_classes))
        steps = {"done": 0}

        def batches(epoch: int):
            for b in shuffled_batches(rows, spec.batch_size, 1000 + epoch):
                if warmup:  # linear warm-up of the learning rate over the first steps
                    for g in engine.opt.param_groups:
                        g["lr"] = spec.lr * min(1.0, (steps["done"] + 1) / warmup)
                steps["done"] += 1
                yield b

        try:
            engine.fit(spec.epochs, batches, accuracy)
            result = [{k: round(r[k], 4) for k in ("train_loss", "val_accuracy")} for r in engine.history]
        except Diverged as e:
            result = f"diverged in epoch {e.epoch} (loss {e.loss})"
        out[name] = result
        print(f"{name:20s} {result}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

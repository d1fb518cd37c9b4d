"""The paper's MNIST recipe (kd_ray/configs/mnist_paper.yaml) as a plain single-process PyTorch
script: no Ray, no kd_ray -- what the kd-ray figures in docs/results.md are compared with.

    python jobs/analysis/mnist_paper_plain.py --root /path/to/mnist [--teacher-epochs 60]
        [--student-epochs 60] [--seeds 0 1]

``--root`` holds the four IDX files (train-images-idx3-ubyte, ...; gzipped or not). The recipe:
10 % of the 60,000 training images held out for validation (stratified); a teacher MLP 1200-1200
(dropout 0.5, input dropout 0.2, inputs shifted by up to 2 pixels); students MLP 800-800 on hard
labels and on the teacher's soft targets at T = 20 (alpha 0.9); SGD with Nesterov momentum 0.9,
lr 0.05, cosine decay, batch 128, gradient norm clipped at 5 for students; every model keeps its
best validation epoch. Prints test errors per model and one JSON line with them and wall times.
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def read_idx(root: Path, name: str) -> np.ndarray:
    path = next(p for p in (root / name, root / f"{name}.gz") if p.exists())
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def mlp(hidden, dropout=0.0, input_dropout=0.0):
    layers, width = [nn.Flatten()] + ([nn.Dropout(input_dropout)] if input_dropout else []), 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def shift(x, k):
    """Each image moved by its own random offset of up to ``k`` pixels per axis (zeros filled):
    a random 28 x 28 crop of the image padded by ``k``."""
    n, size = len(x), x.shape[-1]
    padded = F.pad(x[:, 0], (k, k, k, k))
    dy, dx = torch.randint(0, 2 * k + 1, (2, n))
    rows = (dy[:, None] + torch.arange(size))[:, :, None]
    cols = (dx[:, None] + torch.arange(size))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)


@torch.no_grad()
def errors(model, x, y):
    model.eval()
    return int(sum((model(xb).argmax(1) != yb).sum() for xb, yb in zip(x.split(2048), y.split(2048))))


def train(model, x, y, epochs, loss_fn, val, jitter=0, clip=None, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    best, best_state = None, None
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(128):
            xb = shift(x[idx], jitter) if jitter else x[idx]
            loss = loss_fn(model(xb), idx)
            opt.zero_grad()
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        sched.step()
        e = errors(model, *val)
        if best is None or e < best:
            best, best_state = e, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--teacher-epochs", type=int, default=60)
    p.add_argument("--student-epochs", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    t0 = time.time()
    x = torch.from_numpy(read_idx(args.root, "train-images-idx3-ubyte").astype(np.float32) / 255).unsqueeze(1)
    y = torch.from_numpy(read_idx(args.root, "train-labels-idx1-ubyte").astype(np.int64))
    xt = torch.from_numpy(read_idx(args.root, "t10k-images-idx3-ubyte").astype(np.float32) / 255).unsqueeze(1)
    yt = torch.from_numpy(read_idx(args.root, "t10k-labels-idx1-ubyte").astype(np.int64))
    mean, std = x.mean(), x.std()
    x, xt = (x - mean) / std, (xt - mean) / std
    rng = np.random.default_rng(0)
    val_i = np.concatenate([rng.permutation(np.flatnonzero(y.numpy() == c))[: int(round(0.1 * (y == c).sum().item()))]
                            for c in range(10)])
    train_i = np.setdiff1d(np.arange(len(y)), val_i)
    xtr, ytr, val = x[train_i], y[train_i], (x[val_i], y[val_i])

    torch.manual_seed(0)
    teacher = train(mlp([1200, 1200], 0.5, 0.2), xtr, ytr, args.teacher_epochs,
                    lambda z, i: F.cross_entropy(z, ytr[i]), val, jitter=2)
    out = {"teacher_test_errors": errors(teacher, xt, yt), "teacher_seconds": time.time() - t0}
    T, alpha = 20.0, 0.9
    with torch.no_grad():
        soft = torch.cat([F.softmax(teacher(b) / T, 1) for b in xtr.split(4096)])
    for targets in ("hard", "soft"):
        out[targets] = []
        for seed in args.seeds:
            t1 = time.time()
            torch.manual_seed(seed)

            def loss(z, i):
                ce = F.cross_entropy(z, ytr[i])
                if targets == "hard":
                    return ce
                return alpha * T * T * F.kl_div(F.log_softmax(z / T, 1), soft[i], reduction="batchmean") + (1 - alpha) * ce

            student = train(mlp([800, 800]), xtr, ytr, args.student_epochs, loss, val, clip=5.0, seed=seed)
            out[targets].append({"seed": seed, "test_errors": errors(student, xt, yt), "seconds": time.time() - t1})
            print(f"{targets} student seed {seed}: {out[targets][-1]['test_errors']} test errors", flush=True)
    out["seconds"] = time.time() - t0
    print(f"teacher {out['teacher_test_errors']} test errors; hard {[r['test_errors'] for r in out['hard']]}; "
          f"soft {[r['test_errors'] for r in out['soft']]}; {out['seconds']:.0f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

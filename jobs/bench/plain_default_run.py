"""The default `kd-ray run` (kd_ray/configs/digits.yaml) written as the plain single-process
PyTorch script a user would write instead: no Ray, no kd_ray.

    python jobs/bench/plain_default_run.py [--seeds 0 1] [--threads N]

The same work as the default run: scikit-learn's digits split into 1,204 transfer, 139 validation
and 454 test images; 5 teachers (MLP 1200-1200, dropout 0.2, inputs shifted by up to 1 pixel)
for 30 epochs; the ensemble's soft targets at T = 4 (mean of the teachers' softened
probabilities); then 4 fractions x {soft, hard} x 2 seeds = 16 students (MLP 800-800, 40 epochs,
validated every 4 epochs, the best validation epoch's weights tested; hard students stop after 10
epochs without a better validation). SGD with Nesterov momentum 0.9, lr 0.05, cosine decay,
batch 64, gradient norm clipped at 5, as kd_ray's defaults. It prints one JSON line with the
seconds of each stage; jobs/bench/bench_run.py times it against `kd-ray run`.
"""
from __future__ import annotations

import argparse
import json
import math
import time

t_start = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402


def mlp(hidden, dropout=0.0):
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def shift(x, max_shift):
    """Each image moved by up to ``max_shift`` pixels, zeros filled in."""
    out = torch.zeros_like(x)
    for i, (dy, dx) in enumerate(torch.randint(-max_shift, max_shift + 1, (len(x), 2)).tolist()):
        out[i, :, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            x[i, :, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
    return out


def train(model, x, y, epochs, loss_fn, val, patience=None, every=1, jitter=0, seed=0):
    """SGD (Nesterov 0.9, lr 0.05, cosine), batch 64, clip 5; validate every ``every`` epochs and keep
    the best validation epoch's weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    best, best_epoch, best_state = -1.0, 0, None
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = shift(x[idx], jitter) if jitter else x[idx]
            loss = loss_fn(model(xb), idx)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        sched.step()
        if epoch % every and epoch < epochs:
            continue
        acc = accuracy(model, *val)
        if acc > best:
            best, best_epoch, best_state = acc, epoch, {k: v.clone() for k, v in model.state_dict().items()}
        if patience is not None and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return model, best


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def fraction_ids(y, fraction, seed):
    """ceil(fraction * n) rows per class, nested across fractions (a fixed random order per class)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        keep += list(rows[rng.permutation(len(rows))][:max(1, math.ceil(fraction * len(rows)))])
    return torch.tensor(sorted(keep))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    times, t0 = {"startup": time.time() - t_start}, time.time()

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=454, stratify=d.target, random_state=0)
    train_i, val_i = train_test_split(rest, test_size=139, stratify=d.target[rest], random_state=0)
    xt, yt, val, tst = x[train_i], y[train_i], (x[val_i], y[val_i]), (x[test], y[test])

    teachers = []
    for k in range(5):
        torch.manual_seed(k)
        m, _ = train(mlp([1200, 1200], 0.2), xt, yt, 30, lambda z, i: F.cross_entropy(z, yt[i]), val, jitter=1, seed=k)
        teachers.append(m.eval())
    times["teachers"] = time.time() - t0
    t0 = time.time()

    T, alpha = 4.0, 0.9
    with torch.no_grad():
        soft = torch.stack([F.softmax(m(xt) / T, 1) for m in teachers]).mean(0)
        ensemble_test = float((torch.stack([F.softmax(m(tst[0]) / T, 1) for m in teachers]).mean(0).argmax(1)
                               == tst[1]).float().mean())
    times["soft_targets"] = time.time() - t0
    t0 = time.time()

    rows = []
    for fraction in (0.03, 0.1, 0.3, 1.0):
        for targets in ("soft", "hard"):
            for seed in args.seeds:
                ids = fraction_ids(yt.numpy(), fraction, seed)
                xs, ys, ps = xt[ids], yt[ids], soft[ids]

                def kd(z, i, ys=ys, ps=ps):
                    ce = F.cross_entropy(z, ys[i])
                    kl = F.kl_div(F.log_softmax(z / T, 1), ps[i], reduction="batchmean") * T * T
                    return alpha * kl + (1 - alpha) * ce

                torch.manual_seed(seed)
                hard = targets == "hard"
                loss = (lambda z, i, ys=ys: F.cross_entropy(z, ys[i])) if hard else kd
                m, val_acc = train(mlp([800, 800]), xs, ys, 40, loss, val, patience=10 if hard else None,
                                   every=4, seed=seed)
                rows.append({"fraction": fraction, "targets": targets, "seed": seed, "val_accuracy": val_acc,
                             "test_accuracy": accuracy(m, *tst)})
    times["sweep"] = time.time() - t0
    times["total"] = time.time() - t_start
    print(json.dumps({"plain": times, "ensemble_test_accuracy": ensemble_test, "students": rows}))


if __name__ == "__main__":
    main()

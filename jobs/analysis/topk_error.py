"""How far soft targets re-softened from top-k teacher logits are from the dense ones.

    kd-ray teachers digits                      # a trained ensemble (or reuse a finished run's)
    python jobs/analysis/topk_error.py --config digits [--set runtime.storage_path=...] [--k 1 2 3 5]

Plain PyTorch, no Ray: loads the finished ensemble (``<storage>/<name>/teachers/ensemble.json``),
computes each teacher's dense logits on the transfer set, keeps the top k per teacher with the
tail logit (``losses.top_k_logits``), and compares the averaged soft targets at T = 1, 4 and 20
with the dense ones. Prints one JSON line per (k, T): mean and max KL(dense || top-k), max
absolute error of a soft-target entry, top-1 agreement, and cache bytes per row of each form.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_ray.core import storage  # noqa: E402
from kd_ray.core.config_files import load_config  # noqa: E402
from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.ensemble import load_ensemble, teacher_logits  # noqa: E402
from kd_ray.core.losses import dense_from_top_k, ensemble_average, top_k_logits  # noqa: E402
from kd_ray.layout import ensemble_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0, 20.0])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    paths = storage.read_json(ensemble_file(cfg))["model_paths"]
    splits = load_splits(cfg.data)
    models = load_ensemble(paths)
    images = torch.from_numpy(splits.train.images)
    with torch.no_grad():
        z = torch.cat([teacher_logits(models, images[i:i + 1024]) for i in range(0, len(images), 1024)], 1)
    per_row = z.transpose(0, 1).half().float()  # [N, K, C], as the dense cache stores them
    n, K, C = per_row.shape
    for k in args.k:
        kept = top_k_logits(per_row, k)
        rebuilt = dense_from_top_k(kept["values"], kept["index"], kept["tail"], C)
        for T in args.temperatures:
            p = ensemble_average(per_row.transpose(0, 1), T, cfg.soft_targets.rule)
            q = ensemble_average(rebuilt.transpose(0, 1), T, cfg.soft_targets.rule)
            kl = (torch.xlogy(p, p) - p * q.clamp_min(1e-30).log()).sum(-1)
            print(json.dumps({
                "dataset": cfg.data.name, "teachers": K, "classes": C, "rows": n, "k": k, "T": T,
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "max_abs_error": float((p - q).abs().max()),
                "top1_agreement": float((p.argmax(1) == q.argmax(1)).float().mean()),
                "dense_logit_bytes_per_row": K * C * 2, "topk_bytes_per_row": K * (k * 4 + 4)}), flush=True)


if __name__ == "__main__":
    main()

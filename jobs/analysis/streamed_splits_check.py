"""Do the streamed source's splits and fractions select today's ids on a real dataset?

    python jobs/analysis/streamed_splits_check.py --config fashion_mnist [--fractions 0.03 0.1 0.3]

Reads the config's source in memory (``load_splits``), writes it as sharded parquet (uint8
pixels, the source's ids; the in-memory validation rows go back into train), opens that with the
streamed reader (``open_source``: one thresholds pass, one statistics pass) and compares, id for
id, the validation, training and test splits and every nested fraction of the training split,
and the normalisation statistics. Prints one JSON line. Needs Ray (a local instance).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kd_ray.core.config_files import load_config  # noqa: E402
from kd_ray.core.data import load_splits  # noqa: E402
from kd_ray.core.subsets import select_fraction  # noqa: E402


def write_parquet(splits, root: Path, shard_rows: int = 20_000) -> None:
    """The raw uint8 pixels of train (+ val) and test, with their ids, as shards."""
    mean = np.asarray(splits.normalization["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(splits.normalization["std"], np.float32).reshape(1, -1, 1, 1)
    parts = {"train": (splits.train, splits.val), "test": (splits.test,)}
    for name, members in parts.items():
        ids = np.concatenate([m.ids for m in members])
        labels = np.concatenate([m.labels for m in members])
        raw = np.concatenate([np.rint((m.images * std + mean) * 255) for m in members]).astype(np.uint8)
        (root / name).mkdir(parents=True)
        for i, at in enumerate(np.array_split(np.arange(len(ids)), max(1, len(ids) // shard_rows))):
            flat = raw[at].reshape(len(at), -1)
            pq.write_table(pa.table({"id": ids[at], "label": labels[at], "image": pa.FixedSizeListArray.from_arrays(
                pa.array(flat.ravel()), flat.shape[1])}), root / name / f"part-{i:05d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="fashion_mnist")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    args = ap.parse_args()
    cfg = load_config(args.config, [])
    memory = load_splits(cfg.data)
    root = Path(tempfile.mkdtemp(prefix="kd_ray_streamed_check_"))
    write_parquet(memory, root)

    import ray

    from kd_ray.core.rows import SPLITS
    from kd_ray.stages.datasets import from_dataset
    from kd_ray.stages.sources import open_source

    ray.init(include_dashboard=False, log_to_driver=False)
    t0 = time.time()
    streamed_cfg = cfg.data.model_copy(update={"name": "parquet", "root": str(root),
                                               "image_shape": list(memory.input_shape)})
    source = open_source(streamed_cfg, subsets=[(f, cfg.data.seed) for f in args.fractions])
    tagged = from_dataset(source.split("all"), ("id", "split"))
    splits = {name: bool(np.array_equal(np.sort(tagged["id"][tagged["split"] == code]),
                                        np.sort(getattr(memory, name).ids)))
              for code, name in enumerate(SPLITS)}
    fractions = {}
    for f in args.fractions:
        got = np.sort(from_dataset(source.split("train", f, cfg.data.seed), ("id",))["id"])
        want = select_fraction(memory.train.ids, memory.train.labels, f, cfg.data.seed)
        fractions[str(f)] = {"equal": bool(np.array_equal(got, want)), "rows": int(len(want))}
    stats = max(abs(a - b) for k in ("mean", "std") for a, b in zip(source.normalization[k], memory.normalization[k]))
    print(json.dumps({"analysis": "streamed_splits_check", "config": args.config, "rows": source.rows,
                      "splits_equal": splits, "fractions": fractions, "max_statistics_difference": stats,
                      "streamed_seconds": round(time.time() - t0, 1)}))
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Shared by the benchmarks: the dataset they run on and how they print results."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def bench_data_config() -> tuple[list[str], str]:
    """--set overrides for the dataset: real Fashion-MNIST when installed, else a synthetic
    parquet set of the same size (60,000 + 10,000 28x28 images, 10 classes)."""
    if (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file():
        return ["data.name=fashion_mnist", f"data.root={FASHION_ROOT}"], "fashion_mnist"
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(os.environ.get("TMPDIR", "/tmp")) / "kd_ray_bench_synthetic"
    if not (root / "test.parquet").is_file():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", 60000), ("test", 10000)):
            y = rng.integers(0, 10, n)
            x = (rng.integers(0, 200, (n, 784)) // (1 + y[:, None])).astype(np.uint8)
            pq.write_table(pa.table({"image": list(x), "label": y}), root / f"{split}.parquet")
    return ["data.name=parquet", f"data.root={root}", "data.image_shape=[1, 28, 28]"], "synthetic"


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"


def emit(name: str, rows: list[tuple[str, str]], result: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {name} ({machine()}) ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"benchmark": name, **result}))

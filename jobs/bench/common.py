"""Shared by the benchmarks: the dataset they run on and how they print results."""
from __future__ import annotations

import json
import os
import platform
import tempfile
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


def bench_config(name: str, overrides: list[str]):
    """(config, dataset name) for a benchmark: the bench dataset, a fresh temporary storage."""
    from kd_ray.core.config_files import load_config

    data_sets, data_name = bench_data_config()
    root = tempfile.mkdtemp(prefix=f"kd_ray_{name}_")
    return load_config(None, [*data_sets, f"runtime.storage_path={root}", f"name={name}", *overrides]), data_name


def untrained_teachers(folder, input_shape, num_classes: int, k: int, model: str = "mlp",
                       model_args: dict | None = None) -> tuple[list, list[str]]:
    """K untrained teachers (default: MLP 1200-1200) saved as teacher checkpoints in ``folder``
    (what they cost per row, and what a cache holds, does not need their skill): (models, paths).
    The benchmarks and the streamed-path tests share it."""
    import torch

    from kd_ray.core.config import TeacherSpec
    from kd_ray.core.ensemble import save_teacher_model
    from kd_ray.core.models import build_model

    spec = TeacherSpec(model=model, model_args={"hidden": [1200, 1200]} if model_args is None else model_args)
    models, paths = [], []
    for i in range(k):
        torch.manual_seed(i)
        m = build_model(spec.model, input_shape, num_classes, **spec.model_args).eval()
        paths.append(os.path.join(str(folder), f"t{i}.pt"))
        save_teacher_model(paths[-1], f"t{i}", "bench", spec, m, num_classes, input_shape, torch.zeros(0))
        models.append(m)
    return models, paths


def machine() -> str:
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"


def emit(name: str, rows: list[tuple[str, str]], result: dict) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {name} ({machine()}) ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"benchmark": name, **result}))

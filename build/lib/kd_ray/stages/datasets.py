"""In-memory splits <-> Ray Datasets ``{id, image, label}``."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.extensions import ArrowTensorArray

from kd_ray.core.data import Split


def to_dataset(split: Split, blocks: int | None = None, extra: dict[str, np.ndarray] | None = None) -> "ray.data.Dataset":
    """A materialized Ray Dataset ``{id, image, label}`` (plus ``extra`` columns) from a split."""
    n = len(split)
    blocks = blocks or max(1, min(16, n // 2048 or 1))
    tables = []
    for part in np.array_split(np.arange(n), blocks):
        tables.append(pa.table({
            "id": pa.array(split.ids[part]),
            "image": ArrowTensorArray.from_numpy(split.images[part]),
            "label": pa.array(split.labels[part]),
            **{k: pa.array(np.asarray(v)[part]) for k, v in (extra or {}).items()},
        }))
    return ray.data.from_arrow(tables)


def from_dataset(ds: "ray.data.Dataset", columns: tuple[str, ...] = ("id", "image", "label")) -> dict[str, np.ndarray]:
    """Pull the given columns of a Ray Dataset into numpy arrays (rows in dataset order)."""
    missing = [c for c in columns if c not in ds.columns()]
    if missing:
        raise ValueError(f"dataset lacks column(s) {missing}; columns found: {ds.columns()}")
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c in columns:
            parts[c].append(np.asarray(batch[c]))
    return {c: (np.concatenate(v) if v else np.zeros((0,))) for c, v in parts.items()}

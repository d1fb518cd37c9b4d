"""Subsets that are pure functions of (seed, id): a stable 64-bit hash and nested stratified
fractions (the 3 % subset lies inside the 10 % subset, the same in every process)."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def stable_hash(ids: Iterable[int] | np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit hash of (seed, id) per id: a pure function, identical in every process."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    s = _splitmix64(np.asarray([int(seed) & _M64], dtype=np.uint64))
    return _splitmix64(ids ^ s)


def select_fraction(ids: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Nested stratified subset: the sorted ids kept at ``fraction`` in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if ids.shape != labels.shape:
        raise ValueError("ids and labels must have the same length")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    h = stable_hash(ids, seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.lexsort((ids[members], h[members]))]  # by hash, ties by id
        keep.append(ids[order[: max(1, math.ceil(fraction * len(members)))]])
    return np.sort(np.concatenate(keep)) if keep else ids[:0]



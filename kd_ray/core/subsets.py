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




# A fraction in streaming form: per class, the (hash, id) of the last id ``select_fraction`` keeps.
# A row is in the subset when its (hash, id) is at or below its class's threshold, so the subset
# of a stream is decided row by row with C numbers per fraction, never a list of ids.
def fraction_thresholds(ids: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> dict[int, tuple[int, int]]:
    """``{class: (hash, id)}``: the largest (hash, id) ``select_fraction`` keeps in each class."""
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    m = np.isin(ids, select_fraction(ids, labels, fraction, seed))
    kept, cls = ids[m], labels[m]
    h = stable_hash(kept, seed)
    out = {}
    for c in np.unique(cls):
        m = cls == c
        last = np.lexsort((kept[m], h[m]))[-1]
        out[int(c)] = (int(h[m][last]), int(kept[m][last]))
    return out


def in_fraction(ids: np.ndarray, labels: np.ndarray, thresholds: dict[int, tuple[int, int]], seed: int) -> np.ndarray:
    """Bool mask: which rows lie in the subset ``thresholds`` describes (classes it lacks: none)."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    h = stable_hash(ids, seed)
    keep = np.zeros(len(ids), dtype=bool)
    for c in np.unique(labels):
        if int(c) not in thresholds:
            continue
        th_h, th_id = thresholds[int(c)]
        m = labels == c
        th_h = np.uint64(th_h)
        keep[m] = (h[m] < th_h) | ((h[m] == th_h) & (ids[m] <= th_id))
    return keep


# the salt that keeps a bootstrap's draws apart from the subsets' hashes under the same seed
BOOTSTRAP_SALT = 0x5EED_B007
_POISSON1_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])


def bootstrap_counts(ids: np.ndarray, seed: int) -> np.ndarray:
    """How many times each row appears in a streamed bootstrap resample: Poisson(1) draws, a pure
    function of (seed, id) (the online bootstrap of Oza & Russell 2001). Over n rows the resample
    has n rows on average and leaves out ~e^-1 of them, as n draws with replacement do; the
    in-memory bootstrap draws exactly n."""
    u = (stable_hash(ids, seed ^ BOOTSTRAP_SALT) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.int64)

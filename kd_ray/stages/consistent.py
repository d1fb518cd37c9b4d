"""Consistent teaching: the teachers label the very view the student trains on, every epoch.

:func:`consistent_stream` is one lazy Ray Dataset over a run's epochs: ``(epoch, pos)`` rows in a
seeded order, turned by a :class:`ConsistentTeacher` actor pool into the shifted (and mixed) view
of each transfer row with the ensemble's soft targets on that view. A Train worker iterates it
(:mod:`kd_ray.stages.student_worker`); :func:`worker_share` gives each worker its rows.
:func:`streamed_consistent` is the same for a streamed source (``data.stream``): each epoch's
rows come from the files, are shifted by the same seeded function and labelled on that view.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data

from kd_ray.core.augment import mix, seeded_mixup, seeded_shift
from kd_ray.core.config import SoftTargetsConfig
from kd_ray.core.subsets import stable_hash
from kd_ray.stages.predictor import EnsemblePredictor, predict
from kd_ray.stages.sources import StreamedSource


class ConsistentTeacher(EnsemblePredictor):
    """The EnsemblePredictor of consistent teaching. Rows in: ``(epoch, pos)``. Rows out: transfer
    row ``pos``, shifted as (seed, epoch, id) decides and, with ``mixup`` > 0, mixed with another
    row of ``pool`` (the positions this stream trains on) as :func:`kd_ray.core.augment.seeded_mixup`
    decides (columns ``mix_label`` and ``mix_weight``), with the teachers' soft targets on that
    very view -- so the student trains on exactly the images the teachers labelled."""

    def __init__(self, rows: list, max_shift: int, seed: int, mixup: float = 0.0, pool=None, **kwargs):
        super().__init__(**kwargs)
        self.rows = ray.get(rows[0])  # {id, image, label}: read once per actor from the object store
        self.max_shift, self.seed, self.mixup = max_shift, seed, mixup
        self.pool = np.sort(np.asarray(pool, dtype=np.int64)) if mixup > 0 else None

    def view(self, pos: np.ndarray, epoch: int) -> np.ndarray:
        """The shifted images of rows ``pos`` in ``epoch``."""
        return seeded_shift(self.rows["image"][pos], self.rows["id"][pos], self.max_shift, self.seed, epoch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos, epochs = batch["pos"], batch["epoch"]
        out = {k: v[pos] for k, v in self.rows.items()}
        if self.mixup > 0:
            out["mix_label"], out["mix_weight"] = out["label"].copy(), np.ones(len(pos), np.float32)
        for e in np.unique(epochs):
            m = epochs == e
            out["image"][m] = self.view(pos[m], int(e))
            if self.mixup > 0:
                partner, lam = seeded_mixup(len(self.pool), self.mixup, self.seed, int(e))
                j = np.searchsorted(self.pool, pos[m])
                other = self.pool[partner[j]]
                out["image"][m] = mix(out["image"][m], self.view(other, int(e)), lam[j])
                out["mix_label"][m], out["mix_weight"][m] = self.rows["label"][other], lam[j]
        out["epoch"] = epochs
        return super().__call__(out)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` rows in ``epoch``: a permutation that is a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def worker_share(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Positions (into ``ids``) of the rows worker ``rank`` of ``world`` trains on: disjoint, stable."""
    if world == 1:
        return np.arange(len(ids))
    return np.flatnonzero(stable_hash(ids, 0) % np.uint64(world) == np.uint64(rank))


def consistent_stream(rows_ref, positions: np.ndarray, st: SoftTargetsConfig, model_paths: list[str],
                      epochs: Sequence[int], seed: int, counters: Sequence[str]):
    """Consistent teaching as one lazy Ray Dataset over ``epochs``: per epoch, the rows at
    ``positions`` of ``rows_ref`` (an object-store ``{id, image, label}``) in a seeded order,
    shifted (and mixed, with ``st.mixup``) and labelled on the same view by a
    :class:`ConsistentTeacher` actor pool.

    One dataset for all epochs starts the actor pool once per run (a pool per epoch would cost
    an actor start-up, seconds, every epoch). Rows come out in order, epoch by epoch (an
    ``epoch`` column), so :class:`kd_ray.core.train.EpochStream` can cut them into epochs.
    """
    positions = np.asarray(positions, dtype=np.int64)
    ds = ray.data.from_arrow([pa.table({"epoch": np.full(len(positions), e, np.int64),
                                        "pos": positions[epoch_order(len(positions), seed, e)]}) for e in epochs])
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return predict(ds, model_paths, st, "train", counters, predictor=ConsistentTeacher,
                   rows=[rows_ref], max_shift=st.jitter, seed=seed, mixup=st.mixup, pool=positions)


class StreamedConsistentTeacher(EnsemblePredictor):
    """Consistent teaching on a streamed source. Rows in: a subset's source rows, tagged with their
    ``epoch``. Rows out: the same rows in a seeded order within each epoch's part of the batch,
    each image shifted as (seed, epoch, id) decides -- the view the in-memory path makes of that
    row -- with the teachers' soft targets on it."""

    def __init__(self, max_shift: int, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.max_shift, self.seed = max_shift, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for e in dict.fromkeys(batch["epoch"].tolist()):  # epochs in stream order, each shuffled in place
            m = np.flatnonzero(batch["epoch"] == e)
            m = m[np.random.default_rng([self.seed, e, int(batch["id"][m[0]])]).permutation(len(m))]
            part = {k: np.asarray(v)[m] for k, v in batch.items()}
            part["image"] = seeded_shift(part["image"], part["id"], self.max_shift, self.seed, int(e))
            parts.append(part)
        return super().__call__({k: np.concatenate([p[k] for p in parts]) for k in batch})


def _epoch_rows(batch: dict[str, np.ndarray], epoch: int, rank: int, world: int) -> dict[str, np.ndarray]:
    """A streamed block -> this worker's rows of it, tagged with the epoch."""
    keep = np.flatnonzero(stable_hash(batch["id"], 0) % np.uint64(world) == np.uint64(rank)) if world > 1 else None
    out = {k: (v if keep is None else v[keep]) for k, v in batch.items()}
    out["epoch"] = np.full(len(out["id"]), epoch, np.int64)
    return out


def streamed_consistent(source: StreamedSource, fraction: float, data_seed: int, rank: int, world: int,
                        st: SoftTargetsConfig, model_paths: list[str], epochs: Sequence[int], seed: int,
                        counters: Sequence[str]):
    """:func:`consistent_stream` for a streamed source: per epoch, this worker's rows of the
    subset (``fraction`` under ``data_seed``) read from the files in a block order seeded by (seed,
    epoch), shuffled within each block and shifted and labelled by a
    :class:`StreamedConsistentTeacher` pool; epochs in order, one pool for all of them."""
    parts = []
    for e in epochs:
        rows = source.split("train", fraction if fraction < 1 else None, data_seed, transfer=True)
        parts.append(rows.randomize_block_order(seed=seed * 100_003 + e).map_batches(
            _epoch_rows, fn_kwargs={"epoch": e, "rank": rank, "world": world}, batch_format="numpy"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return predict(ds, model_paths, st, "train", counters, predictor=StreamedConsistentTeacher,
                   max_shift=st.jitter, seed=seed)

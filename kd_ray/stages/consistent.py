"""Consistent teaching: the teachers label the very view the student trains on, every epoch.

:func:`consistent_stream` is one lazy Ray Dataset over a run's epochs: ``(epoch, pos)`` rows in a
seeded order, turned by a :class:`ConsistentTeacher` actor pool into the shifted (and mixed) view
of each transfer row with the ensemble's soft targets on that view. A Train worker iterates it
(:mod:`kd_ray.stages.student_worker`); :func:`worker_share` gives each worker its rows.
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

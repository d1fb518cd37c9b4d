"""Soft targets of a streamed source, and a student's rows joined to them shard by shard.

``StreamedSource -> predictor pool -> <soft_targets>/<fingerprint>/rows/split=<s>/shard=<source file>/``:
one pass over every row; the cache keeps ids, labels and targets (dense soft targets and logits,
or per-teacher top-k logits) and each teacher's prediction, in one hive folder per split and
source file, never an image. The manifest has the ensemble's val/test accuracies and the bytes
per row. Nothing passes through the driver but counts.

A student's rows (:func:`student_rows`) are the source's rows of its subset, streamed, with
their targets attached by :func:`attach_targets`: for each source file in a batch it reads
that file's cache folder and takes the rows by id -- no shuffle, and a task holds one shard's
targets at a time.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.core.images import IMAGE_EXTENSIONS
from kd_ray.core.rows import SPLITS
from kd_ray.core.schema import TARGET_COLUMNS
from kd_ray.stages.counters import pass_counter
from kd_ray.stages.predictor import EnsemblePredictor, check_pool_resources, predict
from kd_ray.stages.soft_targets import (
    SCHEMA_VERSION,
    SoftTargets,
    expand_views,
    fingerprint,
    parquet_rows,
    publish,
    read_valid_cache,
    view_seed,
    work_dir,
    write_split,
)
from kd_ray.stages.sources import StreamedSource



def shard_name(path: str) -> str:
    """The cache folder of a source row's file: a parquet file's name without the extension, an
    image's class folder (a shard per class, not per image)."""
    folder, name = os.path.split(str(path))
    stem, _, ext = name.rpartition(".")
    return os.path.basename(folder) if ext.lower() in IMAGE_EXTENSIONS else stem


class StreamedPredictor(EnsemblePredictor):
    """The predictor pool's actor for a streamed source: it labels rows and shapes them into cache
    rows itself (no image, the split's name, the source file as ``shard``, each teacher's
    prediction; top-k caches keep no dense soft targets), so only those bytes leave the actor."""

    def __init__(self, drop_logits: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.drop_logits = drop_logits  # teacher_logits: none

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        del out["image"]
        if "split" in out:  # the views pass has none: every view is of a training row
            out["split"] = np.asarray(SPLITS, dtype=object)[out["split"]]
        out["shard"] = np.array([shard_name(p) for p in out.pop("path")], dtype=object)
        if "teacher_topk_index" in out:  # top-k: sorted, so each teacher's prediction comes first
            out["teacher_pred"] = out["teacher_topk_index"][:, :, 0].astype(np.int16)
            out.pop("soft_targets")
        else:
            out["teacher_pred"] = np.asarray(out["teacher_logits"], np.float32).argmax(-1).astype(np.int16)
        if self.drop_logits:
            out = {k: v for k, v in out.items() if not k.startswith("teacher_topk")}
        return out


def _accuracies(path: str, files: dict[str, list[str]]) -> dict[str, float | list[float]]:
    """The ensemble's and each teacher's accuracy on the val and test rows, from the cache."""
    out = {}
    for split in ("val", "test"):
        n, right, each = 0, 0, 0
        for rel in files[split]:
            fs, p = storage.resolve(storage.join(path, rel))
            t = pq.read_table(p, filesystem=fs, columns=["label", "ensemble_pred", "teacher_pred"])
            labels = t.column("label").to_numpy()
            n, right = n + len(labels), right + int((t.column("ensemble_pred").to_numpy() == labels).sum())
            each = each + (rows_numpy(t.column("teacher_pred")) == labels[:, None]).sum(0)
        out[f"{split}_accuracy"] = right / max(n, 1)
        out[f"teacher_{split}_accuracy"] = [float(a) for a in np.atleast_1d(each) / max(n, 1)]
    return out


def build_streamed_targets(cfg: ExperimentConfig, model_paths: list[str], source: StreamedSource) -> SoftTargets:
    """The cache of ``source`` (built, or reused when its manifest matches).
    One pass of the predictor pool over every row: the transfer set's targets for students, the
    val/test rows for the ensemble's accuracies."""
    t0 = time.time()
    teachers = load_teacher_files(model_paths)
    num_classes = int(teachers[0].blob["num_classes"])
    if num_classes != source.num_classes:
        raise ValueError(f"the teachers predict {num_classes} classes but the source {cfg.data.root} has "
                         f"{source.num_classes}; retrain the teachers for this dataset")
    st = cfg.soft_targets
    check_pool_resources(cfg)
    pass_counter(cfg.name)
    identity = source.identity()
    fp = fingerprint(teachers, cfg, identity, source.rows["train"])
    path = storage.join(layout.soft_targets_dir(cfg), fp)
    manifest = read_valid_cache(path, fp)
    if manifest is not None:
        return SoftTargets(cfg, path, manifest, list(model_paths), None, False, source=source)
    storage.delete_dir(path)
    work = work_dir(path)
    # teacher_logits: none still takes each teacher's top-1 (their accuracies), then drops it
    keep, k = ("topk", 1) if st.teacher_logits == "none" else (st.teacher_logits, st.top_k)
    labelled = predict(source.split("all", paths=True), model_paths, st.model_copy(update={"top_k": k}), "train",
                       [cfg.name], keep=keep, predictor=StreamedPredictor, drop_logits=st.teacher_logits == "none")
    written = write_split(labelled, work, "rows", partition_cols=["split", "shard"])
    files = {split: [f for f in written if f"/split={split}/" in f] for split in SPLITS}
    if st.views:  # V labelled views of every row of the views fraction: a second pass
        files["views"] = write_split(label_views(cfg, model_paths, source, keep, k), work, "views", partition_cols=["shard"])
    rows = {split: parquet_rows(work, f) for split, f in files.items()}
    size = {split: sum(storage.size(storage.join(work, f)) for f in files[split]) for split in files}
    manifest = {
        "schema": SCHEMA_VERSION, "fingerprint": fp, "streamed": True,
        "temperature": st.temperature, "rule": st.rule, "teacher_logits": st.teacher_logits, "top_k": st.top_k, "precision": st.precision,
        "teachers": [{"path": t.path, "sha256": t.sha256} for t in teachers], "num_classes": num_classes,
        "input_shape": list(source.input_shape), "normalization": source.normalization, "data": identity,
        "files": files, "rows": rows, "ensemble": _accuracies(work, files),
        "bytes_per_row": {split: round(size[split] / max(rows[split], 1), 1) for split in ("train", "views") if split in files},
        "seconds": round(time.time() - t0, 2), "views": st.views, "view_jitter": st.jitter, "view_seed": view_seed(cfg),
        "views_fraction": st.views_fraction,
    }
    publish(work, path, manifest)
    return SoftTargets(cfg, path, manifest, list(model_paths), None, True, source=source)


def label_views(cfg: ExperimentConfig, model_paths: list[str], source: StreamedSource, keep: str, k: int):
    """The views pass: each row of the views fraction (the data seed's) -> its V shifted views
    (``expand_views``, as the in-memory cache makes them), labelled and shaped into cache rows."""
    st = cfg.soft_targets
    rows = source.split("train", st.views_fraction if st.views_fraction < 1 else None, cfg.data.seed, paths=True,
                        transfer=True)
    views = rows.map_batches(expand_views, fn_kwargs={"views": st.views, "max_shift": st.jitter, "seed": view_seed(cfg)},
                             batch_format="numpy", batch_size=max(1, st.batch_size // st.views))
    return predict(views, model_paths, st.model_copy(update={"top_k": k}), "views", [cfg.name], keep=keep,
                   predictor=StreamedPredictor, drop_logits=st.teacher_logits == "none")


@functools.lru_cache(maxsize=2)
def _shard_rows(folder: str, views: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """One cache shard: its target columns, its keys (``id``; in a views cache ``id * V + view``)
    and their sort order; a worker keeps the last two it read (decoding hands it a shard in several calls)."""
    fs, path = storage.resolve(folder)
    table = pq.read_table(path, filesystem=fs)
    table = table.select([c for c in table.column_names if c in ("id", "view") or c in TARGET_COLUMNS])
    keys = table.column("id").to_numpy()
    if views:
        keys = keys * views + table.column("view").to_numpy()
    return table, keys, np.argsort(keys)


def _attach(batch: dict[str, np.ndarray], cache: str, folder: tuple[str, ...], views: int, missing: str) -> dict[str, np.ndarray]:
    """Source rows (with ``path``) -> the same rows with their cached targets, read per source file
    from ``cache``'s ``<folder>/shard=<file>/`` and taken by key; with ``views`` every view's, a view
    axis after the row's ([B, V, ...]). A row missing from its shard is an error (``missing``, with
    ``{name}`` the shard's)."""
    paths = batch.pop("path")
    names = np.array([shard_name(p) for p in paths], dtype=object)
    parts: dict[str, list] = {}
    order = []
    for name in dict.fromkeys(names):
        rows = np.flatnonzero(names == name)
        table, keys, sorter = _shard_rows(storage.join(cache, *folder, f"shard={name}"), views)
        want = batch["id"][rows] if not views else (batch["id"][rows][:, None] * views + np.arange(views)).ravel()
        at = sorter[np.minimum(np.searchsorted(keys, want, sorter=sorter), len(keys) - 1)]
        if not np.array_equal(keys[at], want):
            raise ValueError(f"soft-target cache {cache}: " + missing.format(name=name))
        taken = table.take(pa.array(at))
        for c in taken.column_names:
            if c not in ("id", "view"):
                v = rows_numpy(taken.column(c))
                parts.setdefault(c, []).append(v.reshape(len(rows), views, *v.shape[1:]) if views else v)
        order.append(rows)
    order = np.concatenate(order)
    out = {k: v[order] for k, v in batch.items()}
    for c, v in parts.items():
        out[c] = np.concatenate(v)
    return out


def attach_targets(batch: dict[str, np.ndarray], cache: str, split: str = "train") -> dict[str, np.ndarray]:
    """Source rows (with ``path``) -> the same rows with their cached targets, read per source file
    from ``cache``'s ``rows/split=<split>/shard=<file>/`` folder. A row missing from the cache is an error."""
    return _attach(batch, cache, ("rows", f"split={split}"), 0,
                   "shard {name} lacks rows of its source; delete the cache to rebuild it")


def attach_views(batch: dict[str, np.ndarray], cache: str, views: int) -> dict[str, np.ndarray]:
    """Source rows (with ``path``) -> the same rows with the targets of all V of their views ([B, V, ...]),
    read per source file from ``cache``'s ``views/shard=<file>/`` folder; a student's worker keeps one
    view per epoch."""
    return _attach(batch, cache, ("views",), views, "the views of shard {name} lack rows of the student's subset; "
                   "raise soft_targets.views_fraction or delete the cache to rebuild it")


def rows_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A tensor or fixed-size-list column as one numpy array (rows first)."""
    column = column.combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):  # Ray's tensor extension type
        return column.to_numpy_ndarray()
    return np.stack(column.to_numpy(zero_copy_only=False))


def student_rows(source: StreamedSource, cache: str, fraction: float = 1.0, seed: int = 0, split: str = "train"):
    """A student's rows, streamed: ``{id, image, label, <targets>}`` of its subset of the transfer
    set (``split="train"``), or of the validation or test split."""
    if split == "train":
        rows = source.split("train", fraction if fraction < 1 else None, seed, paths=True, transfer=True)
    else:
        rows = source.split(split, paths=True)
    return rows.map_batches(attach_targets, fn_kwargs={"cache": cache, "split": split}, batch_format="numpy")


def student_views(source: StreamedSource, cache: str, views: int, fraction: float = 1.0, seed: int = 0):
    """A cached_views student's rows, streamed: its subset's source rows, each with its V views' targets."""
    rows = source.split("train", fraction if fraction < 1 else None, seed, paths=True, transfer=True)
    return rows.map_batches(attach_views, fn_kwargs={"cache": cache, "views": views}, batch_format="numpy")

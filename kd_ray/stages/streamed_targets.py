"""Soft targets of a streamed source, and a student's rows joined to them shard by shard.

``StreamedSource -> predictor pool -> <soft_targets>/<fingerprint>/train/shard=<source file>/``:
the cache keeps ids, labels and targets (dense soft targets and logits, or per-teacher top-k
logits), grouped in one hive folder per source file; the validation and test splits only give
the ensemble's accuracies (manifest). Nothing passes through the driver but counts.

A student's rows (:func:`student_rows`) are the source's rows of its subset, streamed, with
their targets attached by :func:`attach_targets`: for each source file in a batch it reads
that file's cache folder and takes the rows by id -- no shuffle, and a task holds one shard's
targets at a time.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig
from kd_ray.core.ensemble import load_teacher_files
from kd_ray.stages.counters import pass_counter
from kd_ray.stages.soft_targets import (
    SCHEMA_VERSION,
    check_pool_resources,
    fingerprint,
    predict,
    read_valid_cache,
    top_k_columns,
    write_split,
)
from kd_ray.stages.sources import StreamedSource

TARGET_COLUMNS = ("soft_targets", "teacher_logits", "teacher_topk_values", "teacher_topk_index", "teacher_topk_tail")


def shard_name(path: str) -> str:
    """The cache folder of a source file: its name without the extension."""
    return os.path.basename(str(path)).rsplit(".", 1)[0]


def _to_cache_row(batch: dict[str, np.ndarray], k: int | None) -> dict[str, np.ndarray]:
    """A labelled batch -> what the cache keeps: no image, the source file as ``shard``."""
    batch["shard"] = np.array([shard_name(p) for p in batch.pop("path")], dtype=object)
    for c in ("image", "ensemble_pred"):
        batch.pop(c, None)
    return top_k_columns(batch, k) if k is not None and "teacher_logits" in batch else batch


def _accuracies(ds, teachers: int) -> dict[str, float | list[float]]:
    """The ensemble's and each teacher's accuracy over a labelled split, streamed."""
    n, right, each = 0, 0, np.zeros(teachers)
    for b in ds.select_columns(["label", "ensemble_pred", "teacher_logits"]).iter_batches(batch_size=None,
                                                                                          batch_format="numpy"):
        labels = b["label"]
        n, right = n + len(labels), right + int((b["ensemble_pred"] == labels).sum())
        each += (np.asarray(b["teacher_logits"], dtype=np.float32).argmax(-1) == labels[:, None]).sum(0)
    return {"accuracy": right / max(n, 1), "teacher_accuracy": [float(a) for a in each / max(n, 1)]}


def build_streamed_targets(cfg: ExperimentConfig, model_paths: list[str], source: StreamedSource) -> tuple[str, dict]:
    """The cache of ``source``'s transfer set (built, or reused when its manifest matches):
    ``(path, manifest)``."""
    t0 = time.time()
    teachers = load_teacher_files(model_paths)
    num_classes = int(teachers[0].blob["num_classes"])
    if num_classes != source.num_classes:
        raise ValueError(f"the teachers predict {num_classes} classes but the source {cfg.data.root} has "
                         f"{source.num_classes}; retrain the teachers for this dataset")
    st = cfg.soft_targets
    check_pool_resources(cfg)
    pass_counter(cfg.name)
    fp = fingerprint(teachers, cfg, source.identity(), source.rows["train"])
    root = layout.soft_targets_dir(cfg)
    path = storage.join(root, fp)
    manifest = read_valid_cache(path, fp)
    if manifest is not None:
        return path, manifest
    storage.delete_dir(path)
    local = storage.is_local(path)
    work = storage.join(root, f".{fp}.partial-{uuid.uuid4().hex[:8]}") if local else path
    k = st.top_k if st.teacher_logits == "topk" else None
    labelled = predict(source.split("train", paths=True, transfer=True), model_paths, st, "train", [cfg.name],
                       keep="dense" if k else st.teacher_logits)
    rows = labelled.map_batches(_to_cache_row, fn_kwargs={"k": k}, batch_format="numpy")
    files = {"train": write_split(rows, work, "train", partition_cols=["shard"]), "val": [], "test": []}
    ensemble = {}
    for split in ("val", "test"):
        acc = _accuracies(predict(source.split(split), model_paths, st, split, [cfg.name], keep="dense"), len(teachers))
        ensemble.update({f"{split}_accuracy": acc["accuracy"], f"teacher_{split}_accuracy": acc["teacher_accuracy"]})
    counted = sum(pq.read_metadata(storage.resolve(storage.join(work, f))[1],
                                   filesystem=storage.resolve(work)[0]).num_rows for f in files["train"])
    size = sum(storage.size(storage.join(work, f)) for f in files["train"])
    manifest = {
        "schema": SCHEMA_VERSION, "fingerprint": fp, "mode": "cached", "streamed": True,
        "temperature": st.temperature, "rule": st.rule, "keep_teacher_logits": st.keeps_logits,
        "teacher_logits": st.teacher_logits, "top_k": st.top_k, "precision": st.precision,
        "teachers": [{"path": t.path, "sha256": t.sha256} for t in teachers], "num_classes": num_classes,
        "input_shape": list(source.input_shape), "normalization": source.normalization, "data": source.identity(),
        "files": files, "rows": {"train": counted, "val": 0, "test": 0}, "ensemble": ensemble,
        "bytes_per_row": {"train": round(size / max(counted, 1), 1)}, "seconds": round(time.time() - t0, 2),
    }
    if local:
        storage.write_json(storage.join(work, "manifest.json"), manifest)
        fs, src = storage.resolve(work)
        fs.move(src, storage.resolve(path)[1])
    else:
        storage.write_json(storage.join(path, "manifest.json"), manifest)  # last
    return path, manifest


def attach_targets(batch: dict[str, np.ndarray], cache: str) -> dict[str, np.ndarray]:
    """Source rows (with ``path``) -> the same rows with their cached targets, read per source file
    from ``cache``'s ``train/shard=<file>/`` folder. A row missing from the cache is an error."""
    paths = batch.pop("path")
    names = np.array([shard_name(p) for p in paths], dtype=object)
    parts: dict[str, list] = {}
    order = []
    for name in dict.fromkeys(names):
        rows = np.flatnonzero(names == name)
        fs, folder = storage.resolve(storage.join(cache, "train", f"shard={name}"))
        table = pq.read_table(folder, filesystem=fs)
        table = table.select([c for c in table.column_names if c == "id" or c in TARGET_COLUMNS])
        ids = table.column("id").to_numpy()
        sorter = np.argsort(ids)
        at = sorter[np.minimum(np.searchsorted(ids, batch["id"][rows], sorter=sorter), len(ids) - 1)]
        if not np.array_equal(ids[at], batch["id"][rows]):
            raise ValueError(f"soft-target cache {cache}: shard {name} lacks rows of its source; delete the cache to rebuild it")
        taken = table.take(pa.array(at))
        for c in taken.column_names:
            if c != "id":
                parts.setdefault(c, []).append(_numpy(taken.column(c)))
        order.append(rows)
    order = np.concatenate(order)
    out = {k: v[order] for k, v in batch.items()}
    for c, v in parts.items():
        out[c] = np.concatenate(v)
    return out


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A tensor or fixed-size-list column as one numpy array (rows first)."""
    column = column.combine_chunks()
    if hasattr(column, "to_numpy_ndarray"):  # Ray's tensor extension type
        return column.to_numpy_ndarray()
    return np.stack(column.to_numpy(zero_copy_only=False))


def student_rows(source: StreamedSource, cache: str, fraction: float = 1.0, seed: int = 0):
    """A student's training rows, streamed: ``{id, image, label, <targets>}`` of its subset."""
    rows = source.split("train", fraction if fraction < 1 else None, seed, paths=True, transfer=True)
    return rows.map_batches(attach_targets, fn_kwargs={"cache": cache}, batch_format="numpy")

"""Stage 2: the ensemble's averaged, temperature-softened predictions through Ray Data.

``source {id, image, label} -> map_batches(EnsemblePredictor, actor pool)
-> {id, image, label, soft_targets[C], ensemble_pred, teacher_logits[K, C]?}``

Computed once, written as parquet under
``<storage>/<name>/soft_targets/<fingerprint>/{train,val,test,views}/`` with ``manifest.json``
written last. The cache keeps ids, labels and targets, not the images: reading it joins each
row to its source image by id. The fingerprint is the digest of :func:`kd_ray.core.plan.cache_identity`
(the teachers' checkpoint bytes, the data, how targets are made and kept, the views); a cache
is used only when its manifest matches and every file it lists reads back with the listed row
count, else it is rebuilt. Every cache holds the transfer set's soft targets, whatever the
teaching mode: consistent teaching (:mod:`kd_ray.stages.consistent`) labels its views again every
epoch, and reads the cache's rows only for a sweep's plain hard baseline and the cache's figures.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.data.expressions import col
from ray.data.extensions import ArrowTensorArray

from kd_ray import layout
from kd_ray.core import storage
from kd_ray.core.augment import cached_view, view_mixup
from kd_ray.core.config import ExperimentConfig
from kd_ray.core.data import Split, Splits, load_splits
from kd_ray.core.ensemble import (
    TeacherFile,
    load_teacher_files,
)
from kd_ray.core.losses import top_k_logits
from kd_ray.core.plan import cache_identity, digest
from kd_ray.core.rows import SPLITS, in_id_order
from kd_ray.stages.counters import pass_counter
from kd_ray.stages.datasets import from_dataset, to_dataset
from kd_ray.stages.predictor import check_pool_resources, predict
from kd_ray.stages.progress import Heartbeat

SCHEMA_VERSION = 4  # 3: no image column (joined from the source by id); 4: identities declared in kd_ray.core.plan


def view_seed(cfg: ExperimentConfig) -> int:
    """The seed of the cached views' shifts: the data seed, in a stream of its own."""
    return 7_919 * 1_000_003 + cfg.data.seed


def expand_views(batch: dict[str, np.ndarray], views: int, max_shift: int, seed: int, mixup: float = 0.0,
                 pool: list | None = None) -> dict[str, np.ndarray]:
    """Each row -> its ``views`` shifted views (a ``view`` column), for the predictor to label;
    with ``mixup`` > 0 each view mixed with a partner of ``pool`` (``[ref]`` of the views cache's
    rows ``{id (sorted), image, label}``): columns ``mix_id``, ``mix_label``, ``mix_weight``."""
    n = len(batch["id"])
    out = {k: np.repeat(np.asarray(v), views, axis=0) for k, v in batch.items()}
    out["view"] = np.tile(np.arange(views, dtype=np.int64), n)
    mixed = None
    if mixup > 0:
        rows = ray.get(pool[0])
        out["mix_id"], out["mix_weight"] = view_mixup(out["id"], out["view"], rows["id"], mixup, seed)
        at = np.searchsorted(rows["id"], out["mix_id"])
        out["mix_label"] = rows["label"][at]
        mixed = (rows["image"][at], out["mix_id"], out["mix_weight"])
    out["image"] = cached_view(out["image"], out["id"], out["view"], max_shift, seed, mixed)
    return out


# --------------------------------------------------------------------------- the stage
def fingerprint(teachers: list[TeacherFile], cfg: ExperimentConfig, identity: dict, transfer_rows: int) -> str:
    return digest(cache_identity(cfg, [t.sha256 for t in teachers], identity, transfer_rows, view_seed(cfg),
                                 SCHEMA_VERSION), 20)


def work_dir(path: str) -> str:
    """Where a cache for ``path`` is written: locally a hidden folder beside it, renamed into place
    by :func:`publish`; on an object store ``path`` itself, its manifest written last."""
    if not storage.is_local(path):
        return path
    root, name = path.rstrip("/").rsplit("/", 1)
    return storage.join(root, f".{name}.partial-{uuid.uuid4().hex[:8]}")


def publish(work: str, path: str, manifest: dict) -> None:
    """Make the cache written at ``work`` complete at ``path``: its manifest last."""
    storage.write_json(storage.join(work, "manifest.json"), manifest)
    if work != path:
        fs, src = storage.resolve(work)
        fs.move(src, storage.resolve(path)[1])


def parquet_rows(root: str, files: list[str]) -> int:
    """Rows in the parquet ``files`` (paths relative to ``root``), from their footers."""
    rows = 0
    for rel in files:
        fs, p = storage.resolve(storage.join(root, rel))
        with fs.open_input_file(p) as f:
            rows += pq.read_metadata(f).num_rows
    return rows


def read_valid_cache(path: str, fp: str) -> dict | None:
    """The manifest of a complete, matching cache at ``path``, or None (never a half-read)."""
    manifest_path = storage.join(path, "manifest.json")
    if not storage.exists(manifest_path):
        return None
    try:
        manifest = storage.read_json(manifest_path)
        if manifest.get("fingerprint") != fp or manifest.get("schema") != SCHEMA_VERSION:
            return None
        for split in manifest["files"]:  # train, val, test (and views)
            if parquet_rows(path, manifest["files"][split]) != manifest["rows"][split]:
                return None
    except Exception:  # unreadable manifest or parquet: treat as absent and rebuild
        return None
    return manifest


@dataclass
class SoftTargets:
    """What the student stage consumes."""

    cfg: ExperimentConfig
    path: str
    manifest: dict
    model_paths: list[str]
    transfer: Split | None  # None for a streamed source
    built: bool  # False when an existing cache was reused
    datasets: dict[str, Any] = field(default_factory=dict)  # cached splits (Ray Datasets)
    _eval: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)  # cached splits as arrays (train_arrays), shipped with this object
    source: Any = None  # the StreamedSource (data.stream): students stream its rows joined to the cache

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def describe(self) -> str:
        e = self.manifest["ensemble"]
        return (f"T={self.temperature:g}, rule={self.manifest['rule']}, "
                f"{self.manifest['rows']['train']} transfer rows, ensemble val accuracy {e['val_accuracy']:.4f}, "
                f"test accuracy {e['test_accuracy']:.4f}, {'built' if self.built else 'reused'} at {self.path}")

    def eval_arrays(self, split: str) -> dict[str, np.ndarray]:
        """``image``, ``label`` and ``ensemble_pred`` of the val or test split as numpy arrays."""
        if split not in self._eval:
            self._eval[split] = from_dataset(self.datasets[split], ("image", "label", "ensemble_pred"))
        return self._eval[split]

    def rows_fit(self, split: str, max_mb: float) -> bool:
        """Whether the cached ``split`` ("train", or "views": every view) fits ``max_mb`` in memory."""
        return split in self.datasets and self.datasets[split].size_bytes() <= max_mb * 1024**2

    def train_arrays(self, split: str = "train", ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every column of the cached ``split`` ("train", or "views") as numpy arrays, read once
        (a sweep's driver reads them before its trials, which get them with this object: a light
        trial runs no Ray Data execution); ``ids``: only those rows (every view of each)."""
        if split not in self._rows:
            self._rows[split] = in_id_order(from_dataset(self.datasets[split], tuple(self.datasets[split].columns())))
        cols = self._rows[split]
        if ids is None:
            return cols
        keep = np.isin(cols["id"], np.asarray(ids, dtype=np.int64))
        return {k: v[keep] for k, v in cols.items()}

    def transfer_rows(self, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The un-augmented transfer rows ``{id, image, label}`` as numpy arrays, optionally a subset."""
        return (self.transfer if ids is None else self.transfer.take(ids)).columns()

    def cached_rows(self, ids: np.ndarray | None = None):
        """The cached transfer rows (a Ray Dataset), optionally only those of ``ids``."""
        ds = self.datasets["train"]
        return ds if ids is None else take_ids(ds, ids)


def take_ids(ds, ids: np.ndarray):
    """The rows of ``ds`` whose id is in ``ids`` (every view of each, in a views cache)."""
    keep = np.asarray(ids, dtype=np.int64)
    return ds.map_batches(lambda b: {k: v[np.isin(b["id"], keep)] for k, v in b.items()}, batch_format="numpy")


def read_cache_split(path: str, files: list[str], source: Split):
    """A cached split joined by id to its source's images, as a materialized Ray Dataset (one
    Arrow block per file): the cache keeps ids, labels and targets, never the images (mixed views:
    their partners' images too, as ``mix_image``).

    Read with pyarrow on the driver: ``ray.data.read_parquet`` has a large fixed start-up per read
    on small machines (docs/notes.md).
    """
    order = np.argsort(source.ids, kind="stable")
    tables = []
    for rel in files:
        fs, p = storage.resolve(storage.join(path, rel))
        table = pq.read_table(p, filesystem=fs)
        ids = table.column("id").to_numpy()
        at = order[np.minimum(np.searchsorted(source.ids, ids, sorter=order), max(len(order) - 1, 0))]
        if len(ids) and not np.array_equal(source.ids[at], ids):
            raise ValueError(f"soft-target cache {path}/{rel} has ids its source does not; delete the cache to rebuild it")
        table = table.append_column("image", ArrowTensorArray.from_numpy(source.images[at]))
        if "mix_id" in table.column_names:  # mixed views: the partner's image too (rebuilt in the worker)
            mix = order[np.searchsorted(source.ids, table.column("mix_id").to_numpy(), sorter=order)]
            table = table.append_column("mix_image", ArrowTensorArray.from_numpy(source.images[mix]))
        tables.append(table)
    return ray.data.from_arrow(tables)


def write_split(ds, root: str, split: str, partition_cols: list[str] | None = None) -> list[str]:
    """Write one split's parquet files under ``root/split`` (in hive folders ``col=value/`` with
    ``partition_cols``); their paths relative to ``root``."""
    out = storage.join(root, split)
    ds.write_parquet(storage.absolute(out), partition_cols=partition_cols)
    return [f[len(root):].lstrip("/") for f in storage.list_files(out, ".parquet")]


def _compute_cache(cfg: ExperimentConfig, paths: list[str], parts: dict[str, Split], work: str) -> tuple[dict, dict]:
    """One pass of the actor pool over all splits (one pool start-up), then a write per split.

    The pass keeps every teacher's logits so that each single teacher's val/test accuracy goes
    into the manifest (the report's single-model line); the train split keeps what
    ``soft_targets.teacher_logits`` asks for (none, dense, or top-k with the tail).
    """
    codes = np.concatenate([np.full(len(parts[s]), i, np.int8) for i, s in enumerate(SPLITS)])
    source = to_dataset(Split.concat(parts[s] for s in SPLITS), extra={"split": codes})
    st = cfg.soft_targets
    done = predict(source, paths, st, "train", [cfg.name], keep="dense").materialize()
    files, accuracy = {}, {}
    for i, split in enumerate(SPLITS):
        if not len(parts[split]):
            files[split] = []
            continue
        rows = done.filter(expr=col("split") == i).drop_columns(["split", "image"])  # the source has them
        if split != "train":
            df = rows.select_columns(["label", "ensemble_pred", "teacher_logits"]).to_pandas()
            labels = df["label"].to_numpy()
            accuracy[f"{split}_accuracy"] = float((labels == df["ensemble_pred"].to_numpy()).mean())
            teacher_pred = np.stack([np.asarray(z).reshape(len(paths), -1) for z in df["teacher_logits"]]).argmax(-1)
            accuracy[f"teacher_{split}_accuracy"] = [float(a) for a in (teacher_pred == labels[:, None]).mean(0)]
        if split != "train" or st.teacher_logits == "none":
            rows = rows.drop_columns(["teacher_logits"])  # val/test: the accuracies above are all they give
        elif st.teacher_logits == "topk":
            rows = rows.map_batches(_top_k_columns, fn_kwargs={"k": st.top_k}, batch_format="numpy")
        files[split] = write_split(rows, work, split)
    if st.views and len(parts["views"]):  # V views of each row of the views fraction, labelled once
        order = np.argsort(parts["views"].ids)  # the mixup partners: the views cache's rows, sorted by id
        pool = {k: v[order] for k, v in parts["views"].columns().items()}
        mixing = {"mixup": st.mixup, "pool": [ray.put(pool)]} if st.mixup > 0 else {}
        views = to_dataset(parts["views"]).map_batches(
            expand_views, fn_kwargs={"views": st.views, "max_shift": st.jitter, "seed": view_seed(cfg), **mixing},
            batch_format="numpy", batch_size=max(1, st.batch_size // st.views))
        rows = predict(views, paths, st, "views", [cfg.name]).drop_columns(["image"])
        if st.teacher_logits == "topk":
            rows = rows.map_batches(_top_k_columns, fn_kwargs={"k": st.top_k}, batch_format="numpy")
        files["views"] = write_split(rows, work, "views")
    return files, accuracy


def _top_k_columns(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The dense ``teacher_logits`` column -> ``teacher_topk_{values,index,tail}`` (losses.top_k_logits),
    and no dense ``soft_targets`` either (at C = 1,000 they alone are 4 KB a row): students re-soften
    the top-k logits. With k >= C every logit is kept: the dense columns stay."""
    dense = np.asarray(batch["teacher_logits"], dtype=np.float32)
    if k >= dense.shape[-1]:
        return batch
    del batch["teacher_logits"]
    batch.pop("soft_targets", None)
    kept = top_k_logits(torch.from_numpy(dense), k)
    return {**batch, **{f"teacher_topk_{name}": v.numpy() for name, v in kept.items()}}


def _build(cfg: ExperimentConfig, paths: list[str], teachers: list[TeacherFile], splits: Splits, transfer: Split,
           fp: str, path: str, t0: float) -> dict:
    """Label the transfer set (cached mode), val, test and the views; publish the cache at
    ``path`` with its manifest (written last) and return the manifest."""
    storage.delete_dir(path)  # stale, partial or corrupt: rebuild from scratch
    work = work_dir(path)
    parts = {"train": transfer, "val": splits.val, "test": splits.test,
             # the views cache labels a nested fraction (all rows by default) under the data seed,
             # so every student subset up to that fraction lies inside it
             "views": transfer.fraction(cfg.soft_targets.views_fraction, cfg.data.seed) if
             cfg.soft_targets.views else transfer.take(transfer.ids[:0])}
    heart = Heartbeat("soft-targets", 1).start()  # a line a minute while the teachers label the splits
    try:
        files, accuracy = _compute_cache(cfg, paths, parts, work)
    finally:
        heart.stop()
    rows = {s: len(p) for s, p in parts.items() if s != "views"}
    if "views" in files:
        rows["views"] = len(parts["views"]) * cfg.soft_targets.views
    # what a row costs in the cache (parquet, compressed): ids, labels, targets, kept logits
    size = {s: sum(storage.size(storage.join(work, f)) for f in files[s]) for s in files}
    bytes_per_row = {s: round(size[s] / rows[s], 1) for s in files if rows[s]}
    manifest = {
        "schema": SCHEMA_VERSION, "fingerprint": fp, "temperature": cfg.soft_targets.temperature,
        "rule": cfg.soft_targets.rule, "averaging": "mean of softmax(z_k/T)" if cfg.soft_targets.rule == "probs"
        else "softmax(mean_k z_k / T)", "teacher_logits": cfg.soft_targets.teacher_logits, "top_k": cfg.soft_targets.top_k,
        "precision": cfg.soft_targets.precision,
        "teachers": [{"path": t.path, "sha256": t.sha256} for t in teachers], "num_classes": splits.num_classes,
        "input_shape": list(splits.input_shape), "normalization": splits.normalization, "data": splits.identity(), "files": files, "rows": rows,
        "ensemble": accuracy, "bytes_per_row": bytes_per_row, "seconds": round(time.time() - t0, 2),
        "views": cfg.soft_targets.views, "view_jitter": cfg.soft_targets.jitter, "view_seed": view_seed(cfg),
        "views_fraction": cfg.soft_targets.views_fraction, "view_mixup": cfg.soft_targets.mixup if
        cfg.soft_targets.views else 0.0,
    }
    publish(work, path, manifest)
    return manifest


def build_soft_targets(cfg: ExperimentConfig, ensemble, splits: Splits | None = None) -> SoftTargets:
    """Soft targets for the transfer set (and ensemble predictions for val and test).

    ``ensemble`` is an :class:`~kd_ray.stages.teachers.EnsembleResult` or a list of checkpoint paths.
    """
    t0 = time.time()
    paths = list(getattr(ensemble, "model_paths", ensemble))
    teachers = load_teacher_files(paths)  # clear errors before any Ray work
    if cfg.data.stream:
        raise ValueError("data.stream: a streamed source's soft targets come from "
                         "kd_ray.stages.streamed_targets.build_streamed_targets (kd-ray run calls it)")
    splits = splits or load_splits(cfg.data)
    num_classes = int(teachers[0].blob["num_classes"])
    if num_classes != splits.num_classes:
        raise ValueError(f"the teachers predict {num_classes} classes but dataset {splits.name!r} has "
                         f"{splits.num_classes}; retrain the teachers for this dataset")
    transfer = splits.train.filter_classes(cfg.data.omit_classes, cfg.data.keep_classes)
    if len(transfer) == 0:
        raise ValueError("the transfer set is empty (check data.omit_classes / data.keep_classes)")
    check_pool_resources(cfg)
    pass_counter(cfg.name)
    fp = fingerprint(teachers, cfg, splits.identity(), len(transfer))
    root = layout.soft_targets_dir(cfg)
    path = storage.join(root, fp)
    manifest = read_valid_cache(path, fp)
    built = manifest is None
    if built:
        manifest = _build(cfg, paths, teachers, splits, transfer, fp, path, t0)
    sources = {"train": transfer, "val": splits.val, "test": splits.test, "views": transfer}
    datasets = {split: read_cache_split(path, files, sources[split]) for split, files in manifest["files"].items() if files}
    return SoftTargets(cfg, path, manifest, paths, transfer, built, datasets)

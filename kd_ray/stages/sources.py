"""Streamed sources: sharded parquet (``read_parquet``) or an image folder (``read_images``) as
lazy Ray Datasets ``{id, image, label}``.

The driver holds the file list (an image folder's listing: path, id and label of each file), the
per-channel statistics and, per subset, one (hash, id) threshold per class -- never the images.
Rows flow from the files through ``map_batches`` (filter, decode, normalise) to whoever iterates
them (the predictor pool, a Train worker); a teacher's actor reads them itself (``iter_rows``).

Subsets equal the in-memory ones exactly: the validation split and every nested fraction are
``select_fraction`` applied per class inside one ``groupby(label).map_groups`` pass over the
``id`` and ``label`` columns, which returns each class's threshold
(:func:`kd_ray.core.subsets.fraction_thresholds`); a row is then in a subset when its (hash, id)
lies at or below its class's threshold (:func:`kd_ray.core.subsets.in_fraction`).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from kd_ray.core import storage
from kd_ray.core.config import DataConfig, ExperimentConfig
from kd_ray.core.data import VAL_SALT, given_normalization
from kd_ray.core.images import (
    DatasetNotFoundError,
    FolderListing,
    folder_classes,
    folder_images,
    folder_listing,
    image_mode,
    load_image,
    raw_images,
    to_unit,
)
from kd_ray.core.rows import (
    Thresholds,
    class_subsets,
    count_classes,
    folder_rows,
    folder_sums,
    keep_rows,
    merged_thresholds,
    normalised_rows,
    partial_sums,
    prepare_rows,
    same_shape,
)

ROWS_PER_CALL = 2048  # decoding works on this many rows at a time: a worker's memory stays that of one call


def read_parquet(paths, **kwargs) -> "ray.data.Dataset":
    """``ray.data.read_parquet`` through Ray's first parquet datasource. Ray 2.60's default (its
    "datasource v2") spends ~5 s of every read listing the files' footers with a pool of actors on a
    2-core machine, against ~0.3 s for the whole read here (docs/notes.md); both give the same rows.
    One read task a file: left to itself the datasource splits each file's block in several, and the
    split blocks starve the decoding tasks behind them of CPUs (the 600k soft-target pass ran 7x
    slower, docs/scale.md)."""
    ray.data.DataContext.get_current().use_datasource_v2 = False
    if isinstance(paths, (list, tuple)) and paths:
        kwargs.setdefault("override_num_blocks", len(paths))
    return ray.data.read_parquet(paths, **kwargs)

def source_files(cfg: DataConfig, split: str) -> list[str]:
    """The split's parquet files under ``data.root`` (``<split>.parquet`` or ``<split>/*.parquet``)."""
    single = storage.join(cfg.root, f"{split}.parquet")
    if storage.exists(single):
        return [single]
    files = storage.list_files(storage.join(cfg.root, split), ".parquet")
    if not files:
        raise DatasetNotFoundError(f"parquet: no {split}.parquet file or {split}/*.parquet under {cfg.root}; write the "
                                   f"{split} split there with columns 'id', {cfg.image_column!r} and {cfg.label_column!r}")
    return sorted(files)


@dataclass
class StreamedSource:
    """A parquet source read lazily; the stages ask it for a split (and a subset of it)."""

    cfg: DataConfig
    files: dict[str, list[str]]
    num_classes: int
    input_shape: tuple[int, int, int]
    normalization: dict  # {"mean": [...], "std": [...]} per channel, over the raw training images
    rows: dict[str, int]  # train (after the validation split), val, test
    val: Thresholds
    subsets: dict[tuple[float, int], Thresholds] = field(default_factory=dict)
    # training rows per class (after the validation split): of the whole split (key None) and of each subset
    class_rows: dict = field(default_factory=dict)
    digest: str = ""  # of the files' paths and sizes
    classes: list[str] | None = None  # an image folder's class folders (label i is classes[i])
    mode: str | None = None  # an image folder's PIL mode ("L" or "RGB", from its first image)

    @property
    def val_seed(self) -> int:
        return self.cfg.seed ^ VAL_SALT

    @property
    def folder(self) -> bool:
        """An image folder (read with ``read_images``), not parquet files."""
        return self.cfg.name == "image_folder"

    def listing(self, split: str) -> FolderListing:
        """An image folder's files of ``train`` or ``test``: listed once by this object (an actor's
        copy lists them itself), never carried in :meth:`plain`."""
        listings = self.__dict__.setdefault("_listings", {})
        if split not in listings:
            listings[split] = folder_listing(self.cfg.root, split, self.classes)
        return listings[split]

    def identity(self) -> dict:
        """What a cache must match: the files (path and size), the split sizes and the classes."""
        return {"dataset": self.cfg.name, "sizes": dict(self.rows), "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "normalization": self.normalization, "digest": self.digest}

    def _keep(self, name: str, fraction: float | None, seed: int | None, transfer: bool) -> dict:
        """What ``prepare_rows`` keeps of a block for ``split(name, fraction, seed, transfer=...)``."""
        if name == "all":  # every row once, tagged with its split (a ``split`` column of codes into SPLITS)
            return dict(val=self.val, val_seed=self.val_seed, tag=True, split="train", omit=list(self.cfg.omit_classes),
                        only=self.cfg.keep_classes)
        keep: dict = {"split": "test" if name == "test" else "train"}
        if name in ("train", "val"):
            keep.update(val=self.val, val_seed=self.val_seed, in_val=name == "val")
        if fraction is not None and fraction < 1:
            if name != "train" or (fraction, seed) not in self.subsets:
                raise ValueError(f"subset (fraction={fraction}, seed={seed}) of {name} was not prepared; "
                                 f"prepared: {sorted(self.subsets)}")
            keep.update(subset=self.subsets[(fraction, seed)], subset_seed=seed)
        if transfer:
            keep.update(omit=list(self.cfg.omit_classes), only=self.cfg.keep_classes)
        return keep

    def split(self, name: str, fraction: float | None = None, seed: int | None = None, paths: bool = False,
              transfer: bool = False) -> "ray.data.Dataset":
        """The lazy rows of ``train`` / ``val`` / ``test`` (or ``all``, tagged); ``fraction`` (with its ``seed``) narrows the
        training split to a nested stratified subset computed at :func:`open_source`; ``transfer``
        applies ``data.omit_classes`` / ``data.keep_classes``; ``paths`` adds each row's source file."""
        if name == "all":
            keep = self._keep("all", None, None, False)
            return self._read("train", paths, keep).union(self._read("test", paths, {"tag": True}))
        return self._read("test" if name == "test" else "train", paths, self._keep(name, fraction, seed, transfer))

    def iter_rows(self, name: str, fraction: float | None = None, seed: int | None = None, transfer: bool = False,
                  order_seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``split(name, fraction, seed, transfer=...)`` read in this process with pyarrow,
        ``ROWS_PER_CALL`` source rows at a time (a teacher's actor holds one call's rows, not the split);
        the files in a seeded order when ``order_seed`` is given."""
        c, keep = self.cfg, self._keep(name, fraction, seed, transfer)
        mean, std = self.normalization["mean"], self.normalization["std"]
        if self.folder:  # a seeded order of the split's images, ROWS_PER_CALL files at a time
            ls = self.listing("test" if name == "test" else "train")
            rows, split = keep_rows(ls.ids, ls.labels, keep)
            if order_seed is not None:
                rows = rows[np.random.default_rng(order_seed).permutation(len(rows))]
            for start in range(0, len(rows), ROWS_PER_CALL):
                r = rows[start:start + ROWS_PER_CALL]
                what = f"image_folder {c.root}"
                image = same_shape(folder_images([ls.paths[i] for i in r], self.mode, c.image_size, what),
                                   self.input_shape, what)
                yield normalised_rows(ls.ids[r], ls.labels[r], to_unit(image), np.arange(len(r)), split[r],
                                      mean, std, keep)
            return
        files = list(self.files["test" if name == "test" else "train"])
        if order_seed is not None:
            files = [files[i] for i in np.random.default_rng(order_seed).permutation(len(files))]
        for f in files:
            fs, path = storage.resolve(f)
            with fs.open_input_file(path) as handle:
                for batch in pq.ParquetFile(handle).iter_batches(batch_size=ROWS_PER_CALL,
                                                                 columns=["id", c.label_column, c.image_column]):
                    rows = prepare_rows(pa.Table.from_batches([batch]), c.image_column, c.label_column, c.image_shape,
                                        self.input_shape, mean, std, keep)
                    if len(rows["id"]):
                        yield rows

    def count(self, fraction: float | None = None, seed: int | None = None, transfer: bool = False) -> int:
        """The number of training rows of ``split("train", fraction, seed, transfer=...)``, from the counting pass."""
        per_class = self.class_rows[None if fraction is None or fraction >= 1 else (fraction, seed)]
        c = self.cfg
        return sum(n for k, n in per_class.items() if not transfer or (
            k not in c.omit_classes and (c.keep_classes is None or k in c.keep_classes)))

    def plain(self) -> dict:
        """This source as plain data (the config as a dict) for an actor's arguments; :meth:`from_plain` inverts it."""
        return {**{f: getattr(self, f) for f in self.__dataclass_fields__}, "cfg": self.cfg.model_dump(mode="json")}

    @classmethod
    def from_plain(cls, d: dict) -> "StreamedSource":
        return cls(**{**d, "cfg": DataConfig(**d["cfg"])})

    def _read(self, files: str, paths: bool, keep: dict) -> "ray.data.Dataset":
        c = self.cfg
        norm = dict(input_shape=self.input_shape, mean=self.normalization["mean"], std=self.normalization["std"],
                    keep=keep, paths=paths)
        if self.folder:  # only the split's images are read: the driver filters the listing by id and class
            ls = self.listing(files)
            rows, _ = keep_rows(ls.ids, ls.labels, keep)
            if not len(rows):
                raise ValueError(f"image_folder {c.root}: no images of {files} in this split or subset")
            ds = ray.data.read_images([storage.absolute(ls.paths[i]) for i in rows], include_paths=True, mode=self.mode,
                                      size=tuple(c.image_size) if c.image_size else None)
            return ds.map_batches(folder_rows, batch_format="numpy", batch_size=ROWS_PER_CALL,
                                  fn_kwargs=dict(classes=self.classes, **norm))
        ds = read_parquet(self.files[files], include_paths=paths)
        ds = ds.select_columns(["id", c.label_column, c.image_column] + (["path"] if paths else []))
        return ds.map_batches(prepare_rows, batch_format="pyarrow", batch_size=ROWS_PER_CALL, fn_kwargs=dict(
            image_column=c.image_column, label_column=c.label_column, shape=c.image_shape, **norm))


def _digest(files: dict[str, list[tuple[str, int]]]) -> str:
    """A digest of the source's files: their paths (an image's last three parts) and sizes."""
    named = {s: [("/".join(f.split("/")[-3:]), n) for f, n in fs] for s, fs in files.items()}
    return hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]


def _statistics(cfg: DataConfig, files: list[str]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Per-channel mean and std of the raw training images (``data.normalization``, or one streamed
    pass of per-block sums) and the image shape."""
    what = f"parquet {cfg.root}"
    if cfg.normalization is not None:  # given: the shape from the first rows only
        fs, path = storage.resolve(files[0])
        with fs.open_input_file(path) as handle:
            first = next(pq.ParquetFile(handle).iter_batches(batch_size=1, columns=[cfg.image_column]))
        shape = raw_images(pa.Table.from_batches([first]).column(cfg.image_column), cfg.image_shape, what).shape[1:]
        return *given_normalization(cfg, shape[0]), tuple(int(d) for d in shape)
    stats = read_parquet(files).select_columns([cfg.image_column]).map_batches(
        partial_sums, batch_format="pyarrow", batch_size=ROWS_PER_CALL,
        fn_kwargs=dict(column=cfg.image_column, shape=cfg.image_shape, what=what))
    mean, std, last = _mean_std(stats)
    return mean, std, tuple(int(d) for d in last["shape"][0])


def _mean_std(sums: "ray.data.Dataset") -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-channel mean and std from a dataset of per-block sums (``n``, ``sum``, ``sumsq``), and its last block."""
    n, total, sq, last = 0, 0.0, 0.0, {}
    for last in sums.iter_batches(batch_size=None, batch_format="numpy"):
        n, total, sq = n + last["n"].sum(), total + last["sum"].sum(0), sq + last["sumsq"].sum(0)
    mean = total / n
    return mean, np.sqrt(np.maximum(sq / n - mean * mean, 0.0)) + 1e-6, last


def open_source(cfg: DataConfig, subsets: Sequence[tuple[float, int]] = ()) -> StreamedSource:
    """List the files, take the per-channel statistics (one streamed pass over the training
    images, unless ``data.normalization`` gives them) and every subset's thresholds (one pass over
    ids and labels); read nothing else."""
    subsets = sorted({(float(f), int(s)) for f, s in subsets if f < 1})
    if cfg.name == "image_folder":
        return _open_folder(cfg, subsets)
    if cfg.name != "parquet":
        raise ValueError(f"a streamed source reads parquet or an image folder; data.name is {cfg.name!r}")
    files = {s: source_files(cfg, s) for s in ("train", "test")}
    for split, fs in files.items():
        fsys, path = storage.resolve(fs[0])
        names = pq.read_schema(fsys.open_input_file(path)).names
        missing = [c for c in ("id", cfg.label_column, cfg.image_column) if c not in names]
        if missing:
            raise ValueError(f"parquet {fs[0]}: column(s) {missing} not found; columns are {names} (a streamed source "
                             f"needs an 'id' column; set data.image_column / data.label_column)")
    per_class = read_parquet(files["train"]).select_columns(["id", cfg.label_column])
    if cfg.label_column != "label":
        per_class = per_class.rename_columns({cfg.label_column: "label"})
    # one partition per file, up to the cluster's CPUs: each costs an aggregation task
    partitions = max(1, min(len(files["train"]), int(ray.cluster_resources().get("CPU", 1))))
    counted = per_class.groupby("label", num_partitions=partitions).map_groups(
        class_subsets, batch_format="numpy",
        fn_kwargs=dict(val_fraction=cfg.val_fraction, val_seed=cfg.seed ^ VAL_SALT, subsets=subsets)).take_all()
    test_rows, test_max = 0, -1
    for b in read_parquet(files["test"]).select_columns([cfg.label_column]).iter_batches(batch_size=None):
        test_rows, test_max = test_rows + len(b[cfg.label_column]), max(test_max, int(b[cfg.label_column].max(initial=-1)))
    labels = [int(r["label"]) for r in counted]
    if min(labels) < 0:
        raise ValueError(f"parquet {cfg.root}: labels must be >= 0")
    mean, std, shape = _statistics(cfg, files["train"])
    digest = _digest({s: [(f, storage.size(f)) for f in fs] for s, fs in files.items()})
    return _assemble(cfg, files, max(max(labels), test_max) + 1, shape, mean, std, counted, test_rows, subsets, digest)


def _open_folder(cfg: DataConfig, subsets: list[tuple[float, int]]) -> StreamedSource:
    """``open_source`` of ``root/{train,test}/<class>/<image>``: the listing gives ids and labels
    (the counting pass runs on the driver's id and label arrays, 16 bytes an image); the statistics
    pass reads the training images with ``read_images``."""
    classes = folder_classes(cfg.root)
    train, test = (folder_listing(cfg.root, s, classes) for s in ("train", "test"))
    ids = np.concatenate([train.ids, test.ids])
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"image_folder {cfg.root}: two files hash to one id; rename one of them")
    counted = count_classes(train.ids, train.labels, cfg.val_fraction, cfg.seed ^ VAL_SALT, subsets)
    first = storage.read_bytes(train.paths[0])
    mode = image_mode(first)
    shape = tuple(int(d) for d in load_image(first, mode, cfg.image_size).shape)
    if cfg.normalization is not None:
        mean, std = given_normalization(cfg, shape[0])
    else:
        sums = ray.data.read_images([storage.absolute(f) for f in train.paths], mode=mode, size=tuple(
            cfg.image_size) if cfg.image_size else None).map_batches(
            folder_sums, batch_format="numpy", batch_size=ROWS_PER_CALL, fn_kwargs=dict(input_shape=shape))
        try:
            mean, std, _ = _mean_std(sums)
        except Exception as e:  # Ray Data wraps a task's error in its traceback: the CLI's one line instead
            if "set data.image_size" not in str(e):
                raise
            raise ValueError(f"image_folder {cfg.root}: images of different shapes; set data.image_size: [H, W]") from None
    root = cfg.root.rstrip("/")
    digest = _digest({"train": list(zip(train.paths, train.sizes)), "test": list(zip(test.paths, test.sizes))})
    source = _assemble(cfg, {"train": [f"{root}/train"], "test": [f"{root}/test"]}, len(classes), shape, mean, std,
                       counted, len(test.ids), subsets, digest, classes=classes, mode=mode)
    source._listings = {"train": train, "test": test}  # what the driver's reads filter
    return source


def _assemble(cfg: DataConfig, files, num_classes: int, shape, mean, std, counted: list[dict], test_rows: int,
              subsets: list[tuple[float, int]], digest: str, **folder) -> StreamedSource:
    """The source from the counting pass's per-class rows (row counts and thresholds) and the statistics."""
    rows = {"val": sum(int(r["val_rows"]) for r in counted)}
    rows["train"] = sum(int(r["rows"]) for r in counted) - rows["val"]
    rows["test"] = test_rows
    return StreamedSource(
        cfg, files, num_classes, tuple(shape), {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}, rows,
        merged_thresholds([r["val"] for r in counted]),
        {sub: merged_thresholds([r[f"subset{i}"] for r in counted]) for i, sub in enumerate(subsets)},
        {None: {int(r["label"]): int(r["rows"]) - int(r["val_rows"]) for r in counted},
         **{sub: {int(r["label"]): int(r[f"subset{i}_rows"]) for r in counted} for i, sub in enumerate(subsets)}},
        digest, **folder)


def experiment_subsets(cfg: ExperimentConfig) -> list[tuple[float, int]]:
    """Every (fraction, seed) an experiment reads: its teachers' fractions and its students'."""
    students = set(cfg.sweep.fractions) | {cfg.student.fraction}
    if cfg.soft_targets.views:  # the rows the views cache labels
        students.add(cfg.soft_targets.views_fraction)
    return sorted({(s.fraction, s.seed) for s in cfg.teachers.resolved()} | {(f, cfg.data.seed) for f in students})


@functools.lru_cache(maxsize=4)
def _open_cached(data: str, subsets: tuple) -> StreamedSource:
    return open_source(DataConfig(**json.loads(data)), subsets)


def experiment_source(cfg: ExperimentConfig) -> StreamedSource:
    """The experiment's streamed source, opened once per driver process (the teachers and the
    soft-target stage share its counting and statistics passes)."""
    return _open_cached(json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True), tuple(experiment_subsets(cfg)))

"""Datasets: sources -> in-memory splits ``{id, image, label}`` (plain numpy, no Ray).

* Sources: scikit-learn's bundled ``digits``; torchvision's ``mnist``, ``fashion_mnist``,
  ``kmnist``, ``cifar10``, ``cifar100`` read from a local ``root`` (downloaded only when
  ``data.download`` is true); ``parquet``; ``image_folder``.
* ``id`` is the sample's index in its source split (an image folder's: a hash of the file's
  ``split/class/name``, :func:`kd_ray.core.images.path_ids`), stable across runs.
* Images are float32 (C, H, W), scaled to [0, 1] and standardised per channel with the
  *training* set's mean and std, the same for train, validation and test.
* The validation split is a nested stratified fraction (:mod:`kd_ray.core.subsets`).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from kd_ray.core import storage
from kd_ray.core.images import (
    DatasetNotFoundError,
    decode_images,
    folder_classes,
    folder_images,
    folder_listing,
    image_mode,
    path_ids,
    to_unit,
)
from kd_ray.core.subsets import select_fraction

if TYPE_CHECKING:  # pragma: no cover
    from kd_ray.core.config import DataConfig

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 2015
VAL_SALT = 0x5EED_0F_7A1  # the validation split draws its ranking apart from the fractions


# --------------------------------------------------------------------------- in-memory splits
@dataclass
class Split:
    ids: np.ndarray  # int64 [N]
    images: np.ndarray  # float32 [N, C, H, W]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        if not (len(self.ids) == len(self.labels) == len(self.images)):
            raise ValueError("ids, images and labels must have the same length")

    def __len__(self) -> int:
        return len(self.ids)

    def columns(self) -> dict[str, np.ndarray]:
        """``{id, image, label}`` as numpy arrays."""
        return {"id": self.ids, "image": self.images, "label": self.labels}

    def take(self, ids: np.ndarray) -> "Split":
        """The rows whose id is in ``ids`` (order of this split)."""
        mask = np.isin(self.ids, ids)
        return Split(self.ids[mask], self.images[mask], self.labels[mask])

    def fraction(self, fraction: float, seed: int) -> "Split":
        return self.take(select_fraction(self.ids, self.labels, fraction, seed))

    @staticmethod
    def concat(parts: Iterable["Split"]) -> "Split":
        parts = list(parts)
        return Split(np.concatenate([p.ids for p in parts]), np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]))

    def filter_classes(self, omit: Iterable[int] = (), keep: Iterable[int] | None = None) -> "Split":
        mask = ~np.isin(self.labels, list(omit))
        if keep is not None:
            mask &= np.isin(self.labels, list(keep))
        return Split(self.ids[mask], self.images[mask], self.labels[mask])

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.ids, self.labels, self.images):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


@dataclass
class Splits:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    # per-channel mean and std of the raw training images: what a served model's input needs
    normalization: dict = field(default_factory=dict)
    _digest: str | None = field(default=None, repr=False)

    def identity(self) -> dict:
        """What a cache must match: the source, the split sizes and a digest of the content."""
        if self._digest is None:
            h = hashlib.sha256()
            for s in (self.train, self.val, self.test):
                h.update(s.digest().encode())
            self._digest = h.hexdigest()[:16]
        return {
            "dataset": self.name,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "digest": self._digest,
        }


# --------------------------------------------------------------------------- sources
def _digits(cfg: "DataConfig") -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = d.target.astype(np.int64)
    ids = np.arange(len(labels), dtype=np.int64)
    test_ids = select_fraction(ids, labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    is_test = np.isin(ids, test_ids)
    return (Split(ids[~is_test], images[~is_test], labels[~is_test]),
            Split(ids[is_test], images[is_test], labels[is_test]), 10)


_IDX = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], 10),
    "cifar100": ("CIFAR100", "cifar-100-python", ["train"], ["test"], 100),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX files are supported (type 0x{dtype_code:02x})")
    shape = struct.unpack(">" + "I" * ndim, data[4: 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _root(cfg: "DataConfig") -> Path:
    return Path(cfg.root).expanduser() if cfg.root else Path("data")


def _torchvision_download(cfg: "DataConfig", cls_name: str) -> None:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    for train in (True, False):
        cls(str(_root(cfg)), train=train, download=True)


def _idx_source(cfg: "DataConfig") -> tuple[Split, Split, int]:
    cls_name = _IDX[cfg.name]
    root = _root(cfg)
    if cfg.download:
        _torchvision_download(cfg, cls_name)
    # torchvision's layout (<root>/<Class>/raw/) or the files straight in <root>, .gz or not.
    candidates = [root / cls_name / "raw", root]
    for folder in candidates:
        found = {}
        for name in _IDX_FILES:
            for p in (folder / name, folder / f"{name}.gz"):
                if p.is_file():
                    found[name] = p
                    break
        if len(found) == len(_IDX_FILES):
            break
    else:
        hint = "set data.download: true (needs internet)"
        if cfg.name == "fashion_mnist":
            hint = "`apt-get install dataset-fashion-mnist` and set data.root: /usr/share/datasets/fashion-mnist, or " + hint
        raise DatasetNotFoundError(
            f"{cfg.name}: missing files under {root}. Expected {', '.join(_IDX_FILES)} (optionally .gz) "
            f"in {root / cls_name / 'raw'} (torchvision's layout) or in {root} itself. To get them: {hint}."
        )
    x_tr, y_tr, x_te, y_te = (read_idx(found[n]) for n in _IDX_FILES)
    for x, y, n in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if len(x) != len(y):
            raise ValueError(f"{cfg.name}: {n} images ({len(x)}) and labels ({len(y)}) differ in count")
    to_split = lambda x, y: Split(np.arange(len(y)), to_unit(x)[:, None], y.astype(np.int64))  # noqa: E731
    return to_split(x_tr, y_tr), to_split(x_te, y_te), 10


def _cifar_source(cfg: "DataConfig") -> tuple[Split, Split, int]:
    cls_name, folder_name, train_files, test_files, n_classes = _CIFAR[cfg.name]
    root = _root(cfg)
    if cfg.download:
        _torchvision_download(cfg, cls_name)
    folder = root / folder_name
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{cfg.name}: missing files {missing} in {folder}. Unpack the python version of "
            f"{cls_name} there (torchvision's layout), or set data.download: true (needs internet)."
        )

    def read(files: list[str]) -> Split:
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        return Split(np.arange(len(y)), to_unit(x), y)

    return read(train_files), read(test_files), n_classes


def _parquet_source(cfg: "DataConfig") -> tuple[Split, Split, int]:
    import pyarrow.parquet as pq

    from kd_ray.core.storage import resolve

    def read(split: str) -> Split:
        fs, base = resolve(cfg.root)
        for path in (f"{base}/{split}.parquet", f"{base}/{split}"):
            if fs.get_file_info(path).type.name != "NotFound":
                break
        else:
            raise DatasetNotFoundError(
                f"parquet: no {split}.parquet file or {split}/ folder under {cfg.root}; "
                f"write the {split} split there with columns {cfg.image_column!r} and {cfg.label_column!r}"
            )
        table = pq.read_table(path, filesystem=fs)
        cols = table.column_names
        for c in (cfg.image_column, cfg.label_column):
            if c not in cols:
                raise ValueError(f"parquet {path}: column {c!r} not found; columns are {cols} "
                                 f"(set data.image_column / data.label_column)")
        x = decode_images(table.column(cfg.image_column), cfg.image_shape, f"parquet {path}")
        y = table.column(cfg.label_column).to_numpy().astype(np.int64)
        ids = table.column("id").to_numpy() if "id" in cols else np.arange(len(y))
        return Split(ids, x, y)

    train, test = read("train"), read("test")
    return train, test, int(max(train.labels.max(), test.labels.max())) + 1


def _hf_source(cfg: "DataConfig") -> tuple[Split, Split, int]:
    """A Hugging Face ``datasets`` folder, local or URI: what ``DatasetDict.save_to_disk`` writes
    (``<split>/data-*.arrow``, Arrow streams) or the hub's parquet layout (``**/<split>-*.parquet``
    or ``**/<split>/*.parquet``). Images from the image column (the ``{bytes, path}`` struct, or
    any form the parquet source reads), labels from the label column; ids hash (split, row), so
    they are the same in every copy of the files; classes from the label feature's names when the
    files carry them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, base = storage.resolve(cfg.root)
    listing = [f for f in fs.get_file_info(pa.fs.FileSelector(base, recursive=True, allow_not_found=True))
               if f.type.name == "File"]

    def files_of(split: str) -> tuple[list[str], str]:
        arrow = sorted(f.path for f in listing if f.path.endswith(".arrow") and f.path.rsplit("/", 2)[-2] == split)
        if arrow:
            return arrow, "arrow"
        rel = [(f.path, f.path[len(base):].lstrip("/")) for f in listing if f.path.endswith(".parquet")]
        parquet = sorted(p for p, r in rel if r.rsplit("/", 1)[-1].startswith(f"{split}-") or f"/{split}/" in f"/{r}")
        if parquet:
            return parquet, "parquet"
        raise DatasetNotFoundError(f"hf: no {split!r} split under {cfg.root} (neither {split}/data-*.arrow from "
                                   f"save_to_disk nor {split}-*.parquet); set data.train_split / data.test_split")

    def read(split: str) -> tuple[Split, dict]:
        paths, kind = files_of(split)
        if kind == "arrow":
            tables = []
            for p in paths:
                with fs.open_input_file(p) as f:
                    tables.append(pa.ipc.open_stream(f).read_all())
        else:
            tables = [pq.read_table(p, filesystem=fs) for p in paths]
        table = pa.concat_tables(tables)
        for c in (cfg.image_column, cfg.label_column):
            if c not in table.column_names:
                raise ValueError(f"hf {cfg.root} ({split}): column {c!r} not found; columns are {table.column_names} "
                                 f"(set data.image_column / data.label_column)")
        x = decode_images(table.column(cfg.image_column), cfg.image_shape, f"hf {cfg.root} ({split})")
        y = table.column(cfg.label_column).to_numpy().astype(np.int64)
        ids = path_ids(f"{split}/{i}" for i in range(len(y)))
        return Split(ids, x, y), json.loads((table.schema.metadata or {}).get(b"huggingface", b"{}"))

    (train, meta), (test, _) = read(cfg.train_split), read(cfg.test_split)
    names = meta.get("info", {}).get("features", {}).get(cfg.label_column, {}).get("names")
    return train, test, len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1


def _image_folder_source(cfg: "DataConfig") -> tuple[Split, Split, int]:
    classes = folder_classes(cfg.root)
    listings = {s: folder_listing(cfg.root, s, classes) for s in ("train", "test")}
    mode = image_mode(storage.read_bytes(listings["train"].paths[0]))
    splits = [Split(ls.ids, to_unit(folder_images(ls.paths, mode, cfg.image_size, f"image_folder {cfg.root}/{s}")),
                    ls.labels) for s, ls in listings.items()]
    return splits[0], splits[1], len(classes)


_SOURCES = {"digits": _digits, "parquet": _parquet_source, "image_folder": _image_folder_source, "hf": _hf_source,
            **{k: _idx_source for k in _IDX}, **{k: _cifar_source for k in _CIFAR}}


def given_normalization(cfg: "DataConfig", channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``data.normalization``'s per-channel mean and std, checked against the images' channels."""
    mean, std = (np.asarray(v, np.float64) for v in (cfg.normalization.mean, cfg.normalization.std))
    if len(mean) != channels:
        raise ValueError(f"data.normalization: {len(mean)} channel(s) given, the images have {channels}")
    return mean, std


def load_splits(cfg: "DataConfig") -> Splits:
    """Read the source, carve a stratified validation split off the training set, normalise."""
    if cfg.name not in _SOURCES:
        raise ValueError(f"unknown dataset {cfg.name!r}; known datasets: {sorted(_SOURCES)}")
    train, test, num_classes = _SOURCES[cfg.name](cfg)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{cfg.name}: the train or test split is empty")
    for s, what in ((train, "train"), (test, "test")):
        if not np.isfinite(s.images).all():
            raise ValueError(f"{cfg.name}: the {what} images contain NaN or infinite values")
        if s.labels.min() < 0 or s.labels.max() >= num_classes:
            raise ValueError(f"{cfg.name}: {what} labels must lie in [0, {num_classes})")
    # The same normalisation for every split: the training set's per-channel mean and std.
    if cfg.normalization is not None:
        mean, std = (v.astype(np.float32).reshape(1, -1, 1, 1) for v in given_normalization(cfg, train.images.shape[1]))
    else:
        mean = train.images.mean(axis=(0, 2, 3), keepdims=True)
        std = train.images.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    for s in (train, test):
        s.images = ((s.images - mean) / std).astype(np.float32)
    val_ids = select_fraction(train.ids, train.labels, cfg.val_fraction, cfg.seed ^ VAL_SALT)
    val = train.take(val_ids)
    rest = ~np.isin(train.ids, val_ids)
    train = Split(train.ids[rest], train.images[rest], train.labels[rest])
    norm = {"mean": [float(v) for v in mean.ravel()], "std": [float(v) for v in std.ravel()]}
    return Splits(cfg.name, train, val, test, num_classes, tuple(int(d) for d in train.images.shape[1:]), norm)

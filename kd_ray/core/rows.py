"""The rows of a streamed split, made block by block: which rows a split or subset keeps, their
images decoded to the model's shape and normalised, and the per-block sums the counting and
statistics passes add up. Pure numpy/pyarrow: ``kd_ray.stages.sources`` runs these inside Ray
Data's ``map_batches`` and a teacher's actor."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from kd_ray.core.images import (
    channel_sums,
    class_of,
    decode_images,
    path_ids,
    raw_images,
    to_unit,
)
from kd_ray.core.subsets import fraction_thresholds, in_fraction

Thresholds = dict  # {class: (hash, id)}
SPLITS = ("train", "val", "test")  # the codes of a ``split`` column


def class_subsets(batch: dict[str, np.ndarray], val_fraction: float, val_seed: int,
                  subsets: list[tuple[float, int]]) -> dict[str, np.ndarray]:
    """One class's rows -> its row counts and its thresholds: the validation split first, then
    each (fraction, seed) of the remaining rows (the transfer set)."""
    ids, labels = batch["id"].astype(np.int64), batch["label"].astype(np.int64)
    val = fraction_thresholds(ids, labels, val_fraction, val_seed)
    rest = ~in_fraction(ids, labels, val, val_seed)
    out = {"label": labels[:1], "rows": np.array([len(ids)]), "val_rows": np.array([int((~rest).sum())]),
           "val": np.array([json.dumps(val)])}
    for i, (fraction, seed) in enumerate(subsets):
        th = fraction_thresholds(ids[rest], labels[rest], fraction, seed) if rest.any() else {}
        out[f"subset{i}"] = np.array([json.dumps(th)])
        out[f"subset{i}_rows"] = np.array([int(in_fraction(ids[rest], labels[rest], th, seed).sum()) if th else 0])
    return out


def count_classes(ids: np.ndarray, labels: np.ndarray, val_fraction: float, val_seed: int,
                  subsets: list[tuple[float, int]]) -> list[dict]:
    """The counting pass over id and label arrays held in memory: :func:`class_subsets` of each
    class, one dict of scalars per class, as a ``groupby(label).map_groups`` pass gives them."""
    counted = []
    for label in np.unique(labels):
        m = labels == label
        out = class_subsets({"id": ids[m], "label": labels[m]}, val_fraction, val_seed, subsets)
        counted.append({k: v[0] for k, v in out.items()})
    return counted


def partial_sums(batch: dict[str, np.ndarray], column: str, shape, what: str) -> dict[str, np.ndarray]:
    """Per-channel sum and sum of squares of one batch of raw images (float64), for the mean and std."""
    raw = raw_images(batch[column], shape, what)
    n, total, sq = channel_sums(raw)
    return {"n": np.array([n]), "sum": total[None], "sumsq": sq[None], "shape": np.array([list(raw.shape[1:])])}


def keep_rows(ids: np.ndarray, labels: np.ndarray, keep: dict) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of a block are in the split/subset ``keep`` describes (the validation thresholds,
    in or out, a subset's thresholds, the class filters), and every row's split code (into SPLITS)."""
    mask, split = np.ones(len(ids), dtype=bool), np.full(len(ids), SPLITS.index(keep.get("split", "test")), np.int8)
    if keep.get("val") is not None:
        in_val = in_fraction(ids, labels, keep["val"], keep["val_seed"])
        split[in_val] = SPLITS.index("val")
        if "in_val" in keep:
            mask &= in_val if keep["in_val"] else ~in_val
    if keep.get("subset") is not None:
        mask &= in_fraction(ids, labels, keep["subset"], keep["subset_seed"])
    transfer = split == SPLITS.index("train")  # the class filters narrow the transfer set only
    if keep.get("omit"):
        mask &= ~(transfer & np.isin(labels, keep["omit"]))
    if keep.get("only") is not None:
        mask &= ~transfer | np.isin(labels, keep["only"])
    return np.flatnonzero(mask), split


def normalised_rows(ids, labels, image: np.ndarray, rows, split, mean, std, keep: dict, path=None) -> dict[str, np.ndarray]:
    """The kept rows ``{id, image, label}`` (+ ``split``, ``path``), images ([0, 1] scale) normalised."""
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    out = {"id": ids[rows], "image": ((image - m) / s).astype(np.float32), "label": labels[rows]}
    if keep.get("tag"):
        out["split"] = split[rows]
    if path is not None:
        out["path"] = np.asarray(path, dtype=object)[rows]
    return out


def prepare_rows(table: pa.Table, image_column: str, label_column: str, shape, input_shape, mean: list[float],
                 std: list[float], keep: dict, paths: bool = False) -> dict[str, np.ndarray]:
    """A block of parquet rows -> the rows of one split/subset ``{id, image, label}``: filtered
    (``keep_rows``), decoded and normalised with the training set's statistics."""
    ids = table.column("id").to_numpy().astype(np.int64)
    labels = table.column(label_column).to_numpy().astype(np.int64)
    rows, split = keep_rows(ids, labels, keep)
    image = (decode_images(table.column(image_column).take(pa.array(rows)), shape, "parquet source") if len(rows)
             else np.zeros((0, *input_shape), np.float32))  # nothing of this block in the split
    path = table.column("path").to_numpy(zero_copy_only=False) if paths else None
    return normalised_rows(ids, labels, image, rows, split, mean, std, keep, path)


def to_chw(image: np.ndarray, input_shape, what: str) -> np.ndarray:
    """``read_images``' uint8 [N, H, W(, C)] -> [N, C, H, W], checked against the source's shape."""
    if image.dtype == object or image.ndim not in (3, 4):
        raise ValueError(f"{what}: images of different shapes; set data.image_size: [H, W]")
    return same_shape(image[:, None] if image.ndim == 3 else image.transpose(0, 3, 1, 2), input_shape, what)


def same_shape(image: np.ndarray, input_shape, what: str) -> np.ndarray:
    """``image`` unchanged when its shape is the source's; else one line naming data.image_size."""
    if len(image) and tuple(image.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{what}: an image of shape {tuple(image.shape[1:])}, the first was {tuple(input_shape)}; "
                         f"set data.image_size: [H, W]")
    return image


def folder_rows(batch: dict[str, np.ndarray], classes: list[str], input_shape, mean: list[float], std: list[float],
                keep: dict, paths: bool = False) -> dict[str, np.ndarray]:
    """A block of ``read_images`` rows ``{image, path}`` -> the rows of one split/subset, as
    ``prepare_rows`` makes them: ids from the paths (:func:`path_ids`), labels from the class folders."""
    index = {c: i for i, c in enumerate(classes)}
    ids = path_ids(batch["path"])
    labels = np.array([index[class_of(p)] for p in batch["path"]], dtype=np.int64)
    rows, split = keep_rows(ids, labels, keep)
    image = to_unit(to_chw(batch["image"], input_shape, "image_folder source")[rows])
    return normalised_rows(ids, labels, image, rows, split, mean, std, keep, batch["path"] if paths else None)


def folder_sums(batch: dict[str, np.ndarray], input_shape) -> dict[str, np.ndarray]:
    """``partial_sums`` of a block of ``read_images`` rows."""
    n, total, sq = channel_sums(to_chw(batch["image"], input_shape, "image_folder source"))
    return {"n": np.array([n]), "sum": total[None], "sumsq": sq[None]}


def merged_thresholds(text: np.ndarray) -> Thresholds:
    """The per-class thresholds of every class (each row of ``text``: one class's, as JSON) in one dict."""
    th = {}
    for t in text:
        th.update({int(k): tuple(v) for k, v in json.loads(t).items()})
    return th


def in_id_order(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns of cached rows in id order (by view within an id): what a student trains on must not
    depend on the order in which Ray Data wrote or read the cache's blocks."""
    order = np.lexsort((cols["view"], cols["id"])) if "view" in cols else np.argsort(cols["id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}

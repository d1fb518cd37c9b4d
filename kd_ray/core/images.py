"""Images: a parquet image column or an image folder's files -> arrays (plain numpy, no Ray).

Used by the in-memory reader (:mod:`kd_ray.core.data`) and the streamed one
(:mod:`kd_ray.stages.sources`) alike, so both make every image the same way, bit for bit.

* A parquet column: numbers (flat or nested lists, tensors) or encoded PNG/JPEG bytes (also as
  Hugging Face's ``{bytes, path}`` image struct).
* An image folder ``root/{train,test}/<class>/<image>``: listed (local or an object store), each
  file's id a hash of its ``split/class/name``, decoded as ``ray.data.read_images`` decodes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from kd_ray.core import storage


class DatasetNotFoundError(FileNotFoundError):
    """Files for a source are missing; the message names them, the folder and the fix."""


def decode_images(column, shape: list[int] | None, what: str) -> np.ndarray:
    """A parquet image column -> float32 [N, C, H, W] in [0, 1]. Accepts fixed-size or plain lists
    of numbers (flat or nested; ``shape`` reshapes flat rows), tensor columns and encoded PNG/JPEG
    bytes; integer pixels are divided by 255. Used by the in-memory and the streamed readers alike."""
    return to_unit(raw_images(column, shape, what))


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """Pixels -> float32 on the [0, 1] scale every reader uses: integer pixels are divided by 255."""
    return pixels.astype(np.float32) / (255.0 if np.issubdtype(pixels.dtype, np.integer) else 1.0)


def channel_sums(raw: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(values per channel, per-channel sum, per-channel sum of squares) of [N, C, H, W] images on
    decode_images' [0, 1] scale, in float64: what a streamed mean and std add up. Integer pixels
    count through a histogram per channel (exact, and no float copy of the batch)."""
    n = raw.shape[0] * raw.shape[2] * raw.shape[3]
    if raw.dtype == np.uint8:
        levels = np.arange(256, dtype=np.float64) / 255.0
        hist = np.stack([np.bincount(raw[:, c].ravel(), minlength=256) for c in range(raw.shape[1])])
        return n, hist @ levels, hist @ (levels * levels)
    x = raw.astype(np.float64) / (255.0 if np.issubdtype(raw.dtype, np.integer) else 1.0)
    return n, x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))


def raw_images(column, shape: list[int] | None, what: str) -> np.ndarray:
    """A parquet image column -> [N, C, H, W] in its stored dtype (PNG/JPEG decoded to uint8)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array) and pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
        column = hf_image_bytes(column, what)
    if isinstance(column, pa.Array) and (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        column = np.asarray(column.to_pylist(), dtype=object)
    if isinstance(column, pa.Array) and pa.types.is_fixed_size_list(column.type) and column.null_count == 0:
        arr = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)  # no per-row copy
    elif isinstance(column, pa.Array):
        arr = column.to_numpy(zero_copy_only=False)
    else:
        arr = np.asarray(column)
    if arr.dtype == object and len(arr) and isinstance(arr[0], (bytes, bytearray)):
        arr = _decode_encoded(arr, what)
    elif arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr]) if len(arr) else np.zeros((0, 1))
    return _images_to_chw(arr, shape, what)


def hf_image_bytes(column, what: str):
    """The encoded bytes of a Hugging Face ``Image`` column (a ``{bytes, path}`` struct per row)."""
    data = column.field("bytes")
    if data.null_count:
        raise ValueError(f"{what}: {data.null_count} images hold only a path, no bytes; save the dataset with its "
                         f"images embedded (datasets' save_to_disk / push_to_hub do) or use data.name: image_folder")
    return data


def _decode_encoded(values: np.ndarray, what: str) -> np.ndarray:
    """PNG/JPEG bytes per row -> uint8 [N, H, W] (grey) or [N, C, H, W]."""
    import io

    from PIL import Image

    out = []
    for v in values:
        a = np.asarray(Image.open(io.BytesIO(v)))
        out.append(a if a.ndim == 2 else a.transpose(2, 0, 1))
        if out[0].shape != out[-1].shape:
            raise ValueError(f"{what}: encoded images of different shapes {out[0].shape} and {out[-1].shape}")
    return np.stack(out)


def _images_to_chw(arr: np.ndarray, shape: list[int] | None, what: str) -> np.ndarray:
    if shape:
        return arr.reshape(len(arr), *shape)
    if arr.ndim == 4:
        return arr
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 2:
        side = int(round(math.sqrt(arr.shape[1])))
        if side * side == arr.shape[1]:
            return arr.reshape(len(arr), 1, side, side)
        side = int(round(math.sqrt(arr.shape[1] / 3)))
        if 3 * side * side == arr.shape[1]:
            return arr.reshape(len(arr), 3, side, side)
    raise ValueError(f"{what}: cannot infer the image shape from rows of shape {arr.shape[1:]}; set data.image_shape: [C, H, W]")


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif")  # what ray.data.read_images reads


@dataclass
class FolderListing:
    """The image files of one split of ``root/{train,test}/<class>/<image>``: path, size, id, label."""

    paths: list[str]
    sizes: list[int]
    ids: np.ndarray  # int64, ``path_ids`` of each file's split/class/name
    labels: np.ndarray  # int64, the class folder's index in the sorted class names of train/


def class_of(path: str) -> str:
    """The class folder an image file lies in (``.../<class>/<image>``)."""
    return str(path).replace("\\", "/").rsplit("/", 2)[-2]


def path_ids(paths: Iterable[str]) -> np.ndarray:
    """An image file's id: a 63-bit hash of its last three path parts (``split/class/name``), the
    same for a local copy and an object-store copy of the folder and unchanged when files are
    added; collisions at ImageNet's 1.3 M files have a chance of about 1e-7."""
    parts = ("/".join(str(p).replace("\\", "/").split("/")[-3:]) for p in paths)
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 1
                     for s in parts], dtype=np.int64)


def folder_classes(root: str) -> list[str]:
    """The sorted class folder names under ``root/train`` (local or an object store)."""
    classes = storage.class_folders(f"{str(root).rstrip('/')}/train")
    if not classes:
        raise DatasetNotFoundError(f"image_folder: expected {root}/train/<class>/<image> and "
                                   f"{root}/test/<class>/<image>; no class folders in {root}/train")
    return classes


def folder_listing(root: str, split: str, classes: list[str]) -> FolderListing:
    """List one split's images (sorted by path); their labels index ``classes`` (train/'s)."""
    files = [(p, n) for p, n in storage.list_files(f"{str(root).rstrip('/')}/{split}", sizes=True)
             if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    found = {class_of(p) for p, _ in files}
    extra = sorted(found - set(classes))
    if extra:
        raise ValueError(f"image_folder: {root}/{split} has classes not in train/: {extra}")
    if not files:
        raise DatasetNotFoundError(f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                   f"{root}/{split}/<class>/")
    index = {c: i for i, c in enumerate(classes)}
    paths = [p for p, _ in files]
    return FolderListing(paths, [n for _, n in files], path_ids(paths),
                         np.array([index[class_of(p)] for p in paths], dtype=np.int64))


def image_mode(data: bytes) -> str:
    """The mode a folder's images are read in, from its first image: ``L`` for grey, else ``RGB``."""
    import io

    from PIL import Image

    return "L" if Image.open(io.BytesIO(data)).mode in ("L", "1", "I;16", "I", "F") else "RGB"


def load_image(data: bytes, mode: str, size: list[int] | None) -> np.ndarray:
    """One encoded image -> uint8 [C, H, W], made as ``ray.data.read_images(size=, mode=)`` makes
    it (bilinear resize to (H, W), then conversion to ``mode``), so every reader agrees bit for bit."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), resample=Image.BILINEAR)
    if image.mode != mode:
        image = image.convert(mode)
    a = np.asarray(image)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def folder_images(paths: list[str], mode: str, size: list[int] | None, what: str) -> np.ndarray:
    """Read and stack the images at ``paths`` (uint8 [N, C, H, W]); different shapes need data.image_size."""
    out = [load_image(storage.read_bytes(p), mode, size) for p in paths]
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ValueError(f"{what}: images of shapes {sorted(shapes)}; set data.image_size: [H, W]")
    return np.stack(out) if out else np.zeros((0, 1, 1, 1), np.uint8)

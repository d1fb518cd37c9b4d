"""Datasets and subsets (no Ray): digits, IDX (torchvision layout), CIFAR, parquet, image folders."""
import gzip
import pickle
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kd_ray.core.config import DataConfig
from kd_ray.core.data import DatasetNotFoundError, load_splits
from kd_ray.core.images import channel_sums, decode_images
from kd_ray.core.subsets import (
    fraction_thresholds,
    in_fraction,
    select_fraction,
    stable_hash,
)


# ------------------------------------------------------------------ fractions
def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def test_fractions_are_nested():
    ids, y = np.arange(1000), _labels()
    prev = None
    for f in (0.03, 0.1, 0.3, 1.0):
        cur = set(select_fraction(ids, y, f, seed=7))
        if prev is not None:
            assert prev <= cur
        prev = cur
    assert prev == set(ids)


def test_fractions_are_stratified_with_ceil_and_at_least_one():
    ids, y = np.arange(1000), _labels()
    y[:3] = 9  # make sure class 9 exists
    sel = select_fraction(ids, y, 0.03, seed=1)
    for c in np.unique(y):
        n_c = (y == c).sum()
        assert (y[np.isin(ids, sel)] == c).sum() == max(1, int(np.ceil(0.03 * n_c)))
    rare = np.array([0, 1, 2, 3]), np.array([0, 0, 0, 1])
    assert set(select_fraction(*rare, 0.01, seed=0)) & {3} == {3}  # a class of one is kept


def test_fractions_independent_of_order_and_block_layout():
    ids, y = np.arange(500) * 3 + 11, _labels(500)
    perm = np.random.default_rng(5).permutation(500)
    assert np.array_equal(select_fraction(ids, y, 0.2, 3), select_fraction(ids[perm], y[perm], 0.2, 3))
    # computed block by block (per-class pieces) the hash ranks agree
    blocks = np.array_split(np.arange(500), 7)
    h = np.concatenate([stable_hash(ids[b], 3) for b in blocks])
    assert np.array_equal(h, stable_hash(ids, 3))
    assert not np.array_equal(select_fraction(ids, y, 0.2, 3), select_fraction(ids, y, 0.2, 4))


def test_thresholds_select_exactly_the_fractions_ids_row_by_row():
    """The streaming form of a fraction (per class, the last kept (hash, id)) keeps select_fraction's
    ids, decided one block at a time: on a Fashion-MNIST-sized label set, and nested."""
    ids = np.random.default_rng(1).permutation(10**6)[:60000]
    y = _labels(60000, 10, seed=2)
    for f in (0.03, 0.1, 0.3, 1.0):
        th = fraction_thresholds(ids, y, f, seed=9)
        assert len(th) == 10
        mask = np.concatenate([in_fraction(ids[b], y[b], th, 9) for b in np.array_split(np.arange(60000), 13)])
        assert np.array_equal(np.sort(ids[mask]), select_fraction(ids, y, f, 9))
    assert not in_fraction(ids[:5], np.full(5, 10), th, 9).any()  # a class it has no threshold for: none


def test_same_ids_in_another_process():
    code = ("import numpy as np; from kd_ray.core.subsets import select_fraction;"
            "y=np.random.default_rng(0).integers(0,10,1000);"
            "print(','.join(map(str, select_fraction(np.arange(1000), y, 0.1, 42))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    here = select_fraction(np.arange(1000), _labels(), 0.1, 42)
    assert out == ",".join(map(str, here))


def test_fraction_out_of_range():
    with pytest.raises(ValueError, match="fraction"):
        select_fraction(np.arange(3), np.zeros(3), 0.0, 0)


# ------------------------------------------------------------------ digits
def test_digits_shapes_and_counts():
    s = load_splits(DataConfig(name="digits", val_fraction=0.1))
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert 430 <= len(s.test) <= 460
    assert set(s.train.ids).isdisjoint(s.val.ids) and set(s.train.ids).isdisjoint(s.test.ids)
    assert all(np.unique(x.labels).size == 10 for x in (s.train, s.val, s.test))
    assert s.train.images.dtype == np.float32 and s.train.ids.dtype == np.int64
    # the same normalisation for train and test: train is standardised exactly
    everything = np.concatenate([s.train.images, s.val.images])
    assert abs(everything.mean()) < 1e-4 and abs(everything.std() - 1) < 1e-3
    assert abs(s.test.images.mean()) < 0.1  # test uses the training statistics
    again = load_splits(DataConfig(name="digits", val_fraction=0.1))
    assert s.identity() == again.identity()
    assert s.identity() != load_splits(DataConfig(name="digits", val_fraction=0.2)).identity()


def test_class_filters():
    s = load_splits(DataConfig(name="digits"))
    assert 3 not in s.train.filter_classes(omit=[3]).labels
    assert set(s.train.filter_classes(keep=[7, 8]).labels) == {7, 8}


# ------------------------------------------------------------------ IDX (MNIST family)
def _write_idx(path, arr, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(folder, n_train=60, n_test=20, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


def test_mnist_from_torchvision_layout(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw")
    s = load_splits(DataConfig(name="mnist", root=str(tmp_path), val_fraction=0.2))
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert len(s.train) + len(s.val) == 60 and len(s.test) == 20


def test_fashion_mnist_gz_files_in_root(tmp_path):
    _write_mnist(tmp_path, gz=True)
    s = load_splits(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert len(s.test) == 20


def test_missing_idx_files_named(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_splits(DataConfig(name="kmnist", root=str(tmp_path)))
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path / "KMNIST" / "raw") in msg and "download" in msg


def test_truncated_idx_file(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw")
    p = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path)))


# ------------------------------------------------------------------ CIFAR
def test_cifar10_from_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(np.arange(20) % 10)}, f)
    s = load_splits(DataConfig(name="cifar10", root=str(tmp_path)))
    assert s.input_shape == (3, 32, 32) and len(s.train) + len(s.val) == 100 and len(s.test) == 20
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_splits(DataConfig(name="cifar100", root=str(tmp_path)))


# ------------------------------------------------------------------ parquet & image folders
def test_parquet_source(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("test", 10)):
        pq.write_table(pa.table({"pixels": [rng.integers(0, 256, 64).tolist() for _ in range(n)],
                                 "y": (np.arange(n) % 5).tolist()}), tmp_path / f"{split}.parquet")
    s = load_splits(DataConfig(name="parquet", root=str(tmp_path), image_column="pixels", label_column="y"))
    assert s.input_shape == (1, 8, 8) and s.num_classes == 5 and len(s.test) == 10
    uri = load_splits(DataConfig(name="parquet", root=f"file://{tmp_path}", image_column="pixels", label_column="y"))
    assert uri.identity() == s.identity()
    with pytest.raises(ValueError, match=r"column 'image' not found; columns are \['pixels', 'y'\]"):
        load_splits(DataConfig(name="parquet", root=str(tmp_path)))


def test_image_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    s = load_splits(DataConfig(name="image_folder", root=str(tmp_path), val_fraction=0.25))
    assert s.input_shape == (3, 6, 6) and s.num_classes == 3
    assert len(s.train) + len(s.val) == 12 and len(s.test) == 6
    with pytest.raises(DatasetNotFoundError, match="train/<class>"):
        load_splits(DataConfig(name="image_folder", root=str(tmp_path / "nothing")))


def test_image_encodings_decode_to_the_same_images():
    """PNG bytes, uint8 rows (fixed-size or plain lists) and float rows decode alike; shape inferred or given."""
    import io

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a.transpose(1, 2, 0)).save(buf, format="PNG")
        return buf.getvalue()

    want = pixels.astype(np.float32) / 255
    flat = pixels.reshape(5, -1)
    got = {
        "png": decode_images(pa.chunked_array([pa.array([png(a) for a in pixels], type=pa.binary())]), None, "t"),
        "fixed": decode_images(pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), 192), [3, 8, 8], "t"),
        "list": decode_images(pa.array(list(flat)), None, "t"),  # 192 = 3 x 8 x 8, inferred
        "float": decode_images(np.asarray(want.reshape(5, -1)), [3, 8, 8], "t"),
    }
    for name, x in got.items():
        assert x.dtype == np.float32 and np.allclose(x, want, atol=1e-6), name
    with pytest.raises(ValueError, match="cannot infer the image shape"):
        decode_images(pa.array([[1, 2, 3, 4, 5]] * 2), None, "parquet x")
    # a streamed mean and std add up per-channel sums: a histogram for uint8, floats otherwise
    for raw in (pixels, want):
        n, total, sq = channel_sums(raw)
        assert n == 5 * 64
        np.testing.assert_allclose(total / n, want.astype(np.float64).mean((0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(sq / n, (want.astype(np.float64) ** 2).mean((0, 2, 3)), rtol=1e-6)


# ------------------------------------------------------------------ Hugging Face datasets
def _hf_dataset(n_train=40, n_test=12):
    """A real `datasets` DatasetDict: PNG images (the Image feature: {bytes, path}) and a ClassLabel
    with 4 names, of which the rows use 3; the test split is called "validation"."""
    import datasets

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n_train + n_test, 8, 8), dtype=np.uint8)
    labels = (np.arange(n_train + n_test) % 3).astype(np.int64)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c", "d"])})

    def part(lo, hi):
        return datasets.Dataset.from_dict({"img": [Image.fromarray(p) for p in pixels[lo:hi]],
                                           "label": labels[lo:hi].tolist()}, features=features)

    return datasets.DatasetDict({"train": part(0, n_train), "validation": part(n_train, n_train + n_test)}), pixels, labels


def test_hf_save_to_disk_and_hub_parquet_read_the_same_rows_and_ids(tmp_path):
    import shutil

    dd, _, labels = _hf_dataset()
    dd.save_to_disk(str(tmp_path / "disk"))
    for split, ds in dd.items():  # the hub's layout: data/<split>-00000-of-00001.parquet
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    cfg = dict(name="hf", image_column="img", test_split="validation", val_fraction=0.25)
    disk = load_splits(DataConfig(root=str(tmp_path / "disk"), **cfg))
    hub = load_splits(DataConfig(root=str(tmp_path / "hub"), **cfg))
    assert disk.num_classes == 4 and disk.input_shape == (1, 8, 8)  # the label feature's names, not max + 1
    for a, b in ((disk.train, hub.train), (disk.val, hub.val), (disk.test, hub.test)):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels) and np.array_equal(a.images, b.images)
    assert len(disk.test) == 12 and sorted(disk.test.labels) == sorted(labels[40:])  # the "validation" rows
    every = np.concatenate([disk.train.ids, disk.val.ids, disk.test.ids])
    assert len(set(every.tolist())) == 52  # ids distinct across splits
    shutil.copytree(tmp_path / "disk", tmp_path / "copy")  # a copy elsewhere: the same ids
    copy = load_splits(DataConfig(root=str(tmp_path / "copy"), **cfg))
    assert np.array_equal(copy.test.ids, disk.test.ids) and np.array_equal(copy.train.ids, disk.train.ids)
    with pytest.raises(DatasetNotFoundError, match="no 'test' split .* set data.train_split / data.test_split"):
        load_splits(DataConfig(name="hf", root=str(tmp_path / "disk"), image_column="img"))
    with pytest.raises(ValueError, match="column 'image' not found"):
        load_splits(DataConfig(name="hf", root=str(tmp_path / "disk"), test_split="validation"))


def test_the_parquet_source_reads_the_hf_image_struct_and_names_images_without_bytes(tmp_path):
    dd, pixels, _ = _hf_dataset()
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(str(tmp_path / "pq" / "train.parquet"))
    dd["validation"].to_parquet(str(tmp_path / "pq" / "test.parquet"))
    splits = load_splits(DataConfig(name="parquet", root=str(tmp_path / "pq"), image_column="img"))
    assert splits.input_shape == (1, 8, 8) and len(splits.test) == 12
    x = decode_images(pq.read_table(tmp_path / "pq" / "test.parquet").column("img"), None, "t")
    assert np.allclose(x[:, 0], pixels[40:] / 255.0)
    paths_only = pa.array([{"bytes": None, "path": "a.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    with pytest.raises(ValueError, match="1 images hold only a path"):
        decode_images(paths_only, None, "t")
    with pytest.raises(ValueError, match="stream: an hf source is read into memory"):
        DataConfig(name="hf", root=str(tmp_path), stream=True)


def test_a_streamed_bootstrap_draws_poisson_counts_per_id():
    from kd_ray.core.subsets import bootstrap_counts

    ids = np.arange(200_000)
    c = bootstrap_counts(ids, 3)
    assert np.array_equal(c, bootstrap_counts(ids, 3))  # a pure function of (seed, id): the same in every process
    assert np.array_equal(c[::-1], bootstrap_counts(ids[::-1], 3))  # and of the row, not its position
    assert abs(c.mean() - 1) < 0.01 and abs((c == 0).mean() - np.exp(-1)) < 0.005  # as n draws with replacement
    assert not np.array_equal(c, bootstrap_counts(ids, 4))  # each teacher its own resample

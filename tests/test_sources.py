"""Streamed parquet sources: lazy splits and subsets equal to the in-memory ones, row for row.
(Decoding of each image encoding and the threshold math are tested without Ray in test_data.py
and test_rows.py.)"""
import numpy as np
import pytest

from kd_ray.core.config import DataConfig
from kd_ray.core.data import load_splits
from kd_ray.core.subsets import select_fraction
from tests.fixtures.factories import digits_parquet

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(ds) -> dict[str, np.ndarray]:
    from kd_ray.stages.datasets import from_dataset

    rows = from_dataset(ds, ("id", "image", "label") + (("split",) if "split" in ds.columns() else ()))
    order = np.argsort(rows["id"])
    return {k: v[order] for k, v in rows.items()}


def test_streamed_digits_equal_in_memory(tmp_path):
    """Validation, training and test splits, nested fractions, normalisation statistics and class
    filters of a streamed digits source (float rows, two shards per split) are today's in-memory
    ones (ids exactly; images to float precision)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd_ray.core.rows import SPLITS
    from kd_ray.stages.sources import open_source

    root = digits_parquet(tmp_path / "digits")
    memory = load_splits(DataConfig(name="digits", seed=3))
    cfg = DataConfig(name="parquet", root=root, seed=3, omit_classes=[3], image_shape=[1, 8, 8])
    src = open_source(cfg, subsets=[(0.03, 0), (0.1, 5)])
    assert src.num_classes == 10 and src.input_shape == (1, 8, 8)
    assert src.rows == {"train": len(memory.train), "val": len(memory.val), "test": len(memory.test)}
    np.testing.assert_allclose(src.normalization["mean"], memory.normalization["mean"], rtol=1e-5)
    np.testing.assert_allclose(src.normalization["std"], memory.normalization["std"], rtol=1e-4)
    tagged = _rows(src.split("all"))  # every row once, with its split (the class filter narrows train only)
    for code, name in enumerate(SPLITS):
        got, want = {k: v[tagged["split"] == code] for k, v in tagged.items()}, getattr(memory, name)
        if name == "train":
            want = want.filter_classes(omit=[3])
        order = np.argsort(want.ids)
        assert np.array_equal(got["id"], want.ids[order]), name
        assert np.array_equal(got["label"], want.labels[order]), name
        np.testing.assert_allclose(got["image"], want.images[order], atol=1e-4)
    transfer = memory.train.filter_classes(omit=[3])
    for fraction, seed in ((0.03, 0), (0.1, 5)):
        got = _rows(src.split("train", fraction, seed, transfer=True))["id"]
        assert np.array_equal(got, select_fraction(transfer.ids, transfer.labels, fraction, seed))
    with pytest.raises(ValueError, match="fraction=0.3"):
        src.split("train", 0.3, 0)

    (tmp_path / "noid" / "train").mkdir(parents=True)
    for path in (tmp_path / "noid" / "train" / "a.parquet", tmp_path / "noid" / "test.parquet"):
        pq.write_table(pa.table({"label": [0, 1], "image": [[0.0] * 4] * 2}), path)
    with pytest.raises(ValueError, match=r"column\(s\) \['id'\] not found"):
        open_source(DataConfig(name="parquet", root=str(tmp_path / "noid")))



def test_rows_read_in_process_and_given_statistics(tmp_path):
    """What a teacher's actor reads (``iter_rows``: pyarrow, no Ray tasks) is the in-memory split,
    the counting pass's numbers are their sizes, the source crosses to an actor as plain data, and
    statistics given in the config replace the statistics pass."""
    import dataclasses

    from kd_ray.stages.sources import StreamedSource, open_source

    root = digits_parquet(tmp_path / "digits", shards=4)
    memory = load_splits(DataConfig(name="digits", seed=3, normalization={"mean": [0.5], "std": [0.25]}))
    src = open_source(DataConfig(name="parquet", root=root, seed=3, omit_classes=[3], image_shape=[1, 8, 8],
                                 normalization={"mean": [0.5], "std": [0.25]}), subsets=[(0.1, 5)])
    assert src.normalization == {"mean": [0.5], "std": [0.25]} and src.input_shape == (1, 8, 8)
    transfer = memory.train.filter_classes(omit=[3])
    cases = {("val", None, None, False): memory.val, ("test", None, None, False): memory.test,
             ("train", None, None, False): memory.train,
             ("train", 0.1, 5, True): transfer.take(select_fraction(transfer.ids, transfer.labels, 0.1, 5))}
    for (name, fraction, seed, keep), want in cases.items():
        blocks = list(src.iter_rows(name, fraction, seed, keep))
        got = {k: np.concatenate([b[k] for b in blocks]) for k in ("id", "image", "label")}
        order, mine = np.argsort(got["id"]), np.argsort(want.ids)
        assert np.array_equal(got["id"][order], want.ids[mine]) and np.array_equal(got["label"][order], want.labels[mine])
        np.testing.assert_allclose(got["image"][order], want.images[mine], atol=1e-5)
        if name == "train":
            assert src.count(fraction, seed, keep) == len(want)
    firsts = {int(next(src.iter_rows("train", order_seed=s))["id"][0]) for s in range(6)}
    assert len(firsts) > 1  # the file order follows the seed
    assert StreamedSource.from_plain(src.plain()) == src
    other = dataclasses.replace(src, normalization={"mean": [0.4], "std": [0.25]})
    assert other.identity() != src.identity()  # teachers and caches follow the statistics
    with pytest.raises(ValueError, match=r"data.normalization: 3 channel\(s\) given, the images have 1"):
        open_source(DataConfig(name="parquet", root=root, image_shape=[1, 8, 8],
                               normalization={"mean": [0.5] * 3, "std": [0.25] * 3}))


def test_streamed_image_folder_equals_in_memory(tmp_path):
    """An image folder streamed with ``read_images`` (and read in a teacher's actor) gives the
    in-memory image folder's splits, fractions, images and statistics; ids are hashes of the
    files' split/class/name, so they survive a copy of the folder elsewhere; a resize agrees bit
    for bit; images of different sizes without data.image_size name the field."""
    import shutil

    from PIL import Image

    from kd_ray.core.images import path_ids
    from kd_ray.core.rows import SPLITS
    from kd_ray.stages.sources import open_source
    from tests.fixtures.factories import digits_folder

    root = digits_folder(tmp_path / "digits")
    for size in (None, [6, 6]):
        cfg = DataConfig(name="image_folder", root=root, seed=3, omit_classes=[3], image_size=size)
        memory = load_splits(cfg)
        src = open_source(cfg, subsets=[(0.1, 5)])
        assert src.num_classes == 10 and src.mode == "L" and src.input_shape == memory.input_shape
        assert src.rows == {"train": len(memory.train), "val": len(memory.val), "test": len(memory.test)}
        np.testing.assert_allclose(src.normalization["mean"], memory.normalization["mean"], rtol=1e-5)
        np.testing.assert_allclose(src.normalization["std"], memory.normalization["std"], rtol=1e-4)
        tagged = _rows(src.split("all"))
        for code, name in enumerate(SPLITS):
            got, want = {k: v[tagged["split"] == code] for k, v in tagged.items()}, getattr(memory, name)
            if name == "train":
                want = want.filter_classes(omit=[3])
            order = np.argsort(want.ids)
            assert np.array_equal(got["id"], want.ids[order]) and np.array_equal(got["label"], want.labels[order])
            np.testing.assert_allclose(got["image"], want.images[order], atol=1e-4)
        transfer = memory.train.filter_classes(omit=[3])
        want = select_fraction(transfer.ids, transfer.labels, 0.1, 5)
        assert np.array_equal(_rows(src.split("train", 0.1, 5, transfer=True))["id"], want)
        read = list(src.iter_rows("train", 0.1, 5, True, order_seed=1))
        got = {k: np.concatenate([b[k] for b in read]) for k in ("id", "image", "label")}
        order, mine = np.argsort(got["id"]), np.argsort(memory.train.ids)
        assert np.array_equal(got["id"][order], want) and src.count(0.1, 5, True) == len(want)
        sorted_train = memory.train.images[mine][np.isin(memory.train.ids[mine], want)]
        np.testing.assert_allclose(got["image"][order], sorted_train, atol=1e-5)
    assert path_ids([f"{root}/train/3/0007.png"]) == path_ids(["s3://bucket/x/train/3/0007.png"])
    copy = shutil.copytree(root, tmp_path / "copy")
    assert open_source(DataConfig(name="image_folder", root=str(copy), seed=3)).identity() == \
        open_source(DataConfig(name="image_folder", root=root, seed=3)).identity()

    Image.new("L", (9, 9)).save(tmp_path / "digits" / "train" / "0" / "big.png")
    with pytest.raises(ValueError, match=r"set data.image_size"):
        load_splits(DataConfig(name="image_folder", root=root))
    with pytest.raises(ValueError, match=r"images of different shapes; set data.image_size"):
        open_source(DataConfig(name="image_folder", root=root))  # its statistics pass reads them

"""The rows of a streamed split, block by block, without Ray: what a split or subset keeps, the
counting pass's thresholds, decoding and normalisation of parquet and image-folder blocks."""
import numpy as np
import pyarrow as pa
import pytest

from kd_ray.core.images import path_ids
from kd_ray.core.rows import (
    SPLITS,
    count_classes,
    folder_rows,
    keep_rows,
    merged_thresholds,
    prepare_rows,
)
from kd_ray.core.subsets import select_fraction


def _counted(ids, labels, val_fraction, val_seed, subsets):
    """The counting pass as an image folder's source runs it, and its thresholds merged."""
    per_class = count_classes(ids, labels, val_fraction, val_seed, subsets)
    val = merged_thresholds([r["val"] for r in per_class])
    subs = [merged_thresholds([r[f"subset{i}"] for r in per_class]) for i in range(len(subsets))]
    return per_class, val, subs


def test_counting_pass_thresholds_keep_exactly_the_in_memory_splits_and_subsets():
    rng = np.random.default_rng(0)
    ids = rng.permutation(5_000)[:1_200].astype(np.int64)
    labels = rng.integers(0, 7, len(ids)).astype(np.int64)
    per_class, val, (sub,) = _counted(ids, labels, 0.2, 11, [(0.1, 3)])
    val_ids = select_fraction(ids, labels, 0.2, 11)  # as core.data.load_splits draws it
    rest = ~np.isin(ids, val_ids)
    assert sum(int(r["val_rows"]) for r in per_class) == len(val_ids)

    rows, split = keep_rows(ids, labels, {"val": val, "val_seed": 11, "in_val": True, "split": "train"})
    assert np.array_equal(np.sort(ids[rows]), val_ids)
    assert set(split[rows]) == {SPLITS.index("val")} and set(split[rest]) == {SPLITS.index("train")}
    train = {"val": val, "val_seed": 11, "in_val": False, "split": "train"}
    rows, _ = keep_rows(ids, labels, {**train, "subset": sub, "subset_seed": 3})
    assert np.array_equal(np.sort(ids[rows]), select_fraction(ids[rest], labels[rest], 0.1, 3))
    assert sum(int(r["subset0_rows"]) for r in per_class) == len(rows)

    # class filters narrow the transfer set only: validation and test rows keep every class
    rows, split = keep_rows(ids, labels, {"val": val, "val_seed": 11, "split": "train", "omit": [2], "only": None})
    assert not np.any((labels[rows] == 2) & (split[rows] == SPLITS.index("train")))
    assert np.any((labels[rows] == 2) & (split[rows] == SPLITS.index("val")))
    rows, _ = keep_rows(ids, labels, {"split": "test", "only": [1]})
    assert len(rows) == len(ids)


def test_parquet_block_decoded_normalised_and_empty_when_nothing_is_kept():
    block = pa.table({"id": [4, 5, 6], "label": [0, 1, 0], "image": [[0, 255, 0, 255]] * 3})
    rows = prepare_rows(block, "image", "label", [1, 2, 2], (1, 2, 2), [0.5], [0.5], {"only": [0], "split": "train"})
    assert rows["id"].tolist() == [4, 6] and rows["label"].tolist() == [0, 0]
    assert rows["image"].dtype == np.float32 and rows["image"][0].ravel().tolist() == [-1.0, 1.0, -1.0, 1.0]
    empty = prepare_rows(block, "image", "label", [1, 2, 2], (1, 2, 2), [0.0], [1.0], {"only": [], "split": "train"})
    assert empty["image"].shape == (0, 1, 2, 2) and len(empty["id"]) == 0  # the right shape for the next stage


def test_image_folder_block_ids_from_paths_labels_from_class_folders():
    paths = np.array(["s3://b/d/train/cat/1.png", "s3://b/d/train/dog/2.png", "/d/train/cat/3.png"], dtype=object)
    images = np.stack([np.full((2, 2), v, np.uint8) for v in (0, 51, 255)])  # read_images' grey [N, H, W]
    rows = folder_rows({"image": images, "path": paths}, ["cat", "dog"], (1, 2, 2), [0.0], [1.0],
                       {"split": "train"}, paths=True)
    assert rows["id"].tolist() == path_ids(paths).tolist() and rows["label"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(rows["image"][:, 0, 0, 0], [0.0, 0.2, 1.0])
    assert rows["image"].shape == (3, 1, 2, 2) and rows["path"].tolist() == paths.tolist()
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8)
    with pytest.raises(ValueError, match="data.image_size"):
        folder_rows({"image": mixed, "path": paths[:2]}, ["cat", "dog"], (1, 2, 2), [0.0], [1.0], {"split": "train"})


def test_cached_rows_train_in_id_order_whatever_order_their_blocks_came_in():
    from kd_ray.core.rows import in_id_order

    cols = {"id": np.array([5, 2, 9, 2]), "view": np.array([0, 1, 0, 0]), "label": np.array([1, 2, 3, 4])}
    out = in_id_order(cols)
    assert out["id"].tolist() == [2, 2, 5, 9] and out["view"].tolist() == [0, 1, 0, 0]
    assert out["label"].tolist() == [4, 2, 1, 3]
    assert in_id_order({"id": np.array([3, 1]), "x": np.array([7, 8])})["x"].tolist() == [8, 7]

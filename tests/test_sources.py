"""Streamed parquet sources: lazy splits and subsets equal to the in-memory ones, row for row."""
import numpy as np
import pytest

from kd_ray.core.config import DataConfig
from kd_ray.core.data import load_splits
from kd_ray.core.subsets import select_fraction
from tests.fixtures.factories import digits_parquet

pytestmark = pytest.mark.usefixtures("ray_session")


def _rows(ds) -> dict[str, np.ndarray]:
    from kd_ray.stages.datasets import from_dataset

    rows = from_dataset(ds)
    order = np.argsort(rows["id"])
    return {k: v[order] for k, v in rows.items()}


def test_streamed_digits_equal_in_memory(tmp_path):
    """Validation split, training split, test split, nested fractions and normalisation statistics
    of the streamed source are today's in-memory ones (ids exactly; images to float precision)."""
    from kd_ray.stages.sources import open_source

    root = digits_parquet(tmp_path / "digits")
    memory = load_splits(DataConfig(name="digits", seed=3))
    cfg = DataConfig(name="parquet", root=root, image_shape=[1, 8, 8], seed=3)
    src = open_source(cfg, subsets=[(0.03, 0), (0.1, 0), (0.1, 5)])
    assert src.num_classes == 10 and src.input_shape == (1, 8, 8)
    assert src.rows == {"train": len(memory.train), "val": len(memory.val), "test": len(memory.test)}
    np.testing.assert_allclose(src.normalization["mean"], memory.normalization["mean"], rtol=1e-5)
    np.testing.assert_allclose(src.normalization["std"], memory.normalization["std"], rtol=1e-4)
    for name in ("train", "val", "test"):
        got, want = _rows(src.split(name)), getattr(memory, name)
        order = np.argsort(want.ids)
        assert np.array_equal(got["id"], want.ids[order]), name
        assert np.array_equal(got["label"], want.labels[order]), name
        np.testing.assert_allclose(got["image"], want.images[order], atol=1e-4)
    for fraction, seed in ((0.03, 0), (0.1, 0), (0.1, 5)):
        got = _rows(src.split("train", fraction, seed))["id"]
        assert np.array_equal(got, select_fraction(memory.train.ids, memory.train.labels, fraction, seed))
    with pytest.raises(ValueError, match="fraction=0.3"):
        src.split("train", 0.3, 0)


def test_streamed_encodings_and_errors(tmp_path):
    """PNG bytes and uint8 rows decode to the same images; a source without ids is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kd_ray.stages.sources import open_source

    png = open_source(DataConfig(name="parquet", root=digits_parquet(tmp_path / "png", "png")))
    raw = open_source(DataConfig(name="parquet", root=digits_parquet(tmp_path / "u8", "uint8"), image_shape=[1, 8, 8]))
    a, b = _rows(png.split("val")), _rows(raw.split("val"))
    assert np.array_equal(a["id"], b["id"]) and a["image"].shape[1:] == (1, 8, 8)
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-4)
    (tmp_path / "noid" / "train").mkdir(parents=True)
    pq.write_table(pa.table({"label": [0, 1], "image": [[0.0] * 4] * 2}), tmp_path / "noid" / "train" / "a.parquet")
    pq.write_table(pa.table({"label": [0, 1], "image": [[0.0] * 4] * 2}), tmp_path / "noid" / "test.parquet")
    with pytest.raises(ValueError, match=r"\['id'\] not found"):
        open_source(DataConfig(name="parquet", root=str(tmp_path / "noid")))

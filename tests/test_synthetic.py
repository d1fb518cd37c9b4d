"""jobs/bench/make_synthetic.py: sharded parquet that kd_ray's parquet source reads, with classes to learn."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs" / "bench"))

import make_synthetic  # noqa: E402

from kd_ray.core import storage  # noqa: E402
from kd_ray.core.config_files import load_config  # noqa: E402
from kd_ray.core.data import load_splits  # noqa: E402


def _generate(out):
    make_synthetic.main([str(out), "--rows", "900", "--test-rows", "300", "--classes", "6", "--shard-rows", "400"])


def test_shards_load_as_a_parquet_source_with_unique_ids(tmp_path):
    _generate(tmp_path)
    assert len(storage.list_files(str(tmp_path / "train"), ".parquet")) == 3  # 400 + 400 + 100 rows
    splits = load_splits(load_config(None, ["data.name=parquet", f"data.root={tmp_path}",
                                            "data.image_shape=[3, 32, 32]"]).data)
    assert splits.num_classes == 6 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) + len(splits.val) == 900 and len(splits.test) == 300
    ids = np.concatenate([splits.train.ids, splits.val.ids, splits.test.ids])
    assert len(np.unique(ids)) == 1200


def test_the_classes_are_learnable_and_shards_reproducible(tmp_path):
    _generate(tmp_path / "a")
    _generate(tmp_path / "b")
    a = sorted(storage.list_files(str(tmp_path / "a"), ".parquet"))
    assert all(Path(p).read_bytes() == Path(p.replace("/a/", "/b/")).read_bytes() for p in a)
    splits = load_splits(load_config(None, ["data.name=parquet", f"data.root={tmp_path / 'a'}",
                                            "data.image_shape=[3, 32, 32]"]).data)
    # a nearest class mean on the raw pixels already beats chance (1/6) by far
    x, y = splits.train.images.reshape(len(splits.train), -1), splits.train.labels
    means = np.stack([x[y == c].mean(0) for c in range(6)])
    xt = splits.test.images.reshape(len(splits.test), -1)
    pred = ((xt[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == splits.test.labels).mean() > 0.6

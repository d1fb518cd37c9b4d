"""The streamed path at 1,000 classes: a sharded synthetic parquet source -> the ensemble's
top-k cache (no images, one folder per source shard) -> a student's rows joined by id -> training."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ray.core import storage

pytestmark = pytest.mark.usefixtures("ray_session")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs" / "bench"))


def test_thousand_classes_streamed_top_k_cache_and_student(tmp_path):
    import make_synthetic
    from common import untrained_teachers

    from kd_ray.core.config_files import load_config
    from kd_ray.core.losses import dense_from_top_k
    from kd_ray.core.student_losses import make_loss
    from kd_ray.core.train import Engine, student_loss
    from kd_ray.stages.datasets import from_dataset
    from kd_ray.stages.sources import open_source
    from kd_ray.stages.streamed_targets import build_streamed_targets, student_rows

    data = str(tmp_path / "syn")
    make_synthetic.write(data, rows=1500, test_rows=150, classes=1000, shard_rows=500, seed=0)
    base = [f"runtime.storage_path={tmp_path / 'runs'}", "data.name=parquet", f"data.root={data}",
            "data.image_shape=[3, 32, 32]", "soft_targets.temperature=4", "soft_targets.batch_size=512",
            "student.model_args={hidden: [64]}"]
    (tmp_path / "runs").mkdir()
    cfg = load_config(None, base + ["soft_targets.teacher_logits=topk", "soft_targets.top_k=32"])
    source = open_source(cfg.data, subsets=[(0.5, 0)])
    import pyarrow.parquet as pq

    labels = pq.read_table(data, columns=["label"]).column("label").to_numpy()  # train and test
    assert source.num_classes == labels.max() + 1 > 990 and source.input_shape == (3, 32, 32)
    C = source.num_classes
    paths = untrained_teachers(tmp_path, source.input_shape, C, 3, "cnn", {"channels": [8, 16]})[1]

    soft = build_streamed_targets(cfg, paths, source)
    path, manifest = soft.path, soft.manifest
    assert soft.built and soft.source is source and soft.transfer is None
    files = manifest["files"]["train"]
    assert {f.split("/")[2] for f in files} == {"shard=part-00000", "shard=part-00001", "shard=part-00002"}
    assert manifest["rows"] == source.rows  # train, val, test: every row labelled once
    cached = from_dataset(__import__("ray").data.read_parquet(storage.join(path, "rows", "split=train")),
                          ("id", "teacher_topk_values", "teacher_topk_index", "teacher_topk_tail"))
    assert cached["teacher_topk_values"].shape[1:] == (3, 32)
    assert "image" not in __import__("pyarrow.parquet").parquet.read_schema(storage.join(path, files[0])).names
    assert 0 <= manifest["ensemble"]["val_accuracy"] <= 1 and len(manifest["ensemble"]["teacher_test_accuracy"]) == 3
    again = build_streamed_targets(cfg, paths, source)  # same teachers, same source: reused
    assert again.path == path and not again.built and again.manifest["seconds"] == manifest["seconds"]

    dense_cfg = load_config(None, base + ["soft_targets.teacher_logits=dense"])
    dense = build_streamed_targets(dense_cfg, paths, source).manifest
    assert manifest["bytes_per_row"]["train"] <= 0.10 * dense["bytes_per_row"]["train"]  # top-32 vs dense

    rows = student_rows(source, path, fraction=0.5, seed=0)
    got = from_dataset(rows, ("id", "image", "label", "teacher_topk_values", "teacher_topk_index", "teacher_topk_tail"))
    want = from_dataset(source.split("train", 0.5, 0), ("id",))["id"]
    assert np.array_equal(np.sort(got["id"]), np.sort(want))
    at = np.searchsorted(cached["id"], got["id"], sorter=np.argsort(cached["id"]))
    at = np.argsort(cached["id"])[at]
    assert np.array_equal(got["teacher_topk_index"], cached["teacher_topk_index"][at])  # joined by id

    # a student trains on the streamed rows: soft targets re-softened from the top-k logits
    model = cfg.student.build(list(source.input_shape), C)
    engine = Engine(model, cfg.student, student_loss(make_loss("kd"), 4.0, 0.9, C, 4.0, "probs"))
    batch = {k: torch.from_numpy(np.asarray(v[:64])) for k, v in got.items()}
    before = student_loss(make_loss("kd"), 4.0, 0.9, C, 4.0)(model, batch)[0].item()
    engine.fit(2, lambda e: rows.iter_torch_batches(batch_size=64), lambda m: {"val_accuracy": 0.0})
    after = student_loss(make_loss("kd"), 4.0, 0.9, C, 4.0)(engine.plain, batch)[0].item()
    assert np.isfinite(after) and after < before
    full = dense_from_top_k(batch["teacher_topk_values"], batch["teacher_topk_index"], batch["teacher_topk_tail"], C)
    assert full.shape == (64, 3, C)


def test_streamed_pipeline_teachers_cache_sweep_and_report(digits_cfg, tmp_path):
    """``data.stream: true`` on an image folder (``read_images``; the parquet reader's rows equal the
    in-memory ones in test_sources.py and feed the 1,000-class run above), every stage: the teachers
    read their rows in their actors, the cache is built from the stream (a shard per class folder),
    the sweep's students stream their rows joined to it (and their validation and test rows)
    through Ray Train; the figures equal the in-memory path's where they must (row counts, the
    ensemble's accuracies)."""
    import pandas as pd

    from kd_ray.cli import run_stages
    from kd_ray.core.config import DataConfig
    from kd_ray.core.data import load_splits
    from kd_ray.core.subsets import select_fraction
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sources import experiment_source
    from kd_ray.stages.streamed_targets import build_streamed_targets
    from kd_ray.stages.teachers import train_ensemble
    from tests.fixtures.factories import digits_folder

    root = digits_folder(tmp_path / "digits")
    data = ["data.name=image_folder", f"data.root={root}"]
    # one soft trial whose rows (and val/test rows) stream from the files at every epoch
    cfg = digits_cfg(*data, "data.stream=true", "name=streamed", "sweep.fractions=[0.5]", "sweep.seeds=[0]",
                     "sweep.targets=[soft]", "student.max_in_memory_mb=0", "student.epochs=3", "student.lr=0.1")
    memory = load_splits(DataConfig(**{**cfg.data.model_dump(), "stream": False}))
    ensemble = train_ensemble(cfg, experiment_source(cfg))
    assert all(t["train_size"] == len(memory.train) and t["val_accuracy"] > 0.5 for t in ensemble.teachers)
    assert np.isnan(ensemble.val_accuracy)  # measured by the soft-target pass

    assert run_stages(cfg)  # teachers reused, the cache built, the trial, the report
    soft = build_streamed_targets(cfg, ensemble.model_paths, experiment_source(cfg))
    assert soft.source is not None and not soft.built and soft.transfer is None
    assert {f.split("/")[2] for f in soft.manifest["files"]["train"]} == {f"shard={c}" for c in range(10)}
    with pytest.raises(ValueError, match="data.stream: a streamed source's soft targets come from"):
        build_soft_targets(cfg, ensemble)
    in_memory = build_soft_targets(digits_cfg(*data, "name=streamed"), ensemble)  # the same teachers, in memory
    for split in ("val", "test"):  # normalisation agrees to ~1e-5: at most one borderline row may differ
        diff = abs(soft.manifest["ensemble"][f"{split}_accuracy"] - in_memory.manifest["ensemble"][f"{split}_accuracy"])
        assert diff <= 1 / len(getattr(memory, split)) + 1e-12, split
    results = pd.read_parquet(storage.join(str(tmp_path / "runs"), "streamed", "results.parquet"))
    trial = results.iloc[0]
    assert len(results) == 1 and trial["status"] == "done" and trial["epoch"] == 3
    assert trial["train_rows_total"] == len(select_fraction(memory.train.ids, memory.train.labels, 0.5, 0))
    assert trial["test_accuracy"] > 0.3 and trial["test_fidelity"] > 0.3  # 10 classes; 3 short epochs
    assert (tmp_path / "runs" / "streamed" / "summary.md").exists()

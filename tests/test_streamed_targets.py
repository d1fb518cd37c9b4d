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


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_kinds_and_augmenting_modes_on_a_streamed_source(digits_cfg, tmp_path):
    """A streamed source (sharded parquet) with bootstrapped, fine-tuned and imported teachers, and
    in every augmenting mode: consistent teaching labels each epoch's views read from the files, and
    they equal the in-memory path's views and soft targets for the same ids; inconsistent teaching
    shifts the streamed rows in the worker, by the same seeded function; the views cache is built by
    one streamed pass over V views, equal to the in-memory one, and a cached_views student trains on
    the views rebuilt from the streamed rows."""
    import ray

    from kd_ray.core.augment import seeded_shift
    from kd_ray.core.config import DataConfig
    from kd_ray.core.data import load_splits
    from kd_ray.stages.consistent import consistent_stream, streamed_consistent
    from kd_ray.stages.counters import forward_passes
    from kd_ray.stages.datasets import from_dataset
    from kd_ray.stages.distill import distill
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sources import experiment_source
    from kd_ray.stages.streamed_targets import build_streamed_targets
    from kd_ray.stages.teachers import import_teachers, train_ensemble
    from tests.fixtures.factories import digits_parquet

    root = digits_parquet(tmp_path / "digits", shards=4)
    data = ["data.name=parquet", f"data.root={root}", "data.image_shape=[1, 8, 8]"]
    cfg = digits_cfg(*data, "data.stream=true", "name=streamedaug", "soft_targets.jitter=1", "student.fraction=0.5",
                     "student.epochs=3", "student.lr=0.1", "student.model_args={hidden: [64]}", "sweep.fractions=[0.5]",
                     "teachers.specs=[{}, {bootstrap: true}]")
    source = experiment_source(cfg)
    trained = train_ensemble(cfg, source)  # the second teacher on a Poisson(1) resample of the stream
    assert [t["spec"]["bootstrap"] for t in trained.teachers] == [False, True]
    assert all(t["val_accuracy"] > 0.5 for t in trained.teachers)
    # on a streamed source, a teacher fine-tuned from pretrained weights and an imported one (checked on a
    # few validation rows; its accuracy from the cache's pass)
    imported = cfg.model_copy(update={"name": "streamedimport", "teachers": cfg.teachers.model_copy(update={
        "specs": [{"pretrained_file": trained.model_paths[0]}, {"checkpoint": trained.model_paths[1]}]})})
    got = import_teachers(imported, source)
    assert list(got) == ["t1"] and np.isnan(got["t1"]["val_accuracy"])
    ensemble = train_ensemble(imported, source, got)
    tuned = ensemble.teachers[0]
    assert tuned["spec"]["pretrained_file"] == trained.model_paths[0] and tuned["val_accuracy"] > 0.5
    soft = build_streamed_targets(imported, ensemble.model_paths, source)
    assert soft.manifest["ensemble"]["teacher_val_accuracy"][1] > 0.5  # measured by the soft-target pass
    cfg = imported
    memory = load_splits(DataConfig(**{**cfg.data.model_dump(), "stream": False}))
    in_memory = build_soft_targets(digits_cfg(*data, "name=streamedaug_memory"), ensemble)

    # one epoch of views: the streamed path's equal the in-memory path's, id by id
    st = cfg.soft_targets
    streamed = from_dataset(streamed_consistent(source, 0.5, cfg.data.seed, 0, 1, st, ensemble.model_paths, [1], 3,
                                                [cfg.name]), ("id", "image", "soft_targets"))
    ids = np.sort(streamed["id"])
    assert len(ids) == source.count(0.5, cfg.data.seed, transfer=True)
    rows = in_memory.transfer_rows(ids)
    held = from_dataset(consistent_stream(ray.put(rows), np.arange(len(ids)), st, ensemble.model_paths, [1], 3,
                                          [cfg.name]), ("id", "image", "soft_targets"))
    a, b = np.argsort(streamed["id"]), np.argsort(held["id"])
    assert np.array_equal(streamed["id"][a], held["id"][b])
    assert np.abs(streamed["image"][a] - held["image"][b]).max() < 1e-4  # normalisation agrees to ~1e-5
    assert np.abs(streamed["soft_targets"][a] - held["soft_targets"][b]).max() < 1e-3
    assert not np.allclose(streamed["image"][a], rows["image"][np.argsort(rows["id"])], atol=1e-3)  # shifted

    # a consistent student on the stream: the teachers label every epoch's views
    before = forward_passes(cfg.name).get("train", 0)
    r = distill(cfg.model_copy(update={"student": cfg.student.model_copy(update={"teaching": "consistent"})}), soft)
    n = len(ids)
    assert r.metrics["teaching"] == "consistent" and list(r.history["train_rows"]) == [n, n, n]
    assert forward_passes(cfg.name)["train"] - before == 3 * n
    assert r.metrics["teacher_passes"] == 3 * n * len(ensemble.model_paths) and r.metrics["test_accuracy"] > 0.3

    # an inconsistent student: the streamed rows shifted in the worker as the in-memory path shifts them
    inc = cfg.model_copy(update={"student": cfg.student.model_copy(update={"teaching": "inconsistent"})})
    r = distill(inc, soft)
    assert r.metrics["teaching"] == "inconsistent" and r.metrics["teacher_passes"] == 0
    first = np.load(f"{r.checkpoint_path}/first_batch_rank0.npz")  # the last epoch's first batch, as trained on
    order = np.argsort(memory.train.ids)
    plain = memory.train.images[order[np.searchsorted(memory.train.ids, first["id"], sorter=order)]]
    want = seeded_shift(plain, first["id"], 1, inc.student.seed, inc.student.epochs - 1)
    assert np.abs(first["image"] - want).max() < 1e-4 and np.abs(first["image"] - plain).max() > 0.1

    # cached views on the stream: V views of every row labelled in one more streamed pass, equal to the
    # in-memory views cache (view by view), and a cached_views student trains on one of them per epoch
    import pyarrow.parquet as pq

    from kd_ray.core.augment import chosen_views, view_shift

    V = 3
    views = cfg.model_copy(update={"soft_targets": cfg.soft_targets.model_copy(update={"views": V}),
                                   "student": cfg.student.model_copy(update={"teaching": "cached_views"})})
    vsoft = build_streamed_targets(views, ensemble.model_paths, source)
    total = source.count(transfer=True)
    assert vsoft.manifest["rows"]["views"] == V * total and vsoft.manifest["bytes_per_row"]["views"] > 0
    streamed_views = pq.read_table(storage.join(vsoft.path, "views"), columns=["id", "view", "soft_targets"])
    vmem = build_soft_targets(digits_cfg(*data, "name=streamedaug_memory", "soft_targets.jitter=1",
                                         f"soft_targets.views={V}"), ensemble).train_arrays("views")
    key = lambda ids, v: ids.astype(np.int64) * V + v  # noqa: E731
    got_key = key(streamed_views.column("id").to_numpy(), streamed_views.column("view").to_numpy())
    assert np.array_equal(np.sort(got_key), np.sort(key(vmem["id"], vmem["view"])))
    got = np.stack(streamed_views.column("soft_targets").to_numpy(zero_copy_only=False))[np.argsort(got_key)]
    want = vmem["soft_targets"][np.argsort(key(vmem["id"], vmem["view"]))]
    assert np.abs(got - want).max() < 1e-3

    r = distill(views, vsoft)
    assert r.metrics["teaching"] == "cached_views" and r.metrics["teacher_passes"] == 0
    assert list(r.history["train_rows"]) == [n, n, n] and r.metrics["test_accuracy"] > 0.3
    first = np.load(f"{r.checkpoint_path}/first_batch_rank0.npz")  # the last epoch's first batch
    v = chosen_views(first["id"], V, views.student.seed, views.student.epochs - 1)
    plain = memory.train.images[order[np.searchsorted(memory.train.ids, first["id"], sorter=order)]]
    assert np.abs(first["image"] - view_shift(plain, first["id"], v, 1, vsoft.manifest["view_seed"])).max() < 1e-4
    at = np.searchsorted(np.sort(key(vmem["id"], vmem["view"])), key(first["id"], v))
    assert np.abs(first["soft_targets"] - want[at]).max() < 1e-3  # the targets of that very view

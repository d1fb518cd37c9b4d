"""Soft targets through Ray Data: exact values, caching and staleness, streaming, bad input."""
import numpy as np
import pytest
import torch

from kd_ray.core import storage
from kd_ray.core.data import load_splits
from kd_ray.core.ensemble import (
    averaged_soft_targets,
    build_teacher,
    load_teacher_files,
    teacher_logits,
)
from kd_ray.core.losses import ensemble_average, resoften
from kd_ray.core.models import build_model
from kd_ray.stages.counters import forward_passes
from kd_ray.stages.predictor import predict
from kd_ray.stages.soft_targets import build_soft_targets

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(base, name, *overrides):
    from kd_ray.core.config_files import build_config

    return build_config(base.model_dump(mode="json"), [f"name={name}", *overrides])


def _direct(ensemble, images, T, rule):
    models = [build_teacher(f.blob, torch.device("cpu")) for f in load_teacher_files(ensemble.model_paths)]
    with torch.no_grad():
        logits = torch.stack([m(torch.from_numpy(images)) for m in models])
    return ensemble_average(logits, T, rule).numpy(), logits


def _rows(ds):
    df = ds.to_pandas()
    order = np.argsort(df["id"].to_numpy())
    return {c: np.stack(df[c].to_numpy())[order] for c in df.columns}


def _check_schema(rows: dict, K: int, C: int) -> None:
    """Every cached column is declared in kd_ray.core.schema, with its dtype and shape (the image is the source's)."""
    from kd_ray.core.schema import CACHE_COLUMNS

    for name, values in rows.items():
        if name == "image":
            continue
        assert name in CACHE_COLUMNS, f"{name} is not declared in kd_ray/core/schema.py"
        dtype, shape, _ = CACHE_COLUMNS[name]
        assert values.dtype == np.dtype(dtype), (name, values.dtype)
        assert values.shape[1:] == {"": (), "[C]": (C,), "[K, C]": (K, C), "[K]": (K,)}.get(shape, values.shape[1:]), name


@pytest.mark.parametrize("rule", ["probs", "logits"])
def test_averaged_soft_targets_in_batches_equal_one_whole_pass(rule):
    """The plain-PyTorch path the analysis scripts and benchmarks share: batching a split (so CNN
    activations fit in memory) changes nothing but rounding, in order, for any batch size."""
    torch.manual_seed(0)
    models = [build_model("cnn", [1, 8, 8], 10, channels=[4, 8]).eval() for _ in range(3)]
    images = torch.rand(37, 1, 8, 8)
    with torch.no_grad():
        whole = ensemble_average(torch.stack([m(images) for m in models]), 3.0, rule)
    for batch_size in (1, 5, 37, 100):
        got = averaged_soft_targets(models, images, 3.0, rule, batch_size)
        assert got.shape == (37, 10) and torch.allclose(got, whole, atol=1e-6), batch_size
    assert torch.allclose(got.sum(1), torch.ones(37), atol=1e-6) and not got.requires_grad
    with pytest.raises(ValueError, match="batch_size"):
        averaged_soft_targets(models, images, 3.0, rule, 0)


@pytest.mark.parametrize("rule", ["probs", "logits"])
def test_soft_targets_equal_direct_computation_and_are_computed_once(tiny_ensemble, rule):
    base, ensemble = tiny_ensemble
    cfg = _cfg(base, f"exact_{rule}", f"soft_targets.rule={rule}", "soft_targets.temperature=3")
    splits = load_splits(cfg.data)
    st = build_soft_targets(cfg, ensemble, splits)
    assert st.built
    rows = _rows(st.datasets["train"])
    n = len(splits.train)
    assert len(rows["id"]) == n and np.array_equal(np.sort(rows["id"]), np.sort(splits.train.ids))  # each id once
    order = np.argsort(splits.train.ids)
    want = _direct(ensemble, splits.train.images[order], 3.0, rule)[0]
    assert np.abs(rows["soft_targets"] - want).max() <= 1e-6
    assert np.allclose(rows["soft_targets"].sum(1), 1.0, atol=1e-6)
    assert rows["teacher_logits"].shape == (n, 3, 10) and rows["teacher_logits"].dtype == np.float16
    _check_schema(rows, 3, 10)
    assert 0.5 < st.manifest["ensemble"]["test_accuracy"] <= 1
    assert st.manifest["rule"] == rule and st.temperature == 3.0

    # several consumers of the cache: the teachers never run again
    again = build_soft_targets(cfg, ensemble, splits)
    assert not again.built and again.path == st.path
    for _ in range(3):
        assert again.cached_rows().count() == n
    passes = forward_passes(cfg.name)
    assert passes == {"train": n, "val": len(splits.val), "test": len(splits.test)}


def test_bfloat16_teachers_give_the_float32_soft_targets_within_rounding(tiny_ensemble):
    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "bf16", "soft_targets.precision=bfloat16", "soft_targets.temperature=3")
    splits = load_splits(cfg.data)
    st = build_soft_targets(cfg, ensemble, splits)
    assert st.manifest["precision"] == "bfloat16"
    rows = _rows(st.datasets["train"])
    order = np.argsort(splits.train.ids)
    want, logits = _direct(ensemble, splits.train.images[order], 3.0, "probs")  # float32
    got = rows["soft_targets"]
    assert got.dtype == np.float32 and np.allclose(got.sum(1), 1.0, atol=1e-6)  # averaged in float32
    assert 0 < np.abs(got - want).max() < 0.02  # bfloat16 arithmetic, rounded: close, not equal
    pred32 = ensemble_average(logits, 1.0, "probs").argmax(1).numpy()
    assert (rows["ensemble_pred"] == pred32).mean() >= 0.99
    # the teachers really run in bfloat16, and hand back float32 logits
    models = [build_teacher(f.blob, torch.device("cpu"), "bfloat16") for f in load_teacher_files(ensemble.model_paths)]
    assert all(p.dtype == torch.bfloat16 for m in models for p in m.parameters())
    z = teacher_logits(models, torch.from_numpy(splits.train.images[:8]))
    assert z.dtype == torch.float32 and z.shape == (3, 8, 10)


def test_cnn_teachers_run_channels_last_in_bfloat16_through_the_actor_pool(ray_session, digits_cfg):
    """Conv teachers (fashion_mnist_cnn.yaml's kind): trained by the teacher actors, built
    channels-last, and in bfloat16 they give the float32 soft targets within rounding."""
    from kd_ray.stages.teachers import train_ensemble

    cfg = digits_cfg("name=cnn", "teachers.model=cnn", "teachers.model_args={channels: [8, 16]}",
                     "teachers.epochs=3", "soft_targets.batch_size=256", "soft_targets.temperature=3")
    ensemble = train_ensemble(cfg)
    assert all(v > 0.5 for v in ensemble.summary()["val_accuracy"])  # they learned digits
    splits = load_splits(cfg.data)
    want, _ = _direct(ensemble, splits.train.images[np.argsort(splits.train.ids)], 3.0, "probs")
    for precision, tol in (("float32", 1e-5), ("bfloat16", 0.03)):
        st = build_soft_targets(_cfg(cfg, "cnn", f"soft_targets.precision={precision}"), ensemble, splits)
        got = _rows(st.datasets["train"])["soft_targets"]
        assert got.dtype == np.float32 and np.allclose(got.sum(1), 1.0, atol=1e-6)
        assert np.abs(got - want).max() < tol, precision
    model = build_teacher(load_teacher_files(ensemble.model_paths[:1])[0].blob, torch.device("cpu"), "bfloat16")
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.dtype == torch.bfloat16 and p.is_contiguous(memory_format=torch.channels_last)
                         for p in convs)


def test_resoftened_targets_match_a_fresh_computation(tiny_ensemble):
    base, ensemble = tiny_ensemble
    at4 = build_soft_targets(_cfg(base, "resoften", "soft_targets.temperature=4"), ensemble)
    at2 = build_soft_targets(_cfg(base, "resoften", "soft_targets.temperature=2"), ensemble)
    r4, r2 = _rows(at4.datasets["train"]), _rows(at2.datasets["train"])
    again = resoften(torch.from_numpy(r4["teacher_logits"]), 2.0, "probs").numpy()
    assert np.abs(again - r2["soft_targets"]).max() < 2e-3


def test_fingerprint_staleness_and_broken_caches(tiny_ensemble, tmp_path):
    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "stale")
    first = build_soft_targets(cfg, ensemble)
    paths = {first.path}
    for override in ("soft_targets.temperature=7", "soft_targets.rule=logits", "data.val_fraction=0.2",
                     "soft_targets.precision=bfloat16"):
        st = build_soft_targets(_cfg(base, "stale", override), ensemble)
        assert st.built and st.path not in paths  # never the stale cache
        paths.add(st.path)
    # a changed teacher checkpoint changes the fingerprint
    blob = storage.load_torch(ensemble.model_paths[0])
    blob["state_dict"] = {k: v + 0.01 for k, v in blob["state_dict"].items()}
    changed = str(tmp_path / "t0_changed.pt")
    storage.save_torch(changed, blob)
    st = build_soft_targets(cfg, [changed, *ensemble.model_paths[1:]])
    assert st.built and st.path not in paths
    # the original cache is intact and reused
    assert not build_soft_targets(cfg, ensemble).built
    # manifest deleted -> rebuilt
    import os
    os.remove(storage.join(first.path, "manifest.json"))
    assert build_soft_targets(cfg, ensemble).built
    # a truncated parquet file -> rebuilt
    victim = storage.list_files(storage.join(first.path, "train"), ".parquet")[0]
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[: len(data) // 2])
    rebuilt = build_soft_targets(cfg, ensemble)
    assert rebuilt.built and rebuilt.datasets["train"].count() == len(rebuilt.transfer)


def _stream(st, cfg, epoch: int, seed: int):
    """Consistent teaching's stream over the whole transfer set for one epoch."""
    import ray

    from kd_ray.stages.consistent import consistent_stream

    rows = st.transfer_rows()
    return consistent_stream(ray.put(rows), np.arange(len(rows["id"])), cfg.soft_targets, st.model_paths, [epoch],
                             seed, [cfg.name])


def test_consistent_teaching_recomputes_each_epoch_on_the_students_view(tiny_ensemble):
    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "stream", "soft_targets.jitter=1", "soft_targets.temperature=2")
    st = build_soft_targets(cfg, ensemble)
    splits = load_splits(cfg.data)
    n = len(splits.train)
    assert forward_passes(cfg.name)["train"] == n  # the cache: the transfer set labelled once
    order = np.argsort(splits.train.ids)
    views = []
    for epoch in range(2):
        rows = _rows(_stream(st, cfg, epoch, seed=5))
        assert np.array_equal(rows["id"], splits.train.ids[order])
        # the teachers' soft targets are those of the very image the student receives
        want, _ = _direct(ensemble, rows["image"].astype(np.float32), 2.0, "probs")
        assert np.abs(rows["soft_targets"] - want).max() <= 1e-6
        assert not np.array_equal(rows["image"], splits.train.images[order])  # augmented
        views.append(rows["image"])
    assert not np.array_equal(views[0], views[1])  # a fresh view each epoch
    assert forward_passes(cfg.name)["train"] == n + 2 * n  # and each epoch's views once


def test_mixup_alone_streams_mixed_unshifted_views(tiny_ensemble):
    from kd_ray.core.augment import mix, seeded_mixup

    base, ensemble = tiny_ensemble
    # function matching without shifts (soft_targets.jitter 0): augmentation by mixup alone
    cfg = _cfg(base, "mixonly", "soft_targets.mixup=1.0", "soft_targets.temperature=2")
    st = build_soft_targets(cfg, ensemble)
    src = st.transfer_rows()
    rows = _rows(_stream(st, cfg, 0, seed=5))
    pos = np.array([src["id"].tolist().index(i) for i in rows["id"].tolist()])  # stream positions
    partner, lam = seeded_mixup(len(src["id"]), 1.0, seed=5, epoch=0)
    # each view is the row mixed with its seeded partner, neither shifted
    assert np.allclose(rows["image"], mix(src["image"][pos], src["image"][partner[pos]], lam[pos]), atol=1e-6)
    assert np.array_equal(rows["mix_weight"], lam[pos]) and np.array_equal(rows["mix_label"], src["label"][partner[pos]])
    want, _ = _direct(ensemble, rows["image"].astype(np.float32), 2.0, "probs")
    assert np.abs(rows["soft_targets"] - want).max() <= 1e-6  # the teachers labelled that very view


def test_bad_inputs(tiny_ensemble, tmp_path):
    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "bad")
    blob = storage.load_torch(ensemble.model_paths[0])
    blob["num_classes"] = 5
    five = str(tmp_path / "five.pt")
    storage.save_torch(five, blob)
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        build_soft_targets(cfg, [five, *ensemble.model_paths[1:]])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"corrupt checkpoint {corrupt}"):
        build_soft_targets(cfg, [str(corrupt)])
    # a dataset without an image column: the error lists the columns found
    import ray.data
    ds = ray.data.from_items([{"id": 0, "pixels": np.zeros((1, 8, 8), np.float32), "label": 0}])
    with pytest.raises(Exception, match=r"no 'image' column; columns found: \['id', 'label', 'pixels'\]"):
        predict(ds, ensemble.model_paths, cfg.soft_targets, "train", [cfg.name]).materialize()


def test_top_k_cache_keeps_k_logits_a_tail_and_fewer_bytes(tiny_ensemble):
    from kd_ray.core.losses import dense_from_top_k, top_k_logits

    base, ensemble = tiny_ensemble
    dense = build_soft_targets(_cfg(base, "topk"), ensemble)
    top3 = build_soft_targets(_cfg(base, "topk", "soft_targets.teacher_logits=topk", "soft_targets.top_k=3"), ensemble)
    assert top3.path != dense.path  # another fingerprint
    d, t = _rows(dense.datasets["train"]), _rows(top3.datasets["train"])
    assert "teacher_logits" not in t and t["teacher_topk_values"].shape[1:] == (3, 3)  # [K, k]
    assert t["teacher_topk_index"].dtype == np.int16 and t["teacher_topk_tail"].shape[1:] == (3,)
    want = top_k_logits(torch.from_numpy(d["teacher_logits"]).float(), 3)
    assert np.array_equal(t["teacher_topk_index"], want["index"].numpy())
    assert np.allclose(t["teacher_topk_tail"], want["tail"].numpy(), atol=1e-2)  # from float32 vs float16 logits
    assert top3.manifest["bytes_per_row"]["train"] < dense.manifest["bytes_per_row"]["train"]
    # no dense soft targets beside the top-k logits (students re-soften them); re-softened at
    # T = 1 the kept classes' probabilities and the tail's mass are kept
    assert "soft_targets" not in t
    rebuilt = dense_from_top_k(*(torch.from_numpy(t[f"teacher_topk_{c}"]) for c in ("values", "index", "tail")), 10)
    p_dense = torch.softmax(torch.from_numpy(d["teacher_logits"]).float(), -1)
    p_top = torch.softmax(rebuilt, -1)
    idx = torch.from_numpy(t["teacher_topk_index"]).long()
    assert torch.allclose(p_top.gather(-1, idx), p_dense.gather(-1, idx), atol=2e-2)


def test_the_cache_keeps_no_images_and_joins_them_by_id(tiny_ensemble):
    import pyarrow.parquet as pq

    from kd_ray.core.rows import SPLITS

    base, ensemble = tiny_ensemble
    st = build_soft_targets(_cfg(base, "noimages"), ensemble)
    for split in SPLITS:
        for rel in st.manifest["files"][split]:
            fs, p = storage.resolve(storage.join(st.path, rel))
            names = pq.read_schema(fs.open_input_file(p)).names
            assert "image" not in names and {"id", "label", "soft_targets"} <= set(names), names
    # a float32 copy of a digits image alone is 256 bytes; ids, label, targets and 3 x 10 logits are less
    assert st.manifest["bytes_per_row"]["train"] < 256
    rows = _rows(st.datasets["train"])  # ... and the dataset the students read has the source's images
    assert np.array_equal(rows["image"], _images_by_id(st.transfer, rows["id"]))
    val = _rows(st.datasets["val"])
    assert np.array_equal(val["image"], _images_by_id(load_splits(base.data).val, val["id"]))


def _images_by_id(split, ids):
    order = np.argsort(split.ids)
    return split.images[order[np.searchsorted(split.ids, ids, sorter=order)]]


def test_views_cache_labels_each_view_once_and_rebuilds_it_exactly(tiny_ensemble):
    from kd_ray.core.augment import view_shift

    base, ensemble = tiny_ensemble
    cfg = _cfg(base, "views", "soft_targets.views=4", "soft_targets.jitter=1")
    st = build_soft_targets(cfg, ensemble)
    n, V = len(st.transfer), 4
    assert st.manifest["rows"]["views"] == n * V and forward_passes(cfg.name)["views"] == n * V
    rows = _rows(st.datasets["views"])  # ids sorted; each id's V views
    _check_schema(rows, 3, 10)
    assert sorted(zip(rows["id"], rows["view"])) == sorted((i, v) for i in st.transfer.ids for v in range(V))
    # every stored view, rebuilt from its source image, gets the stored soft targets from the teachers
    images = view_shift(_images_by_id(st.transfer, rows["id"]), rows["id"], rows["view"], 1, st.manifest["view_seed"])
    want, _ = _direct(ensemble, images, st.temperature, "probs")
    assert np.abs(want - rows["soft_targets"]).max() < 1e-6
    assert not np.array_equal(images[rows["view"] == 0], images[rows["view"] == 1])  # the views differ
    # the same settings reuse it; another V or another shift is another cache
    assert not build_soft_targets(cfg, ensemble).built
    for change in ("soft_targets.views=2", "soft_targets.jitter=2", "soft_targets.mixup=0.5"):
        other = build_soft_targets(_cfg(base, "views", "soft_targets.views=4", "soft_targets.jitter=1",
                                        change), ensemble)
        assert other.built and other.path != st.path
    # views of a nested fraction only: V x its rows labelled, the same views of those rows
    part = build_soft_targets(_cfg(base, "views_part", "soft_targets.views=4", "soft_targets.jitter=1",
                                   "soft_targets.views_fraction=0.3"), ensemble)
    kept = st.transfer.fraction(0.3, base.data.seed).ids
    assert part.path != st.path and part.manifest["rows"]["views"] == len(kept) * V
    assert forward_passes("views_part")["views"] == len(kept) * V
    sub = _rows(part.datasets["views"])
    assert np.array_equal(np.unique(sub["id"]), np.sort(kept))
    same = np.isin(rows["id"], kept)
    a, b = np.lexsort((sub["view"], sub["id"])), np.lexsort((rows["view"][same], rows["id"][same]))
    assert np.abs(sub["soft_targets"][a] - rows["soft_targets"][same][b]).max() < 1e-6

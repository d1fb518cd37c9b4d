"""Scale: kd_ray's streamed path against the plain PyTorch loop over the same sharded parquet.

    python jobs/bench/bench_scale.py [--sizes 60000 600000] [--classes 1000] [--teachers 3]
        [--student-rows 60000] [--data /tmp/kd_ray_scale] [--given-statistics] [--views V]

Per size N (each in a fresh process, so each has its own Ray and its own driver), on a
synthetic set of N training rows, C classes, 3 x 32 x 32 uint8 images (make_synthetic.py):

* soft-target pass, end to end (start-up included): kd_ray = ``ray.init`` + ``open_source``
  (statistics pass, validation/fraction thresholds) + ``build_streamed_targets`` (top-k cache,
  val/test accuracies); plain = the loop a user writes: one statistics pass, then every file
  read, decoded, normalised, run through the K teachers and its top-k written beside it.
  Both label every train, val and test row once; rows/s = those rows / seconds.
* cache bytes per row: top-k (k = 32) at every size, dense at the smallest (bytes per row do
  not depend on N).
* student epoch on ``--student-rows`` rows (a nested fraction): kd_ray streams
  ``student_rows`` (source rows joined to the cache by id) into the training step; plain reads
  each file and its cache shard, joins by id, shuffles and trains. Same model, batch, loss.
  Beside it, kd_ray's stream alone (the same pass with no training step): what the data side
  delivers, so which side limits the epoch.
* with ``--views V``: the streamed views cache of the student's subset (V shifted views of each
  row, labelled and kept as top-k; ``label_views``) against the plain loop that makes the same
  views file by file, runs the teachers and writes them; its bytes per view; and a cached-views
  student epoch (``student_views``: each row with its V views' targets, one view rebuilt per
  row) against the plain loop joining each file to its views by (id, view). The driver's peak RSS
  during the views pass is reported on its own.
* peak RSS of the driver and of the largest Ray worker process, less shared object-store pages
  (sampled every 0.2 s while kd_ray runs, before the plain loops; Ray's raylet/GCS not counted).
  The student epoch runs in the driver here, so the driver's peak is given without it and with it.

The K teachers are untrained small CNNs (channels 8, 16): what they cost per row does not
depend on their weights. One JSON line per size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import untrained_teachers  # noqa: E402

TEACHER = {"model": "cnn", "model_args": {"channels": [8, 16]}}
BATCH, TOP_K, T = 256, 32, 4.0
JITTER = 2  # the views' shifts: up to 2 pixels
GIVEN = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # --given-statistics: the values do not change the cost


def rss_kb(pid: int | str) -> int:
    """Resident memory of a process less its shared-memory pages (Ray's object store is mapped into
    every process that reads from it; those pages are the store's, not the process's)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssShmem:")):
                    fields[line.split(":")[0]] = int(line.split()[1])
    except OSError:
        return 0
    return fields.get("VmRSS", 0) - fields.get("RssShmem", 0)


class PeakRSS(threading.Thread):
    """Samples this process's RSS and every Ray worker's (``ray::`` processes) until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.driver = self.worker = 0
        self.worker_name = ""
        self.running = True

    def run(self) -> None:
        while self.running:
            self.driver = max(self.driver, rss_kb("self"))
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        name = f.read(80)
                    if not name.startswith(b"ray::"):
                        continue
                except OSError:
                    continue
                rss = rss_kb(pid)
                if rss > self.worker:
                    self.worker, self.worker_name = rss, name.split(b"\0")[0].decode(errors="replace")
            time.sleep(0.2)


# --------------------------------------------------------------------------- the plain loop
def plain_soft_targets(files: dict[str, list[str]], paths: list[str], out: str,
                       given: dict | None = None) -> tuple[float, int, dict]:
    """Statistics pass (none when ``given``), then every train and test file through the teachers,
    top-k written per file: the same rows kd_ray labels."""
    import pyarrow.parquet as pq
    import torch

    from kd_ray.core.ensemble import load_ensemble
    from kd_ray.core.images import decode_images

    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count())
    models = load_ensemble(paths)
    n, s, sq = 0, 0.0, 0.0
    for f in files["train"] if given is None else []:
        x = decode_images(pq.read_table(f, columns=["image"]).column("image"), [3, 32, 32], f).astype(np.float64)
        n, s, sq = n + x.shape[0] * 1024, s + x.sum((0, 2, 3)), sq + (x * x).sum((0, 2, 3))
    if given is not None:
        mean, std = (np.asarray(given[k], np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    else:
        mean = (s / n).astype(np.float32).reshape(1, -1, 1, 1)
        std = (np.sqrt(sq / n - (s / n) ** 2) + 1e-6).astype(np.float32).reshape(1, -1, 1, 1)
    rows = 0
    os.makedirs(out, exist_ok=True)
    for i, f in enumerate(files["train"] + files["test"]):
        table = pq.read_table(f)
        x = (decode_images(table.column("image"), [3, 32, 32], f) - mean) / std
        write_top_k(models, x, {"id": table.column("id")}, f"{out}/{i}.parquet")
        rows += len(x)
    return time.perf_counter() - t0, rows, {"mean": mean, "std": std}


def write_top_k(models, x: np.ndarray, keys: dict, path: str) -> None:
    """The K teachers on ``x`` in chunks of 1,024, each teacher's top-k written beside ``keys`` (per
    row: id, and view) as flat fixed-size lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from kd_ray.core.ensemble import ensemble_outputs

    cols = {}
    for j in range(0, len(x), 1024):
        o = ensemble_outputs(models, torch.from_numpy(x[j: j + 1024]), T, "probs", "topk", TOP_K)
        for k, v in o.items():
            cols.setdefault(k, []).append(v)
    cols = {k: np.concatenate(v) for k, v in cols.items() if k.startswith("teacher_topk")}
    pq.write_table(pa.table({**keys, **{k: pa.FixedSizeListArray.from_arrays(
        pa.array(v.reshape(-1)), int(np.prod(v.shape[1:]))) for k, v in cols.items()}}), path)


def train_step(model, opt, loss_fn, batch) -> None:
    opt.zero_grad()
    loss_fn(model, batch)[0].backward()
    opt.step()


def student(classes: int):
    import torch

    from kd_ray.core.models import build_model
    from kd_ray.core.student_losses import make_loss
    from kd_ray.core.train import student_loss

    torch.manual_seed(0)
    model = build_model("cnn", (3, 32, 32), classes, channels=[8, 16])
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), student_loss(make_loss("kd"), T, 0.9, classes, T)


def plain_student_epoch(source, fraction: float, cache_dir: str, classes: int) -> tuple[float, int]:
    """Each source file and its cache shard: filter to the subset, join by id, shuffle, train."""
    import pyarrow.parquet as pq
    import torch

    from kd_ray.stages.streamed_targets import rows_numpy, shard_name

    torch.set_num_threads(os.cpu_count())
    model, opt, loss_fn = student(classes)
    t0, rows = time.perf_counter(), 0
    for f in source.files["train"]:
        table, at, ids, labels = _subset_rows(source, fraction, f)
        x = _normalised(source, table, at, f)
        cache = pq.read_table(os.path.join(cache_dir, "rows", "split=train", f"shard={shard_name(f)}"))
        order = np.argsort(cache.column("id").to_numpy())
        pos = order[np.searchsorted(cache.column("id").to_numpy(), ids[at], sorter=order)]
        cols = {c: torch.from_numpy(rows_numpy(cache.column(c))[pos]) for c in cache.column_names if c.startswith("teacher")}
        train_shuffled(model, opt, loss_fn, {"image": torch.from_numpy(x), "label": torch.from_numpy(labels[at]), **cols})
        rows += len(at)
    return time.perf_counter() - t0, rows


def train_shuffled(model, opt, loss_fn, rows: dict) -> None:
    """One pass over in-memory rows in a seeded order, BATCH rows a step."""
    import torch

    n = len(rows["label"])
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    for j in range(0, n, BATCH):
        idx = perm[j: j + BATCH]
        train_step(model, opt, loss_fn, {k: v[idx] for k, v in rows.items()})


def _subset_rows(source, fraction: float, f: str):
    """One file's rows of the student's subset: the table, the kept positions and ids/labels."""
    import pyarrow.parquet as pq

    from kd_ray.core.subsets import in_fraction

    table = pq.read_table(f)
    ids, labels = table.column("id").to_numpy(), table.column("label").to_numpy()
    keep = ~in_fraction(ids, labels, source.val, source.val_seed)
    sub = source.subsets.get((fraction, 0))
    if sub is not None:
        keep &= in_fraction(ids, labels, sub, 0)
    return table, np.flatnonzero(keep), ids, labels


def _normalised(source, table, at: np.ndarray, f: str) -> np.ndarray:
    from kd_ray.core.images import decode_images

    mean = np.asarray(source.normalization["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(source.normalization["std"], np.float32).reshape(1, -1, 1, 1)
    return (decode_images(table.column("image").take(at), [3, 32, 32], f) - mean) / std


def plain_views(source, fraction: float, paths: list[str], views: int, seed: int, out: str) -> tuple[float, int]:
    """The views cache as a user writes it: per file, the subset's rows, V shifted views each, the
    teachers on every view, top-k written per file."""
    import torch

    from kd_ray.core.augment import view_shift
    from kd_ray.core.ensemble import load_ensemble

    torch.set_num_threads(os.cpu_count())
    models = load_ensemble(paths)
    os.makedirs(out, exist_ok=True)
    t0, rows = time.perf_counter(), 0
    for i, f in enumerate(source.files["train"]):
        table, at, ids, _ = _subset_rows(source, fraction, f)
        x, ids = _normalised(source, table, at, f), ids[at]
        vid, view = np.repeat(ids, views), np.tile(np.arange(views), len(ids))
        xv = view_shift(np.repeat(x, views, axis=0), vid, view, JITTER, seed)
        write_top_k(models, xv, {"id": vid, "view": view}, f"{out}/{i}.parquet")
        rows += len(xv)
    return time.perf_counter() - t0, rows


def plain_views_epoch(source, fraction: float, views_dir: str, views: int, seed: int, classes: int,
                      teachers: int) -> tuple[float, int]:
    """A cached-views epoch as a user writes it: per file, the subset's rows joined to their view
    of this epoch by (id, view), the image rebuilt, shuffled, trained."""
    import pyarrow.parquet as pq
    import torch

    from kd_ray.core.augment import cached_view, chosen_views
    from kd_ray.stages.streamed_targets import rows_numpy

    torch.set_num_threads(os.cpu_count())
    model, opt, loss_fn = student(classes)
    t0, rows = time.perf_counter(), 0
    for i, f in enumerate(source.files["train"]):
        table, at, ids, labels = _subset_rows(source, fraction, f)
        x, ids = _normalised(source, table, at, f), ids[at]
        v = chosen_views(ids, views, 0, 0)
        cache = pq.read_table(f"{views_dir}/{i}.parquet")
        keys = cache.column("id").to_numpy() * views + cache.column("view").to_numpy()
        order = np.argsort(keys)
        pos = order[np.searchsorted(keys, ids * views + v, sorter=order)]
        # the plain cache keeps each teacher's top-k flattened: [K * k] -> [K, k] (the tail: [K])
        cols = {c: torch.from_numpy(rows_numpy(cache.column(c))[pos].reshape(
                    (len(pos), teachers) if c.endswith("tail") else (len(pos), teachers, -1)))
                for c in cache.column_names if c.startswith("teacher")}
        image = torch.from_numpy(cached_view(x, ids, v, JITTER, seed))
        train_shuffled(model, opt, loss_fn, {"image": image, "label": torch.from_numpy(labels[at]), **cols})
        rows += len(at)
    return time.perf_counter() - t0, rows


def kd_views(sets: list[str], source, paths: list[str], fraction: float, views: int, work: str) -> dict:
    """kd_ray's streamed views cache of the subset (label_views) and a cached-views epoch over it."""
    import torch

    from kd_ray.core.augment import cached_view, chosen_views
    from kd_ray.core.config_files import load_config
    from kd_ray.core.schema import TARGET_COLUMNS
    from kd_ray.stages.soft_targets import parquet_rows, view_seed, write_split
    from kd_ray.stages.streamed_targets import label_views, student_views

    vcfg = load_config(None, [*sets, f"soft_targets.views={views}", f"soft_targets.jitter={JITTER}",
                              f"soft_targets.views_fraction={fraction}"])
    seed = view_seed(vcfg)
    peak = PeakRSS()
    peak.start()
    out = os.path.join(work, "views_cache")
    t0 = time.perf_counter()
    files = write_split(label_views(vcfg, paths, source, "topk", TOP_K), out, "views", partition_cols=["shard"])
    views_s = time.perf_counter() - t0
    rows = parquet_rows(out, files)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    driver_views = peak.driver
    model, opt, loss_fn = student(source.num_classes)
    t1, trained = time.perf_counter(), 0
    for b in student_views(source, out, views, fraction, 0).iter_torch_batches(
            batch_size=BATCH, local_shuffle_buffer_size=4 * BATCH, local_shuffle_seed=0):
        v = torch.from_numpy(chosen_views(b["id"].numpy(), views, 0, 0))
        at = torch.arange(len(v))
        b = {k: t[at, v] if k in TARGET_COLUMNS else t for k, t in b.items()}
        b["image"] = cached_view(b["image"], b.pop("id"), v, JITTER, seed)
        train_step(model, opt, loss_fn, b)
        trained += len(v)
    epoch_s = time.perf_counter() - t1
    peak.running = False
    peak.join()
    return {"seed": seed, "views_s": views_s, "rows": rows, "bytes_per_view": round(size / max(rows, 1), 1), "trained": trained,
            "epoch_s": epoch_s, "driver_views_kb": driver_views, "driver_kb": peak.driver, "worker_kb": peak.worker}


# --------------------------------------------------------------------------- one size
def one(n: int, args) -> dict:
    import make_synthetic

    data = os.path.join(args.data, f"n{n}_c{args.classes}")
    if not os.path.exists(os.path.join(data, "test")):
        make_synthetic.write(data, n, args.test_rows, args.classes, 20_000, 0)
    work = tempfile.mkdtemp(prefix="kd_ray_scale_")
    from kd_ray.core.config_files import load_config

    fraction = min(1.0, round(args.student_rows / (n * 0.9), 4))
    sets = [f"runtime.storage_path={work}/runs", "name=scale", "data.name=parquet", f"data.root={data}",
            "data.image_shape=[3, 32, 32]", f"soft_targets.temperature={T}", "soft_targets.batch_size=1024",
            f"soft_targets.actors={args.actors}", "soft_targets.teacher_logits=topk", f"soft_targets.top_k={TOP_K}"]
    if args.given_statistics:  # both sides skip their statistics pass
        sets.append(f"data.normalization={json.dumps(GIVEN)}")
    cfg = load_config(None, sets)
    from kd_ray.stages.sources import source_files

    files = {s: source_files(cfg.data, s) for s in ("train", "test")}
    _, paths = untrained_teachers(work, (3, 32, 32), args.classes, args.teachers, **TEACHER)

    import ray
    import ray.data

    peak = PeakRSS()
    peak.start()
    t0 = time.perf_counter()
    # one logical CPU more than the cores: the predictor actors hold one each, and the read tasks
    # need one beside them (with none left they wait forever); the plain loop decodes and infers
    # on the same cores in turn
    ray.init(num_cpus=os.cpu_count() + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from kd_ray.stages.sources import open_source
    from kd_ray.stages.streamed_targets import build_streamed_targets, student_rows

    source = open_source(cfg.data, subsets=[(fraction, 0)])
    opened_s = time.perf_counter() - t0
    soft = build_streamed_targets(cfg, paths, source)
    path, manifest = soft.path, soft.manifest
    kd_s = time.perf_counter() - t0
    kd_rows = source.rows["train"] + source.rows["val"] + source.rows["test"]
    driver_targets, worker_targets, worker_name = peak.driver, peak.worker, peak.worker_name

    model, opt, loss_fn = student(source.num_classes)
    t1, trained = time.perf_counter(), 0
    for batch in student_rows(source, path, fraction, 0).iter_torch_batches(
            batch_size=BATCH, local_shuffle_buffer_size=4 * BATCH, local_shuffle_seed=0):
        batch.pop("id")
        train_step(model, opt, loss_fn, batch)
        trained += len(batch["label"])
    kd_student_s = time.perf_counter() - t1
    t1, streamed = time.perf_counter(), 0  # what limits the epoch: the same stream with no training step
    for batch in student_rows(source, path, fraction, 0).iter_torch_batches(
            batch_size=BATCH, local_shuffle_buffer_size=4 * BATCH, local_shuffle_seed=0):
        streamed += len(batch["label"])
    stream_only_s = time.perf_counter() - t1
    peak.running = False
    peak.join()

    views = kd_views(sets, source, paths, fraction, args.views, work) if args.views else None
    dense_bpr = None
    if n == min(args.sizes) and not args.given_statistics:
        dense_cfg = load_config(None, [*sets, "soft_targets.teacher_logits=dense"])
        dense_bpr = build_streamed_targets(dense_cfg, paths, source).manifest["bytes_per_row"]["train"]
    ray.shutdown()
    plain_s, plain_rows, _ = plain_soft_targets(files, paths, os.path.join(work, "plain_cache"),
                                                GIVEN if args.given_statistics else None)
    plain_student_s, plain_trained = plain_student_epoch(source, fraction, path, source.num_classes)
    out = {
        "rows": n, "classes": args.classes, "teachers": args.teachers, "labelled_rows": kd_rows,
        "given_statistics": args.given_statistics,
        "soft_targets_rows_per_s": {"kd_ray": round(kd_rows / kd_s, 1), "plain": round(plain_rows / plain_s, 1),
                                    "ratio_end_to_end": round((kd_rows / kd_s) / (plain_rows / plain_s), 3)},
        "kd_ray_seconds": {"start_and_open": round(opened_s, 1), "soft_targets_total": round(kd_s, 1)},
        "plain_seconds": round(plain_s, 1),
        "cache_bytes_per_row": {"top32": manifest["bytes_per_row"]["train"], "dense": dense_bpr},
        "student_rows": trained,
        "student_rows_per_s": {"kd_ray": round(trained / kd_student_s, 1),
                               "plain": round(plain_trained / plain_student_s, 1),
                               "ratio": round((trained / kd_student_s) / (plain_trained / plain_student_s), 3),
                               "kd_ray_stream_only": round(streamed / stream_only_s, 1)},
        "peak_rss_mb": {"driver_soft_targets": round(driver_targets / 1024, 1),
                        "largest_worker_soft_targets": round(worker_targets / 1024, 1),
                        "largest_worker_soft_targets_is": worker_name,
                        "driver_with_student_epoch": round(peak.driver / 1024, 1),
                        "largest_worker": round(peak.worker / 1024, 1)},
    }
    if views is not None:
        pv_s, pv_rows = plain_views(source, fraction, paths, args.views, views["seed"], os.path.join(work, "plain_views"))
        pe_s, pe_rows = plain_views_epoch(source, fraction, os.path.join(work, "plain_views"), args.views,
                                          views["seed"], source.num_classes, args.teachers)
        out["views"] = {
            "views": args.views, "labelled_views": views["rows"], "bytes_per_view": views["bytes_per_view"],
            "views_per_s": {"kd_ray": round(views["rows"] / views["views_s"], 1), "plain": round(pv_rows / pv_s, 1),
                            "ratio": round((views["rows"] / views["views_s"]) / (pv_rows / pv_s), 3)},
            "epoch_rows_per_s": {"kd_ray": round(views["trained"] / views["epoch_s"], 1),
                                 "plain": round(pe_rows / pe_s, 1),
                                 "ratio": round((views["trained"] / views["epoch_s"]) / (pe_rows / pe_s), 3)},
            "peak_rss_mb": {"driver_views_pass": round(views["driver_views_kb"] / 1024, 1),
                            "driver_with_epoch": round(views["driver_kb"] / 1024, 1),
                            "largest_worker": round(views["worker_kb"] / 1024, 1)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[60_000, 600_000])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--test-rows", type=int, default=10_000)
    ap.add_argument("--student-rows", type=int, default=60_000)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "kd_ray_scale"))
    ap.add_argument("--given-statistics", action="store_true",
                    help="data.normalization given (kd_ray and the plain loop skip their statistics pass); no dense cache")
    ap.add_argument("--views", type=int, default=0, help="also time the streamed views cache with V views a row")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    results = []
    for n in args.sizes:  # a fresh process (and Ray) per size
        argv = [sys.executable, __file__, "--one", str(n), *sys.argv[1:]]
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({"benchmark": "scale", **results[-1]}), flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(json.dumps({"benchmark": "scale", "driver_rss_ratio": round(
            b["peak_rss_mb"]["driver_soft_targets"] / a["peak_rss_mb"]["driver_soft_targets"], 3), "sizes": [a["rows"], b["rows"]]}))


if __name__ == "__main__":
    main()

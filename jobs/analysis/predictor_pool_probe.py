"""How fast does the streamed predictor pool label rows, with and without Ray's block splitting?

    python jobs/analysis/predictor_pool_probe.py --rows N --data /tmp/kd_ray_scale/n600000_c1000 [--ray-split]

Opens a synthetic set of jobs/bench/bench_scale.py (given statistics, so no statistics pass),
runs ``source.split("all")`` through the predictor pool (2 actors, 3 untrained CNN teachers,
top-32 of 1,000 classes, batch 1,024; no cache written) and prints one JSON line: rows/s after
the first batch over the first ``--rows`` rows. ``--ray-split`` reads parquet as Ray's first
datasource does by default (each file's block split in several), not one read task a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from common import untrained_teachers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--ray-split", action="store_true")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kd_ray_probe_")
    from kd_ray.core.config_files import load_config

    cfg = load_config(None, [f"runtime.storage_path={work}/runs", "name=probe", "data.name=parquet",
                             f"data.root={args.data}", "data.image_shape=[3, 32, 32]", "soft_targets.batch_size=1024",
                             "soft_targets.actors=2", "soft_targets.teacher_logits=topk", "soft_targets.top_k=32",
                             'data.normalization={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}'])
    _, paths = untrained_teachers(work, (3, 32, 32), 1000, 3, model="cnn", model_args={"channels": [8, 16]})
    import ray
    import ray.data

    import kd_ray.stages.sources as sources

    if args.ray_split:  # Ray's default: no override_num_blocks, each file's block split in several
        plain_read = ray.data.read_parquet
        sources.read_parquet = lambda files, **kw: plain_read(files, **{k: v for k, v in kw.items()
                                                                        if k != "override_num_blocks"})
    ray.init(num_cpus=os.cpu_count() + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().use_datasource_v2 = False
    from kd_ray.stages.predictor import predict
    from kd_ray.stages.streamed_targets import StreamedPredictor

    source = sources.open_source(cfg.data)
    t0 = time.perf_counter()
    ds = predict(source.split("all", paths=True), paths, cfg.soft_targets, "train", [], keep="topk",
                 predictor=StreamedPredictor)
    got, first = 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        first = first or time.perf_counter()
        got += len(batch["id"])
        if got >= args.rows:
            break
    end = time.perf_counter()
    print(json.dumps({"probe": "predictor_pool", "data": args.data, "ray_split": args.ray_split, "rows": got,
                      "first_batch_s": round(first - t0, 1), "rows_per_s": round(got / (end - first), 1)}), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

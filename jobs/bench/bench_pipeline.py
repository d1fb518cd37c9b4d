"""The whole pipeline on a synthetic parquet source, in memory against streamed (``data.stream``).

    python jobs/bench/bench_pipeline.py [--sizes 20000 60000] [--modes memory stream] [--classes 100]
        [--data /tmp/kd_ray_pipeline]

Per size N (training rows; 10,000 test rows; 3 x 32 x 32 uint8 images from make_synthetic.py)
and mode, one ``kd-ray run`` in its own process and its own local Ray: 2 small CNN teachers x 1
epoch, a top-32 cache, one student trial (10 % of the rows, 1 epoch). Sampled every 0.2 s: the
peak RSS of the driver (the ``kd-ray run`` process, less shared object-store pages) and of the
largest Ray worker (teachers, predictor actors, Train workers and data tasks). Reported with the
wall time, one JSON line per run. In memory the driver and every teacher hold the whole source;
streamed, the driver holds file lists and thresholds and each process one call's rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_synthetic  # noqa: E402
from bench_scale import rss_kb  # noqa: E402

SETS = ["teachers.count=2", "teachers.model=cnn", "teachers.model_args={channels: [8, 16]}", "teachers.epochs=1",
        "teachers.batch_size=256", "teachers.jitter=0", "soft_targets.teacher_logits=topk", "soft_targets.top_k=32",
        "student.model=cnn", "student.model_args={channels: [8, 16]}", "student.epochs=1", "student.batch_size=256",
        "student.report_every=1", "sweep.fractions=[0.1]", "sweep.targets=[soft]", "sweep.seeds=[0]",
        "runtime.stages=[teachers, soft-targets, sweep]", "runtime.tracking=[]"]


def ray_processes() -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read(5) == b"ray::":
                    out.append(pid)
        except OSError:
            continue
    return out


def run(n: int, stream: bool, data: str, storage: str) -> dict:
    argv = [sys.executable, "-m", "kd_ray.cli", "run", "digits", "--set", f"name=pipeline_{n}_{int(stream)}",
            "--set", "data.name=parquet", "--set", f"data.root={data}", "--set", "data.image_shape=[3, 32, 32]",
            "--set", f"data.stream={str(stream).lower()}", "--set", f"runtime.storage_path={storage}",
            *[a for s in SETS for a in ("--set", s)]]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    driver = worker = 0
    while proc.poll() is None:
        driver = max(driver, rss_kb(proc.pid))
        worker = max([worker, *(rss_kb(p) for p in ray_processes())])
        time.sleep(0.2)
    wall = time.perf_counter() - started
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"kd-ray run failed (exit {proc.returncode}):\n{out[-3000:]}")
    return {"rows": n, "mode": "streamed" if stream else "in memory", "wall_s": round(wall, 1),
            "peak_rss_mb": {"driver": round(driver / 1024), "largest_worker": round(worker / 1024)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 60_000])
    # in memory, the driver and each teacher hold several float copies of the source: mind the RAM
    ap.add_argument("--modes", nargs="+", choices=["memory", "stream"], default=["memory", "stream"])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "kd_ray_pipeline"))
    args = ap.parse_args()
    for n in args.sizes:
        data = os.path.join(args.data, f"n{n}_c{args.classes}")
        if not os.path.isdir(data):  # written beside, then renamed: an interrupted run leaves no partial set
            make_synthetic.write(data + ".partial", rows=n, test_rows=10_000, classes=args.classes, shard_rows=20_000,
                                 seed=0)
            os.rename(data + ".partial", data)
        for stream in [m == "stream" for m in args.modes]:
            with tempfile.TemporaryDirectory() as storage:
                print(json.dumps({"benchmark": "pipeline", **run(n, stream, data, storage)}), flush=True)


if __name__ == "__main__":
    main()

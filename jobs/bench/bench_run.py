"""The default `kd-ray run` against the same work as a plain PyTorch script, and the fixed cost of a
sweep trial (light path and TorchTrainer path), in one run.

    python jobs/bench/bench_run.py [--trials 8] [--skip-run]

1. End to end: ``kd-ray run digits`` (Ray's start-up included, a fresh storage folder) against
   ``jobs/bench/plain_default_run.py`` (the same teachers, soft targets and 16 students as one
   plain single-process PyTorch script), each a subprocess timed from launch to exit; per stage
   from each one's own stage lines. Also counted in kd-ray's output: Ray's "N PYTHON worker
   processes have been started" warnings and error-level lines (``E`` records, ``ERROR``).
2. Fixed cost of a trial: a sweep of N trivial trials (a 16-unit student, 1 epoch on 3 % of
   digits, one trial at a time) on a local cluster started here, once with light trials
   (``student.trainer: auto``) and once with a TorchTrainer per trial. Per trial: wall time minus
   its training time, and the machine's busy CPU-seconds (/proc/stat, all processes) over the
   sweep divided by N.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

# as `make` and CI: a local ray.init() with RAY_AUTH_MODE unset writes ~/.ray/auth_token, which
# turns token authentication on for every later `ray start --head` on this machine
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def busy_cpu_seconds() -> float:
    """CPU-seconds this machine has spent busy since boot (every process)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], cwd: str | None = None) -> tuple[float, float, str]:
    """(wall seconds, busy CPU-seconds, output) of a subprocess from launch to exit."""
    c0, t0 = busy_cpu_seconds(), time.time()
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall, cpu = time.time() - t0, busy_cpu_seconds() - c0
    if p.returncode != 0:
        sys.exit(f"{cmd[:3]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, cpu, p.stdout + p.stderr


def end_to_end() -> dict:
    plain_wall, plain_cpu, out = timed([sys.executable, str(HERE / "plain_default_run.py")])
    plain = json.loads(out.strip().splitlines()[-1])
    storage = tempfile.mkdtemp(prefix="kd_ray_bench_run_")
    kd_wall, kd_cpu, log = timed([str(BIN / "kd-ray"), "run", "digits", "--set", f"runtime.storage_path={storage}"],
                                 cwd=storage)
    stages = {m[0]: float(m[1]) for m in re.findall(r"\[kd_ray\] stage (\S+) took ([\d.]+) s", log)}
    worker_warnings = len(re.findall(r"PYTHON worker processes have been started", log))
    errors = [ln for ln in log.splitlines() if re.match(r"^\[[\d\- :,]+ E \d+ \d+\]", ln) or " ERROR " in ln]
    Path(storage, "kd_ray_run.log").write_text(log)
    return {"plain_wall_s": plain_wall, "plain_cpu_s": plain_cpu, "plain_stages_s": plain["plain"],
            "kd_ray_wall_s": kd_wall, "kd_ray_cpu_s": kd_cpu, "kd_ray_stages_s": stages,
            "ratio_end_to_end": plain_wall / kd_wall,
            "ratio_teachers": plain["plain"]["teachers"] / stages.get("teachers", float("nan")),
            "ratio_sweep": plain["plain"]["sweep"] / stages.get("sweep", float("nan")),
            "worker_warnings": worker_warnings, "error_lines": len(errors), "first_error": errors[0][:200] if errors else "",
            "log": str(Path(storage, "kd_ray_run.log"))}


def trial_fixed_cost(n: int) -> dict:
    import ray

    from kd_ray.core.config_files import load_config
    from kd_ray.stages.soft_targets import build_soft_targets
    from kd_ray.stages.sweep import run_sweep
    from kd_ray.stages.teachers import train_ensemble

    root = tempfile.mkdtemp(prefix="kd_ray_bench_trials_")
    base = [f"runtime.storage_path={root}", "teachers.count=2", "teachers.epochs=1", "teachers.model_args={hidden: [16]}",
            "student.model_args={hidden: [16]}", "student.epochs=1", "student.report_every=1", "student.use_gpu=false",
            "sweep.fractions=[0.03]", "sweep.targets=[soft]", f"sweep.seeds={list(range(n))}",
            "sweep.max_concurrent_trials=1"]
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    out = {}
    try:
        cfg = load_config(None, [*base, "name=trials"])
        soft = build_soft_targets(cfg, train_ensemble(cfg))
        for trainer in ("auto", "torch_trainer"):
            cfg_t = load_config(None, [*base, f"name=trials_{trainer}", f"student.trainer={trainer}"])
            c0, t0 = busy_cpu_seconds(), time.time()
            result = run_sweep(cfg_t, soft)
            wall, cpu = time.time() - t0, busy_cpu_seconds() - c0
            train = float(result.results["train_seconds"].sum())
            out["light" if trainer == "auto" else "torch_trainer"] = {
                "trials": n, "sweep_wall_s": wall, "train_s": train, "fixed_wall_s_per_trial": (wall - train) / n,
                "cpu_s_per_trial": cpu / n}
    finally:
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--skip-run", action="store_true", help="only the fixed cost of a trial")
    args = p.parse_args()
    result, rows = {}, []
    if not args.skip_run:
        e = end_to_end()
        result["end_to_end"] = e
        s, ps = e["kd_ray_stages_s"], e["plain_stages_s"]
        rows += [("plain script, end to end", f"{e['plain_wall_s']:.1f} s ({e['plain_cpu_s']:.0f} CPU-s)"),
                 ("kd-ray run digits, end to end", f"{e['kd_ray_wall_s']:.1f} s ({e['kd_ray_cpu_s']:.0f} CPU-s)"),
                 ("ratio (plain / kd_ray), end to end", f"{e['ratio_end_to_end']:.2f}x"),
                 ("teachers: plain / kd_ray", f"{ps['teachers']:.1f} s / {s.get('teachers', float('nan')):.1f} s "
                                              f"({e['ratio_teachers']:.2f}x)"),
                 ("soft targets: plain / kd_ray", f"{ps['soft_targets']:.1f} s / {s.get('soft-targets', float('nan')):.1f} s"),
                 ("sweep (16 students): plain / kd_ray", f"{ps['sweep']:.1f} s / {s.get('sweep', float('nan')):.1f} s "
                                                         f"({e['ratio_sweep']:.2f}x)"),
                 ("kd_ray: Ray worker-count warnings / error lines", f"{e['worker_warnings']} / {e['error_lines']}")]
    t = trial_fixed_cost(args.trials)
    result["trial_fixed_cost"] = t
    for path, v in t.items():
        rows.append((f"fixed cost of a trial, {path}", f"{v['fixed_wall_s_per_trial']:.2f} s wall, "
                                                        f"{v['cpu_s_per_trial']:.1f} CPU-s ({v['trials']} trials)"))
    emit("bench_run", rows, result)


if __name__ == "__main__":
    main()

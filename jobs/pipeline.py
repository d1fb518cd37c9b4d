"""Entrypoint for Ray Jobs: the whole kd_ray pipeline on the cluster that runs it.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/pipeline.py --config kd_ray/configs/digits.yaml [--set section.key=value ...]

The job's driver joins the cluster through RAY_ADDRESS (set by Ray Jobs), runs the stages
listed in ``runtime.stages`` of the config (default: teachers, soft-targets, sweep, report),
prints where the results are, and exits non-zero with a one-line reason on failure: 2 for a
bad config or input (nothing was run), 1 for a failed or incomplete stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# `python jobs/pipeline.py` puts jobs/ on sys.path; the package sits one level up (the
# uploaded working directory), and need not be pip-installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file or shipped config name (default: digits)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    from kd_ray.cli import BAD_INPUT, run_stages
    from kd_ray.core.config import ConfigError
    from kd_ray.core.config_files import DEFAULT_CONFIG, load_config
    from kd_ray.core.storage import StorageUnreachable

    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.set)
    except (ConfigError, FileNotFoundError) as e:
        print(f"kd_ray pipeline: config error: {e}", file=sys.stderr, flush=True)
        return 2
    os.environ.update(cfg.runtime.storage_options.env())  # runtime.storage_options (Ray workers: init_ray)
    print(f"[kd_ray] job on {os.environ.get('RAY_ADDRESS', 'a new local cluster')}: experiment {cfg.name}, "
          f"stages {', '.join(cfg.runtime.stages)}, storage {cfg.runtime.storage_path}", flush=True)
    try:
        complete = run_stages(cfg)
    except BAD_INPUT as e:
        if not isinstance(e, ConfigError):  # the job log keeps where it came from
            traceback.print_exc()
        print(f"kd_ray pipeline: error: {e}", file=sys.stderr, flush=True)
        return 2
    except StorageUnreachable as e:  # the object store went away: one line, nothing to debug
        print(f"kd_ray pipeline: failed: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # a failed stage: the full traceback for the job logs, then the reason
        traceback.print_exc()
        print(f"kd_ray pipeline: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    if not complete:
        print("kd_ray pipeline: the sweep is incomplete (see the failed trials above); submit the job again "
              "to finish it", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

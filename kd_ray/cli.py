"""``kd-ray``: one command per stage, and ``run`` for the whole pipeline.

    kd-ray configs                      the shipped configs, one line each
    kd-ray init NAME [--from CONFIG]    write NAME.yaml (a copy of CONFIG, default digits) to edit
    kd-ray config show [CONFIG] [--set a.b=c ...]
    kd-ray teachers [CONFIG] [--set ...]
    kd-ray soft-targets [CONFIG] [--set ...]
    kd-ray distill [CONFIG] [--set ...]
    kd-ray sweep [CONFIG] [--set ...]
    kd-ray report [CONFIG] [--set ...]
    kd-ray run [CONFIG] [--set ...]
    kd-ray export RUN_DIR [--format torchscript|state_dict] [--out DIR]

Every stage trains or computes only what is missing: running a command again reuses the
finished teachers, soft-target cache, students and sweep trials.

CONFIG is a YAML file or the name of a shipped config (``kd-ray configs``); default: digits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from kd_ray.core import storage
from kd_ray.core.config import ConfigError, ExperimentConfig
from kd_ray.core.config_files import (
    DEFAULT_CONFIG,
    config_path,
    load_config,
    shipped_configs,
)
from kd_ray.layout import experiment_dir

# bad input (a config, a file, a value): exit 2, one line; found before the work it would spoil
BAD_INPUT = (ConfigError, FileNotFoundError, ValueError)


def _config(args: argparse.Namespace) -> ExperimentConfig:
    verbose = ["runtime.verbose=true"] if getattr(args, "verbose", False) else []
    cfg = load_config(args.config or DEFAULT_CONFIG, [*args.set, *verbose])
    os.environ.update(cfg.runtime.storage_options.env())  # also for stages that start no Ray (report)
    return cfg


def cmd_configs() -> None:
    for name, (_, description) in shipped_configs().items():
        print(f"{name:28s} {description}")


def cmd_init(name: str, source: str) -> Path:
    """Write ``NAME.yaml`` in the working directory: a copy of ``source`` named ``NAME``."""
    out = Path(name if name.endswith(".yaml") else f"{name}.yaml")
    if out.exists():
        raise ConfigError(f"{out} exists; choose another NAME or delete it")
    text = config_path(source).read_text()
    cfg = load_config(config_path(source), [f"name={out.stem}"])  # the copy must load under its new name
    lines = [f"name: {cfg.name}" if line.startswith("name:") else line for line in text.splitlines()]
    out.write_text("\n".join(lines) + "\n")
    return out


def cmd_config_show(cfg: ExperimentConfig) -> None:
    print(cfg.to_yaml(), end="")


def cmd_teachers(cfg: ExperimentConfig):
    from kd_ray.core.data import load_splits
    from kd_ray.core.storage import check_writable
    from kd_ray.stages.cluster import init_ray
    from kd_ray.stages.teachers import import_teachers, train_ensemble

    check_writable(cfg.runtime.storage_path)
    if cfg.data.stream:  # the source is read by the actors; the driver opens it (counts and statistics)
        from kd_ray.stages.sources import experiment_source

        init_ray(cfg)
        source = experiment_source(cfg)
        return train_ensemble(cfg, source, import_teachers(cfg, source))
    splits = load_splits(cfg.data)
    imported = import_teachers(cfg, splits)  # before Ray starts: a teacher file that does not fit fails here
    init_ray(cfg)
    return train_ensemble(cfg, splits, imported)


def cmd_soft_targets(cfg: ExperimentConfig, ensemble=None):
    from kd_ray.stages.cluster import init_ray
    from kd_ray.stages.soft_targets import build_soft_targets

    ensemble = ensemble or cmd_teachers(cfg)
    init_ray(cfg)
    if cfg.data.stream:
        from kd_ray.stages.sources import experiment_source
        from kd_ray.stages.streamed_targets import build_streamed_targets

        return build_streamed_targets(cfg, ensemble.model_paths, experiment_source(cfg))
    return build_soft_targets(cfg, ensemble)


def cmd_distill(cfg: ExperimentConfig, soft=None):
    from kd_ray.stages.distill import distill
    from kd_ray.stages.omitted_class import omitted_class_report

    soft = soft or cmd_soft_targets(cfg)
    result = distill(cfg, soft)
    m = result.metrics
    print(result.history.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if result.diverged_epoch:
        print(f"[kd_ray] the student DIVERGED in epoch {result.diverged_epoch} (its loss became NaN or infinite): "
              f"lower student.lr (now {cfg.student.lr}) or student.grad_clip_norm (now {cfg.student.grad_clip_norm})",
              file=sys.stderr)
        return result
    print(f"[kd_ray] student ({m['targets']} targets, {m['fraction']:g} of the data, T={m['temperature']:g}): "
          f"test accuracy {m['test_accuracy']:.4f}, fidelity {m['test_fidelity']:.4f} "
          f"(ensemble {soft.manifest['ensemble']['test_accuracy']:.4f}); checkpoint {result.checkpoint_path}"
          f"{' (reused)' if result.reused else ''}")
    if (cfg.data.omit_classes or cfg.data.keep_classes is not None) and soft.source is None:
        r = omitted_class_report(cfg, soft, result)  # (the bias adjustment reads the splits in memory)
        print(f"[kd_ray] transfer set without classes {r['unseen']}: test errors {r['test_errors_before']} "
              f"({r['class_errors_before']} on those classes) -> {r['test_errors_after']} "
              f"({r['class_errors_after']}) of {r['test_count']} after adding {r['delta']:g} to the bias of "
              f"{r['classes']} (chosen on validation)")
    return result


def cmd_sweep(cfg: ExperimentConfig, soft=None):
    from kd_ray.stages.sweep import run_sweep

    soft = soft or cmd_soft_targets(cfg)
    result = run_sweep(cfg, soft)
    counts = result.results["status"].value_counts().to_dict()
    print(f"[kd_ray] sweep: {len(result.results)} trials ({counts}) in {result.seconds:.1f} s; "
          f"results in {result.path}/results.parquet")
    if not result.complete:
        print("[kd_ray] the sweep is incomplete (interrupted or failed trials): run the same command again to "
              "finish it; finished trials are kept", file=sys.stderr)
    for row in result.results[result.results["status"] == "error"].itertuples():
        print(f"[kd_ray] trial {row.targets} f={row.fraction:g} seed {row.seed} FAILED: {row.error}", file=sys.stderr)
    for row in result.diverged.itertuples():
        print(f"[kd_ray] trial {row.targets} f={row.fraction:g} T={row.temperature:g} a={row.alpha:g} lr={row.lr:g} "
              f"seed {row.seed} "
              f"DIVERGED in epoch {int(row.diverged_epoch)} (its loss became NaN or infinite): lower student.lr or "
              f"student.grad_clip_norm", file=sys.stderr)
    return result


def cmd_report(cfg: ExperimentConfig) -> str:
    from kd_ray.report import write_report

    out = experiment_dir(cfg)
    text = write_report(out)
    print(text)
    print(f"[kd_ray] report: {out}/summary.md and {out}/accuracy_vs_fraction.png")
    return text


def run_stages(cfg: ExperimentConfig) -> bool:
    """The stages in ``runtime.stages``, in order; False when the sweep is incomplete or a trial diverged."""
    t0 = time.time()
    ensemble = soft = result = None
    for stage in cfg.runtime.stages:
        t_stage = time.time()
        try:
            if stage == "teachers":
                ensemble = cmd_teachers(cfg)
            elif stage == "soft-targets":
                soft = cmd_soft_targets(cfg, ensemble)
                print(f"[kd_ray] soft targets: {soft.describe()}")
            elif stage == "sweep":
                result = cmd_sweep(cfg, soft)
            elif stage == "report":
                cmd_report(cfg)
        except BAD_INPUT:  # not an outage, whatever its text says
            raise
        except Exception as e:
            if (down := storage.unreachable(e, cfg.runtime.storage_path, stage)) is not None:
                raise down from e
            raise
        print(f"[kd_ray] stage {stage} took {time.time() - t_stage:.1f} s", flush=True)
    print(f"[kd_ray] kd-ray run finished in {time.time() - t0:.1f} s wall ({' -> '.join(cfg.runtime.stages)}); "
          f"results in {experiment_dir(cfg)}")
    return result is None or result.ok


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ray", description="Distributed ensemble knowledge distillation on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", nargs="?", default=None,
                       help=f"YAML file or shipped config name (default: {DEFAULT_CONFIG})")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (parsed as YAML); repeatable")
        p.add_argument("--verbose", action="store_true",
                       help="Ray's worker logs, progress bars and Tune's tables on the console (runtime.verbose)")
        return p

    sub.add_parser("configs", help="list the shipped configs")
    init = sub.add_parser("init", help="write NAME.yaml, a copy of a shipped config to edit")
    init.add_argument("name")
    init.add_argument("--from", dest="source", default=DEFAULT_CONFIG, help="config to copy (default: digits)")
    cfg_p = sub.add_parser("config", help="inspect configs")
    cfg_sub = cfg_p.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", help="print the resolved config")
    show.add_argument("config", nargs="?", default=None)
    show.add_argument("--set", action="append", default=[])
    add("teachers", "train the teacher ensemble")
    add("soft-targets", "compute the ensemble's soft targets (trains missing teachers first)")
    add("distill", "distil one student (trains missing teachers and soft targets first)")
    add("sweep", "the Ray Tune sweep of students (trains missing teachers and soft targets first)")
    add("report", "redraw summary.md and accuracy_vs_fraction.png from the saved sweep results")
    add("run", "the whole pipeline: the stages in runtime.stages (default: teachers -> soft-targets -> sweep -> report)")
    exp = sub.add_parser("export", help="write the best student as a deployable artifact plus a JSON card")
    exp.add_argument("run_dir", help="<storage>/<name> (a sweep: its best student) or a student's run folder")
    exp.add_argument("--format", default="torchscript", choices=["torchscript", "state_dict"])
    exp.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export)")

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    cfg = None
    try:
        if args.command == "export":
            from kd_ray.export import export_student

            card = export_student(args.run_dir, args.out, args.format)
            print(json.dumps(card, indent=2))
            print(f"[kd_ray] exported {card['artifact']} and student_card.json to {card['path']}")
            return 0
        if args.command == "configs":
            cmd_configs()
            return 0
        if args.command == "init":
            out = cmd_init(args.name, args.source)
            print(f"[kd_ray] wrote {out}: edit it, then `kd-ray run {out}`")
            return 0
        cfg = _config(args)
        if args.command == "config":
            cmd_config_show(cfg)
        elif args.command == "teachers":
            cmd_teachers(cfg)
        elif args.command == "soft-targets":
            soft = cmd_soft_targets(cfg)
            print(f"[kd_ray] soft targets: {soft.describe()}")
        elif args.command == "distill":
            if cmd_distill(cfg).diverged_epoch:
                return 1
        elif args.command == "sweep":
            if not cmd_sweep(cfg).ok:
                return 1
        elif args.command == "report":
            cmd_report(cfg)
        elif args.command == "run":
            if not run_stages(cfg):
                return 1
    except BAD_INPUT as e:
        print(f"kd-ray: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if cfg is None or (down := storage.unreachable(e, cfg.runtime.storage_path, args.command)) is None:
            raise
        print(f"kd-ray: {down}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

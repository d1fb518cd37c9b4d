"""The sweep's grid, pure: every trial as a dict of GRID_KEYS, its config and its key.

:mod:`kd_ray.stages.sweep` runs the trials; the grid reads each loss's declared parameters
(:mod:`kd_ray.core.student_losses`) and each teaching mode's declaration (:mod:`kd_ray.core.teaching`).
"""
from __future__ import annotations

import itertools
import json

from kd_ray.core.config import ConfigError, ExperimentConfig, loss_params
from kd_ray.core.plan import plan_student, student_teaching
from kd_ray.core.student_losses import loss_class
from kd_ray.core.teaching import PLAIN, TEACHINGS, Teaching

# a trial's values; ``loss_args`` is its loss's parameters as canonical JSON
GRID_KEYS = ("fraction", "targets", "teaching", "temperature", "alpha", "lr", "epochs", "seed", "loss", "loss_args")


def trial_grid(cfg: ExperimentConfig) -> list[dict]:
    """Every trial of the sweep, as dicts of GRID_KEYS, in a fixed order.

    Soft-target trials: teaching modes x losses (each with the grid of the parameters it declares,
    ``sweep.loss_args``) x T x alpha x learning rates x epoch budgets x seeds.
    Hard-label trials need no teachers, T or alpha (alpha 0, the soft targets' T): the plain
    baseline (``teaching`` "none", the largest epoch budget) and, for
    every augmenting mode the soft trials use ("inconsistent": shifts; "consistent": the same
    shifted and mixed views, with mixed labels; "cached_views": the same V cached views), a matched
    baseline with that augmentation and each epoch budget, so a gap never mixes augmentation gains
    with distillation gains.
    """
    sw = cfg.sweep
    temps = sw.temperatures or [plan_student(cfg).temperature]
    alphas = sw.alphas or [cfg.student.alpha]
    teachings = sw.teaching or [student_teaching(cfg, cfg.student.model_copy(update={"targets": "soft"})).name]
    budgets = sw.epochs or [cfg.student.epochs]
    lrs = sw.lrs or [cfg.student.lr]
    trials = []
    for fraction in sw.fractions:
        for targets in sw.targets:
            if targets == "soft":
                grid = [(m, T, a, lr, e, loss) for m in teachings for loss in loss_settings(cfg) for T in temps
                        for a in alphas for lr in lrs for e in budgets]
            else:  # a hard trial has no soft term: kd's objective with alpha 0
                T0, none = cfg.soft_targets.temperature, ("kd", "{}")
                grid = [(PLAIN, T0, 0.0, lr, max(budgets), none) for lr in lrs]
                grid += [(m, T0, 0.0, lr, e, none) for m in teachings
                         if TEACHINGS[m].matched_baseline for lr in lrs for e in budgets]
            for teaching, T, alpha, lr, epochs, (loss, loss_args) in grid:
                for seed in sw.seeds:
                    t = {"fraction": float(fraction), "targets": targets, "teaching": teaching,
                         "temperature": float(T), "alpha": float(alpha), "lr": float(lr), "epochs": int(epochs),
                         "seed": int(seed), "loss": loss, "loss_args": loss_args}
                    if t not in trials:
                        trials.append(t)
    if not trials:
        raise ConfigError("sweep: the grid is empty; give at least one fraction, target kind and seed")
    return trials


def loss_settings(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(loss, its parameters as canonical JSON) of the soft trials: every swept loss (default: the
    student's) with the grid of ``sweep.loss_args`` over the parameters that loss declares."""
    out = []
    for loss in cfg.sweep.losses or [cfg.student.loss]:
        base = dict(cfg.student.loss_args) if loss == cfg.student.loss else {}
        axes = {k: v for k, v in cfg.sweep.loss_args.items() if k in loss_class(loss).Params.model_fields}
        for values in itertools.product(*axes.values()):
            args = loss_params(loss, {**base, **dict(zip(axes, values))})
            out.append((loss, json.dumps(args, sort_keys=True)))
    return out


def trial_teaching(trial: dict) -> Teaching:
    """The teaching mode a trial's soft targets and views come from (the plain baseline: the stored rows)."""
    return TEACHINGS["cached" if trial["teaching"] == PLAIN else trial["teaching"]]


def trial_config(cfg: ExperimentConfig, trial: dict) -> ExperimentConfig:
    """The experiment config of one trial: the student section with the trial's values."""
    update = {"fraction": trial["fraction"], "targets": trial["targets"], "temperature": trial["temperature"],
              "alpha": trial["alpha"], "lr": trial["lr"], "seed": trial["seed"], "epochs": trial["epochs"],
              "loss": trial["loss"], "loss_args": json.loads(trial["loss_args"]),
              "teaching": trial_teaching(trial).name}
    student = cfg.student.model_copy(update=update)
    return cfg.model_copy(update={"student": student})


def trial_key(trial: dict) -> str:
    args = "".join(f"-{k}{v:g}" if isinstance(v, (int, float)) else f"-{k}{v}"
                   for k, v in json.loads(trial["loss_args"]).items())
    return (f"f{trial['fraction']:g}-{trial['targets']}-{trial['teaching']}-T{trial['temperature']:g}"
            f"-a{trial['alpha']:g}-lr{trial['lr']:g}-e{trial['epochs']}-s{trial['seed']}-{trial['loss']}{args}")

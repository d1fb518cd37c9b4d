"""The sweep's grid (kd_ray/core/grid.py): which trials a config gives, their configs and keys (no Ray)."""
import pytest

from kd_ray.core.config import ConfigError
from kd_ray.core.config_files import load_config
from kd_ray.core.grid import trial_config, trial_grid, trial_key
from kd_ray.core.plan import plan_student


def test_grid_has_one_hard_trial_per_fraction_and_seed():
    cfg = load_config(None, ["sweep.fractions=[0.03, 0.1]", "sweep.temperatures=[2, 4]", "sweep.alphas=[0.5, 0.9]",
                             "sweep.seeds=[0, 1]"])
    trials = trial_grid(cfg)
    soft = [t for t in trials if t["targets"] == "soft"]
    hard = [t for t in trials if t["targets"] == "hard"]
    assert len(soft) == 2 * 2 * 2 * 2 and len(hard) == 2 * 2
    assert {t["alpha"] for t in hard} == {0.0} and {t["temperature"] for t in hard} == {4.0}
    assert {(t["temperature"], t["alpha"]) for t in soft} == {(2.0, 0.5), (2.0, 0.9), (4.0, 0.5), (4.0, 0.9)}
    # defaults: the student's alpha and the cache's T
    plain = trial_grid(load_config(None, ["sweep.seeds=[0]", "soft_targets.temperature=3"]))
    assert len(plain) == 4 * 2 and {t["temperature"] for t in plain} == {3.0}


def test_grid_sweeps_each_loss_with_the_parameters_it_declares():
    cfg = load_config(None, ["sweep.fractions=[0.1]", "sweep.losses=[kd, logit_matching, dkd]",
                             "sweep.loss_args={nckd: [1, 8]}", "student.loss=dkd", "student.loss_args={tckd: 2}"])
    trials = trial_grid(cfg)
    assert sorted((t["targets"], t["loss"], t["loss_args"]) for t in trials) == [
        ("hard", "kd", "{}"), ("soft", "dkd", '{"nckd": 1.0, "tckd": 2.0}'), ("soft", "dkd", '{"nckd": 8.0, "tckd": 2.0}'),
        ("soft", "kd", "{}"), ("soft", "logit_matching", "{}")]
    kd = next(t for t in trials if t["targets"] == "soft" and t["loss"] == "kd")
    assert trial_key(kd) == "f0.1-soft-cached-T4-a0.9-lr0.05-e20-s0-kd"
    dkd = next(t for t in trials if t["loss"] == "dkd")
    assert trial_key(dkd).endswith("-dkd-nckd1-tckd2")
    student = trial_config(cfg, dkd).student
    assert student.loss == "dkd" and student.loss_args == {"nckd": 1.0, "tckd": 2.0}
    assert len({trial_key(t) for t in trials}) == len(trials)


def test_cached_views_get_a_matched_hard_baseline_and_need_views():
    cfg = load_config(None, ["soft_targets.jitter=1", "soft_targets.views=8", "sweep.fractions=[0.1]",
                             "sweep.teaching=[cached, cached_views]"])
    assert plan_student(cfg).teaching.name == "cached"  # a views cache: the student defaults to cached teaching
    trials = trial_grid(cfg)
    assert sorted((t["targets"], t["teaching"]) for t in trials) == [
        ("hard", "cached_views"), ("hard", "none"), ("soft", "cached"), ("soft", "cached_views")]
    hard_views = next(t for t in trials if t["targets"] == "hard" and t["teaching"] == "cached_views")
    assert plan_student(trial_config(cfg, hard_views)).teaching.name == "cached_views"  # hard labels on the same views
    with pytest.raises(ConfigError, match="teaching: cached_views teaching .*: set soft_targets.views"):
        load_config(None, ["soft_targets.jitter=1", "student.teaching=cached_views"])
    with pytest.raises(ConfigError, match="set soft_targets.views .* soft_targets.jitter"):  # views of what?
        load_config(None, ["soft_targets.views=4", "student.teaching=cached_views"])
    mixed = load_config(None, ["soft_targets.views=4", "soft_targets.mixup=1.0", "student.teaching=cached_views"])
    assert plan_student(mixed).teaching.name == "cached_views"  # mixed views


def test_grid_sweeps_teaching_modes_and_epoch_budgets():
    cfg = load_config(None, ["soft_targets.jitter=1", "sweep.fractions=[0.03]",
                             "sweep.seeds=[0, 1]",
                             "sweep.teaching=[cached, inconsistent, consistent]", "sweep.epochs=[10, 40]"])
    trials = trial_grid(cfg)
    soft = [t for t in trials if t["targets"] == "soft"]
    hard = [t for t in trials if t["targets"] == "hard"]
    assert len(soft) == 3 * 2 * 2
    assert {(t["teaching"], t["epochs"]) for t in soft} == {(m, e) for m in ("cached", "inconsistent", "consistent")
                                                             for e in (10, 40)}
    # the plain hard baseline needs no teachers and stops early: once per seed, with the largest
    # budget; matched baselines get each augmenting mode's views and each budget, without stopping
    plain = [(t["epochs"], t["seed"]) for t in hard if t["teaching"] == "none"]
    assert plain == [(40, 0), (40, 1)]
    matched = {(t["teaching"], t["epochs"], t["seed"]) for t in hard if t["teaching"] != "none"}
    assert matched == {(m, e, s) for m in ("inconsistent", "consistent") for e in (10, 40) for s in (0, 1)}
    c = trial_config(cfg, soft[-1])
    assert (c.student.teaching, c.student.epochs) == (soft[-1]["teaching"], soft[-1]["epochs"])
    assert plan_student(trial_config(cfg, hard[0])).teaching.name == "cached"  # the plain baseline: stored rows
    shifted = trial_config(cfg, next(t for t in hard if t["teaching"] == "consistent"))
    assert shifted.student.early_stopping_patience is None
    assert plan_student(shifted).teaching.name == "inconsistent"  # without mixup: in-worker shifts, no teachers
    # augmentation-based modes need augmentation
    with pytest.raises(ConfigError, match="soft_targets.jitter"):
        load_config(None, ["sweep.teaching=[consistent]"])
    # mixup alone is augmentation enough for consistent teaching (the default then), not for inconsistent
    assert plan_student(load_config(None, ["soft_targets.mixup=1.0"])).teaching.name == "consistent"
    mixed = load_config(None, ["soft_targets.mixup=1.0", "sweep.teaching=[consistent]"])
    assert (mixed.sweep.teaching, mixed.soft_targets.jitter) == (["consistent"], 0)
    assert plan_student(trial_config(mixed, {**hard[0], "teaching": "consistent"})).teaching.name == "consistent"
    with pytest.raises(ConfigError, match="inconsistent teaching .*: set soft_targets.jitter"):
        load_config(None, ["soft_targets.mixup=1.0", "student.teaching=consistent", "sweep.teaching=[inconsistent]"])
    with pytest.raises(ConfigError, match="soft_targets.mode: removed"):
        load_config(None, ["soft_targets.mode=cached"])


def test_hard_and_soft_trials_stop_by_the_same_rule():
    cfg = load_config(None, ["student.early_stopping_patience=7"])
    hard = trial_config(cfg, {"fraction": 0.1, "targets": "hard", "teaching": "none", "temperature": 4.0,
                              "alpha": 0.0, "lr": 0.05, "epochs": 20, "seed": 3,
                              "loss": "kd", "loss_args": "{}"})
    soft = trial_config(cfg, {"fraction": 0.1, "targets": "soft", "teaching": "cached", "temperature": 2.0,
                              "alpha": 0.9, "lr": 0.05, "epochs": 20, "seed": 3,
                              "loss": "kd", "loss_args": "{}"})
    assert hard.student.early_stopping_patience == 7 and hard.student.fraction == 0.1 and hard.student.seed == 3
    assert soft.student.early_stopping_patience == 7 and soft.student.temperature == 2.0
    plain = trial_config(load_config(None, []), {"fraction": 0.1, "targets": "hard", "teaching": "none",
                                                 "temperature": 4.0, "alpha": 0.0, "lr": 0.05, "epochs": 20, "seed": 3,
                              "loss": "kd", "loss_args": "{}"})
    assert plain.student.early_stopping_patience is None  # by default every trial runs its budget
    assert cfg.student.fraction == 1.0  # the base config is not modified

"""A run resolved once (kd_ray/core/plan.py): each student's plan, the policy, and the one declared
identity of every stored artifact."""
import pytest

from kd_ray.core.config import ConfigError, StudentConfig, TeacherSpec
from kd_ray.core.config_files import load_config
from kd_ray.core.plan import (
    STUDENT_PLACEMENT,
    TEACHER_PLACEMENT,
    cache_identity,
    digest,
    plan_student,
    student_identity,
    sweep_identity,
    teacher_identity,
)


def test_a_student_is_resolved_once_into_its_plan():
    cfg = load_config(None, ["soft_targets.temperature=3", "student.loss=dkd", "student.loss_args={nckd: 2}"])
    plan = plan_student(cfg)
    assert plan.temperature == 3.0 and plan.student.temperature == 3.0  # the soft targets' T, filled in
    assert plan.teaching.name == "cached" and plan.student.teaching == "cached"
    assert plan.loss_args == {"nckd": 2.0, "tckd": 1.0}  # defaults filled in
    assert plan_student(load_config(None, ["student.temperature=5"])).temperature == 5.0
    shifted = load_config(None, ["soft_targets.jitter=1"])
    assert plan_student(shifted).teaching.name == "consistent"  # augmentation reaches the teachers by default
    hard = shifted.student.model_copy(update={"targets": "hard"})
    assert plan_student(shifted, hard).teaching.name == "inconsistent"  # its views need no teacher
    assert not plan_student(shifted, hard).soft and plan_student(shifted).soft


def _name(cfg, **student) -> str:
    plan = plan_student(cfg, cfg.student.model_copy(update=student))
    return digest(student_identity(plan, "cache"), 10)


def test_a_student_run_is_named_by_what_it_learns_not_where_it_runs():
    cfg = load_config(None, [])
    name = _name(cfg)
    assert {_name(cfg, trainer="torch_trainer"), _name(cfg, use_gpu=True), _name(cfg, max_failures=3)} == {name}
    learns = {"lr": 0.1, "epochs": 3, "alpha": 0.5, "seed": 1, "fraction": 0.5, "loss": "per_teacher",
              "min_steps": 100, "init": "teacher", "grad_clip_norm": None, "num_workers": 2}
    names = {k: _name(cfg, **{k: v}) for k, v in learns.items()}
    assert name not in names.values() and len(set(names.values())) == len(names)
    # a loss's defaults name the run as if given: {} and {nckd: 8, tckd: 1} are the same dkd
    assert _name(cfg, loss="dkd", loss_args={}) == _name(cfg, loss="dkd", loss_args={"nckd": 8.0, "tckd": 1})
    assert set(STUDENT_PLACEMENT) <= set(StudentConfig.model_fields)


def test_a_run_is_named_by_the_augmentation_its_teaching_mode_declares():
    def name(*sets):
        cfg = load_config(None, list(sets))
        return digest(student_identity(plan_student(cfg), "cache"), 10)

    # cached teaching sees no shifts: the shift size does not name it; inconsistent teaching's does
    assert name("student.teaching=cached", "soft_targets.jitter=1") == name("student.teaching=cached", "soft_targets.jitter=2")
    assert name("student.teaching=inconsistent", "soft_targets.jitter=1") != name(
        "student.teaching=inconsistent", "soft_targets.jitter=2")
    assert name("student.teaching=consistent", "soft_targets.jitter=1") != name(
        "student.teaching=consistent", "soft_targets.jitter=1", "soft_targets.mixup=1.0")


def test_teacher_and_cache_identities_are_their_declared_fields(tmp_path):
    import torch

    spec = TeacherSpec()
    key = digest(teacher_identity(spec, {"d": 1}), 16)
    assert digest(teacher_identity(spec.model_copy(update={"num_gpus": 1, "num_cpus": 4}), {"d": 1}), 16) == key
    assert digest(teacher_identity(spec.model_copy(update={"lr": 0.1}), {"d": 1}), 16) != key
    # the starting weights, by content: the same path holding other weights is another teacher
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    tuned = spec.model_copy(update={"pretrained_file": str(weights)})
    first = digest(teacher_identity(tuned, {"d": 1}), 16)
    assert first != key
    torch.save({"w": torch.ones(2)}, weights)
    assert digest(teacher_identity(tuned, {"d": 1}), 16) != first
    assert set(TEACHER_PLACEMENT) <= set(TeacherSpec.model_fields)

    def cache(*sets):
        return digest(cache_identity(load_config(None, list(sets)), ["t1"], {"d": 1}, 100, 7, 4), 20)

    plain = cache()
    assert cache("soft_targets.jitter=2") == plain  # no views: the augmentation names no cache
    assert cache("soft_targets.temperature=2") != plain and cache("soft_targets.teacher_logits=topk") != plain
    views = cache("soft_targets.views=4", "soft_targets.jitter=1")
    assert views != plain and views != cache("soft_targets.views=4", "soft_targets.jitter=2")


def test_a_sweep_is_named_by_the_student_outside_its_grid():
    def name(*sets):
        return digest(sweep_identity(load_config(None, list(sets)), "cache", ("fraction", "seed", "lr")), 10)

    assert name() == name("sweep.seeds=[0, 1]", "student.seed=4", "sweep.max_concurrent_trials=2")
    assert name() != name("student.batch_size=32") and name() != name("sweep.metric=val_nll")


def test_the_policy_runs_when_a_config_loads_with_the_field_named():
    with pytest.raises(ConfigError, match=r"teaching: consistent teaching .*: set soft_targets.jitter"):
        load_config(None, ["student.teaching=consistent"])
    with pytest.raises(ConfigError, match=r"student.teaching: unknown teaching mode 'streaming'"):
        load_config(None, ["student.teaching=streaming"])

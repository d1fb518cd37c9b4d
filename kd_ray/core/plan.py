"""A run resolved once: the config's cross-field policy, each student's resolved plan, and the
identity of every stored artifact.

:func:`check` is the policy a valid schema must still pass (teaching modes fed, losses fed,
streamed sources, fractions covered); ``load_config`` runs it. :func:`plan_student` resolves a
student once on the driver -- its temperature, teaching mode, loss -- into a :class:`StudentPlan`
that its run, its worker and its name read; nothing re-resolves it. The ``*_identity`` functions
are the one declared list of fields naming each artifact (teacher checkpoint, soft-target
cache, student run, sweep): a field listed there makes a new artifact, one not listed never
does; artifacts stored by older versions are not renamed to match (they are rebuilt).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from kd_ray.core.config import ExperimentConfig, StudentConfig, TeacherSpec, loss_params
from kd_ray.core.models import weights_digest
from kd_ray.core.student_losses import loss_class
from kd_ray.core.teaching import PLAIN, TEACHINGS, Teaching, default_teaching, teaching


def digest(fields: dict, length: int) -> str:
    """The name an identity gives: a prefix of the SHA-256 of its fields as sorted JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:length]


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class StudentPlan:
    """One student, resolved: its config (``teaching`` and ``temperature`` filled in), its teaching
    mode's declaration, its effective temperature and its soft term's parameters."""

    student: StudentConfig
    teaching: Teaching
    temperature: float  # the student's own T, else the soft targets' (re-softened when they differ)
    loss_args: dict  # the loss's parameters, defaults filled in
    jitter: int  # soft_targets.jitter and mixup: the augmentation of its views
    mixup: float
    data_seed: int

    @property
    def soft(self) -> bool:
        return self.student.targets == "soft" and self.student.alpha > 0


def student_teaching(cfg: ExperimentConfig, student: StudentConfig | None = None) -> Teaching:
    """The teaching mode a student trains in: its own (default: :func:`default_teaching`); a hard
    student's is its soft mode's matched view (``Teaching.hard_mode``)."""
    s = student or cfg.student
    mode = teaching(s.teaching or default_teaching(cfg.soft_targets))
    return mode.hard_mode(cfg.soft_targets) if s.targets == "hard" else mode


def plan_student(cfg: ExperimentConfig, student: StudentConfig | None = None) -> StudentPlan:
    s = student or cfg.student
    mode = student_teaching(cfg, s)
    T = s.temperature or cfg.soft_targets.temperature
    s = s.model_copy(update={"teaching": mode.name, "temperature": T})
    return StudentPlan(s, mode, T, loss_params(s.loss, s.loss_args), cfg.soft_targets.jitter,
                       cfg.soft_targets.mixup, cfg.data.seed)


# --------------------------------------------------------------------------- identities
# Fields of a teacher spec that decide where it runs, not what it learns
TEACHER_PLACEMENT = ("num_gpus", "num_cpus")
# Fields of a student that decide how or where it runs, not what it learns
STUDENT_PLACEMENT = ("trainer", "use_gpu", "max_failures")
# Fields of soft_targets that name a cache (the augmentation fields name its views only)
CACHE_FIELDS = ("temperature", "rule", "teacher_logits", "top_k", "precision")
VIEW_FIELDS = ("views", "views_fraction", "jitter", "mixup")


def teacher_identity(spec: TeacherSpec, data: dict) -> dict:
    """What a teacher checkpoint must match to be resumed or reused: what it learns, on what data,
    from which weights (its ``pretrained_file`` by content)."""
    learn = spec.model_dump(mode="json", exclude=set(TEACHER_PLACEMENT))
    return {"spec": learn, "data": data, "weights_sha256": weights_digest(spec)}


def cache_identity(cfg: ExperimentConfig, teacher_sha256: list[str], data: dict, transfer_rows: int,
                   view_seed: int, schema: int) -> dict:
    """What a soft-target cache must match: the teachers (by content), the data and transfer set,
    how the targets are made and kept, and its views."""
    st = cfg.soft_targets
    views = {**{k: getattr(st, k) for k in VIEW_FIELDS}, "seed": view_seed} if st.views else None
    return {"schema": schema, "teachers": teacher_sha256, "data": data,
            "transfer": {"omit_classes": cfg.data.omit_classes, "keep_classes": cfg.data.keep_classes,
                         "rows": transfer_rows},
            **{k: getattr(st, k) for k in CACHE_FIELDS}, "views": views}


def student_identity(plan: StudentPlan, cache_fingerprint: str) -> dict:
    """What a student run's result depends on: its resolved config (not its placement), its
    loss's parameters, its starting weights by content, the augmentation its teaching mode
    declares, the cache, the data seed."""
    s = {**plan.student.model_dump(mode="json", exclude=set(STUDENT_PLACEMENT)), "loss_args": plan.loss_args}
    return {"student": s, "cache": cache_fingerprint, "data_seed": plan.data_seed,
            "weights_sha256": weights_digest(plan.student),
            "augmentation": {k: getattr(plan, k) for k in plan.teaching.identity}}


def sweep_identity(cfg: ExperimentConfig, cache_fingerprint: str, grid_keys: tuple[str, ...]) -> dict:
    """What a sweep's trials depend on besides their grid values: the student config outside the
    grid, how trials are stopped and chosen, the cache, the data seed and the augmentation."""
    s = cfg.student.model_dump(mode="json", exclude=set(STUDENT_PLACEMENT) | set(grid_keys) | {"teaching"})
    return {"student": s, "sweep": cfg.sweep.model_dump(mode="json", include={"metric", "scheduler"}),
            "cache": cache_fingerprint, "data_seed": cfg.data.seed, "weights_sha256": weights_digest(cfg.student),
            "augmentation": {"jitter": cfg.soft_targets.jitter, "mixup": cfg.soft_targets.mixup}}


# --------------------------------------------------------------------------- the policy
def teachings_in_use(cfg: ExperimentConfig) -> list[Teaching]:
    """The teaching modes of the student and the sweep's soft trials."""
    names = list(cfg.sweep.teaching) + [cfg.student.teaching or default_teaching(cfg.soft_targets)]
    return [teaching(n) for n in dict.fromkeys(n for n in names if n != PLAIN)]


def check(cfg: ExperimentConfig) -> None:
    """The cross-field rules; the first broken one raises ValueError naming the field and the fix."""
    _check_teaching(cfg)
    _check_losses(cfg)


def _check_teaching(cfg: ExperimentConfig) -> None:
    st = cfg.soft_targets
    for mode in teachings_in_use(cfg):
        lack = mode.needs(st)
        if lack:
            where = "sweep.teaching" if mode.name in cfg.sweep.teaching else "student.teaching"
            raise ValueError(f"{where}: {mode.name} teaching ({mode.doc}): {lack}")
        why = mode.streamed_source(st) if cfg.data.stream else None
        if why:
            raise ValueError(f"data.stream: {mode.name} teaching does not stream: {why}")
    views_fractions = (cfg.sweep.fractions if "cached_views" in cfg.sweep.teaching else []) + (
        [cfg.student.fraction] if cfg.student.teaching == "cached_views" else [])
    if views_fractions and max(views_fractions) > st.views_fraction:
        raise ValueError(f"soft_targets.views_fraction: cached_views students train on fractions up to "
                         f"{max(views_fractions):g} but the views cache holds {st.views_fraction:g} of the rows: raise it")
    if cfg.data.stream and st.views and st.mixup:
        raise ValueError("data.stream: a mixed view's partner is drawn from the whole views fraction, held in memory; "
                         "set soft_targets.mixup: 0 (or views: 0) or data.stream: false")


def _check_losses(cfg: ExperimentConfig) -> None:
    """Each soft loss can read what it declares; each swept loss parameter is some swept loss's."""
    losses = cfg.sweep.losses or [cfg.student.loss]
    for name in losses:
        if loss_class(name).reads == "teacher_logits" and cfg.soft_targets.teacher_logits == "none":
            where = "sweep.losses" if cfg.sweep.losses else "student.loss"
            raise ValueError(f"{where}: {name} reads the teachers' logits, but soft_targets.teacher_logits is "
                             f"none: set it to dense or topk")
    for key, values in cfg.sweep.loss_args.items():
        takers = [n for n in losses if key in loss_class(n).Params.model_fields]
        if not takers or not values:
            raise ValueError(f"sweep.loss_args.{key}: " + ("give at least one value" if takers else
                             f"no swept loss ({losses}) takes it"))
        for name in takers:
            for v in values:
                loss_params(name, {key: v}, where="sweep.loss_args")


__all__ = ["TEACHINGS", "StudentPlan", "check", "plan_student", "student_teaching", "teachings_in_use"]

"""How soft targets meet augmentation: the teaching modes, one declaration each.

``student.teaching`` and ``sweep.teaching`` name a mode; the config's checks, the soft-target
stage, the student's driver and worker, the sweep (grid, trial resources, run names) and the
report read its declaration, never its name. A new mode: declare it here and teach the worker
(``kd_ray/stages/student_worker.py``) how to form its rows if none of the ``views`` below fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

# The image a student trains on each epoch:
#   stored       the row's image as stored, with the cache's soft targets
#   shift        the stored image shifted in the worker (seeded per seed, epoch, id); soft targets
#                of the unshifted image
#   stream       a shifted (and mixed) view labelled by the teachers as it is made (a predictor pool)
#   cached_view  one of the cache's V labelled views of the row, rebuilt from the source image
View = Literal["stored", "shift", "stream", "cached_view"]


@dataclass(frozen=True)
class Teaching:
    name: str
    view: View
    split: Literal["train", "views", "none"]  # the cache's split a student reads ("none": the stream)
    teacher_passes: bool  # the teachers run while it trains (a predictor pool in the trial's bundles)
    matched_baseline: bool  # a sweep adds a hard baseline trained on the same views
    identity: tuple[str, ...]  # soft_targets fields that name its runs (beside the cache's own fingerprint)
    needs: Callable[[object], str | None]  # the SoftTargetsConfig -> what it lacks for this mode (one line) or None
    streamed_source: Callable[[object], str | None]  # the SoftTargetsConfig -> why it cannot stream (data.stream), or None
    doc: str

    def hard_mode(self, st) -> "Teaching":
        """The mode of this mode's matched hard baseline: a view that needs no teacher is made in the
        worker (consistent teaching without mixup is a shift); mixed views come with mixed labels."""
        return TEACHINGS["inconsistent"] if self.view == "stream" and st.mixup == 0 else self


def _augments(st) -> str | None:
    return None if st.jitter > 0 or st.mixup > 0 else (
        "set soft_targets.jitter to the largest shift in pixels (e.g. 1), soft_targets.mixup to a Beta "
        "parameter (e.g. 1.0), or both")


def _streams(st) -> None:
    return None


def _stream_without_mixup(st) -> str | None:
    return None if st.mixup == 0 else ("a mixed view's partner is drawn from the whole subset, held in memory; set "
                                       "soft_targets.mixup: 0 or data.stream: false")


TEACHINGS: dict[str, Teaching] = {t.name: t for t in (
    Teaching("cached", "stored", "train", False, False, (), lambda st: None, _streams,
             "the cached soft targets of the un-augmented images, no augmentation"),
    Teaching("inconsistent", "shift", "train", False, True, ("jitter",),
             lambda st: None if st.jitter > 0 else "set soft_targets.jitter to the largest shift in pixels (e.g. 1)",
             _streams, "the cached soft targets, but the student alone sees a shifted image"),
    Teaching("consistent", "stream", "none", True, True, ("jitter", "mixup"), _augments,
             _stream_without_mixup,
             "every epoch the teachers label the very view the student trains on (Beyer et al. 2022)"),
    Teaching("cached_views", "cached_view", "views", False, True, (),  # the views cache's fingerprint names them
             lambda st: None if st.views > 0 and not _augments(st) else
             "set soft_targets.views to their number (e.g. 8) and soft_targets.jitter and/or soft_targets.mixup",
             _stream_without_mixup, "each epoch one of the V cached views of each row: consistent, with no teacher passes"),
)}
# the sweep's name for its plain hard-label baseline: the stored rows, no augmentation ("cached", alpha 0)
PLAIN = "none"


def teaching(name: str) -> Teaching:
    if name not in TEACHINGS:
        raise ValueError(f"unknown teaching mode {name!r}; known modes: {sorted(TEACHINGS)}")
    return TEACHINGS[name]


def default_teaching(st) -> str:
    """``student.teaching`` left out: consistent teaching when the soft targets augment without a
    views cache (the augmentation must reach the teachers), else the cached soft targets."""
    return "consistent" if (st.jitter > 0 or st.mixup > 0) and not st.views else "cached"

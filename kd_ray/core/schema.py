"""The soft-target cache's row, in one place: every column a cache (or consistent teaching's
stream) may hold, its type and shape, and what it is. ``K`` teachers, ``C`` classes, ``k`` =
``soft_targets.top_k``. A cache never holds an image: students join rows to their source by ``id``.
``tests/test_soft_targets.py`` checks every cache it builds against this table.
"""
from __future__ import annotations

# name -> (numpy dtype, shape of one row's value, what it is)
CACHE_COLUMNS: dict[str, tuple[str, str, str]] = {
    "id": ("int64", "", "the sample's stable id in its source"),
    "label": ("int64", "", "its class"),
    "soft_targets": ("float32", "[C]", "the ensemble's soft targets at the cache's T (absent in a top-k cache)"),
    "ensemble_pred": ("int64", "", "the ensemble's top-1 class at T = 1 (fidelity)"),
    "teacher_logits": ("float16", "[K, C]", "each teacher's logits (soft_targets.teacher_logits: dense)"),
    "teacher_topk_values": ("float16", "[K, k]", "each teacher's k largest logits (teacher_logits: topk)"),
    "teacher_topk_index": ("int16", "[K, k]", "their classes"),
    "teacher_topk_tail": ("float32", "[K]", "one logit carrying the other classes' mass at T = 1"),
    "teacher_pred": ("int16", "[K]", "each teacher's top-1 class (a streamed source's cache)"),
    "view": ("int64", "", "the view's number, 0..V-1 (the views cache)"),
    "mix_id": ("int64", "", "a mixed view's partner row (mixup)"),
    "mix_label": ("int64", "", "the partner's class"),
    "mix_weight": ("float32", "", "the row's weight in the mix, ~ Beta(mixup, mixup)"),
}

# the per-teacher logits a cache keeps, by soft_targets.teacher_logits
TEACHER_LOGIT_COLUMNS = {"none": (), "dense": ("teacher_logits",),
                         "topk": ("teacher_topk_values", "teacher_topk_index", "teacher_topk_tail")}
# what a student's rows take from the cache besides id and label
TARGET_COLUMNS = ("soft_targets", *TEACHER_LOGIT_COLUMNS["dense"], *TEACHER_LOGIT_COLUMNS["topk"], "ensemble_pred")

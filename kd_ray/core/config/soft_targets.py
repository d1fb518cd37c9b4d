"""``soft_targets``: how the ensemble's predictions are softened, averaged, kept and augmented."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kd_ray.core.config.base import Section


class SoftTargetsConfig(Section):
    temperature: float = Field(4.0, gt=0)
    rule: Literal["probs", "logits"] = "probs"  # losses.RULES
    jitter: int = Field(0, ge=0)  # augmented teaching modes: shift up to k pixels
    # consistent teaching: mix each (shifted) image with another of the student's subset, weight ~
    # Beta(mixup, mixup), and let the teachers label the mixed image (Beyer et al. 2022's "function
    # matching"); cached views: each view mixed with a partner of the views cache's rows (its id and
    # weight stored). 0: no mixup. With jitter 0 the views are mixed, not shifted.
    mixup: float = Field(0.0, ge=0)
    # what the cache keeps of each teacher's logits (to re-soften at another T, or match logits):
    #   none    nothing beyond the averaged soft targets
    #   dense   all C logits per teacher, float16 (K x C x 2 bytes a row)
    #   topk    the top_k largest logits and their classes, and one tail logit per teacher
    #           (K x (4 x top_k + 4) bytes a row; losses.top_k_logits says how the tail is kept)
    teacher_logits: Literal["none", "dense", "topk"] = "dense"
    top_k: int = Field(32, ge=1)
    # cached mode: V shifted (and with ``mixup``, mixed) views of every transfer image, each a pure
    # function of (data seed, view, id), labelled once by the ensemble and cached without the image;
    # student.teaching: cached_views trains on them (consistent teaching, no teacher passes). 0: none
    views: int = Field(0, ge=0)
    # label views of this nested fraction of the transfer set only (the data seed's, as students
    # pick theirs): a sweep of small fractions pays V x its largest fraction, not V x every row
    views_fraction: float = Field(1.0, gt=0, le=1)
    # the teachers' arithmetic in the predictor (bfloat16: faster on CPUs with AVX512-BF16, soft
    # targets within ~1e-4 of float32's; docs/notes.md); averaging and softmax stay in float32
    precision: Literal["float32", "bfloat16"] = "float32"
    batch_size: int = Field(512, gt=0)
    actors: int = Field(1, ge=1)  # size of the EnsemblePredictor actor pool
    num_gpus: float = Field(0.0, ge=0)  # per predictor actor
    num_cpus: float = Field(1.0, gt=0)  # per predictor actor
    wait_for_actors_s: float = Field(60.0, gt=0)  # fail (not hang) if the pool cannot start

    @model_validator(mode="before")
    @classmethod
    def _no_mode(cls, data):
        if isinstance(data, dict) and "mode" in data:
            raise ValueError("mode: removed; the teaching mode decides (student.teaching, sweep.teaching: cached, "
                             "inconsistent, consistent or cached_views), and every cache holds the transfer set")
        return data

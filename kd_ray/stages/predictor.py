"""The ensemble as a Ray Data actor pool: every stage that labels rows with the teachers
(the soft-target cache, the views cache, consistent teaching, a streamed source's top-k cache)
maps its rows through :func:`predict`, which runs :class:`EnsemblePredictor` actors (K teachers
per batch, passes counted per split).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
import ray.data
import torch

from kd_ray.core.config import ExperimentConfig, SoftTargetsConfig
from kd_ray.core.ensemble import (
    build_teacher,
    ensemble_outputs,
    load_teacher_files,
)
from kd_ray.core.rows import SPLITS
from kd_ray.core.train import pick_device, to_tensor
from kd_ray.stages.cluster import wait_for
from kd_ray.stages.counters import pass_counter


class EnsemblePredictor:
    """Callable class for ``Dataset.map_batches`` on an actor pool: K teachers per batch."""

    def __init__(self, model_paths: list[str], temperature: float, rule: str, keep: str = "dense", top_k: int = 32,
                 split: str = "train", counter_names: Sequence[str] = (), precision: str = "float32"):
        self.device = pick_device()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1) if ray.is_initialized() else 1
        torch.set_num_threads(max(1, int(cpus)))
        self.models = [build_teacher(f.blob, self.device, precision) for f in load_teacher_files(model_paths)]
        self.T, self.rule, self.keep, self.top_k, self.split = temperature, rule, keep, top_k, split
        self.counters = [ray.get_actor(f"kd_ray_passes:{name}") for name in counter_names]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in batch:
            raise ValueError(f"the dataset has no 'image' column; columns found: {sorted(batch)}")
        images = to_tensor(np.asarray(batch["image"], dtype=np.float32)).to(self.device)
        batch.update(ensemble_outputs(self.models, images, self.T, self.rule, self.keep, self.top_k))
        if self.counters:  # per split: a ``split`` column (codes into SPLITS) wins
            codes = batch.get("split")
            counts = ({self.split: len(images)} if codes is None else
                      {SPLITS[c]: int(n) for c, n in zip(*np.unique(codes, return_counts=True))})
            ray.get([c.add.remote(s, n) for c in self.counters for s, n in counts.items()])
        return batch


def predict(ds, model_paths: list[str], st: SoftTargetsConfig, split: str, counters: Sequence[str],
            keep: str | None = None, predictor: type = EnsemblePredictor, **predictor_kwargs):
    """The lazy map: ``ds`` through a ``predictor`` actor pool sized from ``soft_targets``. Teacher
    passes are counted under each name in ``counters`` (the experiment's name, a run's)."""
    for name in counters:
        pass_counter(name)  # owned by this process, so it outlives the actor pool
    ds.context.wait_for_min_actors_s = int(st.wait_for_actors_s)
    return ds.map_batches(
        predictor,
        fn_constructor_kwargs=dict(model_paths=list(model_paths), temperature=st.temperature, rule=st.rule,
                                   keep=st.teacher_logits if keep is None else keep, top_k=st.top_k,
                                   split=split, counter_names=list(counters),
                                   precision=st.precision, **predictor_kwargs),
        compute=ray.data.ActorPoolStrategy(size=st.actors),
        num_gpus=st.num_gpus, num_cpus=st.num_cpus, batch_size=st.batch_size, batch_format="numpy",
    )


def check_pool_resources(cfg: ExperimentConfig) -> None:
    """An actor no node type can host would wait forever: fail at once; wait (for the autoscaler)
    while none is up yet."""
    st = cfg.soft_targets
    wait_for([{"CPU": st.num_cpus, "GPU": st.num_gpus}] * st.actors,
             {"CPU": "soft_targets.num_cpus", "GPU": "soft_targets.num_gpus"}, "predictor actors",
             cfg.runtime.scale_timeout_s)

"""Teacher forward passes, counted per experiment and per run by small named Ray actors.

This module imports nothing heavy: each counter is its own process, and importing torch or Ray
Data there would cost hundreds of MB per counter.
"""
from __future__ import annotations

from typing import Any

import ray


class PassCounter:
    """How many samples each teacher has run on, per split (a named Ray actor)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, split: str, n: int) -> None:
        self.counts[split] = self.counts.get(split, 0) + int(n)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


_COUNTERS: dict[str, Any] = {}  # keep the named actors alive while this driver runs


def pass_counter(name: str):
    key = (ray.get_runtime_context().get_node_id(), name)  # a handle from an earlier Ray session is stale
    if key not in _COUNTERS:
        _COUNTERS[key] = ray.remote(PassCounter).options(
            name=f"kd_ray_passes:{name}", get_if_exists=True, num_cpus=0).remote()
    return _COUNTERS[key]


def forward_passes(name: str) -> dict[str, int]:
    """Samples each teacher has run on so far, per split, for experiment ``name``."""
    return ray.get(pass_counter(name).get.remote())

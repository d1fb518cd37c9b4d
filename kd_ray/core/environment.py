"""What can change a run's numbers between machines, recorded next to its results: library
versions, the torch threads the process uses, the CPU and GPU models. On one machine the same
config gives bit-identical teachers and students; across machines, kernels and thread counts
may move the last digits (docs/results.md says by how much)."""
from __future__ import annotations

import platform

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """This process's numerics: versions, threads, CPU and GPU."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpu else None,
            "numpy": np.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu": cpu_model(), "gpu": gpu, "machine": platform.machine()}

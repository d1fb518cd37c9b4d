"""The paper's omitted-class experiment (section 3): a student that never saw one class in its
transfer set, and the output-bias adjustment, chosen on validation, that recovers it."""
from __future__ import annotations

import torch

from kd_ray.core import storage
from kd_ray.core.config import ExperimentConfig, StudentConfig
from kd_ray.core.train import bias_adjustment
from kd_ray.stages.distill import DistillResult
from kd_ray.stages.soft_targets import SoftTargets


def load_student(checkpoint_path: str, soft: SoftTargets, s: StudentConfig) -> torch.nn.Module:
    state = storage.load_torch(storage.join(checkpoint_path, "student.pt"))
    model = s.build(soft.manifest["input_shape"], soft.num_classes)
    model.load_state_dict(state["model"])
    return model.eval()


def omitted_class_report(cfg: ExperimentConfig, soft: SoftTargets, result: DistillResult) -> dict:
    """The paper's bias adjustment for the one class left out of the transfer set."""
    if len(cfg.data.omit_classes) != 1:
        raise ValueError("the omitted-class report needs exactly one class in data.omit_classes")
    c = int(cfg.data.omit_classes[0])
    model = load_student(result.checkpoint_path, soft, cfg.student)
    def logits_of(split: str):
        cols = soft.eval_arrays(split)
        with torch.no_grad():
            return model(torch.from_numpy(cols["image"])), torch.from_numpy(cols["label"])

    zv, yv = logits_of("val")
    zt, yt = logits_of("test")
    delta = bias_adjustment(zv, yv, c)

    def errors(z, y, d):
        z = z.clone()
        z[:, c] += d
        wrong = z.argmax(1) != y
        return int(wrong.sum()), int((wrong & (y == c)).sum()), int((y == c).sum())

    before, after = errors(zt, yt, 0.0), errors(zt, yt, delta)
    return {"class": c, "delta": delta, "test_errors_before": before[0], "test_errors_after": after[0],
            "class_errors_before": before[1], "class_errors_after": after[1], "class_count": before[2]}

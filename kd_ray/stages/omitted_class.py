"""The paper's omitted-class experiments (section 3): a student whose transfer set lacked classes
(one omitted, or all but a few kept), and the output-bias adjustment, chosen on validation, that
recovers them."""
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


def transfer_classes(cfg: ExperimentConfig, num_classes: int) -> tuple[list[int], list[int]] | None:
    """(classes whose bias is adjusted, classes the transfer set lacked), or None when it lacked none:
    the omitted classes both times (``data.omit_classes``; their biases go up), or the kept classes
    and all the others (``data.keep_classes``; the kept classes' biases go down)."""
    d = cfg.data
    if d.omit_classes:
        return sorted(d.omit_classes), sorted(d.omit_classes)
    if d.keep_classes is not None:
        return sorted(d.keep_classes), [c for c in range(num_classes) if c not in d.keep_classes]
    return None


def omitted_class_report(cfg: ExperimentConfig, soft: SoftTargets, result: DistillResult) -> dict:
    """The paper's bias adjustment for a transfer set that lacked classes (section 3: digit 3
    omitted; or only 7s and 8s kept): one delta on the adjusted classes' logits, chosen on the
    validation split; test errors overall and on the unseen classes before and after."""
    found = transfer_classes(cfg, soft.num_classes)
    if found is None:
        raise ValueError("the omitted-class report needs data.omit_classes or data.keep_classes")
    adjusted, unseen = found
    model = load_student(result.checkpoint_path, soft, cfg.student)

    def logits_of(split: str):
        cols = soft.eval_arrays(split)
        with torch.no_grad():
            return model(torch.from_numpy(cols["image"])), torch.from_numpy(cols["label"])

    zv, yv = logits_of("val")
    zt, yt = logits_of("test")
    delta = bias_adjustment(zv, yv, adjusted)
    lacked = torch.isin(yt, torch.tensor(unseen))

    def errors(d):
        z = zt.clone()
        z[:, adjusted] += d
        wrong = z.argmax(1) != yt
        return int(wrong.sum()), int((wrong & lacked).sum())

    before, after = errors(0.0), errors(delta)
    return {"classes": adjusted, "unseen": unseen, "delta": delta, "test_errors_before": before[0],
            "test_errors_after": after[0], "class_errors_before": before[1], "class_errors_after": after[1],
            "class_count": int(lacked.sum()), "test_count": len(yt)}

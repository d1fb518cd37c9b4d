"""``kd-ray export``: a TorchScript student that loads without kd_ray and predicts like the checkpoint."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from kd_ray.cli import main
from kd_ray.core.config_files import build_config
from kd_ray.stages.distill import distill
from kd_ray.stages.omitted_class import load_student
from kd_ray.stages.soft_targets import build_soft_targets
from kd_ray.stages.sweep import save_results

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# loads the artifact in a fresh interpreter where importing kd_ray fails
LOAD_WITHOUT_KD_RAY = """
import importlib.abc, sys
class NoKdRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kd_ray" or name.startswith("kd_ray."):
            raise ImportError("kd_ray is not installed here")
sys.meta_path.insert(0, NoKdRay())
import numpy as np, torch
model = torch.jit.load(sys.argv[1])
np.save(sys.argv[3], model(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())
"""


def test_export_torchscript_and_state_dict(tiny_ensemble, tmp_path, capsys):
    base, ensemble = tiny_ensemble
    cfg = build_config(base.model_dump(mode="json"), ["name=exported", "student.model_args={hidden: [64]}",
                                                      "student.epochs=2", "student.fraction=0.5"])
    st = build_soft_targets(cfg, ensemble)
    r = distill(cfg, st)
    root = f"{cfg.runtime.storage_path}/{cfg.name}"
    # a sweep's results table naming that student: export picks the best finished trial
    save_results(pd.DataFrame([{**{k: r.metrics[k] for k in ("fraction", "targets", "temperature", "alpha", "seed")},
                                "val_accuracy": r.metrics["val_accuracy"], "val_nll": r.metrics["val_nll"],
                                "status": "done", "run_name": r.run_name},
                               {"fraction": 1.0, "targets": "soft", "temperature": 4.0, "alpha": 0.9, "seed": 0,
                                "val_accuracy": 0.99, "val_nll": 0.01, "status": "error", "run_name": "never-finished"},
                               {"fraction": 1.0, "targets": "hard", "temperature": 4.0, "alpha": 0.0, "seed": 0,
                                "val_accuracy": 1.0, "val_nll": 9.0, "status": "done", "run_name": "worse-nll"}]), root)

    assert main(["export", root, "--out", str(tmp_path / "ts")]) == 0
    capsys.readouterr()
    card = json.loads((tmp_path / "ts" / "student_card.json").read_text())
    assert card["format"] == "torchscript" and card["source"].endswith(r.run_name)
    assert card["classes"] == list(range(10)) and card["input_shape"] == [1, 8, 8]
    assert card["temperature"] == 4.0 and card["test_accuracy"] == r.metrics["test_accuracy"]
    assert card["test_fidelity"] == r.metrics["test_fidelity"] and card["parameters"] == r.metrics["parameters"]
    assert len(card["input_normalization"]["mean"]) == 1

    x = st.eval_arrays("test")["image"][:64]
    np.save(tmp_path / "x.npy", x)
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_KD_RAY, str(tmp_path / "ts" / "student.ts"),
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")], cwd=tmp_path, check=True)
    served = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        expected = load_student(r.checkpoint_path, st, cfg.student)(torch.from_numpy(x)).numpy()
    assert np.allclose(served, expected, atol=1e-5)
    assert (served.argmax(1) == expected.argmax(1)).all()

    # state_dict from the student's own run folder
    student_dir = r.checkpoint_path.rsplit("/", 1)[0]
    assert main(["export", student_dir, "--format", "state_dict", "--out", str(tmp_path / "sd")]) == 0
    state = torch.load(tmp_path / "sd" / "student_state.pt", weights_only=True)
    model = load_student(r.checkpoint_path, st, cfg.student)
    model.load_state_dict(state)  # same architecture, same keys

    assert main(["export", str(tmp_path)]) == 2
    assert "neither a sweep's results.parquet nor a student's result.json" in capsys.readouterr().err

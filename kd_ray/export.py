"""``kd-ray export``: the best student as a deployable artifact plus a JSON card.

``RUN_DIR`` is an experiment folder (``<storage>/<name>``, holding a sweep's
``results.parquet``: the finished trial with the lowest validation NLL is exported) or one
student's run folder (``<storage>/<name>/students/<run>``, holding ``result.json``).

Formats: ``torchscript`` (``student.ts``, loads with ``torch.jit.load`` and nothing else; torch
2.14 marks TorchScript deprecated but still ships it) and ``state_dict`` (``student_state.pt``,
rebuild the model with ``kd_ray.core.models.build_model`` from the card). The card
(``student_card.json``) names the classes, the input shape and the normalisation the input
needs, the temperature, accuracy and fidelity, and the parameter count.
"""
from __future__ import annotations

import warnings

import torch

from kd_ray.core import storage
from kd_ray.core.config import StudentConfig
from kd_ray.core.models import count_parameters
from kd_ray.layout import students_dir

FORMATS = ("torchscript", "state_dict")
ARTIFACT = {"torchscript": "student.ts", "state_dict": "student_state.pt"}


def _plain(value):
    """A numpy scalar (from a pandas row) as the Python value JSON can write."""
    return value.item() if hasattr(value, "item") else value


def best_student(run_dir: str) -> tuple[str, dict]:
    """The student run folder to export from ``run_dir``, and why it was chosen."""
    if storage.exists(storage.join(run_dir, "result.json")):
        return run_dir, {"chosen": "the given student run"}
    if storage.exists(storage.join(run_dir, "results.parquet")):
        from kd_ray.core.grid import GRID_KEYS
        from kd_ray.stages.sweep import read_results

        df = read_results(run_dir)
        done = df[df["status"] == "done"]
        if done.empty:
            raise ValueError(f"{run_dir}: the sweep has no finished trial to export")
        # Lowest validation NLL: a proper score, where accuracy on a small validation set ties
        # often and early-stopped (hard-label) runs report the very accuracy they were picked on.
        best = done.sort_values(["val_nll", "val_accuracy"], ascending=[True, False]).iloc[0]
        return (storage.join(students_dir(run_dir), best["run_name"]),
                {"chosen": "lowest validation NLL among the sweep's finished trials",
                 **{k: _plain(best[k]) for k in GRID_KEYS if k in best}})
    raise FileNotFoundError(f"{run_dir} holds neither a sweep's results.parquet nor a student's result.json; "
                            f"give <storage>/<name> or <storage>/<name>/students/<run>")


def load_exportable(student_dir: str) -> tuple[torch.nn.Module, dict]:
    """The student model (eval mode, CPU) and its result.json."""
    done = storage.read_json(storage.join(student_dir, "result.json"))
    if "student" not in done:
        raise ValueError(f"{student_dir}/result.json predates export support (no model config); rerun the student")
    s = done["student"]
    model = StudentConfig.model_validate(s).build(done["input_shape"], done["num_classes"])
    state = storage.load_torch(storage.join(done["checkpoint_path"], "student.pt"))
    model.load_state_dict(state["model"])
    return model.eval(), done


def export_student(run_dir: str, out: str | None = None, fmt: str = "torchscript") -> dict:
    """Write the artifact and ``student_card.json`` to ``out`` (default ``<run_dir>/export``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    student_dir, why = best_student(run_dir)
    model, done = load_exportable(student_dir)
    out = out or storage.join(run_dir, "export")
    artifact = storage.join(out, ARTIFACT[fmt])
    example = torch.zeros(1, *done["input_shape"])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            traced = torch.jit.trace(model, example)
        import io

        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        storage.write_bytes(artifact, buf.getvalue())
    else:
        storage.save_torch(artifact, model.state_dict())
    m = done["metrics"]
    card = {
        "format": fmt, "artifact": ARTIFACT[fmt], "source": student_dir, **why,
        "model": done["student"]["model"], "model_args": done["student"]["model_args"],
        "input_adapt": done["student"].get("input_adapt"),
        "classes": list(range(done["num_classes"])), "num_classes": done["num_classes"],
        "input_shape": done["input_shape"], "input_dtype": "float32",
        "input_normalization": done.get("normalization", {}),
        "input_note": "images scaled as in training, then (x - mean) / std per channel",
        "output": "logits; softmax(logits / T) gives the student's soft predictions",
        "temperature": done["temperature"], "targets": m.get("targets"), "fraction": m.get("fraction"),
        "test_accuracy": m.get("test_accuracy"), "test_fidelity": m.get("test_fidelity"),
        "val_accuracy": m.get("val_accuracy"), "ensemble_test_accuracy": done.get("ensemble", {}).get("test_accuracy"),
        "parameters": count_parameters(model),
    }
    storage.write_json(storage.join(out, "student_card.json"), card)
    return {**card, "path": out}

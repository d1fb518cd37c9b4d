"""Teachers trained elsewhere: read, checked against the data and described before any Ray work."""
import hashlib
import warnings

import pytest
import torch

from kd_ray.core.config import DataConfig, TeacherSpec
from kd_ray.core.data import load_splits
from kd_ray.core.ensemble import build_teacher, import_teacher
from tests.fixtures.factories import teacher_files


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig())


@pytest.fixture(scope="module")
def files(splits, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return teacher_files(tmp_path_factory.mktemp("teachers"), splits)


def _import(spec, splits):
    xv = torch.from_numpy(splits.val.images)
    blob, _, val_logits = import_teacher(spec, "teachers.specs[0].checkpoint", splits.num_classes,
                                         splits.input_shape, xv)
    return blob, val_logits


@pytest.mark.parametrize("kind, spec", [
    ("mlp_state", {"model": "mlp", "model_args": {"hidden": [64]}}),
    ("timm_state", {"model": "timm:test_efficientnet"}),
    ("torchscript", {}),  # a TorchScript file carries its own architecture
])
def test_imported_teachers_predict_like_the_original(files, splits, kind, spec):
    blob, val_logits = _import(TeacherSpec(checkpoint=files[kind], **spec), splits)
    assert val_logits.shape == (len(splits.val.labels), splits.num_classes)
    acc = float((val_logits.argmax(1) == torch.from_numpy(splits.val.labels)).float().mean())
    assert acc > 0.3  # it learned something: the weights, not a fresh initialisation, were loaded
    with open(files[kind], "rb") as f:
        assert blob["sha256"] == hashlib.sha256(f.read()).hexdigest()
    again = build_teacher(blob, torch.device("cpu"))  # what the predictor actors build
    assert torch.allclose(again(torch.from_numpy(splits.val.images)), val_logits, atol=1e-5)


def test_an_adapter_lets_a_three_channel_model_read_one_channel_data(files, splits, tmp_path):
    from kd_ray.core.models import build_model, inner_model

    model = build_model("torchvision:resnet18", splits.input_shape, 10, input_adapt={"channels": 3})
    path = tmp_path / "rgb.pt"
    torch.save(inner_model(model).state_dict(), path)  # a 3-channel checkpoint, as users have them
    with pytest.raises(ValueError, match=r"rgb.pt does not accept inputs of shape \(1, 8, 8\).*input_adapt"):
        _import(TeacherSpec(checkpoint=str(path), model="torchvision:resnet18"), splits)
    blob, logits = _import(TeacherSpec(checkpoint=str(path), model="torchvision:resnet18",
                                       input_adapt={"channels": 3}), splits)
    assert logits.shape[1] == 10 and blob["input_adapt"]["channels"] == 3


def test_bad_teacher_files_are_named(files, splits, tmp_path):
    field = r"teachers\.specs\[0\]\.checkpoint"
    with pytest.raises(FileNotFoundError, match=field + ": teacher file not found: .*missing.pt"):
        _import(TeacherSpec(checkpoint=str(tmp_path / "missing.pt")), splits)
    with pytest.raises(ValueError, match=field + r": .*mlp_state.pt does not fit model mlp \{'hidden': \[32\]\}"):
        _import(TeacherSpec(checkpoint=files["mlp_state"], model_args={"hidden": [32]}), splits)
    three = tmp_path / "three.ts"
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    torch.jit.save(torch.jit.script(lin), str(three))
    with pytest.raises(ValueError, match=field + r": .*three.ts predicts \(3,\) outputs per image but the data has 10"):
        _import(TeacherSpec(checkpoint=str(three)), splits)

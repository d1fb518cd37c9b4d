"""Every registered model gives [B, num_classes] on every dataset's input shape."""
import pytest
import torch

from kd_ray.core.models import MODELS, build_model, count_parameters

INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dataset", sorted(INPUT_SHAPES))
def test_output_shapes(name, dataset):
    shape = INPUT_SHAPES[dataset]
    num_classes = 100 if dataset == "cifar10" else 10
    model = build_model(name, shape, num_classes)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, num_classes)
    assert count_parameters(model) > 0


def test_paper_mlp_sizes_and_jitter():
    teacher = build_model("mlp", (1, 28, 28), 10, hidden=[1200, 1200], dropout=0.2, jitter=2)
    student = build_model("mlp", (1, 28, 28), 10, hidden=[800, 800])
    assert count_parameters(teacher) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    assert count_parameters(student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10
    x = torch.randn(4, 1, 28, 28)
    teacher.eval()
    assert torch.equal(teacher(x), teacher(x))  # no jitter, no dropout at eval


def test_max_norm_bounds_each_hidden_unit_and_leaves_the_output_layer_free():
    from kd_ray.core.models import MaxNormLinear, check_model, constrained

    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=[32, 16], max_norm=0.5)
    hidden = constrained(model)
    assert len(hidden) == 2 and isinstance(model[-1], torch.nn.Linear) and not isinstance(model[-1], MaxNormLinear)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10)  # every unit's incoming weights well past the bound
    out_before = model[-1].weight.clone()
    for layer in hidden:
        layer.constrain()
    for m in hidden:
        norms = m.weight.norm(dim=1)
        assert float(norms.max()) <= 0.5 + 1e-6 and float(norms.min()) > 0.49  # scaled onto the bound
    assert torch.equal(model[-1].weight, out_before)
    assert set(model.state_dict()) == set(build_model("mlp", (1, 8, 8), 10, hidden=[32, 16]).state_dict())
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        check_model("mlp", {"max_norm": 0})


def test_unknown_model_and_bad_args():
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        build_model("vit", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="bad model_args"):
        build_model("mlp", (1, 8, 8), 10, widths=[3])


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_conv_models_are_channels_last_and_agree_with_channels_first(name):
    """Conv weights come channels-last (the fast layout for oneDNN); a checkpoint moves freely
    between layouts, and both layouts give the same outputs within float rounding."""
    shape = INPUT_SHAPES["cifar10"]
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval()
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    plain = MODELS[name](shape, 10).eval()  # the registry's own, channels-first
    plain.load_state_dict(model.state_dict())
    reloaded = build_model(name, shape, 10).eval()
    reloaded.load_state_dict(plain.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in reloaded.parameters() if p.dim() == 4)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-4)
        assert torch.equal(model(x), reloaded(x))


@pytest.mark.parametrize("ref, args", [
    ("timm:test_efficientnet", {}),  # a tiny timm model, no pretrained weights (nothing downloads)
    ("timm:test_vit", {"img_size": 8, "patch_size": 2}),
    ("tests.fixtures.factories:tiny_net", {"width": 8}),  # a user's own factory; gets input_shape
])
def test_models_by_reference(ref, args):
    from kd_ray.core.models import check_model

    check_model(ref, args)
    model = build_model(ref, (1, 8, 8), 10, **args).eval()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_torchvision_reference_behind_an_input_adapter():
    from kd_ray.core.models import InputAdapter, inner_model

    # torchvision's ResNet-18 expects 3 channels; the adapter repeats the one channel and resizes
    model = build_model("torchvision:resnet18", (1, 8, 8), 10, input_adapt={"channels": 3, "size": [32, 32]}).eval()
    assert isinstance(model, InputAdapter) and inner_model(model).conv1.in_channels == 3
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(RuntimeError):  # without it the model refuses one-channel images
        build_model("torchvision:resnet18", (1, 8, 8), 10).eval()(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("ref, args, words", [
    ("timm:no_such_net", {}, "timm has no model 'no_such_net'"),
    ("torchvision:no_such_net", {}, "torchvision has no model"),
    ("tests.fixtures.factories:missing", {}, "does not import"),
    ("nope", {}, "unknown model 'nope'"),
    ("cnn", {"hidden": [8]}, "model_args.hidden: cnn takes no argument 'hidden'"),
    ("tests.fixtures.factories:tiny_net", {"depth": 2}, "model_args.depth"),
    ("timm:test_efficientnet", {"bogus": 1}, "bogus"),  # **kwargs factories: checked on the meta device
    ("mlp", {"hidden": 5}, "model_args: mlp refuses {'hidden': 5}: 'int' object is not iterable"),  # a wrong value
])
def test_bad_references_and_arguments_are_named(ref, args, words):
    from kd_ray.core.models import check_model

    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        check_model(ref, args)


def test_config_errors_name_the_field_before_ray_starts():
    from kd_ray.core.config import ConfigError
    from kd_ray.core.config_files import load_config

    with pytest.raises(ConfigError, match=r"student\.model_args\.hidden: cnn takes no argument"):
        load_config(None, ["student.model=cnn"])
    with pytest.raises(ConfigError, match=r"student\.model_args: mlp refuses \{'hidden': 5\}"):
        load_config(None, ["student.model_args={hidden: 5}"])
    with pytest.raises(ConfigError, match=r"teachers\.specs\[1\]\.model: unknown model 'timm:nope'"):
        load_config(None, ["teachers.specs=[{lr: 0.1}, {model: 'timm:nope'}]"])
    # a spec that names another model does not inherit the default's model_args
    cfg = load_config(None, ["teachers.specs=[{}, {model: 'timm:test_efficientnet'}]"])
    assert cfg.teachers.resolved()[1].model_args == {}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_pretrained_file_loads_the_backbone_and_leaves_a_new_classifier(tmp_path, fmt):
    """A torchvision model's weights for 1,000 classes, from a file (a machine without internet):
    every tensor that fits is loaded, the 10-class classifier is new, and the log says which."""
    from safetensors.torch import save_file

    from kd_ray.core.config import TeacherSpec

    torch.manual_seed(0)
    published = build_model("torchvision:resnet18", (3, 32, 32), 1000).state_dict()
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": published}, path)  # as a training checkpoint keeps it
    else:
        save_file({k: v.contiguous() for k, v in published.items()}, str(path))
    lines = []
    spec = TeacherSpec(model="torchvision:resnet18", pretrained_file=str(path))
    model = spec.build((3, 32, 32), 10, log=lines.append)
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], published["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], published["layer4.1.bn2.running_var"])
    assert state["fc.weight"].shape == (10, 512)  # the data's classes, freshly initialised
    assert "tensors loaded from" in lines[0] and "new: ['fc.bias', 'fc.weight']" in lines[0]
    assert all(p.requires_grad for p in model.parameters())

    frozen = TeacherSpec(model="torchvision:resnet18", pretrained_file=str(path), freeze_backbone=True)
    model = frozen.build((3, 32, 32), 10, log=lines.append)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["fc.bias", "fc.weight"] and "backbone frozen" in lines[-1]


def test_pretrained_weights_behind_an_input_adapter_and_bad_files_are_named(tmp_path):
    from kd_ray.core.config import ConfigError, StudentConfig, TeacherSpec
    from kd_ray.core.config_files import load_config

    mlp_weights = build_model("mlp", (1, 8, 8), 10, hidden=[16]).state_dict()
    torch.save(mlp_weights, tmp_path / "mlp.pt")
    adapted = TeacherSpec(model="mlp", model_args={"hidden": [16]}, input_adapt={"channels": 1},
                          pretrained_file=str(tmp_path / "mlp.pt")).build((1, 8, 8), 10, log=lambda _: None)
    assert torch.equal(adapted.model.state_dict()["3.weight"], mlp_weights["3.weight"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="pretrained_file: .*junk.pt is not a state dict"):
        StudentConfig(model_args={"hidden": [16]}, pretrained_file=str(tmp_path / "junk.pt")).build((1, 8, 8), 10)
    with pytest.raises(ValueError, match="no tensor of .* fits cnn"):
        StudentConfig(model="cnn", model_args={}, pretrained_file=str(tmp_path / "mlp.pt")).build((1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"student.pretrained_file: .*no file"):
        load_config(None, [f"student.pretrained_file={tmp_path / 'missing.pt'}"])
    with pytest.raises(ConfigError, match="freeze_backbone: needs pretrained weights"):
        load_config(None, ["teachers.freeze_backbone=true"])
    with pytest.raises(ValueError, match="has no published weights"):
        StudentConfig(model_args={"hidden": [16]}, pretrained=True).build((1, 8, 8), 10)


def test_a_runs_identity_follows_the_weights_file_content(tmp_path):
    from kd_ray.core.config import TeacherSpec
    from kd_ray.stages.teacher_worker import spec_key

    path = tmp_path / "w.pt"
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=[16]).state_dict(), path)
    spec = TeacherSpec(model_args={"hidden": [16]}, pretrained_file=str(path))
    key = spec_key(spec, {"data": 1})
    assert spec_key(spec, {"data": 1}) == key
    assert spec_key(spec.model_copy(update={"pretrained_file": None}), {"data": 1}) != key
    torch.save(build_model("mlp", (1, 8, 8), 10, hidden=[16]).state_dict(), path)  # other weights, same path
    assert spec_key(spec, {"data": 1}) != key

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

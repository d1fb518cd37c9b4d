"""Model registry: ``build_model(name, input_shape, num_classes, **model_args)``.

* ``mlp``: the paper's fully connected nets (1200-1200 teachers, 800-800 students), ReLU,
  optional dropout and optional input jitter (random shifts of up to k pixels while training).
* ``cnn``: a small conv net (conv-bn-relu-pool blocks, then a linear head).
* ``resnet18``: torchvision's ResNet-18 with a small-image stem (3x3 conv, no max-pool).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from kd_ray.core.augment import random_shift


class Jitter(nn.Module):
    """Random shifts of up to ``max_shift`` pixels in training mode; identity in eval mode."""

    def __init__(self, max_shift: int):
        super().__init__()
        self.max_shift = int(max_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.max_shift > 0:
            return random_shift(x, self.max_shift)
        return x


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0, input_dropout: float = 0.0, jitter: int = 0) -> nn.Module:
    layers: list[nn.Module] = []
    if jitter:
        layers.append(Jitter(jitter))
    layers.append(nn.Flatten())
    if input_dropout:
        layers.append(nn.Dropout(input_dropout))
    width = 1
    for d in input_shape:
        width *= int(d)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
        dropout: float = 0.0, jitter: int = 0) -> nn.Module:
    c_in, h, w = (int(d) for d in input_shape)
    layers: list[nn.Module] = [Jitter(jitter)] if jitter else []
    for c in channels:
        layers += [nn.Conv2d(c_in, int(c), 3, padding=1), nn.BatchNorm2d(int(c)), nn.ReLU()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c_in = int(c)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(c_in, num_classes))
    return nn.Sequential(*layers)


def resnet18(input_shape: Sequence[int], num_classes: int, small_stem: bool = True) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    c_in = int(input_shape[0])
    if small_stem:
        model.conv1 = nn.Conv2d(c_in, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif c_in != 3:
        model.conv1 = nn.Conv2d(c_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "cnn": cnn, "resnet18": resnet18}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **model_args) -> nn.Module:
    """Build a registered model; unknown names and arguments give an error naming them.

    Convolution weights are laid out channels-last (NHWC), the layout oneDNN's CPU kernels
    prefer (docs/notes.md has the timings); only the memory layout changes, not ``state_dict``
    keys, shapes or values. Fully connected models have no 4-d weights: nothing changes for them."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    try:
        model = MODELS[name](tuple(int(d) for d in input_shape), int(num_classes), **model_args)
    except TypeError as e:
        raise ValueError(f"bad model_args for {name!r}: {e}") from e
    return model.to(memory_format=torch.channels_last)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

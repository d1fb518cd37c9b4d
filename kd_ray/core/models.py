"""Models by reference: ``build_model(ref, input_shape, num_classes, input_adapt=None, **model_args)``.

A reference is a built-in name (below), ``timm:<name>`` (built without pretrained weights),
``torchvision:<name>`` (``weights=None``) or ``package.module:factory``, a function called as
``factory(num_classes=C, **model_args)``, plus ``input_shape=(C, H, W)`` when it takes that argument.
``check_model`` checks a reference and its ``model_args`` without building weights (config time).

* ``mlp``: the paper's fully connected nets (1200-1200 teachers, 800-800 students), ReLU,
  optional dropout, optional input jitter (random shifts of up to k pixels while training) and
  optional max-norm constraints on the hidden units' incoming weights.
* ``cnn``: a small conv net (conv-bn-relu-pool blocks, then a linear head).
* ``resnet18``: torchvision's ResNet-18 with a small-image stem (3x3 conv, no max-pool).
"""
from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable, Optional, Sequence

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


class MaxNormLinear(nn.Linear):
    """A linear layer whose units each keep an incoming weight vector of L2 norm <= ``max_norm``:
    dropout's companion constraint (Srivastava et al. 2014, the paper's reference [5]), applied by
    :meth:`constrain`, which the training engine calls after every optimiser step."""

    def __init__(self, in_features: int, out_features: int, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(in_features, out_features)
        self.max_norm = float(max_norm)

    @torch.no_grad()
    def constrain(self) -> None:
        self.weight.copy_(torch.renorm(self.weight, 2, 0, self.max_norm))


def constrained(model: nn.Module) -> list[MaxNormLinear]:
    """The layers of ``model`` that declare a weight constraint: the training engine finds them
    once and projects each after every optimiser step (none for most models)."""
    return [m for m in model.modules() if isinstance(m, MaxNormLinear)]


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0, input_dropout: float = 0.0, jitter: int = 0,
        max_norm: Optional[float] = None) -> nn.Module:
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
        linear = nn.Linear(width, int(h)) if max_norm is None else MaxNormLinear(width, int(h), max_norm)
        layers += [linear, nn.ReLU()]
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


class InputAdapter(nn.Module):
    """Data -> what a model expects: repeat a single channel to ``channels``, resize to ``size``
    (bilinear). Declared per teacher or student as ``input_adapt: {channels: 3, size: [224, 224]}``."""

    def __init__(self, model: nn.Module, channels: Optional[int] = None, size: Optional[Sequence[int]] = None):
        super().__init__()
        self.model, self.channels = model, channels
        self.size = tuple(int(d) for d in size) if size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels and x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x[:, : self.channels]
        if self.size and tuple(x.shape[-2:]) != self.size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model(x)


def adapted_shape(input_shape: Sequence[int], input_adapt: Optional[dict]) -> tuple[int, ...]:
    """The (C, H, W) a model sees behind its :class:`InputAdapter`."""
    c, h, w = (int(d) for d in input_shape)
    adapt = input_adapt or {}
    if adapt.get("size"):
        h, w = (int(d) for d in adapt["size"])
    return int(adapt.get("channels") or c), h, w


def _factory(ref: str) -> tuple[Callable[..., nn.Module], str]:
    """The callable behind a model reference, and its calling convention."""
    if ref in MODELS:
        return MODELS[ref], "builtin"
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise ValueError(f"model: unknown model {ref!r}; give a built-in name {sorted(MODELS)}, timm:<name>, "
                         f"torchvision:<name> or package.module:factory")
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"model: unknown model {ref!r}: timm has no model {name!r} (see timm.list_models())")
        return timm.create_model, "timm"
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"model: unknown model {ref!r}: torchvision has no model {name!r} "
                             f"(see torchvision.models.list_models())")
        return torchvision.models.get_model, "torchvision"
    try:
        factory = getattr(importlib.import_module(kind), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model: {ref!r} does not import: {e}") from None
    if not callable(factory):
        raise ValueError(f"model: {ref!r} is not callable")
    return factory, "import"


def _call(ref: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict) -> nn.Module:
    factory, kind = _factory(ref)
    if kind == "builtin":
        return factory(input_shape, num_classes, **model_args)
    name = ref.partition(":")[2]
    if kind == "timm":
        return factory(name, pretrained=False, num_classes=num_classes,
                       **{"in_chans": input_shape[0], **model_args})
    if kind == "torchvision":
        return factory(name, weights=None, num_classes=num_classes, **model_args)
    if "input_shape" in inspect.signature(factory).parameters:
        model_args = {"input_shape": input_shape, **model_args}
    return factory(num_classes=num_classes, **model_args)


_CHECKED: set[str] = set()  # (ref, model_args) pairs that passed: every spec resolution re-checks


def check_model(ref: str, model_args: dict[str, Any]) -> None:
    """Raise ValueError naming the argument when ``model_args`` does not fit the factory of ``ref``.

    Explicit signatures are read for the argument names; then every factory is built once on the
    meta device (no memory, no weights) on a 3 x 32 x 32 input with 10 classes, so a value of the
    wrong kind (``hidden: 5`` for a list) fails here, before Ray starts. A pair that passed is not
    checked again in this process."""
    key = json.dumps([ref, model_args], sort_keys=True, default=str)
    if key in _CHECKED:
        return
    _check_model(ref, model_args)
    _CHECKED.add(key)


def _check_model(ref: str, model_args: dict[str, Any]) -> None:
    factory, kind = _factory(ref)
    if kind in ("builtin", "import"):
        params = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            fixed = {"input_shape", "num_classes"}
            for key in model_args:
                if key not in params or key in fixed:
                    raise ValueError(f"model_args.{key}: {ref} takes no argument {key!r}; it takes "
                                     f"{[p for p in params if p not in fixed]}")
    try:
        with torch.device("meta"):
            _call(ref, (3, 32, 32), 10, model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model_args: {ref} refuses {model_args}: {e}") from None


def build_model(ref: str, input_shape: Sequence[int], num_classes: int, input_adapt: Optional[dict] = None,
                **model_args) -> nn.Module:
    """Build the model ``ref`` names; unknown names and arguments give an error naming them.

    With ``input_adapt`` the model is built for the adapted shape and wrapped in an
    :class:`InputAdapter`. Convolution weights are laid out channels-last (NHWC), the layout
    oneDNN's CPU kernels prefer (docs/notes.md has the timings); only the memory layout changes,
    not ``state_dict`` keys, shapes or values."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    try:
        model = _call(ref, adapted_shape(input_shape, input_adapt), int(num_classes), dict(model_args))
    except TypeError as e:
        raise ValueError(f"bad model_args for {ref!r}: {e}") from e
    if input_adapt:
        model = InputAdapter(model, input_adapt.get("channels"), input_adapt.get("size"))
    return model.to(memory_format=torch.channels_last)


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (local or URI): safetensors, or a torch file holding a state dict
    (also under ``state_dict`` or ``model``, as training checkpoints keep it). Loaded with
    ``weights_only=True``; errors name the file."""
    import io

    from kd_ray.core import storage

    try:
        raw = storage.read_bytes(path)
    except (OSError, FileNotFoundError) as e:
        raise ValueError(f"pretrained_file: cannot read {path}: {e}") from None
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(raw)
        else:
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same error for the user
        raise ValueError(f"pretrained_file: {path} is not a state dict or safetensors file ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained_file: {path} holds no state dict of tensors")
    return state


def weights_digest(spec) -> str | None:
    """What names a spec's starting weights in a run's identity: the sha256 of its
    ``pretrained_file`` (a file replaced under the same path is other weights), else None."""
    if not getattr(spec, "pretrained_file", None):
        return None
    import hashlib

    from kd_ray.core import storage

    return hashlib.sha256(storage.read_bytes(spec.pretrained_file)).hexdigest()


def published_weights(ref: str, pretrained: bool | str) -> dict[str, torch.Tensor]:
    """The published weights of a timm or torchvision model (downloaded by the library, so this
    needs its hub): ``True`` for the default weights, or a torchvision weights name / timm tag."""
    kind, _, name = ref.partition(":")
    if kind == "timm":
        import timm

        tag = "" if pretrained is True else f".{pretrained}"
        return timm.create_model(name + tag, pretrained=True).state_dict()
    if kind == "torchvision":
        import torchvision

        choices = torchvision.models.get_model_weights(name)
        try:
            weights = choices.DEFAULT if pretrained is True else choices[str(pretrained)]
        except KeyError:
            raise ValueError(f"pretrained: {ref} has no weights {pretrained!r}; it has "
                             f"{[w.name for w in choices]}") from None
        return weights.get_state_dict(progress=False)
    raise ValueError(f"pretrained: {ref} has no published weights; give pretrained_file instead")


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``state`` whose name and shape match into ``model`` (behind its input
    adapter); the rest of the model keeps its fresh initialisation -- a classifier for another
    number of classes, an input layer for other channels. Returns (loaded names, new names)."""
    inner = inner_model(model)
    own = inner.state_dict()
    take = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    inner.load_state_dict(take, strict=False)
    return sorted(take), sorted(k for k in own if k not in take)


def inner_model(model: nn.Module) -> nn.Module:
    """The model behind an :class:`InputAdapter` (whose weights a checkpoint holds)."""
    return model.model if isinstance(model, InputAdapter) else model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

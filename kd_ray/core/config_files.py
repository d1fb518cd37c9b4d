"""Config files: the shipped configs, YAML loading and ``--set a.b=c`` overrides -> one validated
:class:`~kd_ray.core.config.ExperimentConfig`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kd_ray.core import plan
from kd_ray.core.config import ConfigError, ExperimentConfig, field_line


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in order."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set has an empty key in {item!r}")
        node = out
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {dotted}: {k!r} is not a section")
            node = nxt
        try:
            node[keys[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "not valid YAML"
            raise ConfigError(f"--set {dotted.strip()}: the value {value!r} is not valid YAML ({problem}); quote "
                              f"it in the shell, e.g. --set '{dotted.strip()}=[0.1, 1.0]'") from None
    return out


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `kd-ray config show` lists every key)"
        for i, line in enumerate(msg.splitlines()):  # a message may name several fields, one per line
            if line.startswith(f"{loc}.") or i:
                lines.append(f"  {line}")
            else:
                lines.append(f"  {field_line(loc, line) if err['loc'] else f'{loc}: {line}'}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> ExperimentConfig:
    merged = apply_overrides(raw or {}, overrides or [])
    try:
        cfg = ExperimentConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    try:
        plan.check(cfg)  # the cross-field policy
    except ValueError as e:
        raise ConfigError(f"invalid config ({source}):\n  {e}") from None
    return cfg


DEFAULT_CONFIG = "digits"  # the shipped config `kd-ray` uses when none is given


def shipped_configs() -> dict[str, tuple[Path, str]]:
    """The configs the package ships (``kd_ray/configs/*.yaml``): name -> (path, one-line description).

    The description is the file's first comment line."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        out[path.stem] = (path, first.lstrip("# ").strip())
    return out


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file: ``name_or_path`` itself when it is a file, else the shipped config of that
    name (``digits`` or ``digits.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    stem = p.name.removesuffix(".yaml")
    if p.parent == Path(".") and stem in shipped:
        return shipped[stem][0]
    raise ConfigError(f"config file not found: {p} (shipped configs, usable by name: {', '.join(shipped)}; "
                      f"`kd-ray configs` describes them)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config (a path or a shipped config's name; None: all defaults) and apply
    ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = config_path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    return build_config(raw, overrides, source=str(path or "defaults"))

"""What every config section shares: the strict base model, the config error, and how an
error line names its field."""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_NAMES_ITS_FIELD = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z0-9_]+)*: ")


def field_line(where: str, msg: str) -> str:
    """An error line under ``where`` (a section, a spec or a field): a message that starts with the
    field it is about (``model: ...``, ``model_args.hidden: ...``, from a model validator) is
    joined to it with a dot, any other after a colon."""
    return f"{where}.{msg}" if _NAMES_ITS_FIELD.match(msg) else f"{where}: {msg}"

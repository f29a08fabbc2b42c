"""``python -m ssl_vit.train --help``: every key of the chosen method's config, with its type,
default, allowed values and help line, generated from the schemas."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omegaconf import MISSING, OmegaConf

from ssl_vit.schema.methods import METHOD_SCHEMAS, OPTIM_SCHEMAS
from ssl_vit.schema.model import ModelConfig
from ssl_vit.schema.run import LoggerConfig, TrainConfig, TrainerConfig


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _shown(value: Any) -> str:
    if value is MISSING:
        return "required"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return OmegaConf.to_yaml({"v": value}).strip()[3:]


def key_lines(schema: type, prefix: str, values: Any = None) -> list[str]:
    """One line per key of ``schema`` (nested dataclasses expanded), ``prefix`` first; the
    defaults are those of ``values`` (an instance) where given."""
    hints = typing.get_type_hints(schema)
    lines = []
    for spec in dataclasses.fields(schema):
        key = f"{prefix}.{spec.name}" if prefix else spec.name
        if values is not None:
            default = getattr(values, spec.name)
        else:
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        if dataclasses.is_dataclass(default):
            lines += key_lines(type(default), key, default)
            continue
        if spec.name in ("method", "model", "optim", "trainer", "logger") and not prefix:
            continue  # the groups, listed with their own schemas
        shown = _shown(default)
        allowed = spec.metadata.get("allowed")
        rule = f" [{allowed}]" if allowed else ""
        lines.append(f"  {key} ({_type_name(hints[spec.name])}, {shown}){rule}: {spec.metadata.get('help', '')}")
    return lines


def keys_help(method: str) -> str:
    """The documented keys of a run of ``method``."""
    groups = [("", TrainConfig), ("trainer", TrainerConfig), ("model", ModelConfig),
              ("method", METHOD_SCHEMAS.get(method)), ("optim", OPTIM_SCHEMAS.get(method)), ("logger", LoggerConfig)]
    lines = []
    for prefix, schema in groups:
        if schema is not None:
            lines += key_lines(schema, prefix)
    return "\n".join(lines)

"""Checking a composed training config against the schemas: unknown keys (also those added with
``+key=``, which Hydra lets through) and values outside what a key allows, all reported at once
before any work starts."""
from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl_vit.schema.methods import METHOD_SCHEMAS, OPTIM_SCHEMAS
from ssl_vit.schema.model import ModelConfig
from ssl_vit.schema.run import LoggerConfig, TrainConfig, TrainerConfig

MAX_REPORTED = 15  # an error message fits one screen


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the value and what is allowed."""


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown(path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {_join(path, close[0])}?)" if close else ""
    return f"{_join(path, key)}: unknown key{hint}; {path or 'the top level'} has {', '.join(known)}"


def node_errors(node: DictConfig, schema: type, path: str) -> list[str]:
    """The problems of ``node`` (at ``path``) against the dataclass ``schema``."""
    declared = {f.name: f for f in fields(schema)}
    errors = [_unknown(path, key, list(declared)) for key in node.keys() if key not in declared]
    for name, spec in declared.items():
        if name not in node:
            continue
        key = _join(path, name)
        try:
            value = node[name]
        except Exception as error:  # an interpolation that does not resolve
            errors.append(f"{key}: {error}".splitlines()[0])
            continue
        nested = spec.default_factory() if callable(getattr(spec, "default_factory", None)) else None
        if is_dataclass(nested) and isinstance(value, DictConfig):
            errors += node_errors(value, type(nested), key)
            continue
        ok, allowed = spec.metadata.get("ok"), spec.metadata.get("allowed")
        if ok is not None and value is not None and not ok(_plain(value)):
            errors.append(f"{key}={_plain(value)!r}; allowed: {allowed}")
    return errors


def config_errors(cfg: DictConfig) -> list[str]:
    """Every problem the schemas find in a composed ``conf/train.yaml``."""
    errors = node_errors(cfg, TrainConfig, "")
    method = cfg.method.get("name") if isinstance(cfg.get("method"), DictConfig) else None
    if method not in METHOD_SCHEMAS:
        return errors + [f"method={method}: unknown method; available: {', '.join(METHOD_SCHEMAS)}"]
    groups = {"method": METHOD_SCHEMAS[method], "optim": OPTIM_SCHEMAS[method], "model": ModelConfig,
              "trainer": TrainerConfig, "logger": LoggerConfig}  # data: typed in TrainConfig
    for group, schema in groups.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            errors += node_errors(node, schema, group)
    return errors


def check_config(cfg: DictConfig) -> None:
    """Raise a :class:`ConfigError` listing (up to ``MAX_REPORTED`` of) the problems of ``cfg``."""
    errors = config_errors(cfg)
    if errors:
        shown = errors[:MAX_REPORTED]
        more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(shown) + more)

"""Structured configs: one dataclass per config group (``conf/<group>/``), registered in Hydra's
ConfigStore under ``schema/<group>`` so that each group file extends its schema
(``defaults: [/schema/model@_here_: vit, _self_]``). Every key then has a type (a wrong type
fails when the override is merged), a default and a help line; :func:`check_config` adds the
ranges, choices and unknown keys, before any work starts.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ssl_vit.schema.check import ConfigError, check_config, config_errors
from ssl_vit.schema.methods import (
    METHOD_SCHEMAS, AdamWConfig, SelfDistillationOptimConfig,
)
from ssl_vit.schema.help import keys_help
from ssl_vit.schema.model import ModelConfig
from ssl_vit.schema.run import LoggerConfig, TrainConfig, TrainerConfig

_registered = False


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (once; composing ``conf/`` needs them)."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    store.store(group="schema/logger", name="logger", node=LoggerConfig)
    store.store(group="schema/model", name="vit", node=ModelConfig)
    for name, node in METHOD_SCHEMAS.items():
        store.store(group="schema/method", name=name, node=node)
    store.store(group="schema/optim", name="self_distillation", node=SelfDistillationOptimConfig)
    store.store(group="schema/optim", name="adamw", node=AdamWConfig)
    if not OmegaConf.has_resolver("ssl_vit_keys"):  # conf/train.yaml's help template uses it
        OmegaConf.register_new_resolver("ssl_vit_keys", keys_help)
    from ssl_vit.cluster import register_resolvers

    register_resolvers()  # ${ssl_vit_run_dir:...}: the default run folders (conf/train.yaml, conf/cascade.yaml)
    _registered = True


__all__ = ["ConfigError", "check_config", "config_errors", "register"]

"""Pretraining methods, one LightningModule per file, reached by name.

A method is a ``PretrainModule`` subclass with ``from_config(encoder, cfg)``; adding one is a
new file here, an entry in ``METHODS``, a config and a registry entry.
"""

from __future__ import annotations

from torch import nn

from visionbench.errors import ConfigError
from visionbench.methods.base import PretrainModule
from visionbench.methods.mae import MAE

METHODS: dict[str, type[PretrainModule]] = {"mae": MAE}


def build_method(cfg, encoder: nn.Module) -> PretrainModule:
    """The pretraining module ``cfg.pretrain.method`` names, around ``encoder``."""
    name = cfg.pretrain.method
    if name not in METHODS:
        raise ConfigError(f"pretrain.method: unknown {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name].from_config(encoder, cfg)


__all__ = ["MAE", "METHODS", "PretrainModule", "build_method"]

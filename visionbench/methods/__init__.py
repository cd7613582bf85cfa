"""Pretraining methods, one file per method, reached by name.

A method file defines its config model (a ``MethodConfig`` with a ``method`` Literal tag and
the paper's values as defaults) and its ``PretrainModule``, decorated ``@register_method``.
Every module of this package is imported here, so a new file is all a new method needs.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from visionbench.methods.base import PretrainModule
from visionbench.methods.registry import METHODS, method_class, method_configs, register_method

_SHARED = {"base", "registry", "schedule"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_info.name}")


def build_method(section, encoder: nn.Module, model, data, **kwargs) -> PretrainModule:
    """The pretraining module of ``section`` (a registered method config) around ``encoder``;
    ``kwargs`` are what a method needs besides (UNIP's teacher)."""
    return method_class(section.method).from_config(encoder, section, model, data, **kwargs)


__all__ = ["METHODS", "PretrainModule", "build_method", "method_class", "method_configs",
           "register_method"]

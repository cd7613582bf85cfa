"""The method registry: a pretraining method registers its LightningModule, which names its
config model (``config``), the backbone families it pretrains (``families``) and brings its
train transform. The experiment config's ``pretrain`` section is the union of the registered
configs, keyed by their ``method`` tag."""

from __future__ import annotations

from visionbench.errors import ConfigError

METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: ``cls.config`` is a ``MethodConfig`` whose ``method`` is a Literal."""
    name = cls.config.model_fields["method"].default
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} registered twice")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type:
    if name not in METHODS:
        raise ConfigError(f"pretrain.method: unknown {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def method_configs() -> tuple[type, ...]:
    return tuple(cls.config for cls in METHODS.values())

"""Registry of normalization layers, timm-style: a decorator registers a factory under a name.

Each entry records the paper it comes from, its formula, where it goes (token models or conv
models) and its hyperparameters, so ``visionbench list --norms`` can print the catalog. Entries
are keyed by ``(kind, name)``: ``batchnorm`` exists for tokens (ViT) and for channels (ResNet).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from visionbench.errors import ConfigError


@dataclass(frozen=True)
class NormSpec:
    name: str
    factory: Callable[..., nn.Module]
    kind: str  # "token" (ViT: normalizes the last dim) or "conv" (normalizes channels of NCHW)
    paper: str
    arxiv: str
    formula: str
    defaults: dict = field(default_factory=dict)
    where: str = ""  # where it goes in the network, as the paper places it
    # what the backbone tells the factory about where the norm sits (e.g. ``num_heads``)
    context: tuple[str, ...] = ()


KINDS = ("token", "conv")
NORMS: dict[tuple[str, str], NormSpec] = {}


def register_norm(
    name: str,
    *,
    kind: str,
    paper: str,
    arxiv: str,
    formula: str,
    defaults: dict | None = None,
    where: str = "",
    context: tuple[str, ...] = (),
) -> Callable:
    """Register ``factory(dim, **kw) -> nn.Module`` under ``(kind, name)``.

    ``context`` names keyword arguments the backbone passes besides the options (e.g.
    ``num_heads`` of the attention the norm sits in), for defaults that depend on them.
    """
    if kind not in KINDS:
        raise ValueError(f"norm kind {kind!r}: expected one of {KINDS}")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if (kind, name) in NORMS:
            raise ValueError(f"{kind} norm {name!r} registered twice")
        spec = NormSpec(name, factory, kind, paper, arxiv, formula, dict(defaults or {}), where,
                        tuple(context))
        NORMS[(kind, name)] = spec
        return factory

    return wrap


def list_norms(kind: str | None = None) -> list[str]:
    return sorted({n for k, n in NORMS if kind is None or k == kind})


def norm_spec(name: str, kind: str | None = None) -> NormSpec:
    """The catalog entry ``name``; ``kind`` picks between a token and a conv entry of one name."""
    kinds = [k for k in KINDS if (k, name) in NORMS and kind in (None, k)]
    if not kinds:
        where = f"{kind} " if kind else ""
        raise ConfigError(f"unknown {where}norm {name!r}; allowed: {', '.join(list_norms(kind))}")
    if len(kinds) > 1:
        raise ConfigError(f"norm {name!r} exists for tokens and for channels: pass kind=")
    return NORMS[(kinds[0], name)]


def build_norm(name: str, dim: int, *, kind: str | None = None, **kw) -> nn.Module:
    """Build the norm layer ``name`` over ``dim`` features (channels for conv norms).

    ``device``/``dtype`` keyword arguments, as timm passes them, are accepted by every entry.
    """
    spec = norm_spec(name, kind)
    return spec.factory(dim, **{**spec.defaults, **kw})


def check_norm_options(name: str, options: dict, kind: str | None = None) -> dict:
    """``options`` (the config's ``model.norm_options[name]``) checked against the entry's
    defaults: an unknown key is a ``ConfigError`` naming the allowed ones."""
    spec = norm_spec(name, kind)
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        allowed = ", ".join(sorted(spec.defaults)) or "none"
        raise ConfigError(f"norm {name!r} has no option(s) {unknown}; allowed: {allowed}")
    return dict(options)


def norm_layer(name: str, kind: str | None = None, options: dict | None = None,
               context: dict | None = None) -> Callable[..., nn.Module]:
    """The ``norm_layer=`` callable for timm constructors; validates the name up front.

    ``options`` override the entry's defaults; ``context`` holds what the backbone knows about
    the place of the norm (``num_heads``), passed on to the entries that declare it.
    """
    if kind is not None and (kind, name) not in NORMS and any((k, name) in NORMS for k in KINDS):
        other = next(k for k in KINDS if (k, name) in NORMS)
        raise ConfigError(
            f"norm {name!r} is a {other} norm; this backbone takes one of: "
            f"{', '.join(list_norms(kind))}"
        )
    spec = norm_spec(name, kind)
    fixed = check_norm_options(name, options or {}, spec.kind)
    fixed.update({k: v for k, v in (context or {}).items() if k in spec.context})

    # A plain function, not functools.partial: timm's get_norm_layer drops a partial's
    # positional arguments when it rebinds keywords.
    def make_norm(dim: int, **kw) -> nn.Module:
        return build_norm(name, dim, kind=spec.kind, **{**fixed, **kw})

    make_norm.__name__ = make_norm.__qualname__ = f"norm_{name}"
    return make_norm


def factory_kwargs(kw: dict) -> dict:
    """Pop ``device``/``dtype`` out of ``kw`` for a torch constructor."""
    return {k: kw.pop(k) for k in ("device", "dtype") if k in kw}


@register_norm(
    "layernorm",
    kind="token",
    paper="Layer Normalization",
    arxiv="1607.06450",
    formula="gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta",
    defaults={"eps": 1e-6},
    where="ViT blocks (before attention and MLP in pre-LN) and the final norm",
)
def _layernorm(dim: int, eps: float = 1e-6, **kw) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps, **factory_kwargs(kw))


@register_norm(
    "rmsnorm",
    kind="token",
    paper="Root Mean Square Layer Normalization",
    arxiv="1910.07467",
    formula="gamma * x / sqrt(mean(x^2) + eps)",
    defaults={"eps": 1e-6},
    where="in place of LayerNorm in ViT blocks and the final norm",
)
def _rmsnorm(dim: int, eps: float = 1e-6, **kw) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps, **factory_kwargs(kw))


@register_norm(
    "batchnorm",
    kind="conv",
    paper="Batch Normalization: Accelerating Deep Network Training by Reducing Internal "
    "Covariate Shift",
    arxiv="1502.03167",
    formula="gamma * (x - E_batch[x]) / sqrt(Var_batch[x] + eps) + beta (per channel)",
    defaults={"eps": 1e-5, "momentum": 0.1},
    where="after every convolution of a ResNet, before the activation",
)
def _batchnorm2d(dim: int, eps: float = 1e-5, momentum: float = 0.1, **kw) -> nn.Module:
    return nn.BatchNorm2d(dim, eps=eps, momentum=momentum, **factory_kwargs(kw))


@register_norm(
    "groupnorm",
    kind="conv",
    paper="Group Normalization",
    arxiv="1803.08494",
    formula="gamma * (x - mean_group(x)) / sqrt(var_group(x) + eps) + beta",
    defaults={"num_groups": 32, "eps": 1e-5},
    where="in place of BatchNorm after every ResNet convolution",
)
def _groupnorm(dim: int, num_groups: int = 32, eps: float = 1e-5, **kw) -> nn.Module:
    # Narrow demo-size networks have fewer than 32 channels: fall back to the largest divisor.
    groups = math.gcd(num_groups, dim)
    return nn.GroupNorm(groups, dim, eps=eps, **factory_kwargs(kw))



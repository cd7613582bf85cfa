"""The normalization catalog: every norm layer reachable by name through ``build_norm``.

Backbones never import a norm class directly: they receive ``norm_layer(name)``, a callable
that timm calls as ``norm_layer(dim, device=..., dtype=...)``.
"""

# Importing the layer modules registers their entries.
from visionbench.norms import conv, token  # noqa: E402,F401
from visionbench.norms.catalog import (
    KINDS,
    NORMS,
    NormSpec,
    build_norm,
    check_norm_options,
    list_norms,
    norm_layer,
    norm_spec,
    register_norm,
)

__all__ = [
    "KINDS",
    "NORMS",
    "NormSpec",
    "build_norm",
    "check_norm_options",
    "list_norms",
    "norm_layer",
    "norm_spec",
    "register_norm",
]

"""The normalization catalog: every norm layer reachable by name through ``build_norm``.

Backbones never import a norm class directly: they receive ``norm_layer(name)``, a callable
that timm calls as ``norm_layer(dim, device=..., dtype=...)``.
"""

from visionbench.norms.catalog import (
    NORMS,
    NormSpec,
    build_norm,
    list_norms,
    norm_layer,
    register_norm,
)

__all__ = ["NORMS", "NormSpec", "build_norm", "list_norms", "norm_layer", "register_norm"]

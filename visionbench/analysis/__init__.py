"""Analyses of backbones; ``attention``: attention maps and their NMI per layer."""

from visionbench.analysis.attention import (
    GLOBAL_THRESHOLD,
    LOCAL_THRESHOLD,
    attention_logits,
    attention_maps,
    attention_nmi,
    classify_layers,
    deepest_hybrid_layer,
    hybrid_layer,
    layer_nmi,
    save_nmi_figure,
)

__all__ = [
    "GLOBAL_THRESHOLD",
    "LOCAL_THRESHOLD",
    "attention_logits",
    "attention_maps",
    "attention_nmi",
    "classify_layers",
    "deepest_hybrid_layer",
    "hybrid_layer",
    "layer_nmi",
    "save_nmi_figure",
]

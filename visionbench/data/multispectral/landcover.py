"""Scene-level land-cover label spaces and the maps between them.

SoftCon's pretraining labels are multi-label vectors of Dynamic World's nine classes (Brown et
al., Scientific Data 2022; ``DYNAMIC_WORLD``, in the product's band order), one per class
present in the scene's land-cover map (SSL4EO-S12-ML, arXiv 2405.20462). The embedded
pretraining scenes are CORINE-labelled BigEarthNet-layout patches; ``BIGEARTHNET19_TO_DW``
assigns each of BigEarthNet's 19 classes (torchgeo's ``class_sets[19]`` order) the Dynamic
World class that covers it, so the pretraining labels are coarser than (and not the same as)
the 19 labels the BigEarthNet protocol scores.
"""

from __future__ import annotations

import torch

from visionbench.errors import ConfigError

DYNAMIC_WORLD = ("water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub",
                 "built", "bare", "snow_and_ice")

BIGEARTHNET19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops",
    "Pastures", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
    "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands", "Inland waters",
    "Marine waters")

BIGEARTHNET19_TO_DW = {
    "Urban fabric": "built", "Industrial or commercial units": "built",
    "Arable land": "crops", "Permanent crops": "crops", "Pastures": "grass",
    "Complex cultivation patterns": "crops",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "crops",
    "Agro-forestry areas": "trees", "Broad-leaved forest": "trees",
    "Coniferous forest": "trees", "Mixed forest": "trees",
    "Natural grassland and sparsely vegetated areas": "grass",
    "Moors, heathland and sclerophyllous vegetation": "shrub_and_scrub",
    "Transitional woodland, shrub": "shrub_and_scrub", "Beaches, dunes, sands": "bare",
    "Inland wetlands": "flooded_vegetation", "Coastal wetlands": "flooded_vegetation",
    "Inland waters": "water", "Marine waters": "water",
}

LABEL_SPACES = ("dataset", "dynamic-world")


def label_map(source: tuple[str, ...] | list[str], target: str) -> torch.Tensor | None:
    """The ``(len(source), len(target classes))`` 0/1 matrix taking a multi-hot vector over
    ``source`` classes to ``target`` ("dynamic-world"); None for "dataset" (labels as read)."""
    if target == "dataset":
        return None
    if target != "dynamic-world":
        raise ConfigError(f"label space {target!r} (expected one of {', '.join(LABEL_SPACES)})")
    known = {**BIGEARTHNET19_TO_DW, **{name: name for name in DYNAMIC_WORLD}}
    unknown = [name for name in source if name not in known]
    if unknown:
        raise ConfigError(f"no Dynamic World class is known for the labels {unknown[:3]} "
                          "(known: BigEarthNet's 19 classes and Dynamic World's own)")
    matrix = torch.zeros(len(source), len(DYNAMIC_WORLD))
    for i, name in enumerate(source):
        matrix[i, DYNAMIC_WORLD.index(known[name])] = 1.0
    return matrix


def map_labels(labels: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    """Multi-hot ``labels`` (``(K,)`` or ``(B, K)``) in the target space: a target class is
    present when any source class mapped to it is."""
    labels = labels.float()
    if matrix is None:
        return labels
    return (labels @ matrix).clamp(max=1.0)

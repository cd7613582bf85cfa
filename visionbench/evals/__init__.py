"""Transfer protocols on pretrained backbones: frozen features, linear probe, kNN, fine-tune."""

from visionbench.evals.features import cached_features, extract_features
from visionbench.evals.finetune import (
    FineTuneClassifier,
    param_groups_lrd,
    run_finetune,
)
from visionbench.evals.knn import knn_classify, knn_majority, knn_protocol
from visionbench.evals.linear_probe import LARS, linear_probe_sweep

__all__ = [
    "LARS",
    "FineTuneClassifier",
    "cached_features",
    "extract_features",
    "knn_classify",
    "knn_majority",
    "knn_protocol",
    "linear_probe_sweep",
    "param_groups_lrd",
    "run_finetune",
]

"""Logistic-regression probe of frozen features: CLIP's linear-probe evaluation.

Follows the linear-probe protocol of openai/CLIP (Radford et al. 2021, appendix A.3, and the
README's "Linear-probe evaluation" example): scikit-learn's ``LogisticRegression`` (L-BFGS,
multinomial) on the frozen train features, ``random_state=0``, ``max_iter=1000`` (the README's;
the result records whether the chosen fit converged within it), its inverse regularization
``C`` chosen by a sweep on the validation split, then scored on test. Unlike the SGD / LARS
probe (``linear_probe.py``) it has no learning rate, schedule or epoch count to tune: one
convex fit a ``C``, so it reads what is linearly decodable from the features, not how far a
schedule got.

Deviations: CLIP sweeps ``C`` over 10^-6 .. 10^6 with a parametric binary search; here the
sweep is the fixed log grid ``cs`` (default 10^-4 .. 10^4, 9 values), the best of a tie the
smallest ``C`` (the strongest regularization). The features go in as they are (CLIP's
README; no standardization). The head is not refitted on train + val.

The result: ``top1`` / ``top5`` (percent) at the chosen ``C``, ``best_c``, every ``C``'s
validation top-1 (``val_top1``), whether that fit converged within ``max_iter``, and the
per-sample test hits with their 95 % bootstrap intervals (``"samples"``, ``"ci"``; see
``visionbench.results.bootstrap``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from visionbench.errors import ConfigError
from visionbench.evals.knn import check_knn_inputs
from visionbench.evals.linear_probe import topk_hits
from visionbench.results.bootstrap import hits_samples, with_samples

DEFAULT_CS = [10.0 ** e for e in range(-4, 5)]


def class_scores(model, x: np.ndarray, num_classes: int) -> Tensor:
    """(N, num_classes) log-probabilities; classes the training split lacks get -inf (sklearn
    only scores the classes it saw)."""
    scores = torch.full((x.shape[0], num_classes), float("-inf"), dtype=torch.float64)
    seen = torch.as_tensor(model.classes_, dtype=torch.long)
    scores[:, seen] = torch.from_numpy(model.predict_log_proba(x)).double()
    return scores


def logistic_protocol(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                      test_x: Tensor, test_y: Tensor, num_classes: int,
                      cs: list[float] = DEFAULT_CS, max_iter: int = 1000, seed: int = 0,
                      keep_samples: bool = True) -> dict:
    """Fit one logistic regression a ``C`` of ``cs`` on train, keep the best on val, score
    it on test (see the module docstring for the result)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    check_knn_inputs(train_x, train_y, test_x, test_y, 1, protocol="logistic probe")
    if val_x.shape[0] == 0 or val_x.shape[0] != val_y.shape[0]:
        raise ConfigError("logistic probe: C is chosen on the val split, which is empty or "
                          "differs in length from its labels")
    if not cs or any(c <= 0 for c in cs):
        raise ConfigError(f"logistic probe: cs must be positive values, got {cs}")
    if torch.unique(train_y).numel() < 2:
        raise ConfigError("logistic probe: the train split holds a single class")
    x_train, x_val, x_test = (t.double().cpu().numpy() for t in (train_x, val_x, test_x))
    y_train, y_val = train_y.cpu().numpy(), val_y.cpu().numpy()
    val_top1, best = {}, None
    for c in sorted(cs):
        model = LogisticRegression(C=c, max_iter=max_iter, random_state=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_train, y_train)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracy = float((model.predict(x_val) == y_val).mean()) * 100.0
        val_top1[f"{c:g}"] = accuracy
        if best is None or accuracy > best[1]:
            best = (c, accuracy, model, converged)
    c, accuracy, model, converged = best
    scores = class_scores(model, x_test, num_classes)
    labels = test_y.cpu().long()
    hits1 = topk_hits(scores, labels, 1)
    hits5 = topk_hits(scores, labels, min(5, num_classes))
    result = {"top1": float(hits1.double().mean()) * 100.0,
              "top5": float(hits5.double().mean()) * 100.0,
              "best_c": c, "best_val_top1": accuracy, "val_top1": val_top1,
              "converged": converged, "max_iter": max_iter}
    if keep_samples:
        with_samples(result, hits_samples(top1=hits1, top5=hits5), seed)
    return result

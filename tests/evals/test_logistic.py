"""The logistic-regression probe (CLIP's protocol) against scikit-learn fitted directly."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from visionbench.config import LogisticConfig
from visionbench.errors import ConfigError
from visionbench.evals.logistic import logistic_protocol


def blobs(n: int, seed: int, classes: int = 4, spread: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 6, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, 6, generator=g), y


def test_the_best_c_on_val_is_scored_on_test_as_sklearn_scores_it():
    (tx, ty), (vx, vy), (sx, sy) = blobs(80, 1), blobs(40, 2), blobs(60, 3)
    cs = [1e-3, 1e-1, 10.0]
    result = logistic_protocol(tx, ty, vx, vy, sx, sy, 4, cs=cs, seed=0)
    val = {}
    for c in cs:
        model = LogisticRegression(C=c, max_iter=1000, random_state=0).fit(tx.numpy(), ty.numpy())
        val[c] = 100 * (model.predict(vx.numpy()) == vy.numpy()).mean()
    assert result["val_top1"] == pytest.approx({f"{c:g}": v for c, v in val.items()})
    best = min(c for c in cs if val[c] == max(val.values()))  # ties: the smallest C
    assert result["best_c"] == best
    model = LogisticRegression(C=best, max_iter=1000, random_state=0).fit(tx.numpy(), ty.numpy())
    hits = model.predict(sx.numpy()) == sy.numpy()
    assert result["top1"] == pytest.approx(100 * hits.mean())
    assert result["samples"]["top1"] == "".join("1" if h else "0" for h in hits)
    assert result["ci"]["top1"][0] <= result["top1"] <= result["ci"]["top1"][1]
    assert result["converged"] and 60.0 < result["top1"] <= result["top5"] == 100.0


def test_a_class_missing_from_train_is_never_predicted():
    (tx, ty), (sx, sy) = blobs(60, 1), blobs(40, 3)
    keep = ty != 3
    result = logistic_protocol(tx[keep], ty[keep], tx[keep], ty[keep], sx, sy, 5, cs=[1.0])
    hits = np.frombuffer(result["samples"]["top1"].encode(), dtype=np.uint8) == ord("1")
    assert not hits[(sy == 3).numpy()].any()  # class 3 has no column to win
    assert result["top1"] < result["top5"]  # top-5 of 5 classes, 4 of them finite


def test_bad_input_is_refused():
    (tx, ty), (sx, sy) = blobs(20, 1), blobs(10, 2)
    with pytest.raises(ConfigError, match="logistic probe: features and labels differ"):
        logistic_protocol(tx, ty[:5], tx, ty, sx, sy, 4)
    with pytest.raises(ConfigError, match="val split"):
        logistic_protocol(tx, ty, tx[:0], ty[:0], sx, sy, 4)
    with pytest.raises(ConfigError, match="positive"):
        logistic_protocol(tx, ty, tx, ty, sx, sy, 4, cs=[0.0])
    with pytest.raises(ConfigError, match="single class"):
        logistic_protocol(tx, torch.zeros_like(ty), tx, ty, sx, sy, 4)
    with pytest.raises(ValueError, match="positive"):
        LogisticConfig(cs=[-1.0])
    assert not LogisticConfig().enabled and len(LogisticConfig().cs) == 9

"""Supervised training from scratch: the lr follows the shared warmup + cosine schedule and the
test split is scored."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from visionbench.evals.supervised import SupervisedClassifier, run_supervised
from visionbench.methods.schedule import half_cycle_cosine
from visionbench.results.bootstrap import decode_hits


class Tiny(nn.Module):
    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x)


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def loader(n, seed):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_lr_follows_half_cycle_cosine_and_test_is_scored(tmp_path):
    torch.manual_seed(0)
    record = RecordLR()
    cfg = {"lr": 0.2, "warmup_epochs": 1, "epochs": 3}
    result = run_supervised(Tiny(), loader(16, 0), loader(8, 1), loader(8, 2), 3, cfg,
                            {"accelerator": "cpu", "enable_progress_bar": False,
                             "enable_model_summary": False}, tmp_path, callbacks=(record,))
    expected = [half_cycle_cosine(step / 4, 0.2, 0.0, 1, 3) for step in range(12)]
    assert all(math.isclose(a, b) for a, b in zip(record.lrs, expected, strict=True))
    assert 0.0 <= result["test_top1"] <= 100.0 and result["epochs"] == 3
    assert result["samples"]["n"] == 8
    hits = decode_hits(result["samples"]["top1"])
    assert 100.0 * hits.mean() == pytest.approx(result["test_top1"], abs=1e-4)
    low, high = result["ci"]["top1"]
    assert low <= result["test_top1"] + 1e-9 and result["test_top1"] <= high + 1e-9
    assert SupervisedClassifier(Tiny(), 3).configure_optimizers().defaults["momentum"] == 0.9

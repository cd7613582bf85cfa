"""Norms bound to the fit: PRepBN's decay length and PowerNorm's warmup (NormSchedules)."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visionbench.norms import build_norm
from visionbench.norms.schedules import NormSchedules, set_fit_lengths
from visionbench.norms.token import PowerNorm, PRepBN


class Tiny(L.LightningModule):
    def __init__(self, norms: list[nn.Module], warmup_steps: int = 3):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norms = nn.ModuleList(norms)
        self.warmup = warmup_steps
        self.lams: list[float] = []

    def lr_warmup_steps(self) -> int:
        return self.warmup

    def forward(self, x):
        h = self.lin(x)
        for norm in self.norms:
            h = norm(h)
        return h

    def training_step(self, batch, batch_idx):
        prep = [m for m in self.norms if isinstance(m, PRepBN)]
        if prep:
            self.lams.append(float(prep[0].lam()))
        return self(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(module: nn.Module, steps: int, accumulate: int = 1) -> L.Trainer:
    data = TensorDataset(torch.randn(4 * steps * accumulate, 3, 8))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=accumulate,
                        callbacks=[NormSchedules()])
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


def test_prepbn_lambda_reaches_zero_at_the_configured_fraction_of_the_fit():
    torch.manual_seed(0)
    norm = build_norm("prepbn", 8, kind="token", decay_fraction=0.5)
    module = Tiny([norm])
    fit(module, steps=12)
    assert int(norm.total_steps) == 6 and int(norm.step) == 12
    # lambda as seen by each training step: 1 - k / 6, then 0 for the second half
    assert module.lams == pytest.approx([max(0.0, 1 - k / 6) for k in range(12)])
    assert module.lams.index(0.0) == 6


def test_prepbn_counts_optimizer_steps_under_accumulation_and_fixed_steps_stay():
    torch.manual_seed(1)
    by_fraction = build_norm("prepbn", 8, kind="token", decay_fraction=1.0)
    fixed = build_norm("prepbn", 8, kind="token", total_steps=4)
    fit(Tiny([by_fraction, fixed]), steps=5, accumulate=2)
    assert int(by_fraction.total_steps) == 5 and int(by_fraction.step) == 5
    assert int(fixed.total_steps) == 4 and float(fixed.lam()) == 0.0


def test_a_started_schedule_is_left_alone():
    """A fine-tune of a pretrained PRepBN encoder (or a resumed fit) keeps its schedule."""
    norm = PRepBN(8, total_steps=10, decay_fraction=0.5)
    norm.step.fill_(10)
    assert set_fit_lengths(norm, optimizer_steps=100, warmup_forwards=5) == []
    assert int(norm.total_steps) == 10 and float(norm.lam()) == 0.0


def test_powernorm_warmup_is_the_fits_lr_warmup_in_forwards():
    torch.manual_seed(2)
    pn = build_norm("powernorm", 8, kind="token")
    fixed = build_norm("powernorm", 8, kind="token", warmup_iters=7)
    fit(Tiny([pn, fixed], warmup_steps=3), steps=6, accumulate=2)
    assert pn.warmup_iters == 3 * 2  # 3 optimizer steps of 2 forwards each
    assert fixed.warmup_iters == 7 and int(pn.iters) == 12
    with pytest.raises(RuntimeError, match="lr_warmup"):
        build_norm("powernorm", 8, kind="token").train()(torch.randn(2, 3, 8))
    assert isinstance(pn, PowerNorm)

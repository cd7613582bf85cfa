"""The ln-removal experiment end to end through the CLI at toy size, and FakeLN in a fit."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.test_runner import TINY, only_run, visionbench
from visionbench.backbones import create_backbone
from visionbench.errors import ConfigError
from visionbench.evals.finetune import FineTuneClassifier
from visionbench.norms.conversions import FakeLayerNorm
from visionbench.norms.schedules import LayerNormRemoval
from visionbench.results.leaderboard import read_leaderboard

TOY = [*TINY, "--set", "pretrain.epochs=1", "--set", "eval.finetune.epochs=4",
       "--set", "eval.finetune.batch_size=16", "--set", "ln_removal.calibration_images=16"]


@pytest.mark.slow
def test_ln_removal_compares_the_three_models_and_removes_every_norm(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "ln-removal", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    for path in ("checkpoints/encoder.safetensors", "evals/vanilla/result.json",
                 "evals/removed_without_finetune/result.json", "evals/ln_free/result.json",
                 "tables/ln_removal.md", "report.md", "metrics.json"):
        assert (run / path).is_file(), path
    ln_free = json.loads((run / "evals" / "ln_free" / "result.json").read_text())
    dim, depth = 32, 2
    assert ln_free["params_removed"] == 2 * dim * (2 * depth + 1)  # every block norm + fc_norm
    assert ln_free["max_abs_logit_change"] < 1e-4  # folding keeps the function
    assert ln_free["fake_scores"]["test_top1"] == pytest.approx(ln_free["test_top1"], abs=1e-6)
    rows = read_leaderboard(board)
    assert set(zip(rows.protocol, rows.metric, strict=True)) == {
        (p, m) for p in ("finetune", "ln_removed_no_finetune", "ln_free_finetune")
        for m in ("top1", "loss")} | {("ln_free_finetune", "params_removed")}
    assert set(rows.init) == {"mae"}
    assert "LayerNorm removal (test set)" in (run / "report.md").read_text()


def tiny_classifier() -> FineTuneClassifier:
    backbone = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16,
                               depth=2, num_heads=2)
    return FineTuneClassifier(backbone, 3, base_lr=1e-3, warmup_epochs=1, epochs=2)


def fit(model, steps_per_epoch: int, epochs: int, callback) -> None:
    data = TensorDataset(torch.randn(4 * steps_per_epoch, 3, 16, 16),
                         torch.randint(0, 3, (4 * steps_per_epoch,)))
    L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              callbacks=[callback]).fit(model, DataLoader(data, batch_size=4))


def test_fakeln_fit_makes_every_norm_fake_after_the_warmup():
    model = tiny_classifier()
    callback = LayerNormRemoval(gap_norm2=1, gap_norm1_qk=0, gap_norm1=1)
    fit(model, steps_per_epoch=6, epochs=2, callback=callback)
    norms = [m for m in model.modules() if isinstance(m, FakeLayerNorm)]
    assert len(norms) == 5 and all(m.fake for m in norms)
    steps = callback.schedule.steps
    assert min(steps.values()) == 6  # the lr warmup: one epoch of 6 steps
    assert steps["fc_norm"] == max(steps.values()) == 6 + 2 * (1 + 0 + 1)


def test_a_fine_tune_shorter_than_the_schedule_is_refused():
    with pytest.raises(ConfigError, match="removal schedule ends at step"):
        fit(tiny_classifier(), steps_per_epoch=3, epochs=2,
            callback=LayerNormRemoval(gap_norm2=2, gap_norm1_qk=2, gap_norm1=3))

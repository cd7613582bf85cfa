"""The norm-ablation experiment end to end through the CLI, at toy size: rows per (norm,
placement), a diverging entry recorded with its step while the others go on, the figures and
the throughput table; its per-block statistics and divergence monitor on their own."""

import json

import lightning as L
import pytest
import torch
from torch import nn

from tests.test_runner import only_run, visionbench
from visionbench.analysis.layers import BlockStatsCallback, DivergenceMonitor, block_grad_norms
from visionbench.results.leaderboard import read_leaderboard

TOY = [
    "--set", "data.batch_size=32",
    "--set", "data.synth={train_per_class: 10, val_per_class: 3, test_per_class: 3}",
    "--set", "model.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, "
             "num_heads: 2}",
    "--set", "pretrain.epochs=2",
    "--set", "pretrain.warmup_epochs=1",
    "--set", "eval.linear_probe.epochs=3",
    "--set", "eval.linear_probe.batch_size=32",
    "--set", "ablation.stats_steps=[0, 3]",
    "--set", "ablation.conv.norms=[groupnorm, evonorm_b0]",
    "--set", "ablation.conv.epochs=1",
    "--set", "ablation.conv.batch_size=32",
    "--set", "ablation.throughput={norms: [layernorm, prepbn], batch_size: 8, iterations: 2, "
             "warmup: 1}",
    "--set", "ablation.entries=[{norm: layernorm, placement: pre}, {norm: dyt},"
             " {norm: prepbn}, {norm: layernorm, placement: mix},"
             " {norm: layernorm, placement: post, pretrain: {blr: 1.0e+30}}]",
]  # fmt: skip


@pytest.mark.slow
def test_norm_ablation_records_every_entry_and_a_divergence(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "norm-ablation", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert json.loads((run / "status.json").read_text())["status"] == "finished"

    rows = read_leaderboard(board)
    probe = rows[(rows.protocol == "linear_probe") & (rows.metric == "top1")]
    pairs = set(zip(probe.norm, probe.placement, probe.init, strict=True))
    assert {("layernorm", "pre", "mae"), ("dyt", "pre", "mae"), ("layernorm", "mix", "mae"),
            ("layernorm", "pre", "random")} <= pairs
    diverged = rows[rows.metric == "diverged_at_step"]
    assert list(zip(diverged.norm, diverged.placement, strict=True)) == [("layernorm", "post")]
    assert diverged.value.iloc[0] >= 1  # the first update blows the weights up, not step 0
    supervised = rows[(rows.protocol == "supervised") & (rows.metric == "top1")]
    # like with like: EvoNorm's BN-ReLU baseline is the same pre-activation ResNetV2
    assert set(zip(supervised.backbone, supervised.norm, strict=True)) == {
        ("resnet18", "groupnorm"), ("resnetv2_18", "evonorm_b0"), ("resnetv2_18", "batchnorm")}

    # PRepBN's lambda reached 0 at the demo's fraction (0.8) of the entry's optimizer steps
    from safetensors.torch import load_file

    prepbn = load_file(run / "entries" / "prepbn-pre" / "encoder.safetensors")
    steps = int(prepbn["blocks.0.norm1.step"])
    assert steps == 2 * (100 // 32)  # 2 epochs of 3 full batches of the 100 training images
    assert int(prepbn["blocks.0.norm1.total_steps"]) == round(0.8 * steps)

    post = json.loads((run / "entries" / "layernorm-post" / "result.json").read_text())
    assert post["status"] == "diverged" and post["diverged_at_step"] >= 1
    pre = json.loads((run / "entries" / "layernorm-pre" / "result.json").read_text())
    assert sorted(pre["stats"], key=int) == ["0", "3"]
    assert len(pre["stats"]["3"]["grad_norm"]) == 4
    for name in ("block_grad_norm.png", "hidden_variance.png"):
        assert (run / "figures" / name).stat().st_size > 1000
    throughput = json.loads((run / "tables" / "throughput.json").read_text())
    assert [r["model"] for r in throughput] == [
        "layernorm", "layernorm -> pre-rmsnorm", "layernorm -> pre-crmsnorm", "prepbn (folded)"]
    report = (run / "report.md").read_text()
    assert "## Norm ablation" in report and "## Inference throughput" in report


class _Blocks(L.LightningModule):
    def __init__(self, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.loss_scale = loss_scale

    def training_step(self, batch, batch_idx):
        out = self.encoder.blocks(batch[0])
        loss = out.pow(2).mean() * self.loss_scale
        return loss / 0.0 if self.global_step == 2 and self.loss_scale < 0 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(module, callbacks, steps=4):
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    return trainer


def test_block_stats_match_the_gradients_and_outputs_of_each_block():
    torch.manual_seed(0)
    module = _Blocks()
    stats = BlockStatsCallback([1, 2])
    _fit(module, [stats], steps=3)
    assert sorted(stats.records) == [1, 2]
    assert all(len(r["grad_norm"]) == 2 and len(r["variance"]) == 2
               for r in stats.records.values())
    # the gradient norm equals the norm of the gradients of the block's parameters
    blocks = module.encoder.blocks
    x = torch.randn(3, 4)
    blocks.zero_grad()
    blocks(x).pow(2).mean().backward()
    expected = [float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm())
                for b in blocks]
    assert block_grad_norms(list(blocks)) == pytest.approx(expected, rel=1e-6)
    restored = BlockStatsCallback([1, 2])
    restored.load_state_dict(stats.state_dict())
    assert restored.records == stats.records


def test_divergence_monitor_stops_at_the_first_non_finite_loss():
    monitor = DivergenceMonitor()
    trainer = _fit(_Blocks(loss_scale=-1.0), [monitor], steps=10)
    assert monitor.diverged_at == 2
    assert trainer.global_step == 3  # the step of the inf loss ran, then training stopped


@pytest.mark.slow
def test_resumed_ablation_skips_the_entries_already_recorded(tmp_path):
    out = tmp_path / "runs"
    small = [*TOY, "--set", "ablation.entries=[{norm: layernorm}, {norm: rmsnorm}]",
             "--set", "ablation.conv=null", "--set", "eval.inits=[pretrained]"]
    assert visionbench("run", "norm-ablation", *small, "--out", str(out), cwd=tmp_path,
                       timeout=600).returncode == 0
    run = only_run(out)
    first = json.loads((run / "entries" / "layernorm-pre" / "result.json").read_text())
    # as if killed after the first entry: the second entry's record and metrics.json are gone
    (run / "entries" / "rmsnorm-pre" / "result.json").unlink()
    (run / "metrics.json").unlink()
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "running"}))

    result = visionbench("run", "norm-ablation", "--resume", str(run), cwd=tmp_path,
                         timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[layernorm/pre] done before: skipped" in result.stdout
    assert json.loads((run / "entries" / "layernorm-pre" / "result.json").read_text()) == first
    assert (run / "entries" / "rmsnorm-pre" / "result.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert {r["norm"] for r in metrics["results"]} == {"layernorm", "rmsnorm"}

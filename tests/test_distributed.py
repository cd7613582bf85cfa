"""A multi-stage recipe on two DDP processes (gloo, CPU): every rank runs the whole recipe,
the training stages fit on both, rank 0 evaluates and writes the one run folder."""

import json

import pytest

from tests.test_runner import only_run, visionbench
from tests.test_unip_infrared import TOY
from visionbench.results.leaderboard import read_leaderboard


@pytest.mark.slow
def test_unip_infrared_on_two_gloo_processes(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "unip-infrared", *TOY, "--devices", "2", "--strategy", "ddp",
                         "--set", "trainer.accelerator=cpu", "--set", "data.batch_size=8",
                         "--out", str(out), "--leaderboard", str(board), cwd=tmp_path,
                         timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # the second process joined
    run = only_run(out)  # one run folder, written by rank 0
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished"
    for stage in ("[teacher] pretraining", "[mae student] pretraining", "[unip] distillation",
                  "nmi", "segmentation:unip:thermal:finetune", "metrics"):
        assert stage in status["stages"], stage
    rows = read_leaderboard(board)
    assert len(rows[rows.metric == "miou"]) == 6  # 3 students x 2 protocols, once

"""The videomae-v2 experiment through the CLI at toy size: rows with their views, the
figure, a corrupt clip under --data-root, kill and --resume mid-pretraining."""

import json
import shutil

import pytest

from tests.test_runner import kill_at_checkpoint, only_run, visionbench
from visionbench.results.leaderboard import read_leaderboard

TOY = ["--set", "data.synth={train_per_class: 3, val_per_class: 1, test_per_class: 2}",
       "--set", "data.batch_size=8", "--set", "pretrain.epochs=1",
       "--set", "pretrain.num_sample=1", "--set", "eval.finetune.epochs=1",
       "--set", "eval.finetune.batch_size=8", "--set", "eval.linear_probe.epochs=2",
       "--set", "data.video.test_clips=2", "--set", "data.video.test_crops=2"]


@pytest.mark.slow
def test_videomae_v2_pretrains_and_transfers_with_views_in_every_row(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "videomae-v2", *TOY, "--set", "data.video.finetune_samples=2",
                         "--out", str(out), "--leaderboard", str(board), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert (run / "figures" / "videomae_v2_reconstruction.png").is_file()
    rows = read_leaderboard(board)
    assert set(rows.init) == {"videomae_v2", "random"}
    assert set(rows[rows.protocol == "finetune"].variant) == {"clips=2,crops=2,frames=16"}
    assert set(rows[rows.protocol == "linear_probe"].variant) == {"clips=1,crops=1,frames=16"}
    logistic = rows[rows.protocol == "logistic"]  # the demo's converged probe, a frozen view
    assert set(logistic.variant) == {"clips=1,crops=1,frames=16"} and len(logistic) == 4
    assert logistic.ci_low.notna().all()
    tuned = json.loads((run / "evals" / "videomae_v2" / "finetune.json").read_text())
    from visionbench.data.video.synthetic import MOTION_CLASSES

    assert tuned["samples"]["n"] == 2 * len(MOTION_CLASSES)  # each test video once, 4 views


@pytest.mark.slow
def test_a_corrupt_clip_under_the_data_root_is_one_line_and_exit_2(tmp_path):
    from visionbench.data.video.synthetic import prepare_motion_clips

    cached = prepare_motion_clips(image_size=32, num_frames=32, seed=0, train_per_class=3,
                                  val_per_class=1, test_per_class=2)
    root = tmp_path / "kinetics"
    shutil.copytree(cached, root)
    victim = sorted((root / "train").rglob("*.mp4"))[0]
    victim.write_bytes(b"not a video" * 100)
    result = visionbench("run", "videomae-v2", *TOY, "--data-root", str(root), "--out",
                         str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert victim.name in lines[-1] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_videomae_v2_killed_mid_pretraining_resumes_and_finishes(tmp_path):
    out = tmp_path / "runs"
    args = ["run", "videomae-v2", *TOY, "--set", "pretrain.epochs=30",
            "--set", "pretrain.checkpoint_every_n_steps=2",
            "--set", "eval.finetune.enabled=false", "--out", str(out),
            "--leaderboard", str(tmp_path / "lb.csv")]
    proc = visionbench(*args, cwd=tmp_path, wait=False)
    run = kill_at_checkpoint(proc, out, lambda step: step >= 4)
    assert not (run / "metrics.json").exists()
    result = visionbench("run", "videomae-v2", "--resume", str(run), "--leaderboard",
                         str(tmp_path / "lb.csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming pretraining from" in result.stdout
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"


def test_a_data_root_without_its_train_list_is_refused_before_a_run_folder(tmp_path):
    (tmp_path / "k400").mkdir()
    result = visionbench("run", "videomae-v2", "--data-root", str(tmp_path / "k400"),
                         "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and "train.csv: train list not found" in result.stderr
    assert not (tmp_path / "runs").exists()

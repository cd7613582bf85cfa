"""End to end through the CLI as a user runs it: a tiny MAE experiment, bad input, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from visionbench.results.leaderboard import COLUMNS, read_leaderboard

TINY = [
    "--set", "data.image_size=16",
    "--set", "data.batch_size=32",
    "--set", "data.synth={train_per_class: 10, val_per_class: 3, test_per_class: 3}",
    "--set", "model.backbone_kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, "
             "num_heads: 2}",
    "--set", "pretrain.decoder_embed_dim=16",
    "--set", "pretrain.decoder_depth=1",
    "--set", "pretrain.decoder_num_heads=2",
    "--set", "pretrain.warmup_epochs=1",
    "--set", "pretrain.figure_images=4",
    "--set", "eval.linear_probe.epochs=3",
    "--set", "eval.linear_probe.warmup_epochs=1",
    "--set", "eval.linear_probe.batch_size=32",
    "--set", "eval.finetune.epochs=1",
    "--set", "eval.finetune.warmup_epochs=0",
    "--set", "eval.finetune.batch_size=32",
]


def visionbench(*args: str, cwd: Path, timeout: int = 300, wait: bool = True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "visionbench.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def only_run(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def kill_at_checkpoint(proc, out: Path, wanted, timeout: float = 240) -> Path:
    """SIGKILL the run ``proc`` writes under ``out`` once its ``last.ckpt`` holds a
    ``global_step`` that ``wanted(step)`` accepts; its run folder."""
    deadline, run = time.time() + timeout, None
    while time.time() < deadline:
        found = list(out.glob("*/checkpoints/last.ckpt")) if out.exists() else []
        if found and found[0].stat().st_size > 0:
            ckpt = torch.load(found[0], map_location="cpu", weights_only=False)
            if wanted(ckpt["global_step"]):
                run = found[0].parents[1]
                break
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    assert run is not None, "no checkpoint at a wanted step appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return run


@pytest.mark.slow
def test_mae_demo_runs_end_to_end_and_writes_a_complete_record(tmp_path):
    out = tmp_path / "runs"
    result = visionbench("run", "mae", *TINY, "--set", "pretrain.epochs=2", "--out", str(out),
                         "--leaderboard", str(tmp_path / "leaderboard.csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert run.name.endswith("-mae-" + run.name.rsplit("-", 1)[1])
    for name in ("config.yaml", "environment.json", "status.json", "metrics.json", "report.md",
                 "checkpoints/encoder.safetensors", "figures/mae_reconstruction.png",
                 "figures/probe_grid_mae.png", "logs/pretrain/metrics.csv",
                 "features/mae/train.pt", "evals/random/finetune.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["precision"] == "32-true" and metrics["device"] == "cpu"
    assert metrics["backbone"] == ("vit_tiny_patch16_224[depth=2,embed_dim=32,img_size=16,"
                                   "num_heads=2,patch_size=4]")
    protocols = {(r["init"], r["protocol"], r["metric"]) for r in metrics["results"]}
    for init in ("mae", "random"):
        assert (init, "linear_probe", "top1") in protocols
        assert (init, "knn_k20_t0.07", "top1") in protocols
        assert (init, "knn_k5_majority", "top1") in protocols
        assert (init, "finetune", "top1") in protocols
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["precision"] == "32-true" and "git_commit" in env
    board = read_leaderboard(tmp_path / "leaderboard.csv")
    assert list(board.columns) == COLUMNS
    assert set(board["init"]) == {"mae", "random"} and set(board["source"]) == {"run"}
    report = (run / "report.md").read_text()
    assert "linear_probe" in report
    assert "| Status | finished |" in report and "not written yet" not in report
    for row in metrics["results"]:  # every number of the run is in its report
        assert f"{row['value']:.2f}" in report, row

    again = visionbench("report", str(run), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    board = visionbench("leaderboard", "--runs-dir", str(out), "--output",
                        str(tmp_path / "lb2.csv"), "--reference",
                        str(Path(__file__).parents[1] / "results" / "reference.csv"),
                        cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    rows = read_leaderboard(tmp_path / "lb2.csv")
    assert set(rows["source"]) == {"run", "paper"}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "mae", "--set", "model.nope=1"], "unknown key 'model.nope'"),
        (["run", "mae", "--backbone", "vit_huge_patch99"], "unknown backbone"),
        (["run", "mae", "--norm", "nonorm"], "unknown norm 'nonorm'"),
        (["run", "mae", "--profile", "paper"], "--data-root"),
        (["run", "mae", "--data-root", "/no/such/folder"], "/no/such/folder"),
        (["run", "nope"], "unknown experiment 'nope'"),
        (["report", "/no/such/run"], "/no/such/run"),
        (["run", "mae", "--resume", "/no/such/run"], "/no/such/run"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path, args, needle):
    result = visionbench(*args, "--out", str(tmp_path / "runs"), cwd=tmp_path) if args[0] == "run" \
        else visionbench(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


@pytest.mark.slow
def test_a_corrupt_image_fails_the_run_with_one_line_and_marks_it_failed(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
            for i in range(4):
                from PIL import Image

                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(data / split / cls / f"{i}.png")
    (data / "train" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "runs"
    result = visionbench("run", "mae", *TINY, "--set", "pretrain.epochs=1", "--data-root",
                         str(data), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "bad.png" in last
    run = only_run(out)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "bad.png" in status["error"]
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_and_finishes(tmp_path):
    out = tmp_path / "runs"
    # 40 epochs x 3 steps: long enough that a step checkpoint is seen before the run ends
    args = ["run", "mae", *TINY, "--set", "pretrain.epochs=40",
            "--set", "pretrain.checkpoint_every_n_steps=2", "--set", "eval.finetune.enabled=false",
            "--out", str(out), "--leaderboard", str(tmp_path / "lb.csv")]
    proc = visionbench(*args, cwd=tmp_path, wait=False)
    # mid-epoch (3 steps an epoch)
    run = kill_at_checkpoint(proc, out, lambda step: step >= 4 and step % 3)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "running" and not (run / "metrics.json").exists()

    result = visionbench("run", "mae", "--resume", str(run), "--leaderboard",
                         str(tmp_path / "lb.csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming pretraining from" in result.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["run_id"] == run.name
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 39 or last["global_step"] >= 40 * 3 - 1
    board = read_leaderboard(tmp_path / "lb.csv")
    assert set(board["run_id"]) == {run.name}

    again = visionbench("run", "mae", "--resume", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.slow
def test_ddp_pretraining_through_the_cli_writes_one_run(tmp_path):
    """Two CPU processes pretrain; rank 0 alone evaluates in the same run folder."""
    out = tmp_path / "runs"
    result = visionbench("run", "mae", *TINY, "--set", "pretrain.epochs=1",
                         "--set", "eval.finetune.enabled=false", "--devices", "2",
                         "--strategy", "ddp", "--set", "trainer.accelerator=cpu",
                         "--out", str(out), "--leaderboard", str(tmp_path / "lb.csv"),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert json.loads((run / "metrics.json").read_text())["status"] == "finished"
    assert (run / "checkpoints" / "encoder.safetensors").is_file()
    assert "terminate called" not in result.stderr  # no rank aborted in gloo's teardown


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    from visionbench.runner import resume_checkpoint

    whole = tmp_path / "step10.ckpt"
    torch.save({"global_step": 10}, whole)
    cut = tmp_path / "last.ckpt"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    os.utime(cut, (time.time() + 5, time.time() + 5))  # the newest file is the broken one
    assert resume_checkpoint(tmp_path) == str(whole)
    assert resume_checkpoint(tmp_path / "missing") is None


def test_accumulation_reaches_the_effective_batch_on_any_device_count():
    from visionbench.errors import ConfigError
    from visionbench.runner.core import accumulation

    assert accumulation(4096, 64, 1, "k") == 64  # the paper's batch on one GPU
    assert accumulation(4096, 64, 8, "k") == 8
    assert accumulation(None, 64, 8, "k") == 1
    with pytest.raises(ConfigError, match="k: 4096 is not a multiple .* 48 per device x 2"):
        accumulation(4096, 48, 2, "k")


@pytest.mark.slow
def test_effective_batch_accumulates_and_scales_the_lr(tmp_path):
    bad = visionbench("run", "mae", *TINY, "--set", "pretrain.effective_batch_size=100",
                      "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2 and "pretrain.effective_batch_size: 100" in bad.stderr
    assert not (tmp_path / "bad").exists()  # checked before any run folder
    out = tmp_path / "runs"
    result = visionbench("run", "mae", *TINY, "--set", "pretrain.epochs=2",
                         "--set", "pretrain.effective_batch_size=64",
                         "--set", "eval.finetune.enabled=false", "--out", str(out),
                         "--leaderboard", str(tmp_path / "lb.csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "effective batch 64 = 32 x 1 device(s) x 2 accumulation steps" in result.stdout
    # our own checkpoint (trusted): 3 batches an epoch make 2 optimizer steps (the last one
    # with the epoch's remainder), 2 epochs
    ckpt = torch.load(only_run(out) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_a_data_set_smaller_than_the_batch_trains_in_one_smaller_batch(tmp_path):
    out = tmp_path / "runs"
    result = visionbench("run", "mae", *TINY, "--set", "data.batch_size=500",
                         "--set", "pretrain.epochs=1", "--set", "eval.finetune.enabled=false",
                         "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fewer than the batch size 500: training with batches of 100" in result.stdout
    from visionbench.errors import DataError
    from visionbench.runner.core import fit_batch_size

    class Silent:
        def log(self, message):
            pass

    with pytest.raises(DataError, match="holds 1 sample"):
        fit_batch_size(Silent(), 1, 8, "pretraining")

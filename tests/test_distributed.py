"""A multi-stage recipe on two DDP processes (gloo, CPU): every rank runs the whole recipe,
the training stages fit on both, rank 0 evaluates and writes the one run folder."""

import json

import pytest

from tests.test_runner import TINY, only_run, visionbench
from tests.test_unip_infrared import TOY
from visionbench.distributed import shutdown
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


@pytest.mark.slow
def test_mae_finetunes_on_two_gloo_processes_and_tests_once(tmp_path):
    """Pretraining and the low-label fine-tunes fit on both ranks; rank 0 tests each one."""
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "mae", *TINY, "--set", "pretrain.epochs=1",
                         "--set", "eval.finetune.label_fractions=[0.5, 1.0]",
                         "--set", "eval.finetune.batch_size=8", "--set", "data.batch_size=8",
                         "--devices", "2", "--strategy", "ddp",
                         "--set", "trainer.accelerator=cpu", "--out", str(out),
                         "--leaderboard", str(board), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run = only_run(out)
    stages = json.loads((run / "status.json").read_text())["stages"]
    for init in ("mae", "random"):
        assert {f"finetune:{init}", f"finetune:{init}:labels=50%"} <= set(stages)
        half = json.loads((run / "evals" / init / "finetune_labels50.json").read_text())
        assert half["train_images"] == 50  # half of 10 classes x 10 images
        assert half["samples"]["n"] == 30  # the whole test split, tested once on rank 0
    rows = read_leaderboard(board)
    tuned = rows[(rows.protocol == "finetune") & (rows.metric == "top1")]
    assert sorted(tuned.variant) == ["labels=100%", "labels=100%", "labels=50%", "labels=50%"]


@pytest.mark.slow
def test_norm_ablation_conv_entries_and_a_divergence_on_two_gloo_processes(tmp_path):
    """Supervised conv entries fit on both ranks, are tested on rank 0; a diverging entry
    stops both ranks at one step and is recorded once."""
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench(
        "run", "norm-ablation", "--set", "data.batch_size=16",
        "--set", "data.synth={train_per_class: 10, val_per_class: 2, test_per_class: 3}",
        "--set", "model.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, "
                 "num_heads: 2}",
        "--set", "pretrain.epochs=2", "--set", "pretrain.warmup_epochs=1",
        "--set", "eval.linear_probe.epochs=2", "--set", "eval.linear_probe.batch_size=32",
        "--set", "eval.inits=[pretrained]", "--set", "ablation.stats_steps=[0]",
        "--set", "ablation.conv.norms=[groupnorm]", "--set", "ablation.conv.epochs=1",
        "--set", "ablation.conv.batch_size=8",
        "--set", "ablation.throughput={norms: [layernorm], batch_size: 4, iterations: 1, "
                 "warmup: 0}",
        "--set", "ablation.entries=[{norm: layernorm, placement: post, pretrain: "
                 "{blr: 1.0e+30}}]",
        "--devices", "2", "--strategy", "ddp", "--set", "trainer.accelerator=cpu",
        "--out", str(out), "--leaderboard", str(board), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    rows = read_leaderboard(board)
    supervised = rows[(rows.protocol == "supervised") & (rows.metric == "top1")]
    assert sorted(supervised.norm) == ["batchnorm", "groupnorm"]  # and its BN baseline
    diverged = rows[rows.metric == "diverged_at_step"]
    assert list(diverged.placement) == ["post"] and diverged.value.iloc[0] >= 1
    run = only_run(out)
    record = json.loads((run / "entries" / "resnet18-groupnorm" / "result.json").read_text())
    assert record["supervised"]["samples"]["n"] == 30  # the whole test split, on rank 0


@pytest.mark.slow
def test_alpha_bn_trains_its_source_model_on_two_gloo_processes(tmp_path):
    from tests.test_alpha_bn import TOY as ALPHA_TOY

    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "alpha-bn", *ALPHA_TOY, "--devices", "2", "--strategy", "ddp",
                         "--set", "trainer.accelerator=cpu", "--out", str(out),
                         "--leaderboard", str(board), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run = only_run(out)
    source = json.loads((run / "source" / "result.json").read_text())
    assert source["samples"]["n"] == 40  # the whole test split (10 classes x 4), on rank 0
    rows = read_leaderboard(board)
    assert set(rows.protocol) >= {"alpha_bn"} and rows.value.notna().all()


@pytest.mark.slow
def test_ln_removal_finetunes_on_two_gloo_processes(tmp_path):
    """Both fine-tunes (with FakeLN's schedule) fit on both ranks; rank 0 tests, folds and
    writes each stage once."""
    from tests.test_ln_removal import TOY as LN_TOY

    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "ln-removal", *LN_TOY, "--set", "eval.finetune.batch_size=8",
                         "--devices", "2", "--strategy", "ddp",
                         "--set", "trainer.accelerator=cpu", "--out", str(out),
                         "--leaderboard", str(board), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run = only_run(out)
    stages = json.loads((run / "status.json").read_text())["stages"]
    assert {"vanilla", "removed_without_finetune", "ln_free"} <= set(stages)
    ln_free = json.loads((run / "evals" / "ln_free" / "result.json").read_text())
    assert ln_free["samples"]["n"] == 30  # the whole test split, on rank 0
    assert ln_free["max_abs_logit_change"] < 1e-4
    assert ln_free["fake_scores"]["test_top1"] == pytest.approx(ln_free["test_top1"], abs=1e-6)
    rows = read_leaderboard(board)
    assert len(rows) == 7 and rows.value.notna().all()


@pytest.mark.slow
def test_pixpro_detection_trains_on_two_gloo_processes(tmp_path):
    """Detection's own loop (Fabric) on both ranks, each with its half of the batch; rank 0
    tests once (a dry run of the whole recipe)."""
    from tests.test_recipes import dry_run

    run, status = dry_run(tmp_path, "pixpro", "--devices", "2", "--strategy", "ddp",
                          "--set", "trainer.accelerator=cpu",
                          "--set", "eval.detection.batch_size=4")
    assert {"detection:pixpro", "detection:random"} <= set(status["stages"])
    result = json.loads((run / "evals" / "pixpro" / "detection.json").read_text())
    assert result["config"]["devices"] == 2 and result["config"]["batch_size"] == 4
    assert len(result["predictions"]) == 2  # the dry run's 2 test images, tested once
    assert len(result["history"]) == 1 and result["history"][0]["step"] == 2


@pytest.mark.slow
def test_videomae_v2_pretrains_and_finetunes_on_two_gloo_processes(tmp_path):
    from tests.test_videomae_v2_experiment import TOY as VIDEO_TOY
    from visionbench.data.video.synthetic import MOTION_CLASSES

    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "videomae-v2", *VIDEO_TOY, "--set", "data.batch_size=4",
                         "--set", "eval.finetune.batch_size=4", "--devices", "2",
                         "--strategy", "ddp", "--set", "trainer.accelerator=cpu",
                         "--out", str(out), "--leaderboard", str(board), cwd=tmp_path,
                         timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr
    run = only_run(out)
    tuned = json.loads((run / "evals" / "videomae_v2" / "finetune.json").read_text())
    assert tuned["samples"]["n"] == 2 * len(MOTION_CLASSES)  # every test video, on rank 0
    assert set(read_leaderboard(board).init) == {"videomae_v2", "random"}


def test_shutdown_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path):
    """The end of every run: a rank leaves the process group before it exits (a rank that
    exited with the group alive could abort, and Lightning's launcher then kills rank 0)."""
    import torch.distributed as dist

    shutdown()  # no process group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        shutdown()
        assert not dist.is_initialized()
    finally:  # never leave a group to the tests after this one
        if dist.is_initialized():
            dist.destroy_process_group()

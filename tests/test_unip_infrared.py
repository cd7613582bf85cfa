"""The unip-infrared experiment end to end through the CLI at toy size, and its pieces: the
pretraining mix, the layer choice, results and the segmentation table."""

import json

import pytest
import yaml

from tests.test_runner import only_run, visionbench
from visionbench.config import resolve_config
from visionbench.errors import ConfigError
from visionbench.results.leaderboard import read_leaderboard

TOY = [
    "--set", "data.image_size=32",
    "--set", "data.batch_size=64",  # more than the 26 images of the mix: a smaller batch
    "--set", "model.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, "
             "num_heads: 2}",
    "--set", "pretrain.teacher.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 64, "
             "depth: 3, num_heads: 4}",
    "--set", "pretrain.teacher.layer=1",
    "--set", "pretrain.synth={n_train: 16, n_test: 8, n_pretrain: 16, shapes_per_class: 1}",
    "--set", "pretrain.mae.epochs=1",
    "--set", "pretrain.mae.decoder_embed_dim=16",
    "--set", "pretrain.mae.decoder_num_heads=2",
    "--set", "pretrain.teacher.epochs=1",
    "--set", "pretrain.epochs=1",
    "--set", "pretrain.nmi.images=4",
    "--set", "eval.segmentation.crop_size=32",
    "--set", "eval.segmentation.figure_images=2",
    "--set", "eval.segmentation.finetune={epochs: 1, batch_size: 8, head: fpn, "
             "inference: whole}",
    "--set", "eval.segmentation.linear={epochs: 1, batch_size: 8, inference: whole, "
             "layer_decay: null}",
]  # fmt: skip


@pytest.mark.slow
def test_unip_infrared_runs_every_stage_and_records_three_students(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "unip-infrared", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("[teacher] pretraining", "[mae student] pretraining", "[unip] distillation"):
        assert (f"{stage}: the training set holds 26 samples, fewer than the batch size 64"
                in result.stdout), stage
    run = only_run(out)
    for path in ("teacher/encoder.safetensors", "students/mae/encoder.safetensors",
                 "students/unip/encoder.safetensors", "nmi/nmi.json", "nmi/teacher_layer.json",
                 "figures/nmi_per_layer.png", "figures/masks_thermal.png",
                 "tables/nmi.md", "tables/segmentation.md", "report.md", "metrics.json"):
        assert (run / path).is_file(), path
    nmi = json.loads((run / "nmi" / "nmi.json").read_text())
    assert set(nmi) == {"teacher", "mae", "unip", "random"}
    assert len(nmi["teacher"]) == 3 and len(nmi["unip"]) == 2
    assert all(0.0 <= v <= 1.0 for values in nmi.values() for v in values)
    assert json.loads((run / "nmi" / "teacher_layer.json").read_text())["layer"] == 1

    rows = read_leaderboard(board)
    miou = rows[rows.metric == "miou"]
    assert set(zip(miou.init, miou.protocol, strict=True)) == {
        (s, p) for s in ("unip", "mae", "random") for p in ("finetune", "linear_probe")}
    assert set(miou.dataset) == {"thermal"}
    assert miou.value.between(0, 100).all()
    assert "## Infrared segmentation" in (run / "report.md").read_text()


def test_paper_profile_reads_the_segmentation_sets_from_data_root(tmp_path):
    with pytest.raises(ConfigError, match="--data-root"):
        resolve_config("unip-infrared", "paper")
    with pytest.raises(ConfigError, match="pretrain.teacher.weights: the teacher is a local"):
        resolve_config("unip-infrared", "paper", flags={"data.root": str(tmp_path)})
    teacher = tmp_path / "mae_pretrain_vit_large.pth"
    teacher.write_bytes(b"")
    cfg = resolve_config("unip-infrared", "paper", flags={"data.root": str(tmp_path),
                                                          "pretrain.teacher.weights": str(teacher)})
    assert cfg.eval.segmentation.datasets == ["soda", "mfnet", "scut-seg"]
    assert cfg.pretrain.teacher.layer == 17  # MAE-L block 18 (1-based), as the paper
    assert cfg.pretrain.epochs == 100 and cfg.pretrain.blr == 1.5e-4
    assert cfg.pretrain.effective_batch_size == 4096  # lr 1.5e-4 x 4096 / 256 = 2.4e-3
    schedules = {k: (v.max_steps, v.warmup_steps)
                 for k, v in cfg.eval.segmentation.schedules.items()}
    assert schedules == {"soda": (14400, 1500), "mfnet": (9800, 1000),
                         "scut-seg": (16800, 1700)}
    assert cfg.eval.segmentation.finetune.layer_scale == 1.0
    assert cfg.eval.segmentation.cat_max_ratio == 0.75 and cfg.eval.segmentation.photometric
    # pretraining a teacher in the run stays an explicit option
    made_here = resolve_config("unip-infrared", "paper", flags={"data.root": str(tmp_path)},
                               sets=["pretrain.teacher.source=pretrain"])
    assert made_here.pretrain.teacher.weights is None


def test_nmi_thresholds_must_be_ordered():
    with pytest.raises(ConfigError, match="global_threshold must be below local_threshold"):
        resolve_config("unip-infrared", sets=["pretrain.nmi.global_threshold=0.5"])


def test_demo_profile_uses_the_embedded_thermal_set():
    cfg = resolve_config("unip-infrared")
    assert cfg.eval.segmentation.datasets == ["thermal"]
    assert cfg.pretrain.students == ["unip", "mae", "random"]
    teacher = cfg.pretrain.teacher.backbone_kwargs
    student = cfg.model.backbone_kwargs
    assert teacher["embed_dim"] > student["embed_dim"]  # the teacher is the larger model
    assert teacher["depth"] > student["depth"]


def test_missing_segmentation_set_is_one_line_before_any_run_folder(tmp_path):
    data = tmp_path / "data"
    (data / "InfMix").mkdir(parents=True)
    out = tmp_path / "runs"
    result = visionbench("run", "unip-infrared", "--profile", "paper", "--data-root", str(data),
                         "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2  # no teacher checkpoint: one line, before anything else
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pretrain.teacher.weights" in lines[0], result.stderr
    result = visionbench("run", "unip-infrared", "--profile", "paper", "--data-root", str(data),
                         "--set", "pretrain.teacher.source=pretrain", "--out", str(out),
                         cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no folder 'SODA'" in lines[0], result.stderr
    assert not out.exists()


def test_the_fine_tune_backbone_has_layer_scale_and_a_trainable_position_embedding(tmp_path):
    from timm.layers import LayerScale

    from visionbench.registry import get_experiment
    from visionbench.runner.core import Run
    from visionbench.runner.recipes.unip_infrared import protocol_cfg, segmentation_backbone

    cfg = resolve_config("unip-infrared", sets=["eval.segmentation.schedules={thermal: "
                                                "{max_steps: 30, warmup_steps: 3}}"])
    run = Run(get_experiment("unip-infrared"), cfg, tmp_path, log=lambda message: None)
    finetune = segmentation_backbone(run, "random", layer_scale=1.0, finetune=True)
    scales = [m for m in finetune.modules() if isinstance(m, LayerScale)]
    assert len(scales) == 2 * len(finetune.blocks)
    assert all(bool((m.gamma == 1.0).all()) for m in scales)  # backbone/mae.py init_values=1.
    assert finetune.pos_embed.requires_grad
    linear = segmentation_backbone(run, "random")
    assert not any(isinstance(m, LayerScale) for m in linear.modules())
    schedule = protocol_cfg(run, "finetune", "thermal")  # the data set's own schedule
    assert (schedule["epochs"], schedule["max_steps"], schedule["warmup_steps"]) == (None, 30, 3)
    assert protocol_cfg(run, "finetune", "soda")["epochs"] == 10  # no schedule: the protocol's


@pytest.mark.slow
def test_paper_profile_dry_run_on_the_real_layouts(tmp_path):
    """The paper profile's wiring (its readers of SODA / MFNet / SCUT-Seg and InfMix under
    --data-root, a teacher from a local file, the per-set schedules, every stage) as a
    --fast-dev-run, with tiny models and crops so that it fits a CPU test."""
    from PIL import Image

    from tests.data.test_infrared import grey, make_mfnet, make_scut, make_soda
    from tests.test_recipes import dry_run
    from visionbench.backbones import create_backbone
    from visionbench.runner.core import save_encoder

    root = tmp_path / "data"
    make_soda(root / "SODA")
    make_mfnet(root / "MFNet", unip=True)
    make_scut(root / "SCUT-Seg")
    # a training stage needs two samples: the helpers' one-image train lists take a second
    (root / "MFNet" / "train.txt").write_text("00000D\n00001D\n")
    (root / "SCUT-Seg" / "train.txt").write_text("img_0\nimg_1\n")
    (root / "InfMix").mkdir()
    for i in range(4):
        Image.fromarray(grey(i)).save(root / "InfMix" / f"{i}.png")
    teacher = tmp_path / "teacher.safetensors"
    save_encoder(create_backbone("vit_large_patch16_224", img_size=32, patch_size=8,
                                 embed_dim=64, depth=3, num_heads=4), teacher)
    pairs = [TOY[i:i + 2] for i in range(0, len(TOY), 2)]  # ("--set", "key=value")
    tiny = [a for pair in pairs if "synth" not in pair[1] for a in pair]
    run, status = dry_run(tmp_path, "unip-infrared", "--profile", "paper", "--data-root",
                          str(root), *tiny, "--set", f"pretrain.teacher.weights={teacher}",
                          "--set", "data.batch_size=2",
                          *[a for p in ("finetune", "linear") for a in (
                              "--set", f"eval.segmentation.{p}.inference=slide",
                              "--set", f"eval.segmentation.{p}.stride=16")])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["profile"] == "paper" and cfg["pretrain"]["teacher"]["source"] == "weights"
    for dataset in ("soda", "mfnet", "scut-seg"):
        for protocol in ("finetune", "linear"):
            assert f"segmentation:unip:{dataset}:{protocol}" in status["stages"]

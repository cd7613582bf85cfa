"""Every registry entry end to end as a dry run (``--fast-dev-run``: every stage of its recipe
on two batches), with the tiny overrides of ``tests/conf/<recipe>.yaml``; the paper profiles
of the classification recipe on a tiny ``--data-root``; stage skipping on resume."""

import json
from pathlib import Path

import pytest
import yaml

from tests.test_runner import only_run, visionbench
from visionbench.data.images.scenes import SCENE_CLASSES
from visionbench.registry import EXPERIMENTS

CONF = Path(__file__).with_name("conf")


def tiny_overrides(name: str) -> list[str]:
    """``tests/conf/<recipe>.yaml``, then ``tests/conf/<experiment>.yaml`` where there is
    one, as ``--set`` arguments."""
    def flat(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={json.dumps(value)}"
    args = []
    for stem in dict.fromkeys((EXPERIMENTS[name].recipe, name)):
        path = CONF / f"{stem}.yaml"
        tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
        args += [arg for item in flat(tree) for arg in ("--set", item)]
    return args


def dry_run(tmp_path: Path, name: str, *extra: str):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", name, "--fast-dev-run", *tiny_overrides(name), *extra,
                         "--out", str(out), "--leaderboard", str(board),
                         cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    status = json.loads((run / "status.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert status["status"] == "finished" and status["dry_run"] is True
    assert metrics["dry_run"] is True and metrics["results"]
    assert not board.exists()  # a dry run adds no leaderboard rows
    return run, status


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_registry_entry_runs_every_stage_as_a_dry_run(tmp_path, name):
    _, status = dry_run(tmp_path, name)
    assert "metrics" in status["stages"] and len(status["stages"]) >= 2


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    """A tiny ImageFolder with a tiny VOC folder beside its classes (``voc/``)."""
    import shutil

    from visionbench.data.images.scenes import generate_scenes
    from visionbench.data.images.shapes import prepare_shapes

    cached = prepare_shapes(image_size=48, seed=0, train_per_class=2, val_per_class=1,
                            test_per_class=1, cache_dir=tmp_path_factory.mktemp("cache"))
    root = tmp_path_factory.mktemp("data") / "root"
    shutil.copytree(cached, root)
    generate_scenes(root / "voc", image_size=48, seed=0, n_trainval=3, n_test=2)
    return root


# the paper profiles' wiring at ViT-B / ResNet-50 and 224 px, on batches of 4 images (MAE's
# ViT-B with 2 of its 12 blocks and a 1-block decoder). PixPro's paper detection (C4, SyncBN,
# 24k steps of 16 images at 800 px) dry-runs its 2 steps on 2 images of 64 px with 16 RoIs
# each: CPU-sized, the wiring of the paper profile.
PAPER_SMALL = ["--set", "data.batch_size=4", "--set", "eval.finetune.batch_size=4"]
PAPER_EXTRA = {"mae": ["--set", "model.backbone_kwargs={depth: 2}",
                       "--set", "pretrain.decoder_depth=1"],
               # the random-init twin runs the same stages (the registry dry runs cover it)
               "selfie": ["--set", "eval.inits=[pretrained]"],
               "pixpro": ["--set", "eval.detection.batch_size=2", "--set",
                          "eval.detection.image_size=64", "--set",
                          "eval.detection.roi_batch_size=16", "--set",
                          "eval.detection.classes=" + json.dumps(SCENE_CLASSES)]}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mae", "pixpro", "selfie"])
def test_paper_profiles_dry_run_on_real_data_layouts(tmp_path, tiny_imagefolder, name):
    run, status = dry_run(tmp_path, name, "--profile", "paper", "--data-root",
                          str(tiny_imagefolder), *PAPER_SMALL, *PAPER_EXTRA.get(name, []))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["profile"] == "paper" and cfg["data"]["image_size"] == 224
    assert cfg["model"]["backbone"] in ("vit_base_patch16_224", "resnet50")
    assert any(s.startswith("linear_probe:") for s in status["stages"])
    if name == "pixpro":
        assert {"detection:pixpro", "detection:random"} <= set(status["stages"])
        assert cfg["eval"]["detection"]["arch"] == "c4"
        results = json.loads((run / "metrics.json").read_text())["results"]
        detection = [r for r in results if r["protocol"] == "detection"]
        assert {r["metric"] for r in detection} == {"ap", "ap50", "ap75"}
        assert {(r["dataset"], r["variant"]) for r in detection} == {
            ("voc07+12", "arch=c4,norm=syncbn")}  # the reference rows' names
    if name == "selfie":  # the paper's low-label protocol: 5 / 10 / 20 / 100 % of the labels
        assert {f"finetune:selfie:labels={p}%" for p in (5, 10, 20)} | {"finetune:selfie"} \
            <= set(status["stages"])


def test_a_stage_is_skipped_when_its_output_exists(tmp_path):
    from visionbench.runner import stages
    from visionbench.runner.core import Run

    logs: list[str] = []
    run = Run(EXPERIMENTS["mae"], None, tmp_path, logs.append)
    calls = []

    def write() -> None:
        calls.append(1)
        (tmp_path / "out.json").write_text("{}")

    assert stages.stage(run, "probe", tmp_path / "out.json", write) is True
    assert stages.stage(run, "probe", tmp_path / "out.json", write) is False
    assert calls == [1] and "probe: done (out.json), skipped" in logs[-1]
    assert json.loads((tmp_path / "status.json").read_text())["stages"] == ["probe"]
    with pytest.raises(RuntimeError, match="without writing"):
        stages.stage(run, "broken", tmp_path / "never.json", lambda: None)

"""The alpha-bn experiment end to end through the CLI at toy size, and its pieces."""

import pytest
import torch

from tests.test_runner import only_run, visionbench
from visionbench.backbones import create_backbone
from visionbench.backbones.weights import load_classifier_weights
from visionbench.errors import WeightsError
from visionbench.evals.supervised import SupervisedClassifier
from visionbench.results.leaderboard import read_leaderboard
from visionbench.runner.recipes.alpha_bn import corruption_errors, top1_per_alpha

TOY = [
    "--set", "data.synth={train_per_class: 8, val_per_class: 2, test_per_class: 4}",
    "--set", "alpha_bn.train={epochs: 2, warmup_epochs: 0, lr: 0.2, batch_size: 16, "
             "crop_scale: [0.2, 1.0]}",
    "--set", "alpha_bn.alphas=[0.0, 0.5]",
    "--set", "alpha_bn.corruptions=[gaussian_noise, contrast]",
    "--set", "alpha_bn.severities=[1, 5]",
    "--set", "alpha_bn.batch_size=8",
]  # fmt: skip


@pytest.mark.slow
def test_alpha_bn_runs_every_stage_and_writes_rows_per_corruption_and_severity(tmp_path):
    out, board = tmp_path / "runs", tmp_path / "lb.csv"
    result = visionbench("run", "alpha-bn", *TOY, "--out", str(out), "--leaderboard",
                         str(board), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    for path in ("source/classifier.safetensors", "source/result.json",
                 "evals/alpha_bn/gaussian_noise.json", "evals/alpha_bn/contrast.json",
                 "evals/alpha_bn/clean.json", "figures/alpha_bn_accuracy.png",
                 "tables/alpha_bn.md", "report.md", "metrics.json"):
        assert (run / path).is_file(), path
    rows = read_leaderboard(board)
    top1 = rows[(rows.metric == "top1") & rows.dataset.str.startswith("shapes-c/")]
    assert set(top1.dataset) == {f"shapes-c/{c}/{s}" for c in ("gaussian_noise", "contrast")
                                 for s in (1, 5)}
    assert set(top1.init) == {"alpha=0", "alpha=0.5", "source"} and len(top1) == 12
    mce = rows[rows.metric == "mce"].set_index("init")["value"]
    assert mce["source"] == pytest.approx(100.0)  # the baseline of its own mCE
    assert set(rows[rows.dataset == "shapes"].init) == {"alpha=0", "alpha=0.5", "source"}
    report = (run / "report.md").read_text()
    assert "alpha-BN under covariate shift" in report and "| Status | finished |" in report

    again = visionbench("run", "alpha-bn", "--resume", str(run), cwd=tmp_path)
    assert again.returncode == 2 and "already finished" in again.stderr


def test_top1_per_alpha_ends_equal_the_source_and_test_time_statistics():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", norm="batchnorm", channels=[8, 8, 8, 8],
                               stem_width=8)
    model = SupervisedClassifier(backbone, 3).eval()
    for m in model.modules():  # source statistics far from the test batches'
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(4.0)
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    scores = top1_per_alpha(model, images, labels, [0.0], batch_size=12, seed=0, device="cpu")
    with torch.no_grad():
        source = (model(images).argmax(1) == labels).float().mean() * 100
        model.train()  # batch statistics of the whole (single) batch = alpha 0
        batch = (model(images).argmax(1) == labels).float().mean() * 100
    assert scores["source"] == pytest.approx(float(source))
    assert scores["alpha=0"] == pytest.approx(float(batch))


def test_mce_is_relative_to_the_source_model():
    scores = {"fog": {"1": {"source": 60.0, "alpha=0": 70.0},
                      "5": {"source": 20.0, "alpha=0": 40.0}},
              "contrast": {"1": {"source": 50.0, "alpha=0": 50.0}}}
    ce = corruption_errors(scores)
    assert ce["source"] == {"fog": 100.0, "contrast": 100.0}
    assert ce["alpha=0"]["fog"] == pytest.approx(100 * (30 + 60) / (40 + 80))
    assert ce["alpha=0"]["contrast"] == pytest.approx(100.0)


def test_a_torchvision_layout_classifier_loads_and_a_wrong_one_is_refused(tmp_path):
    backbone = create_backbone("resnet18", norm="batchnorm")
    state = {**backbone.state_dict(), "fc.weight": torch.randn(5, 512), "fc.bias": torch.zeros(5)}
    torch.save(state, tmp_path / "resnet18.pth")
    model = SupervisedClassifier(create_backbone("resnet18", norm="batchnorm"), 5)
    assert "loaded the classifier" in load_classifier_weights(model.backbone, model.head,
                                                              tmp_path / "resnet18.pth")
    assert torch.equal(model.head.weight, state["fc.weight"])
    with pytest.raises(WeightsError, match="another class count"):
        other = SupervisedClassifier(create_backbone("resnet18", norm="batchnorm"), 7)
        load_classifier_weights(other.backbone, other.head, tmp_path / "resnet18.pth")


def test_paper_profile_needs_an_imagenet_c_folder_and_a_source_model(tmp_path):
    result = visionbench("run", "alpha-bn", "--profile", "paper", "--data-root", str(tmp_path),
                         "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2 and "gaussian_noise: corruption folder not found" in result.stderr
    for severity in range(1, 6):
        (tmp_path / "fog" / str(severity) / "n01440764").mkdir(parents=True)
    result = visionbench("run", "alpha-bn", "--profile", "paper", "--data-root", str(tmp_path),
                         "--set", "alpha_bn.corruptions=[fog]", "--out", str(tmp_path / "runs"),
                         cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "model.weights" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_paper_profile_dry_run_on_an_imagenet_c_layout_with_a_classifier_file(tmp_path):
    """The paper profile (ResNet-50 at 224 px from a local classifier file, an ImageNet-C
    folder under --data-root) as a --fast-dev-run, on one corruption and severity of a
    tiny clean set."""
    from tests.test_recipes import dry_run
    from visionbench.data.images.imagenet_c import prepare_corrupted
    from visionbench.data.images.shapes import prepare_shapes
    from visionbench.runner.core import save_encoder

    shapes = prepare_shapes(image_size=48, seed=0, train_per_class=1, val_per_class=1,
                            test_per_class=2, cache_dir=tmp_path / "cache")
    root = prepare_corrupted(shapes / "test", tmp_path / "imagenet-c", seed=0,
                             corruptions=("gaussian_noise",), severities=(1,))
    classifier = tmp_path / "resnet50_source.safetensors"
    save_encoder(SupervisedClassifier(create_backbone("resnet50"), 10), classifier)
    run, status = dry_run(tmp_path, "alpha-bn", "--profile", "paper", "--data-root", str(root),
                          "--set", f"model.weights={classifier}")
    assert not (run / "source" / "result.json").exists()  # the given file, not trained here
    assert "alpha_bn:gaussian_noise" in status["stages"]

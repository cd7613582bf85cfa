import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from visionbench.backbones import create_backbone
from visionbench.data.images.scenes import SCENE_CLASSES, generate_scenes, load_scenes
from visionbench.errors import ConfigError, DataError
from visionbench.evals.detection import (
    InfiniteFlipSampler,
    build_detector,
    detection_ci,
    detection_metrics,
    detectron2_param_groups,
    precise_bn_update,
    run_detection,
    scaled_sizes,
    set_mode,
    warmup_multistep_lr,
)

TINY = dict(fpn_channels=32, box_fc_dim=64, rpn_batch_size=64, roi_batch_size=32)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "s", image_size=64, seed=0,
                           n_trainval=6, n_test=3)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet18")


def is_frozen_bn(module: nn.Module) -> bool:
    return type(module).__name__.startswith("FrozenBatchNorm") or isinstance(module, TVFrozenBN)


def test_perfect_predictions_score_100_and_difficult_objects_are_ignored() -> None:
    targets = [
        {"image_id": "a", "boxes": [[0, 0, 10, 10], [20, 20, 40, 45]], "labels": [1, 2],
         "difficult": [False, False]},
        {"image_id": "b", "boxes": [[5, 5, 30, 30], [1, 1, 4, 4]], "labels": [2, 3],
         "difficult": [False, True]},  # the difficult one is never predicted
        {"image_id": "c", "boxes": [], "labels": [], "difficult": []},
    ]
    perfect = [{"image_id": t["image_id"], "boxes": [b for b, d in zip(t["boxes"], t["difficult"],
                                                                        strict=True) if not d],
                "scores": [1.0] * sum(not d for d in t["difficult"]),
                "labels": [lab for lab, d in zip(t["labels"], t["difficult"], strict=True)
                           if not d]} for t in targets]
    scores = detection_metrics(perfect, targets)
    assert scores["ap"] == pytest.approx(100) and scores["ap50"] == pytest.approx(100)
    assert scores["ap75"] == pytest.approx(100)
    assert set(scores["per_class_ap"]) == {1, 2, 3}
    assert scores["per_class_ap"][1] == pytest.approx(100)
    # a confident false positive and a shifted box cost AP
    worse = [dict(p) for p in perfect]
    worse[2] = {"image_id": "c", "boxes": [[0, 0, 9, 9]], "scores": [1.0], "labels": [1]}
    worse[0] = {**perfect[0], "boxes": [[0, 0, 10, 10], [23, 24, 43, 49]], "scores": [0.9, 0.9]}
    hurt = detection_metrics(worse, targets)
    assert hurt["ap50"] < 100 and hurt["ap"] < hurt["ap50"]
    with pytest.raises(ConfigError, match="paired"):
        detection_metrics(perfect[::-1], targets)


def test_warmup_multistep_lr_is_detectron2s() -> None:
    lr = [warmup_multistep_lr(s, 0.02, [18000, 22000], 0.1, 100, 1e-3) for s in
          (0, 50, 100, 17999, 18000, 22000, 23999)]
    assert lr[0] == pytest.approx(0.02 * 1e-3)
    assert lr[1] == pytest.approx(0.02 * (1e-3 * 0.5 + 0.5))
    assert lr[2:] == pytest.approx([0.02, 0.02, 0.002, 0.0002, 0.0002])


def test_sizes_scale_with_the_test_size() -> None:
    assert scaled_sizes(800, None, None) == (tuple(range(480, 801, 32)), 1333)
    sizes, max_size = scaled_sizes(64, None, None)
    assert sizes[0] == 38 and sizes[-1] == 64 and max_size == 107
    assert scaled_sizes(64, [64], 80) == ((64,), 80)


def test_syncbn_fpn_trains_everything_with_norm_in_fpn_and_4conv1fc_head() -> None:
    model = build_detector(resnet18(), 3, **TINY)
    body = model.backbone.body
    assert all(p.requires_grad for p in model.parameters())
    assert not any(is_frozen_bn(m) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    head_convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(head_convs) == 4
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert list(body.keys())[-1] == "layer4"
    groups = detectron2_param_groups(model, 1e-4)
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert id(body.bn1.weight) not in decay and id(body.bn1.bias) not in decay
    assert id(body.conv1.weight) in decay
    assert id(model.roi_heads.box_predictor.cls_score.bias) in decay


def test_frozen_norm_freezes_bn_stem_and_layer1_like_detectron2() -> None:
    model = build_detector(resnet18(), 3, norm="frozen", **TINY)
    body = model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert is_frozen_bn(body.bn1)
    assert not any(p.requires_grad for n in ("conv1", "layer1") for p in
                   getattr(body, n).parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    trainable = build_detector(resnet18(), 3, norm="frozen", trainable_layers=5, **TINY)
    assert all(p.requires_grad for p in trainable.parameters())


def test_c4_puts_res5_with_extra_norm_in_the_box_head_and_trains_a_step(scenes: Path) -> None:
    backbone = resnet18()
    model = build_detector(backbone, len(SCENE_CLASSES), arch="c4", image_size=64,
                           roi_batch_size=16, rpn_batch_size=32)
    assert model.roi_heads.box_head.res5 is backbone.layer4
    assert isinstance(model.roi_heads.box_head.norm, nn.BatchNorm2d)
    assert "layer4" not in dict(model.backbone.named_children())
    sample = load_scenes(scenes, "trainval")[0]
    image = torch.rand(3, 64, 64)
    set_mode(model, True)
    losses = model([image], [{"boxes": sample["boxes"], "labels": sample["labels"]}])
    sum(losses.values()).backward()
    assert backbone.layer4[0].conv1.weight.grad is not None


def test_the_ranks_of_the_sampler_share_one_seeded_stream() -> None:
    import itertools

    def take(sampler, n):
        return list(itertools.islice(iter(sampler), n))

    whole = take(InfiniteFlipSampler(range(5), seed=3), 12)  # past one permutation
    ranks = [take(InfiniteFlipSampler(range(5), seed=3, rank=r, world=3), 4) for r in range(3)]
    assert [ranks[i % 3][i // 3] for i in range(12)] == whole
    assert sorted(i for i, _ in whole[:5]) == list(range(5))  # a permutation, then the next
    with pytest.raises(ValueError, match="rank 2"):
        InfiniteFlipSampler(range(5), seed=0, rank=2, world=2)


def test_precise_bn_recomputes_statistics_and_restores_momentum() -> None:
    model = build_detector(resnet18(), 2, image_size=64, **TINY)
    set_mode(model, True)
    bn = model.backbone.body.bn1
    before = bn.running_mean.clone()
    batch = ([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
                                        "labels": torch.tensor([1]), "difficult": None}])
    assert precise_bn_update(model, iter([batch, batch]), 2, torch.device("cpu")) > 0
    assert not torch.equal(bn.running_mean, before) and bn.momentum == 0.1
    assert int(bn.num_batches_tracked) == 2


def test_run_detection_trains_and_reports_ap_in_percent(scenes: Path) -> None:
    train, test = load_scenes(scenes, "trainval"), load_scenes(scenes, "test")
    result = run_detection(resnet18(), train, test, len(SCENE_CLASSES), image_size=64,
                           max_steps=3, batch_size=2, precise_bn_iters=1, log_every=2,
                           class_names=SCENE_CLASSES, **TINY)
    assert result["protocol"] == "detection"
    assert set(result["metrics"]) == {"ap", "ap50", "ap75"}
    for value in result["metrics"].values():
        assert 0.0 <= value <= 100.0
    assert [h["step"] for h in result["history"]] == [2, 3]
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert result["history"][0]["lr"] == pytest.approx(0.02 * 2 / 16)
    assert len(result["predictions"]) == len(test) == len(result["targets"])
    first = result["predictions"][0]
    assert set(first) == {"image_id", "boxes", "scores", "labels"}
    assert first["image_id"] == test.ids[0]
    assert all(len(b) == 4 and 0 <= b[0] <= b[2] <= 64 for b in first["boxes"])
    again = detection_metrics(result["predictions"], result["targets"])
    assert {k: again[k] for k in ("ap", "ap50", "ap75")} == result["metrics"]
    assert set(result["per_class_ap"]) <= set(SCENE_CLASSES)
    config = result["config"]
    assert config["train_sizes"][-1] == 64 and config["lr_milestones"] == [2, 3]
    assert config["trainable_layers"] == 5 and config["precise_bn_iters"] == 1


def test_run_detection_rejects_bad_setups(scenes: Path) -> None:
    train = load_scenes(scenes, "trainval")
    with pytest.raises(ConfigError, match="exactly one"):
        run_detection(resnet18(), train, train, 10, image_size=64)
    with pytest.raises(ConfigError, match="timm ResNet"):
        run_detection(nn.Sequential(nn.Conv2d(3, 8, 3)), train, train, 10, max_steps=1)
    with pytest.raises(DataError, match=r"labels must be in 1\.\.2"):
        run_detection(resnet18(), train, train, 2, image_size=64, max_steps=1, batch_size=6,
                      **TINY)


def noisy_detections(n_images: int, seed: int = 0):
    """Boxes near the truth with random scores and labels: an AP well inside (0, 100)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for i in range(n_images):
        k = int(rng.integers(1, 4))
        corner = rng.uniform(0, 100, (k, 2))
        targets.append({"image_id": str(i), "boxes": np.hstack([corner, corner + 20]).tolist(),
                        "labels": rng.integers(1, 4, k).tolist(),
                        "difficult": (rng.uniform(size=k) < 0.1).tolist()})
        near = corner[rng.integers(0, k, 8)] + rng.normal(0, 3, (8, 2))
        preds.append({"image_id": str(i), "boxes": np.hstack([near, near + 20]).tolist(),
                      "scores": rng.uniform(0, 1, 8).tolist(),
                      "labels": rng.integers(1, 4, 8).tolist()})
    return preds, targets


def test_detection_ci_brackets_torchmetrics_ap_and_shrinks_with_more_images() -> None:
    from visionbench.evals.detection import _ap_triple, _coco_evaluated

    preds, targets = noisy_detections(40)
    point = detection_metrics(preds, targets)
    evaluator = _coco_evaluated(preds, targets)  # the resamples' evaluator, no resample
    evaluator.accumulate()
    assert _ap_triple(evaluator) == pytest.approx(
        (point["ap"], point["ap50"], point["ap75"]), abs=1e-4)  # torchmetrics is float32
    small = detection_ci(preds, targets, n_resamples=200, seed=0)
    for key in ("ap", "ap50", "ap75"):
        low, high = small[key]
        assert low < point[key] < high
    assert detection_ci(preds, targets, n_resamples=200, seed=0) == small  # seeded
    many_preds, many_targets = noisy_detections(400, seed=1)
    narrow = detection_ci(many_preds, many_targets, n_resamples=200, seed=0)
    assert narrow["ap50"][1] - narrow["ap50"][0] < small["ap50"][1] - small["ap50"][0]
    with pytest.raises(ConfigError, match="resamples"):
        detection_ci(preds, targets, n_resamples=0)

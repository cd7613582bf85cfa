import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from visionbench.errors import ConfigError
from visionbench.evals.finetune import (
    FineTuneClassifier,
    param_groups_lrd,
    run_finetune,
)
from visionbench.methods.schedule import half_cycle_cosine
from visionbench.results.bootstrap import decode_hits


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0)


def group_of(groups, param):
    matches = [g for g in groups if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


def test_layer_decay_scales_and_weight_decay():
    vit = tiny_vit()  # depth 2 -> num_layers 3
    groups = param_groups_lrd(vit, weight_decay=0.05, layer_decay=0.5,
                              no_weight_decay_list=vit.no_weight_decay())
    cls = group_of(groups, vit.cls_token)
    assert cls["lr_scale"] == pytest.approx(0.5 ** 3) and cls["weight_decay"] == 0.0
    assert group_of(groups, vit.patch_embed.proj.weight)["lr_scale"] == pytest.approx(0.5 ** 3)
    block1 = group_of(groups, vit.blocks[1].attn.qkv.weight)
    assert block1["lr_scale"] == pytest.approx(0.5 ** 1) and block1["weight_decay"] == 0.05
    assert group_of(groups, vit.blocks[1].attn.qkv.bias)["weight_decay"] == 0.0
    assert group_of(groups, vit.blocks[0].norm1.weight)["weight_decay"] == 0.0
    final_norm = group_of(groups, vit.norm.weight)
    assert final_norm["lr_scale"] == 1.0 and final_norm["weight_decay"] == 0.0
    assert all("lr_scale" in g for g in groups)


def test_layer_decay_on_the_wrapped_classifier_puts_the_head_on_top():
    model = FineTuneClassifier(tiny_vit(), num_classes=3, base_lr=1e-3, layer_decay=0.75,
                               warmup_epochs=1, epochs=2)
    groups = param_groups_lrd(model, 0.05, 0.75, model.backbone.no_weight_decay())
    assert group_of(groups, model.backbone.cls_token)["lr_scale"] == pytest.approx(0.75 ** 3)
    assert group_of(groups, model.backbone.cls_token)["weight_decay"] == 0.0
    assert group_of(groups, model.backbone.blocks[1].mlp.fc1.weight)["lr_scale"] == (
        pytest.approx(0.75 ** 1))
    head = group_of(groups, model.head.weight)
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    assert group_of(groups, model.fc_norm.weight)["weight_decay"] == 0.0
    assert isinstance(model.backbone.norm, torch.nn.Identity)  # MAE drops it with global_pool
    assert model.head.weight.std() < 1e-4


def test_lr_at_follows_warmup_then_half_cycle_cosine():
    base, low, warm, total = 0.1, 1e-6, 5, 50
    assert half_cycle_cosine(0.0, base, low, warm, total) == 0.0
    assert half_cycle_cosine(2.5, base, low, warm, total) == pytest.approx(base * 2.5 / 5)
    assert half_cycle_cosine(5.0, base, low, warm, total) == pytest.approx(base)
    mid = 5 + 45 * 0.3
    assert half_cycle_cosine(mid, base, low, warm, total) == pytest.approx(
        low + (base - low) * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert half_cycle_cosine(50.0, base, low, warm, total) == pytest.approx(low)
    assert half_cycle_cosine(0.0, base, low, 0, total) == pytest.approx(base)


def test_run_finetune_one_epoch(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 16, 16, generator=g)
    labels = torch.arange(24) % 3
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    cfg = {"base_lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.75, "warmup_epochs": 0,
           "epochs": 1, "min_lr": 1e-6, "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0,
           "global_pool": True, "seed": 0}
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                      "enable_model_summary": False, "num_sanity_val_steps": 0}
    result = run_finetune(tiny_vit(), loader, loader, loader, 3, cfg, trainer_kwargs, tmp_path)
    assert set(result) == {"test_top1", "test_top5", "test_loss", "epochs", "history",
                           "samples", "ci"}
    hits = decode_hits(result["samples"]["top1"])
    assert result["samples"]["n"] == 24
    assert 100.0 * hits.mean() == pytest.approx(result["test_top1"], abs=1e-4)
    low, high = result["ci"]["top1"]
    assert low <= result["test_top1"] + 1e-9 <= high + 2e-9
    assert result["epochs"] == 1 and result["test_loss"] > 0
    assert 0.0 <= result["test_top1"] <= result["test_top5"] <= 100.0
    assert result["test_top5"] == pytest.approx(100.0)  # top-min(5, 3) of 3 classes
    assert len(result["history"]) == 1
    entry = result["history"][0]
    assert entry["epoch"] == 0
    assert math.isfinite(entry["train_loss"]) and 0.0 <= entry["val_top1"] <= 100.0


def test_lr_is_set_per_step_with_scales(tmp_path):
    import lightning as L

    images = torch.randn(16, 3, 16, 16)
    loader = DataLoader(TensorDataset(images, torch.arange(16) % 2), batch_size=4)
    model = FineTuneClassifier(tiny_vit(), 2, base_lr=0.01, warmup_epochs=1, epochs=2,
                               global_pool=False, label_smoothing=0.0)
    seen = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append({g["lr_scale"]: g["lr"] for g in optimizer.param_groups})

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()],
                        default_root_dir=tmp_path)
    trainer.fit(model, loader)
    fractions = [e + b / 4 for e in range(2) for b in range(4)]
    assert len(seen) == len(fractions)
    for recorded, fraction in zip(seen, fractions, strict=True):
        for scale, lr in recorded.items():
            assert lr == pytest.approx(half_cycle_cosine(fraction, 0.01, 1e-6, 1, 2) * scale)


def test_finetune_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="base_lr"):
        run_finetune(tiny_vit(), None, None, None, 3, {"epochs": 1}, {}, tmp_path)
    with pytest.raises(ConfigError, match="layer_decy"):
        run_finetune(tiny_vit(), None, None, None, 3,
                     {"epochs": 1, "base_lr": 1e-3, "layer_decy": 0.7}, {}, tmp_path)


def test_resnet_backbone_gets_a_linear_head_and_no_layer_decay():
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=0)
    model = FineTuneClassifier(resnet, 3, base_lr=1e-3, warmup_epochs=1, epochs=2)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    groups = param_groups_lrd(model, 0.05, 0.75, ())
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_cls_token_head_without_global_pool():
    vit = tiny_vit()
    model = FineTuneClassifier(vit, 3, base_lr=1e-3, warmup_epochs=1, epochs=2,
                               global_pool=False).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.head(vit.forward_features(images)[:, 0])
        torch.testing.assert_close(model(images), expected)
    assert not isinstance(vit.norm, torch.nn.Identity)


def test_video_views_are_scored_by_their_mean_softmax_as_the_official_merge():
    from visionbench.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("video_vit_small_patch16_224", img_size=16, patch_size=8,
                               num_frames=2, embed_dim=16, depth=1, num_heads=2)
    model = FineTuneClassifier(backbone, 4, base_lr=1e-3, input_key="video").eval()
    views = torch.randn(3, 6, 3, 2, 16, 16)  # 3 clips x (2 segments x 3 crops)
    with torch.no_grad():
        per_view = torch.stack([model(views[:, v]).softmax(-1) for v in range(6)], dim=1)
        averaged = model.view_averaged_logits(views)
        single = model.view_averaged_logits(views[:, 0])
    assert torch.allclose(averaged.exp(), per_view.mean(dim=1), atol=1e-6)
    assert torch.allclose(single, model(views[:, 0]))  # no view axis: plain logits
    labels = torch.tensor([0, 1, 2])
    expected = -per_view.mean(dim=1)[torch.arange(3), labels].log()
    assert torch.allclose(F.cross_entropy(averaged, labels, reduction="none"), expected,
                          atol=1e-5)
    with pytest.raises(ConfigError, match="input_key"):
        FineTuneClassifier(backbone, 4, base_lr=1e-3, input_key="points")


def test_repeated_augmentation_trains_each_draw_with_its_clips_label():
    from visionbench.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("video_vit_small_patch16_224", img_size=16, patch_size=8,
                               num_frames=2, embed_dim=16, depth=1, num_heads=2)
    model = FineTuneClassifier(backbone, 4, base_lr=1e-3, input_key="video",
                               label_smoothing=0.0).eval()
    model.log = lambda *args, **kwargs: None
    draws = torch.randn(3, 2, 3, 2, 16, 16)  # 3 clips x 2 draws (num_sample 2)
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        loss = model.training_step({"video": draws, "label": labels}, 0)
        flat = model(draws.reshape(6, 3, 2, 16, 16))
    expected = F.cross_entropy(flat, torch.tensor([0, 0, 3, 3, 1, 1]))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_cutmix_of_clips_cuts_frames_and_rows_as_the_official_call_of_timm_mixup():
    from visionbench.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("video_vit_small_patch16_224", img_size=16, patch_size=8,
                               num_frames=4, embed_dim=16, depth=1, num_heads=2)
    model = FineTuneClassifier(backbone, 4, base_lr=1e-3, input_key="video", mixup=0.0,
                               cutmix=1.0)
    clips = torch.stack([torch.zeros(3, 4, 16, 16), torch.ones(3, 4, 16, 16)])
    for seed in range(20):
        torch.manual_seed(seed)
        np.random.seed(seed)
        mixed, soft = model.mix(clips.clone(), torch.tensor([0, 1]))
        cut = mixed[0] != 0  # (C, T, H, W): where clip 0 took clip 1's values
        if not cut.any():
            continue
        assert (cut == cut[:, :, :, :1]).all()  # whole rows along W: axes T and H were cut
        assert soft.shape == (2, 4)
        return
    raise AssertionError("no cut in 20 draws")

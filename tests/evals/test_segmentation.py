import lightning as L
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_confusion_matrix

from visionbench.errors import ConfigError
from visionbench.evals.finetune import param_groups_lrd
from visionbench.evals.segmentation import (
    LLFPN,
    LinearProbeModel,
    SegmentationFineTuner,
    SegmentationModel,
    poly_lr,
    predict_masks,
    probe_blocks,
    run_segmentation,
    segmentation_loss,
    segmentation_metrics,
    slide_inference,
)
from visionbench.results import bootstrap
from visionbench.results.bootstrap import decode_confusion


def tiny_vit(img_size: int = 32, patch_size: int = 8, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=4,
                             num_heads=2, num_classes=0, **kwargs)


def group_of(groups, param):
    matches = [g for g in groups if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


def test_llfpn_scales_and_channels_for_patch_16_and_8():
    grid = torch.randn(2, 32, 4, 4)  # a 64 px image with patch 16
    maps = LLFPN(32, patch_size=16)(grid)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4),
                                              (2, 32, 2, 2)]  # strides 4, 8, 16, 32 of 64 px
    fpn1 = LLFPN(32, patch_size=16).scales[0]
    assert [type(m) for m in fpn1] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU,
                                       nn.ConvTranspose2d]
    grid8 = torch.randn(2, 32, 8, 8)  # a 64 px image with patch 8
    assert [m.shape[-1] for m in LLFPN(32, patch_size=8)(grid8)] == [16, 8, 4, 2]
    with pytest.raises(ConfigError, match="patch size"):
        LLFPN(32, patch_size=14)


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_segmentation_model_outputs_logits_at_input_size(head):
    model = SegmentationModel(tiny_vit(img_size=64, patch_size=16), num_classes=5, head=head,
                              channels=16, aux_channels=8)
    images = torch.randn(2, 3, 64, 64)
    logits, aux = model.forward_with_aux(images)
    assert logits.shape == aux.shape == (2, 5, 64, 64)
    assert model(images).shape == (2, 5, 64, 64)
    assert isinstance(model.backbone.norm, nn.Identity)
    pyramid = model.pyramid(images)
    assert [m.shape[-1] for m in pyramid] == [16, 8, 4, 2]
    assert all(m.shape[1] == 32 for m in pyramid)
    # LL-FPN reads the last block: changing an earlier block's output changes the pyramid,
    # and the raw token map (no final norm) is what the identity level shows
    tokens = model.backbone.forward_features(images)[:, 1:]
    assert torch.allclose(pyramid[2], tokens.transpose(1, 2).reshape(2, 32, 4, 4), atol=1e-6)


def test_probe_blocks_match_the_official_indices():
    assert probe_blocks(12) == [3, 5, 7, 11]
    assert probe_blocks(24) == [7, 11, 15, 23]
    assert probe_blocks(4) == [0, 1, 2, 3]
    assert probe_blocks(6)[-1] == 5 and probe_blocks(1) == [0]


def test_miou_against_a_hand_computed_confusion_matrix():
    # 4 classes; class 3 never appears in labels nor predictions (absent); one ignored pixel
    target = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 255]])
    preds = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 3]])  # the 3 sits on the ignored pixel
    # confusion (rows label, cols pred): [[2,1,0],[0,2,1],[1,0,1]]
    # IoU0 = 2/(3+3-2) = 0.5, IoU1 = 2/(3+3-2) = 0.5, IoU2 = 1/(2+2-1) = 1/3
    scores = segmentation_metrics(preds, target, num_classes=4)
    expected = [50.0, 50.0, 100 / 3]
    assert scores["per_class_iou"][:3] == pytest.approx(expected)
    assert scores["per_class_iou"][3] is None
    assert scores["miou"] == pytest.approx(sum(expected) / 3)
    assert scores["pixel_acc"] == pytest.approx(5 / 8 * 100)
    jaccard = MulticlassJaccardIndex(4, average="macro", ignore_index=255)
    assert float(jaccard(preds, target)) * 100 == pytest.approx(scores["miou"])
    logits = torch.nn.functional.one_hot(preds, 4).permute(0, 2, 1).float()  # (B, C, N)
    assert segmentation_metrics(logits, target, 4)["miou"] == pytest.approx(scores["miou"])


def test_slide_equals_whole_when_the_crop_is_the_image():
    model = SegmentationModel(tiny_vit(), num_classes=3, channels=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(images)
        slide = slide_inference(model, images, crop=32, stride=21, num_classes=3)
    assert torch.allclose(slide, whole, atol=1e-6)


def test_slide_normalizes_overlapping_windows_by_their_count():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)  # translation-equivariant: any window gives the same pixels
    images = torch.randn(2, 3, 30, 37)
    calls = []

    def model(x):
        calls.append(tuple(x.shape[-2:]))
        return conv(x)

    with torch.no_grad():
        slide = slide_inference(model, images, crop=16, stride=10, num_classes=4)
        assert torch.allclose(slide, conv(images), atol=1e-6)
        ones = slide_inference(lambda x: torch.ones(x.shape[0], 2, *x.shape[-2:]), images,
                               crop=(16, 16), stride=(10, 10), num_classes=2)
    assert torch.allclose(ones, torch.ones_like(ones))
    # mmseg's grid: rows (30-16+9)//10+1 = 3, cols (37-16+9)//10+1 = 4, every crop full size
    assert len(calls) == 12 and set(calls) == {(16, 16)}


def test_poly_lr_with_linear_warmup_follows_mmcv():
    base, total, warm, ratio = 1e-4, 100, 10, 1e-6
    assert poly_lr(0, base, total, 1.0, 0.0, warm, ratio) == pytest.approx(base * ratio)
    poly5 = base * (1 - 5 / 100)
    assert poly_lr(5, base, total, 1.0, 0.0, warm, ratio) == pytest.approx(
        poly5 * (1 - 0.5 * (1 - ratio)))
    assert poly_lr(10, base, total, 1.0, 0.0, warm, ratio) == pytest.approx(base * 0.9)
    assert poly_lr(60, base, total, 1.0, 0.0, warm, ratio) == pytest.approx(base * 0.4)
    assert poly_lr(60, base, total, 0.9, 1e-6, 0) == pytest.approx(
        (base - 1e-6) * 0.4 ** 0.9 + 1e-6)
    assert poly_lr(100, base, total, 1.0, 0.0, warm, ratio) == 0.0


def test_layer_decay_groups_put_neck_and_heads_at_full_lr():
    model = SegmentationModel(tiny_vit(), num_classes=3, channels=16)  # depth 4
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.85)
    backbone = model.backbone
    assert group_of(groups, backbone.patch_embed.proj.weight)["lr_scale"] == pytest.approx(
        0.85 ** 5)
    cls = group_of(groups, backbone.cls_token)
    assert cls["lr_scale"] == pytest.approx(0.85 ** 5)
    assert cls["weight_decay"] == 0.05  # the official constructor decays cls/pos too
    assert group_of(groups, backbone.blocks[0].attn.qkv.weight)["lr_scale"] == pytest.approx(
        0.85 ** 4)
    assert group_of(groups, backbone.blocks[3].mlp.fc2.weight)["lr_scale"] == pytest.approx(
        0.85)
    assert group_of(groups, backbone.blocks[3].mlp.fc2.bias)["weight_decay"] == 0.0
    neck = group_of(groups, model.neck.scales[0].weight)  # patch 8: one ConvTranspose
    assert neck["lr_scale"] == 1.0 and neck["weight_decay"] == 0.05
    assert group_of(groups, model.decode_head.classifier[1].weight)["lr_scale"] == 1.0
    assert group_of(groups, model.aux_head.conv[0].weight)["lr_scale"] == 1.0


def test_linear_probe_backbone_is_frozen_and_gets_no_gradient():
    model = LinearProbeModel(tiny_vit(drop_path_rate=0.5), num_classes=3)
    assert model.blocks == [0, 1, 2, 3]
    assert model.classifier[1].in_channels == 4 * 32
    model.train()
    assert model.training and not model.backbone.training
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    segmentation_loss(model(images), masks).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert model.classifier[1].weight.grad is not None
    module = SegmentationFineTuner(model, 3, layer_decay=None)
    optimizer = module.configure_optimizers()
    (group,) = optimizer.param_groups
    assert len(group["params"]) == 2 and group["weight_decay"] == 0.05
    with torch.no_grad():  # eval-mode backbone: drop path off, two passes agree
        assert torch.equal(model(images), model(images))


def test_loss_averages_over_all_pixels_like_mmseg():
    logits = torch.zeros(1, 2, 1, 4)
    target = torch.tensor([[[0, 1, 255, 255]]])
    assert float(segmentation_loss(logits, target)) == pytest.approx(
        2 * torch.log(torch.tensor(2.0)).item() / 4)
    assert float(segmentation_loss(logits, torch.full_like(target, 255))) == 0.0


def square_set(count: int = 16, size: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = 0.1 * torch.randn(count, 3, size, size, generator=generator)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    for i in range(count):
        y, x = torch.randint(0, size - 12, (2,), generator=generator).tolist()
        images[i, :, y:y + 12, x:x + 12] += 1.0
        masks[i, y:y + 12, x:x + 12] = 1
    masks[:, 0, 0] = 255
    return TensorDataset(images, masks)


class LrRecorder(L.Callback):
    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append((trainer.global_step, [(g["lr"], g.get("lr_scale", 1.0))
                                                for g in optimizer.param_groups]))


def test_run_segmentation_finetune_two_epochs(tmp_path):
    loader = DataLoader(square_set(), batch_size=4, shuffle=True)
    test_loader = DataLoader(square_set(), batch_size=4)
    recorder = LrRecorder()
    cfg = {"epochs": 2, "lr": 1e-3, "channels": 16, "aux_channels": 8, "crop": 32,
           "stride": 21, "seed": 0}
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                      "enable_model_summary": False, "callbacks": [recorder]}
    result = run_segmentation(tiny_vit(), loader, test_loader, num_classes=2, protocol="finetune",
                              cfg=cfg, out_dir=tmp_path, trainer_kwargs=trainer_kwargs,
                              keep_model=True)
    assert {"miou", "per_class_iou", "pixel_acc", "epochs", "steps", "history", "samples",
            "ci"} <= set(result)
    confusion = decode_confusion(result["samples"]["confusion"], 2)
    assert confusion.shape == (16, 2, 2)  # one matrix per test image
    assert int(confusion.sum()) == 16 * (32 * 32 - 1)  # every labelled pixel, once
    assert bootstrap.miou(confusion.sum(0)) == pytest.approx(result["miou"])
    assert bootstrap.pixel_accuracy(confusion.sum(0)) == pytest.approx(result["pixel_acc"])
    for metric in ("miou", "pixel_acc"):
        low, high = result["ci"][metric]
        assert low <= result[metric] + 1e-9 and result[metric] <= high + 1e-9
    assert result["epochs"] == 2 and result["steps"] == 8
    assert len(result["per_class_iou"]) == 2 and 0.0 <= result["miou"] <= 100.0
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    warmup = round(0.1 * 8)
    for step, groups in recorder.seen:
        lr = poly_lr(step, 1e-3, 8, 1.0, 0.0, warmup, 1e-6)
        assert all(g_lr == pytest.approx(lr * scale) for g_lr, scale in groups)
    assert [step for step, _ in recorder.seen] == list(range(8))
    drop = result["model"].backbone.blocks[-1].drop_path1
    assert drop.drop_prob == pytest.approx(0.1)
    masks = predict_masks(result["model"], square_set(2).tensors[0])
    assert masks.shape == (2, 32, 32) and masks.dtype == torch.long


def test_run_segmentation_linear_probe_two_steps(tmp_path):
    loader = DataLoader(square_set(8), batch_size=4)
    backbone = tiny_vit()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = run_segmentation(backbone, loader, loader, 2, protocol="linear",
                              cfg={"max_steps": 2, "inference": "whole"}, out_dir=tmp_path,
                              trainer_kwargs={"accelerator": "cpu", "devices": 1,
                                              "enable_progress_bar": False,
                                              "enable_model_summary": False})
    assert result["steps"] == 2 and result["miou"] == result["miou"]  # not NaN
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_segmentation_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        run_segmentation(tiny_vit(), None, None, 2, cfg={}, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        run_segmentation(tiny_vit(), None, None, 2, cfg={"epochs": 1, "layer_decy": 0.8},
                         out_dir=tmp_path)
    with pytest.raises(ConfigError, match="protocol"):
        run_segmentation(tiny_vit(), None, None, 2, protocol="knn", cfg={"epochs": 1},
                         out_dir=tmp_path)
    with pytest.raises(ConfigError, match="head"):
        run_segmentation(tiny_vit(), None, None, 2, cfg={"epochs": 1, "head": "deeplab"},
                         out_dir=tmp_path)


def test_inputs_below_the_coarsest_stride_are_refused():
    model = SegmentationModel(tiny_vit(img_size=16, patch_size=8), num_classes=2, channels=8)
    with pytest.raises(ConfigError, match="at least 32 px"):
        model(torch.randn(2, 3, 16, 16))


def test_test_step_scores_at_the_label_resolution():
    """Logits are resized (bilinear) to the mask's size, as mmseg's rescale to ori_shape."""
    from visionbench.evals.segmentation import SegmentationFineTuner

    class Halves(nn.Module):  # class 0 left, class 1 right, at the input's resolution
        num_classes = 2

        def forward(self, images):
            b, _, h, w = images.shape
            logits = torch.zeros(b, 2, h, w)
            logits[:, 0, :, : w // 2] = 5
            logits[:, 1, :, w // 2:] = 5
            return logits

    module = SegmentationFineTuner(Halves(), 2, inference="whole")
    masks = torch.zeros(1, 16, 24, dtype=torch.long)
    masks[..., 12:] = 1
    module.test_step((torch.randn(1, 3, 8, 12), masks), 0)
    confmat = module.test_confmat.compute()
    assert int(confmat.sum()) == 16 * 24  # every label pixel scored
    assert torch.equal(confmat, torch.tensor([[16 * 12, 0], [0, 16 * 12]]))
    per_image = decode_confusion(module.test_confusions, 2)
    assert per_image.tolist() == [[[16 * 12, 0], [0, 16 * 12]]]


def test_per_image_confusion_sums_to_the_test_set_matrix():
    from visionbench.evals.segmentation import per_image_confusion
    from visionbench.evals.segmentation import segmentation_metrics as metrics

    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 3, (4, 6, 5), generator=g)
    targets = torch.randint(0, 3, (4, 6, 5), generator=g)
    targets[0, 0, :] = 255
    per_image = per_image_confusion(preds, targets, 3)
    assert per_image.shape == (4, 3, 3) and int(per_image[0].sum()) == 25
    whole = multiclass_confusion_matrix(preds, targets, 3, ignore_index=255)
    assert torch.equal(per_image.sum(0), whole)
    assert bootstrap.miou(per_image.sum(0).numpy()) == pytest.approx(
        metrics(preds, targets, 3)["miou"])

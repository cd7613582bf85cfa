"""SoftCon's released backbones (zhu-xlab/softcon README): a torchvision ResNet-50 with a
13-band (or 2-band SAR) ``conv1`` and ``fc = Identity``, and DINOv2 ViT-S/14 / ViT-B/14
(``models/dinov2/vision_transformer.py``: ``img_size=224, patch_size=14, in_chans=13,
init_values=1e-5, num_register_tokens=0, block_chunks=0``), loaded strictly by their own
keys. Files built here in those layouts load into our backbones with the same outputs."""

import pytest
import torch
import torchvision

from visionbench.backbones import create_backbone, load_backbone_weights


@pytest.mark.parametrize("bands", [13, 2])  # B13_rn50_softcon.pth, B2_rn50_softcon.pth (SAR)
def test_a_softcon_resnet50_file_loads_strictly_and_gives_the_same_features(tmp_path, bands):
    torch.manual_seed(0)
    official = torchvision.models.resnet50()
    official.conv1 = torch.nn.Conv2d(bands, 64, kernel_size=7, stride=2, padding=3,
                                     bias=False)
    official.fc = torch.nn.Identity()
    state = official.state_dict()
    assert len(state) == 318 and not any(k.startswith("fc.") for k in state)
    path = tmp_path / f"B{bands}_rn50_softcon.pth"
    torch.save(state, path)
    ours = create_backbone("resnet50", in_chans=bands)
    report = load_backbone_weights(ours, path, strict=True)
    assert not report.missing and not report.unexpected
    x = torch.randn(2, bands, 64, 64)
    official.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x))


def test_a_softcon_vit_s14_file_loads_with_its_mask_token_set_aside(tmp_path):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch14_dinov2", img_size=224, in_chans=13,
                                  num_classes=0).eval()
    state = {k: v.normal_() if k != "pos_embed" else v for k, v in
             reference.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)  # DINOv2's, always in the official state
    shapes = {"cls_token": (1, 1, 384), "pos_embed": (1, 257, 384), "mask_token": (1, 384),
              "patch_embed.proj.weight": (384, 13, 14, 14), "blocks.0.ls1.gamma": (384,),
              "blocks.11.attn.qkv.weight": (1152, 384), "blocks.11.mlp.fc1.weight": (1536, 384),
              "norm.weight": (384,)}
    assert len(state) == 175
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    path = tmp_path / "B13_vits14_softcon.pth"
    torch.save(state, path)
    ours = create_backbone("vit_small_patch14_dinov2", in_chans=13, img_size=224).eval()
    report = load_backbone_weights(ours, path, strict=True)
    assert report.set_aside == ["mask_token"] and not report.missing
    reference.load_state_dict({k: v for k, v in state.items() if k != "mask_token"})
    x = torch.randn(1, 13, 224, 224)
    with torch.no_grad():  # the official readout: the final-normed class token
        torch.testing.assert_close(ours.forward_features(x)[:, 0],
                                   reference.forward_features(x)[:, 0])

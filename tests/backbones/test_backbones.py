import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from visionbench.backbones import backbone_family, create_backbone, load_backbone_weights
from visionbench.errors import ConfigError, WeightsError
from visionbench.norms import build_norm

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize("size,patch,img,chans", [(16, 4, 16, 1), (24, 8, 24, 3), (32, 4, 32, 5)])
def test_vit_any_size_patch_and_channels(size, patch, img, chans):
    model = create_backbone("vit_small_patch16_224", img_size=img, patch_size=patch,
                            embed_dim=size, depth=1, num_heads=2, in_chans=chans)
    out = model.forward_features(torch.randn(2, chans, img, img))
    assert out.shape == (2, (img // patch) ** 2 + 1, size)
    assert model(torch.randn(2, chans, img, img)).shape == (2, size)  # headless


def test_norm_chosen_by_name_reaches_every_layer():
    model = create_backbone("vit_tiny_patch16_224", norm="rmsnorm", **TINY)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert norms and all(isinstance(m, nn.RMSNorm) for m in norms)
    assert len(norms) == 2 * TINY["depth"] + 1
    ln = create_backbone("vit_tiny_patch16_224", **TINY)
    assert ln.blocks[0].norm1.eps == 1e-6


def test_resnet_with_groupnorm():
    model = create_backbone("resnet18", norm="groupnorm", in_chans=1)
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 32
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_unknown_names_and_mismatched_norm_kinds():
    with pytest.raises(ConfigError, match="unknown backbone"):
        backbone_family("vit_enormous")
    with pytest.raises(ConfigError, match="unknown norm"):
        build_norm("nope", 8)
    with pytest.raises(ConfigError, match="conv norm"):
        create_backbone("vit_tiny_patch16_224", norm="groupnorm", **TINY)
    with pytest.raises(ConfigError, match="placement"):
        create_backbone("vit_tiny_patch16_224", placement="sideways", **TINY)


def test_build_norm_accepts_device_and_dtype():
    layer = build_norm("layernorm", 8, device="cpu", dtype=torch.float64)
    assert layer.weight.dtype == torch.float64


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip_from_local_files(tmp_path, suffix):
    torch.manual_seed(0)
    source = create_backbone("vit_tiny_patch16_224", **TINY)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:  # official MAE layout: wrapped under "model", with decoder keys beside
        torch.save({"model": {**state, "mask_token": torch.zeros(1, 1, 8)}, "epoch": 3}, path)
    torch.manual_seed(1)
    target = create_backbone("vit_tiny_patch16_224", **TINY)
    report = load_backbone_weights(target, path, strict=True)
    assert report.missing == [] and report.unexpected == []
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value)


def test_weights_report_missing_and_unexpected_keys(tmp_path):
    source = create_backbone("vit_tiny_patch16_224", **TINY).state_dict()
    source.pop("norm.weight")
    source["extra.weight"] = torch.zeros(1)
    source["head.weight"] = torch.zeros(10, 32)  # a fine-tuned classifier: set aside
    torch.save(source, tmp_path / "w.pth")
    target = create_backbone("vit_tiny_patch16_224", **TINY)
    report = load_backbone_weights(target, tmp_path / "w.pth")
    assert report.missing == ["norm.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.set_aside == ["head.weight"]
    assert "1 missing" in report.summary()
    with pytest.raises(WeightsError, match="do not match"):
        load_backbone_weights(target, tmp_path / "w.pth", strict=True)


def test_pos_embed_is_resized_for_another_resolution(tmp_path):
    source = create_backbone("vit_tiny_patch16_224", **TINY)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    bigger = create_backbone("vit_tiny_patch16_224", **{**TINY, "img_size": 32})
    report = load_backbone_weights(bigger, tmp_path / "w.pt", strict=True)
    assert report.resized == ["pos_embed"]


class NotATensor:
    pass


def test_weights_never_unpickle_objects_and_name_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(WeightsError, match="evil.pt: cannot load with weights_only=True"):
        load_backbone_weights(create_backbone("vit_tiny_patch16_224", **TINY), path)
    with pytest.raises(WeightsError, match="not found"):
        load_backbone_weights(create_backbone("vit_tiny_patch16_224", **TINY), tmp_path / "x.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="bad.safetensors"):
        load_backbone_weights(create_backbone("vit_tiny_patch16_224", **TINY),
                              tmp_path / "bad.safetensors")

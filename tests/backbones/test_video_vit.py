"""The video ViT family: tubelets, the official parameter names, sealing clips."""

import pytest
import torch

from visionbench.backbones import backbone_family, create_backbone
from visionbench.backbones.sealed import InputSpec, seal
from visionbench.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny(**kwargs):
    torch.manual_seed(0)
    return create_backbone("video_vit_base_patch16_224", embed_dim=32, depth=1, num_heads=2,
                           **kwargs)


def test_tubelets_of_a_16x224_clip_are_8x14x14_tokens():
    model = tiny()
    assert backbone_family("video_vit_base_patch16_224") == "video_vit"
    assert model.patch_embed.proj.kernel_size == (2, 16, 16) == model.patch_embed.proj.stride
    assert model.grid_size == (8, 14, 14) and model.pos_embed.shape == (1, 1568, 32)
    tokens = model.forward_features(torch.randn(1, 3, 16, 224, 224))
    assert tokens.shape == (1, 1568, 32)
    mask = torch.zeros(1, 1568, dtype=torch.bool)
    mask[0, :1000] = True
    assert model.forward_features(torch.randn(1, 3, 16, 224, 224), mask).shape == (1, 568, 32)


def test_parameters_carry_the_official_names_with_q_and_v_bias_only():
    keys = set(tiny(init_values=0.1).state_dict())
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.q_bias",
                "blocks.0.attn.v_bias", "blocks.0.gamma_1", "blocks.0.norm1.weight",
                "blocks.0.mlp.fc1.weight", "norm.weight"):
        assert key in keys, key
    assert not any("k_bias" in k or "qkv.bias" in k or "pos_embed" in k for k in keys)
    assert tiny().blocks[0].norm1.eps == 1e-6


def test_fused_and_explicit_attention_agree_and_bad_input_is_refused():
    model = tiny(img_size=32, num_frames=4).eval()
    clip = torch.randn(2, 3, 4, 32, 32)
    fused = model(clip)
    model.set_fused_attn(False)
    assert torch.allclose(model(clip), fused, atol=1e-5)
    with pytest.raises(ValueError, match="expected clips"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="placement"):
        create_backbone("video_vit_small_patch16_224", placement="post")
    with pytest.raises(ConfigError, match="does not apply"):
        create_backbone("video_vit_small_patch16_224", global_poool=True)


def test_a_sealed_clip_encoder_on_raw_frames_equals_it_on_normalized_ones():
    model = tiny(img_size=32, num_frames=4).eval()
    raw = torch.rand(2, 3, 4, 32, 32)
    normalized = (raw - torch.tensor(MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1, 1)
    expected = model(normalized)
    seal(model, InputSpec.of(MEAN, STD, size=32))
    assert torch.equal(model(raw), expected)
    resized = seal(tiny(img_size=32, num_frames=4).eval(), InputSpec.of(MEAN, STD, size=32))
    assert resized(torch.rand(2, 3, 4, 48, 40)).shape == (2, 32)  # each frame resized

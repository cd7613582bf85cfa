import math

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from visionbench.backbones import create_backbone
from visionbench.backbones.placements import (
    LayerNormScalingBlock,
    PeriNormBlock,
    PostNormBlock,
    mix_post_layers,
)
from visionbench.backbones.vit import (
    PLACEMENTS,
    block_placement,
    create_vit,
    mae_init_,
    model_depth,
)
from visionbench.errors import ConfigError

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
NORM_CLS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
TOKENS = (32 // 8) ** 2 + 1


def tiny_vit(placement: str, norm: str = "layernorm", **kw) -> nn.Module:
    torch.manual_seed(0)
    return create_vit(NAME, norm=norm, placement=placement, **{**TINY, **kw})


def randomize_norms_(model: nn.Module) -> None:
    """Norm weights away from 1/0, so a swapped or missing norm changes the output."""
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.data = 1 + 0.5 * torch.randn(module.weight.shape, generator=g)
            if getattr(module, "bias", None) is not None:
                module.bias.data = 0.5 * torch.randn(module.bias.shape, generator=g)


def norms_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]


def pre_ln(b, x):
    x = x + b.attn(b.norm1(x))
    return x + b.mlp(b.norm2(x))


def post_ln(b, x):
    x = b.norm1(x + b.attn(x))
    return b.norm2(x + b.mlp(x))


def peri_ln(b, x):
    x = x + b.norm1_out(b.attn(b.norm1(x)))
    return x + b.norm2_out(b.mlp(b.norm2(x)))


def lns_ln(b, x, layer):
    s = 1 / math.sqrt(layer)
    x = x + b.attn(s * b.norm1(x))
    return x + b.mlp(s * b.norm2(x))


EXPECTED = {
    "pre": lambda b, x, i: pre_ln(b, x),
    "post": lambda b, x, i: post_ln(b, x),
    "peri": lambda b, x, i: peri_ln(b, x),
    "lns": lambda b, x, i: lns_ln(b, x, i + 1),
    # depth 4, alpha 0.25: block 0 is Post-LN, blocks 1-3 Pre-LN
    "mix": lambda b, x, i: post_ln(b, x) if i == 0 else pre_ln(b, x),
}

# (placement, not the first block): LNS's first scale is 1, Mix-LN's later blocks are Pre-LN
DIFFERS_FROM_PRE = {
    ("post", False),
    ("post", True),
    ("peri", False),
    ("peri", True),
    ("mix", False),
    ("lns", True),
}


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_block_computes_its_formula(placement, norm):
    model = tiny_vit(placement, norm).double().eval()
    randomize_norms_(model)
    model.double()
    x = torch.randn(2, TOKENS, TINY["embed_dim"], dtype=torch.float64)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            out = block(x)
            torch.testing.assert_close(out, EXPECTED[placement](block, x, i), rtol=0, atol=1e-12)
            if (placement, i > 0) in DIFFERS_FROM_PRE:
                assert not torch.allclose(out, pre_ln(block, x), atol=1e-6)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_forwards_with_the_chosen_norm(placement, norm):
    model = tiny_vit(placement, norm)
    assert model.placement == placement
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, TINY["embed_dim"]) and torch.isfinite(out).all()
    norms = norms_of(model)
    assert all(isinstance(m, NORM_CLS[norm]) for m in norms)
    depth = TINY["depth"]
    expected = {
        "pre": 2 * depth + 1,
        "post": 2 * depth,
        "peri": 4 * depth + 2,
        "mix": 2 * depth + 1,
        "lns": 2 * depth + 1,
    }
    assert len(norms) == expected[placement]


def test_block_placement_lists_each_block():
    assert block_placement(tiny_vit("pre")) == ["pre"] * 4
    assert block_placement(tiny_vit("post")) == ["post"] * 4
    assert block_placement(tiny_vit("peri")) == ["peri"] * 4
    assert block_placement(tiny_vit("lns")) == ["lns"] * 4
    assert block_placement(tiny_vit("mix")) == ["post", "pre", "pre", "pre"]
    assert type(tiny_vit("pre").blocks[0]) is Block


def test_mix_ln_posts_the_first_floor_alpha_depth_blocks():
    deep = tiny_vit("mix", depth=8)
    assert block_placement(deep) == ["post"] * 2 + ["pre"] * 6
    assert all(isinstance(b, PostNormBlock) for b in deep.blocks[:2])
    assert all(type(b) is Block for b in deep.blocks[2:])
    assert block_placement(tiny_vit("mix", depth=6)) == ["post"] + ["pre"] * 5  # floor(1.5)
    assert block_placement(tiny_vit("mix", depth=8, mix_alpha=0.5)) == ["post"] * 4 + ["pre"] * 4
    assert block_placement(tiny_vit("mix", mix_alpha=0.0)) == ["pre"] * 4
    assert block_placement(tiny_vit("mix", mix_alpha=1.0)) == ["post"] * 4
    assert isinstance(deep.norm, nn.LayerNorm)  # the official code keeps the final norm
    assert [mix_post_layers(d) for d in (4, 6, 8, 12, 24)] == [1, 1, 2, 3, 6]
    assert mix_post_layers(100, 0.29) == 29


def test_mix_ln_reads_the_depth_of_a_named_model():
    assert model_depth("vit_large_patch16_224", {}) == 24
    assert model_depth("vit_large_patch16_224", {"depth": 5}) == 5
    model = create_vit(
        NAME, placement="mix", img_size=32, patch_size=8, num_heads=2, embed_dim=32
    )  # vit_tiny's own depth, 12
    assert block_placement(model) == ["post"] * 3 + ["pre"] * 9


def test_mix_alpha_is_checked_and_reaches_through_create_backbone():
    model = create_backbone(NAME, placement="mix", mix_alpha=0.5, **TINY)
    assert block_placement(model) == ["post", "post", "pre", "pre"]
    with pytest.raises(ConfigError, match="mix_alpha"):
        tiny_vit("mix", mix_alpha=1.5)
    with pytest.raises(ConfigError, match="mix_alpha"):
        tiny_vit("pre", mix_alpha=0.25)


def test_post_ln_has_no_final_norm():
    model = tiny_vit("post")
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
    # the last block ends in norm2 (weight 1, bias 0 after MAE init): unit-variance tokens
    torch.testing.assert_close(
        tokens.var(-1, unbiased=False), torch.ones(2, TOKENS), rtol=0, atol=1e-3
    )


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_peri_ln_has_embedding_output_and_final_norms(norm):
    model = tiny_vit("peri", norm).double().eval()
    randomize_norms_(model)
    model.double()
    assert isinstance(model.norm_pre, NORM_CLS[norm]) and isinstance(model.norm, NORM_CLS[norm])
    for block in model.blocks:
        assert isinstance(block, PeriNormBlock)
        assert isinstance(block.norm1_out, NORM_CLS[norm])
        assert isinstance(block.norm2_out, NORM_CLS[norm])
    assert model.patch_embed.proj.bias is not None  # only the norms differ from pre
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            h = peri_ln(block, h)
        torch.testing.assert_close(model.forward_features(x), model.norm(h), rtol=0, atol=1e-12)


def test_lns_scales_are_fixed_and_the_final_norm_unscaled():
    depth = 8
    model = tiny_vit("lns", depth=depth)
    pre = tiny_vit("pre", depth=depth)
    assert all(isinstance(b, LayerNormScalingBlock) for b in model.blocks)
    scales = [b.norm_scale for b in model.blocks]
    assert scales == pytest.approx([1 / math.sqrt(layer) for layer in range(1, depth + 1)])
    # a constant: no parameter, no buffer, nothing in the state dict beyond Pre-LN's
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in pre.named_parameters()]
    assert list(model.state_dict()) == list(pre.state_dict())
    assert not list(model.buffers())
    assert isinstance(model.norm, nn.LayerNorm)
    with torch.no_grad():
        tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(
        tokens.var(-1, unbiased=False), torch.ones(2, TOKENS), rtol=0, atol=1e-3
    )


@pytest.mark.parametrize("placement", ["post", "peri", "mix", "lns"])
def test_pre_ln_weights_load_under_the_same_names(placement):
    pre = tiny_vit("pre")
    randomize_norms_(pre)
    model = tiny_vit(placement)
    result = model.load_state_dict(pre.state_dict(), strict=False)
    added = {
        "peri": {"norm_pre.weight", "norm_pre.bias"}
        | {
            f"blocks.{i}.norm{j}_out.{p}"
            for i in range(4)
            for j in (1, 2)
            for p in ("weight", "bias")
        }
    }
    assert set(result.missing_keys) == added.get(placement, set())
    removed = {"post": {"norm.weight", "norm.bias"}}
    assert set(result.unexpected_keys) == removed.get(placement, set())
    state = model.state_dict()
    for key, value in pre.state_dict().items():
        if key in state:
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_mae_init_resets_the_added_norms(norm):
    model = tiny_vit("peri", norm)
    randomize_norms_(model)
    mae_init_(model)
    for module in norms_of(model):
        assert torch.equal(module.weight, torch.ones_like(module.weight))
        if getattr(module, "bias", None) is not None:
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_blocks_take_timms_block_arguments(placement):
    model = tiny_vit(
        placement,
        init_values=1e-5,
        drop_path_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
        proj_bias=False,
        qkv_bias=False,
        init="timm",
    )
    block = model.blocks[-1]
    assert block.ls1.gamma.shape == (TINY["embed_dim"],) and block.attn.proj.bias is None
    assert block.drop_path1.drop_prob == pytest.approx(0.1)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.sum().backward()


def test_unknown_placement_and_clashing_arguments():
    with pytest.raises(ConfigError, match="unknown placement 'sandwich'"):
        tiny_vit("sandwich")
    with pytest.raises(ConfigError, match="final_norm"):
        tiny_vit("post", final_norm=True)
    with pytest.raises(ConfigError, match="block_fn"):
        tiny_vit("peri", block_fn=Block)

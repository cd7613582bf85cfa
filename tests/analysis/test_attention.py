"""Attention maps / logits of a timm ViT, their NMI, the layer patterns and the NMI figure.

``reference_nmi`` writes the NMI out term by term in float64 Python loops, and
``cl_vs_mim_nmi`` restates naver-ai/cl-vs-mim's ``calculate_nmi`` (smoothing 1e-8, float32), so
``attention_nmi`` is checked against both the definition and the analysis it follows.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from visionbench.analysis import (
    attention_logits,
    attention_maps,
    attention_nmi,
    classify_layers,
    deepest_hybrid_layer,
    hybrid_layer,
    layer_nmi,
    save_nmi_figure,
)
from visionbench.backbones import create_vit
from visionbench.errors import ConfigError

IMG, P, DIM, DEPTH, HEADS = 32, 8, 32, 3, 2
N = (IMG // P) ** 2 + 1


def tiny_vit(seed: int = 0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=P, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    return create_vit("vit_tiny_patch16_224", **{**args, **kw}).eval()


def random_attention(b=2, h=3, n=N, seed=0, sharpness=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(b, h, n, n, generator=gen, dtype=torch.float64)).softmax(-1)


def reference_nmi(attn: torch.Tensor) -> torch.Tensor:
    """NMI of each (batch, head) map, written out with loops in float64."""
    b, h = attn.shape[:2]
    out = torch.zeros(b, h, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            a = attn[i, j, 1:, 1:].double().tolist()
            a = [[v / sum(row) for v in row] for row in a]
            n = len(a)
            p_k = [sum(a[q][k] for q in range(n)) / n for k in range(n)]
            mi = 0.0
            for q in range(n):
                for k in range(n):
                    if a[q][k] > 0:
                        mi += (1 / n) * a[q][k] * math.log(a[q][k] / p_k[k])
            h_q = math.log(n)
            h_k = -sum(p * math.log(p) for p in p_k if p > 0)
            out[i, j] = mi / math.sqrt(h_q * h_k)
    return out


def cl_vs_mim_nmi(attn: torch.Tensor) -> torch.Tensor:
    """cl-vs-mim's recipe: drop the class token, add 1e-8, renormalize, float32 NMI."""
    a = attn[:, :, 1:, 1:] + 1e-8
    a = (a / a.sum(-1, keepdim=True)).float()
    q = a.shape[2]
    p_q = torch.full(a.shape[:3], 1.0 / q)
    p_k = (a * p_q.unsqueeze(-1)).sum(2)
    mi = (a * p_q.unsqueeze(-1) * torch.log(a / p_k.unsqueeze(2))).sum((2, 3))
    e_q = -(p_q * torch.log(p_q)).sum(-1)
    e_k = -(p_k * torch.log(p_k)).sum(-1)
    return mi / torch.sqrt(e_q * e_k)


# -- NMI ---------------------------------------------------------------------------------------


def with_cls(patch_attn: torch.Tensor, cls_mass: float = 0.3) -> torch.Tensor:
    """A full (…, n+1, n+1) map whose patch block is ``patch_attn`` scaled by 1 - cls_mass."""
    *lead, n, _ = patch_attn.shape
    full = torch.zeros(*lead, n + 1, n + 1, dtype=torch.float64)
    full[..., 0, :] = 1.0 / (n + 1)
    full[..., 1:, 0] = cls_mass
    full[..., 1:, 1:] = (1 - cls_mass) * patch_attn
    return full


def test_nmi_of_one_hot_diagonal_attention_is_one():
    n = N - 1
    attn = with_cls(torch.eye(n, dtype=torch.float64).expand(2, 3, n, n))
    nmi = attention_nmi(attn)
    assert nmi.shape == (2, 3) and nmi.dtype == torch.float64
    assert torch.allclose(nmi, torch.ones(2, 3, dtype=torch.float64), atol=1e-6)


def test_nmi_of_uniform_attention_is_zero():
    n = N - 1
    attn = with_cls(torch.full((2, 3, n, n), 1.0 / n, dtype=torch.float64))
    assert torch.allclose(attention_nmi(attn), torch.zeros(2, 3, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("seed,sharpness", [(0, 1.0), (1, 3.0), (2, 8.0)])
def test_nmi_equals_the_written_out_float64_reference(seed, sharpness):
    attn = random_attention(seed=seed, sharpness=sharpness)
    assert torch.allclose(attention_nmi(attn), reference_nmi(attn), atol=1e-10)
    # float32 input is computed in float64 all the same
    assert torch.allclose(attention_nmi(attn.float()), reference_nmi(attn.float()), atol=1e-6)


def test_nmi_is_close_to_cl_vs_mim_on_positive_maps():
    attn = random_attention(seed=3, sharpness=2.0)
    assert torch.allclose(attention_nmi(attn).float(), cl_vs_mim_nmi(attn), atol=1e-5)


def test_nmi_exact_zeros_and_rows_with_all_mass_on_the_class_token():
    n = N - 1
    patch = random_attention(b=1, h=1, n=n, seed=4, sharpness=4.0)
    patch[..., 2, :] = 0.0
    patch[..., 2, 5] = 1.0  # a one-hot row: 0 log 0 terms
    full = with_cls(patch)
    full[..., 3, 1:] = 0.0  # query 2 (row 3): every bit of its mass on the class token
    full[..., 3, 0] = 1.0
    expected_patch = patch.clone()
    expected_patch[..., 2, :] = 1.0 / n  # read as uniform
    nmi = attention_nmi(full)
    assert torch.isfinite(nmi).all()
    assert torch.allclose(nmi, reference_nmi(with_cls(expected_patch)), atol=1e-10)


def test_nmi_of_attention_collapsed_onto_one_key_is_zero_not_nan():
    n = N - 1
    patch = torch.zeros(1, 2, n, n, dtype=torch.float64)
    patch[..., 4] = 1.0
    assert torch.equal(attention_nmi(with_cls(patch)), torch.zeros(1, 2, dtype=torch.float64))


def test_nmi_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, heads, N, N"):
        attention_nmi(torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match="at least 2"):
        attention_nmi(torch.rand(1, 1, 2, 2))


# -- maps and logits of a timm ViT -------------------------------------------------------------


def manual_maps(vit, images):
    """Softmax(q k^T / sqrt(d)) of every block from the weights, block inputs run by hand."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    maps = []
    for blk in vit.blocks:
        h = blk.norm1(x)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = F.linear(h.double(), blk.attn.qkv.weight.double(), blk.attn.qkv.bias.double())
        qkv = qkv.reshape(b, n, 3, heads, c // heads)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        maps.append((q @ k.transpose(-2, -1) / math.sqrt(c // heads)).softmax(-1))
        x = blk(x)
    return maps


@pytest.mark.parametrize("fused", [True, False])
def test_attention_maps_are_row_stochastic_and_match_a_manual_computation(fused):
    vit = tiny_vit()
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        maps = attention_maps(vit, images)
        expected = manual_maps(vit, images)
    assert len(maps) == DEPTH
    for got, want in zip(maps, expected, strict=True):
        assert got.shape == (2, HEADS, N, N)
        assert torch.allclose(got.sum(-1), torch.ones(2, HEADS, N), atol=1e-5)
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_attention_logits_softmax_equals_the_maps_of_that_layer():
    vit = tiny_vit(seed=1)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        maps = attention_maps(vit, images, layers=[2, 0])
        for layer, m in zip([2, 0], maps, strict=True):
            logits = attention_logits(vit, images, layer)
            assert logits.shape == (2, HEADS, N, N)
            assert torch.allclose(logits.softmax(-1), m, atol=1e-6)


def test_forward_stops_at_the_deepest_requested_block_and_gradients_flow():
    vit = tiny_vit(seed=2).train()
    calls = []
    vit.blocks[2].register_forward_hook(lambda *args: calls.append(2))
    vit.norm.register_forward_hook(lambda *args: calls.append("norm"))
    logits = attention_logits(vit, torch.randn(2, 3, IMG, IMG), 1)
    assert calls == []
    logits.sum().backward()
    assert vit.blocks[1].attn.qkv.weight.grad is not None
    assert vit.blocks[0].mlp.fc1.weight.grad is not None
    assert vit.blocks[1].attn.proj.weight.grad is None  # never used
    assert vit.blocks[1].mlp.fc1.weight.grad is None
    with pytest.raises(ValueError, match="out of range"):
        attention_logits(vit, torch.randn(1, 3, IMG, IMG), DEPTH)


@pytest.mark.parametrize("norm,placement", [("rmsnorm", "pre"), ("dyt", "pre"),
                                            ("layernorm", "post"), ("layernorm", "peri")])
def test_maps_work_with_other_norms_and_placements(norm, placement):
    try:
        vit = tiny_vit(seed=3, norm=norm, placement=placement)
    except ConfigError as err:
        pytest.skip(f"backbone not available: {err}")
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        maps = attention_maps(vit, images)
        logits = attention_logits(vit, images, DEPTH - 1)
    assert all(torch.allclose(m.sum(-1), torch.ones(2, HEADS, N), atol=1e-5) for m in maps)
    assert torch.allclose(logits.softmax(-1), maps[-1], atol=1e-6)


# -- NMI per layer, patterns -------------------------------------------------------------------


def test_layer_nmi_averages_over_heads_and_images_and_restores_the_mode():
    vit = tiny_vit(seed=4).train()
    a, b = torch.randn(3, 3, IMG, IMG), torch.randn(2, 3, IMG, IMG)
    loader = [(a, torch.zeros(3)), (b, torch.zeros(2))]
    nmi = layer_nmi(vit, loader)
    assert vit.training
    vit.eval()
    with torch.no_grad():
        per_image = [attention_nmi(m).mean(1) for m in attention_maps(vit, torch.cat([a, b]))]
    expected = torch.stack([v.mean() for v in per_image])
    assert nmi.shape == (DEPTH,) and nmi.dtype == torch.float64
    assert torch.allclose(nmi, expected, atol=1e-6)
    assert torch.allclose(layer_nmi(vit, a), torch.stack([v[:3].mean() for v in per_image]),
                          atol=1e-6)
    assert torch.allclose(layer_nmi(vit, loader, max_batches=1), layer_nmi(vit, a))


def test_classify_layers_and_the_deepest_hybrid_layer():
    labels = classify_layers([0.3, 0.12, 0.1, 0.06, 0.07, 0.01], 0.12, 0.06)
    assert labels == ["local", "local", "hybrid", "global", "hybrid", "global"]
    assert deepest_hybrid_layer(labels) == 4
    assert classify_layers(torch.tensor([0.5, 0.0])) == ["local", "global"]
    with pytest.raises(ConfigError, match="global .* must be below local"):
        classify_layers([0.1], 0.05, 0.2)
    with pytest.raises(ConfigError, match="no layer has a hybrid attention pattern"):
        deepest_hybrid_layer(["local", "global"])


def test_without_a_hybrid_layer_the_one_nearest_the_band_is_distilled():
    assert hybrid_layer([0.3, 0.1, 0.07, 0.02], 0.12, 0.06) == (2, "the deepest hybrid layer "
                                                                   "by NMI")
    layer, reason = hybrid_layer([0.3, 0.2, 0.15, 0.01], 0.12, 0.06)  # all local or global
    assert layer == 2 and "no layer in the hybrid band" in reason and "block 2" in reason
    assert hybrid_layer([0.5, 0.03, 0.03], 0.12, 0.06)[0] == 2  # tie: the deeper one
    assert hybrid_layer([0.0, 0.01, 0.2], 0.12, 0.06)[0] == 1  # 0.05 below vs 0.08 above


def test_save_nmi_figure_writes_a_png(tmp_path):
    path = save_nmi_figure(
        {"mae-l": [0.4, 0.3, 0.1, 0.05], "dino-b": [0.2, 0.08, 0.04]},
        tmp_path / "figs" / "nmi.png",
        (0.12, 0.06),
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError):
        save_nmi_figure({"x": [0.1]}, tmp_path / "bad.png", (0.06, 0.12))

import copy

import pytest
import torch
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visionbench.backbones.vit import create_vit
from visionbench.norms import build_norm
from visionbench.norms.conversions import (
    AffineRMSNorm,
    AlphaBatchNorm,
    CenteredAffine,
    CRMSNorm,
    FakeLayerNorm,
    FakeLNSchedule,
    alpha_bn,
    alpha_bn_applied,
    attach_fakeln,
    calibrate_fakeln,
    convert_to_crmsnorm,
    convert_to_dyt,
    remove_alpha_bn,
    remove_fake_layernorms,
)

TINY = dict(img_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2)


def tiny_vit(**kw) -> VisionTransformer:
    return VisionTransformer(**{**TINY, "num_classes": 0, **kw}).double().eval()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere; norm gains around 1, so every LN affine is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        is_gain = name.endswith("norm1.weight") or name.endswith("norm2.weight") or (
            name in ("norm.weight", "fc_norm.weight"))
        p.copy_(1 + 0.5 * noise if is_gain else 0.3 * noise)
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def layernorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


# --------------------------------------------------------------------------------------------
# Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm


VIT_CASES = {
    "headless-cls": {},
    "layerscale-reg-avg-fcnorm-head": dict(reg_tokens=2, init_values=0.1, num_classes=5,
                                           global_pool="avg", fc_norm=True, class_token=False),
    "no-embed-class-head": dict(no_embed_class=True, reg_tokens=1, num_classes=3),
}


@pytest.mark.parametrize("variant", ["rms", "crms"])
@pytest.mark.parametrize("case", list(VIT_CASES))
def test_crms_conversion_is_equivalent(variant, case):
    model = randomize_(tiny_vit(**VIT_CASES[case]))
    x = images()
    with torch.no_grad():
        ref, ref_features = model(x), model.forward_features(x)
        converted = convert_to_crmsnorm(copy.deepcopy(model), variant=variant)
        out, features = converted(x), converted.forward_features(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)
    fc_norm_last = case == "layerscale-reg-avg-fcnorm-head"  # stream ends unnormalized
    compressed = variant == "crms" and fc_norm_last
    assert features.shape[-1] == ref_features.shape[-1] - compressed
    if VIT_CASES[case].get("num_classes", 0) == 0:  # headless: the last norm's output itself
        assert torch.allclose(features, ref_features, rtol=0, atol=1e-10)
    assert not layernorms(converted)
    block_norm = nn.RMSNorm if variant == "rms" else CRMSNorm
    for block in converted.blocks:
        assert type(block.norm1) is block_norm and type(block.norm2) is block_norm
        assert getattr(block.norm1, "weight", None) is None  # affine folded into qkv / fc1
    last = converted.fc_norm if fc_norm_last else converted.norm
    assert isinstance(last, AffineRMSNorm if variant == "rms" else CRMSNorm)
    stream_dim = TINY["embed_dim"] - (variant == "crms")
    assert converted.pos_embed.shape[-1] == stream_dim
    assert converted.blocks[0].attn.qkv.in_features == stream_dim


def test_rms_conversion_keeps_the_main_branch_zero_mean():
    model = convert_to_crmsnorm(randomize_(tiny_vit()), variant="rms")
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, i, o: seen.append(o.mean(-1).abs().max()))
    with torch.no_grad():
        model(images())
    assert len(seen) == TINY["depth"] and max(seen) < 1e-12


def test_crms_conversion_of_the_project_vit_in_float64():
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                       num_heads=2)
    model = randomize_(model.double().eval(), seed=3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        for variant in ("rms", "crms"):
            out = convert_to_crmsnorm(copy.deepcopy(model), variant)(x)
            assert torch.allclose(out, ref, rtol=0, atol=1e-10)


def test_crms_conversion_rejects_models_it_is_not_exact_for():
    with pytest.raises(ValueError, match="nn.LayerNorm"):
        convert_to_crmsnorm(VisionTransformer(**TINY, norm_layer=nn.RMSNorm))
    with pytest.raises(ValueError, match="pre-norm"):
        convert_to_crmsnorm(VisionTransformer(**TINY, pre_norm=True))
    with pytest.raises(ValueError, match="variant"):
        convert_to_crmsnorm(tiny_vit(), variant="ln")


def test_crms_norm_matches_rmsnorm_of_the_decompressed_vector():
    z = torch.randn(4, 7, 9, dtype=torch.float64)
    z = z - z.mean(-1, keepdim=True)
    compressed = CRMSNorm(8, eps=1e-6)(z[..., :-1])
    full = nn.RMSNorm(9, eps=1e-6, elementwise_affine=False).double()(z)
    assert torch.allclose(compressed, full[..., :-1], atol=1e-12)
    assert torch.allclose(CRMSNorm(8, eps=1e-6, decompress=True).double()(z[..., :-1]), full,
                          atol=1e-12)


# --------------------------------------------------------------------------------------------
# LayerNorm -> DyT


def test_dyt_conversion_leaves_no_layernorm():
    model = randomize_(tiny_vit(num_classes=4))
    n_ln = len(layernorms(model))
    convert_to_dyt(model, alpha_init=0.7)
    dyts = [m for m in model.modules() if type(m).__name__ == "DynamicTanh"]
    assert not layernorms(model) and len(dyts) == n_ln == 2 * TINY["depth"] + 1
    assert all(m.alpha.item() == pytest.approx(0.7) and m.weight.dtype == torch.float64
               for m in dyts)
    out = model(images())
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_dyt_conversion_of_channels_first_and_bare_layernorms():
    convnet = nn.Sequential(nn.Conv2d(3, 8, 3), LayerNorm2d(8), nn.Conv2d(8, 4, 1))
    convert_to_dyt(convnet)
    assert not layernorms(convnet) and convnet[1].channels_last is False
    assert torch.isfinite(convnet(torch.randn(2, 3, 8, 8))).all()
    bare = convert_to_dyt(nn.LayerNorm(6))
    assert type(bare).__name__ == "DynamicTanh" and bare(torch.randn(2, 6)).shape == (2, 6)


# --------------------------------------------------------------------------------------------
# FakeLN: LayerNorm removal by fine-tuning


def fakeln_vit(seed: int = 0) -> tuple[VisionTransformer, list[str]]:
    model = randomize_(tiny_vit(num_classes=3), seed=seed)
    order = attach_fakeln(model)
    calibrate_fakeln(model, [images(4, seed=5), images(4, seed=6)])
    return model, order


def test_fakeln_real_mode_is_layernorm_and_calibration_averages_token_std():
    model = randomize_(tiny_vit(num_classes=3))
    x = images()
    with torch.no_grad():
        ref = model(x)
        first_input = []
        model.blocks[0].norm1.register_forward_pre_hook(lambda m, a: first_input.append(a[0]))
        model(x)
        attach_fakeln(model)
        assert torch.allclose(model(x), ref, atol=1e-12)
    stds = calibrate_fakeln(model, [x])
    h = first_input[0]
    expected = torch.sqrt(h.var(-1, correction=0) + model.blocks[0].norm1.eps).mean()
    assert stds["blocks.0.norm1"] == pytest.approx(float(expected), rel=1e-12)
    assert not layernorms(model)


def test_fakeln_running_std_uses_the_official_momentum_rule_in_training_only():
    norm = FakeLayerNorm(nn.LayerNorm(8).double(), momentum=0.9)
    a, b = torch.randn(5, 8, dtype=torch.float64), 3 * torch.randn(5, 8, dtype=torch.float64)
    token_std = lambda x: torch.sqrt(x.var(-1, correction=0) + norm.eps).mean()  # noqa: E731
    norm.eval()(a)
    assert torch.isnan(norm.average_std)  # eval forwards measure nothing
    with pytest.raises(RuntimeError, match="no std measured"):
        norm.make_fake()
    norm.train()(a)
    norm(b)
    expected = 0.9 * token_std(a) + 0.1 * token_std(b)
    assert float(norm.average_std) == pytest.approx(float(expected), rel=1e-12)
    norm.make_fake()
    c = torch.randn(5, 8, dtype=torch.float64)
    centered = c - c.mean(-1, keepdim=True)
    assert torch.allclose(norm(c), centered / expected, atol=1e-12)  # frozen scalar std
    assert float(norm.average_std) == pytest.approx(float(expected))  # no tracking once fake


def test_fakeln_schedule_follows_the_official_per_norm_type_gaps():
    """submarat/removing-layer-norm config.py (gpt2): ln_2 every 2 steps from start, the ln_1
    q/k phase (L x 2 steps), ln_1 every 3 steps, then ln_f alone, all at once."""
    model, order = fakeln_vit()
    depth = TINY["depth"]
    assert order == ([f"blocks.{i}.norm2" for i in range(depth)]
                     + [f"blocks.{i}.norm1" for i in range(depth)] + ["norm"])
    start = 5  # the lr warmup's length
    schedule = FakeLNSchedule(model, start=start, gap_norm2=2, gap_norm1_qk=2, gap_norm1=3)
    expected = {f"blocks.{i}.norm2": start + 2 * i for i in range(depth)}
    expected.update({f"blocks.{i}.norm1": start + depth * (2 + 2) + 3 * i
                     for i in range(depth)})
    expected["norm"] = start + depth * (2 + 2 + 3)
    assert schedule.order == order
    assert {n: schedule.step_of(n) for n in order} == expected
    assert schedule.last_step == expected["norm"]
    assert max(v for n, v in expected.items() if n != "norm") < expected["norm"]  # last
    assert schedule.fake_at(start - 1) == [] and schedule.fake_at(start + 2) == order[:2]
    made = []
    for step in range(schedule.last_step + 3):
        newly = schedule.step()
        assert newly == [n for n in order if expected[n] == step]
        made += newly
        fake_now = [n for n in order if model.get_submodule(n).fake]
        assert fake_now == schedule.fake_at(step) == made
    assert made == order and schedule.done


def test_fakeln_schedule_fakes_every_final_norm_at_once():
    model = randomize_(tiny_vit(num_classes=3, global_pool="avg", fc_norm=True), seed=1)
    model.norm = nn.LayerNorm(model.embed_dim, eps=1e-6).double()
    order = attach_fakeln(model)
    assert order[-2:] == ["norm", "fc_norm"]
    calibrate_fakeln(model, [images(4, seed=5)])
    schedule = FakeLNSchedule(model, start=0, gap_norm2=1, gap_norm1_qk=0, gap_norm1=1)
    assert schedule.step_of("norm") == schedule.step_of("fc_norm") == 2 * TINY["depth"]
    with pytest.raises(ValueError, match=">= 0"):
        FakeLNSchedule(model, start=-1)


def test_removing_fake_layernorms_keeps_the_all_fake_function():
    model, _ = fakeln_vit()
    schedule = FakeLNSchedule(model, start=0, gap_norm2=0, gap_norm1_qk=0, gap_norm1=0)
    assert len(schedule.step()) == 2 * TINY["depth"] + 1 and schedule.done
    x = images(seed=9)
    with torch.no_grad():
        fake_out = model(x)
        kept = remove_fake_layernorms(copy.deepcopy(model), fold_into_linear=False)(x)
        remove_fake_layernorms(model)
        folded = model(x)
    assert torch.allclose(folded, fake_out, rtol=0, atol=1e-10)
    assert torch.allclose(kept, fake_out, rtol=0, atol=1e-10)
    leftovers = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, FakeLayerNorm))]
    assert not leftovers
    assert all(isinstance(b.norm1, nn.Identity) and isinstance(b.norm2, nn.Identity)
               for b in model.blocks)
    assert isinstance(model.norm, CenteredAffine)


def test_removal_refuses_norms_that_are_still_real():
    model, order = fakeln_vit()
    model.get_submodule(order[0]).make_fake()
    with pytest.raises(RuntimeError, match="still real"):
        remove_fake_layernorms(model)


# --------------------------------------------------------------------------------------------
# alpha-BN


class TinyBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2d = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.bn1d = nn.BatchNorm1d(5)
        self.tokens = build_norm("batchnorm", 5, kind="token")

    def forward(self, x):
        h = torch.relu(self.bn2d(self.conv(x)))
        h = self.bn1d(self.fc(h.flatten(1)))
        return self.tokens(h.reshape(-1, 1, 5).expand(-1, 3, 5) * torch.arange(1.0, 4.0)[:, None])


def bn_net() -> TinyBNNet:
    net = randomize_(TinyBNNet().double(), seed=4)
    gen = torch.Generator().manual_seed(8)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64)
                                + 0.5)
    return net.eval()


def running_stats(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in net.named_buffers() if "running" in n]


def test_alpha_bn_follows_the_formula():
    bn = bn_net().bn2d
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    alpha = 0.3
    mu_t, var_t = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
    mu = alpha * bn.running_mean + (1 - alpha) * mu_t
    var = alpha * bn.running_var + (1 - alpha) * var_t
    expected = ((x - mu[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
                * bn.weight[:, None, None] + bn.bias[:, None, None])
    wrapped = alpha_bn(bn, alpha)
    assert isinstance(wrapped, AlphaBatchNorm)
    assert torch.allclose(wrapped(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_bn_backward_through_the_batch_statistics(alpha):
    """Autograd on (test-time adaptation): dL/dx against the written-out gradient, with
    s = (v + eps)^-1/2, v = a v_s + (1 - a) var_t, mu = a mu_s + (1 - a) mu_t, m values per
    channel: dL/dx_i = gamma s [g_i - (1-a)/m sum_j g_j - (1-a)/m s^2 (x_i - mu_t)
    sum_j g_j (x_j - mu)]; dL/dgamma, dL/dbeta as any affine."""
    bn = bn_net().bn2d
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    wrapped = alpha_bn(bn, alpha)
    y = wrapped(x)
    (y * g).sum().backward()

    dims, m = (0, 2, 3), x.shape[0] * x.shape[2] * x.shape[3]
    xd = x.detach()
    mu_t, var_t = xd.mean(dims), xd.var(dims, correction=0)
    mu = alpha * bn.running_mean + (1 - alpha) * mu_t
    v = alpha * bn.running_var + (1 - alpha) * var_t
    s = (v + bn.eps).rsqrt()

    def c(t):  # a per-channel vector, broadcast over (N, C, H, W)
        return t[None, :, None, None]

    sum_g = g.sum(dims)
    sum_gx = (g * (xd - c(mu))).sum(dims)
    expected = c(bn.weight.detach() * s) * (
        g - c((1 - alpha) / m * sum_g) - c((1 - alpha) / m * s**2 * sum_gx) * (xd - c(mu_t)))
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12)
    assert torch.allclose(bn.weight.grad, (g * (xd - c(mu)) * c(s)).sum(dims), atol=1e-12)
    assert torch.allclose(bn.bias.grad, sum_g, atol=1e-12)
    assert bn.running_mean.grad is None and not bn.running_mean.requires_grad


def test_alpha_bn_endpoints_and_untouched_running_stats():
    net = bn_net()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    before = running_stats(net)
    with torch.no_grad():
        source = net(x)  # eval mode: source statistics
        train_copy = copy.deepcopy(net).train()
        for m in train_copy.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
        target = train_copy(x)  # batch statistics, no running update
        originals = [net.bn2d, net.bn1d, net.tokens.bn]
        alpha_bn(net, 1.0)
        assert sum(isinstance(m, AlphaBatchNorm) for m in net.modules()) == 3
        assert torch.allclose(net(x), source, rtol=0, atol=1e-12)
        alpha_bn(net, 0.0)  # again: only alpha changes
        assert sum(isinstance(m, AlphaBatchNorm) for m in net.modules()) == 3
        assert torch.allclose(net(x), target, rtol=0, atol=1e-12)
        net.train()(x)  # train mode does not update the running statistics either
        assert not torch.allclose(net(x), source)
        remove_alpha_bn(net.eval())
    assert [net.bn2d, net.bn1d, net.tokens.bn] == originals
    assert all(torch.equal(a, b) for a, b in zip(before, running_stats(net), strict=True))
    with torch.no_grad():
        assert torch.allclose(net(x), source, rtol=0, atol=0)
        with alpha_bn_applied(net, 0.0):
            assert torch.allclose(net(x), target, rtol=0, atol=1e-12)
        assert isinstance(net.bn2d, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="alpha"):
        alpha_bn(net, 1.5)

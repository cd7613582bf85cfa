import math

import pytest
import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0
from timm.models.resnetv2 import ResNetV2
from torch import nn

from visionbench.backbones import create_backbone, create_resnet
from visionbench.errors import ConfigError
from visionbench.norms import build_norm, list_norms, norm_spec
from visionbench.norms.conv import (
    BatchChannelNorm2d,
    EstimatedBatchNorm2d,
    WSConv2d,
    convert_to_ws_conv,
    selu_act_layer,
)

F64 = torch.float64
# timm's EvoNorms take their statistics in float32 (``x.float().var``), even for float64 input.
EVO_TOL = dict(rtol=1e-5, atol=1e-6)
NEW_CONV_NORMS = ("bcn_ws", "evonorm_b0", "evonorm_s0", "selu")


def randomize_(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters so that the formulas are tested, not the init."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return module


# --- formulas in float64 ---------------------------------------------------------------------


def ref_ws_weight(w, eps=1e-5):
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        f = w[o].flatten()
        mean = f.sum() / f.numel()
        var = ((f - mean) ** 2).sum() / (f.numel() - 1)  # unbiased, as the official code
        out[o] = (w[o] - mean) / torch.sqrt(var + eps)
    return out


def ref_channel_part(y, groups, gamma, beta, eps=1e-5):
    n = y.shape[0]
    g = y.reshape(n, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps) * gamma + beta).reshape(y.shape)


def ref_instance_std(x, eps):
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.sqrt(((x - mean) ** 2).mean(dim=(2, 3), keepdim=True) + eps)


def ref_group_std(x, groups, eps):
    n, c, h, w = x.shape
    g = x.reshape(n, groups, c // groups * h * w)
    mean = g.mean(dim=2, keepdim=True)
    std = torch.sqrt(((g - mean) ** 2).mean(dim=2, keepdim=True) + eps)
    return std.expand_as(g).reshape(x.shape)


def per_channel(t):
    return t.reshape(1, -1, 1, 1)


# --- weight standardization ------------------------------------------------------------------


def test_ws_conv_standardizes_each_filter_exactly():
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1, bias=True, dtype=F64)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.7)
    expected = ref_ws_weight(conv.weight.detach())
    torch.testing.assert_close(conv.standardized_weight(), expected, rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    ref = torch.nn.functional.conv2d(x, expected, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)
    flat = conv.standardized_weight().flatten(1)
    assert flat.mean(dim=1).abs().max() < 1e-12
    assert torch.allclose(flat.var(dim=1), torch.ones(5, dtype=F64), atol=1e-3)


def test_convert_to_ws_conv_keeps_parameters_and_hyperparameters():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True),
        nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False)),
    )
    w0, b0, w1 = net[0].weight, net[0].bias, net[1][1].weight
    x = torch.randn(1, 4, 9, 9)
    convert_to_ws_conv(net)
    first, second = net[0], net[1][1]
    assert isinstance(first, WSConv2d) and isinstance(second, WSConv2d)
    assert first.weight is w0 and first.bias is b0 and second.weight is w1
    assert second.bias is None
    hyper = (first.stride, first.padding, first.dilation, first.groups)
    assert hyper == ((2, 2), (2, 2), (2, 2), 2)
    ref = torch.nn.functional.conv2d(
        x, ref_ws_weight(w0.detach().double()).float(), b0, stride=2, padding=2, dilation=2,
        groups=2,
    )
    torch.testing.assert_close(first(x), ref, rtol=1e-5, atol=1e-5)


# --- batch-channel normalization -------------------------------------------------------------


def test_bcn_estimated_statistics_train_and_eval_match_the_formula():
    torch.manual_seed(0)
    layer = randomize_(build_norm("bcn_ws", 8, num_groups=4, momentum=0.3, estimate=True,
                                  dtype=F64))
    assert isinstance(layer, BatchChannelNorm2d) and isinstance(layer.bn, EstimatedBatchNorm2d)
    w, b = per_channel(layer.bn.weight.detach()), per_channel(layer.bn.bias.detach())
    gamma, beta = layer.weight.detach(), layer.bias.detach()
    mu, var, r = torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64), 0.3
    layer.train()
    for step in range(3):
        x = torch.randn(2, 8, 5, 5, dtype=F64) * (step + 1) + step
        batch_mean = x.mean(dim=(0, 2, 3))
        batch_var = ((x - per_channel(mu)) ** 2).mean(dim=(0, 2, 3))  # around the old estimate
        mu = mu + r * (batch_mean - mu)
        var = var + r * (batch_var - var)
        y = w * (x - per_channel(mu)) / torch.sqrt(per_channel(var) + 1e-5) + b
        expected = ref_channel_part(y, 4, gamma, beta)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.bn.running_mean, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bn.running_var, var, rtol=0, atol=1e-12)
    assert int(layer.bn.num_batches_tracked) == 3

    layer.eval()
    before = layer.bn.running_mean.clone()
    x = torch.randn(1, 8, 5, 5, dtype=F64)
    y = w * (x - per_channel(mu)) / torch.sqrt(per_channel(var) + 1e-5) + b
    torch.testing.assert_close(layer(x), ref_channel_part(y, 4, gamma, beta), rtol=0, atol=1e-10)
    assert torch.equal(layer.bn.running_mean, before)  # no update in eval


def test_bcn_default_uses_batch_statistics_as_the_imagenet_code():
    """imagenet/models/layers.py GN: nn.BatchNorm2d (batch statistics in training, running ones
    in eval), then the per-group channel normalization."""
    torch.manual_seed(1)
    assert norm_spec("bcn_ws", "conv").defaults["estimate"] is False
    layer = randomize_(build_norm("bcn_ws", 8, num_groups=2, dtype=F64))
    assert type(layer.bn) is nn.BatchNorm2d
    x = torch.randn(3, 8, 4, 4, dtype=F64)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = per_channel(layer.bn.weight.detach()) * (x - mean) / torch.sqrt(var + 1e-5)
    y = y + per_channel(layer.bn.bias.detach())
    expected = ref_channel_part(y, 2, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    layer.eval()
    bn = layer.bn
    x = torch.randn(2, 8, 4, 4, dtype=F64)
    y = per_channel(bn.weight.detach()) * (x - per_channel(bn.running_mean)) / torch.sqrt(
        per_channel(bn.running_var) + 1e-5) + per_channel(bn.bias.detach())
    expected = ref_channel_part(y, 2, layer.weight.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


def test_bcn_groups_fall_back_for_narrow_layers():
    assert build_norm("bcn_ws", 64).num_groups == 32
    assert build_norm("bcn_ws", 24).num_groups == 8  # gcd, as the catalog's groupnorm


# --- EvoNorm -----------------------------------------------------------------------------------


def test_evonorm_b0_train_and_eval_match_the_formula():
    torch.manual_seed(0)
    layer = randomize_(build_norm("evonorm_b0", 6, dtype=F64))
    assert isinstance(layer, EvoNorm2dB0) and layer.eps == 1e-5 and layer.momentum == 0.1
    g, b, v = (per_channel(t.detach()) for t in (layer.weight, layer.bias, layer.v))
    eps, m, running = 1e-5, 0.1, torch.ones(6, dtype=F64)
    layer.train()
    for step in range(3):
        x = torch.randn(4, 6, 3, 3, dtype=F64) * (step + 1) - 0.5
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        batch_var = ((x - mean) ** 2).mean(dim=(0, 2, 3))
        n = x.numel() / x.shape[1]
        running = (1 - m) * running + m * batch_var * n / (n - 1)  # timm: unbiased, as torch BN
        left = torch.sqrt(per_channel(batch_var) + eps)
        right = v * x + ref_instance_std(x, eps)
        expected = x / torch.maximum(left, right) * g + b
        torch.testing.assert_close(layer(x), expected, **EVO_TOL)
    torch.testing.assert_close(layer.running_var, running, **EVO_TOL)

    layer.eval()
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    left = torch.sqrt(per_channel(running) + eps)
    expected = x / torch.maximum(left, v * x + ref_instance_std(x, eps)) * g + b
    torch.testing.assert_close(layer(x), expected, **EVO_TOL)


def test_evonorm_s0_matches_the_formula_with_the_reference_group_fallback():
    torch.manual_seed(0)
    layer = randomize_(build_norm("evonorm_s0", 48, dtype=F64))
    assert isinstance(layer, EvoNorm2dS0) and layer.groups == 24  # largest divisor <= 32
    g, b, v = (per_channel(t.detach()) for t in (layer.weight, layer.bias, layer.v))
    x = torch.randn(2, 48, 4, 4, dtype=F64)
    expected = x * torch.sigmoid(v * x) / ref_group_std(x, 24, 1e-5) * g + b
    for mode in (True, False):  # no batch statistics: train and eval agree
        layer.train(mode)
        torch.testing.assert_close(layer(x), expected, **EVO_TOL)
    assert build_norm("evonorm_s0", 64).groups == 32


def test_evonorm_without_activation_is_affine_only():
    for name in ("evonorm_b0", "evonorm_s0"):
        layer = randomize_(build_norm(name, 8, apply_act=False, dtype=F64))
        x = torch.randn(2, 8, 3, 3, dtype=F64)
        expected = x * per_channel(layer.weight.detach()) + per_channel(layer.bias.detach())
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


# --- SELU --------------------------------------------------------------------------------------


def test_selu_entry_is_identity_with_selu_and_alpha_dropout():
    assert isinstance(build_norm("selu", 8, device="cpu", dtype=F64), nn.Identity)
    x = torch.linspace(-4, 4, 81, dtype=F64)
    lam, alpha = 1.0507009873554804934193349852946, 1.6732632423543772848170429916717
    expected = lam * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))
    torch.testing.assert_close(selu_act_layer()(inplace=False)(x), expected, rtol=0, atol=1e-12)
    act = selu_act_layer(0.1)(inplace=True)
    assert isinstance(act[0], nn.SELU) and isinstance(act[1], nn.AlphaDropout)
    assert act[1].p == 0.1
    with pytest.raises(ValueError, match="alpha_dropout"):
        selu_act_layer(1.0)


# --- every layer: device/dtype, catalog entry, bf16 autocast -----------------------------------


@pytest.mark.parametrize("name", NEW_CONV_NORMS)
def test_catalog_entry_and_device_dtype(name):
    spec = norm_spec(name, "conv")
    assert spec.kind == "conv" and spec.paper and spec.formula and spec.where
    assert spec.arxiv == {"bcn_ws": "1903.10520", "selu": "1706.02515"}.get(name, "2004.02967")
    layer = build_norm(name, 64, device="cpu", dtype=F64)
    tensors = [*layer.parameters(), *layer.buffers()]
    assert all(t.dtype == F64 for t in tensors if t.is_floating_point())
    assert all(t.device.type == "cpu" for t in tensors)
    conv = WSConv2d(3, 4, 3, device="cpu", dtype=F64)
    assert conv.weight.dtype == F64


@pytest.mark.parametrize("name", NEW_CONV_NORMS)
def test_layer_is_finite_under_bf16_autocast_in_training(name):
    torch.manual_seed(0)
    conv = WSConv2d(3, 64, 3, padding=1)
    norm = build_norm(name, 64).train()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(conv(x))
        loss = out.float().square().mean()
    loss.backward()
    assert torch.isfinite(out.float()).all()
    grads = [p.grad for p in [*conv.parameters(), *norm.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- ResNets built with each conv norm -----------------------------------------------------------


@pytest.mark.parametrize("name", list_norms("conv"))
def test_resnet18_with_every_conv_norm(name):
    torch.manual_seed(0)
    model = create_resnet("resnet18", norm=name, in_chans=3)
    features = model(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 512) and torch.isfinite(features).all()
    inside_bcn = {id(m.bn) for m in model.modules() if isinstance(m, BatchChannelNorm2d)}
    has_bn = any(isinstance(m, nn.BatchNorm2d) and id(m) not in inside_bcn
                 for m in model.modules())
    assert has_bn == (name == "batchnorm")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    assert all(isinstance(c, WSConv2d) for c in convs) == (name == "bcn_ws")


def test_bcn_ws_resnet_standardizes_every_conv_and_zero_inits_the_last_norm():
    model = create_resnet("resnet18", norm="bcn_ws")
    assert not any(type(m) is nn.Conv2d for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert len(norms) == 20  # one after every convolution, downsample included
    assert isinstance(model.layer2[0].downsample[0], WSConv2d)
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0  # official zero_init_residual


@pytest.mark.parametrize("name", ["evonorm_b0", "evonorm_s0"])
def test_evonorm_resnet_is_preactivation_with_no_separate_activation(name):
    layer_cls = EvoNorm2dB0 if name == "evonorm_b0" else EvoNorm2dS0
    model = create_backbone("resnet18", norm=name)
    assert isinstance(model, ResNetV2)
    acts = (nn.ReLU, nn.SELU, nn.GELU, nn.SiLU, nn.ReLU6, nn.LeakyReLU)
    assert not any(isinstance(m, acts) for m in model.modules())
    evos = [m for m in model.modules() if isinstance(m, layer_cls)]
    assert len(evos) == 2 * 8 + 1 and all(m.v is not None for m in evos)  # every pair + final
    for block in (b for stage in model.stages for b in stage.blocks):
        assert isinstance(block.norm1, layer_cls) and isinstance(block.norm2, layer_cls)
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()
    with pytest.raises(ConfigError, match="pre-activation"):
        create_resnet("resnet26", norm=name)


def test_selu_resnet_has_selu_lecun_init_and_no_norms():
    torch.manual_seed(0)
    model = create_resnet("resnet18", norm="selu", num_classes=10)
    assert not any(isinstance(m, (nn.ReLU, nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())
    assert sum(isinstance(m, nn.SELU) for m in model.modules()) == 1 + 2 * 8
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    wide = model.layer4[1].conv2.weight  # fan_in 512 * 3 * 3
    fan_in = wide[0].numel()
    assert abs(wide.std().item() * math.sqrt(fan_in) - 1) < 0.01
    assert abs(wide.mean().item()) < 1e-3
    assert abs(model.fc.weight.std().item() * math.sqrt(512) - 1) < 0.05
    assert torch.count_nonzero(model.fc.bias) == 0
    dropped = create_resnet("resnet18", norm="selu", alpha_dropout=0.05)
    assert sum(isinstance(m, nn.AlphaDropout) for m in dropped.modules()) == 1 + 2 * 8
    with pytest.raises(ConfigError, match="alpha_dropout"):
        create_resnet("resnet18", norm="groupnorm", alpha_dropout=0.1)
    with pytest.raises(ConfigError, match="alpha_dropout"):
        create_resnet("resnet18", norm="selu", alpha_dropout=1.5)


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_preact_resnet_takes_bn_relu_as_the_evonorm_baseline(norm):
    """Like with like: the EvoNorm entries' baseline is the same pre-activation ResNetV2."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    model = create_resnet("resnet18", norm=norm, preact=True, in_chans=3)
    evonorm = create_resnet("resnet18", norm="evonorm_b0", in_chans=3)
    assert isinstance(model, ResNetV2) and isinstance(evonorm, ResNetV2)
    kind = BatchNormAct2d if norm == "batchnorm" else GroupNormAct
    norms = [m for m in model.modules() if isinstance(m, kind)]
    evos = [m for m in evonorm.modules() if isinstance(m, EvoNorm2dB0)]
    assert len(norms) == len(evos)  # one norm-act in each place an EvoNorm goes
    shapes = [p.shape for n, p in model.named_parameters() if "conv" in n]
    assert shapes == [p.shape for n, p in evonorm.named_parameters() if "conv" in n]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ConfigError, match="needs the pre-activation ResNet"):
        create_resnet("resnet18", norm="evonorm_s0", preact=False)
    with pytest.raises(ConfigError, match="pre-activation ResNet takes one of"):
        create_resnet("resnet18", norm="bcn_ws", preact=True)

"""Token norm layers against their formulas written out in float64 (visionbench/norms/token.py)."""

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visionbench.norms import build_norm, list_norms, norm_layer, norm_spec
from visionbench.norms.token import (
    ChannelAffine,
    DynamicTanh,
    PowerNorm,
    PRepBN,
    TokenBatchNorm,
    UnifiedNorm,
    attach_prepbn_schedule,
    fold_prepbn_,
)

NAMES = ["batchnorm", "powernorm", "unified", "prepbn", "dyt"]
F64 = torch.float64


def rand(*shape, scale=1.0):
    return torch.randn(*shape, dtype=F64) * scale


def randomize_affine_(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))


# ------------------------------------------------------------------------------------------
# catalog, construction


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_paper_formula_and_place(name):
    assert name in list_norms("token")
    spec = norm_spec(name, kind="token")
    assert spec.kind == "token" and spec.paper and spec.formula and spec.where
    assert spec.arxiv.count(".") == 1


def test_defaults_follow_official_code():
    assert norm_spec("powernorm", "token").defaults["alpha_fwd"] == 0.9
    assert norm_spec("powernorm", "token").defaults["alpha_bkw"] == 0.9
    un = build_norm("unified", 8, kind="token")
    assert (un.fp_window, un.bp_window, un.warmup_iters, un.outlier_filtration) == (4, 4, 4000,
                                                                                      True)
    assert (un.eps, un.momentum) == (1e-5, 0.9)
    pn = build_norm("powernorm", 8, kind="token")  # fairseq's: the fit's lr warmup, the heads
    assert (pn.warmup_iters, pn.group_num, pn.eps) == ("lr_warmup", 1, 1e-5)
    assert pn.grad_scale == "official"  # the code behind the published numbers
    assert build_norm("powernorm", 8, kind="token", num_heads=4).group_num == 4
    assert PowerNorm(8).warmup_iters == 10000 and PowerNorm(8).group_num == 1  # MaskPowerNorm
    assert build_norm("dyt", 8, kind="token").alpha.item() == 0.5
    prep = build_norm("prepbn", 8, kind="token")
    assert prep.repbn.alpha.item() == 1.0 and int(prep.total_steps) == 300000
    assert prep.ln.eps == 1e-6 and prep.repbn.bn.eps == 1e-5
    assert isinstance(build_norm("batchnorm", 8, kind="token"), TokenBatchNorm)
    assert isinstance(build_norm("batchnorm", 8, kind="conv"), nn.BatchNorm2d)


@pytest.mark.parametrize("name", NAMES)
def test_accepts_device_and_dtype(name):
    kw = {"warmup_iters": 10} if name == "powernorm" else {}
    m = build_norm(name, 8, kind="token", device="cpu", dtype=F64, **kw)
    tensors = list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == F64 and t.device.type == "cpu" for t in tensors)
    assert m(rand(3, 4, 8)).dtype == F64


# ------------------------------------------------------------------------------------------
# BatchNorm over tokens


@pytest.mark.parametrize("shape", [(6, 8), (3, 5, 8)])
def test_token_batchnorm_formula_and_running_stats(shape):
    bn = build_norm("batchnorm", 8, kind="token", dtype=F64)
    randomize_affine_(bn)
    w, b = bn.bn.weight.detach(), bn.bn.bias.detach()
    run_mean, run_var = torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64)
    for _ in range(2):
        x = rand(*shape, scale=2.0) + 1.0
        rows = x.reshape(-1, 8)
        mean = rows.mean(0)
        var = ((rows - mean) ** 2).mean(0)
        expected = (x - mean) / torch.sqrt(var + 1e-5) * w + b
        torch.testing.assert_close(bn(x), expected, rtol=0, atol=1e-12)
        n = rows.shape[0]
        run_mean = 0.9 * run_mean + 0.1 * mean
        run_var = 0.9 * run_var + 0.1 * var * n / (n - 1)
    torch.testing.assert_close(bn.bn.running_mean, run_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.bn.running_var, run_var, rtol=0, atol=1e-12)
    bn.eval()
    x = rand(*shape)
    expected = (x - run_mean) / torch.sqrt(run_var + 1e-5) * w + b
    torch.testing.assert_close(bn(x), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------
# PowerNorm


def group_scale_ref(x, groups):
    c = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], groups, c // groups)
    ms = (xg * xg).mean(-1, keepdim=True)
    return (xg / torch.sqrt(ms + 1e-5)).reshape(x.shape)


@pytest.mark.parametrize("grad_scale", ["paper", "official"])
def test_powernorm_forward_backward_against_written_out_algorithm(grad_scale):
    torch.manual_seed(0)
    c, groups, warmup, eps = 8, 2, 2, 1e-5
    pn = PowerNorm(c, warmup_iters=warmup, group_num=groups, grad_scale=grad_scale, dtype=F64)
    randomize_affine_(pn)
    w, b = pn.weight.detach().clone(), pn.bias.detach().clone()
    phi, ema_gz = torch.ones(c, dtype=F64), torch.zeros(c, dtype=F64)
    for t in range(1, 6):
        x = rand(3, 4, c, scale=1.5).requires_grad_()
        grad_out = rand(3, 4, c)
        pn.weight.grad = pn.bias.grad = None
        y = pn(x)
        y.backward(grad_out)

        xs = group_scale_ref(x, groups)  # differentiable: the exact part of the chain
        rows = xs.detach().reshape(-1, c)
        var = (rows * rows).mean(0)
        denom = var if t <= warmup else phi.clone()
        z = rows / torch.sqrt(denom + eps)
        torch.testing.assert_close(y.reshape(-1, c), z * w + b, rtol=0, atol=1e-12)
        if t < warmup:
            phi = phi * (t - 1) / t + var / t
        phi = 0.9 * phi + 0.1 * var
        torch.testing.assert_close(pn.running_phi, phi, rtol=0, atol=1e-12)

        go = grad_out.reshape(-1, c)
        g = go * w
        approx = g - (1 - 0.9) * ema_gz * z
        ema_gz = ema_gz + (approx * z).mean(0)
        grad_denom = denom if grad_scale == "paper" else var
        grad_xs = (approx / torch.sqrt(grad_denom + eps)).reshape(x.shape)
        (grad_x,) = torch.autograd.grad(xs, x, grad_xs)
        torch.testing.assert_close(x.grad, grad_x, rtol=0, atol=1e-10)
        torch.testing.assert_close(pn.ema_gz, ema_gz, rtol=0, atol=1e-12)
        torch.testing.assert_close(pn.weight.grad, (go * z).sum(0), rtol=0, atol=1e-12)
        torch.testing.assert_close(pn.bias.grad, go.sum(0), rtol=0, atol=1e-12)
    assert int(pn.iters) == 5
    pn.eval()
    x = rand(2, 3, c)
    expected = group_scale_ref(x, groups) / torch.sqrt(phi + eps) * w + b
    torch.testing.assert_close(pn(x), expected, rtol=0, atol=1e-12)
    assert int(pn.iters) == 5  # eval does not count


def test_powernorm_statistics_skip_padding_and_2d_input():
    pn = PowerNorm(8, warmup_iters=5, dtype=F64)
    x = rand(2, 4, 8)
    pad = torch.tensor([[False, False, True, True], [False, False, False, True]])
    pn(x, pad_mask=pad)
    xs = group_scale_ref(x, 1)
    var = (xs[~pad] ** 2).mean(0)
    torch.testing.assert_close(pn.running_phi, var, rtol=0, atol=1e-12)  # t=1: phi = var
    assert pn(rand(6, 8)).shape == (6, 8)


def test_counter_resumes_from_state_dict():
    pn = PowerNorm(8, warmup_iters=3, dtype=F64)
    for _ in range(2):
        pn(rand(4, 8))
    other = PowerNorm(8, warmup_iters=3, dtype=F64)
    other(rand(4, 8))  # its Python mirror of the counter is now 1
    other.load_state_dict(pn.state_dict())
    phi = other.running_phi.clone()
    x = rand(4, 8)
    out = other(x)  # step 3 <= warmup: batch statistic; then step 4 uses running_phi
    assert int(other.iters) == 3
    xs = group_scale_ref(x, 1)
    torch.testing.assert_close(out, xs / torch.sqrt((xs ** 2).mean(0) + 1e-5), atol=1e-12,
                               rtol=0)
    phi = 0.9 * phi + 0.1 * (xs ** 2).mean(0)
    x = rand(4, 8)
    torch.testing.assert_close(other(x), group_scale_ref(x, 1) / torch.sqrt(phi + 1e-5),
                               atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------
# Unified Normalization


class UNReference:
    """UN1d/UN2dFunction of the official file, one step at a time, in float64."""

    def __init__(self, c, window, warmup, eps=1e-5, m=0.9):
        self.w_fp = self.w_bp = window
        self.warmup, self.eps, self.m = warmup, eps, m
        self.running_var = torch.ones(c, dtype=F64)
        self.ema_gz = torch.zeros(c, dtype=F64)
        self.buf_x2 = torch.zeros(window, c, dtype=F64)
        self.buf_gz = torch.zeros(window, c, dtype=F64)
        self.skips = 0
        self.used_geometric_mean = self.used_compensation = False

    def step(self, t, x, grad_out, w, b):
        eps, m = self.eps, self.m
        x2 = (x * x).mean(0)
        recorded = torch.var(torch.sqrt(self.buf_x2))
        self.buf_x2[t % self.w_fp] = x2
        skip = self.w_fp <= 1
        if t >= self.warmup:
            am = self.buf_x2.mean(0)
            gm = torch.exp(torch.log(self.buf_x2).mean(0))
            if ((am - gm) > recorded * self.w_fp).sum() > 0:
                self.buf_x2[t % self.w_fp] = self.running_var
                skip = True
                self.skips += 1
        if t <= self.w_fp or t < self.warmup or skip:
            var = x2
        else:
            var = torch.exp(torch.log(self.buf_x2).mean(0))
            self.used_geometric_mean = True
        r = torch.sqrt(var + eps) / torch.sqrt(self.running_var + eps)
        if t <= max(1000, self.warmup) or skip:
            r = torch.ones_like(r)
        else:
            r = r.clamp(0.2, 5)
            self.used_compensation = True
        z = x / torch.sqrt(var + eps)
        self.running_var = m * self.running_var + (1 - m) * var
        y = w * z + b

        g = grad_out * w * r
        gz = (g * z).mean(0)
        self.buf_gz[t % self.w_bp] = self.ema_gz if skip else gz
        if t <= self.w_bp or t < self.warmup or skip:
            mean_gz = gz
        else:
            mean_gz = self.buf_gz.mean(0)
        self.ema_gz = self.ema_gz * m + (1 - m) * mean_gz
        approx = g - (mean_gz if skip else self.ema_gz) * z
        grad_x = approx / torch.sqrt(var + eps)
        return y, grad_x, (grad_out * r * z).sum(0), grad_out.sum(0), skip


def test_unified_norm_forward_backward_against_official_algorithm():
    torch.manual_seed(1)
    c, window, warmup = 8, 2, 3
    un = UnifiedNorm(c, window_size=window, warmup_iters=warmup, outlier_filtration=True,
                     dtype=F64)
    randomize_affine_(un)
    w, b = un.weight.detach().clone(), un.bias.detach().clone()
    ref = UNReference(c, window, warmup)
    channel_scale = torch.linspace(0.5, 3.0, c, dtype=F64)
    skipped = []
    steps = list(range(1, 7)) + list(range(1001, 1011))
    for t in steps:
        if t == 1001:  # jump past the r-compensation threshold through a state-dict round trip
            state = un.state_dict()
            state["iters"] = torch.tensor(1000)
            un.load_state_dict(state)
        scale = 40.0 if t in (1004, 1008) else 1.0
        x = (rand(3, 4, c) * channel_scale * scale).requires_grad_()
        grad_out = rand(3, 4, c)
        un.weight.grad = un.bias.grad = None
        y = un(x)
        y.backward(grad_out)
        y_ref, gx_ref, gw_ref, gb_ref, skip = ref.step(t, x.detach().reshape(-1, c),
                                                       grad_out.reshape(-1, c), w, b)
        skipped.append(skip)
        torch.testing.assert_close(y.reshape(-1, c), y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad.reshape(-1, c), gx_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(un.weight.grad, gw_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.bias.grad, gb_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.ema_gz, ref.ema_gz, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(un.buffer_x2, ref.buf_x2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(un.buffer_gz, ref.buf_gz, rtol=1e-12, atol=1e-10)
    assert any(skipped) and not all(skipped[len(range(1, 7)):])  # both paths were taken
    assert ref.used_geometric_mean and ref.used_compensation
    assert int(un.skip_counter) == ref.skips and int(un.iters) == 1010
    un.eval()
    x = rand(2, 3, c)
    expected = x / torch.sqrt(ref.running_var + 1e-5) * w + b
    torch.testing.assert_close(un(x), expected, rtol=0, atol=1e-12)


def test_unified_norm_window_one_always_uses_batch_statistics():
    un = UnifiedNorm(8, window_size=1, warmup_iters=0, dtype=F64)
    for _ in range(3):
        x = rand(5, 8)
        torch.testing.assert_close(un(x), x / torch.sqrt((x * x).mean(0) + 1e-5), rtol=0,
                                   atol=1e-12)
    assert un(rand(2, 3, 8)).shape == (2, 3, 8)


# ------------------------------------------------------------------------------------------
# PRepBN


def layernorm_ref(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def repbn_train_ref(x, bn_w, bn_b, alpha):
    rows = x.reshape(-1, x.shape[-1])
    mean = rows.mean(0)
    var = ((rows - mean) ** 2).mean(0)
    return (x - mean) / torch.sqrt(var + 1e-5) * bn_w + bn_b + alpha * x


def prepbn_params(m):
    return (m.ln.weight.detach(), m.ln.bias.detach(), m.repbn.bn.weight.detach(),
            m.repbn.bn.bias.detach(), m.repbn.alpha.detach())


def test_prepbn_lambda_advances_by_optimizer_steps_and_resumes():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 8), PRepBN(8, total_steps=4)).double()
    norm = model[1]
    randomize_affine_(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach_prepbn_schedule(model, opt, total_steps=4)
    for _ in range(3):  # forwards (and backwards) without optimizer.step do not advance it
        model(rand(2, 3, 8)).sum().backward()
    assert int(norm.step) == 0 and norm.lam().item() == 1.0
    for k in range(1, 7):
        opt.step()
        assert int(norm.step) == k
        assert norm.lam().item() == pytest.approx(max(0.0, 1 - k / 4))
    lw, lb, bw, bb, alpha = prepbn_params(norm)
    x = rand(2, 3, 8)
    h = model[0](x)
    expected = 0.0 * layernorm_ref(h, lw, lb) + 1.0 * repbn_train_ref(h, bw, bb, alpha)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)

    fresh = nn.Sequential(nn.Linear(8, 8), PRepBN(8)).double()
    fresh.load_state_dict(model.state_dict())
    assert int(fresh[1].step) == 6 and int(fresh[1].total_steps) == 4
    handle.remove()
    opt.step()
    assert int(norm.step) == 6


def test_prepbn_train_mix_warmup_and_eval():
    torch.manual_seed(3)
    norm = PRepBN(8, total_steps=4, warmup_steps=1, dtype=F64)
    randomize_affine_(norm)
    lw, lb, bw, bb, alpha = prepbn_params(norm)
    opt = torch.optim.SGD(norm.parameters(), lr=0.0)
    attach_prepbn_schedule(norm, opt)
    x = rand(2, 5, 8)
    torch.testing.assert_close(norm(x), layernorm_ref(x, lw, lb), rtol=0, atol=1e-12)
    assert torch.all(norm.repbn.bn.running_mean == 0)  # official: RepBN untouched in warmup
    for k, lam in [(1, 1.0), (2, 0.75), (3, 0.5)]:
        opt.step()
        assert int(norm.step) == k
        x = rand(2, 5, 8)
        expected = lam * layernorm_ref(x, lw, lb) + (1 - lam) * repbn_train_ref(x, bw, bb, alpha)
        torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    norm.eval()
    x = rand(2, 5, 8)
    bn = norm.repbn.bn
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bw + bb + alpha * x
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=1e-12)
    assert norm(rand(4, 8)).shape == (4, 8)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fold_prepbn_into_timm_vit_matches_eval_output(qkv_bias):
    torch.manual_seed(4)
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                              num_classes=0, qkv_bias=qkv_bias,
                              norm_layer=norm_layer("prepbn", kind="token")).double()
    norms = [m for m in model.modules() if isinstance(m, PRepBN)]
    assert len(norms) == 5
    for m in norms:
        randomize_affine_(m)
    with torch.no_grad():
        for _ in range(3):  # running statistics
            model(rand(4, 3, 16, 16))
    model.eval()
    x = rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        fold_prepbn_(model)
        folded = model(x)
    assert not any(isinstance(m, PRepBN) for m in model.modules())
    assert all(isinstance(b.norm1, nn.Identity) and isinstance(b.norm2, nn.Identity)
               for b in model.blocks)
    assert isinstance(model.norm, ChannelAffine)
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------
# DyT


def test_dyt_formula_token_and_channels_first():
    dyt = build_norm("dyt", 8, kind="token", dtype=F64)
    randomize_affine_(dyt)
    with torch.no_grad():
        dyt.alpha.fill_(0.7)
    x = rand(2, 3, 8, scale=3.0)
    expected = torch.tanh(0.7 * x) * dyt.weight + dyt.bias
    torch.testing.assert_close(dyt(x), expected, rtol=0, atol=1e-12)
    conv = DynamicTanh(4, channels_last=False, alpha_init_value=0.5, dtype=F64)
    randomize_affine_(conv)
    x = rand(2, 4, 3, 3)
    w, b = conv.weight.view(1, 4, 1, 1), conv.bias.view(1, 4, 1, 1)
    expected = torch.tanh(conv.alpha * x) * w + b
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-12)
    dyt(rand(2, 3, 8)).sum().backward()
    assert dyt.alpha.grad is not None and math.isfinite(dyt.alpha.grad.item())


# ------------------------------------------------------------------------------------------
# mixed precision, timm


@pytest.mark.parametrize("name", NAMES)
def test_finite_under_bf16_autocast(name):
    torch.manual_seed(5)
    kw = {"warmup_iters": 1} if name in ("powernorm", "unified") else {}
    if name == "prepbn":
        kw = {"total_steps": 2}
    stack = nn.Sequential(nn.Linear(16, 16), build_norm(name, 16, kind="token", **kw),
                          nn.Linear(16, 16), build_norm(name, 16, kind="token", **kw))
    for _ in range(3):
        stack.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stack(torch.randn(2, 5, 16))
        assert torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        grads = [p.grad for p in stack.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_builds_inside_timm_vit(name, pool):
    options = {"warmup_iters": 10} if name == "powernorm" else None
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                              global_pool=pool,
                              norm_layer=norm_layer(name, kind="token", options=options))
    expected_type = type(build_norm(name, 32, kind="token"))
    assert isinstance(model.blocks[0].norm1, expected_type)
    final = model.fc_norm if pool == "avg" else model.norm  # fc_norm sees (B, C)
    assert isinstance(final, expected_type)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()

"""Model conversions between norm layers, and test-time norm methods.

Four tools that change the norm layers of a model that is already built (or trained):

``convert_to_crmsnorm``
    "Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN Transformers"
    (Jiang et al., NeurIPS 2023, arXiv 2305.14858). Followed: ZixuanJiang/pre-rmsnorm-transformer,
    ``example.py`` (the step-by-step Pre-LN -> zero-mean main branch -> Pre-RMSNorm ->
    Pre-CRMSNorm translation of a ViT) and ``torch/customized_layer.py`` (``crms_norm``).
    The timm ViT is converted in place of that example's functional ViT.
``convert_to_dyt``
    "Transformers without Normalization" (Zhu et al., CVPR 2025, arXiv 2503.10622). Followed:
    jiachenzhu/DyT, ``dynamic_tanh.py`` (``convert_ln_to_dyt``), with the catalog's ``dyt``.
``attach_fakeln`` / ``FakeLNSchedule`` / ``remove_fake_layernorms``
    "Transformers Don't Need LayerNorm at Inference Time" (Baroni et al., arXiv 2507.02559) and
    "You can remove GPT2's LayerNorm by fine-tuning" (Heimersheim, arXiv 2409.13710). Followed:
    submarat/removing-layer-norm, ``train.py`` (``FakeLayerNorm``, ``LNRemover``, the order of
    ``ln_removers``), ``config.py`` (``start_*``/``gap_*`` schedules, ``momentum``) and
    ``utils.py`` (``remove_layernorm_by_scaling``, the removal); also
    ApolloResearch/gpt2_noLN ``train.py`` (same schedule).
``alpha_bn``
    "Test-time Batch Statistics Calibration for Covariate Shift" (You, Li and Zhao,
    arXiv 2110.04065), alpha-BN. No official code was found; the mixing formula is implemented
    as stated in :func:`alpha_bn`. Wrapping each BatchNorm in place follows the structure of
    ``AlphaBatchNorm`` in bethgelab/robusta ``robusta/batchnorm/bn.py`` (as carried by
    mariodoebler/test-time-adaptation ``classification/methods/bn.py``), whose alpha weights the
    other side.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from timm.layers import LayerNorm2d, LayerScale
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from visionbench.norms.catalog import build_norm

__all__ = [
    "AffineRMSNorm",
    "AlphaBatchNorm",
    "CRMSNorm",
    "CenteredAffine",
    "FakeLNSchedule",
    "FakeLayerNorm",
    "alpha_bn",
    "alpha_bn_applied",
    "attach_fakeln",
    "calibrate_fakeln",
    "convert_to_crmsnorm",
    "convert_to_dyt",
    "remove_alpha_bn",
    "remove_fake_layernorms",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _ln_affine(ln: nn.LayerNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, beta)`` of a LayerNorm, ones/zeros (dtype/device of ``like``) where it has none."""
    kw = {"dtype": like.dtype, "device": like.device}
    dim = ln.normalized_shape[-1]
    gamma = ln.weight.detach() if ln.weight is not None else torch.ones(dim, **kw)
    beta = ln.bias.detach() if getattr(ln, "bias", None) is not None else torch.zeros(dim, **kw)
    return gamma, beta


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give ``lin`` new weights (shapes may change); keeps the module, so hooks survive."""
    lin.weight = nn.Parameter(weight.detach().clone())
    lin.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    lin.out_features, lin.in_features = weight.shape


def _fold_affine_into_reader(lin: nn.Linear, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """``W (gamma * y + beta) + c  ==  (W diag(gamma)) y + (W beta + c)``."""
    w = lin.weight.detach()
    bias = w @ beta.to(w.dtype)
    if lin.bias is not None:
        bias = bias + lin.bias.detach()
    _set_linear(lin, w * gamma.to(w.dtype), bias)


def _float_compute(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------------
# 1. Pre-LN -> Pre-RMSNorm / Pre-CRMSNorm
# ---------------------------------------------------------------------------------------------


class CRMSNorm(nn.Module):
    """Compressed RMSNorm over a ``dim``-dim compression of a zero-mean ``(dim + 1)`` vector.

    A zero-mean vector ``z`` of ``dim + 1`` features is stored without its last element
    ``z_last = -sum(x)``, so ``RMSNorm(z) = x / sqrt((sum(x^2) + sum(x)^2) / (dim + 1) + eps)``
    (``crms_norm`` of the official ``torch/customized_layer.py``). With ``decompress=True`` the
    discarded element is put back and an affine over the ``dim + 1`` features follows: that is
    the last norm of a headless converted model, whose output is then the Pre-LN model's.
    """

    def __init__(
        self, dim: int, eps: float = 1e-6, *, decompress: bool = False, device=None, dtype=None
    ):
        super().__init__()
        self.dim, self.eps, self.decompress = dim, eps, decompress
        if decompress:
            self.weight = nn.Parameter(torch.ones(dim + 1, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(dim + 1, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _float_compute(x)
        sum_sq = xf.square().sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).square()
        y = (xf * torch.rsqrt(sum_sq / (self.dim + 1) + self.eps)).to(x.dtype)
        if not self.decompress:
            return y
        y = torch.cat([y, -y.sum(-1, keepdim=True)], dim=-1)
        return y * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, decompress={self.decompress}"


class AffineRMSNorm(nn.RMSNorm):
    """``gamma * x / rms(x) + beta``: RMSNorm with LayerNorm's full affine (a bias too).

    The last norm of a headless Pre-RMSNorm model keeps the Pre-LN model's ``gamma``/``beta``,
    since no following linear exists to absorb them.
    """

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__(dim, eps=eps, elementwise_affine=True, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


def _vit_readers(block: Block) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """The linears that read ``norm1``'s and ``norm2``'s outputs in a timm ``Block``."""
    attn, mlp = block.attn, block.mlp
    readers1 = [attn.qkv] + ([attn.gate] if getattr(attn, "gate", None) is not None else [])
    names2 = ("fc1_g", "fc1_x") if hasattr(mlp, "fc1_g") else ("fc1",)
    readers2 = [getattr(mlp, n) for n in names2]
    return readers1, readers2


def _vit_writers(block: Block) -> list[tuple[nn.Linear, nn.Module]]:
    """``(linear, layer scale)`` pairs whose outputs are added to the residual stream."""
    return [(block.attn.proj, block.ls1), (block.mlp.fc2, block.ls2)]


def _check_pre_ln_vit(model: nn.Module) -> str:
    """Raise unless ``model`` is a Pre-LN timm ViT this conversion is exact for.

    Returns the attribute name of the last norm (``norm`` or ``fc_norm``).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    if not isinstance(model.norm_pre, nn.Identity):
        raise ValueError("ViTs with a pre-norm (norm_pre, CLIP-style) are not supported: the "
                         "main branch then starts with an affine norm output, not a zero-mean one")
    embed = model.patch_embed
    if not isinstance(getattr(embed, "proj", None), nn.Conv2d):
        raise ValueError("expected patch_embed.proj to be a Conv2d patch projection")
    if not isinstance(getattr(embed, "norm", nn.Identity()), nn.Identity):
        raise ValueError("patch embeddings with a norm layer are not supported")
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            raise ValueError(f"blocks.{i} is {type(block).__name__}; only timm's pre-norm Block "
                             "is supported")
        for name in ("norm1", "norm2"):
            norm = getattr(block, name)
            if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
                raise ValueError(f"blocks.{i}.{name} is {type(norm).__name__}: expected the "
                                 "nn.LayerNorm of a Pre-LN model")
        readers1, readers2 = _vit_readers(block)
        writers = [w for w, _ in _vit_writers(block)]
        if not all(isinstance(m, nn.Linear) for m in readers1 + readers2 + writers):
            raise ValueError(f"blocks.{i}: attention and MLP projections must be nn.Linear")
        for _, ls in _vit_writers(block):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                raise ValueError(f"blocks.{i}: unsupported layer scale {type(ls).__name__}")
    if isinstance(model.norm, nn.LayerNorm):
        return "norm"
    linear_pool = model.attn_pool is None and model.global_pool in ("token", "avg", "")
    if isinstance(model.fc_norm, nn.LayerNorm) and linear_pool:
        return "fc_norm"
    raise ValueError("the residual stream must end in a LayerNorm (model.norm, or model.fc_norm "
                     "after token/avg pooling)")


@torch.no_grad()
def _recenter_main_branch(model: VisionTransformer) -> None:
    """Make every write to the residual stream zero-mean over features (``zm_*`` in example.py).

    Layer scales are folded into their projections first: ``gamma * (Wx + b)`` is zero-mean only
    if ``diag(gamma) W`` and ``gamma * b`` are recentred together.
    """
    proj = model.patch_embed.proj
    proj.weight.sub_(proj.weight.mean(dim=0, keepdim=True))
    if proj.bias is not None:
        proj.bias.sub_(proj.bias.mean())
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if p is not None:
            p.sub_(p.mean(dim=-1, keepdim=True))
    for block in model.blocks:
        for i, (lin, ls) in enumerate(_vit_writers(block)):
            w = lin.weight.detach()
            b = lin.bias.detach() if lin.bias is not None else None
            if isinstance(ls, LayerScale):
                w, b = w * ls.gamma[:, None], None if b is None else b * ls.gamma
                setattr(block, f"ls{i + 1}", nn.Identity())
            w = w - w.mean(dim=0, keepdim=True)
            _set_linear(lin, w, None if b is None else b - b.mean())


@torch.no_grad()
def _compress_main_branch(model: VisionTransformer) -> None:
    """Drop the last feature of the (zero-mean) residual stream (``compressed_*`` in example.py).

    Writers lose their last output row; readers of a normalized compressed vector ``y`` see
    ``W [y; -sum(y)] = (W[:, :-1] - W[:, -1:]) y``.
    """
    proj = model.patch_embed.proj
    proj.weight = nn.Parameter(proj.weight.detach()[:-1].clone())
    if proj.bias is not None:
        proj.bias = nn.Parameter(proj.bias.detach()[:-1].clone())
    proj.out_channels -= 1
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if p is not None:
            setattr(model, name, nn.Parameter(p.detach()[..., :-1].clone()))
    for block in model.blocks:
        for lin, _ in _vit_writers(block):
            b = lin.bias.detach()[:-1] if lin.bias is not None else None
            _set_linear(lin, lin.weight.detach()[:-1], b)
        readers1, readers2 = _vit_readers(block)
        for lin in readers1 + readers2:
            w = lin.weight.detach()
            b = lin.bias.detach() if lin.bias is not None else None
            _set_linear(lin, w[:, :-1] - w[:, -1:], b)


def convert_to_crmsnorm(model: VisionTransformer, variant: str = "crms") -> VisionTransformer:
    """Turn a Pre-LN timm ViT into the equivalent Pre-RMSNorm (``"rms"``) or Pre-CRMSNorm
    (``"crms"``) ViT, in place; returns ``model``.

    Steps, as in the official ``example.py``: (1) recentre every write to the residual stream
    (patch projection, class/register tokens, position embedding, ``attn.proj`` and ``mlp.fc2``,
    layer scales folded in first) so the main branch is zero-mean, where LayerNorm equals
    RMSNorm; (2) fold each block LayerNorm's ``gamma``/``beta`` into the linears that read it
    (``attn.qkv`` and the gate if any, ``mlp.fc1``); (3) swap the block norms for a plain RMSNorm
    (``nn.RMSNorm`` without affine, the fused kernel). For ``"crms"`` the zero-mean stream is
    further stored in ``embed_dim - 1`` features (the last one is minus the sum of the others)
    and normalised by :class:`CRMSNorm`.

    The last norm (``norm``, or ``fc_norm`` after token/avg pooling) has no linear after it in a
    headless model, so it keeps the affine: :class:`AffineRMSNorm`, or :class:`CRMSNorm` with
    ``decompress=True`` which also restores the full ``embed_dim`` features. ``forward`` (and
    ``forward_features`` when the last norm is ``norm``) therefore returns what the Pre-LN model
    returns (float64: to ~1e-14); block outputs are the recentred (for ``"crms"`` also
    compressed) stream. The head, pooling and anything after the last norm are untouched.

    Exact in eval mode, and in training when dropout on the main branch (``pos_drop``,
    ``proj_drop``) is off. Training the ``"rms"`` model lets the stream drift off zero-mean (the
    official code re-projects the weights on every forward for that); ``"crms"`` has no mean
    direction left to drift into.
    """
    if variant not in ("rms", "crms"):
        raise ValueError(f"variant {variant!r}: expected 'rms' or 'crms'")
    last = _check_pre_ln_vit(model)
    dim = model.embed_dim
    like = model.patch_embed.proj.weight
    final_ln = getattr(model, last)
    gamma_f, beta_f = _ln_affine(final_ln, like)

    _recenter_main_branch(model)
    block_eps = []
    for block in model.blocks:
        readers1, readers2 = _vit_readers(block)
        for norm, readers in ((block.norm1, readers1), (block.norm2, readers2)):
            gamma, beta = _ln_affine(norm, like)
            for lin in readers:
                _fold_affine_into_reader(lin, gamma, beta)
        block_eps.append((block.norm1.eps, block.norm2.eps))
    if variant == "crms":
        _compress_main_branch(model)

    dd = {"device": like.device, "dtype": like.dtype}
    for block, (eps1, eps2) in zip(model.blocks, block_eps, strict=True):
        if variant == "rms":
            block.norm1 = nn.RMSNorm(dim, eps=eps1, elementwise_affine=False, **dd)
            block.norm2 = nn.RMSNorm(dim, eps=eps2, elementwise_affine=False, **dd)
        else:
            block.norm1 = CRMSNorm(dim - 1, eps=eps1, **dd)
            block.norm2 = CRMSNorm(dim - 1, eps=eps2, **dd)
    if variant == "rms":
        final = AffineRMSNorm(dim, eps=final_ln.eps, **dd)
    else:
        final = CRMSNorm(dim - 1, eps=final_ln.eps, decompress=True, **dd)
    with torch.no_grad():
        final.weight.copy_(gamma_f)
        final.bias.copy_(beta_f)
    setattr(model, last, final)
    return model


# ---------------------------------------------------------------------------------------------
# 2. LayerNorm -> DyT
# ---------------------------------------------------------------------------------------------


def convert_to_dyt(model: nn.Module, alpha_init: float = 0.5) -> nn.Module:
    """Swap every LayerNorm (``nn.LayerNorm`` and its subclasses) for the catalog's DyT.

    As the official ``convert_ln_to_dyt``: every LayerNorm found, at any depth, becomes a fresh
    ``DyT`` over the same features (``alpha = alpha_init``, weight 1, bias 0; the LayerNorm's
    affine is not carried over); timm's channels-first ``LayerNorm2d`` gets
    ``channels_last=False`` as in the official code. Returns the model (a new module when
    ``model`` itself is a LayerNorm).
    """

    def make(ln: nn.LayerNorm) -> nn.Module:
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {tuple(ln.normalized_shape)}: DyT takes one dim")
        ref = next(iter(ln.parameters()), None)
        dd = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        return build_norm("dyt", ln.normalized_shape[0], kind="token", alpha_init_value=alpha_init,
                          channels_last=not isinstance(ln, LayerNorm2d), **dd)

    if isinstance(model, nn.LayerNorm):
        return make(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for name, ln in targets:
        _replace_module(model, name, make(ln))
    return model


# ---------------------------------------------------------------------------------------------
# 3. LayerNorm removal by fine-tuning (FakeLN)
# ---------------------------------------------------------------------------------------------


class FakeLayerNorm(nn.Module):
    """A LayerNorm with a switch: real (per-token std) or fake (one frozen scalar std).

    Real: ``gamma * (x - mean(x)) / sqrt(var(x) + eps) + beta``; in training mode it also tracks
    the average per-token std, ``avg <- momentum * avg + (1 - momentum) * batch_mean_std``
    (``recompute_average_std`` of the official ``FakeLayerNorm``). Fake:
    ``gamma * (x - mean(x)) / std + beta`` with ``std`` frozen to that average when the switch
    is thrown (:meth:`make_fake`). The mean subtraction stays, as in the method. The LayerNorm's
    own ``weight``/``bias`` Parameters are reused, so an optimizer built before the swap still
    updates them.
    """

    def __init__(self, ln: nn.LayerNorm, momentum: float = 0.9):
        super().__init__()
        if len(ln.normalized_shape) != 1:
            raise ValueError("FakeLayerNorm normalizes one (the last) dim")
        self.dim, self.eps, self.momentum = ln.normalized_shape[0], ln.eps, momentum
        self.weight = ln.weight
        self.bias = getattr(ln, "bias", None)
        ref = next(iter(ln.parameters()), None)
        dd = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        self.register_buffer("is_fake", torch.tensor(False, device=dd.get("device")))
        self.register_buffer("average_std", torch.tensor(float("nan"), **dd))
        self.register_buffer("std", torch.tensor(float("nan"), **dd))
        self._sum, self._count = None, 0  # exact averaging while calibrating

    @property
    def fake(self) -> bool:
        return bool(self.is_fake)

    @torch.no_grad()
    def make_fake(self) -> None:
        if torch.isnan(self.average_std):
            raise RuntimeError("no std measured yet: run calibrate_fakeln(model, batches) or "
                               "some training steps before making a norm fake")
        self.std.copy_(self.average_std)
        self.is_fake.fill_(True)

    @torch.no_grad()
    def _track(self, token_std: torch.Tensor) -> None:
        batch = token_std.mean().to(self.average_std.dtype)
        if self._sum is not None:
            self._sum += batch * token_std.numel()
            self._count += token_std.numel()
        elif torch.isnan(self.average_std):
            self.average_std.copy_(batch)
        else:
            self.average_std.mul_(self.momentum).add_((1 - self.momentum) * batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centered = x - x.mean(-1, keepdim=True)
        if self.fake:
            y = centered / self.std
        else:
            token_std = torch.sqrt(centered.square().mean(-1, keepdim=True) + self.eps)
            if self.training or self._sum is not None:
                self._track(token_std.detach())
            y = centered / token_std
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        mode = f"fake, std={self.std.item():.4g}" if self.fake else "real"
        return f"{self.dim}, eps={self.eps}, {mode}"


class CenteredAffine(nn.Module):
    """``(x - mean(x)) * weight + bias``: a removed LayerNorm that has no linear to fold into."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.mean(-1, keepdim=True)) * self.weight
        return y + self.bias if self.bias is not None else y


def _fakeln_group(name: str) -> str:
    """``norm2`` (the official ``ln_2``), ``norm1`` (``ln_1``) or ``final`` (``ln_f``: every
    other LayerNorm, e.g. the final ``norm`` or a classifier's ``fc_norm``)."""
    leaf = name.rpartition(".")[2]
    return leaf if leaf in ("norm2", "norm1") else "final"


def _fakeln_order(names: list[str]) -> list[str]:
    """The official order: every ``ln_2`` (our ``norm2``) by depth, then every ``ln_1``
    (``norm1``), then the rest (the final norm) in module order."""
    rank = {"norm2": 0, "norm1": 1, "final": 2}
    return sorted(names, key=lambda n: rank[_fakeln_group(n)])  # stable: module order kept


def attach_fakeln(model: nn.Module, momentum: float = 0.9) -> list[str]:
    """Replace every ``nn.LayerNorm`` of ``model`` by a real :class:`FakeLayerNorm`, in place.

    Returns the names of the new modules in the order :class:`FakeLNSchedule` fakes them.
    ``momentum`` is the official config's default (0.9) for the running average of the std.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    if not targets:
        raise ValueError("the model has no nn.LayerNorm to attach FakeLN to")
    for name, ln in targets:
        if isinstance(ln, LayerNorm2d):
            raise ValueError(f"{name}: channels-first LayerNorm2d is not supported")
        _replace_module(model, name, FakeLayerNorm(ln, momentum=momentum))
    return _fakeln_order([n for n, _ in targets])


def _fake_norms(model: nn.Module) -> dict[str, FakeLayerNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeLayerNorm)}


@torch.no_grad()
def calibrate_fakeln(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Set each real FakeLayerNorm's average std to its exact mean per-token std over
    ``batches`` (the official ``std_dicts`` measured on data); returns ``{name: std}``."""
    norms = {n: m for n, m in _fake_norms(model).items() if not m.fake}
    was_training = model.training
    model.eval()
    for m in norms.values():
        m._sum, m._count = 0.0, 0
    try:
        for batch in batches:
            model(batch)
        for m in norms.values():
            if m._count:
                m.average_std.fill_(float(m._sum / m._count))
    finally:
        for m in norms.values():
            m._sum, m._count = None, 0
        model.train(was_training)
    return {n: float(m.average_std) for n, m in norms.items()}


class FakeLNSchedule:
    """Which FakeLayerNorms are fake at which step, on the official schedule.

    submarat/removing-layer-norm ``config.py`` (``gpt2``: ``start_ln2 = 20`` = its lr
    ``warmup_steps``, ``gap_ln2 = 2``, ``gap_ln1qk = 2``, ``gap_ln1v = 3``, ``gap_lnf = None``)
    and ``train.py`` (``LNRemover``, ``ln_removers``): with ``L`` blocks,

    - ``norm2`` of block ``i`` turns fake at ``start + i * gap_norm2``;
    - the official q/k phase of ``ln_1`` follows (``L * gap_norm1_qk`` steps), then ``norm1`` of
      block ``i`` turns fake at ``start + L * (gap_norm2 + gap_norm1_qk) + i * gap_norm1``;
    - last, every other norm (the final ``norm`` / ``fc_norm``, the official ``ln_f``) turns fake
      at once, at ``start + L * (gap_norm2 + gap_norm1_qk + gap_norm1)`` (``start_lnf``).

    Gaps of 0 fake a whole group at its start. ``start`` should be the lr warmup's last step
    (the official schedule starts as the warmup ends). Call :meth:`step` once at the beginning
    of every optimizer step (the official ``on_step_begin``); it throws the switches due and
    returns their names.

    Deviation: the official code fakes GPT-2's ``ln_1`` in two steps, its q/k path (at
    ``start_ln1qk + i * gap_ln1qk``) then its v path (``start_ln1v + i * gap_ln1v``), by
    re-wiring attention. timm's fused ``qkv`` reads one input, so ``norm1`` turns fake whole, at
    the official v step: the point where the official ``ln_1`` is entirely fake and its shared
    std buffer stops following the running average.
    """

    def __init__(self, model: nn.Module, start: int = 0, gap_norm2: int = 2,
                 gap_norm1_qk: int = 2, gap_norm1: int = 3):
        if min(start, gap_norm2, gap_norm1_qk, gap_norm1) < 0:
            raise ValueError("start and the gaps must be >= 0")
        norms = _fake_norms(model)
        if not norms:
            raise ValueError("no FakeLayerNorm in the model: call attach_fakeln(model) first")
        self.norms, self.current = norms, 0
        self.order = _fakeln_order(list(norms))
        by_group: dict[str, list[str]] = {"norm2": [], "norm1": [], "final": []}
        for name in self.order:
            by_group[_fakeln_group(name)].append(name)
        depth = max(len(by_group["norm2"]), len(by_group["norm1"]))
        start_norm1 = start + depth * (gap_norm2 + gap_norm1_qk)
        start_final = start_norm1 + depth * gap_norm1
        self.steps = {name: start + i * gap_norm2 for i, name in enumerate(by_group["norm2"])}
        self.steps.update({name: start_norm1 + i * gap_norm1
                           for i, name in enumerate(by_group["norm1"])})
        self.steps.update({name: start_final for name in by_group["final"]})

    def step_of(self, name: str) -> int:
        return self.steps[name]

    def fake_at(self, step: int) -> list[str]:
        """Names fake at ``step`` (in order), whatever the switches say now."""
        return [n for n in self.order if self.step_of(n) <= step]

    def apply(self, step: int) -> list[str]:
        """Make fake every norm due at or before ``step``; returns those newly made fake."""
        newly = [n for n in self.fake_at(step) if not self.norms[n].fake]
        for name in newly:
            self.norms[name].make_fake()
        return newly

    def step(self) -> list[str]:
        newly = self.apply(self.current)
        self.current += 1
        return newly

    @property
    def done(self) -> bool:
        return all(m.fake for m in self.norms.values())

    @property
    def last_step(self) -> int:
        return max(self.steps.values())


def _readers_of(model: nn.Module, name: str) -> list[nn.Linear] | None:
    """The linears that read norm ``name`` alone, when the architecture says so (timm Block)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, Block) or leaf not in ("norm1", "norm2"):
        return None
    readers = _vit_readers(parent)[0 if leaf == "norm1" else 1]
    return readers if all(isinstance(m, nn.Linear) for m in readers) else None


@torch.no_grad()
def remove_fake_layernorms(model: nn.Module, fold_into_linear: bool = True,
                           readers: dict[str, list[nn.Linear]] | None = None) -> nn.Module:
    """Remove every (fake) FakeLayerNorm, in place, without changing the function; returns it.

    A fake norm is affine: ``(x - mean(x)) * (gamma / std) + beta``. The official
    ``remove_layernorm_by_scaling`` keeps it as a LayerNorm with ``eps = 1e12`` and weights
    ``* 1e6 / std`` (an approximation that leaves the mean subtraction in). Here it is removed
    exactly: where a timm ``Block`` says which linears read it (``norm1`` -> ``attn.qkv``,
    ``norm2`` -> ``mlp.fc1``) and ``fold_into_linear``, centering, ``1 / std``, ``gamma`` and
    ``beta`` fold into those linears (``W' = W diag(gamma / std) (I - 11^T / d)``,
    ``b' = b + W beta``) and the norm becomes ``nn.Identity``. ``readers`` names the linears
    that read any other norm alone (e.g. ``{"fc_norm": [head]}``: a classifier's head reads its
    pooled, normed features), which fold the same way; a norm no linear reads (a headless
    model's final norm) becomes :class:`CenteredAffine`. Raises if a norm is still real.
    """
    norms = _fake_norms(model)
    real = [n for n, m in norms.items() if not m.fake]
    if real:
        raise RuntimeError(f"norms still real (finish the schedule first): {real}")
    for name, norm in norms.items():
        gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(norm.std)
        scale = gamma / norm.std
        known = (readers or {}).get(name) or _readers_of(model, name)
        readers_here = known if fold_into_linear else None
        if readers_here is None:
            _replace_module(model, name, CenteredAffine(scale.expand(norm.dim), norm.bias))
            continue
        beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(scale)
        for lin in readers_here:
            w = lin.weight.detach()
            bias = w @ beta.expand(norm.dim).to(w.dtype)
            if lin.bias is not None:
                bias = bias + lin.bias.detach()
            w = w * scale.to(w.dtype)
            _set_linear(lin, w - w.mean(dim=1, keepdim=True), bias)
        _replace_module(model, name, nn.Identity())
    return model


# ---------------------------------------------------------------------------------------------
# 4. alpha-BN: test-time batch statistics calibration
# ---------------------------------------------------------------------------------------------


class AlphaBatchNorm(nn.Module):
    """A BatchNorm that normalizes with source statistics mixed with the test batch's.

    ``mu = alpha * mu_source + (1 - alpha) * mu_batch`` and
    ``var = alpha * var_source + (1 - alpha) * var_batch``, where the source statistics are the
    wrapped layer's running buffers and the batch statistics are those train-mode BatchNorm
    normalizes with (mean and biased variance over every dim but the channel dim). So
    ``alpha = 1`` is the eval-mode layer and ``alpha = 0`` is test-time normalization (train-mode
    normalization); the running buffers are never updated, in any mode.
    """

    def __init__(self, bn: _BatchNorm, alpha: float):
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("alpha-BN needs source statistics: the BatchNorm tracks none")
        self.bn = bn
        self.alpha = _check_alpha(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable in ``x`` through the batch statistics (test-time adaptation trains
        through them), so the normalization is written out rather than passed to
        ``F.batch_norm`` as running statistics, which must not carry a gradient."""
        bn = self.bn
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        compute = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(compute)
        var_t, mu_t = torch.var_mean(xc, dim=dims, correction=0)
        mu = self.alpha * bn.running_mean.to(compute) + (1 - self.alpha) * mu_t
        var = self.alpha * bn.running_var.to(compute) + (1 - self.alpha) * var_t
        y = (xc - mu.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        if bn.weight is not None:
            y = y * bn.weight.to(compute).view(shape)
        if bn.bias is not None:
            y = y + bn.bias.to(compute).view(shape)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def alpha_bn(model: nn.Module, alpha: float) -> nn.Module:
    """Apply alpha-BN to every BatchNorm (1d/2d/3d, sync, and any wrapper built on them).

    Each BatchNorm normalizes with ``alpha * source + (1 - alpha) * test batch`` statistics,
    for the mean and for the variance: **alpha weights the source (running) statistics**,
    ``alpha = 1`` is the plain eval-mode model, ``alpha = 0`` uses the test batch's statistics
    only (test-time normalization). The batch variance is the biased one that train-mode
    BatchNorm normalizes with. Beware: the widespread ``AlphaBatchNorm`` of bethgelab/robusta
    and mariodoebler/test-time-adaptation weights the *target* side with alpha (and takes the
    unbiased batch variance), so its ``alpha`` is ``1 - alpha`` here.

    Swaps each BatchNorm for :class:`AlphaBatchNorm` (holding the original as ``.bn``) in place;
    calling it again only changes alpha. Undo with :func:`remove_alpha_bn`, or use
    :func:`alpha_bn_applied` as a context manager. Running statistics are never modified.
    """
    alpha = _check_alpha(alpha)
    if isinstance(model, AlphaBatchNorm):
        model.alpha = alpha
        return model
    if isinstance(model, _BatchNorm):
        return AlphaBatchNorm(model, alpha)
    wrappers = [m for m in model.modules() if isinstance(m, AlphaBatchNorm)]
    for wrapper in wrappers:
        wrapper.alpha = alpha
    wrapped = {id(w.bn) for w in wrappers}
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, _BatchNorm) and id(m) not in wrapped]
    for name, bn in targets:
        _replace_module(model, name, AlphaBatchNorm(bn, alpha))
    return model


def remove_alpha_bn(model: nn.Module) -> nn.Module:
    """Put back the BatchNorms that :func:`alpha_bn` wrapped; returns the model."""
    if isinstance(model, AlphaBatchNorm):
        return model.bn
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, AlphaBatchNorm)]
    for name, wrapper in targets:
        _replace_module(model, name, wrapper.bn)
    return model


@contextmanager
def alpha_bn_applied(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """``with alpha_bn_applied(model, 0.9): preds = model(x)`` -- alpha-BN inside the block."""
    alpha_bn(model, alpha)
    try:
        yield model
    finally:
        remove_alpha_bn(model)

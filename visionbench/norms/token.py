"""Token norm layers (ViT: input ``(B, N, C)`` or ``(B, C)``, normalizing the C features).

Each layer follows its paper's official code, read from the official repository and written anew:

- ``batchnorm`` (token): BatchNorm over all B*N tokens, ``torch.nn.BatchNorm1d`` inside.
- ``powernorm``: sIncerass/powernorm, ``fairseq/modules/norms/mask_powernorm.py``
  (``MaskPowerNorm``, ``PowerFunction``, ``GroupScaling1D``).
- ``unified``: hikvision-research/Unified-Normalization,
  ``image_classification/models/unified_normalization/unified_normalization.py``
  (``UN1d``, ``UN2dFunction``); ViT settings from ``image_classification/models/t2t_vit.py``.
- ``prepbn``: xinghaochen/SLAB, ``classification/models/prepbn.py`` (``RepBN``, ``LinearNorm``);
  the folding follows ``merge_bn`` of ``classification/models/swin_transformer.py``.
- ``dyt``: jiachenzhu/DyT, ``dynamic_tanh.py`` (``DynamicTanh``).

PowerNorm and UN keep their step counter as a buffer (``iters``) and mirror it in a Python int,
so a training step does not wait on the device to read it; loading a state dict resets the
mirror.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from visionbench.norms.catalog import factory_kwargs, register_norm

LR_WARMUP = "lr_warmup"  # PowerNorm's warmup_iters taken from the fit's lr warmup

__all__ = [
    "ChannelAffine",
    "DynamicTanh",
    "PRepBN",
    "PowerNorm",
    "RepBN",
    "TokenBatchNorm",
    "UnifiedNorm",
    "attach_prepbn_schedule",
    "fold_norms_",
    "fold_prepbn_",
    "prepbn_layers",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics of the batch-statistic norms are taken in at least float32 (autocast-safe)."""
    return torch.promote_types(x.dtype, torch.float32)


def _bn_over_tokens(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` over every token: ``(B, C)``, ``(B, N, C)`` or ``(B, ..., C)`` -> rows of C."""
    if x.dim() == 2:
        return bn(x)
    return bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class _StepCounter(nn.Module):
    """A ``iters`` buffer (saved, resumed) mirrored by a Python int read from it once."""

    def _init_counter(self, device=None) -> None:
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))
        self._iters_seen: int | None = None

    def _next_iter(self) -> int:
        if self._iters_seen is None:
            self._iters_seen = int(self.iters)
        self._iters_seen += 1
        self.iters.add_(1)
        return self._iters_seen

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._iters_seen = None


# --------------------------------------------------------------------------------------------
# BatchNorm over tokens


class TokenBatchNorm(nn.Module):
    """BatchNorm for tokens: statistics over all B*N tokens of each feature channel.

    ``nn.BatchNorm1d`` inside, applied to the tokens flattened to rows ``(B*N, C)``, which is the
    same as transposing to ``(B, C, N)`` as SLAB's ``RepBN`` (``classification/models/prepbn.py``)
    does. The BN is a child module, so ``nn.SyncBatchNorm.convert_sync_batchnorm`` reaches it.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bn_over_tokens(self.bn, x)

    @torch.no_grad()
    def affine_(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BatchNorm as ``x * scale + shift`` per channel."""
        return _bn_affine(self.bn)


@torch.no_grad()
def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics cannot be folded")
    inv_std = (bn.running_var + bn.eps).rsqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    return gamma * inv_std, beta - gamma * bn.running_mean * inv_std


# --------------------------------------------------------------------------------------------
# PowerNorm


class _PowerNormFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(denom + eps) + bias`` with PowerNorm's approximate backward.

    Backward (``PowerFunction.backward`` of the official file; Algorithm 2 of the paper with
    ``nu = (1 - alpha_bkw) * ema_gz``)::

        g = dL/dy * weight
        g~ = g - (1 - alpha_bkw) * ema_gz * z
        ema_gz += mean_tokens(g~ * z)
        dL/dx = g~ / sqrt(grad_denom + eps)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, denom, grad_denom, ema_gz, eps, alpha_bkw):
        z = x / (denom + eps).sqrt()
        ctx.save_for_backward(z, weight, grad_denom)
        ctx.ema_gz, ctx.eps, ctx.alpha_bkw = ema_gz, eps, alpha_bkw
        return z * weight + bias

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, grad_denom = ctx.saved_tensors
        ema_gz = ctx.ema_gz
        g = grad_out * weight
        approx = g - (1 - ctx.alpha_bkw) * ema_gz * z
        ema_gz.add_((approx * z).mean(dim=0))
        grad_x = approx / (grad_denom + ctx.eps).sqrt()
        grad_w = (grad_out * z).sum(dim=0)
        grad_b = grad_out.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class PowerNorm(_StepCounter):
    """PowerNorm (``MaskPowerNorm``) of sIncerass/powernorm,
    ``fairseq/modules/norms/mask_powernorm.py``.

    Train mode, at step ``t`` (counted per training forward, from 1):

    1. group scaling (``GroupScaling1D``): ``x <- x / sqrt(mean_group(x^2) + 1e-5)`` per token,
       over ``group_num`` groups of channels (ordinary autograd);
    2. ``var = mean_tokens(x^2)`` over the non-padded tokens (the batch quadratic mean);
    3. ``z = x / sqrt(var + eps)`` while ``t <= warmup_iters``, else
       ``z = x / sqrt(running_phi + eps)`` with ``running_phi`` from before this step;
    4. ``running_phi`` update, exactly as the official code: while ``t < warmup_iters`` first the
       cumulative mean ``phi <- phi * (t - 1) / t + var / t``, then always the EMA
       ``phi <- alpha_fwd * phi + (1 - alpha_fwd) * var``;
    5. ``y = weight * z + bias``; the backward is the approximate one of ``_PowerNormFunction``
       (its ``ema_gz`` statistic is a buffer).

    Eval mode: group scaling, then ``weight * x / sqrt(running_phi + eps) + bias``.

    ``grad_scale="official"`` (the default) is the code behind the published numbers: its
    backward divides by the batch statistic, ``sqrt(var + eps)``, even after warmup when the
    forward divided by ``sqrt(running_phi + eps)``. ``grad_scale="paper"`` follows Algorithm 2
    of the paper instead, which divides the gradient by the same ``psi_{t-1}`` the forward
    used. The official ``affine`` flag is ignored there (weight and bias always exist); here
    too. The class defaults are ``MaskPowerNorm``'s (``group_num=1``, ``warmup_iters=10000``);
    the catalog entry takes what fairseq passes (``fairseq/modules/norm_select.py``, called from
    ``transformer_layer.py`` with ``args.encoder_attention_heads, args.warmup_updates``):
    ``group_num`` = the head count of the attention the norm sits in, and ``warmup_iters`` =
    the learning-rate warmup, ``"lr_warmup"``, which ``NormSchedules`` turns into the fit's
    warmup forwards when training starts.
    """

    def __init__(self, dim: int, eps: float = 1e-5, alpha_fwd: float = 0.9,
                 alpha_bkw: float = 0.9, warmup_iters: int | str = 10000, group_num: int = 1,
                 grad_scale: str = "official", device=None, dtype=None) -> None:
        super().__init__()
        if dim % group_num:
            raise ValueError(f"powernorm: group_num={group_num} does not divide dim={dim}")
        if grad_scale not in ("paper", "official"):
            raise ValueError(f"powernorm: grad_scale={grad_scale!r}; expected 'paper' or "
                             "'official'")
        if not (warmup_iters == LR_WARMUP or (isinstance(warmup_iters, int)
                                              and warmup_iters >= 0)):
            raise ValueError(f"powernorm: warmup_iters={warmup_iters!r}; expected a count of "
                             f"steps or {LR_WARMUP!r}")
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.group_eps = dim, eps, 1e-5
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.warmup_iters, self.group_num, self.grad_scale = warmup_iters, group_num, grad_scale
        self.weight = nn.Parameter(torch.ones(dim, **fk))
        self.bias = nn.Parameter(torch.zeros(dim, **fk))
        self.register_buffer("running_phi", torch.ones(dim, **fk))
        self.register_buffer("ema_gz", torch.zeros(dim, **fk))
        self._init_counter(device)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
                f"alpha_bkw={self.alpha_bkw}, warmup={self.warmup_iters}, "
                f"group_num={self.group_num}, grad_scale={self.grad_scale}")

    def _group_scale(self, x: torch.Tensor) -> torch.Tensor:
        grouped = x.reshape(*x.shape[:-1], self.group_num, -1)
        moment2 = grouped.pow(2).mean(dim=-1, keepdim=True)
        return (grouped / (moment2 + self.group_eps).sqrt()).reshape(x.shape)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, C)`` or ``(B, C)``; ``pad_mask``: ``(B, N)``, True at padding."""
        x = self._group_scale(x.to(_compute_dtype(x)))
        if not self.training:
            return x / (self.running_phi + self.eps).sqrt() * self.weight + self.bias
        if self.warmup_iters == LR_WARMUP:
            raise RuntimeError("powernorm: warmup_iters='lr_warmup' is set from the lr warmup "
                               "when a fit starts (visionbench.norms.schedules.NormSchedules); "
                               "pass a number of steps to train the layer on its own")
        rows = x.reshape(-1, self.num_features)
        with torch.no_grad():
            valid = rows if pad_mask is None else x[~pad_mask]
            var = valid.pow(2).mean(dim=0)
            t = self._next_iter()
            denom = var if t <= self.warmup_iters else self.running_phi.clone()
            if t < self.warmup_iters:
                self.running_phi.mul_((t - 1) / t).add_(var / t)
            self.running_phi.mul_(self.alpha_fwd).add_((1 - self.alpha_fwd) * var)
        grad_denom = denom if self.grad_scale == "paper" else var
        y = _PowerNormFunction.apply(rows, self.weight, self.bias, denom, grad_denom,
                                     self.ema_gz, self.eps, self.alpha_bkw)
        return y.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Unified Normalization


class _UnifiedNormFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(var + eps) + bias`` with UN's smoothed backward (``UN2dFunction``).

    Backward, as the official file::

        g = dL/dy * weight * r                              (r: the forward's compensation)
        gz = mean_tokens(g * z)
        buffer_gz[t % W_bp] = ema_gz if skip else gz
        mean_gz = gz   while t <= W_bp, t < warmup, or skip;  else mean over buffer_gz
        ema_gz <- momentum * ema_gz + (1 - momentum) * mean_gz
        dL/dx = (g - (mean_gz if skip else ema_gz) * z) / sqrt(var + eps)
        dL/dweight = sum_tokens(dL/dy * r * z);  dL/dbias = sum_tokens(dL/dy)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, var, r, skip, state):
        z = x / (var + state["eps"]).sqrt()
        ctx.save_for_backward(z, weight, var, r, skip)
        ctx.state = state
        return z * weight + bias

    @staticmethod
    def backward(ctx, grad_out):
        z, weight, var, r, skip = ctx.saved_tensors
        st = ctx.state
        buffer_gz, ema_gz, m = st["buffer_gz"], st["ema_gz"], st["momentum"]
        g = grad_out * weight * r
        gz = (g * z).mean(dim=0)
        buffer_gz[st["bp_slot"]] = torch.where(skip, ema_gz, gz)
        mean_gz = torch.where(skip, gz, buffer_gz.mean(dim=0)) if st["bp_window"] else gz
        ema_gz.mul_(m).add_((1 - m) * mean_gz)
        approx = g - torch.where(skip, mean_gz, ema_gz) * z
        grad_x = approx / (var + st["eps"]).sqrt()
        grad_w = (grad_out * r * z).sum(dim=0)
        grad_b = grad_out.sum(dim=0)
        return grad_x, grad_w, grad_b, None, None, None, None


class UnifiedNorm(_StepCounter):
    """Unified Normalization (``UN1d``) of hikvision-research/Unified-Normalization,
    ``image_classification/models/unified_normalization/unified_normalization.py``.

    Train mode, at step ``t`` (counted per training forward, from 1), ``W`` the forward window:

    1. ``x2 = mean_tokens(x^2)`` over the non-padded tokens; ``rec = var(sqrt(buffer_x2))``
       (unbiased, over the whole buffer, before it is written); ``buffer_x2[t % W] = x2``;
    2. outlier filtration (``t >= warmup_iters`` and ``outlier_filtration``): if
       ``arith_mean(buffer_x2) - geo_mean(buffer_x2) > W * rec`` in any channel, the step is
       skipped: ``buffer_x2[t % W] = running_var``, ``skip_counter += 1``. ``W == 1`` always skips;
    3. ``var = x2`` while ``t <= W``, ``t < warmup_iters`` or skipped, else the geometric mean of
       the last ``W`` quadratic means ``exp(mean(log(buffer_x2)))``;
    4. ``r = sqrt(var + eps) / sqrt(running_var + eps)`` clamped to ``[1/5, 5]``, but ``r = 1``
       while ``t <= max(1000, warmup_iters)`` or skipped (passed to the backward only);
    5. ``y = weight * x / sqrt(var + eps) + bias``;
       ``running_var <- momentum * running_var + (1 - momentum) * var``.

    The backward is ``_UnifiedNormFunction``'s (fluctuation smoothing over the last ``W_bp``
    gradient statistics). Eval mode: ``weight * x / sqrt(running_var + eps) + bias``.

    Defaults are those the official ViT (``T2t_vit_14_all_un1d`` in ``models/t2t_vit.py``) uses:
    window 4, warmup 4000, outlier filtration on (the official docstring: on for CV, off for
    NLP), eps 1e-5, momentum 0.9. ``window_size`` is an int or ``(W_fp, W_bp)``. The skip decision
    stays on the device (``torch.where``) instead of the official Python branch; same values.
    """

    def __init__(self, dim: int, window_size: int | tuple[int, int] = 4,
                 warmup_iters: int = 4000, outlier_filtration: bool = True, eps: float = 1e-5,
                 momentum: float = 0.9, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(window_size, int):
            window_size = (window_size, window_size)
        self.fp_window, self.bp_window = (int(w) for w in window_size)
        fk = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = dim, eps, momentum
        self.warmup_iters, self.outlier_filtration = warmup_iters, outlier_filtration
        self.weight = nn.Parameter(torch.ones(dim, **fk))
        self.bias = nn.Parameter(torch.zeros(dim, **fk))
        self.register_buffer("running_var", torch.ones(dim, **fk))
        self.register_buffer("ema_gz", torch.zeros(dim, **fk))
        self.register_buffer("buffer_x2", torch.zeros(self.fp_window, dim, **fk))
        self.register_buffer("buffer_gz", torch.zeros(self.bp_window, dim, **fk))
        self.register_buffer("skip_counter", torch.zeros((), dtype=torch.long, device=device))
        self._init_counter(device)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, fp_win={self.fp_window}, bp_win={self.bp_window}, "
                f"eps={self.eps}, momentum={self.momentum}, warmup={self.warmup_iters}, "
                f"outlier_filtration={self.outlier_filtration}")

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, N, C)`` or ``(B, C)``; ``pad_mask``: ``(B, N)``, True at padding."""
        x = x.to(_compute_dtype(x))
        if not self.training:
            return x / (self.running_var + self.eps).sqrt() * self.weight + self.bias
        rows = x.reshape(-1, self.num_features)
        with torch.no_grad():
            var, r, skip, t = self._forward_statistics(rows if pad_mask is None
                                                       else x[~pad_mask])
        state = {
            "eps": self.eps, "momentum": self.momentum, "buffer_gz": self.buffer_gz,
            "ema_gz": self.ema_gz, "bp_slot": t % self.bp_window,
            "bp_window": not (t <= self.bp_window or t < self.warmup_iters),
        }
        y = _UnifiedNormFunction.apply(rows, self.weight, self.bias, var, r, skip, state)
        return y.reshape(x.shape)

    def _forward_statistics(self, valid: torch.Tensor):
        t = self._next_iter()
        buf, slot = self.buffer_x2, t % self.fp_window
        x2 = valid.pow(2).mean(dim=0)
        recorded = buf.sqrt().var()
        buf[slot] = x2
        skip = torch.tensor(self.fp_window <= 1, device=buf.device)
        if t >= self.warmup_iters and self.outlier_filtration:
            diff = buf.mean(dim=0) - buf.log().mean(dim=0).exp()
            outlier = (diff > recorded * self.fp_window).any()
            buf[slot] = torch.where(outlier, self.running_var, buf[slot])
            self.skip_counter.add_(outlier.long())
            skip = skip | outlier
        if t <= self.fp_window or t < self.warmup_iters:
            var = x2
        else:
            var = torch.where(skip, x2, buf.log().mean(dim=0).exp())
        if t <= max(1000, self.warmup_iters):
            r = torch.ones_like(var)
        else:
            ratio = (var + self.eps).sqrt() / (self.running_var + self.eps).sqrt()
            r = torch.where(skip, torch.ones_like(var), ratio.clamp(1 / 5, 5))
        self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
        return var, r, skip, t


# --------------------------------------------------------------------------------------------
# SLAB: progressive re-parameterized BatchNorm


class RepBN(nn.Module):
    """``RepBN(x) = BN(x) + alpha * x`` over tokens, ``alpha`` a learnable scalar initialised to 1
    (``RepBN`` of xinghaochen/SLAB, ``classification/models/prepbn.py``)."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, device=device, dtype=dtype))
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bn_over_tokens(self.bn, x) + self.alpha * x

    @torch.no_grad()
    def affine_(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode RepBN as ``x * scale + shift`` per channel (``merge_bn`` of SLAB)."""
        scale, shift = _bn_affine(self.bn)
        return scale + self.alpha, shift


class PRepBN(nn.Module):
    """Progressive RepBN (``LinearNorm(norm1=LayerNorm, norm2=RepBN)`` of xinghaochen/SLAB,
    ``classification/models/prepbn.py``).

    Train: ``lambda * LN(x) + (1 - lambda) * RepBN(x)``, ``lambda = r0 * max(0, T - k) / T`` after
    ``k`` schedule steps (``T = total_steps``); during the first ``warmup_steps`` steps only
    ``LN(x)`` (the official ``warm``). Eval: ``RepBN(x)``.

    Deviation: the official code counts forward calls; here a step is an optimizer step, counted
    by the hook that ``attach_prepbn_schedule`` registers (gradient accumulation, skipped AMP steps
    and extra forwards do not advance it). ``step`` and ``total_steps`` are buffers, so a state
    dict resumes the schedule. Defaults as the official ``LinearNorm``: ``total_steps=300000``
    (``deit.py``; SLAB-DeiT and SLAB-Swin use 60000), ``warmup_steps=0``, ``r0=1``, LayerNorm
    eps 1e-6, BN eps 1e-5. The official runs are 300 epochs of 1251 steps (batch 1024), so
    lambda reaches 0 at 80% (300000 / 375300) and 16% (60000) of training: the network then
    trains as pure RepBN before it is evaluated. ``decay_fraction`` gives the decay length as
    that fraction of a fit's optimizer steps instead; ``NormSchedules`` sets ``total_steps``
    from it when the fit starts.
    """

    def __init__(self, dim: int, total_steps: int = 300000, warmup_steps: int = 0,
                 r0: float = 1.0, ln_eps: float = 1e-6, eps: float = 1e-5,
                 momentum: float = 0.1, decay_fraction: float | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        if decay_fraction is not None and not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"prepbn: decay_fraction={decay_fraction}; expected a fraction of "
                             "the fit's steps in (0, 1]")
        if int(total_steps) < 1:
            raise ValueError(f"prepbn: total_steps={total_steps}; expected >= 1")
        fk = {"device": device, "dtype": dtype}
        self.r0, self.warmup_steps, self.decay_fraction = r0, warmup_steps, decay_fraction
        self.ln = nn.LayerNorm(dim, eps=ln_eps, **fk)
        self.repbn = RepBN(dim, eps=eps, momentum=momentum, **fk)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("total_steps",
                             torch.tensor(int(total_steps), dtype=torch.long, device=device))

    def extra_repr(self) -> str:
        return (f"r0={self.r0}, warmup_steps={self.warmup_steps}, "
                f"decay_fraction={self.decay_fraction}")

    def lam(self) -> torch.Tensor:
        """The current LayerNorm weight ``lambda`` (a 0-dim float tensor, no device sync)."""
        k = self.step - self.warmup_steps
        left = (self.total_steps - k).clamp(min=0).clamp(max=self.total_steps)
        return self.r0 * left / self.total_steps.clamp(min=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.repbn(x)
        if self.warmup_steps > 0 and bool(self.step < self.warmup_steps):
            return self.ln(x)
        lam = self.lam().to(x.dtype)
        return lam * self.ln(x) + (1 - lam) * self.repbn(x)


def attach_prepbn_schedule(model: nn.Module, optimizer: torch.optim.Optimizer,
                           total_steps: int | None = None) -> RemovableHandle:
    """Advance every ``PRepBN`` of ``model`` by one after each ``optimizer.step()``.

    ``total_steps`` (optimizer steps), when given, sets every layer's schedule length. Returns the
    hook's handle (``handle.remove()`` detaches it). Attach again after building a new optimizer
    on resume; the step count itself comes back with the model's state dict.
    """
    layers = [m for m in model.modules() if isinstance(m, PRepBN)]
    if total_steps is not None:
        for m in layers:
            m.total_steps.fill_(int(total_steps))

    def advance(opt, args, kwargs) -> None:
        with torch.no_grad():
            for m in layers:
                m.step.add_(1)

    return optimizer.register_step_post_hook(advance)


class ChannelAffine(nn.Module):
    """``x * weight + bias`` over the last (channel) dimension: a folded eval-mode norm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _eval_repbn(norm: nn.Module) -> RepBN | TokenBatchNorm | None:
    """The eval-mode affine part of a foldable token norm (PRepBN, RepBN, token BatchNorm)."""
    if isinstance(norm, PRepBN):
        return norm.repbn
    return norm if isinstance(norm, (RepBN, TokenBatchNorm)) else None


@torch.no_grad()
def _fold_into_linear_(repbn: RepBN | TokenBatchNorm, linear: nn.Linear) -> None:
    """``linear(x * a + c) = (W diag(a)) x + (W c + b)``."""
    scale, shift = repbn.affine_()
    w = linear.weight
    new_bias = w @ shift.to(w.dtype)
    if linear.bias is not None:
        new_bias += linear.bias
    w.mul_(scale.to(w.dtype))
    linear.bias = nn.Parameter(new_bias)


@torch.no_grad()
def fold_prepbn_(model: nn.Module) -> nn.Module:
    """Fold every eval-mode (P)RepBN (and token BatchNorm) of a timm ViT into the linear layer
    that follows it.

    In each pre-norm ``timm.models.vision_transformer.Block``, ``norm1`` folds into
    ``attn.qkv`` and ``norm2`` into ``mlp.fc1`` (SLAB's ``merge_bn``), and the norm becomes
    ``nn.Identity``. Every other (P)RepBN (the final ``norm``, ``fc_norm``, ``norm_pre``) becomes
    an equivalent ``ChannelAffine``. The result computes the model's eval-mode output; it is for
    inference. Modifies ``model`` in place and returns it.
    """
    from timm.models.vision_transformer import Block

    for block in [m for m in model.modules() if isinstance(m, Block)]:
        for norm_name, linear in (("norm1", getattr(block.attn, "qkv", None)),
                                  ("norm2", getattr(block.mlp, "fc1", None))):
            repbn = _eval_repbn(getattr(block, norm_name))
            if repbn is not None and isinstance(linear, nn.Linear):
                _fold_into_linear_(repbn, linear)
                setattr(block, norm_name, nn.Identity())
    for parent in list(model.modules()):
        if isinstance(parent, (PRepBN, RepBN, TokenBatchNorm)):
            continue
        for name, child in list(parent.named_children()):
            repbn = _eval_repbn(child)
            if repbn is not None:
                setattr(parent, name, ChannelAffine(*repbn.affine_()))
    return model


# --------------------------------------------------------------------------------------------
# DyT


class DynamicTanh(nn.Module):
    """Dynamic Tanh (``DynamicTanh`` of jiachenzhu/DyT, ``dynamic_tanh.py``).

    ``weight * tanh(alpha * x) + bias``, ``alpha`` one learnable scalar (init
    ``alpha_init_value``, 0.5 for ViT), weight ones, bias zeros. ``channels_last=False`` takes
    NCHW input with per-channel weight/bias, as the official code does for ConvNeXt.
    """

    def __init__(self, dim: int, channels_last: bool = True, alpha_init_value: float = 0.5,
                 device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.normalized_shape, self.channels_last = dim, channels_last
        self.alpha_init_value = alpha_init_value
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init_value), **fk))
        self.weight = nn.Parameter(torch.ones(dim, **fk))
        self.bias = nn.Parameter(torch.zeros(dim, **fk))

    def extra_repr(self) -> str:
        return (f"normalized_shape={self.normalized_shape}, "
                f"alpha_init_value={self.alpha_init_value}, channels_last={self.channels_last}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            return x * self.weight + self.bias
        return x * self.weight[:, None, None] + self.bias[:, None, None]


# --------------------------------------------------------------------------------------------
# Catalog entries

_TOKEN_PLACES = "in place of every LayerNorm of a ViT: before attention and MLP, and the final norm"


@register_norm(
    "batchnorm",
    kind="token",
    paper="Batch Normalization: Accelerating Deep Network Training by Reducing Internal "
    "Covariate Shift",
    arxiv="1502.03167",
    formula="gamma * (x - E_{B,N}[x]) / sqrt(Var_{B,N}[x] + eps) + beta (per channel, "
    "statistics over all tokens of the batch; running statistics in eval)",
    defaults={"eps": 1e-5, "momentum": 0.1},
    where=_TOKEN_PLACES,
)
def _token_batchnorm(dim: int, eps: float = 1e-5, momentum: float = 0.1, **kw) -> nn.Module:
    return TokenBatchNorm(dim, eps=eps, momentum=momentum, **factory_kwargs(kw), **kw)


@register_norm(
    "powernorm",
    kind="token",
    paper="PowerNorm: Rethinking Batch Normalization in Transformers",
    arxiv="2003.07845",
    formula="x <- x / sqrt(mean_group(x^2) + 1e-5); y = gamma * x / psi_{t-1} + beta, "
    "psi_t^2 = alpha_fwd * psi_{t-1}^2 + (1 - alpha_fwd) * mean_{B,N}(x^2) (batch quadratic "
    "mean while t <= warmup); approximate backward dL/dx = (g - nu_{t-1} z) / psi_{t-1}, "
    "nu_t = nu_{t-1} + (1 - alpha_bkw) * mean(z * (g - nu_{t-1} z))",
    defaults={"eps": 1e-5, "alpha_fwd": 0.9, "alpha_bkw": 0.9, "warmup_iters": "lr_warmup",
              "group_num": "heads", "grad_scale": "official"},
    where="in place of LayerNorm in Transformer blocks (the paper: encoder of a translation "
    "Transformer); " + _TOKEN_PLACES + "; group_num 'heads' = the attention's head count, "
    "warmup_iters 'lr_warmup' = the fit's lr warmup, as fairseq passes them",
    context=("num_heads",),
)
def _powernorm(dim: int, group_num: int | str = "heads", num_heads: int | None = None,
               **kw) -> nn.Module:
    if group_num == "heads":  # without a head count (a norm built on its own): one group
        group_num = num_heads or 1
    return PowerNorm(dim, group_num=group_num, **factory_kwargs(kw), **kw)


@register_norm(
    "unified",
    kind="token",
    paper="Unified Normalization for Accelerating and Stabilizing Transformers",
    arxiv="2208.01313",
    formula="y = gamma * x / sqrt(GM(sigma^2_{t-W+1..t}) + eps) + beta, sigma^2_t = "
    "mean_{B,N}(x^2), GM the geometric mean of the last W quadratic means after warmup "
    "(batch statistic when an outlier is filtered); backward smoothed by the mean of the last W "
    "gradient statistics; eval uses running_var",
    defaults={"window_size": 4, "warmup_iters": 4000, "outlier_filtration": True, "eps": 1e-5,
              "momentum": 0.9},
    where=_TOKEN_PLACES + " (T2T-ViT in the paper)",
)
def _unified(dim: int, **kw) -> nn.Module:
    return UnifiedNorm(dim, **factory_kwargs(kw), **kw)


@register_norm(
    "prepbn",
    kind="token",
    paper="SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
    "Re-parameterized Batch Normalization",
    arxiv="2405.11582",
    formula="train: lambda * LN(x) + (1 - lambda) * (BN(x) + alpha * x), lambda = r0 * max(0, "
    "1 - t / T) over optimizer steps t; eval: BN(x) + alpha * x (foldable into the next Linear)",
    defaults={"total_steps": 300000, "decay_fraction": None, "warmup_steps": 0, "r0": 1.0,
              "ln_eps": 1e-6, "eps": 1e-5, "momentum": 0.1},
    where=_TOKEN_PLACES + "; T = total_steps, or decay_fraction of the fit's optimizer steps "
    "(every training stage attaches the schedule, visionbench.norms.schedules.NormSchedules)",
)
def _prepbn(dim: int, **kw) -> nn.Module:
    return PRepBN(dim, **factory_kwargs(kw), **kw)


@register_norm(
    "dyt",
    kind="token",
    paper="Transformers without Normalization",
    arxiv="2503.10622",
    formula="gamma * tanh(alpha * x) + beta, alpha a learnable scalar",
    defaults={"alpha_init_value": 0.5},
    where=_TOKEN_PLACES,
)
def _dyt(dim: int, alpha_init_value: float = 0.5, **kw) -> nn.Module:
    return DynamicTanh(dim, alpha_init_value=alpha_init_value, **factory_kwargs(kw), **kw)


def fold_norms_(model: nn.Module) -> bool:
    """``fold_prepbn_`` on a pre-norm ViT that has foldable token norms (PRepBN, token
    BatchNorm); returns whether any was folded."""
    if not any(_eval_repbn(m) is not None for m in model.modules()):
        return False
    if getattr(model, "placement", "pre") != "pre":
        raise ValueError("folding a norm into the next linear needs the pre placement")
    fold_prepbn_(model.eval())
    return True


def prepbn_layers(model: nn.Module) -> list[PRepBN]:
    return [m for m in model.modules() if isinstance(m, PRepBN)]

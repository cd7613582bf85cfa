"""LARS as PixPro pretrains with it: zdaxie/PixPro ``contrast/lars.py`` and ``main_pretrain.py``.

The official optimizer is ``LARS(torch.optim.SGD(add_weight_decay(model, wd), lr, momentum=0.9))``:
``add_weight_decay`` splits the trainable parameters into a group of 1-D tensors (biases, BN
scales and shifts) with ``weight_decay 0, ignore True`` and a group of the rest with
``weight_decay wd, ignore False``; at every step, before the SGD step, ``apply_adaptive_lrs``

1. adds ``weight_decay * p`` to the gradient (groups with ``weight_decay > 0``), then
2. in groups whose ``ignore`` is exactly ``False``, scales the gradient by the adaptive rate
   ``trust_coef * ||p|| / (||g|| + eps)`` (``g`` after the decay; the rate is 1 when either
   norm is 0),

and the inner SGD (momentum 0.9, dampening 0, no Nesterov, its own weight decay zeroed) steps
with the result: ``buf = momentum * buf + g`` (``buf = g`` on the first step), ``p -= lr * buf``.

Deviations, none of which changes the update:

- One ``torch.optim.Optimizer`` subclass doing both parts instead of a wrapper around an SGD
  instance (the wrapper does not call ``Optimizer.__init__``, which Lightning's optimizer
  handling relies on).
- The official code overwrites ``p.grad`` with the decayed, scaled gradient; here the
  gradients are left as they were and the update direction is a local tensor.
- As in the official ``apply_adaptive_lrs``, a group without an ``ignore`` key gets no
  adaptation (``ignore is not None and not ignore``); ``add_weight_decay`` always sets it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def add_weight_decay(
    model: nn.Module, weight_decay: float = 1e-5, skip_list: Iterable[str] = ()
) -> list[dict]:
    """Official ``add_weight_decay``: 1-D parameters (biases, norm affine) and names in
    ``skip_list`` get no weight decay and no LARS adaptation (``ignore: True``); frozen
    parameters (``requires_grad False``, e.g. a momentum encoder) are left out."""
    skip = set(skip_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0, "ignore": True},
        {"params": decay, "weight_decay": weight_decay, "ignore": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum plus LARS gradient adaptation (``contrast/lars.py``, see module doc).

    ``lr`` and ``momentum`` are the inner SGD's (official ``main_pretrain.py``: momentum 0.9
    from ``--momentum``); ``eps`` 1e-8 and ``trust_coef`` 1e-3 are the official defaults.
    Groups carry ``weight_decay`` and ``ignore`` as ``add_weight_decay`` makes them.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        trust_coef: float = 0.001,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon value: {eps}")
        if trust_coef < 0.0:
            raise ValueError(f"invalid trust coefficient: {trust_coef}")
        self.eps = eps
        self.trust_coef = trust_coef
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            ignore = group.get("ignore", None)
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if weight_decay > 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                if ignore is not None and not ignore:
                    param_norm = torch.linalg.vector_norm(p)
                    grad_norm = torch.linalg.vector_norm(d_p)
                    # adaptive rate where both norms are positive, else 1 (official)
                    ratio = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        self.trust_coef * param_norm / (grad_norm + self.eps),
                        torch.ones_like(param_norm),
                    )
                    d_p = d_p.mul(ratio)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d_p.detach().clone()
                    else:
                        buf.mul_(momentum).add_(d_p)
                    d_p = buf
                p.add_(d_p, alpha=-group["lr"])
        return loss

"""Attention maps of a timm ViT and their normalized mutual information (NMI) per layer.

NMI follows the self-attention analysis of naver-ai/cl-vs-mim (``self_attention_analysis.ipynb``,
``calculate_nmi``) as UNIP (Zhang et al., ICLR 2025, arXiv 2502.02257) uses it to sort layers into
local, hybrid and global attention patterns. With the class token dropped and the rows
renormalized to ``A``, queries uniform ``p(q) = 1/n`` over the ``n = N - 1`` patch queries and
``p(k) = mean_q A[q, k]``:

    I   = sum_{q,k} p(q) A[q,k] log(A[q,k] / p(k))
    NMI = I / sqrt(H(q) H(k)),   H(q) = log n,   H(k) = -sum_k p(k) log p(k)

High NMI: each query looks somewhere of its own (local); NMI near 0: every query looks at the same
keys (global, "attention collapse").

Differences from cl-vs-mim's ``calculate_nmi`` and its driver loop:

- cl-vs-mim adds 1e-8 to every entry before renormalizing; here ``0 log 0 = 0`` is exact
  (``xlogy``) and nothing is added. A patch row whose whole mass sat on the class token (sum 0
  after the drop) becomes uniform, the limit of their smoothing as the constant goes to 0.
- cl-vs-mim computes in float32; here everything is float64.
- cl-vs-mim averages per-batch means (every batch weighs the same); ``layer_nmi`` weighs every
  image the same.
- If ``H(k) = 0`` (every query attends to one and the same key) ``I`` is 0 too and NMI is 0/0;
  it is returned as 0, the fully collapsed end of the scale.

The maps come from a forward pre-hook on each block's ``attn`` module: q and k are recomputed
from ``attn.qkv`` on the module's (already normalized) input, with ``q_norm`` / ``k_norm`` and
``attn.scale`` as timm's Attention does, so fused attention kernels are never relied on and any
norm layer or placement that feeds ``block.attn`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from visionbench.data.batch import unpack
from visionbench.errors import ConfigError

# The hybrid band, NMI in (0.06, 0.12): the range of the NMI target s over which UNIP's Fig. 7
# reports the distilled student's results as stable (its layer rule distils the layer nearest
# s = 0.09). The official code takes the layer as ``--intermediate`` (MAE-L block 18, DINO-B
# block 9, iBOT-L block 21, 1-based) and holds no thresholds; the band was read from a summary
# of the paper, not off the figure itself, so both ends are config values.
LOCAL_THRESHOLD = 0.12
GLOBAL_THRESHOLD = 0.06

PATTERNS = ("local", "hybrid", "global")


# -- NMI ---------------------------------------------------------------------------------------


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """NMI of post-softmax attention (B, heads, N, N) with a leading class token -> (B, heads).

    Computed in float64 and returned in float64.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention must be (B, heads, N, N), got {tuple(attn.shape)}")
    n = attn.shape[-1] - 1
    if n < 2:
        raise ValueError(f"NMI needs at least 2 patch tokens besides the class token, got {n}")
    a = attn[..., 1:, 1:].double()
    mass = a.sum(dim=-1, keepdim=True)
    a = torch.where(mass > 0, a / mass.clamp_min(torch.finfo(a.dtype).tiny), 1.0 / n)
    p_k = a.mean(dim=-2)  # p(q) is uniform
    xlogy = torch.special.xlogy
    mutual = (xlogy(a, a) - xlogy(a, p_k.unsqueeze(-2))).sum(dim=(-2, -1)) / n
    mutual = mutual.clamp_min(0.0)  # rounding only; I >= 0
    h_q = torch.log(torch.tensor(float(n), dtype=a.dtype))
    h_k = -xlogy(p_k, p_k).sum(dim=-1)
    denom = torch.sqrt(h_q * h_k)
    return torch.where(denom > 0, mutual / denom.clamp_min(torch.finfo(a.dtype).tiny), 0.0)


# -- attention of a timm ViT -------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: nothing after it is computed."""


def scaled_qk_logits(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) pre-softmax ``scale * q k^T`` of a timm ``Attention`` on its input ``x``."""
    b, n, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", attn.qkv.out_features // (3 * heads))
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q * attn.scale) @ k.transpose(-2, -1)


def _blocks(vit: nn.Module) -> nn.Sequential:
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") for b in blocks):
        raise ConfigError(
            f"attention analysis needs a ViT whose blocks have an `attn` module, "
            f"got {type(vit).__name__}"
        )
    return blocks


def _layer_list(vit: nn.Module, layers: Iterable[int] | None) -> list[int]:
    depth = len(_blocks(vit))
    chosen = list(range(depth)) if layers is None else [int(i) for i in layers]
    for i in chosen:
        if not 0 <= i < depth:
            raise ValueError(f"layer {i} is out of range for a ViT of depth {depth}")
    return chosen


def run_to_attention(
    vit: nn.Module,
    images: torch.Tensor,
    layers: Sequence[int],
    on_logits: Callable[[int, torch.Tensor], None],
) -> None:
    """Run ``vit.forward_features`` and call ``on_logits(layer, logits)`` for each of ``layers``.

    The forward stops at the deepest requested block's attention (its attention output, MLP and
    every later block are never computed), as the official UNIP teacher and student return from
    the distilled block. Gradients flow if the caller's grad mode allows.
    """
    blocks = _blocks(vit)
    if torch.is_grad_enabled() and getattr(vit, "grad_checkpointing", False):
        # A checkpointed segment would be recomputed in backward without the early stop.
        raise ConfigError("attention hooks with gradients do not support grad checkpointing")
    deepest = max(layers)
    seen: set[int] = set()

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            on_logits(i, scaled_qk_logits(module, args[0]))
            seen.add(i)
            if i == deepest:
                raise _StopForward

        return hook

    handles = [blocks[i].attn.register_forward_pre_hook(make_hook(i)) for i in set(layers)]
    try:
        vit.forward_features(images)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if deepest not in seen:
        raise RuntimeError(f"block {deepest}'s attention was never called by forward_features")


def attention_logits(vit: nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, heads, N, N) pre-softmax scaled q.k logits of block ``layer`` (0-based)."""
    (layer,) = _layer_list(vit, [layer])
    out: dict[int, torch.Tensor] = {}
    run_to_attention(vit, images, [layer], lambda i, logits: out.__setitem__(i, logits))
    return out[layer]


def attention_maps(
    vit: nn.Module, images: torch.Tensor, layers: Iterable[int] | None = None
) -> list[torch.Tensor]:
    """Post-softmax attention (B, heads, N, N) of each block in ``layers`` (default: all), in
    the order given."""
    chosen = _layer_list(vit, layers)
    out: dict[int, torch.Tensor] = {}
    run_to_attention(vit, images, chosen, lambda i, logits: out.__setitem__(i, logits.softmax(-1)))
    return [out[i] for i in chosen]


# -- NMI per layer and the three patterns ------------------------------------------------------


def _image_batches(loader_or_images) -> Iterable[torch.Tensor]:
    if isinstance(loader_or_images, torch.Tensor):
        yield loader_or_images
        return
    for batch in loader_or_images:
        yield unpack(batch, "image") if isinstance(batch, (list, tuple, dict)) else batch


@torch.no_grad()
def layer_nmi(
    vit: nn.Module,
    loader_or_images,
    *,
    max_batches: int | None = None,
) -> torch.Tensor:
    """Mean NMI per block (float64, shape (depth,)), over heads and images.

    ``loader_or_images``: an image batch (B, C, H, W) or an iterable of batches (tensors or
    ``(images, labels)`` tuples). The model runs in eval mode (restored afterwards) on the
    device of its parameters; the maps are reduced block by block, never all held at once.
    """
    layers = _layer_list(vit, None)
    device = next(vit.parameters()).device
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    was_training = vit.training
    vit.eval()
    try:
        for b, images in enumerate(_image_batches(loader_or_images)):
            if max_batches is not None and b >= max_batches:
                break

            def add(i: int, logits: torch.Tensor) -> None:
                nmi = attention_nmi(logits.float().softmax(-1))
                totals[i] += nmi.mean(dim=1).sum().cpu()

            run_to_attention(vit, images.to(device), layers, add)
            count += images.shape[0]
    finally:
        vit.train(was_training)
    if count == 0:
        raise ValueError("layer_nmi got no images")
    return totals / count


def _check_thresholds(local_threshold: float, global_threshold: float) -> None:
    if not global_threshold < local_threshold:
        raise ConfigError(
            f"NMI thresholds: global ({global_threshold}) must be below local ({local_threshold})"
        )


def classify_layers(
    nmi: Sequence[float] | torch.Tensor,
    local_threshold: float = LOCAL_THRESHOLD,
    global_threshold: float = GLOBAL_THRESHOLD,
) -> list[str]:
    """The pattern of each layer: local where NMI >= local_threshold, global where
    NMI <= global_threshold, hybrid in between."""
    _check_thresholds(local_threshold, global_threshold)
    values = nmi.tolist() if isinstance(nmi, torch.Tensor) else [float(v) for v in nmi]
    labels = []
    for v in values:
        if v >= local_threshold:
            labels.append("local")
        elif v <= global_threshold:
            labels.append("global")
        else:
            labels.append("hybrid")
    return labels


def deepest_hybrid_layer(labels: Sequence[str]) -> int:
    """0-based index of the last "hybrid" layer; ConfigError if there is none."""
    for i in range(len(labels) - 1, -1, -1):
        if labels[i] == "hybrid":
            return i
    summary = ", ".join(f"{i}:{label}" for i, label in enumerate(labels))
    raise ConfigError(
        f"no layer has a hybrid attention pattern (layers: {summary}); set the distilled "
        "teacher layer explicitly or move the NMI thresholds"
    )


def hybrid_layer(
    nmi: Sequence[float] | torch.Tensor,
    local_threshold: float = LOCAL_THRESHOLD,
    global_threshold: float = GLOBAL_THRESHOLD,
) -> tuple[int, str]:
    """The layer to distil and why: the deepest hybrid one, or, when no layer falls in the
    hybrid band, the one whose NMI lies nearest to the band (the deeper one on a tie)."""
    values = nmi.tolist() if isinstance(nmi, torch.Tensor) else [float(v) for v in nmi]
    labels = classify_layers(values, local_threshold, global_threshold)
    if "hybrid" in labels:
        return deepest_hybrid_layer(labels), "the deepest hybrid layer by NMI"
    distance = [global_threshold - v if v <= global_threshold else v - local_threshold
                for v in values]
    best = min(range(len(values)), key=lambda i: (distance[i], -i))
    return best, (f"no layer in the hybrid band ({global_threshold}, {local_threshold}); "
                  f"block {best} (NMI {values[best]:.3f}, {labels[best]}) lies nearest to it")


def save_nmi_figure(
    per_model: dict[str, Sequence[float]],
    path: str | Path,
    thresholds: tuple[float, float] = (LOCAL_THRESHOLD, GLOBAL_THRESHOLD),
) -> Path:
    """NMI per layer, one line per model (layers 1-based on x), over shaded bands for the
    global / hybrid / local patterns; ``thresholds`` is ``(local, global)``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from visionbench.results.records import atomic_write_bytes

    local, global_ = thresholds
    _check_thresholds(local, global_)
    values = [float(v) for curve in per_model.values() for v in curve]
    top = max([local * 1.5, *(v * 1.1 for v in values)])
    fig, ax = plt.subplots(figsize=(5, 4))
    bands = (
        (0.0, global_, "tab:blue", "global"),
        (global_, local, "tab:green", "hybrid"),
        (local, top, "tab:red", "local"),
    )
    for low, high, color, name in bands:
        ax.axhspan(low, high, color=color, alpha=0.08, lw=0)
        ax.text(1.01, (low + high) / 2, name, transform=ax.get_yaxis_transform(), ha="left",
                va="center", fontsize=8, color=color)  # fmt: skip
    for name, curve in per_model.items():
        ax.plot(range(1, len(curve) + 1), [float(v) for v in curve], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention NMI")
    ax.set_ylim(0.0, top)
    if per_model:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path

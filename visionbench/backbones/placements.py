"""Where the norm goes in a ViT block: Pre-LN, Post-LN, Peri-LN, Mix-LN, LayerNorm Scaling.

Each placement is a ``block_fn`` for timm's ``VisionTransformer`` plus the embedding/final norm
settings it needs (``placement_kwargs``). The blocks subclass timm's ``Block`` (timm
``models/vision_transformer.py``), so they take the constructor arguments timm passes and keep
its submodule names (``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``): a Pre-LN
state dict loads into every placement under the same ``blocks.{i}.*`` keys, and layer-wise lr
decay groups them the same way. ``F`` below is attention or MLP, ``N`` the catalog norm.

- ``pre``: timm's ``Block``, ``x = x + F(N(x))``; final norm on.
- ``post``: ``x = N(x + F(x))`` (Vaswani et al. 2017, "Attention Is All You Need"). Every block
  ends in a norm, so the model has no final norm (``final_norm=False``, ``model.norm`` is
  ``Identity``), as in the original Post-LN Transformer.
- ``peri``: ``x = x + N_out(F(N_in(x)))`` with a norm on the embeddings (``model.norm_pre``)
  and the final norm: "Peri-LN: Revisiting Normalization Layer in the Transformer
  Architecture" (Kim et al., ICML 2025, arXiv 2502.02732). No official code was released; this
  follows the paper's equations (input-embedding norm, peri-module norms, final norm).
- ``mix``: Post-LN in the first ``floor(alpha * L)`` blocks, Pre-LN in the rest, final norm on:
  "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN" (Li et al.,
  ICLR 2025, arXiv 2412.13795). Followed: pixeli99/MixLN ``peft_pretraining/modeling_llama.py``
  (``NORM_TYPE=post_pre``: block ``i`` is Post-LN when ``i < POST_NUM``, 0-based; the model's
  final ``self.norm`` is kept for every norm type) and its ``README.md`` / ``scripts/`` (the
  count is given as an integer, e.g. 3 of 12 layers and 6 of 24, i.e. alpha = 0.25).
- ``lns``: Pre-LN with each norm output times ``1 / sqrt(l)``, ``l`` the 1-based block index, a
  fixed constant; the final norm unscaled: "The Curse of Depth in Large Language Models" (Sun
  et al., arXiv 2502.05795). Followed: lmsdss/LayerNorm-Scaling
  ``peft_pretraining/modeling_llama.py`` (``NORM_TYPE=LNS``: ``1 / math.sqrt(layer_index + 1)``
  applied after ``input_layernorm`` and after ``post_attention_layernorm``; ``self.norm`` plain).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from timm.models.vision_transformer import Block
from torch import nn

from visionbench.errors import ConfigError

PLACEMENTS = ("pre", "post", "peri", "mix", "lns")
MIX_ALPHA = 0.25


class PostNormBlock(Block):
    """Post-LN: ``x = norm1(x + F_attn(x))``; ``x = norm2(x + F_mlp(x))``.

    Same submodules as timm's ``Block``; ``norm1``/``norm2`` sit after each residual sum.
    """

    placement = "post"

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = self.norm1(
            x + self.drop_path1(self.ls1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal)))
        )
        x = self.norm2(x + self.drop_path2(self.ls2(self.mlp(x))))
        return x


class PeriNormBlock(Block):
    """Peri-LN: ``x = x + norm1_out(F_attn(norm1(x)))``; ``x = x + norm2_out(F_mlp(norm2(x)))``.

    ``norm1``/``norm2`` are timm's input norms; ``norm1_out``/``norm2_out`` normalize each
    module's output before it joins the residual stream (before layer scale and drop path).
    """

    placement = "peri"

    def __init__(self, dim: int, *args, norm_layer: Callable[..., nn.Module], **kwargs) -> None:
        super().__init__(dim, *args, norm_layer=norm_layer, **kwargs)
        dd = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.norm1_out = norm_layer(dim, **dd)
        self.norm2_out = norm_layer(dim, **dd)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.norm1_out(h)))
        x = x + self.drop_path2(self.ls2(self.norm2_out(self.mlp(self.norm2(x)))))
        return x


class LayerNormScalingBlock(Block):
    """LayerNorm Scaling: Pre-LN with both norm outputs times ``norm_scale = 1 / sqrt(depth + 1)``.

    ``depth`` is the 0-based block index timm passes to ``block_fn``; ``norm_scale`` is a plain
    float, so it is neither learned nor in the state dict.
    """

    placement = "lns"

    def __init__(self, *args, depth: int = 0, **kwargs) -> None:
        super().__init__(*args, depth=depth, **kwargs)
        self.norm_scale = 1.0 / math.sqrt(depth + 1)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        h = self.norm1(x) * self.norm_scale
        x = x + self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x) * self.norm_scale)))
        return x

    def extra_repr(self) -> str:
        return f"norm_scale={self.norm_scale:.6g}"


def mix_post_layers(depth: int, alpha: float = MIX_ALPHA) -> int:
    """Mix-LN's number of Post-LN blocks, ``floor(alpha * depth)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"mix_alpha {alpha!r}: expected a fraction of the depth in [0, 1]")
    # The tolerance keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
    return math.floor(alpha * depth + 1e-9)


def mix_block_fn(num_post: int) -> Callable[..., Block]:
    """A ``block_fn``: ``PostNormBlock`` for block indices below ``num_post``, ``Block`` after."""

    def make_block(*args, depth: int = 0, **kwargs) -> Block:
        block_cls = PostNormBlock if depth < num_post else Block
        return block_cls(*args, depth=depth, **kwargs)

    return make_block


def placement_kwargs(
    placement: str, depth: int | None = None, mix_alpha: float | None = None
) -> dict:
    """``VisionTransformer`` keyword arguments for ``placement`` (``depth`` needed for ``mix``).

    ``peri``'s embedding norm is not among them: ``add_embedding_norm`` adds it after the
    build, because timm's ``pre_norm=True`` would also drop the patch-projection bias.
    """
    if placement not in PLACEMENTS:
        raise ConfigError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    if mix_alpha is not None and placement != "mix":
        raise ConfigError(f"mix_alpha applies to placement 'mix' only, not {placement!r}")
    if placement == "pre":
        return {"block_fn": Block}
    if placement == "post":
        return {"block_fn": PostNormBlock, "final_norm": False}
    if placement == "peri":
        return {"block_fn": PeriNormBlock}
    if placement == "lns":
        return {"block_fn": LayerNormScalingBlock}
    if depth is None:
        raise ValueError("placement 'mix' needs the model depth")
    alpha = MIX_ALPHA if mix_alpha is None else mix_alpha
    return {"block_fn": mix_block_fn(mix_post_layers(depth, alpha))}


def add_embedding_norm(model: nn.Module, norm_layer: Callable[..., nn.Module]) -> None:
    """Peri-LN's input-embedding norm as timm's ``norm_pre`` (after the position embedding)."""
    ref = model.pos_embed if model.pos_embed is not None else model.patch_embed.proj.weight
    model.norm_pre = norm_layer(model.embed_dim, device=ref.device, dtype=ref.dtype)


def block_placement(model: nn.Module) -> list[str]:
    """The placement of each of ``model.blocks``: ``pre``, ``post``, ``peri`` or ``lns``."""
    names = []
    for i, block in enumerate(model.blocks):
        if isinstance(block, (PostNormBlock, PeriNormBlock, LayerNormScalingBlock)):
            names.append(block.placement)
        elif type(block) is Block:
            names.append("pre")
        else:
            raise TypeError(f"blocks.{i} is a {type(block).__name__}, not a placement block")
    return names

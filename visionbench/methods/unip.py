"""UNIP: "Rethinking Pre-trained Attention Patterns for Infrared Semantic Segmentation"
(Zhang et al., ICLR 2025, arXiv 2502.02257): NMI-guided hybrid attention distillation (NMI-HAD).

Follows casiatao/UNIP ``UNIP_pretraining/``:

- ``models_teacher.py``: the frozen RGB-pretrained teacher runs up to block ``intermediate``
  (1-based) and returns that block's pre-softmax ``scale * q k^T``, class token included. Here
  ``teacher_layer`` is the 0-based block index: official ``--intermediate 18`` (MAE-L), ``9``
  (DINO-B), ``21`` (iBOT-L) are ``teacher_layer`` 17, 8, 20. The ``temperature`` argument there
  never reaches the block (it is called with the default 1.0), so there is no temperature.
- ``models_unip.py``: the student is a ViT trained from scratch (MAE init, fixed 2-D sin-cos
  position embeddings, ``drop_path=0.1`` in every block, not a linear ramp) whose *last* block is
  built with ``last_heads`` = the teacher layer's head count (16 for ViT-L, 12 for ViT-B), so its
  head dim is ``embed_dim / last_heads``. The student also stops at its last block's logits: that
  block's projection and MLP and the final norm get no gradient (official DDP runs with
  ``find_unused_parameters=True``). The loss is ``KLDivLoss(log_softmax(student),
  log_softmax(teacher), log_target=True)`` summed over keys and averaged over queries, heads and
  batch, on float32 logits.
- ``main_pretrain.py`` / ``engine_pretrain.py`` / ``train_scripts/*.sh``: AdamW betas
  (0.9, 0.95), weight decay 0.05 on all but biases and 1-D parameters (timm's
  ``param_groups_weight_decay`` without a skip list, so the class token is decayed), lr = blr *
  effective batch / 256, per-step warmup + half-cycle cosine, no gradient clipping, teacher under
  ``no_grad`` in eval mode; paper schedule 100 epochs, 5 warmup, blr 1.5e-4, effective batch
  4096 (256 per GPU x accum 8 x 2 GPUs). Inputs (the datamodule's job): 224 px,
  RandomResizedCrop(scale=(0.2, 1.0), bicubic), horizontal flip, normalize with the InfMix
  mean/std 0.3801/0.1871 per channel, RGB sources converted to gray.

Not ported: the optional ``loss_type='CE'`` (its ``nn.CrossEntropyLoss`` on (B, H, N, N) takes the
head axis as classes) and the optional EMA copy of the student (off in every official script).

The distilled layer is chosen by NMI as the deepest layer with the hybrid pattern
(``choose_teacher_layer``, see ``visionbench.analysis.attention``). The student's parameter names
equal the official student's (timm ViT naming), and the head count only changes how ``qkv`` is
split, so the saved student loads into a standard ViT of the same size, as the official
segmentation backbones load it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from visionbench.analysis.attention import (
    GLOBAL_THRESHOLD,
    LOCAL_THRESHOLD,
    attention_logits,
    hybrid_layer,
    layer_nmi,
)
from visionbench.data.batch import unpack
from visionbench.errors import ConfigError
from visionbench.methods.base import PretrainModule
from visionbench.methods.mae import MAEConfig
from visionbench.methods.registry import register_method
from visionbench.methods.schedule import weight_decay_groups
from visionbench.schema import LocalFile, MethodConfig, Strict


def attention_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor
) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over keys, mean over batch, heads and queries.

    Logits are (B, heads, N, N); half-precision inputs are computed in float32, as officially.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match teacher logits "
            f"{tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_s = F.log_softmax(student_logits.to(dtype), dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype), dim=-1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()


def set_last_block_heads_(vit: VisionTransformer, heads: int) -> None:
    """Give ``vit``'s last attention ``heads`` heads (``models_unip.py``'s ``last_heads``).

    timm's Attention weights do not depend on the head count (``qkv`` is (3 * dim, dim)), so the
    block keeps its initialized weights and only its split changes: head_dim, scale.
    """
    attn = vit.blocks[-1].attn
    width = attn.num_heads * attn.head_dim
    if heads <= 0 or width % heads:
        raise ConfigError(
            f"UNIP: the student's attention width {width} is not divisible by the teacher "
            f"layer's {heads} heads; pick a student whose embed_dim the teacher heads divide"
        )
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        raise ConfigError("UNIP: a student with qk_norm cannot change its last block's heads")
    attn.num_heads = heads
    attn.head_dim = width // heads
    attn.scale = attn.head_dim**-0.5


def uniform_drop_path_(vit: VisionTransformer, rate: float) -> None:
    """The same stochastic-depth rate in every block (official student: ``drop_path=0.1``)."""
    for i, block in enumerate(vit.blocks):
        for name in ("drop_path1", "drop_path2"):
            if not hasattr(block, name):
                raise ConfigError(f"UNIP: student block {i} has no {name} to set drop_path on")
            setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


def choose_teacher_layer(
    teacher: VisionTransformer,
    loader_or_images,
    local_threshold: float = LOCAL_THRESHOLD,
    global_threshold: float = GLOBAL_THRESHOLD,
    max_batches: int | None = None,
) -> tuple[int, torch.Tensor, str]:
    """(0-based layer of ``teacher`` to distil, its NMI per layer, why that layer): the
    deepest hybrid-pattern layer, else the one nearest to the hybrid band
    (``visionbench.analysis.attention.hybrid_layer``)."""
    nmi = layer_nmi(teacher, loader_or_images, max_batches=max_batches)
    layer, reason = hybrid_layer(nmi, local_threshold, global_threshold)
    return layer, nmi, reason


class TeacherConfig(Strict):
    """UNIP's teacher: a local pretrained ViT (the official scripts distil the ImageNet MAE-L
    checkpoint), or, as an explicit option, one pretrained here by MAE on the mix."""

    backbone: str = "vit_large_patch16_224"
    backbone_kwargs: dict[str, Any] = {}
    source: Literal["weights", "pretrain"] = "weights"
    weights: LocalFile = None  # timm or official MAE layout (source: weights)
    epochs: int = Field(800, gt=0)  # MAE epochs when the teacher is pretrained here
    layer: int | None = Field(None, ge=0)  # 0-based distilled block; None: deepest hybrid (NMI)

    @field_validator("backbone")
    @classmethod
    def _vit(cls, value: str) -> str:
        from visionbench.backbones import backbone_family

        if backbone_family(value) != "vit":
            raise ValueError(f"the teacher must be a ViT, not {value}")
        return value


class NMIConfig(Strict):
    local_threshold: float = Field(0.12, gt=0, lt=1)
    global_threshold: float = Field(0.06, gt=0, lt=1)
    images: int = Field(256, gt=0)  # pretraining images the per-layer NMI is averaged over
    batch_size: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> NMIConfig:
        if self.global_threshold >= self.local_threshold:
            raise ValueError("global_threshold must be below local_threshold")
        return self


class ThermalSynthConfig(Strict):
    """Sizes of the embedded thermal set and of the demo InfMix's grey ``shapes`` share."""

    n_train: int = Field(400, gt=0)
    n_test: int = Field(160, gt=0)
    n_pretrain: int = Field(800, gt=0)
    shapes_per_class: int = Field(50, ge=0)  # grey shapes images in the demo InfMix


class UNIPConfig(MethodConfig):
    """NMI-HAD distillation; the schedule is the distillation's (UNIP_pretraining/train_scripts:
    100 epochs, 5 warmup, blr 1.5e-4, weight decay 0.05, effective batch 4096). ``mae`` is the
    MAE pretraining of the MAE-student baseline and of a teacher made in the run."""

    method: Literal["unip"] = "unip"
    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(5, ge=0)
    checkpoint_every_n_steps: int = Field(1000, gt=0)
    drop_path: float = Field(0.1, ge=0, lt=1)
    students: list[Literal["unip", "mae", "random"]] = ["unip", "mae", "random"]
    # pretraining images under --data-root: folders of images (RGB ones turned grey) or
    # infrared segmentation sets (their training images); the demo generates its own
    pretrain_data: list[str] = ["InfMix"]
    teacher: TeacherConfig = TeacherConfig()
    nmi: NMIConfig = NMIConfig()
    mae: MAEConfig = MAEConfig()
    synth: ThermalSynthConfig = ThermalSynthConfig()

    def check_ready(self) -> None:
        """Checked when the run is resolved (``visionbench show`` does not need the file)."""
        t = self.teacher
        if t.source == "weights" and t.weights is None:
            raise ValueError("pretrain.teacher.weights: the teacher is a local checkpoint (the "
                             "official scripts distil ImageNet MAE-L); give its file, or set "
                             "pretrain.teacher.source=pretrain to pretrain one by MAE in the run")
        if t.source == "pretrain" and t.weights is not None:
            raise ValueError("pretrain.teacher: weights are given but source is 'pretrain'; "
                             "set source=weights to distil them")


def _check_vit(model: nn.Module, role: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"UNIP: the {role} must be a ViT, got {type(model).__name__}")
    return model


@register_method
class UNIP(PretrainModule):
    """A student ViT whose last attention learns one frozen teacher layer's attention."""

    config = UNIPConfig
    families = ("vit",)

    def __init__(
        self,
        teacher: VisionTransformer,
        student: VisionTransformer,
        schedule: UNIPConfig | None = None,
        *,
        teacher_layer: int,
        drop_path: float = 0.1,
        batch_size: int = 256,
    ) -> None:
        super().__init__(schedule or UNIPConfig(), batch_size=batch_size, betas=(0.9, 0.95))
        _check_vit(teacher, "teacher")
        _check_vit(student, "student")
        depth = len(teacher.blocks)
        if not 0 <= teacher_layer < depth:
            raise ConfigError(
                f"UNIP: teacher_layer {teacher_layer} is out of range for a {depth}-block "
                "teacher (0-based)"
            )
        t_tokens = (tuple(teacher.patch_embed.grid_size), teacher.num_prefix_tokens)
        s_tokens = (tuple(student.patch_embed.grid_size), student.num_prefix_tokens)
        if t_tokens != s_tokens:
            raise ConfigError(
                "UNIP: teacher and student must see the same tokens; (grid, prefix tokens) "
                f"of the teacher {t_tokens}, of the student {s_tokens}"
            )
        if student.pos_embed is None or student.pos_embed.requires_grad:
            raise ConfigError(
                "UNIP: the student uses fixed sin-cos position embeddings; build it with "
                "create_vit(..., fixed_pos_embed=True)"
            )
        self.teacher_heads = int(teacher.blocks[teacher_layer].attn.num_heads)
        set_last_block_heads_(student, self.teacher_heads)
        uniform_drop_path_(student, drop_path)
        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.student = student
        self.teacher_layer = teacher_layer
        self.drop_path = drop_path

    @classmethod
    def from_config(cls, encoder: nn.Module, section: UNIPConfig, model, data, *,
                    teacher: nn.Module, teacher_layer: int | None = None) -> UNIP:
        """The module ``section`` describes: ``encoder`` is the student, ``teacher`` the frozen
        teacher; ``teacher_layer`` (e.g. from ``choose_teacher_layer``) overrides
        ``section.teacher.layer``; the lr scales with the data's batch."""
        layer = section.teacher.layer if teacher_layer is None else teacher_layer
        if layer is None:
            raise ConfigError(
                "pretrain.teacher.layer: not set; give a 0-based block index or let the NMI "
                "analysis choose it"
            )
        return cls(
            _check_vit(teacher, "teacher"),
            _check_vit(encoder, "student"),
            section,
            teacher_layer=int(layer),
            drop_path=section.drop_path,
            batch_size=data.batch_size,
        )

    @classmethod
    def train_transform(cls, section: UNIPConfig, data):
        """MAE's pretraining crop (``main_pretrain.py`` of UNIP_pretraining)."""
        from visionbench.data.transforms import mae_pretrain_transform

        return mae_pretrain_transform(data)

    @property
    def encoder(self) -> nn.Module:
        """The student: what the run saves and evaluates."""
        return self.student

    def train(self, mode: bool = True) -> UNIP:
        """Lightning puts the whole module in train mode each epoch; the teacher stays in eval."""
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_logits(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return attention_logits(self.teacher, imgs, self.teacher_layer)

    def student_logits(self, imgs: torch.Tensor) -> torch.Tensor:
        return attention_logits(self.student, imgs, len(self.student.blocks) - 1)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """The distillation loss of a batch of images."""
        return attention_distillation_loss(self.student_logits(imgs), self.teacher_logits(imgs))

    def pretrain_loss(self, batch, generator_seed: int | None = None) -> torch.Tensor:
        imgs = batch if torch.is_tensor(batch) else unpack(batch, "image")
        return self(imgs)

    def optimizer_groups(self) -> list[dict]:
        return weight_decay_groups(self.student, self.weight_decay)

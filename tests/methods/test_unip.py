"""UNIP (NMI-HAD): the attention KL loss, the student's last-block heads, the frozen teacher,
state round trips, layer choice by NMI, and a few optimizer steps (manual and in Lightning).

``reference_kl`` writes out casiatao/UNIP ``models_pretrain.forward_kd_loss`` (KL with log targets,
summed over keys, averaged over batch, heads and queries) with explicit exp / log in float64.
"""

import math

import lightning as L
import pytest
import torch
from timm.layers import DropPath

from visionbench.analysis import attention_logits, layer_nmi
from visionbench.backbones import create_vit
from visionbench.config import resolve_config
from visionbench.errors import ConfigError
from visionbench.methods.unip import (
    UNIP,
    attention_distillation_loss,
    choose_teacher_layer,
    set_last_block_heads_,
)

IMG, P = 32, 8
N = (IMG // P) ** 2 + 1
T_DIM, T_DEPTH, T_HEADS = 64, 4, 4
S_DIM, S_DEPTH, S_HEADS = 32, 2, 2


def vit(seed, dim, depth, heads, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=IMG, patch_size=P, embed_dim=dim, depth=depth, num_heads=heads)
    return create_vit("vit_tiny_patch16_224", **{**args, **kw})


def make_unip(seed=0, teacher_layer=2, **kw):
    teacher = vit(100 + seed, T_DIM, T_DEPTH, T_HEADS)
    student = vit(seed, S_DIM, S_DEPTH, S_HEADS)
    return UNIP(teacher, student, teacher_layer=teacher_layer, **kw)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.double(), teacher.double()
    p_s = s.exp() / s.exp().sum(-1, keepdim=True)
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    per_query = (p_t * (p_t.log() - p_s.log())).sum(-1)  # (B, heads, N)
    return per_query.sum() / per_query.numel()


# -- loss --------------------------------------------------------------------------------------


def test_kl_loss_is_zero_for_identical_logits_and_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    t = 3 * torch.randn(2, 4, N, N, generator=gen, dtype=torch.float64)
    s = 3 * torch.randn(2, 4, N, N, generator=gen, dtype=torch.float64)
    assert abs(attention_distillation_loss(t, t).item()) < 1e-12
    loss = attention_distillation_loss(s, t)
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, reference_kl(s, t), atol=1e-12, rtol=0)
    assert loss.item() > 0
    # shifting a row's logits changes nothing (softmax)
    assert torch.allclose(attention_distillation_loss(s + 5.0, t - 2.0), loss, atol=1e-12)
    half = attention_distillation_loss(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="do not match"):
        attention_distillation_loss(s, t[:, :2])


def test_module_loss_is_the_kl_between_the_two_layers_logits():
    model = make_unip(drop_path=0.0).eval()
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        s = attention_logits(model.student, images, S_DEPTH - 1)
        t = attention_logits(model.teacher, images, 2)
        loss = model.pretrain_loss((images, torch.zeros(2)))
    assert s.shape == t.shape == (2, T_HEADS, N, N)
    assert torch.allclose(loss.double(), reference_kl(s, t), atol=1e-5)


# -- student, teacher --------------------------------------------------------------------------


def test_students_last_block_gets_the_teacher_layers_heads():
    model = make_unip()
    attn = model.student.blocks[-1].attn
    assert attn.num_heads == model.teacher.blocks[2].attn.num_heads == T_HEADS
    assert attn.head_dim == S_DIM // T_HEADS and attn.scale == (S_DIM // T_HEADS) ** -0.5
    assert all(b.attn.num_heads == S_HEADS for b in model.student.blocks[:-1])
    # the student still runs end to end, fused attention included
    assert model.student(torch.randn(1, 3, IMG, IMG)).shape == (1, S_DIM)
    assert all(isinstance(b.drop_path1, DropPath) and b.drop_path1.drop_prob == 0.1
               for b in model.student.blocks)


def test_heads_that_do_not_divide_the_student_width_are_a_config_error():
    teacher = vit(1, 48, 2, 3)
    with pytest.raises(ConfigError, match="not divisible by the teacher layer's 3 heads"):
        UNIP(teacher, vit(0, S_DIM, S_DEPTH, S_HEADS), teacher_layer=1)
    with pytest.raises(ConfigError, match="not divisible"):
        set_last_block_heads_(vit(0, S_DIM, S_DEPTH, S_HEADS), 5)


def test_constructor_checks():
    teacher, student = vit(1, T_DIM, T_DEPTH, T_HEADS), vit(0, S_DIM, S_DEPTH, S_HEADS)
    with pytest.raises(ConfigError, match="out of range"):
        UNIP(teacher, student, teacher_layer=T_DEPTH)
    with pytest.raises(ConfigError, match="same tokens"):
        UNIP(teacher, vit(0, S_DIM, S_DEPTH, S_HEADS, patch_size=4), teacher_layer=1)
    learned = vit(0, S_DIM, S_DEPTH, S_HEADS, fixed_pos_embed=False, init="timm")
    with pytest.raises(ConfigError, match="fixed sin-cos"):
        UNIP(teacher, learned, teacher_layer=1)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_optimizer():
    model = make_unip().train()
    assert model.student.training and not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model(torch.randn(2, 3, IMG, IMG)).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.blocks[0].attn.qkv.weight.grad is not None
    grouped = {id(p) for g in model.optimizer_groups() for p in g["params"]}
    assert grouped.isdisjoint(id(p) for p in model.teacher.parameters())
    trainable = {id(p) for p in model.student.parameters() if p.requires_grad}
    assert grouped == trainable
    decayed = {id(p) for p in model.optimizer_groups()[1]["params"]}
    assert id(model.student.cls_token) in decayed  # as timm's groups without a skip list
    assert id(model.student.blocks[0].attn.qkv.bias) not in decayed


def test_state_round_trip_and_the_student_loads_into_a_plain_vit():
    model = make_unip(seed=0, drop_path=0.0).eval()
    other = make_unip(seed=7, drop_path=0.0).eval()
    images = torch.randn(2, 3, IMG, IMG)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(other(images), model(images))
    plain = vit(3, S_DIM, S_DEPTH, S_HEADS)
    plain.load_state_dict(model.student.state_dict(), strict=True)


def test_from_config_and_the_layer_chosen_by_nmi():
    teacher, student = vit(1, T_DIM, T_DEPTH, T_HEADS), vit(0, S_DIM, S_DEPTH, S_HEADS)
    images = torch.randn(4, 3, IMG, IMG)
    nmi = layer_nmi(teacher, images)
    low, high = sorted(nmi.tolist())[:2]
    # thresholds so that exactly the two lowest-NMI layers read as hybrid, the rest as local
    layer, got, reason = choose_teacher_layer(teacher, images, local_threshold=high + 1e-9,
                                              global_threshold=low - 1e-9)
    assert torch.equal(got, nmi) and reason == "the deepest hybrid layer by NMI"
    assert layer == max(i for i, v in enumerate(nmi.tolist()) if v <= high)
    cfg = resolve_config("unip-infrared", "paper", sets=["pretrain.teacher.layer=null",
                                                         "data.batch_size=64"],
                         require_data=False)
    with pytest.raises(ConfigError, match="pretrain.teacher.layer"):
        UNIP.from_config(student, cfg.pretrain, cfg.model, cfg.data, teacher=teacher)
    model = UNIP.from_config(student, cfg.pretrain, cfg.model, cfg.data, teacher=teacher,
                             teacher_layer=layer)
    assert model.teacher_layer == layer and model.betas == (0.9, 0.95)
    assert math.isclose(model.base_lr, 1.5e-4 * 64 / 256)
    assert (model.epochs, model.warmup_epochs, model.weight_decay) == (100, 5, 0.05)


# -- training ----------------------------------------------------------------------------------


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    model = make_unip(drop_path=0.0).train()
    images = torch.randn(4, 3, IMG, IMG)
    opt = torch.optim.AdamW(model.optimizer_groups(), lr=2e-3, betas=model.betas)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    losses = []
    for _ in range(15):
        loss = model(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_lightning_fit_runs_a_few_steps_with_a_finite_loss():
    model = make_unip()
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, IMG, IMG), torch.zeros(6))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, loader)
    assert trainer.global_step == 3
    assert math.isfinite(trainer.callback_metrics["train_loss_step"].item())
    assert not model.teacher.training

"""SoftCon: the soft contrastive loss against its written-out formula in float64 (and its
reduction to MoCo v3's hard loss when the label similarity is the identity), the label
similarities, Siamese masking's exact token counts, the teacher's EMA, channel adaptation
of an RGB checkpoint, the two-view transform and a Lightning step."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from visionbench.backbones import create_backbone, load_backbone_weights
from visionbench.backbones.weights import adapt_rgb_stem
from visionbench.data.multispectral.landcover import (
    BIGEARTHNET19,
    DYNAMIC_WORLD,
    label_map,
    map_labels,
)
from visionbench.errors import ConfigError, WeightsError
from visionbench.methods import METHODS
from visionbench.methods.schedule import momentum_at
from visionbench.methods.softcon import (
    SoftCon,
    SoftConConfig,
    SoftConTransform,
    label_similarity,
    pooled,
    soft_contrastive_loss,
    soft_targets,
)


def tiny_vit(in_chans=13, size=32):
    return create_backbone("vit_tiny_patch16_224", norm="layernorm", img_size=size,
                           in_chans=in_chans, patch_size=8, embed_dim=32, depth=2,
                           num_heads=2)


def reference_direction(q, k, labels, tau, lam, kind="cosine"):
    """One direction of the loss with explicit loops, float64."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    q, k = [unit(v) for v in q.tolist()], [unit(v) for v in k.tolist()]
    y = labels.tolist()
    n = len(q)
    total_hard, total_soft = 0.0, 0.0
    for i in range(n):
        z = [sum(a * b for a, b in zip(q[i], k[j], strict=True)) / tau for j in range(n)]
        top = max(z)
        log_norm = top + math.log(sum(math.exp(v - top) for v in z))
        log_p = [v - log_norm for v in z]
        total_hard -= log_p[i]
        sims = []
        for j in range(n):
            if kind == "cosine":
                na = math.sqrt(sum(a * a for a in y[i]))
                nb = math.sqrt(sum(b * b for b in y[j]))
                s = 0.0 if na == 0 or nb == 0 else sum(
                    a * b for a, b in zip(y[i], y[j], strict=True)) / (na * nb)
            else:
                hi = sum(max(a, b) for a, b in zip(y[i], y[j], strict=True))
                s = 0.0 if hi == 0 else sum(
                    min(a, b) for a, b in zip(y[i], y[j], strict=True)) / hi
            sims.append(s)
        row = sum(sims)
        targets = [s / row for s in sims] if row > 0 else [float(j == i) for j in range(n)]
        total_soft -= sum(t * lp for t, lp in zip(targets, log_p, strict=True))
    return 2 * tau * (total_hard / n + lam * total_soft / n)


LABELS = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1],
                       [1, 0, 1, 0]], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["cosine", "jaccard"])
def test_soft_contrastive_loss_equals_the_written_out_formula(kind):
    torch.manual_seed(0)
    q, k = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    targets = soft_targets(label_similarity(LABELS, LABELS, kind))
    ours = soft_contrastive_loss(q, k, targets, temperature=0.2, soft_weight=0.7)
    assert ours.dtype == torch.float64
    assert float(ours) == pytest.approx(reference_direction(q, k, LABELS, 0.2, 0.7, kind),
                                        rel=1e-12)


def test_with_identity_similarity_the_soft_term_is_the_hard_term():
    torch.manual_seed(1)
    q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    hard = soft_contrastive_loss(q, k, None, temperature=0.5)
    both = soft_contrastive_loss(q, k, soft_targets(torch.eye(4, dtype=torch.float64)),
                                 temperature=0.5, soft_weight=1.0)
    assert float(both) == pytest.approx(2 * float(hard), rel=1e-12)
    # one-hot labels of distinct classes give the identity similarity
    eye_labels = torch.eye(4, dtype=torch.float64)
    assert torch.equal(label_similarity(eye_labels, eye_labels), torch.eye(4,
                                                                          dtype=torch.float64))
    # MoCo v3's contrastive_loss: CE(q k^T / tau, arange) * 2 tau
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    moco = torch.nn.functional.cross_entropy(qn @ kn.T / 0.5, torch.arange(4)) * 2 * 0.5
    assert float(hard) == pytest.approx(float(moco), rel=1e-12)


def test_label_similarity_and_targets_by_hand():
    s = label_similarity(LABELS, LABELS, "cosine")
    assert float(s[0, 1]) == pytest.approx(1 / math.sqrt(2))
    assert float(s[0, 4]) == pytest.approx(1.0) and float(s[0, 3]) == 0.0
    j = label_similarity(LABELS, LABELS, "jaccard")
    assert float(j[0, 1]) == pytest.approx(0.5)
    t = soft_targets(s)
    torch.testing.assert_close(t.sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(t[2], torch.tensor([0, 0, 1, 0, 0], dtype=torch.float64))  # no label
    assert float(t[0, 0]) == pytest.approx(float(t[0, 4]))  # two positives share the mass
    # a rank's rows against the gathered keys: the empty row points at its own column
    shifted = soft_targets(torch.zeros(2, 6), offset=3)
    assert shifted[0, 3] == 1 and shifted[1, 4] == 1
    with pytest.raises(ConfigError, match="cosine or jaccard"):
        label_similarity(LABELS, LABELS, "dice")
    # integer labels compare as floats
    ints = LABELS.long()
    torch.testing.assert_close(label_similarity(ints, ints), s.float())


def test_dynamic_world_map_collapses_bigearthnet_labels():
    m = label_map(BIGEARTHNET19, "dynamic-world")
    assert m.shape == (19, 9) and torch.equal(m.sum(dim=1), torch.ones(19))
    y = torch.zeros(19)
    y[[8, 9, 17]] = 1  # broad-leaved, coniferous forest, inland waters
    out = map_labels(y, m)
    assert out.tolist() == [1.0 if c in ("trees", "water") else 0.0 for c in DYNAMIC_WORLD]
    assert label_map(BIGEARTHNET19, "dataset") is None
    # Dynamic World names in any order (a GeoTIFF folder's sorted label names)
    m = label_map(["water", "built"], "dynamic-world")
    assert m[0, DYNAMIC_WORLD.index("water")] == 1 and m[1, DYNAMIC_WORLD.index("built")] == 1
    with pytest.raises(ConfigError, match="no Dynamic World class"):
        label_map(["Glacier"], "dynamic-world")


def test_siamese_masking_drops_exact_token_counts():
    vit = tiny_vit().eval()
    seen = []
    hook = vit.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    x = torch.randn(2, 13, 32, 32)
    pooled(vit, x, mask_ratio=0.75)
    pooled(vit, x, mask_ratio=0.0)
    hook.remove()
    assert seen[0] == (2, 1 + int(16 * 0.25), 32)  # cls + kept patches of the 4 x 4 grid
    assert seen[1] == (2, 17, 32)
    # no masking: timm's own pooled feature
    with torch.no_grad():
        torch.testing.assert_close(pooled(vit, x), vit.forward_head(vit.forward_features(x),
                                                                    pre_logits=True))


def test_teacher_is_an_ema_of_the_student_and_gets_no_gradient():
    module = SoftCon(tiny_vit(), SoftConConfig(proj_hidden_dim=16, proj_dim=8), batch_size=4)
    assert not any(p.requires_grad for p in module.encoder_k.parameters())
    with torch.no_grad():
        for p in module.encoder.parameters():
            p.add_(1.0)
    student = next(module.encoder.parameters()).detach().clone()
    teacher = next(module.encoder_k.parameters()).detach().clone()
    assert module.momentum_step() == 0.99  # outside a trainer: the base momentum
    torch.testing.assert_close(next(module.encoder_k.parameters()),
                               0.99 * teacher + 0.01 * student)
    assert momentum_at(10, 10, 0.99) == 1.0


def test_loss_reads_the_batch_and_backpropagates_to_the_student_only():
    torch.manual_seed(0)
    module = SoftCon(tiny_vit(), SoftConConfig(proj_hidden_dim=16, proj_dim=8), batch_size=4)
    batch = {"view1": torch.randn(4, 13, 32, 32), "view2": torch.randn(4, 13, 32, 32),
             "label": LABELS[:4].float()}
    loss = module.pretrain_loss(batch)
    loss.backward()
    assert module.encoder.patch_embed.proj.weight.grad is not None
    assert module.encoder_k.patch_embed.proj.weight.grad is None
    # validation: a fixed mask from the seed gives the same loss twice
    module.eval()
    with torch.no_grad():
        a = module.pretrain_loss(batch, generator_seed=3)
        b = module.pretrain_loss(batch, generator_seed=3)
    assert float(a) == float(b)
    assert module.validation_step({"image": batch["view1"], "label": batch["label"]}, 0) is None


def test_softcon_needs_vit_or_resnet_and_masks_vits_only():
    resnet = create_backbone("resnet18", in_chans=13)
    module = SoftCon(resnet, SoftConConfig(proj_hidden_dim=16, proj_dim=8), batch_size=2)
    assert module.mask_ratio == 0.0 and len(module.projector) == 5  # 2 layers for ResNets
    assert METHODS["softcon"] is SoftCon and SoftCon.sync_batchnorm
    with pytest.raises(ConfigError, match="keeps no patch token"):
        SoftCon(tiny_vit(), SoftConConfig(mask_ratio=0.95), batch_size=2)  # 16 patches


def test_rgb_checkpoint_adapts_to_thirteen_bands(tmp_path):
    torch.manual_seed(0)
    rgb = tiny_vit(in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    # the default: the stem keeps the model's random init, every other layer loads
    ms = tiny_vit(in_chans=13)
    own_stem = ms.patch_embed.proj.weight.detach().clone()
    report = load_backbone_weights(ms, path, strict=True, stem="random")
    assert "patch_embed.proj.weight" in report.set_aside and not report.missing
    assert torch.equal(ms.patch_embed.proj.weight, own_stem)
    torch.testing.assert_close(ms.patch_embed.proj.bias, rgb.patch_embed.proj.bias)
    torch.testing.assert_close(ms.blocks[0].attn.qkv.weight, rgb.blocks[0].attn.qkv.weight)
    with pytest.raises(WeightsError, match="has shape"):  # without stem handling: an error
        load_backbone_weights(tiny_vit(in_chans=13), path)
    # weight inflation
    ms = tiny_vit(in_chans=13)
    report = load_backbone_weights(ms, path, strict=True, stem="adapt", rgb_index=[3, 2, 1])
    assert "patch_embed.proj.weight" in report.resized
    w, w3 = ms.patch_embed.proj.weight.detach(), rgb.patch_embed.proj.weight.detach()
    torch.testing.assert_close(w[:, [3, 2, 1]], w3 * 3 / 13)
    torch.testing.assert_close(w[:, 0], w3.mean(dim=1) * 3 / 13)
    torch.testing.assert_close(ms.blocks[0].attn.qkv.weight, rgb.blocks[0].attn.qkv.weight)
    # a band-uniform image gives the RGB model's patch embedding
    x = torch.full((1, 13, 32, 32), 0.3)
    torch.testing.assert_close(ms.patch_embed(x), rgb.patch_embed(x[:, :3]))
    sar = adapt_rgb_stem(w3, 2, [])  # VV / VH: both from the RGB mean
    torch.testing.assert_close(sar, w3.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * 1.5)
    with pytest.raises(WeightsError, match="channel adaptation"):
        adapt_rgb_stem(torch.zeros(4, 2, 3, 3), 13, [3, 2, 1])
    with pytest.raises(WeightsError, match="channel adaptation"):  # a band index outside
        adapt_rgb_stem(w3, 2, [3, 2, 1])
    # continual pretraining through the config: from_config adapts and names it
    from types import SimpleNamespace

    section = SoftConConfig(init_weights=str(path), stem_init="adapt", proj_hidden_dim=16,
                            proj_dim=8)
    module = SoftCon.from_config(tiny_vit(in_chans=13), section, SimpleNamespace(backbone="vit"),
                                 SimpleNamespace(in_chans=13, batch_size=4))
    assert "patch_embed.proj.weight" in module.init_report
    torch.testing.assert_close(module.encoder.patch_embed.proj.weight, w)
    torch.testing.assert_close(module.encoder_k.patch_embed.proj.weight, w)  # teacher too
    with pytest.raises(ValueError, match="weights file .* not found"):
        SoftConConfig(init_weights=str(tmp_path / "missing.pth"))


def test_two_view_transform_and_single_label_data_is_an_error():
    torch.manual_seed(0)
    t = SoftConTransform(24, [100.0] * 13, [10.0] * 13, (0.5, 1.0),
                         label_map(BIGEARTHNET19, "dynamic-world"))
    sample = {"image": torch.rand(13, 40, 40) * 1000 + 100, "label": torch.zeros(19)}
    sample["label"][0] = 1
    out = t(sample)
    assert out["view1"].shape == out["view2"].shape == (13, 24, 24)
    assert not torch.equal(out["view1"], out["view2"])
    assert out["label"].tolist() == [float(c == "built") for c in DYNAMIC_WORLD]
    with pytest.raises(ConfigError, match="multi-label"):
        t({"image": sample["image"], "label": torch.tensor(3)})


def test_a_lightning_step_trains(tmp_path):
    torch.manual_seed(0)
    module = SoftCon(tiny_vit(), SoftConConfig(epochs=1, warmup_epochs=0, proj_hidden_dim=16,
                                               proj_dim=8, blr=1e-2), batch_size=4)
    data = [{"view1": torch.randn(13, 32, 32), "view2": torch.randn(13, 32, 32),
             "label": LABELS[i % 5].float()} for i in range(8)]
    before = module.encoder.patch_embed.proj.weight.detach().clone()
    teacher = module.encoder_k.patch_embed.proj.weight.detach().clone()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert not torch.equal(module.encoder.patch_embed.proj.weight, before)
    assert not torch.equal(module.encoder_k.patch_embed.proj.weight, teacher)

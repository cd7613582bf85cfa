"""Selfie: patches and masks, the loss against a written-out float64 cross-entropy with
distractors, which encoder stages the loss trains, a Lightning step, the transform, the
fine-tune backbone and the refusal of non-ResNet encoders. Tiny: 32 px images, 8 px patches."""

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from visionbench.backbones import create_backbone
from visionbench.errors import ConfigError, WeightsError
from visionbench.methods import METHODS
from visionbench.methods.selfie import (
    PatchPositions,
    Selfie,
    SelfieConfig,
    extract_patches,
    finetune_backbone,
    patch_features,
    resolve_num_masked,
    resolve_patch_size,
    sample_masks,
    selfie_logits,
    selfie_loss,
)

DATA = SimpleNamespace(image_size=32, in_chans=3, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                       batch_size=4)
TINY = dict(depth=1, num_heads=2, mlp_ratio=0.5, dropout=0.0)


def make_selfie(backbone: str = "resnet18", seed: int = 0, **kw) -> Selfie:
    torch.manual_seed(seed)
    encoder = create_backbone(backbone, norm="batchnorm")
    return Selfie(encoder, SelfieConfig(**{**TINY, **kw}), image_size=32, batch_size=4)


# -- patches and masks -------------------------------------------------------------------------


def test_patches_are_the_grid_cells_in_row_major_order():
    imgs = torch.randn(2, 3, 32, 32)
    patches = extract_patches(imgs, 8)
    assert patches.shape == (2, 16, 3, 8, 8)
    for r in range(4):
        for c in range(4):
            assert torch.equal(patches[:, r * 4 + c], imgs[:, :, r * 8:(r + 1) * 8,
                                                             c * 8:(c + 1) * 8])
    with pytest.raises(ValueError, match="not a multiple"):
        extract_patches(torch.randn(1, 3, 30, 30), 8)


def test_paper_patch_sizes_and_masked_counts():
    assert resolve_patch_size(32, None) == 8  # 4 x 4 = 16 patches
    assert resolve_patch_size(224, None) == 32  # 7 x 7 = 49 patches
    assert resolve_patch_size(64, 16) == 16
    with pytest.raises(ConfigError, match="set it for 48 px"):
        resolve_patch_size(48, None)
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_patch_size(32, 12)
    assert resolve_num_masked(16, None) == 5 and resolve_num_masked(49, None) == 16
    assert resolve_num_masked(16, 4) == 4
    for bad in (1, 16):
        with pytest.raises(ConfigError, match="pretrain.num_masked"):
            resolve_num_masked(16, bad)


@pytest.mark.parametrize("length,k", [(16, 5), (16, 2), (16, 15), (49, 16)])
def test_masks_split_every_image_exactly(length, k):
    masked, context = sample_masks(6, length, k, torch.Generator().manual_seed(0))
    assert masked.shape == (6, k) and context.shape == (6, length - k)
    for b in range(6):
        m, c = set(masked[b].tolist()), set(context[b].tolist())
        assert len(m) == k and not m & c and m | c == set(range(length))
    assert bool((masked.diff(dim=1) > 0).all()) and bool((context.diff(dim=1) > 0).all())


def test_masks_are_deterministic_for_a_seed():
    a = sample_masks(4, 16, 5, torch.Generator().manual_seed(7))
    b = sample_masks(4, 16, 5, torch.Generator().manual_seed(7))
    c = sample_masks(4, 16, 5, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    model = make_selfie().eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model.pretrain_loss({"image": imgs}, generator_seed=3)
        again = model.pretrain_loss({"image": imgs}, generator_seed=3)
    assert torch.equal(first, again)


# -- loss --------------------------------------------------------------------------------------


def reference_loss(u: np.ndarray, pos: np.ndarray, h: np.ndarray) -> float:
    """For image b and masked location i: logits_j = sum_d (u_bd + p_bid) h_bjd over the
    image's masked patches j (the true patch j = i and the distractors j != i);
    loss = mean over (b, i) of log sum_j exp(logit_j) - logit_i."""
    total, count = 0.0, 0
    batch, k, dim = h.shape
    for b in range(batch):
        for i in range(k):
            logits = [sum((u[b, d] + pos[b, i, d]) * h[b, j, d] for d in range(dim))
                      for j in range(k)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(z - top) for z in logits))
            total += lse - logits[i]
            count += 1
    return total / count


def test_loss_is_the_cross_entropy_over_the_images_masked_patches():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 6, generator=g, dtype=torch.float64)
    pos = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    h = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    expected = reference_loss(u.numpy(), pos.numpy(), h.numpy())
    got = selfie_loss(u, pos, h)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    logits = selfie_logits(u, pos, h)
    assert logits.shape == (3, 4, 4)  # candidates: the 4 masked patches of the same image
    assert logits[1, 2, 3].item() == pytest.approx(float(((u[1] + pos[1, 2]) * h[1, 3]).sum()))
    # Half-precision inputs are scored in float32.
    assert selfie_loss(u.half(), pos.half(), h.half()).dtype == torch.float32


def test_module_loss_wires_context_queries_and_candidates():
    model = make_selfie().eval()
    imgs = torch.randn(2, 3, 32, 32)
    masked, context = sample_masks(2, 16, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(imgs, masked, context)
        h = patch_features(model.encoder, extract_patches(imgs, 8).flatten(0, 1)).reshape(2, 16, -1)
        assert h.shape[-1] == 256  # resnet18's layer3 width
        ctx = torch.stack([h[b, context[b]] for b in range(2)])
        u = model.pooling(ctx)
        pos = torch.stack([model.positions.embeddings()[masked[b]] for b in range(2)])
        tgt = torch.stack([h[b, masked[b]] for b in range(2)])
        expected = reference_loss(u.double().numpy(), pos.double().numpy(), tgt.double().numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_position_embeddings_whole_table_or_row_plus_column():
    assert make_selfie().positions.mode == "full"  # 4 x 4 grid: 16 embeddings learned whole
    pos = PatchPositions(7, 8, "row_col")  # 7 x 7: 7 row + 7 column embeddings
    assert sum(p.numel() for p in pos.parameters()) == 14 * 8
    table = pos.embeddings()
    assert table.shape == (49, 8)
    assert torch.equal(table[3 * 7 + 5], pos.rows[3] + pos.cols[5])
    assert torch.equal(pos(torch.tensor([[26, 0]])), table[[26, 0]].unsqueeze(0))


# -- what the loss trains ----------------------------------------------------------------------


def test_stages_one_to_three_get_gradients_layer4_none():
    model = make_selfie("resnet50", depth=1, num_heads=2, mlp_ratio=0.25)
    assert model.dim == 1024  # P: ResNet-50's first three stages, average pooled
    assert not any(p.requires_grad for p in model.encoder.layer4.parameters())
    model.encoder.layer4.requires_grad_(True)  # even when trainable, the loss never reaches it
    loss = model.pretrain_loss({"image": torch.randn(2, 3, 32, 32)})
    loss.backward()
    for name in ("conv1", "layer1", "layer2", "layer3"):
        grads = [p.grad for p in getattr(model.encoder, name).parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(p.grad is None for p in model.encoder.layer4.parameters())
    assert model.pooling.u0.grad is not None and model.positions.table.grad is not None


def test_optimizer_sgd_nesterov_without_layer4_and_decay_on_weights_only():
    model = make_selfie()
    groups = model.optimizer_groups()
    opt = model.make_optimizer(groups, 0.1)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in model.encoder.layer4.parameters())
    no_decay = {id(p) for p in groups[0]["params"]}
    assert id(model.pooling.u0) in no_decay and id(model.positions.table) in no_decay
    adam = make_selfie(optimizer="adamw")
    assert isinstance(adam.make_optimizer(adam.optimizer_groups(), 1e-3), torch.optim.AdamW)


# -- Lightning, transform, config --------------------------------------------------------------


class PILDataset(Dataset):
    def __init__(self, n: int, transform) -> None:
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
                       for _ in range(n)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return self.transform({"image": self.images[i], "label": 0})


def test_lightning_step_gives_a_finite_loss():
    torch.manual_seed(0)
    section = SelfieConfig(**TINY, warmup_epochs=0)  # a nonzero lr on the first step
    encoder = create_backbone("resnet18", norm="batchnorm")
    model = Selfie.from_config(encoder, section, SimpleNamespace(backbone="resnet18"), DATA)
    ds = PILDataset(8, Selfie.train_transform(section, DATA))
    loader = DataLoader(ds, batch_size=4)
    before = model.pooling.u0.detach().clone()
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader, loader)
    loss = trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert not torch.equal(before, model.pooling.u0.detach())


def test_non_resnet_encoders_are_refused():
    vit = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                          depth=1, num_heads=2)
    model = SimpleNamespace(backbone="vit_tiny_patch16_224")
    with pytest.raises(ConfigError) as err:
        Selfie.from_config(vit, SelfieConfig(), model, DATA)
    message = str(err.value)
    assert "\n" not in message and "resnet" in message and "vit_tiny_patch16_224" in message
    preact = create_backbone("resnet18", norm="evonorm_b0")  # a pre-activation ResNetV2
    with pytest.raises(ConfigError, match="ResNetV2"):
        Selfie.from_config(preact, SelfieConfig(), SimpleNamespace(backbone="resnet18"), DATA)


def test_train_transform_pads_crops_and_normalizes():
    section = SelfieConfig()
    transform = Selfie.train_transform(section, DATA)
    out = transform({"image": Image.new("RGB", (32, 32), (255, 255, 255)), "label": 3})
    assert set(out) == {"image"} and out["image"].shape == (3, 32, 32)
    # White is (1 - 0.5) / 0.25 = 2 after normalization; zero padding shows as -2 when shifted.
    assert set(out["image"].unique().tolist()) <= {2.0, -2.0}
    grey = SimpleNamespace(image_size=32, in_chans=1, mean=[0.5, 0.5, 0.5], std=[0.25] * 3)
    assert Selfie.train_transform(section, grey)({"image": Image.new("RGB", (48, 40))})[
        "image"].shape == (1, 32, 32)
    big = SimpleNamespace(image_size=224, in_chans=3, mean=[0.5], std=[0.25])
    assert Selfie.train_transform(section, big)({"image": Image.new("RGB", (64, 80))})[
        "image"].shape == (3, 224, 224)


def test_config_defaults_and_registry():
    cfg = SelfieConfig()
    assert cfg.method == "selfie" and METHODS["selfie"] is Selfie
    assert Selfie.families == ("resnet",) and Selfie.config is SelfieConfig
    assert cfg.patch_size is None and cfg.num_masked is None and cfg.pos_embed == "auto"
    assert (cfg.depth, cfg.num_heads, cfg.optimizer, cfg.blr) == (3, 16, "sgd", 0.1)
    with pytest.raises(ValueError):
        SelfieConfig(unknown=1)
    with pytest.raises(ConfigError, match="num_heads"):
        make_selfie(num_heads=3)  # 256 is not divisible by 3


# -- fine-tuning -------------------------------------------------------------------------------


def test_finetune_backbone_takes_p_as_stages_one_to_three():
    model = make_selfie(seed=1)
    state = model.state_dict()
    torch.manual_seed(2)
    backbone = finetune_backbone(state, "resnet18")
    ft = backbone.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(ft[key], value), key
    torch.manual_seed(2)
    fresh_init = create_backbone("resnet18").state_dict()
    torch.manual_seed(2)
    fresh = finetune_backbone(model.encoder.state_dict(), "resnet18",
                              fresh_last_stage=True).state_dict()
    for key, value in fresh.items():
        source = fresh_init if key.startswith("layer4.") else model.encoder.state_dict()
        assert torch.equal(value, source[key]), key
    with pytest.raises(WeightsError, match="missing"):
        finetune_backbone({k: v for k, v in state.items() if "layer2" not in k}, "resnet18")
    with pytest.raises(WeightsError):
        finetune_backbone(state, "resnet34")

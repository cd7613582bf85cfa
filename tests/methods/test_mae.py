"""MAE: masking, unshuffle, loss, sin-cos embeddings, init, optimizer, official checkpoints.

``reference_mae_loss`` restates facebookresearch/mae ``models_mae.py`` (patch embedding as a
strided convolution, explicit softmax attention, argsort masking, gather unshuffle,
norm-pix loss) in float64 with plain tensor ops, so the module, which runs timm blocks with
fused scaled-dot-product attention, is checked against the official computation.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionbench.backbones import create_backbone
from visionbench.backbones.pos_embed import sincos_2d
from visionbench.errors import WeightsError
from visionbench.methods.mae import (
    MAE,
    MAEConfig,
    masked_patch_loss,
    patchify,
    random_masking,
    unpatchify,
)
from visionbench.methods.schedule import half_cycle_cosine

DEPTH, HEADS, DIM, DEC_DIM, DEC_DEPTH, DEC_HEADS, P, IMG = 2, 2, 32, 16, 2, 2, 4, 16


def make_mae(seed: int = 0, **kw) -> MAE:
    torch.manual_seed(seed)
    enc = create_backbone("vit_tiny_patch16_224", img_size=IMG, patch_size=P, embed_dim=DIM,
                          depth=DEPTH, num_heads=HEADS)
    args = dict(decoder_embed_dim=DEC_DIM, decoder_depth=DEC_DEPTH, decoder_num_heads=DEC_HEADS)
    schedule = {k: kw.pop(k) for k in list(kw) if k in MAEConfig.model_fields}
    return MAE(enc, MAEConfig(**schedule), **{**args, **kw})


# -- masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,length", [(0.75, 64), (0.75, 196), (0.5, 10), (0.9, 49)])
def test_masking_keeps_exactly_int_l_times_one_minus_ratio(ratio, length):
    x = torch.randn(3, length, 8)
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert kept.shape == (3, keep, 8)
    assert torch.equal(mask.sum(1), torch.full((3,), float(length - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masking_keeps_the_lowest_noise_tokens_and_unshuffles():
    x = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8, 1)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.6],
                          [0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1]])
    kept, mask, ids_restore = random_masking(x, 0.75, noise)
    assert kept[0, :, 0].tolist() == [1.0, 5.0]  # noise 0.1 and 0.2, in ascending noise
    assert kept[1, :, 0].tolist() == [8.0, 15.0]
    assert mask[0].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]  # 1 = removed
    # The decoder's unshuffle puts every kept token back at its original position.
    filler = torch.full((2, 6, 1), -1.0)
    restored = torch.gather(torch.cat([kept, filler], 1), 1, ids_restore.unsqueeze(-1))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert bool((restored[~visible] == -1).all())


def test_masking_rejects_noise_of_the_wrong_shape():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(torch.randn(2, 8, 4), 0.75, torch.rand(2, 7))


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # Channels last inside a patch: element (row 0, col 1) of patch 0, channel 2.
    assert patches[0, 0, (0 * 4 + 1) * 3 + 2] == imgs[0, 2, 0, 1]
    assert torch.equal(unpatchify(patches, 4, (2, 2), 3), imgs)


# -- loss ---------------------------------------------------------------------------------------


def test_loss_counts_masked_patches_only():
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    mask = torch.zeros(2, 16)
    mask[:, :12] = 1
    base = masked_patch_loss(pred, target, mask, norm_pix_loss=True)
    changed_visible = pred.clone()
    changed_visible[:, 12:] += 100.0
    assert torch.equal(masked_patch_loss(changed_visible, target, mask, True), base)
    changed_masked = pred.clone()
    changed_masked[:, 0] += 1.0
    assert masked_patch_loss(changed_masked, target, mask, True) != base


def test_loss_equals_written_out_norm_pix_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    target = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 10, generator=g) > 0.5).double()
    expected, count = 0.0, 0.0
    for n in range(3):
        for i in range(10):
            t = target[n, i].numpy()
            normed = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
            expected += mask[n, i].item() * float(np.mean((pred[n, i].numpy() - normed) ** 2))
            count += mask[n, i].item()
    got = masked_patch_loss(pred, target, mask, norm_pix_loss=True).item()
    assert got == pytest.approx(expected / count, rel=1e-12)


# -- position embeddings -------------------------------------------------------------------------


def mae_numpy_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """util/pos_embed.py's formula, written out: meshgrid(w, h), [sin, cos] per half."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                         np.arange(grid_size, dtype=np.float32))
    emb = np.concatenate([one_d(embed_dim // 2, gw), one_d(embed_dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)


def test_sincos_equals_mae_numpy_formula():
    assert np.allclose(sincos_2d(64, 7, cls_token=True), mae_numpy_sincos(64, 7), atol=0)
    model = make_mae()
    expected = torch.from_numpy(mae_numpy_sincos(DIM, IMG // P)).float()
    assert torch.allclose(model.encoder.pos_embed[0], expected, atol=1e-7)
    assert torch.allclose(model.decoder_pos_embed[0],
                          torch.from_numpy(mae_numpy_sincos(DEC_DIM, IMG // P)).float(), atol=1e-7)
    assert not model.encoder.pos_embed.requires_grad
    assert not model.decoder_pos_embed.requires_grad
    assert torch.count_nonzero(model.encoder.pos_embed[0, 0]) == 0  # cls slot zero


def test_init_follows_the_official_code():
    model = make_mae()
    w = model.encoder.patch_embed.proj.weight
    fan_in, fan_out = w[0].numel(), w.shape[0]
    bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform of the weight seen as 2-D
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.8 * bound
    q = model.decoder_blocks[0].attn.qkv
    assert torch.count_nonzero(q.bias) == 0
    assert torch.equal(model.decoder_norm.weight, torch.ones(DEC_DIM))
    big = make_mae(seed=1, decoder_embed_dim=512)
    assert 0.015 < big.mask_token.std().item() < 0.025  # normal(std=0.02)


# -- reference computation -------------------------------------------------------------------------


def _ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-6)


def _block(x, sd, prefix, heads):
    b, n, c = x.shape
    h = _ln(x, sd[f"{prefix}norm1.weight"], sd[f"{prefix}norm1.bias"])
    qkv = h @ sd[f"{prefix}attn.qkv.weight"].T + sd[f"{prefix}attn.qkv.bias"]
    qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    x = x + out @ sd[f"{prefix}attn.proj.weight"].T + sd[f"{prefix}attn.proj.bias"]
    h = _ln(x, sd[f"{prefix}norm2.weight"], sd[f"{prefix}norm2.bias"])
    h = F.gelu(h @ sd[f"{prefix}mlp.fc1.weight"].T + sd[f"{prefix}mlp.fc1.bias"])
    return x + h @ sd[f"{prefix}mlp.fc2.weight"].T + sd[f"{prefix}mlp.fc2.bias"]


def reference_mae_loss(sd, imgs, noise, mask_ratio=0.75):
    sd = {k: v.double() for k, v in sd.items()}
    imgs = imgs.double()
    x = F.conv2d(imgs, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"],
                 stride=P).flatten(2).transpose(1, 2)
    x = x + sd["encoder.pos_embed"][:, 1:, :]
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length, dtype=torch.float64)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = sd["encoder.cls_token"] + sd["encoder.pos_embed"][:, :1, :]
    x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
    for i in range(DEPTH):
        x = _block(x, sd, f"encoder.blocks.{i}.", HEADS)
    x = _ln(x, sd["encoder.norm.weight"], sd["encoder.norm.bias"])
    x = x @ sd["decoder_embed.weight"].T + sd["decoder_embed.bias"]
    mask_tokens = sd["mask_token"].repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + sd["decoder_pos_embed"]
    for i in range(DEC_DEPTH):
        x = _block(x, sd, f"decoder_blocks.{i}.", DEC_HEADS)
    x = _ln(x, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
    pred = (x @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"])[:, 1:, :]
    h = w = IMG // P
    target = imgs.reshape(n, 3, h, P, w, P)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, h * w, P * P * 3)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def test_loss_equals_the_official_computation_given_the_same_noise_and_weights():
    model = make_mae().eval()
    # Move weights away from init so every parameter matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(4, 3, IMG, IMG, generator=g)
    noise = torch.rand(4, (IMG // P) ** 2, generator=g)
    loss, pred, mask = model(imgs, noise=noise)
    expected = reference_mae_loss(model.state_dict(), imgs, noise)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert pred.shape == (4, (IMG // P) ** 2, P * P * 3)


# -- optimizer and schedule ----------------------------------------------------------------------


def test_weight_decay_groups_and_linear_lr_scaling():
    model = make_mae(batch_size=512, blr=1.5e-4)
    decay, no_decay = None, None
    for group in model.optimizer_groups():
        if group["weight_decay"] == 0:
            no_decay = {id(p) for p in group["params"]}
        else:
            decay = {id(p) for p in group["params"]}
    names = dict((id(p), n) for n, p in model.named_parameters())
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1
               for n in (names[i] for i in no_decay))
    assert "encoder.blocks.0.attn.qkv.weight" in {names[i] for i in decay}
    assert "encoder.pos_embed" not in {names[i] for i in decay | no_decay}  # frozen
    assert model.base_lr == pytest.approx(1.5e-4 * 512 / 256)

    class Trainer:  # what configure_optimizers reads: 4096 = 512 x 4 accumulation x 2 ranks
        accumulate_grad_batches, world_size = 4, 2

    model._trainer = Trainer()
    optimizer = model.configure_optimizers()
    assert model.base_lr == pytest.approx(1.5e-4 * 4096 / 256)  # main_pretrain.py
    assert optimizer.param_groups[0]["lr"] == pytest.approx(model.base_lr)


def test_half_cycle_cosine_schedule():
    assert half_cycle_cosine(0, 1.0, 0.0, 4, 20) == 0.0
    assert half_cycle_cosine(2, 1.0, 0.0, 4, 20) == pytest.approx(0.5)
    assert half_cycle_cosine(4, 1.0, 0.0, 4, 20) == pytest.approx(1.0)
    assert half_cycle_cosine(12, 1.0, 0.1, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5)
    assert half_cycle_cosine(20, 1.0, 0.1, 4, 20) == pytest.approx(0.1)


# -- official checkpoints --------------------------------------------------------------------------


def official_state(model: MAE) -> dict:
    """The key layout of facebookresearch/mae checkpoints: encoder keys at the top level."""
    return {k.removeprefix("encoder."): v.clone() for k, v in model.state_dict().items()}


def test_loads_a_full_official_checkpoint_strictly(tmp_path):
    source = make_mae(seed=5)
    path = tmp_path / "mae_visualize_vit_tiny.pth"
    torch.save({"model": official_state(source)}, path)
    target = make_mae(seed=6)
    message = target.load_official(str(path))
    assert "full model" in message
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_loads_an_encoder_only_checkpoint_and_rejects_mismatches(tmp_path):
    source = make_mae(seed=5)
    encoder_only = {k: v for k, v in official_state(source).items()
                    if not k.startswith(("decoder_", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": encoder_only}, path)
    target = make_mae(seed=6)
    decoder_before = target.decoder_pred.weight.clone()
    assert "encoder only" in target.load_official(str(path))
    fc2 = "blocks.1.mlp.fc2.weight"
    assert torch.equal(target.encoder.get_parameter(fc2), source.encoder.get_parameter(fc2))
    assert torch.equal(target.decoder_pred.weight, decoder_before)

    broken = dict(encoder_only)
    broken.pop("norm.weight")
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing"):
        make_mae().load_official(str(tmp_path / "broken.pth"))
    finetuned = dict(encoder_only, **{"head.weight": torch.zeros(10, DIM)})
    torch.save({"model": finetuned}, tmp_path / "ft.pth")
    with pytest.raises(WeightsError, match="fine-tuned"):
        make_mae().load_official(str(tmp_path / "ft.pth"))


class Pickled:
    pass


def official_checkpoint(model: MAE, args) -> dict:
    """What facebookresearch/mae ``util/misc.py`` ``save_model`` writes (no loss scaler on
    CPU: its state dict is then the scaler's; the layout is the same)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, IMG, IMG))[0].backward()
    optimizer.step()
    return {"model": official_state(model), "optimizer": optimizer.state_dict(), "epoch": 399,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000, "_growth_tracker": 120},
            "args": args}


def test_official_checkpoint_with_argparse_args_loads_and_other_classes_are_refused(tmp_path):
    import argparse

    source = make_mae(seed=5)
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True,
                              blr=1.5e-4, batch_size=64, accum_iter=8, output_dir="./out")
    path = tmp_path / "checkpoint-399.pth"
    torch.save(official_checkpoint(source, args), path)
    target = make_mae(seed=6)
    assert "full model" in target.load_official(str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    evil = tmp_path / "checkpoint-evil.pth"
    torch.save(official_checkpoint(make_mae(seed=5), Pickled()), evil)
    with pytest.raises(WeightsError, match="checkpoint-evil.pth: cannot load with weights_only"):
        make_mae().load_official(str(evil))
    nested = tmp_path / "checkpoint-nested.pth"
    torch.save(official_checkpoint(make_mae(seed=5), argparse.Namespace(hook=Pickled())),
               nested)
    with pytest.raises(WeightsError, match="cannot load with weights_only"):
        make_mae().load_official(str(nested))
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)  # the allow-list is not left on for later loads


def test_reconstruct_returns_images():
    model = make_mae()
    imgs = torch.randn(2, 3, IMG, IMG)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    masked, recon = model.reconstruct(imgs, noise=noise)
    assert masked.shape == recon.shape == imgs.shape
    _, _, mask = model(imgs, noise=noise)
    visible = mask == 0
    assert torch.allclose(patchify(recon, P)[visible], patchify(imgs, P)[visible])
    assert torch.count_nonzero(patchify(masked, P)[~visible]) == 0

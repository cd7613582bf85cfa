"""VideoMAE V2: masks, targets, loss and forward against a float64 re-statement of the
official ``modeling_pretrain.py`` / ``engine_for_pretraining.py``; checkpoints; transform."""


import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionbench.backbones import create_backbone
from visionbench.backbones.video_vit import sinusoid_table
from visionbench.errors import WeightsError
from visionbench.methods.videomae_v2 import (
    VideoMAEv2,
    VideoMAEv2Config,
    VideoMAEv2Transform,
    dual_masked_loss,
    reconstruction_target,
    running_cell_patterns,
    tube_mask,
)

PATCH, FRAMES, SIZE, HEADS = 8, 4, 32, 2


def tiny_module(**kwargs) -> VideoMAEv2:
    torch.manual_seed(0)
    encoder = create_backbone("video_vit_small_patch16_224", img_size=SIZE, num_frames=FRAMES,
                              patch_size=PATCH, depth=2, embed_dim=32, num_heads=HEADS)
    return VideoMAEv2(encoder, VideoMAEv2Config(), decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=HEADS, **kwargs)


def test_tube_mask_masks_int_ratio_of_each_frame_identically_over_time():
    mask = tube_mask(5, (8, 14, 14), 0.9, torch.Generator().manual_seed(0))
    frames = mask.reshape(5, 8, 196)
    assert mask.dtype == torch.bool and mask.shape == (5, 1568)
    assert (frames.sum(-1) == int(0.9 * 196)).all()  # 176 of 196 in every frame
    assert (frames == frames[:, :1]).all()  # a tube: the same positions in every slice
    assert not torch.equal(frames[0, 0], frames[1, 0])  # drawn per clip


def official_running_cell(grid, ratio):
    """``RunningCellMaskingGenerator.all_mask_maps`` re-stated from its definition."""
    t, h, w = grid
    masks = int(4 * ratio)
    queue = np.hstack([np.ones(masks), np.zeros(4 - masks)])
    maps = []
    for ptr in range(4):
        frames = []
        for _ in range(t):
            ptr += 1
            cell = queue[(np.arange(4) + ptr) % 4].reshape(2, 2)
            frames.append(np.tile(cell, [h // 2, w // 2]).flatten())
        maps.append(np.stack(frames))
    return np.stack(maps)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_running_cell_patterns_are_the_official_generators(ratio):
    grid = (8, 14, 14)
    patterns = running_cell_patterns(grid, ratio)
    expected = official_running_cell(grid, ratio).reshape(4, -1).astype(bool)
    assert np.array_equal(patterns.numpy(), expected)
    per_frame = patterns.reshape(4, 8, 196).sum(-1)
    assert (per_frame == int(4 * ratio) * 49).all()  # the ratio in every slice
    assert not torch.equal(patterns[0, :196], patterns[0, 196:392])  # the cell runs in time


def test_sinusoid_table_is_the_official_formula_in_float64():
    n, d = 50, 24
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)]
                      for pos in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    ours = sinusoid_table(n, d)
    assert ours.shape == (1, n, d) and ours.dtype == torch.float32
    assert torch.equal(ours[0], torch.tensor(table, dtype=torch.float32))


def reference_patches(video01, tubelet, patch):
    """``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c`` one token at a time."""
    b, c, t, h, w = video01.shape
    tokens = []
    for ti in range(t // tubelet):
        for hi in range(h // patch):
            for wi in range(w // patch):
                cube = video01[:, :, ti * tubelet:(ti + 1) * tubelet,
                               hi * patch:(hi + 1) * patch, wi * patch:(wi + 1) * patch]
                tokens.append(cube.permute(0, 2, 3, 4, 1).reshape(b, -1, c))
    return torch.stack(tokens, dim=1)


def test_target_normalizes_each_patch_and_channel_with_the_unbiased_std():
    video = torch.rand(2, 3, 4, 16, 16, dtype=torch.float64)
    patches = reference_patches(video, 2, 8)
    mean = patches.mean(dim=-2, keepdim=True)
    std = torch.sqrt(((patches - mean) ** 2).sum(dim=-2, keepdim=True) / (patches.shape[-2] - 1))
    expected = ((patches - mean) / (std + 1e-6)).flatten(2)
    target = reconstruction_target(video, 2, 8)
    assert torch.allclose(target, expected, atol=1e-12)
    assert torch.allclose(reconstruction_target(video, 2, 8, normalize=False),
                          patches.flatten(2))


def test_loss_counts_only_decoder_visible_tokens_the_encoder_masked():
    n, v = 8, 4
    target = torch.zeros(1, n, v)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)  # encoder
    decode = torch.tensor([[1, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool)  # not decoded
    # decoded tokens: 1, 3, 5, 7; of those the encoder masked 1 and 3
    pred = torch.zeros(1, 4, v)
    pred[0, 0] = 1.0  # token 1: counted
    assert dual_masked_loss(pred, target, mask, decode) == pytest.approx(0.5)
    pred[0, 2] = 5.0  # token 5: visible to the encoder, not counted
    assert dual_masked_loss(pred, target, mask, decode) == pytest.approx(0.5)


def official_block(x, p, prefix, heads):
    """``modeling_finetune.Block`` with ``Attention`` (q / v bias, zero k bias)."""
    d = x.shape[-1]
    h = F.layer_norm(x, (d,), p[prefix + "norm1.weight"], p[prefix + "norm1.bias"], eps=1e-6)
    q_bias, v_bias = p[prefix + "attn.q_bias"], p[prefix + "attn.v_bias"]
    qkv = F.linear(h, p[prefix + "attn.qkv.weight"],
                   torch.cat([q_bias, torch.zeros_like(v_bias), v_bias]))
    b, n, _ = x.shape
    q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
    x = x + F.linear(out, p[prefix + "attn.proj.weight"], p[prefix + "attn.proj.bias"])
    h = F.layer_norm(x, (d,), p[prefix + "norm2.weight"], p[prefix + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, p[prefix + "mlp.fc1.weight"], p[prefix + "mlp.fc1.bias"])),
                 p[prefix + "mlp.fc2.weight"], p[prefix + "mlp.fc2.bias"])
    return x + h


def official_loss(p, video, mask, decode_mask, mean, std, enc_depth, dec_depth, heads):
    """``PretrainVisionTransformer.forward`` + ``train_one_epoch``'s loss, float64."""
    b = video.shape[0]
    x = F.conv3d(video, p["encoder.patch_embed.proj.weight"], p["encoder.patch_embed.proj.bias"],
                 stride=(2, PATCH, PATCH)).flatten(2).transpose(1, 2)
    n, d = x.shape[1:]

    def table(dim):
        t = np.array([[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)]
                      for pos in range(n)])
        t[:, 0::2], t[:, 1::2] = np.sin(t[:, 0::2]), np.cos(t[:, 1::2])
        return torch.tensor(t, dtype=torch.float32).double()[None]

    x = x + table(d)
    x_vis = x[~mask].reshape(b, -1, d)
    for i in range(enc_depth):
        x_vis = official_block(x_vis, p, f"encoder.blocks.{i}.", heads)
    x_vis = F.layer_norm(x_vis, (d,), p["encoder.norm.weight"], p["encoder.norm.bias"], eps=1e-6)
    x_vis = F.linear(x_vis, p["encoder_to_decoder.weight"])
    c = x_vis.shape[-1]
    pos = table(c).expand(b, -1, -1)
    pos_vis, pos_mask = pos[~mask].reshape(b, -1, c), pos[~decode_mask].reshape(b, -1, c)
    x_full = torch.cat([x_vis + pos_vis, p["mask_token"] + pos_mask], dim=1)
    for i in range(dec_depth):
        x_full = official_block(x_full, p, f"decoder.blocks.{i}.", heads)
    out = x_full[:, -pos_mask.shape[1]:]
    out = F.linear(F.layer_norm(out, (c,), p["decoder.norm.weight"], p["decoder.norm.bias"],
                                eps=1e-6), p["decoder.head.weight"], p["decoder.head.bias"])
    unnorm = video * std + mean
    squeeze = reference_patches(unnorm, 2, PATCH)
    norm = (squeeze - squeeze.mean(dim=-2, keepdim=True)) / (
        squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    patch = norm.flatten(2)
    labels = patch[~decode_mask].reshape(b, -1, patch.shape[-1])
    loss = ((out - labels) ** 2).mean(dim=-1)
    cal = mask[~decode_mask].reshape(b, -1)
    return (loss * cal).sum() / cal.sum()


def test_loss_equals_the_official_forward_in_float64():
    module = tiny_module().double()
    for param in module.parameters():  # away from the zero init of biases / layer norms
        param.data.add_(0.05 * torch.randn_like(param))
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE, dtype=torch.float64)
    mask, decode = module.masks(2, torch.Generator().manual_seed(3))
    ours = module.loss(video, mask, decode).detach()
    p = {k: v.double() for k, v in module.state_dict().items()}
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1, 1)
    reference = official_loss(p, video, mask, decode, mean, std, 2, 1, HEADS)
    assert float(ours) == pytest.approx(float(reference), abs=1e-5, rel=1e-9)


def official_keys(enc_depth: int, dec_depth: int) -> set[str]:
    """The state-dict keys of the official ``PretrainVisionTransformer`` (qkv without bias,
    q_bias / v_bias, no LayerScale at init_values 0, sinusoid tables not stored)."""
    block = ["norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
            "encoder.norm.weight", "encoder.norm.bias", "encoder_to_decoder.weight",
            "mask_token", "decoder.norm.weight", "decoder.norm.bias", "decoder.head.weight",
            "decoder.head.bias"}
    keys |= {f"encoder.blocks.{i}.{k}" for i in range(enc_depth) for k in block}
    keys |= {f"decoder.blocks.{i}.{k}" for i in range(dec_depth) for k in block}
    return keys


def test_official_checkpoint_loads_by_its_keys_and_rejects_others(tmp_path):
    source = tiny_module()
    assert set(source.state_dict()) == official_keys(2, 1)
    for param in source.parameters():
        param.data.normal_()
    path = tmp_path / "checkpoint-199.pth"
    # run_mae_pretraining.py saves a torch.compile'd model: every key under _orig_mod.
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in source.state_dict().items()},
                "epoch": 199}, path)
    target = tiny_module()
    assert "tensors" in target.load_official(str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    state = source.state_dict()
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="unexpected"):
        target.load_official(str(tmp_path / "bad.pth"))


def test_pretrain_loss_folds_the_repeated_samples_and_trains():
    module = tiny_module()
    no_decay, decay = module.optimizer_groups()
    assert any(p is module.mask_token for p in no_decay["params"])  # get_parameter_groups
    assert all(p.ndim > 1 for p in decay["params"])
    batch = {"video": torch.randn(2, 3, 3, FRAMES, SIZE, SIZE)}  # 2 videos x 3 samples
    loss = module.pretrain_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and module.encoder.blocks[0].attn.q_bias.grad is not None
    assert module.pretrain_loss(batch, generator_seed=1) == module.pretrain_loss(
        batch, generator_seed=1)  # validation masks are fixed per batch
    video01, mask, recon = module.reconstruct(batch["video"][:, 0])
    assert recon.shape == video01.shape and mask.shape == (2, 2 * 4 * 4)


def drifting_gratings(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, FRAMES, SIZE, SIZE) in [0.1, 0.9]: a grating of period 4 or 8 px (dividing
    the patch) along x or y, at a random phase, drifting a random amount each frame; every
    patch of a frame is the same, and frames differ."""
    period = torch.tensor([4.0, 8.0])[torch.randint(0, 2, (n,), generator=generator)]
    vertical = torch.randint(0, 2, (n,), generator=generator).bool()
    phase = torch.rand(n, generator=generator) * 2 * math.pi
    drift = (torch.rand(n, generator=generator) - 0.5) * 2.0  # rad a frame
    coord = torch.arange(SIZE, dtype=torch.float32)
    along = torch.where(vertical[:, None, None, None], coord[None, None, :, None],
                        coord[None, None, None, :])
    frames = torch.arange(FRAMES, dtype=torch.float32)[None, :, None, None]
    angle = (2 * math.pi * along / period[:, None, None, None] + phase[:, None, None, None]
             + drift[:, None, None, None] * frames)
    return (0.5 + 0.4 * torch.sin(angle))[:, None].expand(n, 3, FRAMES, SIZE, SIZE)


def trained_on_gratings(module: VideoMAEv2, steps: int = 300) -> float:
    """The held-out loss (64 clips, fixed masks) after ``steps`` AdamW steps on batches of
    16 fresh drifting gratings."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, betas=(0.9, 0.95))
    data, masks = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for _ in range(steps):
        video = (drifting_gratings(16, data) - 0.5) / 0.25
        loss = module.loss(video, *module.masks(16, masks))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    video = (drifting_gratings(64, torch.Generator().manual_seed(5)) - 0.5) / 0.25
    with torch.no_grad():
        return module.loss(video, *module.masks(64, torch.Generator().manual_seed(6))).item()


def test_the_decoder_learns_masked_tubes_from_the_visible_tokens_of_their_time_slice():
    # With 2 of 16 positions visible in each temporal slice, a masked tube of a drifting
    # grating is predictable only from the visible tokens of the same slice: the decoder
    # has to place each mask token in time (its sinusoid position) and read that slice. At
    # init the normalized-target loss is ~1; trained, it falls far below what a decoder
    # without positions reaches (it can only blend the slices).
    trained = trained_on_gratings(tiny_module(mean=(0.5,) * 3, std=(0.25,) * 3))
    blind = tiny_module(mean=(0.5,) * 3, std=(0.25,) * 3)
    blind.decoder_pos_embed.zero_()
    without_positions = trained_on_gratings(blind)
    assert trained < 0.25 < without_positions, (trained, without_positions)


def test_clip_grad_clips_the_total_gradient_norm_before_the_step():
    import lightning as L

    module = VideoMAEv2(tiny_module().encoder, VideoMAEv2Config(clip_grad=0.02),
                        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=HEADS)
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.pretrain_loss({"video": torch.randn(2, 3, FRAMES, SIZE, SIZE)},
                         generator_seed=0).backward()

    def total_norm() -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    assert total_norm() > 0.05
    module.configure_gradient_clipping(optimizer)  # what Lightning calls before the step
    assert total_norm() == pytest.approx(0.02, rel=1e-4)


def test_the_transform_draws_num_sample_crops_of_the_same_frames():
    transform = VideoMAEv2Transform(32, (0.5,) * 3, (0.25,) * 3, num_sample=4)
    frames = torch.full((FRAMES, 40, 48, 3), 255, dtype=torch.uint8)
    out = transform({"video": frames, "label": 3, "video_id": "a"})
    assert out["video"].shape == (4, 3, FRAMES, 32, 32) and out["label"] == 3
    assert torch.allclose(out["video"], torch.full_like(out["video"], 2.0))  # (1 - .5) / .25
    ramp = torch.arange(48, dtype=torch.uint8).repeat(FRAMES, 40, 1)[..., None].expand(
        -1, -1, -1, 3).contiguous() * 5
    torch.manual_seed(0)
    crops = transform({"video": ramp})["video"]
    assert len({tuple(c[0, 0, 0, :2].tolist()) for c in crops}) > 1  # crops differ


def test_an_official_pretraining_checkpoint_loads_as_a_backbone(tmp_path):
    from visionbench.backbones import load_backbone_weights

    source = tiny_module()
    for param in source.parameters():
        param.data.normal_()
    path = tmp_path / "checkpoint-199.pth"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}}, path)
    target = tiny_module().encoder
    load_backbone_weights(target, path, strict=True)  # the decoder side is set aside
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_an_official_finetuned_checkpoint_loads_its_blocks_and_sets_its_classifier_aside(
        tmp_path):
    """``modeling_finetune.VisionTransformer`` with mean pooling (the fine-tuned and the
    distilled releases): no ``norm`` (Identity), ``fc_norm`` and ``head`` after pooling."""
    from visionbench.backbones import load_backbone_weights

    source = tiny_module().encoder
    state = {k: v.normal_() for k, v in source.state_dict().items() if not k.startswith("norm.")}
    dim = source.embed_dim
    state |= {"fc_norm.weight": torch.randn(dim), "fc_norm.bias": torch.randn(dim),
              "head.weight": torch.randn(400, dim), "head.bias": torch.randn(400)}
    path = tmp_path / "vit_b_k710_dl_from_giant.pth"
    torch.save({"module": state}, path)
    target = tiny_module().encoder
    report = load_backbone_weights(target, path)
    assert report.missing == ["norm.bias", "norm.weight"] and not report.unexpected
    assert set(report.set_aside) == {"fc_norm.weight", "fc_norm.bias", "head.weight",
                                     "head.bias"}
    for key, value in state.items():
        if not key.startswith(("fc_norm.", "head.")):
            assert torch.equal(target.state_dict()[key], value), key


def test_a_fit_logs_its_loss_without_lightning_guessing_the_batch_size(tmp_path):
    # a batch with a list of paths beside its tensors is what made Lightning guess (and warn
    # once a process: the cache is cleared first)
    import warnings

    import lightning as L
    from lightning.pytorch.utilities.data import warning_cache

    module = tiny_module()
    module.epochs, module.warmup_epochs = 1, 0
    clips = [{"video": torch.randn(2, 3, FRAMES, SIZE, SIZE), "label": torch.tensor(0),
              "path": f"clip_{i}.mp4"} for i in range(4)]
    warning_cache.clear()
    loader = torch.utils.data.DataLoader(clips, batch_size=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    assert trainer.global_step == 2
    assert not [w for w in caught if "ambiguous collection" in str(w.message)]

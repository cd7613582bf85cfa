"""Clips/s of one VideoMAE V2 pretraining step (tube + running-cell masks, forward, backward,
AdamW step).

Prints the demo size and ViT-B at 16 x 224 (1568 tokens, batch 1), each with timm's fused
scaled-dot-product attention and, as the baseline run in the same process, with the explicit
softmax attention; the ratio is fused / explicit. On CUDA (``--device cuda``) it also prints
peak memory.

    python benchmarks/videomae_step.py                      # CPU: demo size and ViT-B
    python benchmarks/videomae_step.py --device cuda --precision bf16-mixed --steps 50
"""

from __future__ import annotations

import argparse

import torch
from step_timing import timed_steps, train_step

from visionbench.backbones import create_backbone
from visionbench.methods.videomae_v2 import VideoMAEv2

SIZES = {
    "demo": dict(name="video_vit_small_patch16_224",
                 backbone=dict(img_size=32, patch_size=8, num_frames=8, embed_dim=96, depth=4,
                               num_heads=4),
                 decoder=dict(decoder_embed_dim=48, decoder_depth=1, decoder_num_heads=4),
                 frames=8, img=32, batch=16),
    "vit-b": dict(name="video_vit_base_patch16_224", backbone={}, decoder={}, frames=16,
                  img=224, batch=1),
}


def clips_per_second(size: str, fused: bool, device: str, precision: str, steps: int
                     ) -> tuple[float, float]:
    torch.manual_seed(0)
    spec = SIZES[size]
    encoder = create_backbone(spec["name"], **spec["backbone"])
    model = VideoMAEv2(encoder, **spec["decoder"]).to(device).train()
    model.encoder.set_fused_attn(fused)
    for block in model.decoder.blocks:
        block.attn.fused_attn = fused
    opt = torch.optim.AdamW(model.optimizer_groups(), lr=1e-4, betas=(0.9, 0.95))
    video = torch.randn(spec["batch"], 3, spec["frames"], spec["img"], spec["img"],
                        device=device)

    def loss() -> torch.Tensor:
        return model.loss(video, *model.masks(video.shape[0]))

    step = train_step(loss, opt, device, precision)
    elapsed, peak = timed_steps(step, steps, warmup=max(1, steps // 10), device=device)
    return spec["batch"] * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true",
                        choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", choices=list(SIZES), default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
          + f", precision {args.precision}, threads {torch.get_num_threads()}")
    for size in [args.only] if args.only else list(SIZES):
        steps = args.steps or ((10 if size == "demo" else 3) if args.device == "cpu" else 50)
        fused, peak = clips_per_second(size, True, args.device, args.precision, steps)
        explicit, _ = clips_per_second(size, False, args.device, args.precision, steps)
        line = (f"{size:6s} fused SDPA: {fused:8.2f} clips/s; explicit attention "
                f"{explicit:8.2f} clips/s; ratio {fused / explicit:.2f}x")
        if args.device == "cuda":
            line += f", peak memory {peak:.2f} GiB (fused)"
        print(line, flush=True)


if __name__ == "__main__":
    main()

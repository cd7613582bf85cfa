"""Images/s of one MAE training step (forward, backward, AdamW step).

Prints the demo size and ViT-B/16 at 224 px, each with timm's fused scaled-dot-product
attention and, as the baseline run in the same process, with the explicit softmax attention;
the ratio is fused / explicit. On CUDA (``--device cuda``) it also prints peak memory.

    python benchmarks/mae_step.py                       # CPU: demo size and ViT-B/16
    python benchmarks/mae_step.py --device cuda --precision bf16-mixed --steps 300 --only vit-b
"""

from __future__ import annotations

import argparse

import torch
from step_timing import timed_steps, train_step

from visionbench.backbones import create_backbone
from visionbench.methods.mae import MAE

SIZES = {
    "demo": dict(backbone=dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4),
                 decoder=dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4),
                 img=32, batch=256),
    "vit-b": dict(backbone=dict(img_size=224, patch_size=16, embed_dim=768, depth=12,
                                num_heads=12),
                  decoder=dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
                  img=224, batch=64),
}


def build(size: str, fused: bool, device: str) -> MAE:
    spec = SIZES[size]
    encoder = create_backbone("vit_base_patch16_224", **spec["backbone"])
    model = MAE(encoder, **spec["decoder"], batch_size=spec["batch"]).to(device)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def images_per_second(size: str, fused: bool, device: str, precision: str, steps: int,
                      batch: int | None) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build(size, fused, device).train()
    # ViT-B at its GPU batch takes minutes a step on a 2-core CPU: measure a smaller batch.
    batch = batch or (16 if device == "cpu" and size == "vit-b" else SIZES[size]["batch"])
    img = SIZES[size]["img"]
    opt = torch.optim.AdamW(model.optimizer_groups(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, 3, img, img, device=device)
    step = train_step(lambda: model(x)[0], opt, device, precision)
    elapsed, peak = timed_steps(step, steps, warmup=max(2, steps // 10), device=device)
    return batch * steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true",
                        choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--only", choices=list(SIZES), default=None)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the explicit-attention baseline")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")
          + f", precision {args.precision}, threads {torch.get_num_threads()}")
    for size in [args.only] if args.only else list(SIZES):
        default_steps = 20 if size == "demo" else 3
        steps = args.steps or (default_steps if args.device == "cpu" else 100)
        fused, peak = images_per_second(size, True, args.device, args.precision, steps,
                                        args.batch)
        line = f"{size:6s} fused SDPA: {fused:9.1f} images/s"
        if args.device == "cuda":
            line += f", peak memory {peak:.2f} GiB"
        if not args.no_baseline:
            explicit, _ = images_per_second(size, False, args.device, args.precision, steps,
                                            args.batch)
            line += f"; explicit attention {explicit:9.1f} images/s; ratio {fused / explicit:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()

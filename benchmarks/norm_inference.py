"""Inference throughput of a ViT with each norm treatment, as ratios to LayerNorm.

Rows: Pre-LN (baseline), the same weights converted to Pre-RMSNorm and Pre-CRMSNorm
(``convert_to_crmsnorm``; same outputs), token BatchNorm and PRepBN folded into the next
linear layer (``fold_norms_``), DyT. Every model runs in eval mode under
``torch.inference_mode`` in this process, on the same input, interleaved over ``--repeats``
rounds; the best round of each is reported.

    python benchmarks/norm_inference.py [--model vit_small_patch16_224] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from visionbench.backbones import create_vit
from visionbench.norms.conversions import convert_to_crmsnorm
from visionbench.norms.token import fold_norms_


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def build(args, norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_vit(args.model, norm=norm, img_size=args.img_size).eval()


def models(args) -> dict[str, torch.nn.Module]:
    out = {"layernorm": build(args, "layernorm")}
    for variant in ("rms", "crms"):
        out[f"pre-{variant}norm (converted)"] = convert_to_crmsnorm(build(args, "layernorm"),
                                                                    variant=variant)
    for norm in ("batchnorm", "prepbn"):
        model = build(args, norm)
        fold_norms_(model)
        out[f"{norm} (folded)"] = model
    out["dyt"] = build(args, "dyt")
    return {name: m.to(args.device) for name, m in out.items()}


def seconds(model, images, iterations: int) -> float:
    if images.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    candidates = models(args)
    best = dict.fromkeys(candidates, float("inf"))
    with torch.inference_mode():
        for model in candidates.values():
            model(images)  # warm-up
        for _ in range(args.repeats):
            for name, model in candidates.items():
                best[name] = min(best[name], seconds(model, images, args.iterations))
    base = best["layernorm"]
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, {args.device}, "
          f"best of {args.repeats} x {args.iterations} iterations")
    for name, s in best.items():
        rate = args.batch * args.iterations / s
        print(f"  {name:32s} {rate:9.1f} images/s  {base / s:5.2f}x LayerNorm")


if __name__ == "__main__":
    main()

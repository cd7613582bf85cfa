"""Clips/s of the video reader against clips/s of the VideoMAE V2 training step it feeds.

The loader must not be the bottleneck: for 0, 1, 2, ... loader workers it prints the clips/s
of a second pass (the workers started) over the pretraining loader (PyAV decoding,
pretraining frame sampling, the method's repeated multi-scale crops) and its ratio to the
clips/s of the training step (forward, backward, AdamW) at the same size, measured in the
same process; a ratio above 1 means the loader keeps up. Last, the same with no worker and
``in_memory`` (``data.video.in_memory``: every file decoded once, its frames kept; the
second pass reads only kept frames), as the demo profile reads its clips.
Default: the demo profile's clips and model.

    python benchmarks/video_decode.py
    python benchmarks/video_decode.py --workers 0 1 2 4 --image-size 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from visionbench.backbones import create_backbone
from visionbench.data.video.datamodule import VideoClassificationDataModule
from visionbench.data.video.synthetic import generate_motion_clips
from visionbench.methods.videomae_v2 import VideoMAEv2, VideoMAEv2Config, VideoMAEv2Transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader_clips_per_second(root: Path, workers: int, args, in_memory: bool = False) -> float:
    transform = VideoMAEv2Transform(args.image_size, MEAN, STD, args.num_sample)
    dm = VideoClassificationDataModule(
        root, image_size=args.image_size, batch_size=args.batch, num_workers=workers,
        train_kind="pretrain", train_transform=transform, num_frames=16, sampling_rate=2,
        in_memory=in_memory)
    dm.setup()
    loader = dm.train_dataloader()
    for _ in loader:  # a first pass starts the (persistent) workers
        pass
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += batch["video"].shape[0] * batch["video"].shape[1]
    return clips / (time.perf_counter() - start)


def step_clips_per_second(args, steps: int = 10) -> float:
    torch.manual_seed(0)
    encoder = create_backbone("video_vit_small_patch16_224", img_size=args.image_size,
                              patch_size=args.image_size // 4, num_frames=16, embed_dim=96,
                              depth=4, num_heads=4)
    model = VideoMAEv2(encoder, VideoMAEv2Config(), decoder_embed_dim=48, decoder_depth=2,
                       decoder_num_heads=4).train()
    opt = torch.optim.AdamW(model.optimizer_groups(), lr=1e-4, betas=(0.9, 0.95))
    video = torch.randn(args.batch * args.num_sample, 3, 16, args.image_size, args.image_size)

    def step() -> None:
        loss = model.loss(video, *model.masks(video.shape[0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * video.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--clips-per-class", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-sample", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_motion_clips(Path(tmp) / "motion", image_size=args.image_size,
                                     num_frames=32, train_per_class=args.clips_per_class,
                                     val_per_class=1, test_per_class=1)
        step = step_clips_per_second(args)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; training step "
              f"(demo model, {args.image_size} px, 16 frames): {step:8.1f} clips/s")
        for workers in args.workers:
            rate = loader_clips_per_second(root, workers, args)
            print(f"loader, {workers} worker(s): {rate:8.1f} clips/s; loader / step "
                  f"{rate / step:.2f}x", flush=True)
        rate = loader_clips_per_second(root, 0, args, in_memory=True)
        print(f"loader, 0 workers, in_memory (each file decoded once): {rate:8.1f} clips/s; "
              f"loader / step {rate / step:.2f}x", flush=True)


if __name__ == "__main__":
    main()

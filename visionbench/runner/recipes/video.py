"""The pretrain-then-transfer recipe of video-classification experiments (``videomae-v2``):
the method's pretraining on clips (the method's own train transform, pretraining frame
sampling), a figure of clips, their tube masks and reconstructions; then for each init
(pretrained, random) frozen features of the central clip -> linear-probe sweep -> kNN, and
the fine-tune scored on ``test_clips x test_crops`` views. Every row names its frames x clips
x crops in ``variant``."""

from __future__ import annotations

import torch

from visionbench.data.video.datamodule import VideoClassificationDataModule
from visionbench.data.video.synthetic import prepare_motion_clips
from visionbench.errors import ConfigError
from visionbench.methods import method_class
from visionbench.results.figures import save_clip_reconstruction_figure
from visionbench.results.rows import format_variant, parse_variant
from visionbench.runner import stages
from visionbench.runner.core import ENCODER_FILE, Run

EMBEDDED_VIDEO = ("motion",)


def video_root(run: Run):
    """``--data-root`` (a Kinetics-layout folder with ``train.csv`` / ``val.csv``), or the
    embedded motion clips written once to the cache in that layout."""
    d = run.cfg.data
    if d.root is not None:
        return d.root
    if d.dataset not in EMBEDDED_VIDEO:
        raise ConfigError(f"data.dataset {d.dataset!r} has no embedded generator; pass "
                          f"--data-root or use dataset {EMBEDDED_VIDEO[0]!r}")
    run.log("preparing the embedded motion clips (H.264 mp4, Kinetics layout, written once)")
    return prepare_motion_clips(image_size=d.image_size, num_frames=d.video.clip_frames,
                                seed=run.cfg.seed, train_per_class=d.synth.train_per_class,
                                val_per_class=d.synth.val_per_class,
                                test_per_class=d.synth.test_per_class)


def check_video_data(cfg) -> None:
    """Before a run folder exists: the list files under ``--data-root`` read (a missing
    ``train.csv`` or a malformed line is a DataError naming it); clips are decoded later."""
    if cfg.data.root is None:
        return
    v = cfg.data.video
    VideoClassificationDataModule(
        cfg.data.root, image_size=cfg.data.image_size, val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction, seed=cfg.seed, num_frames=v.num_frames,
        sampling_rate=v.sampling_rate, test_num_segment=v.test_clips,
        test_num_crop=v.test_crops).setup()


def video_datamodule(run: Run, train_kind: str = "finetune", train_transform=None,
                     batch_size: int | None = None, label_fraction: float = 1.0,
                     **augmentation) -> VideoClassificationDataModule:
    d = run.cfg.data
    v = d.video
    dm = VideoClassificationDataModule(
        video_root(run), image_size=d.image_size, mean=d.mean, std=d.std,
        batch_size=batch_size or d.batch_size, num_workers=d.num_workers,
        val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=run.cfg.seed,
        train_kind=train_kind, train_transform=train_transform, label_fraction=label_fraction,
        num_frames=v.num_frames, sampling_rate=v.sampling_rate, test_num_segment=v.test_clips,
        test_num_crop=v.test_crops, in_memory=v.in_memory, **augmentation)
    dm.setup()
    return dm


def finetune_datamodule(run: Run, label_fraction: float = 1.0) -> VideoClassificationDataModule:
    """The training clips (one random clip a video; ``data.video.finetune_samples`` draws
    of RandAugment ``eval.finetune.auto_augment``, a random resized crop, a flip and
    RandomErasing ``eval.finetune.reprob``) at the fine-tune's batch of videos; the test
    split as ``test_clips x test_crops`` views."""
    ft = run.cfg.eval.finetune
    return video_datamodule(run, batch_size=ft.batch_size, label_fraction=label_fraction,
                            auto_augment=ft.auto_augment, reprob=ft.reprob,
                            num_sample=run.cfg.data.video.finetune_samples)


def reconstruction_figure(run: Run, dm):
    """After pretraining: clips of the validation split spread over the classes."""
    def draw(module) -> None:
        dataset = dm.eval_dataloader("val").dataset
        n = min(run.cfg.pretrain.figure_clips, len(dataset))
        picks = torch.linspace(0, len(dataset) - 1, n).long().tolist()
        clips = torch.stack([dataset[i]["video"] for i in picks])
        module = module.cpu().eval()
        clips01, mask, recon = module.reconstruct(
            clips, generator=torch.Generator().manual_seed(run.cfg.seed))
        save_clip_reconstruction_figure(
            run.dir / "figures" / f"{run.cfg.pretrain.method}_reconstruction.png", clips01,
            mask, recon, module.grid, module.tubelet)
    return draw


def with_views(rows: list[dict], frames: int, clips: int, crops: int) -> list[dict]:
    """Each row's variant with ``frames``, ``clips``, ``crops`` added."""
    return [{**row, "variant": format_variant({**parse_variant(row.get("variant", "")),
                                               "frames": frames, "clips": clips,
                                               "crops": crops})} for row in rows]


def run_video(run: Run) -> tuple[list[dict], int | None]:
    cfg = run.cfg
    if cfg.pretrain is None:
        raise ConfigError(f"{run.entry.config}: the video recipe needs a 'pretrain' section")
    pretrains = "pretrained" in cfg.eval.inits and not cfg.model.weights
    encoder_file = run.dir / "checkpoints" / ENCODER_FILE
    if pretrains:
        section = cfg.pretrain
        transform = method_class(section.method).train_transform(section, cfg.data)
        dm = video_datamodule(run, train_kind="pretrain", train_transform=transform)
        stages.pretrain(run, section, dm, run.dir, after=reconstruction_figure(run, dm),
                        encoder_file=encoder_file)
    dm = video_datamodule(run)
    v = cfg.data.video
    rows = []
    for init in cfg.eval.inits:
        out = stages.transfer(run, init, dm, encoder_file, finetune_data=finetune_datamodule,
                              input_key="video")
        found = stages.transfer_rows(run, init, out)
        frozen = [r for r in found if r["protocol"] != "finetune"]
        tuned = [r for r in found if r["protocol"] == "finetune"]
        rows += with_views(frozen, v.num_frames, 1, 1)  # the central clip, centre crop
        rows += with_views(tuned, v.num_frames, v.test_clips, v.test_crops)
    return rows, cfg.pretrain.epochs if pretrains else None

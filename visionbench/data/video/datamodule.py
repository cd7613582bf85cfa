"""Clip transforms and the video-classification datamodule (VideoMAE V2's data pipeline).

Transforms work on tensors: a reader's ``uint8 (T, H, W, 3)`` clip becomes float
``(T, 3, H, W)`` in [0, 1] (torch's interpolation treats ``T`` as the batch), and the
output is ``(C, T, H, W)``, the official's ``volume_transforms.ClipToTensor`` layout,
normalized per channel by ``mean`` / ``std`` (the official: ImageNet's, on [0, 1]).

- ``VideoFinetuneTransform``: ``dataset/datasets.py`` ``VideoClsDataset._aug_frame``:
  RandAugment (``--aa``, the scripts' default ``rand-m7-n4-mstd0.5-inc1``) on the uint8
  frames, the same ops and magnitudes on every frame (``video_transforms.
  create_random_augment``: bicubic, grey fill; translations by 0.45 of the frame);
  then ``spatial_sampling`` with ``video_transforms.random_resized_crop`` (area scale
  (0.08, 1), log-uniform aspect ratio (3/4, 4/3), 10 tries then a central crop, bilinear
  resize without antialiasing) and a horizontal flip with probability 0.5 (off for SSv2);
  then RandomErasing (``--reprob`` 0.25, pixel mode, one box) as ``dataset/random_erasing.py``
  with ``cube=True``: one draw of the probability and one box for the clip, the same box in
  every frame, filled with fresh normal noise in each. Repeated augmentation
  (``--num_sample`` 2): ``num_sample`` such draws of the same sampled frames
  (``multiple_samples_collate`` flattens them into the batch, each with the clip's label).
  Deviations: timm's RandAugment (``rand_augment_transform``, replayed from one random
  state for every frame) stands in for the official's copy of an older timm
  (``dataset/rand_augment.py``, the same ops); the normalization comes after the crop
  (the official normalizes first; bilinear resizing is affine, so the result is the same);
  mixup / cutmix are the fine-tune's, on the batch.
- ``VideoMAEPretrainTransform``: ``dataset/pretrain_datasets.py``
  ``DataAugmentationForVideoMAEv2`` (``transforms.GroupMultiScaleCrop(input_size,
  [1, .875, .75, .66])``: a crop side pair from those fractions of the short side, at most
  one step apart, snapped to the output size within 3 px, at one of 13 fixed positions, then
  resized; no flip). Its tube masks are the method's. Deviation: torch's bilinear resize
  with antialiasing stands in for PIL's bilinear.
- ``VideoEvalTransform``: mode validation (``video_transforms.Resize(short_side_size,
  'bilinear')``, OpenCV's bilinear without antialiasing, then ``CenterCrop`` at
  ``round((side - crop) / 2)``).
- ``VideoMultiViewTransform``: mode test: the short side resized to the crop size, then
  ``test_num_crop`` crops along the long side (``sampling.spatial_crop_starts``: first at
  the start, last at the end).

Deviation for both eval modes: the official's ``--short_side_size`` is the crop size here
(its scripts set both to 224).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from visionbench.backbones.sealed import InputSpec
from visionbench.data.datamodule import (
    SPLIT_NAMES,
    LabelledDataModule,
    LabelledSubset,
    Splits,
    TransformedDataset,
    _check_fractions,
    carve_indices,
    per_channel,
    zero_bit_posterize,
)
from visionbench.data.video.readers import (
    FRAME_START_INDEX,
    FRAME_TEMPLATE,
    ClassificationListDataset,
    ClipDataset,
    kinetics_classes,
)
from visionbench.data.video.sampling import ClipSampler, spatial_crop_starts
from visionbench.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # datasets.py / pretrain_datasets.py Normalize
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_KINDS = ("finetune", "pretrain")


# ----------------------------------------------------------------------------- tensors


def clip_to_float(video: torch.Tensor) -> torch.Tensor:
    """``uint8 (..., T, H, W, 3)`` -> float ``(..., T, 3, H, W)`` in [0, 1]."""
    if video.ndim < 4 or video.shape[-1] != 3:
        raise DataError(f"expected an RGB clip (..., T, H, W, 3), got shape {tuple(video.shape)}")
    x = video.movedim(-1, -3)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def resize_short_side(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """``(N, C, H, W)`` with its short side bilinearly resized to ``size``, the long side to
    ``int(size * long / short)`` (``functional.get_resize_sizes``); unchanged when the short
    side is ``size`` already."""
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return F.interpolate(x, size=new, mode="bilinear", align_corners=False, antialias=antialias)


def _resize(x: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=antialias)


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float], enabled: bool = True):
        self.mean = torch.tensor(per_channel(mean, 3, "mean")).view(3, 1, 1, 1)
        self.std = torch.tensor(per_channel(std, 3, "std")).view(3, 1, 1, 1)
        self.enabled = enabled

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` in [0, 1] -> ``(3, T, H, W)``, normalized when enabled."""
        x = x.transpose(0, 1).contiguous()
        return (x - self.mean) / self.std if self.enabled else x


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _randint(low: int, high: int) -> int:
    """An integer in ``[low, high]`` (both included, as ``random.randint``)."""
    return int(torch.randint(low, high + 1, ()))


def random_resized_crop_box(height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float], tries: int = 10) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``, as ``video_transforms._get_param_spatial_crop`` (log-uniform
    aspect ratio, 10 tries, then the central crop of the nearest allowed aspect), drawn from
    torch's RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = _uniform(*scale) * area
        aspect = math.exp(_uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(0, height - h), _randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------- transforms


def clip_rand_augment(auto_augment: str, image_size: int):
    """timm's RandAugment of ``auto_augment`` with ``create_random_augment``'s settings
    (``translate_const`` 0.45 x ``image_size``, which the ``*Rel`` translations of the
    ``rand`` policies leave unused; bicubic); a string timm does not parse is a
    ``ConfigError``."""
    from timm.data.auto_augment import rand_augment_transform

    if not auto_augment.startswith("rand"):
        raise ConfigError(f"eval.finetune.auto_augment: {auto_augment!r} (clips take a "
                          "RandAugment policy, 'rand-m<magnitude>-n<ops>...')")
    try:
        policy = rand_augment_transform(auto_augment, {
            "translate_const": int(image_size * 0.45), "interpolation": Image.BICUBIC})
    except (AssertionError, KeyError, ValueError) as err:
        raise ConfigError(f"eval.finetune.auto_augment: {auto_augment!r} is not a timm "
                          f"RandAugment policy ({err})") from None
    zero_bit_posterize(policy)
    return policy


def same_on_every_frame(policy, frames: torch.Tensor) -> torch.Tensor:
    """``uint8 (T, H, W, 3)`` -> the frames through a PIL ``policy`` that draws from Python's
    and NumPy's global RNGs, each frame from the same random state, so every frame gets the
    same ops and magnitudes (the official applies one draw to the frame list)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    out = []
    for frame in frames.numpy():
        random.setstate(py_state)
        np.random.set_state(np_state)
        out.append(np.asarray(policy(Image.fromarray(frame)), dtype=np.uint8))
    return torch.from_numpy(np.stack(out))


def erase_cube(clip: torch.Tensor, probability: float, min_area: float = 0.02,
               max_area: float = 1 / 3, min_aspect: float = 0.3) -> torch.Tensor:
    """VideoMAE V2's ``RandomErasing(mode="pixel", cube=True)`` (``_erase_cube``, one box) on
    a normalized ``(C, T, H, W)`` clip, in place: with ``probability``, one box of area
    ``U(min_area, max_area)`` of the frame and log-uniform aspect in ``(min_aspect,
    1 / min_aspect)`` (up to 100 tries, strictly inside the frame), the same in every frame,
    filled with standard normal noise drawn for each frame. Python's RNG draws the box,
    torch's the noise, as the official."""
    if random.random() > probability:
        return clip
    c, t, h, w = clip.shape
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(100):
        target = random.uniform(min_area, max_area) * h * w
        aspect = math.exp(random.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = random.randint(0, h - eh), random.randint(0, w - ew)
            clip[:, :, top : top + eh, left : left + ew] = torch.randn(c, t, eh, ew)
            break
    return clip


class VideoFinetuneTransform:
    """Sample dict -> ``video`` float ``(3, T, image_size, image_size)``, normalized
    (``num_sample`` > 1: ``(num_sample, 3, T, image_size, image_size)``, independent draws of
    the same frames): RandAugment ``auto_augment`` alike on every frame (None: off), a random
    resized crop (``scale``, ``ratio``) shared by all frames, a horizontal flip (``flip``),
    with probability ``reprob`` one erased box through every frame (``erase_cube``), as
    ``VideoClsDataset._aug_frame``."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (0.75, 1.3333), flip: bool = True,
                 auto_augment: str | None = None, reprob: float = 0.0,
                 num_sample: int = 1) -> None:
        if num_sample < 1:
            raise ConfigError(f"repeated augmentation: num_sample {num_sample} (expected >= 1)")
        if not 0.0 <= reprob <= 1.0:
            raise ConfigError(f"eval.finetune.reprob: {reprob} (expected a probability)")
        self.image_size, self.scale, self.ratio, self.flip = image_size, scale, ratio, flip
        self.auto_augment, self.reprob, self.num_sample = auto_augment, reprob, num_sample
        self.policy = clip_rand_augment(auto_augment, image_size) if auto_augment else None
        self.normalize = _Normalize(mean, std)

    def augment(self, frames: torch.Tensor) -> torch.Tensor:
        """One draw: ``uint8 (T, H, W, 3)`` -> ``(3, T, image_size, image_size)``."""
        if self.policy is not None:
            frames = same_on_every_frame(self.policy, frames)
        x = clip_to_float(frames)  # (T, 3, H, W)
        top, left, h, w = random_resized_crop_box(x.shape[-2], x.shape[-1], self.scale,
                                                  self.ratio)
        x = _resize(x[..., top : top + h, left : left + w], self.image_size)
        if self.flip and float(torch.rand(())) < 0.5:
            x = x.flip(-1)
        x = self.normalize(x)
        return erase_cube(x, self.reprob) if self.reprob > 0 else x

    def __call__(self, sample: dict) -> dict:
        frames = sample["video"]
        if self.num_sample == 1:
            return {**sample, "video": self.augment(frames)}
        return {**sample, "video": torch.stack([self.augment(frames)
                                                for _ in range(self.num_sample)])}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, "
                f"ratio={self.ratio}, flip={self.flip}, auto_augment={self.auto_augment!r}, "
                f"reprob={self.reprob}, num_sample={self.num_sample})")


def multiscale_crop_box(height: int, width: int, size: int,
                        scales: Sequence[float] = (1, 0.875, 0.75, 0.66), max_distort: int = 1
                        ) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of ``GroupMultiScaleCrop._sample_crop_size`` with ``fix_crop``
    and ``more_fix_crop`` (13 fixed offsets), drawn from torch's RNG."""
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    crop_h = [size if abs(s - size) < 3 else s for s in sizes]
    crop_w = [size if abs(s - size) < 3 else s for s in sizes]
    pairs = [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w)
             if abs(i - j) <= max_distort]
    w, h = pairs[_randint(0, len(pairs) - 1)]
    ws, hs = (width - w) // 4, (height - h) // 4
    offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
               (1, 1), (3, 1), (1, 3), (3, 3)]
    ox, oy = offsets[_randint(0, len(offsets) - 1)]
    return oy * hs, ox * ws, h, w


class VideoMAEPretrainTransform:
    """Sample dict -> ``video`` float ``(3, T, image_size, image_size)``, normalized, as
    ``DataAugmentationForVideoMAEv2`` (multi-scale corner / centre crop, no flip)."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 scales: Sequence[float] = (1, 0.875, 0.75, 0.66)) -> None:
        self.image_size, self.scales = image_size, tuple(scales)
        self.normalize = _Normalize(mean, std)

    def __call__(self, sample: dict) -> dict:
        x = clip_to_float(sample["video"])
        top, left, h, w = multiscale_crop_box(x.shape[-2], x.shape[-1], self.image_size,
                                              self.scales)
        x = _resize(x[..., top : top + h, left : left + w], self.image_size, antialias=True)
        return {**sample, "video": self.normalize(x)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, scales={self.scales})"


class VideoEvalTransform:
    """Sample dict -> ``video`` float ``(3, T, image_size, image_size)``: short side to
    ``image_size``, centre crop; normalized, or in [0, 1] with ``normalize=False``."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, normalize: bool = True) -> None:
        self.image_size = image_size
        self.normalize = _Normalize(mean, std, normalize)

    def __call__(self, sample: dict) -> dict:
        x = resize_short_side(clip_to_float(sample["video"]), self.image_size)
        s = self.image_size
        top, left = int(round((x.shape[-2] - s) / 2)), int(round((x.shape[-1] - s) / 2))
        return {**sample, "video": self.normalize(x[..., top : top + s, left : left + s])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size})"


class VideoMultiViewTransform:
    """Sample dict with ``video`` ``uint8 (S, T, H, W, 3)`` (``S`` clips of a test sampler)
    -> float ``(S * num_crop, 3, T, image_size, image_size)``: per clip, the short side
    resized to ``image_size`` and ``num_crop`` crops along the long side. View ``v`` is clip
    ``v // num_crop`` (earliest first), crop ``v % num_crop`` (left / top first), the order
    of the official's ``(chunk_nb, split_nb)`` loops."""

    def __init__(self, image_size: int, num_crop: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 normalize: bool = True) -> None:
        if num_crop < 1:
            raise ConfigError(f"test_num_crop: {num_crop} (expected a positive integer)")
        self.image_size, self.num_crop = image_size, num_crop
        self.normalize = _Normalize(mean, std, normalize)

    def __call__(self, sample: dict) -> dict:
        video = sample["video"]
        if video.ndim == 4:  # one clip
            video = video[None]
        s = self.image_size
        views = []
        for clip in video:
            x = resize_short_side(clip_to_float(clip), s)
            h, w = x.shape[-2:]
            for start in spatial_crop_starts(max(h, w), s, self.num_crop):
                crop = x[..., start : start + s, :] if h > w else x[..., :, start : start + s]
                views.append(self.normalize(crop[..., :s, :s]))
        return {**sample, "video": torch.stack(views)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, num_crop={self.num_crop})"


# ----------------------------------------------------------------------------- datasets


class ResampledClips(Dataset):
    """The clips of ``dataset`` (a ``ClipDataset`` or subsets of one) read with ``sampler``
    instead of the dataset's own: the eval and test views of any split."""

    def __init__(self, dataset: Dataset, sampler: ClipSampler) -> None:
        indices = list(range(len(dataset)))
        base = dataset
        while isinstance(base, Subset):
            indices = [base.indices[i] for i in indices]
            base = base.dataset
        if not isinstance(base, ClipDataset):
            raise TypeError(f"ResampledClips: expected a ClipDataset, got {type(base)!r}")
        self.base, self.indices, self.sampler = base, indices, sampler
        self.targets = [base.targets[i] for i in indices]
        self.classes = list(base.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.base.load(self.indices[index], self.sampler)


# ----------------------------------------------------------------------------- datamodule


class VideoClassificationDataModule(LabelledDataModule):
    """Train / val / test loaders of a video-classification data set, VideoMAE V2's way.

    Data: ``train_list`` / ``val_list`` / ``test_list`` (fine-tuning list files, see
    ``readers``; default ``root/train.csv``, ``root/val.csv``, ``root/test.csv``), their
    paths relative to ``data_root`` (default ``root``), as a Kinetics-layout folder has them.
    A missing train list is a ``DataError``. Missing splits are carved from train as the
    image datamodule does (stratified, seeded): with a val list but no test list, the val
    list is the test set (the official tests on ``val.csv``) and val is carved
    (``val_fraction``); with neither, both are carved (``test_fraction`` too). Classes: the
    class folders of ``root/train`` (Kinetics layout), else ``"0" .. str(max label)``.

    Sampling (``sampling.ClipSampler``): train one random clip of ``num_frames`` at
    ``sampling_rate`` (``train_kind="finetune"``, ``VideoClsDataset`` mode train) or
    pretraining sampling (``"pretrain"``, ``HybridVideoMAE``); eval the central clip; test
    ``test_num_segment`` clips. Raw-frame lines use the official's segment sampling (``style``
    None), or the one ``style`` names. Transforms: ``train_transform`` (a method's own, on
    the reader's sample dict with ``video`` ``uint8 (T, H, W, 3)``), else
    ``VideoFinetuneTransform`` (flip unless ``flip=False``, e.g. for SSv2; RandAugment
    ``auto_augment``, RandomErasing ``reprob``, ``num_sample`` draws a clip) or
    ``VideoMAEPretrainTransform``.

    Batches (dicts): ``train_dataloader`` / ``eval_dataloader(split)`` / ``val_dataloader``:
    ``video`` float ``(B, 3, T, H, W)``, ``label`` int64 ``(B,)``, ``video_id`` list of str;
    ``raw=True``: ``video`` in [0, 1], not normalized, for an encoder sealed with
    ``input_spec``. ``test_dataloader`` / ``multiview_dataloader(split)``: ``video``
    ``(B, V, 3, T, H, W)`` with ``V = test_num_segment * test_num_crop``, view
    ``v = segment * test_num_crop + crop``. ``label_fraction`` < 1 keeps that stratified
    share of the training split. ``in_memory``: each video file is decoded once and its
    frames kept (``readers.ClipDataset``), for small sets read over many epochs.
    """

    # Loader workers start from a fork server, not a fork: a worker forked after this
    # process decoded with PyAV (a figure, features on rank 0) hangs in its first decode.
    worker_start = "forkserver"

    def __init__(
        self,
        root: str | Path | None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        train_kind: str = "finetune",
        train_transform: Callable[[dict], Any] | None = None,
        label_fraction: float = 1.0,
        num_frames: int = 16,
        sampling_rate: int = 4,
        test_num_segment: int = 5,
        test_num_crop: int = 3,
        flip: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        auto_augment: str | None = None,
        reprob: float = 0.0,
        num_sample: int = 1,
        train_list: str | Path | None = None,
        val_list: str | Path | None = None,
        test_list: str | Path | None = None,
        data_root: str | Path | None = None,
        frame_template: str = FRAME_TEMPLATE,
        start_index: int = FRAME_START_INDEX,
        style: str | None = None,
        in_memory: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < label_fraction <= 1.0:
            raise ConfigError(f"label fraction: {label_fraction} (expected a fraction in (0, 1])")
        if train_kind not in TRAIN_KINDS:
            raise ConfigError(f"data.train_kind: {train_kind!r} (expected one of "
                              f"{', '.join(TRAIN_KINDS)})")
        if root is None and train_list is None:
            raise ConfigError("video data: neither a root folder nor a train list")
        _check_fractions(val_fraction, test_fraction)
        self.root = Path(root) if root is not None else None
        self.lists = {
            split: Path(given) if given is not None else (
                self.root / f"{split}.csv" if self.root is not None else None)
            for split, given in (("train", train_list), ("val", val_list), ("test", test_list))
        }
        self.data_root = data_root if data_root is not None else (self.root or "")
        self.image_size = image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.label_fraction = label_fraction
        self.frame_template, self.start_index = frame_template, start_index
        self.test_num_crop, self.in_memory = test_num_crop, in_memory
        common = dict(num_frames=num_frames, sampling_rate=sampling_rate,
                      test_num_segment=test_num_segment, style=style)
        self.samplers = {
            "train": ClipSampler("pretrain" if train_kind == "pretrain" else "train", **common),
            "eval": ClipSampler("val", **common),
            "test": ClipSampler("test", **common),
        }
        if train_transform is None:
            train_transform = (
                VideoMAEPretrainTransform(image_size, mean, std) if train_kind == "pretrain"
                else VideoFinetuneTransform(image_size, mean, std, scale=crop_scale, flip=flip,
                                            auto_augment=auto_augment, reprob=reprob,
                                            num_sample=num_sample))
        self.train_transform = train_transform
        self.eval_transforms = {raw: VideoEvalTransform(image_size, mean, std, not raw)
                                for raw in (False, True)}
        self.test_transforms = {
            raw: VideoMultiViewTransform(image_size, test_num_crop, mean, std, not raw)
            for raw in (False, True)}
        self.input_spec = InputSpec.of(per_channel(mean, 3, "mean"), per_channel(std, 3, "std"))
        self.splits: Splits | None = None

    @property
    def num_views(self) -> int:
        """Views a test sample holds: ``test_num_segment * test_num_crop``."""
        return self.samplers["test"].test_num_segment * self.test_num_crop

    # ------------------------------------------------------------------ splits

    def _read(self, split: str, classes: list[str] | None) -> ClassificationListDataset | None:
        path = self.lists[split]
        if path is None or not path.is_file():
            if split == "train":
                raise DataError(f"{path}: train list not found (expected a Kinetics-layout "
                                "folder with train.csv, or train_list: lines '<video> "
                                "<label>' or '<frame folder> <total frames> <label>')")
            return None
        return ClassificationListDataset(path, self.data_root, classes,
                                         self.samplers["train"], self.frame_template,
                                         self.start_index, check_folders=classes is not None,
                                         in_memory=self.in_memory)

    def _carve(self, dataset: Dataset, fractions: list[float]) -> list[LabelledSubset]:
        parts = carve_indices(dataset.targets, fractions, self.seed)
        if not parts[-1]:
            raise DataError(f"{self.lists['train']}: too few clips ({len(dataset)}) to carve "
                            "val/test splits")
        return [LabelledSubset(dataset, ix) for ix in parts]

    def _load_splits(self) -> Splits:
        folders = kinetics_classes(self.root) if self.root is not None else None
        train = self._read("train", folders)
        classes = list(train.classes)
        val, test = self._read("val", classes), self._read("test", classes)
        if val is not None and test is None:
            test, val = val, None
        if val is None and test is None:
            val, test, train = self._carve(train, [self.val_fraction, self.test_fraction])
        elif val is None:
            val, train = self._carve(train, [self.val_fraction])
        fmt = "kinetics" if folders is not None else "list"
        return Splits(train, val, test, classes, fmt)

    def _source(self) -> str:
        return str(self.lists["train"])

    # ------------------------------------------------------------------ loaders

    def _split(self, split: str) -> Dataset:
        if split not in SPLIT_NAMES:
            raise ConfigError(f"split: {split!r} (expected one of {', '.join(SPLIT_NAMES)})")
        return getattr(self._loaded(), split)

    def train_dataloader(self) -> DataLoader:
        clips = ResampledClips(self._split("train"), self.samplers["train"])
        return self._loader(TransformedDataset(clips, self.train_transform), self.batch_size,
                            shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.multiview_dataloader("test")

    def eval_dataloader(self, split: str, batch_size: int | None = None,
                        raw: bool = False) -> DataLoader:
        """Unshuffled loader of ``split`` ("train", "val" or "test"): the central clip,
        centre crop (``raw``: in [0, 1], not normalized)."""
        clips = ResampledClips(self._split(split), self.samplers["eval"])
        return self._loader(TransformedDataset(clips, self.eval_transforms[raw]),
                            batch_size or self.batch_size, shuffle=False)

    def multiview_dataloader(self, split: str = "test", batch_size: int | None = None,
                             raw: bool = False) -> DataLoader:
        """Unshuffled loader of ``split`` with every test view of each clip: ``video``
        ``(B, V, 3, T, H, W)``, ``V = num_views``, view ``segment * test_num_crop + crop``."""
        clips = ResampledClips(self._split(split), self.samplers["test"])
        return self._loader(TransformedDataset(clips, self.test_transforms[raw]),
                            batch_size or self.batch_size, shuffle=False)

"""Which frames of a clip a sample reads: the temporal sampling of VideoMAE V2's loaders.

Pure functions of the clip's frame count (and a ``numpy.random.Generator`` where the
official draws at random), testable without a video file. All return 0-based frame indices
into the clip (for raw-frame folders, into its frames in order: the reader adds the start
number of the file names).

- ``pretrain_indices``: ``dataset/pretrain_datasets.py`` ``HybridVideoMAE`` /
  ``VideoMAE`` (``_sample_train_indices`` + ``get_frame_id_list`` with ``num_segments=1``
  and no temporal jitter, as ``dataset/build.py`` ``build_pretraining_dataset``):
  ``num_frames`` frames at stride ``sampling_rate`` from a random start.
- ``train_clip_indices`` / ``center_clip_indices`` / ``multiview_clip_indices``:
  ``dataset/datasets.py`` ``VideoClsDataset.load_video`` in modes train / validation / test
  (``num_segment=1``, dense sampling) and the temporal crop of ``__getitem__`` in mode test.
- ``segment_indices`` / ``segment_multiview_indices``: ``dataset/datasets.py``
  ``RawFrameClsDataset.load_frame`` (TSN-style: one frame from each of ``num_frames``
  equal segments; the official fine-tunes Something-Something V2 raw frames this way, with
  ``clip_len=1, num_segment=num_frames``) and the ``[chunk::test_num_segment]`` slicing of
  its ``__getitem__`` in mode test.
- ``spatial_crop_starts``: the start of each of the ``test_num_crop`` crops along the long
  side in mode test of both datasets.

Deviations: the official draws from the global ``np.random``; these take a ``Generator``.
``test_num_segment=1`` (and ``test_num_crop=1``) divide by zero in the official; here the one
clip (crop) is the central one. ``ClipSampler`` is ours: it bundles the choice between these
functions for a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionbench.errors import ConfigError, DataError

MODES = ("pretrain", "train", "val", "test")
STYLES = ("dense", "segment")


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check(total: int, num_frames: int, sampling_rate: int = 1) -> None:
    if total < 1:
        raise DataError(f"a clip of {total} frames (expected at least one)")
    if num_frames < 1 or sampling_rate < 1:
        raise ConfigError(f"num_frames {num_frames}, sampling_rate {sampling_rate} "
                          "(expected positive integers)")


def pretrain_indices(total: int, num_frames: int = 16, sampling_rate: int = 4,
                     rng: np.random.Generator | int | None = None) -> np.ndarray:
    """``num_frames`` indices at stride ``sampling_rate`` from a random start.

    Follows ``pretrain_datasets.py`` ``HybridVideoMAE._sample_train_indices`` (one segment:
    a start drawn uniformly from the ``total - num_frames * sampling_rate + 1`` that fit, or
    0 when none fit) and ``get_frame_id_list`` (the index advances by ``sampling_rate`` only
    while the next 1-based offset stays below ``total``; once it would not, the last index
    reached repeats). So a clip shorter than ``num_frames * sampling_rate`` gives
    ``0, s, 2s, ...`` up to the last that fits, then that frame again until ``num_frames``.
    The official's strict ``<`` also repeats the last frame of a clip that exactly fits at
    ``sampling_rate`` 1; kept as it is.
    """
    _check(total, num_frames, sampling_rate)
    skip = num_frames * sampling_rate
    span = total - skip + 1
    start = int(_rng(rng).integers(span)) if span > 0 else 0
    offset = start + 1  # the official works with 1-based offsets
    out = np.empty(num_frames, dtype=np.int64)
    for i in range(num_frames):
        out[i] = offset - 1
        if offset + sampling_rate < total:
            offset += sampling_rate
    return out


def _short_clip(total: int, num_frames: int, sampling_rate: int) -> np.ndarray:
    """``VideoClsDataset.load_video`` for ``total <= num_frames * sampling_rate``:
    ``total // sampling_rate`` indices spread over the clip, then the last frame repeated."""
    spread = np.linspace(0, total, num=total // sampling_rate)
    index = np.concatenate([spread, np.full(num_frames - len(spread), float(total))])
    return np.clip(index, 0, total - 1).astype(np.int64)


def _window(start: int, end: int, num_frames: int) -> np.ndarray:
    index = np.linspace(start, end, num=num_frames)
    return np.clip(index, start, end - 1).astype(np.int64)


def train_clip_indices(total: int, num_frames: int = 16, sampling_rate: int = 4,
                       rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One random clip, as ``datasets.py`` ``VideoClsDataset.load_video`` in mode train.

    A window of ``num_frames * sampling_rate`` frames ending at a random frame in
    ``[num_frames * sampling_rate, total)``, with ``num_frames`` indices spread evenly over it
    (``linspace``, so the step is ``sampling_rate * num_frames / (num_frames - 1)`` rounded
    down, as the official). A clip no longer than the window: ``total // sampling_rate``
    indices over the whole clip, padded with its last frame.
    """
    _check(total, num_frames, sampling_rate)
    window = num_frames * sampling_rate
    if total <= window:
        return _short_clip(total, num_frames, sampling_rate)
    end = int(_rng(rng).integers(window, total))
    return _window(end - window, end, num_frames)


def center_clip_indices(total: int, num_frames: int = 16, sampling_rate: int = 4) -> np.ndarray:
    """The central clip, as ``VideoClsDataset.load_video`` in mode validation (the window
    ends at ``(window + total) // 2``); a short clip as in ``train_clip_indices``."""
    _check(total, num_frames, sampling_rate)
    window = num_frames * sampling_rate
    if total <= window:
        return _short_clip(total, num_frames, sampling_rate)
    end = (window + total) // 2
    return _window(end - window, end, num_frames)


def multiview_clip_indices(total: int, num_frames: int = 16, sampling_rate: int = 4,
                      num_segments: int = 5) -> np.ndarray:
    """``(num_segments, num_frames)``: evenly spaced clips, as ``VideoClsDataset`` mode test.

    ``load_video`` reads every ``sampling_rate``-th frame (padded with the last one up to
    ``num_frames``); clip ``k`` is ``num_frames`` consecutive of those from
    ``int(k * (len - num_frames) / (num_segments - 1))``: the first clip starts at frame 0,
    the last ends at the end. One segment (a division by zero in the official) takes the
    central clip.
    """
    _check(total, num_frames, sampling_rate)
    if num_segments < 1:
        raise ConfigError(f"test_num_segment: {num_segments} (expected a positive integer)")
    strided = list(range(0, total, sampling_rate))
    while len(strided) < num_frames:
        strided.append(strided[-1])
    slack = len(strided) - num_frames
    if num_segments == 1:
        starts = [slack // 2]
    else:
        step = max(slack / (num_segments - 1), 0.0)
        starts = [int(k * step) for k in range(num_segments)]
    return np.array([strided[s : s + num_frames] for s in starts], dtype=np.int64)


def segment_indices(total: int, num_segments: int = 16, train: bool = True,
                    rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One frame from each of ``num_segments`` equal segments (TSN), as
    ``RawFrameClsDataset.load_frame`` in mode train (a random frame of each segment) or
    validation (``train=False``: the middle one). A clip with fewer frames than segments:
    the first frame repeated in front of all frames (the official's branch for
    ``total > num_segments`` in between cannot be reached once ``total // num_segments`` is
    0, and is left out)."""
    _check(total, num_segments)
    average = total // num_segments
    if average > 0:
        base = np.arange(num_segments) * average
        if train:
            return (base + _rng(rng).integers(average, size=num_segments)).astype(np.int64)
        return (base + average // 2).astype(np.int64)
    return np.array([0] * (num_segments - total) + list(range(total)), dtype=np.int64)


def segment_multiview_indices(total: int, num_segments: int = 16,
                         test_num_segment: int = 2) -> np.ndarray:
    """``(test_num_segment, num_segments)``: ``RawFrameClsDataset`` mode test.

    ``load_frame`` takes, for each view ``k``, frame ``int(k * tick / test_num_segment +
    tick * x)`` of segment ``x`` (``tick = total / num_segments``) and sorts them all;
    ``__getitem__`` keeps every ``test_num_segment``-th from ``k``. Same here: the sorted
    indices sliced ``[k::test_num_segment]``.
    """
    _check(total, num_segments)
    if test_num_segment < 1:
        raise ConfigError(f"test_num_segment: {test_num_segment} (expected a positive integer)")
    tick = total / float(num_segments)
    flat = sorted(int(k * tick / test_num_segment + tick * x)
                  for k in range(test_num_segment) for x in range(num_segments))
    return np.array([flat[k::test_num_segment] for k in range(test_num_segment)],
                    dtype=np.int64)


def spatial_crop_starts(length: int, crop: int, num_crops: int) -> list[int]:
    """Starts of ``num_crops`` crops of ``crop`` along a side of ``length``: as both datasets'
    mode test, ``int(k * (length - crop) / (num_crops - 1))`` (first at 0, last at the end);
    one crop (a division by zero in the official) is the central one."""
    if num_crops < 1:
        raise ConfigError(f"test_num_crop: {num_crops} (expected a positive integer)")
    if num_crops == 1:
        return [(length - crop) // 2]
    step = (length - crop) / (num_crops - 1)
    return [int(k * step) for k in range(num_crops)]


@dataclass(frozen=True)
class ClipSampler:
    """The temporal sampling of one loader (ours; it picks among the functions above).

    ``mode``: "pretrain" (``pretrain_indices``), "train" (one random clip), "val" (the
    central clip) or "test" (``test_num_segment`` clips: indices of shape
    ``(test_num_segment, num_frames)``). ``style``: "dense" (``VideoClsDataset``:
    ``num_frames`` at ``sampling_rate``) or "segment" (``RawFrameClsDataset``: one frame of
    each of ``num_frames`` segments); None picks what the official does by source: dense for
    video files, segment for raw-frame folders. Pretraining is dense for both, as
    ``HybridVideoMAE``.
    """

    mode: str = "train"
    num_frames: int = 16
    sampling_rate: int = 4
    test_num_segment: int = 5
    style: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sampling mode: {self.mode!r} (expected one of {MODES})")
        if self.style is not None and self.style not in STYLES:
            raise ConfigError(f"sampling style: {self.style!r} (expected one of {STYLES})")
        for name in ("num_frames", "sampling_rate", "test_num_segment"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{name}: {value!r} (expected a positive integer)")

    def style_for(self, is_video: bool) -> str:
        if self.mode == "pretrain":
            return "dense"
        return self.style or ("dense" if is_video else "segment")

    def __call__(self, total: int, rng: np.random.Generator | int | None = None,
                 is_video: bool = True) -> np.ndarray:
        """Indices into a clip of ``total`` frames: ``(num_frames,)``, or
        ``(test_num_segment, num_frames)`` in mode test."""
        n, rate = self.num_frames, self.sampling_rate
        if self.mode == "pretrain":
            return pretrain_indices(total, n, rate, rng)
        if self.style_for(is_video) == "segment":
            if self.mode == "test":
                return segment_multiview_indices(total, n, self.test_num_segment)
            return segment_indices(total, n, train=self.mode == "train", rng=rng)
        if self.mode == "test":
            return multiview_clip_indices(total, n, rate, self.test_num_segment)
        if self.mode == "val":
            return center_clip_indices(total, n, rate)
        return train_clip_indices(total, n, rate, rng)

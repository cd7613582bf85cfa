"""Video readers: decoding, raw-frame folders, and the list files of VideoMAE V2.

Decoding uses PyAV (``import av``) rather than torchcodec: PyAV's wheels bundle FFmpeg
(libx264 included, which the embedded generator needs to write H.264), while torchcodec
loads the system's FFmpeg shared libraries and needs a build matched to the installed torch
version. The official loads videos with decord (``dataset/loader.py``
``get_video_loader``: ``VideoReader(path, num_threads=1)``, ``len(vr)`` frames,
``get_batch(indices)``) and raw frames with OpenCV (``get_image_loader``: ``imdecode`` +
BGR->RGB); here PyAV decodes the frames in order up to the last one asked for, and PIL reads
raw frames. Either way a frame is ``uint8`` RGB.

List files (``docs/DATASET.md``), one clip a line, fields separated by white space, paths
relative to ``data_root`` (the official's ``--data_root`` prefix, joined as ``os.path.join``
does: an absolute path stays as it is):

- pretraining (``dataset/pretrain_datasets.py`` ``HybridVideoMAE._make_dataset``):
  ``<video> 0 -1`` (total < 0: a video file) or ``<frame folder> <start> <total>`` (frames
  ``img_{:05}.jpg`` numbered from ``start``): ``PretrainListDataset``;
- fine-tuning (``dataset/datasets.py``): ``<video> <label>`` (``VideoClsDataset``) or
  ``<frame folder> <total> <label>`` (``RawFrameClsDataset``, frames numbered from
  ``start_index``, official ``--start_idx`` 1): ``ClassificationListDataset``, either kind
  of line in one file;
- the Kinetics layout this project writes and reads (``KineticsDataset``):
  ``root/{train,val,test}/<class>/<clip>.mp4`` with ``root/{train,val,test}.csv`` of
  ``<path> <label>`` lines relative to ``root`` (the official's ``train.csv`` / ``val.csv``
  under ``--data_path``).

Samples are dicts ``{"video": uint8 (T, H, W, 3), "label": int, "video_id": str}``
(``(S, T, H, W, 3)`` for a test-mode sampler of ``S`` clips; label -1 for pretraining).
``video_id`` is the official's: the file name up to its first dot (a frame folder's name).

Deviations: the official's ``__getitem__`` prints a failed load and retries another random
clip; here an unreadable clip is a one-line ``DataError`` naming the file, and a malformed
line one naming the file and line number. Lines are split on any white space (the official
splits on single spaces); blank lines and lines starting with ``#`` (as in DATASET.md's
examples) are skipped. A fine-tuning list's classes are ``"0" .. str(max label)`` unless
given (the official has only label indices). The official's hybrid-pretraining
special cases (``SomethingV2`` in a path forces stride 2 and ``img_{:05}.jpg``, ``AVA2.2``
``image_{:06}.jpg``) are left out: one list, one stride, one file name template. A frame
index past the frames a video decodes to (headers can overstate the count) reads the last
decoded frame.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visionbench.data.images.imagefolder import class_folders, load_image
from visionbench.data.video.sampling import ClipSampler
from visionbench.errors import DataError

FRAME_TEMPLATE = "img_{:05}.jpg"  # run_class_finetuning.py / run_mae_pretraining.py --fname_tmpl
FRAME_START_INDEX = 1  # run_class_finetuning.py --start_idx
PRETRAIN_LINE = "'<video> 0 -1' or '<frame folder> <start index> <total frames>'"
CLASSIFICATION_LINE = "'<video> <label>' or '<frame folder> <total frames> <label>'"


# ----------------------------------------------------------------------------- decoding


def _reason(err: BaseException) -> str:
    return (str(err).replace("\n", " ") or type(err).__name__).strip()


def _decode_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError)


def _open(path: Path):
    """The container at ``path`` with its first video stream set to decode on one thread
    (``loader.py``: decord's ``num_threads=1``; DataLoader workers parallelize)."""
    import av

    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except _decode_errors() as err:
        raise DataError(f"{path}: not a decodable video ({_reason(err)})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: not a decodable video (no video stream)")
    container.streams.video[0].codec_context.thread_count = 1
    return container


_local = threading.local()


def _rgb(frame) -> np.ndarray:
    """A decoded frame as ``uint8 (H, W, 3)`` RGB, through one reformatter per thread (a
    fresh one per frame, as ``frame.to_ndarray(format="rgb24")`` makes, costs several times
    the decoding of a small frame)."""
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        reformatter = _local.reformatter = VideoReformatter()
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def video_frame_count(path: str | Path) -> int:
    """The number of frames of the video at ``path``: the container's count when it has one
    (mp4, mkv with an index), else the frames counted by decoding."""
    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return int(stream.frames)
        count = sum(1 for _ in container.decode(stream))
    except _decode_errors() as err:
        raise DataError(f"{path}: not a decodable video ({_reason(err)})") from None
    finally:
        container.close()
    if count == 0:
        raise DataError(f"{path}: not a decodable video (no frames)")
    return count


def read_video(path: str | Path, indices: Sequence[int] | np.ndarray | None = None
               ) -> torch.Tensor:
    """Frames ``indices`` (default: all) of the video at ``path``: ``uint8 (T, H, W, 3)`` RGB.

    Decodes in order up to the last index asked for and keeps only the frames asked for;
    an index can repeat and come in any order. A missing, empty or undecodable file is a
    ``DataError`` naming it.
    """
    path = Path(path)
    wanted = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted is not None and wanted.size and wanted.min() < 0:
        raise ValueError(f"read_video: negative frame index in {wanted.tolist()}")
    stop = None if wanted is None else (int(wanted.max()) + 1 if wanted.size else 1)
    keep = None if wanted is None else set(wanted.tolist())
    frames: dict[int, np.ndarray] = {}
    last = None  # the last decoded frame (av.VideoFrame) and its index
    container = _open(path)
    try:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and i >= stop:
                break
            if keep is None or i in keep:
                frames[i] = _rgb(frame)
            last = (i, frame)
        if last is not None and last[0] not in frames and wanted is not None:
            frames[last[0]] = _rgb(last[1])  # for indices past the end
    except _decode_errors() as err:
        raise DataError(f"{path}: not a decodable video ({_reason(err)})") from None
    finally:
        container.close()
    if last is None:
        raise DataError(f"{path}: not a decodable video (no frames)")
    if wanted is None:
        return torch.from_numpy(np.stack([frames[i] for i in sorted(frames)]))
    end = last[0]
    if not wanted.size:
        return torch.empty((0, *frames[end].shape), dtype=torch.uint8)
    return torch.from_numpy(np.stack([frames[min(i, end)] for i in wanted.tolist()]))


def read_frames(folder: str | Path, indices: Sequence[int] | np.ndarray,
                start: int = FRAME_START_INDEX, template: str = FRAME_TEMPLATE
                ) -> torch.Tensor:
    """Frames ``indices`` (0-based) of a raw-frame folder: files ``template.format(start +
    index)`` (``img_00001.jpg`` ... for the defaults), read as RGB: ``uint8 (T, H, W, 3)``.
    Follows ``pretrain_datasets.py`` ``HybridVideoMAE.__getitem__`` (``name_pattern.format(idx
    + start_idx)``) and ``datasets.py`` ``RawFrameClsDataset.load_frame``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: frame folder not found")
    cache: dict[int, np.ndarray] = {}
    out = []
    for index in np.asarray(indices, dtype=np.int64).reshape(-1).tolist():
        if index not in cache:
            cache[index] = np.asarray(load_image(folder / template.format(start + index), "RGB"))
        out.append(cache[index])
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise DataError(f"{folder}: frames of different sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(out))


# ----------------------------------------------------------------------------- list files


@dataclass(frozen=True)
class ClipEntry:
    """One line of a list file: a video file (``total < 0``) or a raw-frame folder of
    ``total`` frames whose file numbers start at ``start``."""

    path: str
    label: int = -1
    start: int = 0
    total: int = -1
    line: int = 0  # in the list file, for messages

    @property
    def is_video(self) -> bool:
        return self.total < 0

    @property
    def video_id(self) -> str:
        """The official's id: ``path.split("/")[-1].split(".")[0]``."""
        return os.path.basename(self.path.rstrip("/")).split(".")[0]


def _read_lines(list_file: Path, expected: str) -> list[tuple[int, list[str]]]:
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file not found (expected lines {expected})")
    try:
        text = list_file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{list_file}: cannot read list file ({_reason(err)})") from None
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise DataError(f"{list_file}: list file lists no clips (expected lines {expected})")
    return rows


def _int(field: str, list_file: Path, line: int, what: str, expected: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise DataError(f"{list_file}:{line}: {what} {field!r} is not an integer "
                        f"(expected lines {expected})") from None


def _join(data_root: str | Path, path: str) -> str:
    return os.path.join(str(data_root), path) if str(data_root) else path


def read_pretrain_list(list_file: str | Path, data_root: str | Path = "") -> list[ClipEntry]:
    """Entries of a pretraining list: ``<video> 0 -1`` or ``<folder> <start> <total>``
    (``pretrain_datasets.py`` ``HybridVideoMAE._make_dataset``; a fourth field, a label,
    is allowed and ignored as there)."""
    list_file = Path(list_file)
    entries = []
    for line, fields in _read_lines(list_file, PRETRAIN_LINE):
        if len(fields) not in (3, 4):
            raise DataError(f"{list_file}:{line}: {len(fields)} fields (expected lines "
                            f"{PRETRAIN_LINE})")
        start = _int(fields[1], list_file, line, "start index", PRETRAIN_LINE)
        total = _int(fields[2], list_file, line, "total frames", PRETRAIN_LINE)
        if total == 0:
            raise DataError(f"{list_file}:{line}: a frame folder of 0 frames "
                            f"(expected lines {PRETRAIN_LINE})")
        entries.append(ClipEntry(_join(data_root, fields[0]), -1, start, total, line))
    return entries


def read_classification_list(list_file: str | Path, data_root: str | Path = "",
                             start_index: int = FRAME_START_INDEX) -> list[ClipEntry]:
    """Entries of a fine-tuning list: ``<video> <label>`` (``datasets.py``
    ``VideoClsDataset``) or ``<folder> <total> <label>`` (``RawFrameClsDataset``, frames
    numbered from ``start_index``)."""
    list_file = Path(list_file)
    entries = []
    for line, fields in _read_lines(list_file, CLASSIFICATION_LINE):
        if len(fields) == 2:
            total, start = -1, 0
        elif len(fields) == 3:
            total = _int(fields[1], list_file, line, "total frames", CLASSIFICATION_LINE)
            start = start_index
            if total < 1:
                raise DataError(f"{list_file}:{line}: a frame folder of {total} frames "
                                f"(expected lines {CLASSIFICATION_LINE})")
        else:
            raise DataError(f"{list_file}:{line}: {len(fields)} fields (expected lines "
                            f"{CLASSIFICATION_LINE})")
        label = _int(fields[-1], list_file, line, "label", CLASSIFICATION_LINE)
        if label < 0:
            raise DataError(f"{list_file}:{line}: negative label {label} "
                            f"(expected lines {CLASSIFICATION_LINE})")
        entries.append(ClipEntry(_join(data_root, fields[0]), label, start, total, line))
    return entries


# ----------------------------------------------------------------------------- datasets


def _sample_rng() -> np.random.Generator:
    """A generator for one sample, drawn from torch's RNG: seeded by ``torch.manual_seed`` /
    Lightning's ``seed_everything`` and different in every DataLoader worker (which
    numpy's global state is not)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class ClipDataset(Dataset):
    """Clips of a list of ``ClipEntry``: ``sampler`` picks each sample's frame indices.

    ``load(index, sampler)`` reads sample ``index`` with another sampler (the datamodule's
    eval and test views of the same split). ``targets`` and ``classes`` as the image readers.
    ``in_memory``: a video file is decoded whole the first time it is read and its frames
    kept (in each process that reads it: the main one, or each loader worker), so later
    samples index the kept frames instead of decoding again; the frames a sample gets are
    the same either way (for small sets, such as the embedded clips, read many epochs).
    """

    def __init__(self, entries: list[ClipEntry], classes: list[str], sampler: ClipSampler,
                 template: str = FRAME_TEMPLATE, in_memory: bool = False) -> None:
        self.entries = entries
        self.classes = list(classes)
        self.sampler = sampler
        self.template = template
        self.targets = [e.label for e in entries]
        self.in_memory = in_memory
        self._decoded: dict[int, tuple[int, torch.Tensor]] = {}  # index -> (count, frames)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        return self.load(index, self.sampler)

    def frame_count(self, index: int) -> int:
        entry = self.entries[index]
        if not entry.is_video:
            return entry.total
        if self.in_memory:
            return self._kept(index)[0]
        return video_frame_count(entry.path)

    def _kept(self, index: int) -> tuple[int, torch.Tensor]:
        """(the container's frame count, every decoded frame) of video ``index``, decoded
        once."""
        if index not in self._decoded:
            path = self.entries[index].path
            self._decoded[index] = (video_frame_count(path), read_video(path))
        return self._decoded[index]

    def load(self, index: int, sampler: ClipSampler | None = None,
             rng: np.random.Generator | None = None) -> dict:
        entry = self.entries[index]
        sampler = sampler or self.sampler
        indices = sampler(self.frame_count(index), rng or _sample_rng(), entry.is_video)
        flat = indices.reshape(-1)
        if entry.is_video and self.in_memory:
            kept = self._kept(index)[1]  # an index past the decoded frames reads the last
            frames = kept[torch.from_numpy(np.minimum(flat, len(kept) - 1))]
        elif entry.is_video:
            order, inverse = np.unique(flat, return_inverse=True)
            frames = read_video(entry.path, order)[torch.from_numpy(inverse.reshape(-1))]
        else:
            frames = read_frames(entry.path, flat, entry.start, self.template)
        video = frames.reshape(*indices.shape, *frames.shape[1:])
        return {"video": video, "label": int(entry.label), "video_id": entry.video_id}


def _classes_for(entries: list[ClipEntry], classes: Sequence[str] | None,
                 where: Path) -> list[str]:
    labels = [e.label for e in entries]
    if classes is None:
        return [str(i) for i in range(max(labels) + 1)]
    classes = list(classes)
    outside = sorted({label for label in labels if label >= len(classes)})
    if outside:
        raise DataError(f"{where}: labels {outside} outside the {len(classes)} classes "
                        f"(expected 0 .. {len(classes) - 1})")
    return classes


class PretrainListDataset(ClipDataset):
    """A pretraining list (``<video> 0 -1`` / ``<folder> <start> <total>`` lines), sampled
    as ``HybridVideoMAE`` (``ClipSampler("pretrain")``: 16 frames at stride 4 by default;
    the official uses stride 2 for Something-Something V2). Labels are -1, no classes."""

    def __init__(self, list_file: str | Path, data_root: str | Path = "",
                 sampler: ClipSampler | None = None, template: str = FRAME_TEMPLATE,
                 in_memory: bool = False) -> None:
        entries = read_pretrain_list(list_file, data_root)
        super().__init__(entries, [], sampler or ClipSampler("pretrain"), template, in_memory)


class ClassificationListDataset(ClipDataset):
    """A fine-tuning list (``<video> <label>`` / ``<folder> <total> <label>`` lines).

    ``classes`` default to ``"0" .. str(max label)``; when given, every label must index
    them. ``sampler`` defaults to one random clip (``VideoClsDataset`` mode train).
    ``check_folders``: a clip inside a folder named like a class whose label is another
    class's is a ``DataError`` naming the line (the Kinetics layout's class folders).
    """

    def __init__(self, list_file: str | Path, data_root: str | Path = "",
                 classes: Sequence[str] | None = None, sampler: ClipSampler | None = None,
                 template: str = FRAME_TEMPLATE, start_index: int = FRAME_START_INDEX,
                 check_folders: bool = False, in_memory: bool = False) -> None:
        list_file = Path(list_file)
        entries = read_classification_list(list_file, data_root, start_index)
        super().__init__(entries, _classes_for(entries, classes, list_file),
                         sampler or ClipSampler("train"), template, in_memory)
        if check_folders:
            self._check_folders(list_file)

    def _check_folders(self, list_file: Path) -> None:
        index = {name: i for i, name in enumerate(self.classes)}
        for entry in self.entries:
            folder = os.path.basename(os.path.dirname(entry.path.rstrip("/")))
            if folder in index and index[folder] != entry.label:
                raise DataError(f"{list_file}:{entry.line}: label {entry.label} "
                                f"({self.classes[entry.label]}) for a clip in class folder "
                                f"{folder!r} (class {index[folder]})")


def kinetics_classes(root: str | Path) -> list[str] | None:
    """Sorted class folder names of ``root/train`` (else ``root/val``, ``root/test``), or
    None when there are none (classes then come from the csv labels)."""
    root = Path(root)
    for split in ("train", "val", "test"):
        if (root / split).is_dir():
            folders = class_folders(root / split)
            if folders:
                return [f.name for f in folders]
    return None


class KineticsDataset(ClassificationListDataset):
    """A Kinetics-style split: ``root/<split>.csv`` (or ``list_file``) of ``<path> <label>``
    lines relative to ``root``, the clips in ``root/<split>/<class>/<clip>.mp4``.

    Classes are the sorted class folders (``kinetics_classes``) unless given, else the csv
    labels; with class folders, a clip in one whose label is another class's is a
    ``DataError`` naming the line.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 classes: Sequence[str] | None = None, sampler: ClipSampler | None = None,
                 list_file: str | Path | None = None) -> None:
        root = Path(root)
        list_file = Path(list_file) if list_file is not None else root / f"{split}.csv"
        if classes is None:
            classes = kinetics_classes(root)
        super().__init__(list_file, root, classes, sampler, check_folders=classes is not None)

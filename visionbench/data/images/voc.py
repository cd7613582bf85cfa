"""Reader and writer of the Pascal VOC detection layout.

::

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml          <annotation> with <size> and one <object> per box
    root/ImageSets/Main/<split>.txt    one image id a line (trainval, test, ...)

Boxes follow detectron2's reading of VOC (``data/datasets/pascal_voc.py``): the XML holds
1-based inclusive pixel indices, so ``(xmin, ymin, xmax, ymax)`` becomes the continuous box
``(xmin - 1, ymin - 1, xmax, ymax)``; a box over the whole W x H image is ``(0, 0, W, H)``.
``write_voc`` writes the inverse, so integer boxes survive a write and a read exactly.
Labels are 1-based over the class list (0 is the background of torchvision's detectors).
"difficult" objects are kept, flagged (detectron2 trains on them; the VOC evaluation ignores
them). Every unreadable file, unknown class or broken layout is a one-line ``DataError``
naming the file.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from visionbench.data.images.imagefolder import load_image
from visionbench.errors import ConfigError, DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IMAGE_DIR = "JPEGImages"
ANNOTATION_DIR = "Annotations"
SPLIT_DIR = Path("ImageSets") / "Main"
LAYOUT = (f"root/{IMAGE_DIR}/<id>.jpg, root/{ANNOTATION_DIR}/<id>.xml, "
          f"root/{SPLIT_DIR.as_posix()}/<split>.txt")


@dataclass(frozen=True)
class VOCAnnotation:
    """One parsed ``Annotations/<id>.xml``: boxes (K, 4) xyxy continuous pixels, 1-based
    labels, difficult flags, and the image size the XML states (None where absent)."""

    image_id: str
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    width: int | None = None
    height: int | None = None


def check_classes(classes: Sequence[str]) -> list[str]:
    classes = [str(c) for c in classes]
    if not classes:
        raise ConfigError("VOC: the class list is empty")
    if len(set(classes)) != len(classes):
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        raise ConfigError(f"VOC: the class list repeats {', '.join(dupes)}")
    return classes


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _text(element: ET.Element, tag: str, path: Path, where: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{path}: {where} has no <{tag}>")
    return child.text.strip()


def _number(element: ET.Element, tag: str, path: Path, where: str) -> float:
    text = _text(element, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: {where} <{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: {where} <{tag}> is {text!r}, not a finite number")
    return value


def parse_annotation(path: str | Path, class_index: Mapping[str, int],
                     image_id: str | None = None) -> VOCAnnotation:
    """Parse one VOC XML file; ``class_index`` maps a class name to its 1-based label."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        reason = str(err).replace("\n", " ") or type(err).__name__
        raise DataError(f"{path}: cannot read VOC annotation ({reason})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    width = height = None
    size = root.find("size")
    if size is not None and size.find("width") is not None:
        width = int(_number(size, "width", path, "<size>"))
        height = int(_number(size, "height", path, "<size>"))
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}"
        name = _text(obj, "name", path, where)
        if name not in class_index:
            raise DataError(f"{path}: {where} has class {name!r}, not in the class list "
                            f"({_short_list(list(class_index))})")
        flag = obj.find("difficult")
        flag_text = flag.text.strip() if flag is not None and flag.text else "0"
        if flag_text not in ("0", "1"):
            raise DataError(f"{path}: {where} <difficult> is {flag_text!r}, expected 0 or 1")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{path}: {where} has no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bndbox, t, path, f"{where} <bndbox>")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{path}: {where} box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) "
                            "has xmax < xmin or ymax < ymin")
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        labels.append(class_index[name])
        difficult.append(flag_text == "1")
    return VOCAnnotation(
        image_id=image_id if image_id is not None else path.stem,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
        width=width,
        height=height,
    )


def read_split(root: str | Path, split: str) -> list[str]:
    """The image ids listed in ``root/ImageSets/Main/<split>.txt`` (first token a line)."""
    root = Path(root)
    split_file = root / SPLIT_DIR / f"{split}.txt"
    if not split_file.is_file():
        folder = root / SPLIT_DIR
        found = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
        hint = f"available: {', '.join(found)}" if found else f"expected the layout {LAYOUT}"
        raise DataError(f"{split_file}: split list {split!r} not found ({hint})")
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{split_file}: cannot read split list ({err})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"{split_file}: split list holds no image ids")
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise DataError(f"{split_file}: image id {image_id!r} is listed twice")
        seen.add(image_id)
    return ids


class VOCDetection(Dataset):
    """One split of a Pascal VOC folder as dict samples::

        {"image": PIL RGB, "boxes": float32 (K, 4) xyxy pixels, "labels": int64 (K,) in
         1..len(classes), "difficult": bool (K,), "image_id": str}

    All annotations are parsed (and every listed image's existence checked) up front, so a
    broken data set fails before training. ``keep_difficult=False`` drops difficult objects.
    ``transform`` maps a sample dict to whatever the caller needs. ``target(i)`` is the
    sample without its image (no decoding).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        classes: Sequence[str] = VOC_CLASSES,
        transform: Callable[[dict], Any] | None = None,
        keep_difficult: bool = True,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.classes = check_classes(classes)
        self.transform = transform
        if not self.root.is_dir():
            raise DataError(f"{self.root}: Pascal VOC folder not found (expected {LAYOUT})")
        for sub in (IMAGE_DIR, ANNOTATION_DIR):
            if not (self.root / sub).is_dir():
                raise DataError(f"{self.root / sub}: folder missing (expected {LAYOUT})")
        self.split_file = self.root / SPLIT_DIR / f"{split}.txt"
        self.ids = read_split(self.root, split)
        class_index = {name: i + 1 for i, name in enumerate(self.classes)}
        with os.scandir(self.root / IMAGE_DIR) as entries:
            images = {e.name for e in entries}
        self.annotations: list[VOCAnnotation] = []
        for image_id in self.ids:
            if f"{image_id}.jpg" not in images:
                raise DataError(f"{self.image_path(image_id)}: image listed in "
                                f"{self.split_file} not found")
            xml = self.root / ANNOTATION_DIR / f"{image_id}.xml"
            if not xml.is_file():
                raise DataError(f"{xml}: annotation of image {image_id!r} (listed in "
                                f"{self.split_file}) not found")
            ann = parse_annotation(xml, class_index, image_id)
            if not keep_difficult:
                keep = ~ann.difficult
                ann = VOCAnnotation(image_id, ann.boxes[keep], ann.labels[keep],
                                    ann.difficult[keep], ann.width, ann.height)
            self.annotations.append(ann)

    def image_path(self, image_id: str) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> dict:
        ann = self.annotations[index]
        return {
            "boxes": torch.from_numpy(ann.boxes.copy()),
            "labels": torch.from_numpy(ann.labels.copy()),
            "difficult": torch.from_numpy(ann.difficult.copy()),
            "image_id": ann.image_id,
        }

    def __getitem__(self, index: int) -> Any:
        sample = self.target(index)
        sample["image"] = load_image(self.image_path(sample["image_id"]), "RGB")
        return self.transform(sample) if self.transform else sample


# ----------------------------------------------------------------------------- writing


def _as_array(value: Any, dtype: Any, shape_tail: tuple[int, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype).reshape(-1, *shape_tail)


def _as_image(image: Any, image_id: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DataError(f"write_voc: image {image_id!r} must be a PIL image or a uint8 "
                        f"(H, W, 3) array, got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _coordinate(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")


def annotation_xml(image_id: str, width: int, height: int, boxes: np.ndarray,
                   labels: np.ndarray, difficult: np.ndarray, classes: Sequence[str],
                   folder: str = "VOC") -> ET.ElementTree:
    """The VOC XML of one image; boxes are continuous xyxy pixels (written 1-based)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "visionbench"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for box, label, flag in zip(boxes, labels, difficult, strict=True):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[int(label) - 1]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if flag else "0"
        bndbox = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = (float(v) for v in box)
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bndbox, tag).text = _coordinate(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_voc(
    root: str | Path,
    samples: Iterable[Mapping[str, Any]],
    classes: Sequence[str] = VOC_CLASSES,
    splits: Mapping[str, Sequence[str]] | None = None,
    *,
    quality: int = 95,
) -> Path:
    """Write ``samples`` (dicts as ``VOCDetection`` yields them: image, boxes, labels,
    optional difficult, image_id) as a VOC folder, and ``splits`` (split name -> image ids)
    as ``ImageSets/Main/<split>.txt``; without ``splits`` every image goes to ``trainval``.
    Images are JPEG (``quality``), so pixels change slightly; boxes and labels do not.
    Returns ``root``."""
    root = Path(root)
    classes = check_classes(classes)
    for sub in (IMAGE_DIR, ANNOTATION_DIR, SPLIT_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    seen: set[str] = set()
    for sample in samples:
        image_id = str(sample["image_id"])
        if not image_id or image_id != image_id.strip() or any(
                c in image_id for c in "/\\ \t\n") or image_id.startswith("."):
            raise DataError(f"write_voc: image id {image_id!r} is not a plain file name")
        if image_id in seen:
            raise DataError(f"write_voc: image id {image_id!r} appears twice")
        seen.add(image_id)
        image = _as_image(sample["image"], image_id)
        boxes = _as_array(sample["boxes"], np.float64, (4,))
        labels = _as_array(sample["labels"], np.int64, ()).reshape(-1)
        difficult = sample.get("difficult")
        difficult = (np.zeros(len(labels), dtype=bool) if difficult is None
                     else _as_array(difficult, bool, ()).reshape(-1))
        if not len(boxes) == len(labels) == len(difficult):
            raise DataError(f"write_voc: image {image_id!r} has {len(boxes)} boxes, "
                            f"{len(labels)} labels and {len(difficult)} difficult flags")
        if len(labels) and (labels.min() < 1 or labels.max() > len(classes)):
            raise DataError(f"write_voc: image {image_id!r} has labels outside 1..{len(classes)}")
        if len(boxes) and (not np.isfinite(boxes).all()
                           or (boxes[:, 2] < boxes[:, 0]).any()
                           or (boxes[:, 3] < boxes[:, 1]).any()):
            raise DataError(f"write_voc: image {image_id!r} has a box that is not finite xyxy "
                            "with x1 >= x0 and y1 >= y0")
        image.save(root / IMAGE_DIR / f"{image_id}.jpg", quality=quality)
        tree = annotation_xml(image_id, image.width, image.height, boxes, labels, difficult,
                              classes, folder=root.name)
        tree.write(root / ANNOTATION_DIR / f"{image_id}.xml", encoding="utf-8",
                   xml_declaration=False)
        written.append(image_id)
    if splits is None:
        splits = {"trainval": written}
    for split, ids in splits.items():
        unknown = [i for i in ids if i not in seen]
        if unknown:
            raise DataError(f"write_voc: split {split!r} lists ids that were not written: "
                            f"{_short_list(unknown)}")
        (root / SPLIT_DIR / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root

"""Sample transforms: callables from a reader's sample dict to the training sample dict a
method reads. ``ImageSample`` lifts an image transform (``datamodule.build_transform``) to
samples; methods with other inputs (two views with their boxes, clips) write their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from visionbench.data.batch import sample_dict


class ImageSample:
    """``{"image": transform(image), "label": label}`` (the label kept when there is one)."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, item: Any) -> dict:
        sample = sample_dict(item)
        out = {**sample, "image": self.transform(sample["image"])}
        return {k: v for k, v in out.items() if v is not None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


def mae_pretrain_transform(data) -> ImageSample:
    """MAE's pretraining crop (``main_pretrain.py``: RandomResizedCrop(scale 0.2-1, bicubic),
    horizontal flip, normalize) at ``data.image_size``, to ``data.in_chans`` channels."""
    from visionbench.data.datamodule import build_transform

    return ImageSample(build_transform(data.image_size, data.in_chans, data.mean, data.std,
                                       train=True, kind="mae"))

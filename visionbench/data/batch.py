"""Batches are dicts (``image``, ``label``, and the keys other modalities add: ``view1`` /
``view2`` with ``coords1`` / ``coords2``, ``mask``, ``video``, ``points``, ``voxels``,
``video_id``); ``unpack`` reads the keys a consumer needs."""

from __future__ import annotations

from typing import Any

from visionbench.errors import DataError


def unpack(batch: Any, *keys: str):
    """The values of ``keys`` in a dict batch (one value for one key). A ``(x, y)`` tuple, the
    shape of plain tensor datasets, is read positionally in the order of ``keys``."""
    if isinstance(batch, dict):
        missing = [k for k in keys if k not in batch]
        if missing:
            raise DataError(f"the batch has no {missing} (keys: {', '.join(batch)})")
        values = tuple(batch[k] for k in keys)
    elif isinstance(batch, (tuple, list)) and len(batch) >= len(keys):
        values = tuple(batch[: len(keys)])
    else:
        raise DataError(f"expected a dict batch with keys {list(keys)}, got {type(batch)!r}")
    return values[0] if len(keys) == 1 else values


def sample_dict(item: Any) -> dict:
    """A reader's item as a sample dict: dicts pass, ``(image, label)`` becomes one."""
    if isinstance(item, dict):
        return item
    image, label = item
    return {"image": image, "label": label}


def count_samples(batch: Any) -> int:
    """The number of samples of a batch: the first dimension of its first tensor, searched
    through dicts, tuples and lists in order (what Lightning would infer, without its warning
    when other entries, such as a list of paths, have no such dimension)."""
    found = _first_dimension(batch)
    if found is None:
        raise DataError(f"the batch holds no tensor to count samples by ({type(batch)!r})")
    return found


def _first_dimension(value: Any) -> int | None:
    if hasattr(value, "shape"):
        return int(value.shape[0]) if len(value.shape) > 0 else None
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_dimension(item)
            if found is not None:
                return found
    return None

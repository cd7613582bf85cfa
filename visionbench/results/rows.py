"""From one protocol result (the JSON a protocol writes) to leaderboard result rows.

``rows_from_result(result, init=..., protocol=..., variant=...)`` gives one row per metric::

    {"init": str, "protocol": str, "metric": str, "value": float,
     "variant": str, "ci_low": float | None, "ci_high": float | None}

- Metrics are the finite numbers under ``test_<metric>`` (``test_top1`` -> ``top1``,
  ``test_loss`` -> ``loss``) and under the plain metric names of ``METRICS`` (``top1``,
  ``miou``, ``pixel_acc``, ``auroc``, ...); other numbers (``epochs``, ``steps``, ``lr``) are
  not metrics. ``metrics=`` picks some of them, in that order.
- ``ci_low`` / ``ci_high`` come from the result's ``"ci": {metric: [low, high]}``; without it
  a ``"samples"`` record (``visionbench.results.bootstrap``) is bootstrapped with ``seed``.
- A result holding no metric itself but sub-results (kNN: ``{"k20_t0.07": {"top1", ...},
  "k5_majority": {...}}``) gives the rows of each, with protocol ``<protocol>_<key>``
  (``knn_k20_t0.07``), the names the leaderboard has always used.
- ``variant`` is serialised canonically by ``format_variant``: ``key=value`` pairs sorted by
  key and joined by ``,`` (``"norm=imagenet,size=224"``); ``""`` when there is none.

The row's variant names the protocol knobs that change a number (input size, normalization,
votes, clips x crops, label fraction, trainable subset); it is part of the leaderboard's row
key, so two variants of one protocol are two rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from visionbench.results.bootstrap import ci_from_samples

# Metric names taken as metrics when they appear as plain keys of a result.
METRICS = (
    "top1", "top5", "miou", "pixel_acc", "macc", "mce", "mean_top1", "auroc", "map",
    "map_macro", "map_micro", "ap", "ap50", "ap75", "f1", "recall", "precision",
)  # fmt: skip
PERCENT_METRICS = ("top1", "top5", "miou", "pixel_acc", "macc", "mce", "mean_top1", "map",
                   "map_macro", "map_micro", "ap", "ap50", "ap75")
ROW_FIELDS = ("init", "protocol", "metric", "value", "variant", "ci_low", "ci_high")


def format_variant(variant: Mapping[str, Any] | str | None) -> str:
    """The canonical text of a variant: ``key=value`` sorted by key, joined by ``,``.

    A dict's ``None`` values are left out; booleans read ``true`` / ``false``, floats as
    Python writes them (``0.07``, ``1e-05``), lists and tuples joined by ``x`` (``clips x
    crops`` = ``[4, 3]`` -> ``4x3``). A string is parsed and re-serialised, so
    ``"size=224,norm=imagenet"`` and ``"norm=imagenet, size=224"`` are the same variant.
    Keys and values may not hold ``,`` or ``=``.
    """
    if variant is None:
        return ""
    if isinstance(variant, str):
        variant = parse_variant(variant)
    cells = []
    for key in sorted(variant, key=str):
        value = variant[key]
        if value is None:
            continue
        key_text, value_text = str(key).strip(), _value_text(value)
        for text in (key_text, value_text):
            if not text or "," in text or "=" in text:
                raise ValueError(f"variant {key!r}={value!r}: keys and values must be "
                                 "non-empty and hold no ',' or '='")
        cells.append(f"{key_text}={value_text}")
    return ",".join(cells)


def parse_variant(text: str) -> dict[str, str]:
    """``"norm=imagenet,size=224"`` -> ``{"norm": "imagenet", "size": "224"}``."""
    out: dict[str, str] = {}
    for cell in str(text).split(","):
        cell = cell.strip()
        if not cell:
            continue
        key, sep, value = cell.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"variant {text!r}: expected key=value pairs joined by ','")
        out[key.strip()] = value.strip()
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "x".join(_value_text(v) for v in value)
    return str(value).strip()


def rows_from_result(
    result: Mapping[str, Any],
    *,
    init: str,
    protocol: str,
    variant: Mapping[str, Any] | str | None = "",
    metrics: Sequence[str] | None = None,
    seed: int | None = 0,
) -> list[dict]:
    """One row per metric of ``result`` (see the module docstring for the shape)."""
    variant_text = format_variant(variant)
    found = result_metrics(result)
    if not found:
        rows = []
        for key, sub in result.items():
            if isinstance(sub, Mapping) and result_metrics(sub):
                rows += rows_from_result(sub, init=init, protocol=f"{protocol}_{key}",
                                         variant=variant_text, metrics=metrics, seed=seed)
        return rows
    names = list(found) if metrics is None else [m for m in metrics if m in found]
    intervals = result_ci(result, seed) if names else {}
    rows = []
    for metric in names:
        low, high = intervals.get(metric, (None, None))
        rows.append({"init": init, "protocol": protocol, "metric": metric,
                     "value": float(found[metric]), "variant": variant_text,
                     "ci_low": low, "ci_high": high})
    return rows


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """``{metric: value}`` of a result's own finite numbers (``test_<m>`` and ``METRICS``)."""
    found: dict[str, float] = {}
    for key, value in result.items():
        if not _is_number(value):
            continue
        if key.startswith("test_") and len(key) > 5:
            found.setdefault(key[5:], float(value))
        elif key in METRICS:
            found.setdefault(key, float(value))
    return found


def result_ci(result: Mapping[str, Any], seed: int | None = 0) -> dict[str, tuple[float, float]]:
    """``{metric: (low, high)}``: the result's ``"ci"``, else bootstrapped ``"samples"``."""
    stored = result.get("ci")
    if not isinstance(stored, Mapping):
        samples = result.get("samples")
        stored = ci_from_samples(samples, seed) if isinstance(samples, Mapping) else {}
    out = {}
    for metric, pair in stored.items():
        if isinstance(pair, Sequence) and len(pair) == 2 and all(_is_number(v) for v in pair):
            out[str(metric)] = (float(pair[0]), float(pair[1]))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

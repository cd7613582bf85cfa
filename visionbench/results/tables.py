"""Markdown tables of numbers: a run's results per protocol and variant, an entry's reported ones.

- ``result_tables(rows)``: one table per (protocol, variant) of result rows (``metrics.json``
  ``results`` or ``rows_from_result`` rows), in the order the rows come; columns are the
  result fields the rows carry (backbone, norm, placement, dataset, method, init), then
  metric, value and, when any row has one, the 95% bootstrap interval. The report embeds them
  and ``visionbench report`` can print them.
- ``reported_table(entry)``: the numbers a paper reports for a registry entry, one row per
  number with the init/method it belongs to (UNIP's students are distinct rows), for
  ``visionbench show NAME``.
- ``seed_table(rows)``: the ``mean`` / ``std`` rows ``aggregate_seeds`` returns, one line per
  result (mean, std, seeds), for ``visionbench run NAME --seeds 0,1,2`` to print.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from visionbench.results.rows import PERCENT_METRICS, format_variant

RESULT_COLUMNS = ("backbone", "norm", "placement", "dataset", "method", "init")
REPORTED_COLUMNS = ("backbone", "init/method", "norm", "placement", "protocol", "metric",
                    "value", "dataset", "source")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   numeric: Sequence[bool] | None = None) -> list[str]:
    """Lines of a Markdown table; ``numeric`` columns are right-aligned. Cells are escaped."""
    numeric = list(numeric) if numeric is not None else [False] * len(header)
    lines = ["| " + " | ".join(md(h) for h in header) + " |",
             "|" + "".join("---:|" if n else "---|" for n in numeric)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return lines


def result_tables(rows: Iterable[Mapping[str, Any]], heading: str = "###") -> list[str]:
    """Markdown lines: a ``heading`` and a table per (protocol, variant) of ``rows``."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        variant = _variant(row.get("variant"))
        groups.setdefault((str(row.get("protocol", "")), variant), []).append(row)
    lines: list[str] = []
    for (protocol, variant), members in groups.items():
        title = f"{heading} {protocol}" + (f" (variant `{variant}`)" if variant else "")
        columns = [c for c in RESULT_COLUMNS if any(c in r for r in members)]
        with_ci = any(_interval(r) is not None for r in members)
        header = [*columns, "metric", "value"] + (["95% CI"] if with_ci else [])
        body = []
        for r in members:
            cells = [r.get(c, "") for c in columns]
            cells += [r.get("metric", ""), format_value(r.get("metric"), r.get("value"))]
            if with_ci:
                cells.append(format_interval(r.get("metric"), _interval(r)))
            body.append(cells)
        numeric = [False] * (len(columns) + 1) + [True] + ([True] if with_ci else [])
        lines += [title, "", *markdown_table(header, body, numeric), ""]
    return lines


def reported_table(entry: Any) -> str:
    """The reported numbers of a registry ``Experiment`` (anything with ``reference_rows()``,
    or those rows themselves) as a Markdown table: backbone, init/method, norm, placement,
    protocol, metric, value, dataset, source. The init column is the pretraining a number
    belongs to (the entry's method when the paper names no other)."""
    rows = entry.reference_rows() if hasattr(entry, "reference_rows") else list(entry)
    if not rows:
        name = getattr(entry, "name", "this entry")
        return f"(no reported numbers for {name})"
    body = []
    for r in rows:
        source = str(r.get("run_id") or r.get("source") or "")
        source = source[len("paper:"):] if source.startswith("paper:") else source
        variant = _variant(r.get("variant"))
        protocol = r.get("protocol", "") + (f" [{variant}]" if variant else "")
        body.append([r.get("backbone", ""), r.get("init") or r.get("method") or "",
                     r.get("norm") or "", r.get("placement") or "", protocol,
                     r.get("metric", ""), _plain(r.get("value")), r.get("dataset", ""), source])
    numeric = [c == "value" for c in REPORTED_COLUMNS]
    return "\n".join(markdown_table(REPORTED_COLUMNS, body, numeric))


def seed_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table of seed aggregates: init, protocol, variant, metric, mean, std, seeds
    (the ``seeds:<seeds>:<digest>`` run id's seeds)."""
    pairs: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(str(row.get(c) or "") for c in ("backbone", "norm", "placement", "init",
                                                     "dataset", "protocol", "variant", "metric"))
        entry = pairs.setdefault(key, {"run_id": str(row.get("run_id") or "")})
        entry[str(row.get("stat"))] = _float(row.get("value"))
    if not pairs:
        return "(no seed aggregates: fewer than two finished seeds)"
    body = []
    for key, entry in pairs.items():
        metric = key[7]
        seeds = entry["run_id"].split(":")[1] if entry["run_id"].count(":") >= 2 else ""
        body.append([key[3], key[5], key[6], metric, format_value(metric, entry.get("mean")),
                     format_value(metric, entry.get("std")), seeds])
    header = ["init", "protocol", "variant", "metric", "mean", "std", "seeds"]
    return "\n".join(markdown_table(header, body, [False] * 4 + [True, True, False]))


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- formatting ------------------------------------------------------------------------------


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_percent(metric: Any) -> bool:
    """Accuracies and IoUs are percentages; counts like a divergence step are not."""
    return str(metric) in PERCENT_METRICS


def format_value(metric: Any, value: Any) -> str:
    if is_percent(metric):
        return pct(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "–" if value is None else str(value)


def format_interval(metric: Any, interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "–"
    low, high = interval
    return f"[{format_value(metric, low)}, {format_value(metric, high)}]"


def pct(value: Any) -> str:
    return f"{value:.2f}" if is_number(value) else "–"


def md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _plain(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return "" if value is None else str(value)


def _variant(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        return format_variant(value)
    except ValueError:
        return str(value)


def _interval(row: Mapping[str, Any]) -> tuple[float, float] | None:
    low, high = row.get("ci_low"), row.get("ci_high")
    if not (is_number(low) and is_number(high)):
        pair = row.get("ci")
        if isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
            low, high = pair
    if is_number(low) and is_number(high):
        return float(low), float(high)
    return None

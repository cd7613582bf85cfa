"""The leaderboard: one CSV row per (run, init, protocol, variant, metric, stat), runs next to
the papers.

``results/leaderboard.csv`` has exactly the columns in ``COLUMNS``, in that order. Rows come
from two sources, told apart by the ``source`` column:

- ``source=run``: one row per entry of ``results`` in a finished run's ``metrics.json``.
- ``source=paper``: the numbers a paper reports, from ``results/reference.csv`` (same
  columns). A reference row has no run, so its ``run_id`` column holds where in the paper
  the number comes from, prefixed with ``paper:`` (e.g. ``paper:Table 3``). Keeping the
  table there, rather than in an extra column, keeps one fixed column order for both sources.

Columns added with per-variant results and bootstrap intervals:

- ``variant``: the protocol knobs that change a number (input size, normalization, votes,
  clips x crops, label fraction, trainable subset), canonical ``key=value`` pairs sorted by
  key and joined by ``,`` (``visionbench.results.rows.format_variant``); empty when the
  protocol ran as its default. A result's ``variant`` may be a string or a dict.
- ``ci_low`` / ``ci_high``: the 95% percentile bootstrap interval over test samples (1,000
  seeded resamples, ``visionbench.results.bootstrap``) of the row's value, same unit; empty
  when the protocol kept no per-sample predictions (and on ``mean`` / ``std`` rows). A result
  carries them as ``ci_low`` / ``ci_high`` or as ``ci: [low, high]``.
- ``stat``: ``single`` for the row of one run (one seed), ``mean`` / ``std`` for the rows
  ``aggregate_seeds`` adds over runs of one config that differ only by their seed; empty for
  paper rows (a paper's number is whatever the paper reports). ``std`` is the sample standard
  deviation (ddof=1) over the seeds, so it needs two seeds at least. An aggregate row's
  ``run_id`` is ``seeds:<seeds>:<8 hex of the member run ids>`` (``seeds:0,1,2:1a2b3c4d``)
  and its ``seed`` is empty. No other statistic exists: a best-of-N (the max over seeds) can
  never be written, neither as a ``single`` row nor under another name; ``stat`` values other
  than these are refused.

A row is identified by ``ROW_KEY`` = (experiment, run_id, backbone, norm, placement, init,
dataset, protocol, variant, metric, stat, source). ``backbone``, ``norm`` and ``placement`` are
part of the key because one paper table reports several backbones or norms under the same
``paper:`` reference, and one ablation run reports one row set per (norm, placement); ``variant``
because one run reports one row per protocol variant. A result in ``metrics.json``
may carry any run field (backbone, norm, placement, dataset, epochs, ...) to override the run's
value for its row. Updating upserts: an existing key gets the new values, a new key is appended, and
rows whose run folder has since been deleted are kept. Every read-modify-write holds an
exclusive ``fcntl.flock`` on ``<leaderboard>.lock``, so concurrent runs lose no row, and the
CSV itself is replaced atomically.

CSVs written before these columns existed (header ``LEGACY_COLUMNS``, e.g. an older
``results/reference.csv``) still read: the new columns are filled with ``""`` (``stat`` with
``single`` on run rows), and the next upsert writes the file with ``COLUMNS``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import math
import os
import statistics
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionbench.errors import UserError
from visionbench.results.records import atomic_write_text, is_finished, read_metrics
from visionbench.results.rows import format_variant

if TYPE_CHECKING:
    import pandas

COLUMNS = [
    "experiment", "paper", "method", "backbone", "norm", "placement", "init", "dataset",
    "protocol", "variant", "metric", "value", "ci_low", "ci_high", "stat", "seed", "epochs",
    "precision", "device", "wall_s", "run_id", "source", "timestamp",
]  # fmt: skip
LEGACY_COLUMNS = [
    "experiment", "paper", "method", "backbone", "norm", "placement", "init", "dataset",
    "protocol", "metric", "value", "seed", "epochs", "precision", "device", "wall_s", "run_id",
    "source", "timestamp",
]  # fmt: skip
ROW_KEY = ("experiment", "run_id", "backbone", "norm", "placement", "init", "dataset", "protocol",
           "variant", "metric", "stat", "source")
SORT_ORDER = ("experiment", "source", "backbone", "init", "protocol", "variant", "metric",
              "stat", "run_id", "dataset")
SOURCES = ("run", "paper")
STATS = ("single", "mean", "std")
SEEDS_PREFIX = "seeds:"

_RESULT_FIELDS = ("init", "protocol", "variant", "metric", "value", "ci_low", "ci_high", "stat",
                  "source")
_RUN_FIELDS = [c for c in COLUMNS if c not in _RESULT_FIELDS]
_INT_COLUMNS = ("seed", "epochs")
_FLOAT_COLUMNS = ("value", "ci_low", "ci_high", "wall_s")
_REQUIRED_IN_REFERENCE = ("experiment", "backbone", "init", "dataset", "protocol", "metric",
                          "value", "run_id", "source")  # fmt: skip
# What may differ between the runs aggregate_seeds averages, besides the seed itself.
_PER_RUN = ("seed", "run_id", "timestamp", "wall_s", "value", "ci_low", "ci_high", "stat")
_GROUP_KEY = tuple(c for c in ROW_KEY if c not in ("run_id", "stat"))

Row = dict[str, Any]


def rows_from_metrics(metrics: dict) -> list[Row]:
    """One leaderboard row per entry of ``metrics["results"]``, with ``source="run"``.

    A result's ``variant`` (string or dict) is made canonical; its interval is read from
    ``ci_low`` / ``ci_high`` or ``ci: [low, high]``; its ``stat`` defaults to ``single``.
    """
    run_fields = {column: metrics.get(column) for column in _RUN_FIELDS}
    rows = []
    for result in metrics.get("results", []):
        row = dict(run_fields)
        row.update({k: v for k, v in result.items() if k in _RUN_FIELDS})
        low, high = result.get("ci_low"), result.get("ci_high")
        pair = result.get("ci")
        if low is None and high is None and isinstance(pair, list | tuple) and len(pair) == 2:
            low, high = pair
        row.update(
            init=result["init"], protocol=result["protocol"], metric=result["metric"],
            value=result["value"], variant=format_variant(result.get("variant")),
            ci_low=low, ci_high=high, stat=result.get("stat") or "single", source="run",
        )  # fmt: skip
        rows.append({column: row[column] for column in COLUMNS})
    return rows


def read_reference(path: str | os.PathLike) -> list[Row]:
    """Rows of a reference CSV (header ``COLUMNS`` or ``LEGACY_COLUMNS``); ``UserError`` if
    malformed.

    Empty cells become ``None``; value, ci_low, ci_high and wall_s are floats, seed and epochs
    ints; a missing variant is ``""``.
    """
    path = Path(path)
    rows = []
    seen: dict[tuple, int] = {}
    for line, cells in _read_csv(path):
        row: Row = {column: _parse_cell(path, line, column, cells[column]) for column in COLUMNS}
        row["variant"] = cells["variant"].strip()
        missing = [column for column in _REQUIRED_IN_REFERENCE if row[column] is None]
        if missing:
            raise UserError(f"{path}:{line}: empty {', '.join(missing)}")
        if row["source"] != "paper":
            raise UserError(f"{path}:{line}: source must be 'paper', got {row['source']!r}")
        if not str(row["run_id"]).startswith("paper:"):
            raise UserError(f"{path}:{line}: run_id must be 'paper:<table>', got {row['run_id']!r}")
        normal = _normalise(_as_cells(row), f"{path}:{line}")
        row["variant"] = normal["variant"]
        key = _key(normal)
        if key in seen:
            raise UserError(f"{path}:{line}: same row key as line {seen[key]}: {key}")
        seen[key] = line
        rows.append(row)
    return rows


def update_leaderboard(
    runs_dir: str | os.PathLike,
    leaderboard_csv: str | os.PathLike,
    reference_csv: str | os.PathLike | None = None,
) -> pandas.DataFrame:
    """Upsert every finished run under ``runs_dir`` and the reference rows; return the table."""
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: expected the folder of run folders")
    new_rows: list[Row] = []
    if reference_csv is not None:
        new_rows += read_reference(reference_csv)
    for run_dir in _finished_runs(runs_dir):
        metrics = read_metrics(run_dir)
        if not metrics.get("dry_run"):  # a --fast-dev-run's numbers are not results
            new_rows += rows_from_metrics(metrics)
    table = _upsert(Path(leaderboard_csv), new_rows)
    return _to_dataframe(table)


def append_run(run_dir: str | os.PathLike, leaderboard_csv: str | os.PathLike) -> int:
    """Upsert one run's rows; returns how many rows were added or updated.

    The runner calls this at the end of each run. A run whose metrics.json is not marked
    finished adds nothing and returns 0; a missing or invalid metrics.json is a ``UserError``.
    """
    metrics = read_metrics(run_dir)
    if metrics.get("status") != "finished":
        return 0
    rows = rows_from_metrics(metrics)
    if rows:
        _upsert(Path(leaderboard_csv), rows)
    return len(rows)


def read_leaderboard(path: str | os.PathLike) -> pandas.DataFrame:
    """The leaderboard CSV as a DataFrame with ``COLUMNS`` (empty if the file is missing)."""
    path = Path(path)
    rows = [_normalise(row, f"{path}:{line}") for line, row in _read_csv(path)] \
        if path.exists() else []
    return _to_dataframe(rows)


# -- seeds -----------------------------------------------------------------------------------


def aggregate_seeds(leaderboard_csv: str | os.PathLike,
                    run_dirs: Sequence[str | os.PathLike]) -> list[Row]:
    """After ``visionbench run NAME --seeds 0,1,2``: upsert each run's own rows (``single``)
    and a ``mean`` and a ``std`` row per result they share; returns the aggregate rows.

    ``run_dirs`` are the finished runs of one experiment whose configs differ only by the
    seed (``config.yaml`` without its ``seed``, when the runs have one, and the run fields
    of ``metrics.json`` must agree); each seed once. A result is aggregated when every run
    has it (a row missing from one seed, e.g. a divergence step, is never averaged over the
    others). With fewer than two runs nothing is aggregated (a std needs two seeds).
    """
    metrics = [read_metrics(run_dir) for run_dir in run_dirs]
    unfinished = [str(d) for d, m in zip(run_dirs, metrics, strict=True)
                  if m.get("status") != "finished"]
    if unfinished:
        raise UserError(f"aggregate seeds: not finished: {', '.join(unfinished)}")
    _check_same_config([Path(d) for d in run_dirs], metrics)
    singles = [rows_from_metrics(m) for m in metrics]
    aggregates = aggregate_rows([row for rows in singles for row in rows])
    _upsert(Path(leaderboard_csv), [row for rows in singles for row in rows] + aggregates)
    return aggregates


def aggregate_rows(rows: Iterable[Row]) -> list[Row]:
    """The ``mean`` and ``std`` rows of ``single`` run rows of one config over its seeds.

    Rows are grouped by ``ROW_KEY`` without run_id and stat; a group is aggregated when it
    holds one row of every run (every distinct run_id) and two runs at least. Values are
    averaged in float64; ``std`` is the sample standard deviation (ddof=1). Fields that all
    members share are kept, others (seed, intervals, timestamp but the latest) are emptied;
    ``wall_s`` is the members' total.
    """
    singles = [_as_cells(row) for row in rows]
    for cells in singles:
        if (cells["stat"] or "single") != "single" or cells["source"] != "run":
            raise UserError(f"aggregate seeds: only single run rows aggregate, got "
                            f"stat={cells['stat']!r} source={cells['source']!r}")
    run_ids = sorted({cells["run_id"] for cells in singles})
    if len(run_ids) < 2:
        return []
    seeds_of = {cells["run_id"]: cells["seed"] for cells in singles}
    seeds = sorted(seeds_of.values(), key=_seed_order)
    if len(set(seeds)) != len(seeds):
        raise UserError(f"aggregate seeds: runs share a seed: {', '.join(seeds)}")
    digest = hashlib.sha256(",".join(run_ids).encode()).hexdigest()[:8]
    run_id = f"{SEEDS_PREFIX}{','.join(seeds)}:{digest}"
    groups: dict[tuple, list[dict[str, str]]] = {}
    for cells in singles:
        groups.setdefault(tuple(cells[c] for c in _GROUP_KEY), []).append(cells)
    out: list[Row] = []
    for members in groups.values():
        if sorted(m["run_id"] for m in members) != run_ids:
            continue
        values = [float(m["value"]) for m in members]
        base: Row = {}
        for column in COLUMNS:
            texts = {m[column] for m in members}
            base[column] = texts.pop() if len(texts) == 1 else ""
        base.update(seed="", ci_low="", ci_high="", run_id=run_id,
                    timestamp=max(m["timestamp"] for m in members),
                    wall_s=_total(m["wall_s"] for m in members))
        out.append({**base, "stat": "mean", "value": repr(math.fsum(values) / len(values))})
        out.append({**base, "stat": "std", "value": repr(statistics.stdev(values))})
    return out


def _check_same_config(run_dirs: list[Path], metrics: list[dict]) -> None:
    fields = ("experiment", "method", "backbone", "norm", "placement", "dataset", "epochs",
              "precision", "profile")
    first = metrics[0]
    for run_dir, m in zip(run_dirs[1:], metrics[1:], strict=True):
        differ = [f for f in fields if m.get(f) != first.get(f)]
        if differ:
            raise UserError(f"aggregate seeds: {run_dir} differs from {run_dirs[0]} in "
                            f"{', '.join(differ)}, not only in the seed")
    configs = [run_dir / "config.yaml" for run_dir in run_dirs]
    if not all(path.is_file() for path in configs):
        return
    import yaml

    trees = []
    for path in configs:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(tree, dict):
            tree.pop("seed", None)
        trees.append(tree)
    for path, tree in zip(configs[1:], trees[1:], strict=True):
        if tree != trees[0]:
            keys = sorted(set(tree) | set(trees[0])) if isinstance(tree, dict) and isinstance(
                trees[0], dict) else []
            differ = [k for k in keys if tree.get(k) != trees[0].get(k)]
            raise UserError(f"aggregate seeds: {path} differs from {configs[0]} in "
                            f"{', '.join(differ) or 'its content'}, not only in the seed")


def _seed_order(seed: str) -> tuple[int, Any]:
    try:
        return (0, int(seed))
    except ValueError:
        return (1, seed)


def _total(texts: Iterable[str]) -> str:
    values = [float(t) for t in texts if t != ""]
    return repr(round(math.fsum(values), 1)) if values else ""


# -- the CSV ---------------------------------------------------------------------------------


def _upsert(leaderboard_csv: Path, new_rows: Iterable[Row]) -> list[dict[str, str]]:
    leaderboard_csv.parent.mkdir(parents=True, exist_ok=True)
    new_cells = [_normalise(_as_cells(row), "new row") for row in new_rows]
    with _exclusive_lock(leaderboard_csv):
        table = {_key(row): row for row in _existing_rows(leaderboard_csv)}
        for cells in new_cells:
            table[_key(cells)] = cells
        ordered = sorted(table.values(), key=lambda row: tuple(row[c] for c in SORT_ORDER))
        atomic_write_text(leaderboard_csv, _to_csv_text(ordered))
    return ordered


@contextmanager
def _exclusive_lock(leaderboard_csv: Path) -> Iterator[None]:
    # A sibling lock file, not the CSV itself: the CSV is replaced by rename on every write,
    # so a lock on it would be a lock on a file that no longer has the name.
    lock_path = leaderboard_csv.with_name(leaderboard_csv.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _existing_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [_normalise(row, f"{path}:{line}") for line, row in _read_csv(path)]


def _normalise(cells: dict[str, str], where: str) -> dict[str, str]:
    """Canonical variant; ``stat`` ``single`` on run rows without one; unknown stats refused."""
    try:
        cells["variant"] = format_variant(cells["variant"])
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None
    if cells["stat"] == "" and cells["source"] == "run":
        cells["stat"] = "single"
    if cells["stat"] not in ("", *STATS):
        raise UserError(f"{where}: stat must be one of {', '.join(STATS)} (or empty on a paper "
                        f"row), got {cells['stat']!r}")
    return cells


def _finished_runs(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and is_finished(p))


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row with every ``COLUMNS`` key) pairs of a CSV whose header is exactly
    ``COLUMNS`` or ``LEGACY_COLUMNS`` (the columns it lacks read as ``""``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header not in (COLUMNS, LEGACY_COLUMNS):
            raise UserError(f"{path}: header must be exactly: {','.join(COLUMNS)} "
                            f"(or the older {','.join(LEGACY_COLUMNS)})")
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise UserError(
                    f"{path}:{reader.line_num}: {len(cells)} fields, expected {len(header)}"
                )
            row = dict.fromkeys(COLUMNS, "")
            row.update(zip(header, cells, strict=True))
            rows.append((reader.line_num, row))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
    return iter(rows)


def _parse_cell(path: Path, line: int, column: str, text: str) -> Any:
    text = text.strip()
    if text == "":
        return None
    kind = int if column in _INT_COLUMNS else float if column in _FLOAT_COLUMNS else None
    if kind is None:
        return text
    try:
        return kind(text)
    except ValueError:
        raise UserError(
            f"{path}:{line}: {column} must be {'an integer' if kind is int else 'a number'}, "
            f"got {text!r}"
        ) from None


def _as_cells(row: Row) -> dict[str, str]:
    return {column: _cell_text(row.get(column)) for column in COLUMNS}


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _key(cells: dict[str, str]) -> tuple[str, ...]:
    return tuple(cells[column] for column in ROW_KEY)


def _to_csv_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _to_dataframe(rows: list[dict[str, str]]) -> pandas.DataFrame:
    import pandas

    frame = pandas.DataFrame(rows, columns=COLUMNS, dtype=object)
    frame = frame.replace("", None)
    frame["variant"] = frame["variant"].fillna("")  # "" is the default variant, not missing
    for column in (*_INT_COLUMNS, *_FLOAT_COLUMNS):
        frame[column] = pandas.to_numeric(frame[column], errors="coerce").astype(float)
    for column in _INT_COLUMNS:
        with contextlib.suppress(TypeError, ValueError):  # a non-integral cell stays float
            frame[column] = frame[column].astype("Int64")
    return frame

"""The leaderboard: one CSV row per (run, init, protocol, metric), runs next to the papers.

``results/leaderboard.csv`` has exactly the columns in ``COLUMNS``, in that order. Rows come
from two sources, told apart by the ``source`` column:

- ``source=run``: one row per entry of ``results`` in a finished run's ``metrics.json``.
- ``source=paper``: the numbers a paper reports, from ``results/reference.csv`` (same
  columns). A reference row has no run, so its ``run_id`` column holds where in the paper
  the number comes from, prefixed with ``paper:`` (e.g. ``paper:Table 3``). Keeping the
  table there, rather than in an extra column, keeps one fixed column order for both sources.

A row is identified by ``ROW_KEY`` = (experiment, run_id, backbone, norm, placement, init,
dataset, protocol, metric, source). ``backbone``, ``norm`` and ``placement`` are part of the key
because one paper table reports several backbones or norms under the same ``paper:`` reference,
and one ablation run reports one row set per (norm, placement). A result in ``metrics.json``
may carry any run field (backbone, norm, placement, dataset, epochs, ...) to override the run's
value for its row. Updating upserts: an existing key gets the new values, a new key is appended, and
rows whose run folder has since been deleted are kept. Every read-modify-write holds an
exclusive ``fcntl.flock`` on ``<leaderboard>.lock``, so concurrent runs lose no row, and the
CSV itself is replaced atomically.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionbench.errors import UserError
from visionbench.results.records import atomic_write_text, is_finished, read_metrics

if TYPE_CHECKING:
    import pandas

COLUMNS = [
    "experiment", "paper", "method", "backbone", "norm", "placement", "init", "dataset",
    "protocol", "metric", "value", "seed", "epochs", "precision", "device", "wall_s", "run_id",
    "source", "timestamp",
]  # fmt: skip
ROW_KEY = ("experiment", "run_id", "backbone", "norm", "placement", "init", "dataset", "protocol",
           "metric", "source")
SORT_ORDER = ("experiment", "source", "backbone", "init", "protocol", "metric", "run_id", "dataset")
SOURCES = ("run", "paper")

_RUN_FIELDS = [c for c in COLUMNS if c not in ("init", "protocol", "metric", "value", "source")]
_INT_COLUMNS = ("seed", "epochs")
_FLOAT_COLUMNS = ("value", "wall_s")
_REQUIRED_IN_REFERENCE = ("experiment", "backbone", "init", "dataset", "protocol", "metric",
                          "value", "run_id", "source")  # fmt: skip

Row = dict[str, Any]


def rows_from_metrics(metrics: dict) -> list[Row]:
    """One leaderboard row per entry of ``metrics["results"]``, with ``source="run"``."""
    run_fields = {column: metrics.get(column) for column in _RUN_FIELDS}
    rows = []
    for result in metrics.get("results", []):
        row = dict(run_fields)
        row.update({k: v for k, v in result.items() if k in _RUN_FIELDS})
        row.update(
            init=result["init"], protocol=result["protocol"], metric=result["metric"],
            value=result["value"], source="run",
        )  # fmt: skip
        rows.append({column: row[column] for column in COLUMNS})
    return rows


def read_reference(path: str | os.PathLike) -> list[Row]:
    """Rows of a reference CSV (header exactly ``COLUMNS``); ``UserError`` if malformed.

    Empty cells become ``None``; value and wall_s are floats, seed and epochs ints.
    """
    path = Path(path)
    rows = []
    seen: dict[tuple, int] = {}
    for line, cells in _read_csv(path):
        row: Row = {column: _parse_cell(path, line, column, cells[column]) for column in COLUMNS}
        missing = [column for column in _REQUIRED_IN_REFERENCE if row[column] is None]
        if missing:
            raise UserError(f"{path}:{line}: empty {', '.join(missing)}")
        if row["source"] != "paper":
            raise UserError(f"{path}:{line}: source must be 'paper', got {row['source']!r}")
        if not str(row["run_id"]).startswith("paper:"):
            raise UserError(f"{path}:{line}: run_id must be 'paper:<table>', got {row['run_id']!r}")
        key = _key(_as_cells(row))
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
        new_rows += rows_from_metrics(read_metrics(run_dir))
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
    return _to_dataframe(_existing_rows(Path(path)))


def _upsert(leaderboard_csv: Path, new_rows: Iterable[Row]) -> list[dict[str, str]]:
    leaderboard_csv.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(leaderboard_csv):
        table = {_key(row): row for row in _existing_rows(leaderboard_csv)}
        for row in new_rows:
            cells = _as_cells(row)
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
    return [row for _, row in _read_csv(path)] if path.exists() else []


def _finished_runs(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and is_finished(p))


def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV whose header must be exactly ``COLUMNS``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, None)
        if header != COLUMNS:
            raise UserError(f"{path}: header must be exactly: {','.join(COLUMNS)}")
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(COLUMNS):
                raise UserError(
                    f"{path}:{reader.line_num}: {len(cells)} fields, expected {len(COLUMNS)}"
                )
            rows.append((reader.line_num, dict(zip(COLUMNS, cells, strict=True))))
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
    for column in (*_INT_COLUMNS, *_FLOAT_COLUMNS):
        frame[column] = pandas.to_numeric(frame[column], errors="coerce").astype(float)
    for column in _INT_COLUMNS:
        with contextlib.suppress(TypeError, ValueError):  # a non-integral cell stays float
            frame[column] = frame[column].astype("Int64")
    return frame

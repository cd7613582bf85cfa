"""Run records, the leaderboard CSV and per-run reports."""

from visionbench.results.leaderboard import (
    COLUMNS,
    ROW_KEY,
    append_run,
    read_leaderboard,
    read_reference,
    rows_from_metrics,
    update_leaderboard,
)
from visionbench.results.records import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    config_hash,
    environment_info,
    is_finished,
    make_run_id,
    read_json,
    read_metrics,
)
from visionbench.results.report import write_report

__all__ = [
    "COLUMNS",
    "ROW_KEY",
    "append_run",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "config_hash",
    "environment_info",
    "is_finished",
    "make_run_id",
    "read_json",
    "read_leaderboard",
    "read_metrics",
    "read_reference",
    "rows_from_metrics",
    "update_leaderboard",
    "write_report",
]

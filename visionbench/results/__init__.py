"""Run records, the leaderboard CSV, per-run reports, bootstrap intervals and tables."""

from visionbench.results.bootstrap import bootstrap_ci, ci_from_samples
from visionbench.results.leaderboard import (
    COLUMNS,
    ROW_KEY,
    aggregate_seeds,
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
from visionbench.results.report import results_markdown, write_report
from visionbench.results.rows import format_variant, rows_from_result
from visionbench.results.tables import reported_table, result_tables

__all__ = [
    "COLUMNS",
    "ROW_KEY",
    "aggregate_seeds",
    "append_run",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "bootstrap_ci",
    "ci_from_samples",
    "config_hash",
    "environment_info",
    "format_variant",
    "is_finished",
    "make_run_id",
    "read_json",
    "read_leaderboard",
    "read_metrics",
    "read_reference",
    "reported_table",
    "result_tables",
    "results_markdown",
    "rows_from_metrics",
    "rows_from_result",
    "update_leaderboard",
    "write_report",
]

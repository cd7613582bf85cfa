"""The report of one run: ``report.md`` and its figures, built from whatever records exist.

Reads ``metrics.json`` (header, and its ``results`` rows as one table per protocol and
variant, with the 95% bootstrap interval when a row has one) and every result file a
protocol wrote under ``evals/`` (any ``*.json`` at any depth: ``evals/<init>/<protocol>.json``,
``evals/<student>/<dataset>/<protocol>.json``, those of protocols added later); any of them may
be missing and the report skips that part. Before ``metrics.json`` exists the results table
is rebuilt from those files (``visionbench.results.rows.rows_from_result``).

A result file gets a section by what it holds, not by its name: its test metrics (with their
intervals), a linear-probe grid (``grid`` + ``best``: the lr x weight-decay table and the
``figures/probe_grid_<label>.png`` heatmap; ``per_class_acc``: ``figures/per_class_<label>.png``),
sub-results such as kNN's classifiers (one row each), a training ``history`` (one row per
epoch) and ``per_class_iou``. A file with none of these (a protocol's own layout) is listed
under "Result files" only. Other PNGs in ``figures/`` (e.g. ``mae_reconstruction.png``) are
embedded as they are, and so are the Markdown tables an experiment writes to ``tables/``
(e.g. per-layer NMI, throughput). Image links are relative to the run folder, so the folder
can be moved or copied as a whole.
"""

from __future__ import annotations

import io
import math
import os
import re
from pathlib import Path
from typing import Any

from visionbench.errors import UserError
from visionbench.results.records import (
    atomic_write_bytes,
    atomic_write_text,
    read_json,
    read_metrics,
)
from visionbench.results.rows import result_ci, result_metrics, rows_from_result
from visionbench.results.tables import (
    format_interval,
    format_value,
    is_number,
    markdown_table,
    md,
    pct,
    result_tables,
)

REPORT_NAME = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
RESULTS_DIR = "evals"
# Readable names of protocol files; any other file is titled by its name.
_TITLES = {"linear_probe": "Linear probe", "linear": "Linear probe", "knn": "kNN",
           "finetune": "Fine-tune", "supervised": "Supervised"}
_METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "miou": "mIoU",
                  "pixel_acc": "pixel accuracy", "loss": "loss"}

_RUN_ID = re.compile(r"^(?P<stamp>\d{8}T\d{6}Z)-(?P<experiment>.+)-(?P<hash>[0-9a-f]{8})$")
_HEADER_FIELDS = (
    ("experiment", "Experiment"), ("paper", "Paper"), ("run_id", "Run id"),
    ("method", "Method"), ("backbone", "Backbone"), ("norm", "Norm"),
    ("placement", "Placement"), ("dataset", "Dataset"), ("seed", "Seed"),
    ("epochs", "Epochs"), ("precision", "Precision"), ("device", "Device"),
    ("wall_s", "Wall time"), ("config_hash", "Config hash"), ("status", "Status"),
    ("timestamp", "Finished at"),
)  # fmt: skip


def write_report(run_dir: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Write ``run_dir/report.md`` and its figures; returns the report's path.

    ``metrics`` is the record the runner is about to write as ``metrics.json`` (the report is
    written before it, so that ``metrics.json`` stays the last record of a run); without it
    the report reads ``metrics.json`` when there is one.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a directory")
    has_metrics = metrics is not None or (run_dir / "metrics.json").is_file()
    if not has_metrics and not (run_dir / RESULTS_DIR).is_dir() and not (
            run_dir / "status.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no metrics.json, evals/ or status.json)")
    if metrics is None:
        metrics = read_metrics(run_dir) if has_metrics else {}
    files = read_result_files(run_dir)

    generated: list[str] = []
    lines = _header(run_dir, metrics)
    lines += _results_section(metrics.get("results") or results_from_files(files))
    listed = []
    for relative, data in files.items():
        section = _file_section(run_dir, relative, data, generated)
        lines += section
        listed.append((relative, bool(section)))
    lines += _tables(run_dir)
    lines += _other_figures(run_dir, generated)
    lines += _file_list(listed)

    path = run_dir / REPORT_NAME
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def results_markdown(run_dir: str | os.PathLike) -> str:
    """The per-protocol, per-variant results tables of a run (Markdown), for the CLI to
    print: from ``metrics.json``, else rebuilt from the result files."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir) if (run_dir / "metrics.json").is_file() else {}
    rows = metrics.get("results") or results_from_files(read_result_files(run_dir))
    return "\n".join(result_tables(rows, heading="##")).rstrip() + "\n"


def read_result_files(run_dir: str | os.PathLike) -> dict[Path, dict]:
    """{path relative to ``evals/``: parsed JSON object} of every ``*.json`` under
    ``run_dir/evals`` at any depth, ordered by folder, then grids and sub-results first,
    then by name. A file that is not a JSON object is a ``UserError``."""
    root = Path(run_dir) / RESULTS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for path in root.rglob("*.json"):
        if not path.is_file():
            continue
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object at the top level")
        found[path.relative_to(root)] = data
    return dict(sorted(found.items(), key=lambda item: (
        item[0].parent.parts, _shape_rank(item[1]), item[0].name)))


def results_from_files(files: dict[Path, dict]) -> list[dict]:
    """The metrics.json ``results`` rows, rebuilt from the result files (before metrics.json):
    the first folder under ``evals/`` is the init, deeper folders the dataset, the file name
    the protocol (sub-results: ``<protocol>_<key>``)."""
    results = []
    for relative, data in files.items():
        parts = relative.parent.parts
        if not parts:
            continue
        extra = {"dataset": "/".join(parts[1:])} if len(parts) > 1 else {}
        for row in rows_from_result(data, init=parts[0], protocol=relative.stem):
            results.append({**extra, **row})
    return results


def _shape_rank(data: dict) -> int:
    if isinstance(data.get("grid"), list):
        return 0
    return 1 if _sub_results(data) else 2


def _sub_results(data: dict) -> dict[str, dict]:
    if result_metrics(data):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict) and result_metrics(v)}


def _header(run_dir: Path, metrics: dict) -> list[str]:
    info = dict(metrics)
    info.setdefault("run_id", run_dir.name)
    match = _RUN_ID.match(run_dir.name)
    if match:
        info.setdefault("experiment", match["experiment"])
        info.setdefault("config_hash", match["hash"])
    _fill_from(info, run_dir / "status.json", ("status",))
    _fill_from(info, run_dir / "environment.json", ("precision", "device"))
    if is_number(info.get("wall_s")):
        info["wall_s"] = _duration(info["wall_s"])

    lines = [f"# {info.get('experiment', 'Run')}: {info['run_id']}", ""]
    if not metrics:
        lines += ["*metrics.json is not written yet: numbers below come from evals/.*", ""]
    lines += ["| field | value |", "|---|---|"]
    for key, label in _HEADER_FIELDS:
        if info.get(key) not in (None, ""):
            lines.append(f"| {label} | {md(info[key])} |")
    return lines + [""]


def _fill_from(info: dict, path: Path, keys: tuple[str, ...]) -> None:
    if not path.is_file() or all(info.get(key) is not None for key in keys):
        return
    data = read_json(path)
    if isinstance(data, dict):
        for key in keys:
            if info.get(key) is None and data.get(key) is not None:
                info[key] = data[key]


def _results_section(results: list[dict]) -> list[str]:
    if not results:
        return []
    note = ("Intervals: 95% bootstrap over test samples (1,000 seeded resamples)."
            if any("ci_low" in r or "ci" in r for r in results) else None)
    return ["## Results", "", *([note, ""] if note else []), *result_tables(results)]


def _tables(run_dir: Path) -> list[str]:
    tables_dir = run_dir / TABLES_DIR
    if not tables_dir.is_dir():
        return []
    lines = []
    for path in sorted(tables_dir.glob("*.md")):
        lines += [path.read_text().rstrip(), ""]
    return lines


# -- one section per result file -------------------------------------------------------------


def _file_section(run_dir: Path, relative: Path, data: dict, generated: list[str]) -> list[str]:
    label = "/".join(relative.parent.parts) or relative.stem
    title = _TITLES.get(relative.stem, relative.stem.replace("_", " ").capitalize())
    body: list[str] = []
    grid = [g for g in data.get("grid") or [] if isinstance(g, dict)] \
        if isinstance(data.get("grid"), list) else []
    if grid or isinstance(data.get("best"), dict):
        body += _best_line(data)
    body += _metrics_line(data)
    if body:
        body.append("")
    body += _sub_results_table(data)
    if grid:
        body += _grid_table(run_dir, label, grid, data, generated)
    body += _per_class_figure(run_dir, label, data, generated)
    body += _history_table(data)
    body += _per_class_iou_table(data)
    if not body:
        return []
    return [f"## {title}: init `{label}`", "", *body]


def _best_line(probe: dict) -> list[str]:
    best = probe.get("best") if isinstance(probe.get("best"), dict) else {}
    return [f"- Best learning rate: {md(best.get('lr', '–'))}, "
            f"weight decay: {md(best.get('weight_decay', '–'))}"
            + (f" ({_best_position(probe)})" if probe.get("best_position") else "")]


def _metrics_line(data: dict) -> list[str]:
    metrics = result_metrics(data)
    if not metrics:
        return []
    intervals = result_ci(data)
    cells = []
    for index, (metric, value) in enumerate(metrics.items()):
        text = format_value(metric, value)
        text = f"**{text}**" if index == 0 else text
        if metric in intervals:
            low, high = intervals[metric]
            text += f" (95% CI {format_value(metric, low)}–{format_value(metric, high)})"
        cells.append(f"{_METRIC_LABELS.get(metric, metric)}: {text}")
    lines = ["- Test " + ", ".join(cells)]
    if data.get("epochs") is not None:
        lines.append(f"- Epochs: {md(data['epochs'])}")
    return lines


def _sub_results_table(data: dict) -> list[str]:
    subs = _sub_results(data)
    if not subs:
        return []
    metrics: list[str] = []
    for sub in subs.values():
        metrics += [m for m in result_metrics(sub) if m not in metrics]
    body = []
    for name, sub in subs.items():
        values, intervals = result_metrics(sub), result_ci(sub)
        cells = [name]
        for metric in metrics:
            text = format_value(metric, values.get(metric))
            if metric in intervals:
                text += " " + format_interval(metric, intervals[metric])
            cells.append(text)
        body.append(cells)
    header = ["classifier", *(_METRIC_LABELS.get(m, m) for m in metrics)]
    return [*markdown_table(header, body, [False] + [True] * len(metrics)), ""]


def _grid_table(run_dir: Path, label: str, grid: list[dict], probe: dict,
                generated: list[str]) -> list[str]:
    best = probe.get("best") if isinstance(probe.get("best"), dict) else {}
    lines = ["| lr | weight decay | val top-1 | val top-5 |", "|---:|---:|---:|---:|"]
    for g in grid:
        top1 = pct(g.get("val_top1")) + (" (best)" if _same_point(g, best) else "")
        point = f"| {md(g.get('lr'))} | {md(g.get('weight_decay'))} "
        lines.append(f"{point}| {top1} | {pct(g.get('val_top5'))} |")
    lines.append("")
    name = f"probe_grid_{_safe(label)}.png"
    if _save_figure(run_dir, name, _plot_probe_grid(grid, best, label)):
        generated.append(name)
        lines += [f"![Linear-probe grid, init {label}]({FIGURES_DIR}/{name})", ""]
    return lines


def _per_class_figure(run_dir: Path, label: str, data: dict, generated: list[str]) -> list[str]:
    classes, accuracy = data.get("classes"), data.get("per_class_acc")
    if not (isinstance(classes, list) and isinstance(accuracy, list) and classes
            and len(classes) == len(accuracy)):
        return []
    name = f"per_class_{_safe(label)}.png"
    if not _save_figure(run_dir, name, _plot_per_class(classes, accuracy, label)):
        return []
    generated.append(name)
    return [f"![Per-class test accuracy, init {label}]({FIGURES_DIR}/{name})", ""]


def _history_table(data: dict) -> list[str]:
    history = [h for h in data.get("history") or [] if isinstance(h, dict)] \
        if isinstance(data.get("history"), list) else []
    if not history:
        return []
    keys: list[str] = []
    for h in history:
        keys += [k for k in h if k != "epoch" and k not in keys]
    header = ["epoch", *(k.replace("_", " ").replace("top1", "top-1") for k in keys)]
    body = [[h.get("epoch", "–"), *(_history_cell(k, h.get(k)) for k in keys)] for h in history]
    return [*markdown_table(header, body, [True] * len(header)), ""]


def _history_cell(key: str, value: Any) -> str:
    if not is_number(value):
        return "–"
    if "loss" in key:
        return f"{value:.4f}"
    metric = key.split("_", 1)[1] if key.startswith(("val_", "train_", "test_")) else key
    return format_value(metric, float(value))


def _per_class_iou_table(data: dict) -> list[str]:
    iou = data.get("per_class_iou")
    if not isinstance(iou, list) or not iou:
        return []
    classes = data.get("classes")
    if not (isinstance(classes, list) and len(classes) == len(iou)):
        classes = list(range(len(iou)))
    body = [[name, pct(value)] for name, value in zip(classes, iou, strict=True)
            if value is not None]
    absent = len(iou) - len(body)
    note = [f"{absent} class(es) absent from the test set (no IoU) left out.", ""] \
        if absent else []
    return [*markdown_table(["class", "IoU"], body, [False, True]), "", *note]


def _best_position(probe: dict) -> str:
    """Where the best lies in the grid, and the extensions that moved the edge."""
    position = str(probe["best_position"])
    text = "inside the grid" if position == "interior" else f"on the grid's {position}"
    extensions = probe.get("extensions") or []
    if extensions:
        text += f", after {len(extensions)} extension(s) of the grid past its edge"
        if position != "interior":
            text += " (the bound): a wider grid may do better"
    return text


def _other_figures(run_dir: Path, generated: list[str]) -> list[str]:
    figures_dir = run_dir / FIGURES_DIR
    if not figures_dir.is_dir():
        return []
    others = sorted(p.name for p in figures_dir.glob("*.png") if p.name not in generated)
    if not others:
        return []
    lines = ["## Figures", ""]
    for name in others:
        lines += [f"### {name}", "", f"![{Path(name).stem}]({FIGURES_DIR}/{name})", ""]
    return lines


def _file_list(listed: list[tuple[Path, bool]]) -> list[str]:
    if not listed:
        return []
    lines = ["## Result files", ""]
    for relative, shown in listed:
        path = f"{RESULTS_DIR}/{relative.as_posix()}"
        lines.append(f"- `{path}`" + ("" if shown else " (not shown above)"))
    return lines + [""]


def _plot_probe_grid(grid: list[dict], best: dict, init: str) -> Any:
    """Heatmap of validation top-1: learning rates across, weight decays down, annotated."""
    plt = _pyplot()
    lrs = sorted({g.get("lr") for g in grid if is_number(g.get("lr"))})
    wds = sorted({g.get("weight_decay") for g in grid if is_number(g.get("weight_decay"))})
    if not lrs or not wds:
        return None
    values = [[math.nan] * len(lrs) for _ in wds]
    for g in grid:
        if g.get("lr") in lrs and g.get("weight_decay") in wds and is_number(g.get("val_top1")):
            values[wds.index(g["weight_decay"])][lrs.index(g["lr"])] = float(g["val_top1"])

    fig, ax = plt.subplots(figsize=(1.2 * len(lrs) + 2.5, 0.7 * len(wds) + 2.0))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="val top-1 (%)")
    finite = [v for row in values for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2 if finite else 0.0
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                colour = "black" if value > middle else "white"
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=colour, fontsize=9)
    if best.get("lr") in lrs and best.get("weight_decay") in wds:
        i, j = wds.index(best["weight_decay"]), lrs.index(best["lr"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(wds)), [f"{wd:g}" for wd in wds])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("weight decay")
    ax.set_title(f"Linear probe, init {init}: val top-1 (best boxed)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_per_class(classes: list, accuracy: list, init: str) -> Any:
    plt = _pyplot()
    heights = [float(a) if is_number(a) else 0.0 for a in accuracy]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(classes) + 1.5), 3.5))
    bars = ax.bar(range(len(classes)), heights, color="tab:blue")
    ax.bar_label(bars, labels=[f"{h:.0f}" for h in heights], fontsize=7)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Linear probe, init {init}: per-class test accuracy", fontsize=10)
    fig.tight_layout()
    return fig


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(run_dir: Path, name: str, fig: Any) -> bool:
    if fig is None:
        return False
    plt = _pyplot()
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(run_dir / FIGURES_DIR / name, buffer.getvalue())
    return True


def _same_point(point: dict, best: dict) -> bool:
    return bool(best) and all(point.get(k) == best.get(k) for k in ("lr", "weight_decay"))


def _duration(seconds: float) -> str:
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {secs:04.1f}s" if hours else f"{minutes}m {secs:04.1f}s"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

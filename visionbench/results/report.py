"""The report of one run: ``report.md`` and its figures, built from whatever records exist.

Reads ``metrics.json`` (header and results table) and ``evals/<init>/{linear_probe,knn,
finetune}.json``; any of them may be missing and the report skips that part. Figures go to
``figures/``: ``probe_grid_<init>.png`` (validation top-1 over the lr x weight-decay grid)
and ``per_class_<init>.png`` (per-class test accuracy of the best probe). Other PNGs already
in ``figures/`` (e.g. ``mae_reconstruction.png``) are embedded as they are, and so are the
Markdown tables an experiment writes to ``tables/`` (e.g. per-layer NMI, throughput). Image
links are relative to the run folder, so the folder can be moved or copied as a whole.
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

REPORT_NAME = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
# Result fields that, when a run's results carry them, get their own column in the table.
_RESULT_COLUMNS = ("backbone", "norm", "placement", "dataset", "init", "protocol", "metric")
PROTOCOL_FILES = ("linear_probe", "knn", "finetune")

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
    if not has_metrics and not (run_dir / "evals").is_dir() and not (
            run_dir / "status.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no metrics.json, evals/ or status.json)")
    if metrics is None:
        metrics = read_metrics(run_dir) if has_metrics else {}
    evals = _read_evals(run_dir)

    generated: list[str] = []
    lines = _header(run_dir, metrics)
    lines += _results_section(metrics.get("results") or _results_from_evals(evals))
    for init, protocols in evals.items():
        lines += _init_sections(run_dir, init, protocols, generated)
    lines += _tables(run_dir)
    lines += _other_figures(run_dir, generated)

    path = run_dir / REPORT_NAME
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def _read_evals(run_dir: Path) -> dict[str, dict[str, dict]]:
    """{init: {protocol: parsed JSON}} for every evals/<init>/<protocol>.json present."""
    evals: dict[str, dict[str, dict]] = {}
    evals_dir = run_dir / "evals"
    if not evals_dir.is_dir():
        return evals
    for init_dir in sorted(p for p in evals_dir.iterdir() if p.is_dir()):
        found = {}
        for protocol in PROTOCOL_FILES:
            path = init_dir / f"{protocol}.json"
            if path.is_file():
                data = read_json(path)
                if not isinstance(data, dict):
                    raise UserError(f"{path}: expected a JSON object at the top level")
                found[protocol] = data
        if found:
            evals[init_dir.name] = found
    return evals


def _results_from_evals(evals: dict[str, dict[str, dict]]) -> list[dict]:
    """The metrics.json ``results`` list, rebuilt from the eval files (before metrics.json)."""
    results = []

    def add(init: str, protocol: str, metric: str, value: Any) -> None:
        if _is_number(value):
            results.append(dict(init=init, protocol=protocol, metric=metric, value=value))

    for init, protocols in evals.items():
        for protocol in ("linear_probe", "finetune"):
            data = protocols.get(protocol, {})
            add(init, protocol, "top1", data.get("test_top1"))
            add(init, protocol, "top5", data.get("test_top5"))
        for name, scores in protocols.get("knn", {}).items():
            if isinstance(scores, dict):
                add(init, f"knn_{name}", "top1", scores.get("top1"))
                add(init, f"knn_{name}", "top5", scores.get("top5"))
    return results


def _header(run_dir: Path, metrics: dict) -> list[str]:
    info = dict(metrics)
    info.setdefault("run_id", run_dir.name)
    match = _RUN_ID.match(run_dir.name)
    if match:
        info.setdefault("experiment", match["experiment"])
        info.setdefault("config_hash", match["hash"])
    _fill_from(info, run_dir / "status.json", ("status",))
    _fill_from(info, run_dir / "environment.json", ("precision", "device"))
    if _is_number(info.get("wall_s")):
        info["wall_s"] = _duration(info["wall_s"])

    lines = [f"# {info.get('experiment', 'Run')}: {info['run_id']}", ""]
    if not metrics:
        lines += ["*metrics.json is not written yet: numbers below come from evals/.*", ""]
    lines += ["| field | value |", "|---|---|"]
    for key, label in _HEADER_FIELDS:
        if info.get(key) not in (None, ""):
            lines.append(f"| {label} | {_md(info[key])} |")
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
    columns = [c for c in _RESULT_COLUMNS if any(c in r for r in results)]
    lines = ["## Results", "", "| " + " | ".join(columns) + " | value |",
             "|" + "---|" * len(columns) + "---:|"]  # fmt: skip
    for r in results:
        cells = [_md(r.get(c, "")) for c in columns]
        value = _value(r.get("metric"), r.get("value"))
        lines.append("| " + " | ".join(cells) + f" | {value} |")
    return lines + [""]


def _is_percent(metric: Any) -> bool:
    """Accuracies and IoUs are percentages; counts like a divergence step are not."""
    return str(metric) in ("top1", "top5", "miou", "pixel_acc", "macc", "mce", "mean_top1")


def _value(metric: Any, value: Any) -> str:
    if _is_percent(metric):
        return _pct(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return _md(value)


def _tables(run_dir: Path) -> list[str]:
    tables_dir = run_dir / TABLES_DIR
    if not tables_dir.is_dir():
        return []
    lines = []
    for path in sorted(tables_dir.glob("*.md")):
        lines += [path.read_text().rstrip(), ""]
    return lines


def _init_sections(run_dir: Path, init: str, protocols: dict, generated: list[str]) -> list[str]:
    lines = []
    if "linear_probe" in protocols:
        lines += _probe_section(run_dir, init, protocols["linear_probe"], generated)
    if "knn" in protocols:
        lines += _knn_section(init, protocols["knn"])
    if "finetune" in protocols:
        lines += _finetune_section(init, protocols["finetune"])
    return lines


def _probe_section(run_dir: Path, init: str, probe: dict, generated: list[str]) -> list[str]:
    best = probe.get("best") if isinstance(probe.get("best"), dict) else {}
    lines = [
        f"## Linear probe: init `{init}`", "",
        f"- Best learning rate: {_md(best.get('lr', '–'))}, "
        f"weight decay: {_md(best.get('weight_decay', '–'))}"
        + (f" ({_best_position(probe)})" if probe.get("best_position") else ""),
        f"- Test top-1: **{_pct(probe.get('test_top1'))}**, "
        f"top-5: {_pct(probe.get('test_top5'))}",
        "",
    ]  # fmt: skip
    grid = [g for g in probe.get("grid") or [] if isinstance(g, dict)]
    if grid:
        lines += ["| lr | weight decay | val top-1 | val top-5 |", "|---:|---:|---:|---:|"]
        for g in grid:
            top1 = _pct(g.get("val_top1")) + (" (best)" if _same_point(g, best) else "")
            point = f"| {_md(g.get('lr'))} | {_md(g.get('weight_decay'))} "
            lines.append(f"{point}| {top1} | {_pct(g.get('val_top5'))} |")
        lines.append("")
        name = f"probe_grid_{_safe(init)}.png"
        if _save_figure(run_dir, name, _plot_probe_grid(grid, best, init)):
            generated.append(name)
            lines += [f"![Linear-probe grid, init {init}]({FIGURES_DIR}/{name})", ""]
    classes, accuracy = probe.get("classes"), probe.get("per_class_acc")
    if isinstance(classes, list) and isinstance(accuracy, list) and classes:
        if len(classes) == len(accuracy):
            name = f"per_class_{_safe(init)}.png"
            if _save_figure(run_dir, name, _plot_per_class(classes, accuracy, init)):
                generated.append(name)
                lines += [f"![Per-class test accuracy, init {init}]({FIGURES_DIR}/{name})", ""]
    return lines


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


def _knn_section(init: str, knn: dict) -> list[str]:
    rows = [(name, s) for name, s in knn.items() if isinstance(s, dict)]
    if not rows:
        return []
    lines = [f"## kNN: init `{init}`", "", "| classifier | top-1 | top-5 |", "|---|---:|---:|"]
    for name, scores in rows:
        lines.append(f"| {_md(name)} | {_pct(scores.get('top1'))} | {_pct(scores.get('top5'))} |")
    return lines + [""]


def _finetune_section(init: str, finetune: dict) -> list[str]:
    lines = [
        f"## Fine-tune: init `{init}`", "",
        f"- Test top-1: **{_pct(finetune.get('test_top1'))}**, "
        f"top-5: {_pct(finetune.get('test_top5'))}",
    ]  # fmt: skip
    if finetune.get("epochs") is not None:
        lines.append(f"- Epochs: {_md(finetune['epochs'])}")
    lines.append("")
    history = [h for h in finetune.get("history") or [] if isinstance(h, dict)]
    if history:
        lines += ["| epoch | train loss | val top-1 |", "|---:|---:|---:|"]
        for h in history:
            loss = h.get("train_loss")
            loss_text = f"{loss:.4f}" if _is_number(loss) else "–"
            lines.append(f"| {_md(h.get('epoch'))} | {loss_text} | {_pct(h.get('val_top1'))} |")
        lines.append("")
    return lines


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


def _plot_probe_grid(grid: list[dict], best: dict, init: str) -> Any:
    """Heatmap of validation top-1: learning rates across, weight decays down, annotated."""
    plt = _pyplot()
    lrs = sorted({g.get("lr") for g in grid if _is_number(g.get("lr"))})
    wds = sorted({g.get("weight_decay") for g in grid if _is_number(g.get("weight_decay"))})
    if not lrs or not wds:
        return None
    values = [[math.nan] * len(lrs) for _ in wds]
    for g in grid:
        if g.get("lr") in lrs and g.get("weight_decay") in wds and _is_number(g.get("val_top1")):
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
    heights = [float(a) if _is_number(a) else 0.0 for a in accuracy]
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "–"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {secs:04.1f}s" if hours else f"{minutes}m {secs:04.1f}s"


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

"""The ``visionbench`` command: parses, validates and calls the runner. No science here."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from visionbench.errors import UserError, one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # usage errors as click prints them: usage line, hint, error line
    help="visionbench: vision pretraining and transfer benchmarks, one command per paper.",
)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

RUNS_DIR = Path("results/runs")
LEADERBOARD = Path("results/leaderboard.csv")
REFERENCE = Path("results/reference.csv")


@app.command("list")
def list_cmd(
    format: str = typer.Option("table", "--format", help="table, csv or json"),
    norms: bool = typer.Option(False, "--norms", help="list the normalization catalog instead"),
) -> None:
    """The registry: paper, method, backbone, norm, placement, task."""
    if format not in ("table", "csv", "json"):
        raise UserError(f"--format {format!r}: expected table, csv or json")
    if norms:
        from visionbench.norms import NORMS

        rows = [
            {"name": s.name, "kind": s.kind, "where": s.where, "paper": s.paper,
             "arxiv": s.arxiv, "formula": s.formula, "defaults": json.dumps(s.defaults)}
            for s in NORMS.values()
        ]
    else:
        from visionbench.registry import EXPERIMENTS

        rows = [e.row() for e in EXPERIMENTS.values()]
        if format == "table":
            shown = ("name", "arxiv", "method", "backbone", "norm", "placement", "dataset",
                     "protocols")
            rows = [{k: r[k] for k in shown} for r in rows]
    emit_rows(rows, format)


def emit_rows(rows: list[dict], format: str) -> None:
    if format == "json":
        console.print_json(json.dumps(rows))
    elif format == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        table = Table()
        for key in rows[0]:
            table.add_column(key, overflow="fold")
        for row in rows:
            table.add_row(*(Text(str(v)) for v in row.values()))
        console.print(table)


@app.command()
def show(
    name: str,
    profile: str = typer.Option("demo", help="demo or paper"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
) -> None:
    """One registry entry with its resolved config."""
    import yaml

    from visionbench.config import resolve_config, to_dict
    from visionbench.registry import get_experiment

    entry = get_experiment(name)
    # Showing the paper profile must not need the data it would run on.
    cfg = resolve_config(name, profile, set_, require_data=False)
    console.print(f"[bold]{entry.name}[/bold]: {entry.paper} (arXiv {entry.arxiv})")
    for key, value in entry.row().items():
        if key not in ("name", "paper", "arxiv"):
            console.print(f"  {key}: {value}", highlight=False)
    if entry.reported:  # one row per number, with the init / method it belongs to
        from visionbench.results.tables import reported_table

        console.print("\n[bold]reported numbers[/bold]")
        console.print(reported_table(entry), highlight=False, markup=False, soft_wrap=True)
    console.print(f"\n[bold]resolved config ({profile} profile)[/bold]")
    console.print(yaml.safe_dump(to_dict(cfg), sort_keys=False), highlight=False, markup=False)


@app.command()
def run(
    name: str,
    profile: str = typer.Option("demo", help="demo (embedded data, CPU-sized) or paper"),
    set_: list[str] = typer.Option([], "--set", help="override: key.path=value (repeatable)"),
    backbone: str | None = typer.Option(None, help="timm backbone name"),
    norm: str | None = typer.Option(None, help="norm layer from the catalog"),
    data_root: str | None = typer.Option(None, "--data-root", help="real data on disk"),
    devices: str | None = typer.Option(None, help="Lightning devices (int or auto)"),
    strategy: str | None = typer.Option(None, help="Lightning strategy: auto, ddp, fsdp"),
    num_nodes: int | None = typer.Option(None, "--num-nodes"),
    precision: str | None = typer.Option(None, help="bf16-mixed, 16-mixed or 32-true"),
    max_epochs: int | None = typer.Option(None, "--max-epochs", help="pretraining epochs"),
    seed: int | None = typer.Option(None),
    seeds: str | None = typer.Option(None, help="run each seed, e.g. 0,1,2: mean and std rows"),
    fast_dev_run: bool = typer.Option(False, "--fast-dev-run",
                                      help="every stage on two batches: a dry run, no rows"),
    out: Path = typer.Option(RUNS_DIR, help="folder of run folders"),
    resume: Path | None = typer.Option(None, help="continue this interrupted run folder"),
    leaderboard: Path = typer.Option(LEADERBOARD, help="leaderboard CSV the run adds rows to"),
) -> None:
    """Run every stage of an experiment into a new run folder."""
    from visionbench.config import resolve_config
    from visionbench.distributed import shutdown
    from visionbench.registry import get_experiment
    from visionbench.runner import execute
    from visionbench.runner.core import is_global_zero

    get_experiment(name)
    seed_list = _seeds(seeds, seed)
    cfgs = [None]
    if resume is None:
        flags = {
            "model.backbone": backbone,
            "model.norm": norm,
            "data.root": data_root,
            "trainer.devices": _devices(devices),
            "trainer.strategy": strategy,
            "trainer.num_nodes": num_nodes,
            "trainer.precision": precision,
            "pretrain.epochs": max_epochs,
            "trainer.fast_dev_run": fast_dev_run or None,
        }
        # every seed's config is validated before the first run starts
        # a new backbone without --norm takes its family's norm
        sets = (["model.norm=null"] if backbone and norm is None else []) + list(set_)
        cfgs = [resolve_config(name, profile, sets, {**flags, "seed": s}) for s in seed_list]
    elif set_ or seeds or fast_dev_run or any(
            v is not None for v in (backbone, norm, data_root, max_epochs, seed)):
        raise UserError("--resume continues a run with its own config; drop the overrides")
    _quiet_libraries()
    run_dirs = []
    for cfg in cfgs:
        run_dirs.append(execute(
            name, cfg, out, resume=resume, leaderboard=leaderboard,
            log=lambda msg: console.print(f"[cyan]visionbench[/cyan] {escape(msg)}",
                                          highlight=False)))
        if is_global_zero():
            _print_summary(run_dirs[-1])
    if len(run_dirs) > 1 and is_global_zero() and not fast_dev_run:
        from visionbench.results.leaderboard import aggregate_seeds

        aggregate_seeds(leaderboard, run_dirs)
        console.print(f"{leaderboard}: mean and std over seeds {', '.join(map(str, seed_list))}")
    shutdown()  # every rank waits for rank 0's records, then leaves the process group


def _seeds(seeds: str | None, seed: int | None) -> list[int | None]:
    if seeds is None:
        return [seed]
    if seed is not None:
        raise UserError("give --seed or --seeds, not both")
    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: expected integers separated by commas, "
                        "e.g. 0,1,2") from None
    if not values or len(set(values)) < len(values):
        raise UserError(f"--seeds {seeds!r}: expected distinct integers, e.g. 0,1,2")
    return values


def _devices(value: str | None):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def _quiet_libraries() -> None:
    for pattern in (".*does not have many workers.*", ".*GPU available but not used.*",
                    ".*TPU available.*", ".*LeafSpec.*", ".*isinstance.*treespec.*",
                    ".*`ModelCheckpoint` .* could not find the monitored key.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def _print_summary(run_dir: Path) -> None:
    from visionbench.results.records import read_metrics

    metrics = read_metrics(run_dir)
    results = metrics["results"]
    # an ablation's rows differ in backbone / norm / placement / dataset: show those columns
    own = [c for c in ("backbone", "norm", "placement", "dataset") if any(c in r for r in results)]
    shared = [metrics[c] for c in ("backbone", "dataset") if c not in own]
    table = Table(title=Text(f"{metrics['experiment']} ({', '.join(shared)})" if shared
                             else metrics["experiment"]))
    for column in (*own, "init", "protocol", "metric", "value"):
        table.add_column(column)
    for row in results:
        cells = [row.get(c, metrics.get(c, "")) for c in own]
        cells += [row["init"], row["protocol"], row["metric"], f"{row['value']:.2f}"]
        table.add_row(*(Text(str(c)) for c in cells))  # names like vit[depth=4] are not markup
    console.print(table)
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.md'})")
    console.print(f"wall time: {metrics['wall_s']:.0f} s")


@app.command("leaderboard")
def leaderboard_cmd(
    runs_dir: Path = typer.Option(RUNS_DIR, "--runs-dir"),
    output: Path = typer.Option(LEADERBOARD, "--output"),
    reference: Path = typer.Option(REFERENCE, "--reference"),
) -> None:
    """Add the rows of every finished run and of the paper references to the leaderboard."""
    from visionbench.results.leaderboard import update_leaderboard

    ref = reference if reference.is_file() else None
    frame = update_leaderboard(runs_dir, output, ref)
    console.print(f"{output}: {len(frame)} rows "
                  f"({int((frame['source'] == 'run').sum())} from runs, "
                  f"{int((frame['source'] == 'paper').sum())} from papers)")


@app.command()
def report(run_dir: Path) -> None:
    """Rebuild the linear-probing report of one run folder."""
    from visionbench.results.report import write_report

    path = write_report(run_dir)
    console.print(f"wrote {path}")


def main() -> None:
    """The console script. Usage errors (a missing argument, a bad option value, an unknown
    option or command) are handled by typer's own click in standalone mode: the usage message
    and exit code 2. Bad input found by visionbench is one ``error:`` line and exit code 2."""
    try:
        app()  # standalone mode: exits with the command's code
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

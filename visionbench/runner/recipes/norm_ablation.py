"""The ``norm-ablation`` experiment: one pretraining method and protocol, every norm entry.

For each ViT entry (a catalog token norm in a placement) the same MAE pretraining, on the same
data and seed, then the same linear probe on frozen features; for each conv norm a supervised
ResNet from scratch. Every entry writes ``entries/<label>/result.json`` when it ends, so a
resumed run skips the entries already done (the one in progress resumes from its step
checkpoint). A loss that turns NaN or inf is recorded as diverged at its step and the
ablation goes on with the next entry.

Besides the leaderboard rows it writes the per-block gradient norm at fixed steps (the
analysis of Mix-LN and The Curse of Depth), the hidden-state variance per block (Peri-LN),
and a table of inference throughput for the norms that fold into the next linear layer
(BatchNorm, PRepBN) and for LayerNorm before and after the Pre-RMSNorm conversion.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from visionbench.analysis.layers import BlockStatsCallback, DivergenceMonitor
from visionbench.backbones import create_backbone
from visionbench.backbones.resnet import EVONORMS, preact_name
from visionbench.errors import ConfigError
from visionbench.norms.conversions import convert_to_crmsnorm
from visionbench.norms.schedules import NormSchedules
from visionbench.norms.token import fold_norms_
from visionbench.results.figures import save_block_profile_figure
from visionbench.results.records import atomic_write_json, atomic_write_text, read_json
from visionbench.runner import stages
from visionbench.runner.core import Run, build_encoder, is_global_zero

RESULT_FILE = "result.json"


def slug(label: str) -> str:
    return label.replace("/", "-")


def vit_entry(run: Run, entry, dm, eval_dm) -> dict:
    """MAE pretraining + linear probe of one (norm, placement); its result record."""
    out = run.dir / "entries" / slug(entry.label)
    if (out / RESULT_FILE).is_file():
        run.log(f"[{entry.label}] done before: skipped")
        return read_json(out / RESULT_FILE)
    model_cfg = run.cfg.model.model_copy(update={"norm": entry.norm, "placement": entry.placement})
    section = run.cfg.entry_pretrain(entry)
    stats = BlockStatsCallback(run.cfg.ablation.stats_steps)
    monitor = DivergenceMonitor()
    started = time.time()

    def record_fit(module) -> None:
        record = {"norm": entry.norm, "placement": entry.placement, "stats": stats.records,
                  "pretrain_s": round(time.time() - started, 1)}
        if monitor.diverged_at is not None:
            run.log(f"[{entry.label}] diverged at step {monitor.diverged_at} "
                    f"(loss {monitor.loss}); going on with the next entry")
            record.update(status="diverged", diverged_at_step=monitor.diverged_at,
                          loss=str(monitor.loss))
        atomic_write_json(out / "pretrain.json", record)

    encoder_file = stages.pretrain(run, section, dm, out, model=model_cfg,
                                   label=f"[{entry.label}] pretraining",
                                   callbacks=(stats, monitor), after=record_fit)
    record = read_json(out / "pretrain.json")
    if record.get("status") != "diverged":
        stages.linear_probe(run, entry.label,
                            lambda: stages.load_encoder(run, encoder_file, model=model_cfg),
                            eval_dm, out, features_dir=out / "features")
        probe = read_json(out / "linear_probe.json")
        record.update(status="finished",
                      linear_probe={k: probe[k] for k in ("test_top1", "test_top5", "best")})
    if is_global_zero():
        atomic_write_json(out / RESULT_FILE, record)
    return record


def random_baseline(run: Run, dm) -> dict:
    """The probe of the randomly initialised default backbone: the floor every entry beats."""
    out = run.dir / "entries" / "random-init"
    if (out / RESULT_FILE).is_file():
        return read_json(out / RESULT_FILE)
    stages.linear_probe(run, "random-init", lambda: build_encoder(run), dm, out,
                        features_dir=out / "features")
    probe = read_json(out / "linear_probe.json")
    record = {"norm": run.cfg.model.norm, "placement": run.cfg.model.placement,
              "status": "finished",
              "linear_probe": {k: probe[k] for k in ("test_top1", "test_top5", "best")}}
    if is_global_zero():
        atomic_write_json(out / RESULT_FILE, record)
    return record


def conv_architecture(backbone: str, norm: str, preact: bool) -> str:
    """The timm name of the ResNet an entry trains: EvoNorms, and the norms listed in
    ``ablation.conv.preact``, are in the pre-activation ResNetV2 of that depth."""
    return preact_name(backbone) if preact or norm in EVONORMS else backbone


def conv_entry(run: Run, norm: str, preact: bool = False) -> dict:
    """A supervised ResNet from scratch with the conv norm ``norm``; its result record."""
    c = run.cfg.ablation.conv
    arch = conv_architecture(c.backbone, norm, preact)
    out = run.dir / "entries" / f"{arch}-{norm}"
    stages.stage(run, f"entry:{arch}/{norm}", out / RESULT_FILE,
                 lambda: train_conv_entry(run, norm, arch, out), train=True)
    return read_json(out / RESULT_FILE)


def train_conv_entry(run: Run, norm: str, arch: str, out: Path) -> None:
    """Fits on every rank (DDP: the lr follows the batch of all ranks, 0.1 x batch x world /
    256); rank 0 tests the trained model and writes the record."""
    c = run.cfg.ablation.conv
    run.log(f"[{arch}/{norm}] supervised training, {c.epochs} epochs")
    dm = stages.image_datamodule(run, train_kind="supervised", batch_size=c.batch_size,
                                 crop_scale=c.crop_scale)
    L.seed_everything(run.cfg.seed, workers=True, verbose=False)
    kwargs = {"in_chans": run.cfg.data.in_chans, **c.backbone_kwargs}
    backbone = create_backbone(c.backbone, norm=norm, preact=arch != c.backbone,
                               norm_options=run.cfg.model.norm_options.get(norm), **kwargs)
    monitor = DivergenceMonitor()
    started = time.time()
    result = stages.supervised_on_all_ranks(run, backbone, dm, c.protocol(), out,
                                            callbacks=(monitor, NormSchedules(run.log)))
    if not is_global_zero():
        return
    record = {"norm": norm, "backbone": arch, "train_s": round(time.time() - started, 1)}
    if monitor.diverged_at is not None:
        record.update(status="diverged", diverged_at_step=monitor.diverged_at,
                      loss=str(monitor.loss))
    else:
        record.update(status="finished", supervised=stages.supervised_test(run, result, dm)[0])
    atomic_write_json(out / RESULT_FILE, record)




def result_rows(record: dict, **fields) -> list[dict]:
    base = {"norm": record["norm"], **fields}
    if record["status"] == "diverged":
        stage = "supervised" if "backbone" in record else "pretrain"  # conv records name it
        return [{**base, "protocol": stage, "metric": "diverged_at_step",
                 "value": record["diverged_at_step"]}]
    if "linear_probe" in record:
        return [{**base, "protocol": "linear_probe", "metric": m,
                 "value": record["linear_probe"][f"test_{m}"]} for m in ("top1", "top5")]
    return [{**base, "protocol": "supervised", "metric": m,
             "value": record["supervised"][f"test_{m}"]} for m in ("top1", "top5")]


# -- throughput -------------------------------------------------------------------------------


def images_per_second(model: torch.nn.Module, images: torch.Tensor, iterations: int,
                      warmup: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(images)
        started = time.perf_counter()
        for _ in range(iterations):
            model(images)
        elapsed = time.perf_counter() - started
    return images.shape[0] * iterations / elapsed


def throughput_models(run: Run) -> dict[str, torch.nn.Module]:
    """The eval-mode encoders whose inference speed is compared, keyed by their row label."""
    models = {}
    for norm in run.cfg.ablation.throughput.norms:
        model_cfg = run.cfg.model.model_copy(update={"norm": norm, "placement": "pre"})
        encoder = build_encoder(run, model=model_cfg).eval()
        if norm == "layernorm":
            models["layernorm"] = encoder
            for variant in ("rms", "crms"):
                converted = build_encoder(run, model=model_cfg).eval()
                models[f"layernorm -> pre-{variant}norm"] = convert_to_crmsnorm(
                    converted, variant=variant)
        elif fold_norms_(encoder):
            models[f"{norm} (folded)"] = encoder
        else:
            models[norm] = encoder
    return models


def throughput_stage(run: Run) -> list[dict]:
    out = run.dir / "tables" / "throughput.json"
    if out.is_file():
        return read_json(out)
    t = run.cfg.ablation.throughput
    d = run.cfg.data
    images = torch.randn(t.batch_size, d.in_chans, d.image_size, d.image_size,
                         generator=torch.Generator().manual_seed(run.cfg.seed))
    rows = []
    run.log("inference throughput of the folded norms")
    for label, model in throughput_models(run).items():
        rows.append({"model": label,
                     "images_per_s": images_per_second(model, images, t.iterations, t.warmup)})
    base = next((r["images_per_s"] for r in rows if r["model"] == "layernorm"), None)
    for row in rows:
        row["vs_layernorm"] = row["images_per_s"] / base if base else None
    atomic_write_json(out, rows)
    lines = ["## Inference throughput (eval mode, CPU, this run's backbone)", "",
             f"batch {t.batch_size}, {t.iterations} timed iterations after {t.warmup} warm-up, "
             f"on {run.device}.", "", "| model | images/s | vs LayerNorm |", "|---|---:|---:|"]
    for row in rows:
        ratio = f"{row['vs_layernorm']:.2f}x" if row["vs_layernorm"] else "–"
        lines.append(f"| {row['model']} | {row['images_per_s']:.1f} | {ratio} |")
    atomic_write_text(run.dir / "tables" / "throughput.md", "\n".join(lines) + "\n")
    return rows


# -- figures and summary ----------------------------------------------------------------------


def stats_figures(run: Run, records: dict[str, dict]) -> None:
    for key, ylabel, title, name in (
        ("grad_norm", "gradient norm", "Gradient norm of each block", "block_grad_norm.png"),
        ("variance", "hidden-state variance", "Variance of each block's output",
         "hidden_variance.png"),
    ):
        panels: dict[str, dict[str, list[float]]] = {}
        for label, record in records.items():
            for step, values in sorted(record.get("stats", {}).items(), key=lambda s: int(s[0])):
                panels.setdefault(f"step {step}", {})[label] = values[key]
        if panels:
            save_block_profile_figure(run.dir / "figures" / name, panels, ylabel, title)


def summary_table(run: Run, records: dict[str, dict]) -> None:
    lines = ["## Norm ablation", "", "| entry | status | linear probe top-1 | supervised top-1 |"
             " diverged at step |", "|---|---|---:|---:|---:|"]
    for label, r in records.items():
        probe = r.get("linear_probe", {}).get("test_top1")
        sup = r.get("supervised", {}).get("test_top1")
        lines.append(
            f"| {label} | {r['status']} | {'' if probe is None else f'{probe:.2f}'} "
            f"| {'' if sup is None else f'{sup:.2f}'} | {r.get('diverged_at_step', '')} |"
        )
    atomic_write_text(run.dir / "tables" / "ablation.md", "\n".join(lines) + "\n")


def run_norm_ablation(run: Run) -> tuple[list[dict], int]:
    a = run.cfg.ablation
    if a is None:
        raise ConfigError(f"{run.entry.config}: the norm ablation needs an 'ablation' section")
    dm = stages.method_datamodule(run, run.cfg.pretrain)
    eval_dm = stages.image_datamodule(run)
    records: dict[str, dict] = {}
    results: list[dict] = []
    backbone = run.cfg.model.backbone
    for entry in a.entries:
        record = vit_entry(run, entry, dm, eval_dm)
        records[entry.label] = record
        results += result_rows(record, placement=entry.placement, backbone=backbone,
                               init=run.entry.method)
    if a.entries and "random" in run.cfg.eval.inits:
        record = random_baseline(run, eval_dm)
        records["random init"] = record
        results += result_rows(record, placement=run.cfg.model.placement, backbone=backbone,
                               init="random")
    if a.conv is not None:
        entries = [(norm, False) for norm in a.conv.norms]
        entries += [(norm, True) for norm in a.conv.preact]
        for norm, preact in entries:
            record = conv_entry(run, norm, preact)
            label = f"{record['backbone']}/{norm}"
            records[label] = record
            results += result_rows(record, backbone=record["backbone"], init="random",
                                   placement="")
    if a.entries and a.throughput.norms:
        stages.stage(run, "throughput", run.dir / "tables" / "throughput.json",
                     lambda: throughput_stage(run))
    if is_global_zero():
        stats_figures(run, {k: r for k, r in records.items() if r.get("stats")})
        summary_table(run, records)
    return results, run.cfg.pretrain.epochs if run.cfg.pretrain else None

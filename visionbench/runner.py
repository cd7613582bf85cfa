"""The stages of an experiment, its run folder, resume and records.

A run folder ``results/runs/<UTC time>-<name>-<config hash>/`` holds ``config.yaml``,
``environment.json``, ``status.json`` (running / failed / finished, the stages done), the
Lightning CSV logs, checkpoints, cached features, ``evals/<init>/*.json``, figures, the report
and, written atomically as the very last step, ``metrics.json``.

Each stage writes its output atomically and is skipped on ``--resume`` when its output exists;
pretraining resumes from ``checkpoints/last.ckpt`` (saved every few steps, so a run killed in
the middle of an epoch loses at most those steps).
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException

from visionbench.backbones import create_backbone, load_backbone_weights
from visionbench.config import ExperimentConfig, to_dict, validate
from visionbench.data.datamodule import ImageClassificationDataModule
from visionbench.data.synth.shapes import prepare_shapes
from visionbench.errors import ConfigError, UserError, one_line
from visionbench.evals.features import cached_features
from visionbench.evals.finetune import run_finetune
from visionbench.evals.knn import knn_protocol
from visionbench.evals.linear_probe import linear_probe_sweep
from visionbench.methods import build_method
from visionbench.methods.mae import MAE
from visionbench.registry import Experiment, get_experiment
from visionbench.results.figures import save_reconstruction_figure
from visionbench.results.leaderboard import append_run
from visionbench.results.records import (
    atomic_write_json,
    atomic_write_text,
    config_hash,
    environment_info,
    make_run_id,
    read_json,
)
from visionbench.results.report import write_report

RUN_DIR_ENV = "VISIONBENCH_RUN_DIR"  # lets DDP worker processes find their parent's run folder
ENCODER_FILE = "encoder.safetensors"


def default_precision() -> str:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@dataclass
class Run:
    entry: Experiment
    cfg: ExperimentConfig
    dir: Path
    log: Callable[[str], None]

    @property
    def precision(self) -> str:
        return self.cfg.trainer.precision or default_precision()

    @property
    def device(self) -> str:
        if self.cfg.trainer.accelerator in ("cpu",) or not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{torch.cuda.get_device_name(0)}"

    def trainer_kwargs(self, distributed: bool) -> dict:
        return trainer_kwargs(self.cfg, distributed)

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict:
        path = self.dir / "status.json"
        return read_json(path) if path.exists() else {"status": "running", "stages": []}

    def stage_done(self, stage: str) -> bool:
        return stage in self.status().get("stages", [])

    def mark(self, stage: str | None = None, **fields) -> None:
        status = self.status()
        if stage and stage not in status["stages"]:
            status["stages"].append(stage)
        status.update(fields)
        status["updated"] = utc_now()
        atomic_write_json(self.dir / "status.json", status)


def trainer_kwargs(cfg: ExperimentConfig, distributed: bool) -> dict:
    t = cfg.trainer
    kw = {"accelerator": t.accelerator, "precision": t.precision or default_precision()}
    if distributed:
        kw.update(devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes)
    else:  # evaluation stages run in this one process on one device
        kw.update(devices=1)
    return kw


def check_trainer_settings(cfg: ExperimentConfig) -> None:
    """Lightning's verdict on accelerator/devices/strategy/precision, before anything is
    written: a bad combination is a one-line ConfigError, not a traceback mid-run."""
    try:
        L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, **trainer_kwargs(cfg, distributed=True))
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as err:
        t = cfg.trainer
        raise ConfigError(
            f"trainer (accelerator={t.accelerator}, devices={t.devices}, strategy={t.strategy}, "
            f"precision={t.precision or default_precision()}): {one_line(err)}"
        ) from None


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# -- run folders ------------------------------------------------------------------------------


def create_run(entry: Experiment, cfg: ExperimentConfig, out: Path, log) -> Run:
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and not is_global_zero():
        return Run(entry, cfg, Path(inherited), log)
    tree = to_dict(cfg)
    run_dir = Path(out) / make_run_id(entry.name, config_hash(tree))
    run_dir.mkdir(parents=True, exist_ok=False)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(tree, sort_keys=False))
    run = Run(entry, cfg, run_dir, log)
    atomic_write_json(run_dir / "environment.json", environment_info(run.precision, run.device))
    run.mark(status="running", started=utc_now(), stages=[])
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run


def open_run(run_dir: Path, name: str, log) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.yaml)")
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = validate(tree, run_dir / "config.yaml")
    if cfg.experiment != name:
        raise UserError(f"{run_dir}: is a run of {cfg.experiment!r}, not {name!r}")
    run = Run(get_experiment(name), cfg, run_dir, log)
    status = run.status()
    if status.get("status") == "finished":
        raise UserError(f"{run_dir}: this run already finished; nothing to resume")
    run.mark(status="running", resumed=utc_now())
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run


# -- stages -----------------------------------------------------------------------------------


def datamodule(run: Run, train_kind: str = "mae", batch_size: int | None = None):
    d = run.cfg.data
    if d.root is None:
        if d.dataset not in EMBEDDED:
            raise ConfigError(f"data.dataset {d.dataset!r} has no embedded generator; "
                              "pass --data-root or use dataset 'shapes'")
        run.log("preparing the embedded 'shapes' data set (written once to the cache)")
        root = prepare_shapes(
            image_size=d.image_size,
            seed=run.cfg.seed,
            train_per_class=d.synth.train_per_class,
            val_per_class=d.synth.val_per_class,
            test_per_class=d.synth.test_per_class,
        )
    else:
        root = Path(d.root)
    dm = ImageClassificationDataModule(
        root=root,
        image_size=d.image_size,
        in_chans=d.in_chans,
        mean=d.mean,
        std=d.std,
        batch_size=batch_size or d.batch_size,
        num_workers=d.num_workers,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=run.cfg.seed,
        train_kind=train_kind,
    )
    dm.setup()
    return dm


def backbone_label(run: Run) -> str:
    """The timm name, plus the constructor overrides that changed its architecture."""
    m = run.cfg.model
    if not m.backbone_kwargs:
        return m.backbone
    args = ",".join(f"{k}={v}" for k, v in sorted(m.backbone_kwargs.items()))
    return f"{m.backbone}[{args}]"


EMBEDDED = ("shapes",)  # data sets the demo profile generates when no --data-root is given


def dataset_name(run: Run) -> str:
    """The data set's name; with --data-root on the demo profile, the folder's name."""
    d = run.cfg.data
    if d.root is not None and d.dataset in EMBEDDED:
        return Path(d.root).name
    return d.dataset


def build_encoder(run: Run, drop_path_rate: float = 0.0) -> torch.nn.Module:
    m, d = run.cfg.model, run.cfg.data
    kwargs = dict(m.backbone_kwargs)
    kwargs.setdefault("img_size", d.image_size)
    kwargs.setdefault("in_chans", d.in_chans)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    L.seed_everything(run.cfg.seed, workers=True, verbose=False)
    try:
        return create_backbone(m.backbone, norm=m.norm, placement=m.placement, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone_kwargs: {err}") from None


def pretrain_stage(run: Run, dm) -> None:
    """Pretraining with Lightning; saves the encoder (and, for MAE, the reconstruction figure)."""
    p = run.cfg.pretrain
    ckpt_dir = run.dir / "checkpoints"
    encoder_file = ckpt_dir / ENCODER_FILE
    if run.stage_done("pretrain") and encoder_file.is_file():
        run.log("pretraining already done: skipped")
        return
    model = build_method(run.cfg, build_encoder(run))
    if p.official_weights:
        run.log(model.load_official(p.official_weights))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step}",
        every_n_train_steps=p.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        max_epochs=p.epochs,
        default_root_dir=run.dir,
        logger=L.pytorch.loggers.CSVLogger(run.dir / "logs", name="pretrain", version=""),
        callbacks=[checkpoint],
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=p.val_every_n_epochs,
        **run.trainer_kwargs(distributed=True),
    )
    resume = resume_checkpoint(ckpt_dir)
    if resume:
        run.log(f"resuming pretraining from {resume}")
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    if not trainer.is_global_zero:
        raise SystemExit(0)  # DDP workers stop here; rank 0 evaluates on one device
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # nothing after this syncs across ranks
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    tmp = encoder_file.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, encoder_file)
    if isinstance(model, MAE):
        reconstruction_figure(run, model, dm)
    run.mark("pretrain")


def resume_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest whole checkpoint; a file cut short by a kill is skipped.

    ``torch.save`` writes a zip archive whose directory sits at its end, so a truncated file
    fails ``is_zipfile`` without being read or unpickled (Lightning then loads the one kept).
    """
    if not ckpt_dir.is_dir():
        return None
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((str(path) for path in candidates if zipfile.is_zipfile(path)), None)


def reconstruction_figure(run: Run, model: MAE, dm) -> None:
    """Input, masked input and reconstruction of validation images spread over the classes."""
    dataset = dm.eval_dataloader("val").dataset
    n = min(run.cfg.pretrain.figure_images, len(dataset))
    picks = torch.linspace(0, len(dataset) - 1, n).long().tolist()
    imgs = torch.stack([dataset[i][0] for i in picks])
    model = model.cpu().eval()
    noise = torch.rand(imgs.shape[0], model.grid[0] * model.grid[1],
                       generator=torch.Generator().manual_seed(run.cfg.seed))
    masked, recon = model.reconstruct(imgs, noise=noise)
    save_reconstruction_figure(run.dir / "figures" / "mae_reconstruction.png", imgs, masked,
                               recon, run.cfg.data.mean, run.cfg.data.std)


def init_name(run: Run, init: str) -> str:
    if init == "random":
        return "random"
    if run.cfg.model.weights:
        return Path(run.cfg.model.weights).name
    return run.entry.method


def evaluation_backbone(run: Run, init: str, drop_path_rate: float = 0.0) -> torch.nn.Module:
    backbone = build_encoder(run, drop_path_rate)
    if init == "pretrained":
        path = run.cfg.model.weights or run.dir / "checkpoints" / ENCODER_FILE
        report = load_backbone_weights(backbone, path, strict=run.cfg.model.weights is None)
        run.log(report.summary())
    return backbone


def eval_stage(run: Run, init: str, dm) -> None:
    e = run.cfg.eval
    name = init_name(run, init)
    out = run.dir / "evals" / name
    device = "cuda" if run.device.startswith("cuda") else "cpu"
    if not (out / "linear_probe.json").is_file() or not (out / "knn.json").is_file():
        backbone = evaluation_backbone(run, init).to(device)
        feats = {}
        for split in ("train", "val", "test"):
            run.log(f"[{name}] features of the {split} split")
            feats[split] = cached_features(
                run.dir / "features" / name / f"{split}.pt",
                backbone,
                dm.eval_dataloader(split),
                e.pooling,
                e.last_k,
                device,
            )
        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
            feats["train"], feats["val"], feats["test"])
        if not (out / "linear_probe.json").is_file():
            heads = len(e.linear_probe.lrs) * len(e.linear_probe.weight_decays)
            run.log(f"[{name}] linear probe: {heads} heads trained in one pass")
            probe = linear_probe_sweep(
                train_x, train_y, val_x, val_y, test_x, test_y,
                num_classes=dm.num_classes,
                lrs=e.linear_probe.lrs,
                weight_decays=e.linear_probe.weight_decays,
                epochs=e.linear_probe.epochs,
                batch_size=e.linear_probe.batch_size,
                warmup_epochs=e.linear_probe.warmup_epochs,
                seed=run.cfg.seed,
                classes=dm.classes,
            )
            atomic_write_json(out / "linear_probe.json", probe)
        if not (out / "knn.json").is_file():
            run.log(f"[{name}] kNN")
            knn = knn_protocol(train_x, train_y, test_x, test_y, dm.num_classes,
                               k=e.knn.k, temperature=e.knn.temperature,
                               majority_k=e.knn.majority_k)
            atomic_write_json(out / "knn.json", knn)
    ft = e.finetune
    if ft.enabled and not (out / "finetune.json").is_file():
        run.log(f"[{name}] fine-tune, {ft.epochs} epochs")
        ft_dm = datamodule(run, train_kind="finetune", batch_size=ft.batch_size)
        backbone = evaluation_backbone(run, init, ft.drop_path_rate)
        result = run_finetune(
            backbone,
            ft_dm.train_dataloader(),
            ft_dm.val_dataloader(),
            ft_dm.test_dataloader(),
            ft_dm.num_classes,
            {**ft.model_dump(exclude={"enabled", "batch_size", "drop_path_rate"}),
             "seed": run.cfg.seed},
            run.trainer_kwargs(distributed=False),
            out / "finetune_logs",
        )
        atomic_write_json(out / "finetune.json", result)


def collect_results(run: Run) -> list[dict]:
    rows = []
    for init in run.cfg.eval.inits:
        name = init_name(run, init)
        out = run.dir / "evals" / name
        probe = read_json(out / "linear_probe.json")
        rows += [
            {"init": name, "protocol": "linear_probe", "metric": m, "value": probe[f"test_{m}"]}
            for m in ("top1", "top5")
        ]
        for key, values in read_json(out / "knn.json").items():
            for metric, value in values.items():
                rows.append({"init": name, "protocol": f"knn_{key}", "metric": metric,
                             "value": value})
        if (out / "finetune.json").is_file():
            ft = read_json(out / "finetune.json")
            rows += [
                {"init": name, "protocol": "finetune", "metric": m, "value": ft[f"test_{m}"]}
                for m in ("top1", "top5")
            ]
    return rows


def finish(run: Run, wall_s: float, leaderboard: Path | None) -> dict:
    cfg = run.cfg
    metrics = {
        "run_id": run.dir.name,
        "experiment": run.entry.name,
        "paper": run.entry.paper,
        "method": run.entry.method,
        "backbone": backbone_label(run),
        "norm": cfg.model.norm,
        "placement": cfg.model.placement,
        "dataset": dataset_name(run),
        "seed": cfg.seed,
        "epochs": cfg.pretrain.epochs,
        "precision": run.precision,
        "device": run.device,
        "wall_s": round(wall_s, 1),
        "timestamp": utc_now(),
        "config_hash": config_hash(to_dict(cfg)),
        "profile": cfg.profile,
        "status": "finished",
        "results": collect_results(run),
    }
    atomic_write_json(run.dir / "metrics.json", metrics)
    run.mark("metrics", status="finished", finished=metrics["timestamp"])
    if leaderboard is not None:
        append_run(run.dir, leaderboard)
    return metrics


def execute(
    name: str,
    cfg: ExperimentConfig | None,
    out: Path,
    resume: Path | None = None,
    leaderboard: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every stage of experiment ``name``; returns the run folder."""
    entry = get_experiment(name)
    if cfg is not None:
        check_trainer_settings(cfg)
    run = open_run(resume, name, log) if resume else create_run(entry, cfg, out, log)
    log(f"run folder: {run.dir}")
    started = time.time()
    wall_before = float(run.status().get("wall_s", 0.0))
    try:
        dm = datamodule(run)
        if "pretrained" in run.cfg.eval.inits and not run.cfg.model.weights:
            pretrain_stage(run, dm)
            run.mark(wall_s=wall_before + time.time() - started)
        for init in run.cfg.eval.inits:
            eval_stage(run, init, dm)
            run.mark(f"eval:{init}", wall_s=wall_before + time.time() - started)
        write_report(run.dir)  # from the evals; metrics.json stays the last record written
        finish(run, wall_before + time.time() - started, leaderboard)
    except SystemExit:
        raise
    except BaseException as err:
        if is_global_zero():
            wall = wall_before + time.time() - started
            run.mark(status="failed", error=one_line(err), wall_s=wall)
        raise
    return run.dir

"""The run folder, its records and resume: what every experiment's stages share.

A run folder ``results/runs/<UTC time>-<name>-<config hash>/`` holds ``config.yaml``,
``environment.json``, ``status.json`` (running / failed / finished, the stages done), the
Lightning CSV logs, checkpoints, the outputs of each stage, figures, tables, the report and,
written atomically as the very last step, ``metrics.json``.

Each stage writes its output atomically and is skipped on ``--resume`` when its output exists;
training resumes from its ``last.ckpt`` (saved every few steps, so a run killed in the middle
of an epoch loses at most those steps).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy

from visionbench.backbones import create_backbone
from visionbench.config import ExperimentConfig, to_dict, validate
from visionbench.distributed import world_size
from visionbench.errors import ConfigError, DataError, UserError, one_line
from visionbench.methods.schedule import ensure_trained
from visionbench.norms.schedules import NormSchedules
from visionbench.registry import Experiment, get_experiment
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
from visionbench.schema import Schedule

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
    wall: Callable[[], float] = lambda: 0.0  # seconds of work so far, set by execute()

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

    @property
    def sync_batchnorm(self) -> bool:
        """Whether a DDP fit can synchronise BatchNorm: torch's SyncBatchNorm runs on CUDA
        only, so on CPU processes (gloo) each rank normalizes over its own batch."""
        return self.device.startswith("cuda")

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict:
        path = self.dir / "status.json"
        return read_json(path) if path.exists() else {"status": "running", "stages": []}

    def stage_done(self, stage: str) -> bool:
        return stage in self.status().get("stages", [])

    def mark(self, stage: str | None = None, **fields) -> None:
        if not is_global_zero():  # rank 0 writes the records
            return
        status = self.status()
        if stage and stage not in status["stages"]:
            status["stages"].append(stage)
        status.update(fields)
        status["updated"] = utc_now()
        atomic_write_json(self.dir / "status.json", status)


def trainer_kwargs(cfg: ExperimentConfig, distributed: bool) -> dict:
    t = cfg.trainer
    kw = {"accelerator": t.accelerator, "precision": t.precision or default_precision()}
    if t.fast_dev_run:  # Lightning's: two batches of each loop, one epoch, no checkpoints
        kw["fast_dev_run"] = 2
    if distributed:
        strategy = t.strategy
        if strategy == "ddp":  # Lightning's, with room for rank 0's evaluation stages
            strategy = DDPStrategy(timeout=timedelta(hours=t.barrier_timeout_hours))
        kw.update(devices=t.devices, strategy=strategy, num_nodes=t.num_nodes)
    else:  # evaluation stages run in this one process on one device
        kw.update(devices=1)
    return kw


def launched_fabric(cfg: ExperimentConfig, precision: str | None = None) -> L.Fabric:
    """A launched Lightning Fabric over the devices and strategy of ``trainer``, at
    ``precision`` (default ``trainer``'s), for a training stage with a loop of its own
    (detection). Under Lightning's launcher it joins the processes (and the process group)
    the Trainer made; launched first, it starts them, as the Trainer would."""
    t = cfg.trainer
    strategy = t.strategy
    if strategy == "ddp":  # the Trainer's timeout (trainer_kwargs)
        strategy = FabricDDPStrategy(timeout=timedelta(hours=t.barrier_timeout_hours))
    fabric = L.Fabric(accelerator=t.accelerator, devices=t.devices, strategy=strategy,
                      num_nodes=t.num_nodes,
                      precision=precision or t.precision or default_precision())
    fabric.launch()
    return fabric


def check_trainer_settings(cfg: ExperimentConfig) -> int:
    """Lightning's verdict on accelerator/devices/strategy/precision, before anything is
    written: a bad combination is a one-line ConfigError, not a traceback mid-run. Returns the
    world size (processes x nodes) the distributed stages train on."""
    try:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, **trainer_kwargs(cfg, distributed=True))
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as err:
        t = cfg.trainer
        raise ConfigError(
            f"trainer (accelerator={t.accelerator}, devices={t.devices}, strategy={t.strategy}, "
            f"precision={t.precision or default_precision()}): {one_line(err)}"
        ) from None
    return int(trainer.world_size)


def accumulation(effective: int | None, batch: int, world: int, key: str) -> int:
    """Gradient-accumulation steps that make ``batch`` x ``world`` x steps = ``effective``
    (the paper's batch on any device count); 1 without an effective batch."""
    if effective is None:
        return 1
    per_step = batch * world
    if effective % per_step:
        raise ConfigError(
            f"{key}: {effective} is not a multiple of the batch per step, {batch} per device x "
            f"{world} device(s) = {per_step}; pick a batch size that divides it")
    return effective // per_step


def schedules(section, key: str = "pretrain"):
    """``(dotted key, Schedule)`` of a method config and of the schedules nested in it
    (UNIP's MAE students)."""
    if section is None:
        return
    yield key, section
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, Schedule):
            yield from schedules(value, f"{key}.{name}")


def check_effective_batches(cfg: ExperimentConfig, world: int) -> None:
    """Every effective batch the config asks for divides into accumulation steps."""
    for key, schedule in schedules(cfg.pretrain):
        accumulation(schedule.effective_batch_size, cfg.data.batch_size, world,
                     f"{key}.effective_batch_size")
    ft = cfg.eval.finetune
    accumulation(ft.effective_batch_size, ft.batch_size, world,
                 "eval.finetune.effective_batch_size")
    det = cfg.eval.detection
    if det is not None and det.enabled and det.batch_size % world:
        raise ConfigError(f"eval.detection.batch_size: {det.batch_size} images (of all "
                          f"devices) do not split over {world} device(s); pick a multiple")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_global_zero() -> bool:
    """Rank 0 of a distributed run (or the only process); under torchrun / SLURM / Lightning's
    launcher before the process group exists, read from the environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return True


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



# -- shared stage helpers ----------------------------------------------------------------


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


def build_encoder(run: Run, drop_path_rate: float = 0.0, model=None) -> torch.nn.Module:
    """The backbone of ``run.cfg.model`` (or of ``model``, a ModelConfig), seeded."""
    m, d = model or run.cfg.model, run.cfg.data
    kwargs = dict(m.backbone_kwargs)
    kwargs.setdefault("img_size", d.image_size)
    kwargs.setdefault("in_chans", d.in_chans)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    L.seed_everything(run.cfg.seed, workers=True, verbose=False)
    try:
        return create_backbone(m.backbone, norm=m.norm, placement=m.placement,
                               norm_options=m.norm_options.get(m.norm), **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.backbone_kwargs: {err}") from None


def resume_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest whole checkpoint; a file cut short by a kill is skipped.

    ``torch.save`` writes a zip archive whose directory sits at its end, so a truncated file
    fails ``is_zipfile`` without being read or unpickled (Lightning then loads the one kept).
    """
    if not ckpt_dir.is_dir():
        return None
    candidates = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((str(path) for path in candidates if zipfile.is_zipfile(path)), None)


def fit_batch_size(run: Run, count: int, batch_size: int, label: str) -> int:
    """The batch a training stage can use on ``count`` samples: ``batch_size``, or all of them
    when there are fewer (said in the log), so no stage trains zero optimizer steps. Fewer than
    two samples is a DataError (batch statistics need two). Under DDP each rank holds
    ``count // world`` of them."""
    count //= world_size()
    if count >= batch_size:
        return batch_size
    if count < 2:
        raise DataError(f"{label}: the training set holds {count} sample(s); a training stage "
                        f"needs at least 2 (batch size {batch_size})")
    run.log(f"{label}: the training set holds {count} samples, fewer than the batch size "
            f"{batch_size}: training with batches of {count}")
    return count


def fit_stage(
    run: Run,
    module: L.LightningModule,
    dm,
    out_dir: Path,
    *,
    epochs: int,
    checkpoint_every_n_steps: int,
    val_every_n_epochs: int = 1,
    callbacks: tuple = (),
    label: str = "pretraining",
    effective_batch_size: int | None = None,
    effective_key: str = "pretrain.effective_batch_size",
    sync_batchnorm: bool = False,
) -> L.Trainer:
    """``trainer.fit`` with step checkpoints in ``out_dir/checkpoints`` (resumed from the newest
    whole one), CSV logs in ``out_dir/logs``; DDP workers leave after fitting.

    ``effective_batch_size`` becomes gradient accumulation over the datamodule's batch and the
    world size (the lr follows the effective batch, as ``main_pretrain.py`` computes it). A
    training set smaller than one batch trains on all of it in one batch (said in the log);
    a fit that still ran no optimizer step is an error, never a finished stage. Every rank
    fits (DDP); the process group stays up for the recipe's later stages.
    """
    train_size = len(dm.train_dataloader().dataset)
    wanted = getattr(module, "batch_size", dm.batch_size)  # the batch the lr is scaled by
    batch = fit_batch_size(run, train_size, wanted, label)
    dm.batch_size = batch
    if hasattr(module, "batch_size"):
        module.batch_size = batch
    kwargs = run.trainer_kwargs(distributed=True)
    world = check_trainer_settings(run.cfg)
    if run.cfg.trainer.fast_dev_run:  # two batches of whatever size the data allows
        effective_batch_size = None
    accumulate = accumulation(effective_batch_size, dm.batch_size, world, effective_key)
    if accumulate > 1:
        run.log(f"{label}: effective batch {dm.batch_size * world * accumulate} = "
                f"{dm.batch_size} x {world} device(s) x {accumulate} accumulation steps")
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step}",
        every_n_train_steps=checkpoint_every_n_steps,
        save_last=True,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        default_root_dir=out_dir,
        logger=L.pytorch.loggers.CSVLogger(out_dir / "logs", name="pretrain", version=""),
        callbacks=[checkpoint, NormSchedules(run.log), *callbacks],
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=val_every_n_epochs,
        accumulate_grad_batches=accumulate,
        sync_batchnorm=sync_batchnorm and run.sync_batchnorm,
        **kwargs,
    )
    resume = resume_checkpoint(ckpt_dir)
    if resume:
        run.log(f"resuming {label} from {resume}")
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    ensure_trained(trainer, label)
    return trainer


def save_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """The pretrained backbone as safetensors, written atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_global_zero():
        return
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def finish(run: Run, results: list[dict], wall_s: float, leaderboard: Path | None,
           epochs: int | None = None) -> dict:
    """Write ``metrics.json`` (the last record of a run) and upsert its leaderboard rows.

    A result may carry its own ``backbone``/``norm``/``placement``/``dataset``/``method``
    (an ablation's entries differ in them); the run's values fill in the rest.
    """
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
        "epochs": epochs,
        "precision": run.precision,
        "device": run.device,
        "wall_s": round(wall_s, 1),
        "timestamp": utc_now(),
        "config_hash": config_hash(to_dict(cfg)),
        "profile": cfg.profile,
        "status": "finished",
        "dry_run": bool(cfg.trainer.fast_dev_run),
        "results": results,
    }
    write_report(run.dir, metrics)  # with the final status and numbers, before the last record
    atomic_write_json(run.dir / "metrics.json", metrics)
    run.mark("metrics", status="finished", finished=metrics["timestamp"],
             dry_run=metrics["dry_run"])
    if leaderboard is not None and not metrics["dry_run"]:  # a dry run's numbers mean nothing
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
    """Run every stage of experiment ``name``; returns the run folder.

    The registry entry's ``recipe`` names its composition of stages
    (``visionbench.runner.recipes.RECIPES``): a recipe takes the run and returns
    ``(results, epochs)`` for ``metrics.json``; its optional preflight checks the data before
    anything is written. Every rank of a distributed run runs the recipe; rank 0 records.
    """
    import time

    from visionbench.runner.recipes import PREFLIGHTS, RECIPES

    entry = get_experiment(name)
    if cfg is not None:
        check_effective_batches(cfg, check_trainer_settings(cfg))
        if entry.recipe in PREFLIGHTS:  # bad data is reported before a run folder exists
            PREFLIGHTS[entry.recipe](cfg)
    run = open_run(resume, name, log) if resume else create_run(entry, cfg, out, log)
    log(f"run folder: {run.dir}")
    started = time.time()
    wall_before = float(run.status().get("wall_s", 0.0))
    run.wall = lambda: wall_before + time.time() - started
    try:
        results, epochs = RECIPES[entry.recipe](run)
        if is_global_zero():
            finish(run, results, run.wall(), leaderboard, epochs)
    except SystemExit:
        raise
    except BaseException as err:
        if is_global_zero():
            run.mark(status="failed", error=one_line(err), wall_s=run.wall())
        raise
    return run.dir

"""The pretrain-then-transfer pipeline of image-classification experiments (``mae``).

Stages: pretraining (Lightning; checkpoints every few steps, resumable), then for each init
(pretrained, random) frozen features cached once -> linear-probe sweep -> kNN, and fine-tune;
their JSONs go to ``evals/<init>/``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visionbench.backbones import load_backbone_weights
from visionbench.data.datamodule import ImageClassificationDataModule
from visionbench.data.synth.shapes import prepare_shapes
from visionbench.errors import ConfigError
from visionbench.evals.features import cached_features
from visionbench.evals.finetune import run_finetune
from visionbench.evals.knn import knn_protocol
from visionbench.evals.linear_probe import linear_probe_sweep
from visionbench.methods import build_method
from visionbench.methods.mae import MAE
from visionbench.norms.schedules import NormSchedules
from visionbench.results.figures import save_reconstruction_figure
from visionbench.results.records import atomic_write_json, read_json
from visionbench.runner.core import (
    EMBEDDED,
    ENCODER_FILE,
    Run,
    accumulation,
    build_encoder,
    fit_stage,
    save_encoder,
)

# -- stages -----------------------------------------------------------------------------------


def datamodule(run: Run, train_kind: str = "mae", batch_size: int | None = None,
               auto_augment: str | None = None, reprob: float = 0.0,
               crop_scale: tuple[float, float] = (0.08, 1.0)):
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
        auto_augment=auto_augment,
        reprob=reprob,
        crop_scale=crop_scale,
    )
    dm.setup()
    return dm


def pretrain_stage(run: Run, dm) -> None:
    """Pretraining with Lightning; saves the encoder (and, for MAE, the reconstruction figure)."""
    p = run.cfg.pretrain
    encoder_file = run.dir / "checkpoints" / ENCODER_FILE
    if run.stage_done("pretrain") and encoder_file.is_file():
        run.log("pretraining already done: skipped")
        return
    model = build_method(run.cfg, build_encoder(run))
    if p.official_weights:
        run.log(model.load_official(p.official_weights))
    fit_stage(run, model, dm, run.dir, epochs=p.epochs,
              checkpoint_every_n_steps=p.checkpoint_every_n_steps,
              val_every_n_epochs=p.val_every_n_epochs,
              effective_batch_size=p.effective_batch_size)
    save_encoder(model.encoder, encoder_file)
    if isinstance(model, MAE):
        reconstruction_figure(run, model, dm)
    run.mark("pretrain")


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
    return run.cfg.pretrain.method  # the method that pretrained it in this run


def evaluation_backbone(run: Run, init: str, drop_path_rate: float = 0.0,
                        finetune: bool = False) -> torch.nn.Module:
    """The backbone of ``init``; for fine-tuning its position embedding is trainable, as
    MAE's ``models_vit.py`` (a plain timm ViT) fine-tunes the pretrained sin-cos values."""
    backbone = build_encoder(run, drop_path_rate)
    if init == "pretrained":
        path = run.cfg.model.weights or run.dir / "checkpoints" / ENCODER_FILE
        report = load_backbone_weights(backbone, path, strict=run.cfg.model.weights is None)
        run.log(report.summary())
    if finetune and getattr(backbone, "pos_embed", None) is not None:
        backbone.pos_embed.requires_grad_(True)
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
        (train_x, train_y), _, (test_x, test_y) = feats["train"], feats["val"], feats["test"]
        if not (out / "linear_probe.json").is_file():
            heads = len(e.linear_probe.lrs) * len(e.linear_probe.weight_decays)
            run.log(f"[{name}] linear probe: {heads} heads trained in one pass")
            probe_sweep(run, feats, dm, out)
        if not (out / "knn.json").is_file():
            run.log(f"[{name}] kNN")
            knn = knn_protocol(train_x, train_y, test_x, test_y, dm.num_classes,
                               k=e.knn.k, temperature=e.knn.temperature,
                               majority_k=e.knn.majority_k)
            atomic_write_json(out / "knn.json", knn)
    ft = e.finetune
    if ft.enabled and not (out / "finetune.json").is_file():
        run.log(f"[{name}] fine-tune, {ft.epochs} epochs")
        result = finetune_stage(run, finetune_datamodule(run), init, out / "finetune_logs")
        atomic_write_json(out / "finetune.json", result)


def finetune_datamodule(run: Run):
    """The training images through MAE's fine-tune transform (``eval.finetune``)."""
    ft = run.cfg.eval.finetune
    return datamodule(run, train_kind="finetune", batch_size=ft.batch_size,
                      auto_augment=ft.auto_augment, reprob=ft.reprob)


def finetune_stage(run: Run, ft_dm, init: str, out_dir: Path, callbacks: tuple = (),
                   keep_model: bool = False) -> dict:
    """``eval.finetune`` (MAE's recipe) of the ``init`` backbone, its effective batch by
    accumulation, the norm schedules bound to it."""
    ft = run.cfg.eval.finetune
    backbone = evaluation_backbone(run, init, ft.drop_path_rate, finetune=True)
    accumulate = accumulation(ft.effective_batch_size, ft.batch_size, 1,
                              "eval.finetune.effective_batch_size")
    return run_finetune(
        backbone,
        ft_dm.train_dataloader(),
        ft_dm.val_dataloader(),
        ft_dm.test_dataloader(),
        ft_dm.num_classes,
        {**ft.model_dump(exclude={"enabled", "batch_size", "drop_path_rate",
                                  "effective_batch_size", "auto_augment", "reprob"}),
         "seed": run.cfg.seed},
        {**run.trainer_kwargs(distributed=False), "accumulate_grad_batches": accumulate},
        out_dir,
        callbacks=(NormSchedules(run.log), *callbacks),
        keep_model=keep_model,
    )


def probe_sweep(run: Run, feats: dict, dm, out: Path) -> dict:
    """The linear-probe grid of ``run.cfg.eval`` on cached ``feats[split] = (x, y)``; its
    result is written to ``out/linear_probe.json``."""
    p = run.cfg.eval.linear_probe
    probe = linear_probe_sweep(
        *feats["train"], *feats["val"], *feats["test"],
        num_classes=dm.num_classes,
        lrs=p.lrs,
        weight_decays=p.weight_decays,
        epochs=p.epochs,
        batch_size=p.batch_size,
        warmup_epochs=p.warmup_epochs,
        seed=run.cfg.seed,
        classes=dm.classes,
        max_extensions=p.max_extensions,
    )
    for extension in probe["extensions"]:
        run.log(f"linear probe: best on the grid's edge ({', '.join(extension['edges'])}); "
                f"extended by lrs {extension['added_lrs']}, weight decays "
                f"{extension['added_weight_decays']}")
    atomic_write_json(out / "linear_probe.json", probe)
    return probe


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


def run_classification(run: Run) -> tuple[list[dict], int]:
    """Every stage of a pretrain-then-transfer classification experiment."""
    dm = datamodule(run)
    if "pretrained" in run.cfg.eval.inits and not run.cfg.model.weights:
        pretrain_stage(run, dm)
        run.mark(wall_s=run.wall())
    for init in run.cfg.eval.inits:
        eval_stage(run, init, dm)
        run.mark(f"eval:{init}", wall_s=run.wall())
    return collect_results(run), run.cfg.pretrain.epochs

"""The resize-and-normalization protocol of remote-sensing encoders (``rs-protocol``):
for each encoder (``eval.inits``: this run's MAE-pretrained multispectral encoder or
``model.weights``, and random init; with ``rs_protocol.softcon``, a SoftCon-pretrained one,
init ``softcon``, pretrained on the ``softcon`` experiment's scenes), each data set
(``rs_protocol.datasets``), each input size (native and the pretraining size) and each
normalization, frozen features of the train and test splits -> kNN-5 and the
logistic-regression probe (``evals/rs_protocol.py``). Every cell is a leaderboard row whose
``variant`` names size, interpolation and normalization; a figure of the grid and the
report's table.

Data: the embedded EuroSAT-MS and BigEarthNet-S2 sets (``data.synth`` tiles a class; the
BigEarthNet splits hold that many x 10 patches), or ``--data-root`` with one folder per data
set, named as ``rs_protocol.datasets`` names it (``eurosat-ms/``, ``bigearthnet/``,
``so2sat/``), each in its official layout."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from visionbench.backbones import backbone_family
from visionbench.data.multispectral.bands import RGB_BANDS
from visionbench.data.multispectral.datamodule import (
    MultispectralDataModule,
    MultispectralEvalTransform,
    MultispectralTrainTransform,
)
from visionbench.data.multispectral.synthetic import (
    EUROSAT_CLASSES,
    prepare_bigearthnet,
    prepare_eurosat_ms,
)
from visionbench.errors import ConfigError, DataError
from visionbench.evals import rs_protocol as rs
from visionbench.evals.features import cached_features, pooled_features
from visionbench.methods import method_class
from visionbench.results.figures import save_rs_grid_figure
from visionbench.results.records import atomic_write_json, read_json
from visionbench.results.rows import rows_from_result
from visionbench.runner import stages
from visionbench.runner.core import ENCODER_FILE, Run, is_global_zero
from visionbench.runner.recipes.softcon import check_pretraining_scenes, pretraining_datamodule

PRETRAIN_DATASET = "eurosat-ms"  # the embedded pretraining images: its train split


def data_root(run: Run, dataset: str) -> Path:
    d = run.cfg.data
    if d.root is not None:
        root = Path(d.root) / dataset
        if not root.is_dir():
            raise DataError(f"{root}: no folder for data set {dataset} under --data-root "
                            "(expected one folder per data set of rs_protocol.datasets)")
        return root
    s = d.synth
    if dataset == "eurosat-ms":
        return prepare_eurosat_ms(s.train_per_class, s.val_per_class, s.test_per_class,
                                  seed=run.cfg.seed)
    if dataset == "bigearthnet":
        n = len(EUROSAT_CLASSES)
        return prepare_bigearthnet(n * s.train_per_class, n * s.val_per_class,
                                   n * s.test_per_class, seed=run.cfg.seed)
    raise ConfigError(f"rs_protocol.datasets: {dataset} has no embedded generator; pass "
                      "--data-root")


def check_rs_data(cfg) -> None:
    """Before a run folder exists: a pretrained init has an encoder to come from, and each
    data set's layout under ``--data-root`` reads."""
    if cfg.rs_protocol is None:
        raise ConfigError("the rs_protocol recipe needs an 'rs_protocol' section")
    if "pretrained" in cfg.eval.inits and not cfg.model.weights and cfg.pretrain is None:
        raise ConfigError("eval.inits has 'pretrained' but there is no model.weights (a local "
                          "weights file) and no 'pretrain' section")
    want = 3 if cfg.rs_protocol.bands == "rgb" else 13
    if cfg.data.in_chans != want:
        raise ConfigError(f"rs_protocol.bands {cfg.rs_protocol.bands!r} reads {want} bands, but "
                          f"data.in_chans is {cfg.data.in_chans}")
    if cfg.data.root is None:
        return
    for dataset in cfg.rs_protocol.datasets:
        root = Path(cfg.data.root) / dataset
        if not root.is_dir():
            raise DataError(f"{root}: no folder for data set {dataset} under --data-root")
        MultispectralDataModule(root, dataset).setup()
    if cfg.rs_protocol.softcon is not None:
        families = method_class("softcon").families
        if backbone_family(cfg.model.backbone) not in families:
            raise ConfigError(f"rs_protocol.softcon: softcon pretrains the families "
                              f"{', '.join(families)}, not {cfg.model.backbone}")
        check_pretraining_scenes(cfg)


class GridInput(nn.Module):
    """An encoder reading raw digital numbers through one cell's normalization and resize."""

    def __init__(self, backbone: nn.Module, normalization: str, size: int, pooling: str,
                 data_stats, pretrain_stats, pretrain_scale: float, last_k: int = 4) -> None:
        super().__init__()
        grid = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        if grid is not None and tuple(grid) != (size, size):
            # a ViT at another size: its position embedding resampled (timm), a copy
            backbone = copy.deepcopy(backbone)
            backbone.set_input_size(img_size=size)
        self.backbone, self.normalization, self.size = backbone, normalization, size
        self.pooling, self.last_k, self.data_stats = pooling, last_k, data_stats
        self.pretrain_stats, self.pretrain_scale = pretrain_stats, pretrain_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rs.normalize(images.float(), self.normalization, data_stats=self.data_stats,
                         pretrain_stats=self.pretrain_stats, pretrain_scale=self.pretrain_scale)
        return pooled_features(self.backbone, rs.resize(x, self.size), self.pooling,
                               self.last_k)


def data_statistics(run: Run, dataset: str, dm: MultispectralDataModule):
    """Per-band mean / std of the train split (digital numbers), accumulated batch by batch
    once, on rank 0 (a stage)."""
    path = run.dir / "evals" / "rs_protocol" / dataset / "train_stats.json"

    def fit() -> None:
        loader = stages.limited(dm.eval_dataloader("train"), run)
        mean, std = rs.channel_stats(batch["image"] for batch in loader)
        atomic_write_json(path, {"mean": mean.tolist(), "std": std.tolist()})

    stages.stage(run, f"rs:{dataset}:train statistics", path, fit)
    stats = read_json(path)
    return torch.tensor(stats["mean"]), torch.tensor(stats["std"])


def score_cell(run: Run, init: str, train, test, num_classes: int,
               multi_label: bool) -> dict:
    p, seed = run.cfg.rs_protocol, run.cfg.seed
    train_x, test_x = train[0], test[0]
    if init in p.standard_scale:
        train_x, test_x = rs.standard_scale(train_x, test_x)
    result = {f"knn{p.k}": rs.knn_scores(train_x, train[1], test_x, test[1], num_classes,
                                        p.k, multi_label, seed)}
    if p.linear_probe:
        if not multi_label and len(torch.unique(train[1])) < 2:  # e.g. a dry run's 2 batches
            run.log("logistic probe skipped: the training features hold one class")
        else:
            result["logistic"] = rs.logistic_probe(train_x, train[1], test_x, test[1],
                                                   multi_label, seed=seed)
    return result


def cell_result(run: Run, init: str, dm: MultispectralDataModule, cell: GridInput,
                out: Path, label: str) -> dict:
    """One cell's scores: features of train and test (cached), kNN and the probe; a stage,
    skipped on resume once ``out/result.json`` exists."""
    def fit() -> None:
        run.log(f"[{label}]")
        train, test = (cached_features(out / f"{split}.pt", cell,
                                       stages.limited(dm.eval_dataloader(split), run),
                                       pooling=cell.pooling, last_k=run.cfg.eval.last_k,
                                       device=stages.device(run))
                       for split in ("train", "test"))
        atomic_write_json(out / "result.json",
                          score_cell(run, init, train, test, dm.num_classes, dm.multi_label))

    stages.stage(run, f"rs:{label}", out / "result.json", fit)
    return read_json(out / "result.json")


def run_rs_protocol(run: Run) -> tuple[list[dict], int | None]:
    cfg = run.cfg
    p = cfg.rs_protocol
    if p is None:
        raise ConfigError(f"{run.entry.config}: the rs_protocol recipe needs an 'rs_protocol' "
                          "section")
    encoder_file = run.dir / "checkpoints" / ENCODER_FILE
    pretrains = "pretrained" in cfg.eval.inits and not cfg.model.weights
    if pretrains:
        if cfg.pretrain is None:
            raise ConfigError("eval.inits has 'pretrained' but neither model.weights nor a "
                              "'pretrain' section")
        d = cfg.data
        dm = MultispectralDataModule(
            data_root(run, PRETRAIN_DATASET), PRETRAIN_DATASET,
            bands=RGB_BANDS if p.bands == "rgb" else None, batch_size=d.batch_size,
            num_workers=d.num_workers, seed=cfg.seed,
            train_transform=MultispectralTrainTransform(d.image_size, d.mean, d.std),
            eval_transform=MultispectralEvalTransform(d.image_size, d.mean, d.std))
        stages.pretrain(run, cfg.pretrain, dm, run.dir, encoder_file=encoder_file)
    encoders = {init: encoder_file for init in cfg.eval.inits}
    if p.softcon is not None:
        encoders["softcon"] = run.dir / "softcon" / ENCODER_FILE
        stages.pretrain(run, p.softcon, pretraining_datamodule(run, p.softcon),
                        run.dir / "softcon", label="softcon pretraining",
                        key="rs_protocol.softcon", encoder_file=encoders["softcon"])
    pretrain_stats = (p.pretrain_mean or cfg.data.mean, p.pretrain_std or cfg.data.std)
    rows, grids, metric_names = [], {}, {}
    for dataset in p.datasets:
        dm = MultispectralDataModule(data_root(run, dataset), dataset,
                                     bands=RGB_BANDS if p.bands == "rgb" else None,
                                     batch_size=p.batch_size, num_workers=cfg.data.num_workers,
                                     seed=cfg.seed)
        dm.setup()
        native = int(dm.splits.train[0]["image"].shape[-1])  # the data set's own size
        sizes = p.sizes or sorted({native, cfg.data.image_size})
        data_stats = data_statistics(run, dataset, dm)
        metric_names[dataset] = "micro mAP (%)" if dm.multi_label else "top-1 (%)"
        for init, file in encoders.items():
            name = "softcon" if init == "softcon" else stages.init_name(run, init)
            backbone = (stages.load_encoder(run, file) if init == "softcon" else
                        stages.evaluation_backbone(run, init, encoder_file=file))
            for size in sizes:
                for norm in p.normalizations:
                    out = run.dir / "evals" / "rs_protocol" / dataset / name / f"{size}_{norm}"
                    # SoftCon pretrained here on (x - data.mean) / data.std
                    stats, scale = (((cfg.data.mean, cfg.data.std), 1.0) if init == "softcon"
                                    else (pretrain_stats, p.pretrain_scale))
                    cell = GridInput(backbone, norm, size, cfg.eval.pooling, data_stats,
                                     stats, scale, cfg.eval.last_k)
                    result = cell_result(run, "random" if init == "random" else "pretrained",
                                         dm, cell, out,
                                         f"{name}:{dataset}:{size}:{norm}")
                    variant = rs.cell_variant(size, native, norm, p.bands)
                    for protocol, scores in result.items():
                        for row in rows_from_result(scores, init=name, protocol=protocol,
                                                    variant=variant, seed=cfg.seed):
                            rows.append({**row, "dataset": dataset})
                    knn = result[f"knn{p.k}"]
                    grids.setdefault(dataset, {}).setdefault(name, {})[(str(size), norm)] = (
                        knn["map_micro"] if dm.multi_label else knn["top1"])
    if is_global_zero():
        save_rs_grid_figure(run.dir / "figures" / "rs_protocol_grid.png", grids, metric_names)
    return rows, cfg.pretrain.epochs if pretrains else None

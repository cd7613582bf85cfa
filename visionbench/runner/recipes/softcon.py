"""The SoftCon experiment (``softcon``): SoftCon pretraining on multi-label scenes (their
land-cover labels guide the soft contrastive term), then for each init (pretrained or
``model.weights``, random) the frozen-backbone evaluations of the paper's tables:
BigEarthNet's linear protocol on a label fraction of its train split (10 %), EuroSAT's
linear protocol (SSL4EO-S12's scripts, ``evals/ssl4eo_linear.py``) and EuroSAT kNN-``k``
(``evals/rs_protocol.knn_scores``).

Data: the embedded scenes (pretraining: BigEarthNet-layout patches generated with seed
``seed + 1``, so none is an evaluation patch, their CORINE labels collapsed to Dynamic World's
9 classes; evaluation: the embedded BigEarthNet and EuroSAT-MS sets), or under
``--data-root``: ``ssl4eo-s12-ml/`` (a GeoTIFF folder whose ``train.csv`` lists each scene's
labels, or a BigEarthNet layout), ``bigearthnet/`` and ``eurosat-ms/`` in their official
layouts. Every encoder reads digital numbers standardized with ``data.mean`` / ``data.std``
(the pretraining's statistics)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from visionbench.config import SoftConExperimentConfig
from visionbench.data.multispectral.datamodule import (
    MultispectralDataModule,
    MultispectralEvalTransform,
)
from visionbench.data.multispectral.landcover import label_map
from visionbench.data.multispectral.synthetic import prepare_bigearthnet, prepare_eurosat_ms
from visionbench.errors import ConfigError, DataError
from visionbench.evals import rs_protocol as rs
from visionbench.evals.features import cached_features, pooled_features
from visionbench.evals.ssl4eo_linear import (
    LinearSpec,
    random_subset_indices,
    train_linear,
    transforms,
)
from visionbench.methods import method_class
from visionbench.results.records import atomic_write_json, read_json
from visionbench.results.rows import rows_from_result
from visionbench.runner import stages
from visionbench.runner.core import ENCODER_FILE, Run

PRETRAIN_FOLDER = "ssl4eo-s12-ml"


def _root(run: Run, dataset: str) -> Path:
    """``--data-root/<dataset>`` or the embedded set."""
    cfg, s = run.cfg, run.cfg.data.synth
    if cfg.data.root is not None:
        root = Path(cfg.data.root) / dataset
        if not root.is_dir():
            raise DataError(f"{root}: no folder for {dataset} under --data-root")
        return root
    p = cfg.softcon or SoftConExperimentConfig()
    if dataset == PRETRAIN_FOLDER:
        return prepare_bigearthnet(p.pretrain_samples, s.val_per_class, s.test_per_class,
                                   seed=cfg.seed + 1)
    if dataset == "bigearthnet":
        return prepare_bigearthnet(p.bigearthnet_train, 10 * s.val_per_class,
                                   10 * s.test_per_class, seed=cfg.seed)
    return prepare_eurosat_ms(s.train_per_class, s.val_per_class, s.test_per_class,
                              seed=cfg.seed)


def _pretrain_layout(run: Run) -> str:
    """The pretraining folder's layout: the embedded scenes are BigEarthNet patches."""
    if run.cfg.data.root is None:
        return "bigearthnet"
    return (run.cfg.softcon or SoftConExperimentConfig()).pretrain_dataset


def check_softcon_data(cfg) -> None:
    """Before a run folder exists: the sections are there and the layouts read."""
    if cfg.softcon is None:
        raise ConfigError("the softcon recipe needs a 'softcon' section")
    if "pretrained" in cfg.eval.inits and not cfg.model.weights:
        if cfg.pretrain is None or cfg.pretrain.method != "softcon":
            raise ConfigError("eval.inits has 'pretrained': the softcon recipe needs "
                              "pretrain.method softcon or model.weights")
    if cfg.data.in_chans != 13:
        raise ConfigError(f"softcon reads the 13 Sentinel-2 bands; data.in_chans is "
                          f"{cfg.data.in_chans}")
    if cfg.data.root is None:
        return
    if "pretrained" in cfg.eval.inits and not cfg.model.weights:
        check_pretraining_scenes(cfg)
    for name in ["bigearthnet"] + (["eurosat-ms"] if cfg.softcon.eurosat else []):
        root = Path(cfg.data.root) / name
        if not root.is_dir():
            raise DataError(f"{root}: no folder for {name} under --data-root")
        MultispectralDataModule(root, name).setup()


def check_pretraining_scenes(cfg) -> None:
    """``--data-root/ssl4eo-s12-ml`` reads, holds multi-label scenes, and its labels map to
    ``softcon.label_space`` (nothing to check for the embedded scenes)."""
    if cfg.data.root is None:
        return
    settings = cfg.softcon or SoftConExperimentConfig()
    root = Path(cfg.data.root) / PRETRAIN_FOLDER
    if not root.is_dir():
        raise DataError(f"{root}: no folder for {PRETRAIN_FOLDER} under --data-root")
    layout = settings.pretrain_dataset
    dm = MultispectralDataModule(root, layout, multi_label_csv=layout == "geotiff")
    dm.setup()
    if not dm.multi_label:
        raise ConfigError(f"softcon.pretrain_dataset {layout}: SoftCon pretrains on "
                          "multi-label scenes")
    label_map(dm.splits.classes, settings.label_space)


def pretraining_datamodule(run: Run, section=None) -> MultispectralDataModule:
    """The pretraining scenes with the two-view transform of ``section`` (default
    ``cfg.pretrain``) and their labels mapped to ``softcon.label_space``."""
    cfg = run.cfg
    settings = cfg.softcon or SoftConExperimentConfig()
    layout = _pretrain_layout(run)
    dm = MultispectralDataModule(_root(run, PRETRAIN_FOLDER), layout,
                                 batch_size=cfg.data.batch_size,
                                 num_workers=cfg.data.num_workers, seed=cfg.seed,
                                 multi_label_csv=layout == "geotiff",
                                 in_memory=settings.in_memory,
                                 eval_transform=MultispectralEvalTransform(
                                     cfg.data.image_size, cfg.data.mean, cfg.data.std))
    dm.setup()
    if not dm.multi_label:
        raise ConfigError(f"softcon.pretrain_dataset {layout}: SoftCon pretrains on "
                          "multi-label scenes")
    matrix = label_map(dm.splits.classes, settings.label_space)
    dm.train_transform = method_class("softcon").train_transform(section or cfg.pretrain,
                                                                 cfg.data, matrix)
    classes = len(dm.splits.classes) if matrix is None else matrix.shape[1]
    run.log(f"pretraining scenes: {len(dm.splits.train)} at {dm.root}, labels in "
            f"{settings.label_space} ({classes} classes)")
    return dm


class Standardized(torch.nn.Module):
    """The frozen encoder on digital numbers: ``(x - mean) / std``, then its pooled
    feature."""

    def __init__(self, backbone: torch.nn.Module, mean, std, pooling: str) -> None:
        super().__init__()
        self.backbone, self.pooling = backbone, pooling
        self.stats = (list(mean), list(std))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rs.normalize(images.float(), "pretrain", pretrain_stats=self.stats)
        return pooled_features(self.backbone, x, self.pooling)


class TestView:
    """A sample's ``image`` through the linear protocol's test transform (resize to
    ``size x 256 / 224``, centre crop ``size``): the kNN's inputs."""

    def __init__(self, size: int) -> None:
        self.transform = transforms(LinearSpec(size=size))[1]

    def __call__(self, sample: dict) -> dict:
        return {**sample, "image": self.transform(sample["image"].float())}


def _linear(run: Run, encoder: Standardized, dm, spec: LinearSpec, out: Path,
            label: str) -> dict:
    def fit() -> None:
        run.log(f"[{label}] linear protocol: {len(dm.splits.train)} training samples, "
                f"{spec.epochs} epochs")
        splits = dm.splits
        bands = int(splits.train[0]["image"].shape[0])
        probe = torch.zeros(1, bands, spec.size, spec.size, device=stages.device(run))
        dim = int(encoder(probe).shape[1])
        atomic_write_json(out, train_linear(encoder, dim, splits.train, splits.test,
                                            dm.num_classes, dm.multi_label, spec,
                                            device=stages.device(run), log=run.log))

    stages.stage(run, label, out, fit)
    return read_json(out)


def _knn(run: Run, encoder: Standardized, dm, out: Path, label: str) -> dict:
    def fit() -> None:
        train, test = (cached_features(out.parent / f"knn_{split}.pt", encoder,
                                       stages.limited(dm.eval_dataloader(split), run),
                                       device=stages.device(run))
                       for split in ("train", "test"))
        atomic_write_json(out, rs.knn_scores(train[0], train[1], test[0], test[1],
                                             dm.num_classes, run.cfg.softcon.k,
                                             dm.multi_label, run.cfg.seed))

    stages.stage(run, label, out, fit)
    return read_json(out)


def run_softcon(run: Run) -> tuple[list[dict], int | None]:
    cfg = run.cfg
    p = cfg.softcon
    if p is None:
        raise ConfigError(f"{run.entry.config}: the softcon recipe needs a 'softcon' section")
    encoder_file = run.dir / "checkpoints" / ENCODER_FILE
    pretrains = "pretrained" in cfg.eval.inits and not cfg.model.weights
    if pretrains:
        stages.pretrain(run, cfg.pretrain, pretraining_datamodule(run), run.dir,
                        encoder_file=encoder_file)
    lin = p.linear
    be = MultispectralDataModule(_root(run, "bigearthnet"), "bigearthnet",
                                 batch_size=p.batch_size, num_workers=cfg.data.num_workers,
                                 seed=lin.seed, in_memory=p.in_memory,
                                 train_subset=partial(random_subset_indices,
                                                      fraction=p.bigearthnet_fraction,
                                                      seed=lin.seed))
    be.setup()
    evaluations = [("bigearthnet", be, "linear", LinearSpec(
        lin.epochs, lin.lr, lin.momentum, lin.batch_size, tuple(lin.milestones),
        cfg.data.image_size, lin.bigearthnet_crop_scale, lin.seed))]
    if p.eurosat:
        eu = MultispectralDataModule(_root(run, "eurosat-ms"), "eurosat-ms",
                                     batch_size=p.batch_size,
                                     num_workers=cfg.data.num_workers, seed=cfg.seed,
                                     eval_transform=TestView(cfg.data.image_size),
                                     in_memory=p.in_memory)
        eu.setup()
        evaluations += [("eurosat-ms", eu, "linear", LinearSpec(
            lin.epochs, lin.lr, lin.momentum, lin.batch_size, tuple(lin.milestones),
            cfg.data.image_size, lin.eurosat_crop_scale, lin.seed)),
            ("eurosat-ms", eu, f"knn{p.k}", None)]
    if cfg.trainer.fast_dev_run:  # a dry run: one epoch of each linear protocol
        evaluations = [(d, dm, protocol, spec if spec is None else replace(spec, epochs=1))
                       for d, dm, protocol, spec in evaluations]
    fraction = {"bigearthnet": f"{p.bigearthnet_fraction:g}", "eurosat-ms": "1"}
    rows = []
    for init in cfg.eval.inits:
        name = stages.init_name(run, init)
        backbone = stages.evaluation_backbone(run, init, encoder_file=encoder_file).eval()
        backbone.requires_grad_(False)
        encoder = Standardized(backbone, cfg.data.mean, cfg.data.std,
                               cfg.eval.pooling).to(stages.device(run))
        for dataset, dm, protocol, spec in evaluations:
            out = run.dir / "evals" / "softcon" / name / f"{dataset}_{protocol}.json"
            label = f"softcon:{name}:{dataset}:{protocol}"
            result = (_linear(run, encoder, dm, spec, out, label) if spec is not None
                      else _knn(run, encoder, dm, out, label))
            variant = {"fraction": fraction[dataset], "modality": "ms",
                       "size": str(cfg.data.image_size)}
            for row in rows_from_result(result, init=name, protocol=protocol,
                                        variant=variant, seed=cfg.seed):
                rows.append({**row, "dataset": dataset})
    return rows, cfg.pretrain.epochs if pretrains else None

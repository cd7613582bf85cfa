"""Reusable stages: each declares its output, is skipped on ``--resume`` when that output
exists, writes it atomically, and marks the run's status, in ``stage``.

Distributed runs (``--devices N --strategy ddp``, torchrun, SLURM) run the whole recipe on
every rank: a training stage fits on all ranks (Lightning's DDP) and rank 0 writes its output;
an evaluation stage runs on rank 0 while the other ranks wait at a barrier. Whether a stage
is skipped is rank 0's decision, broadcast to the others, so all ranks take the same path.

The stages here are the ones every pretrain-then-transfer recipe shares: the method's
pretraining, frozen features -> linear-probe sweep and kNN, and the fine-tune. Recipes
(``runner/recipes/``) compose them with their experiment's own stages.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Subset

from visionbench.backbones import load_backbone_weights
from visionbench.backbones.sealed import input_spec, seal
from visionbench.config import label_percent
from visionbench.data.datamodule import ImageClassificationDataModule
from visionbench.data.images.scenes import SCENE_CLASSES, prepare_scenes
from visionbench.data.images.shapes import prepare_shapes
from visionbench.data.images.voc import VOC_CLASSES, VOCDetection
from visionbench.distributed import agree, barrier, rank_local
from visionbench.errors import ConfigError
from visionbench.evals.detection import detection_ci, run_detection
from visionbench.evals.features import cached_features
from visionbench.evals.finetune import run_finetune, test_scores
from visionbench.evals.knn import knn_protocol
from visionbench.evals.linear_probe import linear_probe_sweep
from visionbench.evals.logistic import logistic_protocol
from visionbench.evals.supervised import run_supervised, score_supervised
from visionbench.methods import build_method, method_class
from visionbench.norms.schedules import NormSchedules
from visionbench.results.records import atomic_write_json, read_json
from visionbench.results.rows import rows_from_result
from visionbench.runner.core import (
    EMBEDDED,
    ENCODER_FILE,
    Run,
    accumulation,
    build_encoder,
    check_trainer_settings,
    fit_stage,
    is_global_zero,
    launched_fabric,
    save_encoder,
)


def stage(run: Run, name: str, output: Path, fn: Callable[[], object], *,
          train: bool = False) -> bool:
    """Run ``fn`` unless ``output`` exists (then it is a done stage, skipped on resume).

    ``train``: ``fn`` fits on every rank (and writes ``output`` on rank 0 only); otherwise
    ``fn`` runs on rank 0 while the others wait. Returns whether ``fn`` ran.
    """
    if agree(Path(output).exists()):
        run.log(f"{name}: done ({output.relative_to(run.dir)}), skipped")
        return False
    if train:
        fn()
    elif is_global_zero():
        with rank_local():
            fn()
    barrier()
    if is_global_zero():
        if not Path(output).exists():
            raise RuntimeError(f"stage {name} finished without writing {output}")
        run.mark(name, wall_s=run.wall())
    return True


def limited(loader, run: Run):
    """``loader``, cut to two batches in a ``--fast-dev-run``."""
    if not run.cfg.trainer.fast_dev_run:
        return loader
    return list(itertools.islice(loader, 2))


# -- data ---------------------------------------------------------------------------------------


def image_datamodule(run: Run, train_kind: str = "mae", batch_size: int | None = None,
                     auto_augment: str | None = None, reprob: float = 0.0,
                     crop_scale: tuple[float, float] = (0.08, 1.0),
                     train_transform=None,
                     label_fraction: float = 1.0) -> ImageClassificationDataModule:
    """The labelled image set of ``run.cfg.data`` (``--data-root``, or the embedded
    ``shapes`` written once to the cache), with ``train_transform`` (a method's) or the image
    transform of ``train_kind``."""
    d = run.cfg.data
    if d.root is None:
        if d.dataset not in EMBEDDED:
            raise ConfigError(f"data.dataset {d.dataset!r} has no embedded generator; "
                              "pass --data-root or use dataset 'shapes'")
        run.log("preparing the embedded 'shapes' data set (written once to the cache)")
        root = prepare_shapes(image_size=d.image_size, seed=run.cfg.seed,
                              train_per_class=d.synth.train_per_class,
                              val_per_class=d.synth.val_per_class,
                              test_per_class=d.synth.test_per_class)
    else:
        root = Path(d.root)
    dm = ImageClassificationDataModule(
        root=root, image_size=d.image_size, in_chans=d.in_chans, mean=d.mean, std=d.std,
        batch_size=batch_size or d.batch_size, num_workers=d.num_workers,
        val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=run.cfg.seed,
        train_kind=train_kind, auto_augment=auto_augment, reprob=reprob, crop_scale=crop_scale,
        train_transform=train_transform, label_fraction=label_fraction)
    dm.setup()
    return dm


def method_datamodule(run: Run, section) -> ImageClassificationDataModule:
    """The image set with the pretraining method's own train transform."""
    return image_datamodule(run, train_transform=method_class(section.method).train_transform(
        section, run.cfg.data))


# -- pretraining --------------------------------------------------------------------------------


def pretrain(run: Run, section, dm, out: Path, *, model=None, label: str = "pretraining",
             key: str = "pretrain", callbacks: tuple = (), after=None,
             encoder_file: Path | None = None, **method_kwargs) -> Path:
    """Pretrain the backbone of ``model`` (default ``run.cfg.model``) with the method config
    ``section``, logs and step checkpoints under ``out``; the encoder goes to
    ``encoder_file`` (default ``out/encoder.safetensors``, returned). ``after(module)`` runs
    on rank 0 before the encoder is saved (figures, records)."""
    encoder_file = encoder_file or out / ENCODER_FILE
    model = model or run.cfg.model

    def fit() -> None:
        module = build_method(section, build_encoder(run, model=model), model, run.cfg.data,
                              **method_kwargs)
        if getattr(section, "official_weights", None):
            run.log(module.load_official(section.official_weights))
        if getattr(module, "init_report", None):
            run.log(module.init_report)
        run.log(f"[{label}] {section.method}, {section.epochs} epochs")
        fit_stage(run, module, dm, out, epochs=section.epochs,
                  checkpoint_every_n_steps=section.checkpoint_every_n_steps,
                  val_every_n_epochs=section.val_every_n_epochs, callbacks=callbacks,
                  label=label, effective_batch_size=section.effective_batch_size,
                  effective_key=f"{key}.effective_batch_size",
                  sync_batchnorm=getattr(module, "sync_batchnorm", False))
        if is_global_zero():
            if after is not None:
                after(module)
            save_encoder(module.encoder, encoder_file)

    stage(run, label, encoder_file, fit, train=True)
    return encoder_file


def load_encoder(run: Run, path: Path, model=None, strict: bool = True) -> torch.nn.Module:
    encoder = build_encoder(run, model=model)
    load_backbone_weights(encoder, path, strict=strict)
    return encoder


# -- transfer -----------------------------------------------------------------------------------


def init_name(run: Run, init: str) -> str:
    if init == "random":
        return "random"
    if run.cfg.model.weights:
        return Path(run.cfg.model.weights).name
    return run.cfg.pretrain.method  # the method that pretrained it in this run


def evaluation_backbone(run: Run, init: str, drop_path_rate: float = 0.0,
                        finetune: bool = False, encoder_file: Path | None = None,
                        model=None) -> torch.nn.Module:
    """The backbone of ``init``: random, ``model.weights``, or the run's pretrained encoder
    (``encoder_file``, default ``checkpoints/encoder.safetensors``). For fine-tuning its
    position embedding, where it is a parameter, is trainable, as MAE's ``models_vit.py``
    (a plain timm ViT) fine-tunes the pretrained sin-cos values; the video ViT's fixed
    table stays fixed, as VideoMAE's fine-tune keeps it."""
    backbone = build_encoder(run, drop_path_rate, model=model)
    if init == "pretrained":
        path = run.cfg.model.weights or encoder_file or run.dir / "checkpoints" / ENCODER_FILE
        report = load_backbone_weights(backbone, path, strict=run.cfg.model.weights is None)
        run.log(report.summary())
    if finetune and isinstance(getattr(backbone, "pos_embed", None), torch.nn.Parameter):
        backbone.pos_embed.requires_grad_(True)  # a fixed table held as a buffer stays fixed
    return backbone


def device(run: Run) -> str:
    return "cuda" if run.device.startswith("cuda") else "cpu"


def sealed_backbone(backbone: torch.nn.Module, dm) -> torch.nn.Module:
    """``backbone`` with its input normalization sealed in: the one a protocol sealed
    already, else the data's (``dm.input_spec``), so it reads ``dm``'s raw loaders."""
    return backbone if input_spec(backbone) is not None else seal(backbone, dm.input_spec)


def features(run: Run, name: str, backbone_fn: Callable[[], torch.nn.Module], dm,
             folder: Path) -> dict:
    """Frozen features of every split, cached once in ``folder/<split>.pt``. The encoder
    carries its input normalization (``sealed_backbone``) and reads unnormalized images."""
    e = run.cfg.eval
    backbone = None
    feats = {}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.pt"
        if backbone is None and not path.is_file():
            backbone = sealed_backbone(backbone_fn(), dm).to(device(run))
        run.log(f"[{name}] features of the {split} split")
        loader = limited(dm.eval_dataloader(split, raw=True), run)
        feats[split] = cached_features(path, backbone, loader, e.pooling, e.last_k, device(run))
    return feats


def probe_sweep(run: Run, feats: dict, dm) -> dict:
    """The linear-probe grid of ``run.cfg.eval`` on cached ``feats[split] = (x, y)``."""
    p = run.cfg.eval.linear_probe
    probe = linear_probe_sweep(
        *feats["train"], *feats["val"], *feats["test"], num_classes=dm.num_classes,
        lrs=p.lrs, weight_decays=p.weight_decays, epochs=p.epochs, batch_size=p.batch_size,
        warmup_epochs=p.warmup_epochs, seed=run.cfg.seed, classes=dm.classes,
        max_extensions=p.max_extensions)
    for extension in probe["extensions"]:
        run.log(f"linear probe: best on the grid's edge ({', '.join(extension['edges'])}); "
                f"extended by lrs {extension['added_lrs']}, weight decays "
                f"{extension['added_weight_decays']}")
    return probe


def frozen_stage(run: Run, protocol: str, name: str, backbone_fn, dm, out: Path,
                 score: Callable[[dict], dict], features_dir: Path | None = None) -> None:
    """Stage ``<protocol>:<name>``: ``score`` on the frozen features of every split (cached
    in ``features_dir``, by default ``features/<name>``), written to ``out/<protocol>.json``."""
    folder = features_dir or run.dir / "features" / name

    def fit() -> None:
        atomic_write_json(out / f"{protocol}.json",
                          score(features(run, name, backbone_fn, dm, folder)))

    stage(run, f"{protocol}:{name}", out / f"{protocol}.json", fit)


def linear_probe(run: Run, name: str, backbone_fn, dm, out: Path,
                 features_dir: Path | None = None) -> None:
    """Stage: the linear-probe sweep on frozen features (``out/linear_probe.json``)."""
    p = run.cfg.eval.linear_probe

    def score(feats: dict) -> dict:
        run.log(f"[{name}] linear probe: {len(p.lrs) * len(p.weight_decays)} heads in one pass")
        return probe_sweep(run, feats, dm)

    frozen_stage(run, "linear_probe", name, backbone_fn, dm, out, score, features_dir)


def knn(run: Run, name: str, backbone_fn, dm, out: Path,
        features_dir: Path | None = None) -> None:
    """Stage: weighted and majority kNN on frozen features (``out/knn.json``)."""
    k = run.cfg.eval.knn

    def score(feats: dict) -> dict:
        run.log(f"[{name}] kNN")
        return knn_protocol(*feats["train"], *feats["test"], dm.num_classes, k=k.k,
                            temperature=k.temperature, majority_k=k.majority_k)

    frozen_stage(run, "knn", name, backbone_fn, dm, out, score, features_dir)


def logistic(run: Run, name: str, backbone_fn, dm, out: Path,
             features_dir: Path | None = None) -> None:
    """Stage: the logistic-regression probe on frozen features (``out/logistic.json``)."""
    p = run.cfg.eval.logistic

    def score(feats: dict) -> dict:
        run.log(f"[{name}] logistic regression, C in {', '.join(f'{c:g}' for c in p.cs)}")
        return logistic_protocol(*feats["train"], *feats["val"], *feats["test"],
                                 dm.num_classes, cs=p.cs, max_iter=p.max_iter,
                                 seed=run.cfg.seed)

    frozen_stage(run, "logistic", name, backbone_fn, dm, out, score, features_dir)


def finetune_datamodule(run: Run, label_fraction: float = 1.0) -> ImageClassificationDataModule:
    """The training images (``label_fraction`` of them, class-stratified) through MAE's
    fine-tune transform (``eval.finetune``)."""
    ft = run.cfg.eval.finetune
    return image_datamodule(run, train_kind="finetune", batch_size=ft.batch_size,
                            auto_augment=ft.auto_augment, reprob=ft.reprob,
                            label_fraction=label_fraction)


def finetune_file(fraction: float) -> str:
    """The fine-tune result of one label fraction: ``finetune.json`` with every label,
    ``finetune_labels5.json`` with 5 % of them."""
    return "finetune.json" if fraction == 1.0 else \
        f"finetune_labels{label_percent(fraction)[:-1]}.json"


def finetune_variant(run: Run, fraction: float) -> dict:
    """``labels=<pct>%`` when the run sweeps label fractions, else no variant."""
    return {} if run.cfg.eval.finetune.label_fractions == [1.0] else \
        {"labels": label_percent(fraction)}


def run_finetune_protocol(run: Run, ft_dm, init: str, out_dir: Path, callbacks: tuple = (),
                          keep_model: bool = False, encoder_file: Path | None = None,
                          on_all_ranks: bool = False, input_key: str = "image") -> dict:
    """``eval.finetune`` (MAE's recipe) of the ``init`` backbone, its effective batch by
    accumulation, the norm schedules bound to it. ``on_all_ranks``: fitted on every rank of
    ``trainer`` (DDP), not tested; the result keeps the ``"model"`` for ``finetune_test``."""
    ft = run.cfg.eval.finetune
    backbone = evaluation_backbone(run, init, ft.drop_path_rate, finetune=True,
                                   encoder_file=encoder_file)
    world = check_trainer_settings(run.cfg) if on_all_ranks else 1
    accumulate = accumulation(
        None if run.cfg.trainer.fast_dev_run else ft.effective_batch_size, ft.batch_size,
        world, "eval.finetune.effective_batch_size")
    return run_finetune(
        backbone, ft_dm.train_dataloader(), ft_dm.val_dataloader(), ft_dm.test_dataloader(),
        ft_dm.num_classes,
        {**ft.model_dump(exclude={"enabled", "batch_size", "drop_path_rate",
                                  "effective_batch_size", "auto_augment", "reprob",
                                  "label_fractions"}),
         "seed": run.cfg.seed, "input_key": input_key},
        {**run.trainer_kwargs(distributed=on_all_ranks), "accumulate_grad_batches": accumulate},
        out_dir, callbacks=(NormSchedules(run.log), *callbacks), keep_model=keep_model,
        test=not on_all_ranks)


def supervised_on_all_ranks(run: Run, backbone: torch.nn.Module, dm, protocol: dict,
                            out: Path, callbacks: tuple = ()) -> dict:
    """``run_supervised`` fitted on every rank (DDP; the lr follows the batch of all ranks,
    as torchvision's recipe gives it for the total batch), not tested: ``{"epochs",
    "model"}`` for ``supervised_test``."""
    protocol = {**protocol, "lr": protocol["lr"] * check_trainer_settings(run.cfg)}
    return run_supervised(backbone, dm.train_dataloader(), dm.val_dataloader(),
                          dm.test_dataloader(), dm.num_classes, protocol,
                          run.trainer_kwargs(distributed=True), out, callbacks=callbacks,
                          test=False)


def supervised_test(run: Run, fitted: dict, dm) -> tuple[dict, torch.nn.Module]:
    """On rank 0, alone: the test of a ``supervised_on_all_ranks`` fit, merged into its
    result (the model left out and returned beside it)."""
    model = fitted.pop("model")
    with rank_local(model):
        scores = score_supervised(model, dm.test_dataloader(),
                                  run.trainer_kwargs(distributed=False))
    return {**scores, **fitted}, model


def finetune_test(run: Run, fitted: dict, ft_dm) -> dict:
    """On rank 0, alone: the test of an ``on_all_ranks`` fine-tune (``fitted`` from
    ``run_finetune_protocol``), merged into its result (the model left out)."""
    model = fitted.pop("model")
    with rank_local(model):
        scores = test_scores(model, ft_dm.test_dataloader(),
                             {**run.trainer_kwargs(distributed=False),
                              "enable_progress_bar": False}, seed=run.cfg.seed)
    return {**scores, **fitted}


def finetune(run: Run, init: str, out: Path, encoder_file: Path | None = None,
             datamodule: Callable | None = None, input_key: str = "image") -> None:
    """Stages: the fine-tune of ``init`` on each of ``eval.finetune.label_fractions`` of
    the training labels (``out/finetune.json``, ``out/finetune_labels<pct>.json``), fitted
    on every rank (DDP), tested on rank 0. ``datamodule(run, fraction)`` gives the data
    (default ``finetune_datamodule``: images), whose batches hold ``input_key``."""
    name = init_name(run, init)
    datamodule = datamodule or finetune_datamodule
    for fraction in run.cfg.eval.finetune.label_fractions:
        file = finetune_file(fraction)
        labels = "" if fraction == 1.0 else f":labels={label_percent(fraction)}"

        def fit(fraction: float = fraction, file: str = file) -> None:
            dm = datamodule(run, fraction)
            run.log(f"[{name}] fine-tune on {label_percent(fraction)} of the labels "
                    f"({len(dm.splits.train)} samples), {run.cfg.eval.finetune.epochs} epochs")
            fitted = run_finetune_protocol(run, dm, init, out / f"{Path(file).stem}_logs",
                                           encoder_file=encoder_file, on_all_ranks=True,
                                           input_key=input_key)
            if not is_global_zero():
                return
            result = finetune_test(run, fitted, dm)
            result["label_fraction"] = fraction
            result["train_images"] = len(dm.splits.train)
            atomic_write_json(out / file, result)

        stage(run, f"finetune:{name}{labels}", out / file, fit, train=True)


def detection_folder(cfg) -> Path | None:
    """``eval.detection``'s VOC folder: ``root``, else ``<data.root>/voc``; None: the
    embedded scenes."""
    det = cfg.eval.detection
    if det.root is not None:
        return Path(det.root)
    return Path(cfg.data.root) / "voc" if cfg.data.root is not None else None


def read_detection_sets(cfg, root: Path, default_classes=VOC_CLASSES
                        ) -> tuple[VOCDetection, VOCDetection, list[str]]:
    """The train and test splits of the VOC folder ``root`` and their classes
    (``eval.detection.classes``, else ``default_classes``; every annotation parsed: a broken
    folder is a DataError here)."""
    det = cfg.eval.detection
    classes = list(det.classes or default_classes)
    return (VOCDetection(root, det.train_split, classes),
            VOCDetection(root, det.test_split, classes), classes)


def detection_sets(run: Run) -> tuple[VOCDetection, VOCDetection, list[str]]:
    """The train and test splits of ``eval.detection``'s data (``detection_folder``, or
    the embedded scenes written once to the cache) and its classes."""
    det = run.cfg.eval.detection
    root = detection_folder(run.cfg)
    if root is not None:
        return read_detection_sets(run.cfg, root)
    s = det.scenes
    run.log("preparing the embedded multi-object scenes (VOC layout, written once)")
    root = prepare_scenes(s.image_size, run.cfg.seed, s.n_trainval, s.n_test)
    return read_detection_sets(run.cfg, root, SCENE_CLASSES)


def detection(run: Run, init: str, out: Path, encoder_file: Path | None = None) -> None:
    """Stage: Faster R-CNN on the ``init`` backbone (``out/detection.json``), trained on
    every rank (a Fabric over ``trainer``'s devices), tested on rank 0, with bootstrap
    intervals of AP / AP50 / AP75 over test images. A ``--fast-dev-run`` trains 2 steps and
    tests 2 images."""
    det = run.cfg.eval.detection

    def fit() -> None:
        # float32 as detectron2's reference (AMP off): torchvision decodes boxes in the
        # autocast dtype, and bf16 spaces them 4-8 px apart near 1000 px
        fabric = launched_fabric(run.cfg, precision="32-true")
        train, test, classes = detection_sets(run)
        dry = run.cfg.trainer.fast_dev_run
        if dry:
            test = Subset(test, range(min(2, len(test))))
        run.log(f"[{init_name(run, init)}] detection ({det.arch}, {det.norm}), "
                f"{len(train)} training / {len(test)} test images")
        result = run_detection(
            evaluation_backbone(run, init, encoder_file=encoder_file), train, test,
            len(classes), arch=det.arch, norm=det.norm, image_size=det.image_size,
            train_sizes=det.train_sizes, max_size=det.max_size,
            epochs=None if dry else det.epochs, max_steps=2 if dry else det.max_steps,
            batch_size=det.batch_size, lr=det.lr,
            precise_bn_iters=min(det.precise_bn_iters, 2) if dry else det.precise_bn_iters,
            fpn_channels=det.fpn_channels, box_fc_dim=det.box_fc_dim,
            rpn_batch_size=det.rpn_batch_size, roi_batch_size=det.roi_batch_size,
            mean=run.cfg.data.mean, std=run.cfg.data.std, class_names=classes,
            seed=run.cfg.seed, num_workers=run.cfg.data.num_workers, fabric=fabric)
        if result is None:  # rank 0 tests and writes
            return
        result["ci"] = detection_ci(result["predictions"], result["targets"],
                                    det.bootstrap_resamples, run.cfg.seed)
        atomic_write_json(out / "detection.json", result)

    stage(run, f"detection:{init_name(run, init)}", out / "detection.json", fit, train=True)


def transfer(run: Run, init: str, dm, encoder_file: Path | None = None,
             finetune_data: Callable | None = None, input_key: str = "image") -> Path:
    """The transfer protocols of ``eval`` on one init: linear probe, kNN, and (when
    enabled) the logistic-regression probe, fine-tune (on ``finetune_data(run, fraction)``,
    batches of ``input_key``) and detection; their JSONs in ``evals/<init>/`` (returned)."""
    name = init_name(run, init)
    out = run.dir / "evals" / name

    def backbone():
        return evaluation_backbone(run, init, encoder_file=encoder_file)

    linear_probe(run, name, backbone, dm, out)
    knn(run, name, backbone, dm, out)
    if run.cfg.eval.logistic.enabled:
        logistic(run, name, backbone, dm, out)
    if run.cfg.eval.finetune.enabled:
        finetune(run, init, out, encoder_file, finetune_data, input_key)
    if run.cfg.eval.detection is not None and run.cfg.eval.detection.enabled:
        detection(run, init, out, encoder_file)
    return out


def transfer_rows(run: Run, init: str, out: Path) -> list[dict]:
    """Leaderboard rows of ``transfer``'s result files."""
    name, seed = init_name(run, init), run.cfg.seed
    rows = rows_from_result(read_json(out / "linear_probe.json"), init=name,
                            protocol="linear_probe", metrics=("top1", "top5"), seed=seed)
    rows += rows_from_result(read_json(out / "knn.json"), init=name, protocol="knn",
                             metrics=("top1", "top5"), seed=seed)
    if (out / "logistic.json").is_file():
        rows += rows_from_result(read_json(out / "logistic.json"), init=name,
                                 protocol="logistic", metrics=("top1", "top5"), seed=seed)
    for fraction in run.cfg.eval.finetune.label_fractions:
        if (out / finetune_file(fraction)).is_file():
            rows += rows_from_result(read_json(out / finetune_file(fraction)), init=name,
                                     protocol="finetune", metrics=("top1", "top5"), seed=seed,
                                     variant=finetune_variant(run, fraction))
    if (out / "detection.json").is_file():
        result = read_json(out / "detection.json")
        config = result["config"]
        rows += rows_from_result({**result["metrics"], "ci": result.get("ci")}, init=name,
                                 protocol="detection", metrics=("ap", "ap50", "ap75"),
                                 variant={"arch": config["arch"], "norm": config["norm"]},
                                 seed=seed)
        dataset = "scenes" if detection_folder(run.cfg) is None else \
            run.cfg.eval.detection.dataset
        rows = [{**row, "dataset": dataset} if row["protocol"] == "detection" else row
                for row in rows]
    return rows

"""The ``unip-infrared`` experiment (UNIP, ICLR 2025, arXiv 2502.02257; casiatao/UNIP).

Stages, each skipped on ``--resume`` once its output exists:

1. data: the pretraining mix (InfMix style: infrared images plus RGB images turned grey) and
   the infrared segmentation sets; the demo generates its thermal set (SODA layout) and
   mixes in grey ``shapes`` images;
2. ``teacher/``: a local pretrained teacher, or MAE pretraining of the (larger) teacher;
3. ``students/mae/``: MAE pretraining of a student-sized ViT on the same mix;
4. NMI of every block of the teacher; the distilled layer is the config's, else the deepest
   hybrid one (``analysis/attention.py``);
5. ``students/unip/``: NMI-HAD distillation of a student from scratch (``methods/unip.py``);
6. ``evals/<student>/<dataset>/{finetune,linear}.json``: the segmentation protocols
   (``evals/segmentation.py``) for the UNIP-distilled, MAE and randomly initialised students;
7. the per-layer NMI figure and table of every model, predicted masks against the ground
   truth, and leaderboard rows (fine-tune and linear-probe mIoU per data set).

Multi-device training applies to the ``mae`` experiment; this pipeline trains each stage on
one device (its stages would each need their own process group).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from visionbench.analysis.attention import classify_layers, layer_nmi, save_nmi_figure
from visionbench.backbones import load_backbone_weights
from visionbench.config import ModelConfig
from visionbench.data.images.imagefolder import ImageFolderDataset, class_folders
from visionbench.data.images.shapes import prepare_shapes
from visionbench.data.infrared.readers import (
    INFRARED_MEAN,
    INFRARED_STD,
    SEGMENTATION_MEAN,
    SEGMENTATION_STD,
    InfMixDataset,
    SegmentationTransform,
    detect_segmentation_format,
    read_segmentation_dataset,
)
from visionbench.data.infrared.synthetic import prepare_thermal
from visionbench.data.unlabelled import UnlabelledDataModule
from visionbench.errors import ConfigError, DataError
from visionbench.evals.segmentation import predict_masks, run_segmentation
from visionbench.methods.unip import choose_teacher_layer
from visionbench.norms.schedules import NormSchedules
from visionbench.results.figures import save_mask_figure
from visionbench.results.records import atomic_write_json, atomic_write_text, read_json
from visionbench.results.rows import rows_from_result
from visionbench.runner import stages
from visionbench.runner.core import (
    ENCODER_FILE,
    Run,
    backbone_label,
    build_encoder,
    fit_batch_size,
    is_global_zero,
)

PROTOCOLS = {"finetune": "finetune", "linear": "linear_probe"}  # file name -> leaderboard name
DATASET_FOLDERS = {"soda": "SODA", "mfnet": "MFNet", "scut-seg": "SCUT-Seg"}


# -- data ---------------------------------------------------------------------------------------


def thermal_demo_root(run: Run) -> Path:
    s = run.cfg.pretrain.synth
    run.log("preparing the embedded thermal data set (written once to the cache)")
    return prepare_thermal(seed=run.cfg.seed, n_train=s.n_train, n_test=s.n_test,
                           n_pretrain=s.n_pretrain, size=run.cfg.eval.segmentation.crop_size)


def find_folder(root: Path, name: str) -> Path:
    """``root/name``, matched without regard to case."""
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name.lower() == name.lower():
            return child
    raise DataError(f"{root}: no folder {name!r} (see datasets/*.md for the layout)")


def check_unip_data(cfg) -> None:
    """With ``--data-root``: every segmentation set and pretraining folder is there, in a
    known layout (``DataError`` naming the folder otherwise)."""
    if cfg.data.root is None or cfg.pretrain is None:
        return
    root = Path(cfg.data.root)
    for dataset in cfg.eval.segmentation.datasets:
        if dataset == "thermal":
            continue
        folder = find_folder(root, DATASET_FOLDERS[dataset])
        found = detect_segmentation_format(folder)
        if found != dataset:
            raise DataError(f"{folder}: has the {found} layout, expected {dataset}'s "
                            f"(datasets/{dataset}.md)")
    for name in cfg.pretrain.pretrain_data:
        find_folder(root, name)


def segmentation_root(run: Run, dataset: str) -> Path:
    if dataset == "thermal":
        return thermal_demo_root(run)
    if run.cfg.data.root is None:
        raise ConfigError(f"unip.segmentation.datasets: {dataset!r} is read from --data-root; "
                          "without it only the embedded 'thermal' set is available")
    return find_folder(Path(run.cfg.data.root), DATASET_FOLDERS[dataset])


def pretraining_images(run: Run) -> InfMixDataset:
    """The demo InfMix (thermal pretraining split + grey shapes), or the folders under
    ``--data-root`` named by ``unip.pretrain_data``."""
    u = run.cfg.pretrain
    if run.cfg.data.root is None:
        thermal = thermal_demo_root(run)
        sources: list = [thermal / "pretrain" / "thermal"]
        if u.synth.shapes_per_class:
            shapes = prepare_shapes(image_size=run.cfg.data.image_size, seed=run.cfg.seed,
                                    train_per_class=u.synth.shapes_per_class,
                                    val_per_class=1, test_per_class=1)
            sources.append(ImageFolderDataset(shapes / "train"))
        return InfMixDataset(sources)
    sources = []
    for name in u.pretrain_data:
        folder = find_folder(Path(run.cfg.data.root), name)
        sources.append(pretraining_source(folder))
    return InfMixDataset(sources)


def pretraining_source(folder: Path):
    """An infrared segmentation set (its training images), a class-folder tree of RGB images
    (turned grey), or a plain folder of infrared images."""
    try:
        return read_segmentation_dataset(folder, "train", format=detect_segmentation_format(
            folder))
    except DataError:
        pass
    if class_folders(folder):
        return ImageFolderDataset(folder)
    return folder


def pretrain_datamodule(run: Run, images) -> UnlabelledDataModule:
    d = run.cfg.data
    return UnlabelledDataModule(images, image_size=d.image_size, mean=[INFRARED_MEAN] * 3,
                                std=[INFRARED_STD] * 3, batch_size=d.batch_size,
                                num_workers=d.num_workers, seed=run.cfg.seed)


# -- pretraining stages ---------------------------------------------------------------------------


def teacher_model_config(run: Run) -> ModelConfig:
    t = run.cfg.pretrain.teacher
    return ModelConfig(backbone=t.backbone, backbone_kwargs=t.backbone_kwargs, norm="layernorm",
                       placement="pre")


def mae_pretrain(run: Run, model_cfg: ModelConfig, epochs: int, dm, out: Path, label: str):
    """MAE pretraining (``pretrain.mae``) of the encoder ``model_cfg`` describes; returns the
    encoder."""
    section = run.cfg.pretrain.mae.model_copy(update={"epochs": epochs})
    path = stages.pretrain(run, section, dm, out, model=model_cfg, label=f"[{label}] pretraining",
                           key="pretrain.mae")
    return stages.load_encoder(run, path, model=model_cfg)


def teacher_stage(run: Run, dm):
    t = run.cfg.pretrain.teacher
    if t.source == "weights":
        teacher = build_encoder(run, model=teacher_model_config(run))
        run.log(load_backbone_weights(teacher, t.weights).summary())
        return teacher
    return mae_pretrain(run, teacher_model_config(run), t.epochs, dm, run.dir / "teacher",
                        "teacher")


def distilled_layer(run: Run, teacher, images: torch.Tensor) -> int:
    out = run.dir / "nmi" / "teacher_layer.json"

    def choose() -> None:
        n, t = run.cfg.pretrain.nmi, run.cfg.pretrain.teacher
        if t.layer is not None:
            layer = t.layer
            if layer >= len(teacher.blocks):
                raise ConfigError(f"pretrain.teacher.layer: {layer} but the teacher has "
                                  f"{len(teacher.blocks)} blocks (0-based)")
            reason = "pretrain.teacher.layer"
        else:
            layer, _, reason = choose_teacher_layer(teacher, images, n.local_threshold,
                                                    n.global_threshold)
        run.log(f"distilling teacher block {layer} (0-based; {reason})")
        atomic_write_json(out, {"layer": int(layer), "chosen_by": reason})

    stages.stage(run, "teacher_layer", out, choose)
    return int(read_json(out)["layer"])


def unip_stage(run: Run, teacher, layer: int, dm):
    path = stages.pretrain(run, run.cfg.pretrain, dm, run.dir / "students" / "unip",
                           label="[unip] distillation", teacher=teacher, teacher_layer=layer)
    return stages.load_encoder(run, path)


# -- NMI analysis ---------------------------------------------------------------------------------


def nmi_stage(run: Run, models: dict[str, torch.nn.Module], images: torch.Tensor) -> dict:
    """Per-layer NMI of every model, the figure and the table; ``nmi/nmi.json``."""
    out = run.dir / "nmi" / "nmi.json"
    n = run.cfg.pretrain.nmi
    per_model = read_json(out) if out.is_file() else {}
    for name, model in models.items():
        if name not in per_model:
            run.log(f"[{name}] attention NMI per layer")
            per_model[name] = [float(v) for v in layer_nmi(model.eval(), images)]
            atomic_write_json(out, per_model)
    save_nmi_figure(per_model, run.dir / "figures" / "nmi_per_layer.png",
                    (n.local_threshold, n.global_threshold))
    lines = ["## Attention NMI per layer", "",
             f"local: NMI >= {n.local_threshold}; global: NMI <= {n.global_threshold}; "
             "hybrid in between (NMI of the attention maps without the CLS token, averaged "
             f"over heads and {images.shape[0]} pretraining images).", ""]
    depth = max(len(v) for v in per_model.values())
    lines += ["| model | " + " | ".join(str(i) for i in range(depth)) + " |",
              "|---|" + "---:|" * depth]
    for name, values in per_model.items():
        kinds = classify_layers(values, n.local_threshold, n.global_threshold)
        cells = [f"{v:.3f} {k[0].upper()}" for v, k in zip(values, kinds, strict=True)]
        cells += [""] * (depth - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "L = local, H = hybrid, G = global; blocks numbered from 0."]
    chosen = run.dir / "nmi" / "teacher_layer.json"
    if chosen.is_file():
        pick = read_json(chosen)
        lines += ["", f"Distilled teacher block: {pick['layer']} ({pick['chosen_by']})."]
    atomic_write_text(run.dir / "tables" / "nmi.md", "\n".join(lines) + "\n")
    return per_model


# -- segmentation ---------------------------------------------------------------------------------


def segmentation_backbone(run: Run, student: str, layer_scale: float | None = None,
                          finetune: bool = False):
    """The student at the segmentation crop size, its weights loaded (pos-embed resized).

    As the official fine-tune backbone (``UNIP_segmentation/backbone/mae.py`` with
    ``init_values=1.0``): LayerScale in every block, initialised to ``layer_scale`` (the
    student has none, so its gammas start there), and a trainable position embedding (with
    weight decay, see ``evals/segmentation.py``).
    """
    crop = run.cfg.eval.segmentation.crop_size
    kwargs = {**run.cfg.model.backbone_kwargs, "img_size": crop}
    if layer_scale is not None:
        kwargs["init_values"] = layer_scale
    model_cfg = run.cfg.model.model_copy(update={"backbone_kwargs": kwargs})
    backbone = build_encoder(run, model=model_cfg)
    if student != "random":
        report = load_backbone_weights(backbone, run.dir / "students" / student / ENCODER_FILE)
        run.log(f"[{student}] {report.summary()}")
    if finetune and backbone.pos_embed is not None:
        backbone.pos_embed.requires_grad_(True)
    return backbone


def segmentation_loaders(run: Run, root: Path, batch_size: int, label: str):
    """Training crops as the official train pipeline; the test set one image a batch, its
    mask at the label's own resolution (``mmseg`` tests with ``samples_per_gpu=1``)."""
    s = run.cfg.eval.segmentation
    mean, std = SEGMENTATION_MEAN, SEGMENTATION_STD
    train = read_segmentation_dataset(root, "train", SegmentationTransform(
        s.crop_size, True, mean, std, cat_max_ratio=s.cat_max_ratio, photometric=s.photometric))
    test = read_segmentation_dataset(root, "test", SegmentationTransform(
        s.crop_size, False, mean, std, original_mask=True))
    d = run.cfg.data
    batch_size = fit_batch_size(run, len(train), batch_size, label)
    loaders = (
        DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                   num_workers=d.num_workers,
                   generator=torch.Generator().manual_seed(run.cfg.seed)),
        DataLoader(test, batch_size=1, shuffle=False, num_workers=d.num_workers),
    )
    return loaders, len(train.classes), train.classes


def protocol_cfg(run: Run, protocol: str, dataset: str) -> dict:
    """The protocol's settings, with the data set's own schedule when the config has one."""
    s = run.cfg.eval.segmentation
    p = getattr(s, protocol)
    cfg = p.model_dump(exclude={"batch_size", "layer_scale"})
    cfg.update(crop=s.crop_size, seed=run.cfg.seed)
    if dataset in s.schedules:
        schedule = s.schedules[dataset]
        cfg.update(epochs=None, max_steps=schedule.max_steps, warmup_steps=schedule.warmup_steps)
    if protocol == "linear":
        for key in ("layer_decay", "drop_path", "head", "channels", "aux_weight"):
            cfg.pop(key)
    return cfg


def segmentation_stage(run: Run, student: str, dataset: str, root: Path,
                       figure_images: torch.Tensor | None) -> None:
    for protocol in ("finetune", "linear"):
        out = run.dir / "evals" / student / dataset
        stages.stage(run, f"segmentation:{student}:{dataset}:{protocol}",
                     out / f"{protocol}.json",
                     lambda protocol=protocol, out=out: segment(run, student, dataset, root,
                                                               figure_images, protocol, out),
                     train=True)


def segment(run: Run, student: str, dataset: str, root: Path,
            figure_images: torch.Tensor | None, protocol: str, out: Path) -> None:
    """One segmentation protocol of one student on one data set (``out/<protocol>.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    p = getattr(run.cfg.eval.segmentation, protocol)
    label = f"[{student}] {dataset}: {protocol} segmentation"
    (train, test), num_classes, classes = segmentation_loaders(run, root, p.batch_size,
                                                               label)
    run.log(label)
    backbone = segmentation_backbone(run, student, p.layer_scale,
                                     finetune=protocol == "finetune")
    keep = protocol == "finetune" and figure_images is not None
    result = run_segmentation(backbone, train, test, num_classes, protocol,
                              protocol_cfg(run, protocol, dataset), out / f"{protocol}_logs",
                              {**run.trainer_kwargs(distributed=True),
                               "sync_batchnorm": run.sync_batchnorm},  # mmseg's SyncBN
                              keep_model=keep,
                              callbacks=(NormSchedules(run.log),),
                              test_trainer_kwargs=run.trainer_kwargs(distributed=False))
    if result is None:  # a rank other than 0: rank 0 tests and writes
        return
    if keep:
        model = result.pop("model")
        # the protocol's own inference: whole images of the paper's sets exceed a fixed-size
        # ViT's input, slide windows of the crop size over them as the test did
        masks = predict_masks(model, figure_images, inference=p.inference,
                              crop=run.cfg.eval.segmentation.crop_size, stride=p.stride)
        torch.save(masks, out / "predicted_masks.pt")
    result["classes"] = classes
    atomic_write_json(out / f"{protocol}.json", result)


def mask_figure(run: Run, dataset: str, root: Path, images, truth) -> None:
    predictions = {}
    for student in run.cfg.pretrain.students:
        path = run.dir / "evals" / student / dataset / "predicted_masks.pt"
        if path.is_file():
            predictions[student] = torch.load(path, weights_only=True)
    if predictions:
        save_mask_figure(run.dir / "figures" / f"masks_{dataset}.png", images, truth,
                         predictions, num_classes=len(read_segmentation_dataset(root).classes),
                         mean=[SEGMENTATION_MEAN], std=[SEGMENTATION_STD])


def figure_batch(run: Run, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    crop = run.cfg.eval.segmentation.crop_size
    test = read_segmentation_dataset(root, "test", SegmentationTransform(
        crop, False, SEGMENTATION_MEAN, SEGMENTATION_STD))
    n = min(run.cfg.eval.segmentation.figure_images, len(test))
    picks = torch.linspace(0, len(test) - 1, n).long().tolist()
    items = [test[i] for i in picks]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def collect_results(run: Run) -> list[dict]:
    rows = []
    label = backbone_label(run)
    for dataset in run.cfg.eval.segmentation.datasets:
        for student in run.cfg.pretrain.students:
            for protocol, name in PROTOCOLS.items():
                result = read_json(run.dir / "evals" / student / dataset / f"{protocol}.json")
                rows += [{"backbone": label, "dataset": dataset, **row} for row in
                         rows_from_result(result, init=student, protocol=name,
                                          metrics=("miou", "pixel_acc"), seed=run.cfg.seed)]
    return rows


def run_unip_infrared(run: Run) -> tuple[list[dict], int]:
    u = run.cfg.pretrain
    if u is None or u.method != "unip" or run.cfg.eval.segmentation is None:
        raise ConfigError(f"{run.entry.config}: unip-infrared needs a 'pretrain' section of "
                          "method unip and an 'eval.segmentation' section")
    mix = pretraining_images(run)
    run.log(f"pretraining mix: {len(mix)} images")
    dm = pretrain_datamodule(run, mix)
    nmi_images = dm.eval_images(u.nmi.images)
    models: dict[str, torch.nn.Module] = {}
    if "unip" in u.students:
        models["teacher"] = teacher_stage(run, dm)
    if "mae" in u.students:
        models["mae"] = mae_pretrain(run, run.cfg.model, u.mae.epochs, dm,
                                     run.dir / "students" / "mae", "mae student")
    if "unip" in u.students:
        layer = distilled_layer(run, models["teacher"], nmi_images)
        models["unip"] = unip_stage(run, models["teacher"], layer, dm)
    if "random" in u.students:
        models["random"] = build_encoder(run)
    stages.stage(run, "nmi", run.dir / "tables" / "nmi.md",
                 lambda models=models: nmi_stage(run, models, nmi_images))
    del models
    for index, dataset in enumerate(run.cfg.eval.segmentation.datasets):
        root = segmentation_root(run, dataset)
        images, truth = figure_batch(run, root) if index == 0 else (None, None)
        for student in u.students:
            segmentation_stage(run, student, dataset, root, images)
        if images is not None and is_global_zero():
            mask_figure(run, dataset, root, images, truth)
    if is_global_zero():
        segmentation_table(run)
    return collect_results(run), u.epochs


def segmentation_table(run: Run) -> None:
    u = run.cfg.pretrain
    lines = ["## Infrared segmentation (mIoU %, fine-tune / linear probe)", "",
             "| student | " + " | ".join(run.cfg.eval.segmentation.datasets) + " | average |",
             "|---|" + "---:|" * (len(run.cfg.eval.segmentation.datasets) + 1)]
    for student in u.students:
        cells, ft, lp = [], [], []
        for dataset in run.cfg.eval.segmentation.datasets:
            out = run.dir / "evals" / student / dataset
            f = read_json(out / "finetune.json")["miou"]
            li = read_json(out / "linear.json")["miou"]
            ft.append(f)
            lp.append(li)
            cells.append(f"{f:.2f} / {li:.2f}")
        avg = f"{sum(ft) / len(ft):.2f} / {sum(lp) / len(lp):.2f}"
        lines.append(f"| {student} | " + " | ".join(cells) + f" | {avg} |")
    atomic_write_text(run.dir / "tables" / "segmentation.md", "\n".join(lines) + "\n")

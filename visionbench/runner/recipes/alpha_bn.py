"""The ``alpha-bn`` experiment: test-time batch statistics calibration under covariate shift.

"Test-time Batch Statistics Calibration for Covariate Shift" (You, Li and Zhao, arXiv
2110.04065). A ResNet trained with BatchNorm on clean data is evaluated on covariate-shifted
copies of its test set, with every BatchNorm normalizing by ``alpha * source + (1 - alpha) *
test batch`` statistics (``visionbench.norms.conversions.alpha_bn``; alpha = 1 is the source
model, alpha = 0 test-time normalization).

Stages, each skipped on ``--resume`` once its output exists:

1. ``source/``: the source model: trained here (supervised, BatchNorm) on the clean training
   split, or a local classifier file (``model.weights``: a torchvision / timm ResNet with its
   ``fc``, or this stage's own ``classifier.safetensors``);
2. the corrupted test sets in the ImageNet-C layout: under ``--data-root``, or written once
   from the clean test split by ``visionbench.data.images.imagenet_c`` (PNG) and read back;
3. ``evals/alpha_bn/<corruption>.json``: top-1 per severity and alpha (the test set shuffled
   once with the seed, then cut into batches of ``alpha_bn.batch_size``, so a batch's
   statistics are not those of one class), and ``clean.json`` on the clean test split;
4. the mCE of every alpha (ImageNet-C's definition, with the source model in place of
   AlexNet: ``CE_c = sum_s E_{s,c} / sum_s E_{s,c}^{source}``, ``mCE`` = their mean, in
   percent), a figure of accuracy against alpha per corruption, a table, leaderboard rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader

from visionbench.backbones.weights import load_classifier_weights
from visionbench.data.datamodule import EVAL_CROP, TransformedDataset, build_transform
from visionbench.data.images.imagefolder import ImageFolderDataset
from visionbench.data.images.imagenet_c import CorruptedSet, prepare_corrupted
from visionbench.data.images.shapes import prepare_shapes
from visionbench.data.transforms import ImageSample
from visionbench.errors import ConfigError
from visionbench.evals.supervised import SupervisedClassifier
from visionbench.norms.conversions import alpha_bn_applied
from visionbench.norms.schedules import NormSchedules
from visionbench.results.figures import save_alpha_curves
from visionbench.results.records import atomic_write_json, atomic_write_text, config_hash, read_json
from visionbench.runner import stages
from visionbench.runner.core import (
    Run,
    build_encoder,
    dataset_name,
    is_global_zero,
    save_encoder,
)

SOURCE = 1.0  # alpha of the source model: its own (running) statistics only
CLASSIFIER_FILE = "classifier.safetensors"


def alpha_label(alpha: float) -> str:
    return "source" if alpha == SOURCE else f"alpha={alpha:g}"


def check_alpha_bn_data(cfg) -> None:
    """With ``--data-root`` (an ImageNet-C layout): the layout and a source model file, before
    a run folder exists."""
    a = cfg.alpha_bn
    if a is None or cfg.data.root is None:
        return
    CorruptedSet(cfg.data.root, a.corruptions, a.severities)
    if cfg.model.weights is None:
        raise ConfigError("model.weights: alpha-bn on an ImageNet-C folder evaluates a source "
                          "model; give its local file (a ResNet classifier with its fc)")


# -- stages -------------------------------------------------------------------------------------


def train_source(run: Run) -> None:
    """Stage: the source classifier trained in the run (unless ``model.weights`` gives
    one), on every rank (DDP: the lr follows the batch of all ranks); rank 0 tests it and
    writes ``source/classifier.safetensors`` (backbone.* and head.*) and its result."""
    if run.cfg.model.weights:
        return
    a = run.cfg.alpha_bn
    out = run.dir / "source"

    def fit() -> None:
        run.log(f"[source] supervised training with BatchNorm, {a.train.epochs} epochs")
        dm = stages.image_datamodule(run, train_kind="supervised", batch_size=a.train.batch_size,
                                     crop_scale=a.train.crop_scale)
        model = SupervisedClassifier(build_encoder(run), dm.num_classes)
        fitted = stages.supervised_on_all_ranks(run, model.backbone, dm, a.train.protocol(),
                                                out, callbacks=(NormSchedules(run.log),))
        if not is_global_zero():
            return
        result, model = stages.supervised_test(run, fitted, dm)
        save_encoder(model, out / CLASSIFIER_FILE)
        atomic_write_json(out / "result.json", result)

    stages.stage(run, "source", out / CLASSIFIER_FILE, fit, train=True)


def source_model(run: Run, num_classes: int) -> SupervisedClassifier:
    """The source classifier: ``model.weights``, or this run's trained one."""
    model = SupervisedClassifier(build_encoder(run), num_classes)
    path = run.cfg.model.weights or (run.dir / "source" / CLASSIFIER_FILE)
    run.log(load_classifier_weights(model.backbone, model.head, path))
    return model.eval()


def test_sets(run: Run) -> tuple[CorruptedSet, ImageFolderDataset | None]:
    """The corrupted test sets and the clean one (None when there is none)."""
    a, d = run.cfg.alpha_bn, run.cfg.data
    if d.root is not None:
        corrupted = CorruptedSet(d.root, a.corruptions, a.severities)
        clean = (ImageFolderDataset(a.clean_root, classes=corrupted.classes)
                 if a.clean_root else None)
        return corrupted, clean
    shapes = prepare_shapes(image_size=d.image_size, seed=run.cfg.seed,
                            train_per_class=d.synth.train_per_class,
                            val_per_class=d.synth.val_per_class,
                            test_per_class=d.synth.test_per_class)
    tag = config_hash({"corruptions": a.corruptions, "severities": a.severities,
                       "seed": run.cfg.seed, "crop_to": d.image_size})
    out = shapes.parent / f"{shapes.name}-c{tag}"
    run.log("preparing the corrupted copies of the test split (written once to the cache)")
    prepare_corrupted(shapes / "test", out, run.cfg.seed, tuple(a.corruptions),
                      tuple(a.severities), crop_to=d.image_size)
    clean = ImageFolderDataset(shapes / "test")
    return CorruptedSet(out, a.corruptions, a.severities, classes=clean.classes), clean


def test_transform(run: Run, corrupted: bool):
    """The corrupted images are the evaluation crops already: resize the short side to the
    input size and centre-crop (a no-op at that size), as ImageNet-C's ``test.py``; the clean
    set goes through the eval transform that made those crops (short side / 0.875, crop)."""
    d = run.cfg.data
    return build_transform(d.image_size, d.in_chans, d.mean, d.std, train=False,
                           eval_crop=1.0 if corrupted else EVAL_CROP)


def load_all(run: Run, dataset, corrupted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(TransformedDataset(dataset, ImageSample(test_transform(run, corrupted))),
                        batch_size=256, num_workers=run.cfg.data.num_workers)
    batches = list(loader)
    return (torch.cat([b["image"] for b in batches]),
            torch.cat([torch.as_tensor(b["label"]) for b in batches]))


def top1_per_alpha(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   alphas: list[float], batch_size: int, seed: int, device: str) -> dict:
    """Top-1 (percent) of ``model`` with alpha-BN at each alpha and of the source model, on
    the same shuffled test batches."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    batches = np.array_split(order.numpy(), max(1, math.ceil(len(labels) / batch_size)))
    model = model.to(device)

    def accuracy() -> float:
        correct = 0
        with torch.inference_mode():
            for index in batches:
                logits = model(images[index].to(device))
                correct += int((logits.argmax(dim=1).cpu() == labels[index]).sum())
        return 100.0 * correct / len(labels)

    scores = {}
    for alpha in alphas:
        with alpha_bn_applied(model, alpha):
            scores[alpha_label(alpha)] = accuracy()
    scores[alpha_label(SOURCE)] = accuracy()
    return scores


def evaluate_stage(run: Run, model: torch.nn.Module, corrupted: CorruptedSet,
                   clean: ImageFolderDataset | None) -> tuple[dict, dict | None]:
    """``{corruption: {severity: {alpha label: top1}}}`` and the clean scores."""
    a = run.cfg.alpha_bn
    out = run.dir / "evals" / "alpha_bn"
    device = "cuda" if run.device.startswith("cuda") else "cpu"
    scores: dict[str, dict] = {}
    for corruption in corrupted.corruptions:
        path = out / f"{corruption}.json"
        if path.is_file():
            scores[corruption] = read_json(path)
            continue
        run.log(f"[{corruption}] alpha-BN over {len(a.alphas) + 1} alphas x "
                f"{len(corrupted.severities)} severities")
        per_severity = {}
        for severity in corrupted.severities:
            images, labels = load_all(run, corrupted.dataset(corruption, severity))
            per_severity[str(severity)] = top1_per_alpha(model, images, labels, a.alphas,
                                                         a.batch_size, run.cfg.seed, device)
        atomic_write_json(path, per_severity)
        scores[corruption] = per_severity
        run.mark(f"alpha_bn:{corruption}", wall_s=run.wall())
    clean_scores = None
    if clean is not None:
        path = out / "clean.json"
        if not path.is_file():
            run.log("[clean] alpha-BN on the clean test split")
            images, labels = load_all(run, clean, corrupted=False)
            atomic_write_json(path, top1_per_alpha(model, images, labels, a.alphas,
                                                   a.batch_size, run.cfg.seed, device))
        clean_scores = read_json(path)
    return scores, clean_scores


# -- summaries ----------------------------------------------------------------------------------


def corruption_errors(scores: dict) -> dict[str, dict[str, float]]:
    """``{alpha label: {corruption: CE_c}}`` in percent, the source model as the baseline
    (100 for the source model itself)."""
    labels = next(iter(next(iter(scores.values())).values())).keys()
    errors: dict[str, dict[str, float]] = {label: {} for label in labels}
    for corruption, per_severity in scores.items():
        base = sum(100.0 - s[alpha_label(SOURCE)] for s in per_severity.values())
        for label in labels:
            err = sum(100.0 - s[label] for s in per_severity.values())
            errors[label][corruption] = 100.0 * err / base if base > 0 else float("nan")
    return errors


def mean_over_severities(scores: dict) -> dict[str, dict[str, float]]:
    """``{alpha label: {corruption: mean top-1 over the severities}}``."""
    out: dict[str, dict[str, float]] = {}
    for corruption, per_severity in scores.items():
        for label in next(iter(per_severity.values())):
            values = [s[label] for s in per_severity.values()]
            out.setdefault(label, {})[corruption] = sum(values) / len(values)
    return out


def result_rows(run: Run, scores: dict, clean: dict | None) -> list[dict]:
    name = dataset_name(run)  # the corrupted sets' name is the clean set's + "-c"
    base, shifted = (name[:-2], name) if name.lower().endswith("-c") else (name, f"{name}-c")
    rows = []
    for corruption, per_severity in scores.items():
        for severity, per_alpha in per_severity.items():
            rows += [{"init": label, "dataset": f"{shifted}/{corruption}/{severity}",
                      "protocol": "alpha_bn", "metric": "top1", "value": value}
                     for label, value in per_alpha.items()]
    means = mean_over_severities(scores)
    for label, ce in corruption_errors(scores).items():
        rows.append({"init": label, "dataset": shifted, "protocol": "alpha_bn",
                     "metric": "mce", "value": sum(ce.values()) / len(ce)})
        rows.append({"init": label, "dataset": shifted, "protocol": "alpha_bn",
                     "metric": "mean_top1",
                     "value": sum(means[label].values()) / len(means[label])})
    for label, value in (clean or {}).items():
        rows.append({"init": label, "dataset": base, "protocol": "alpha_bn", "metric": "top1",
                     "value": value})
    return rows


def summary_table(run: Run, scores: dict, clean: dict | None) -> None:
    means = mean_over_severities(scores)
    errors = corruption_errors(scores)
    labels = list(means)
    lines = ["## alpha-BN under covariate shift (top-1 %, mean over severities)", "",
             f"alpha weights the source statistics (source = alpha 1); test batches of "
             f"{run.cfg.alpha_bn.batch_size}, shuffled with the seed. mCE: ImageNet-C's, the "
             "source model as the baseline (100).", "",
             "| corruption | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for corruption in scores:
        cells = [f"{means[label][corruption]:.2f}" for label in labels]
        lines.append(f"| {corruption} | " + " | ".join(cells) + " |")
    lines.append("| **mCE** | " + " | ".join(
        f"{sum(errors[label].values()) / len(errors[label]):.1f}" for label in labels) + " |")
    if clean:
        lines.append("| clean | " + " | ".join(f"{clean[label]:.2f}" for label in labels) + " |")
    atomic_write_text(run.dir / "tables" / "alpha_bn.md", "\n".join(lines) + "\n")


def run_alpha_bn(run: Run) -> tuple[list[dict], int | None]:
    a = run.cfg.alpha_bn
    if a is None:
        raise ConfigError(f"{run.entry.config}: alpha-bn needs an 'alpha_bn' section")
    train_source(run)
    if not is_global_zero():  # the evaluation runs on rank 0
        stages.barrier()
        return [], None
    corrupted, clean = test_sets(run)
    model = source_model(run, len(corrupted.classes))
    run.mark("source", wall_s=run.wall())
    scores, clean_scores = evaluate_stage(run, model, corrupted, clean)
    alphas = [*a.alphas, SOURCE]
    means = mean_over_severities(scores)
    curves = {c: [means[alpha_label(x)][c] for x in alphas] for c in scores}
    curves["mean (corrupted)"] = [sum(means[alpha_label(x)].values()) / len(scores)
                                  for x in alphas]
    if clean_scores:
        curves["clean"] = [clean_scores[alpha_label(x)] for x in alphas]
    save_alpha_curves(run.dir / "figures" / "alpha_bn_accuracy.png", alphas, curves)
    summary_table(run, scores, clean_scores)
    epochs = None if run.cfg.model.weights else a.train.epochs
    stages.barrier()
    return result_rows(run, scores, clean_scores), epochs

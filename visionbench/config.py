"""Experiment configuration: YAML + profile + CLI overrides -> a validated, typed config.

A config file has ``experiment``, ``defaults`` (the whole config) and ``profiles`` (``demo``,
``paper``: deep overrides of the defaults). Overrides apply in this order: defaults, profile,
``--set key.path=value`` (values parsed as YAML), then the named CLI flags. Every error is a
``ConfigError`` whose one line names the file, the key and what is allowed.
"""

from __future__ import annotations

import copy
import functools
import operator
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from visionbench.errors import ConfigError
from visionbench.methods import method_configs
from visionbench.methods.softcon import SoftConConfig
from visionbench.schema import CropScale, LocalFile, Schedule, Strict

__all__ = ["LocalFile", "Schedule", "Strict"]  # the shared pieces, re-exported

PROFILES = ("demo", "paper")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data (configs/ links here)

# every method config, keyed by its ``method`` tag (each method file registers its own)
PretrainConfig = Annotated[functools.reduce(operator.or_, method_configs()),
                           Field(discriminator="method")]
PRETRAIN_ADAPTER = TypeAdapter(PretrainConfig)


class SynthConfig(Strict):
    train_per_class: int = Field(200, gt=0)
    val_per_class: int = Field(40, gt=0)
    test_per_class: int = Field(40, gt=0)


class VideoDataConfig(Strict):
    """Clips (VideoMAE's loaders): ``num_frames`` at stride ``sampling_rate`` (4 for
    Kinetics, 2 for SSv2); the test scores ``test_clips`` evenly spaced clips x
    ``test_crops`` spatial crops (Kinetics 5 x 3, SSv2 2 x 3); the embedded motion clips
    are ``clip_frames`` long; the fine-tune trains on ``finetune_samples`` augmented draws of
    each sampled clip; ``in_memory`` keeps every decoded video (the embedded demo's clips
    are read for hundreds of epochs)."""

    num_frames: int = Field(16, gt=0)
    sampling_rate: int = Field(4, gt=0)
    test_clips: int = Field(5, gt=0)
    test_crops: int = Field(3, gt=0)
    clip_frames: int = Field(32, gt=0)
    # the fine-tune's repeated augmentation (run_class_finetuning.py --num_sample 2): draws
    # of eval.finetune's augmentation per sampled training clip, each a sample of the batch
    finetune_samples: int = Field(2, gt=0)
    in_memory: bool = False  # decode each video file once and keep its frames (small sets)


class DataConfig(Strict):
    dataset: str = "shapes"
    root: str | None = None
    image_size: int = Field(32, gt=0)
    in_chans: int = Field(3, gt=0)
    mean: list[float] = [0.485, 0.456, 0.406]
    std: list[float] = [0.229, 0.224, 0.225]
    batch_size: int = Field(128, gt=0)
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    synth: SynthConfig = SynthConfig()
    video: VideoDataConfig = VideoDataConfig()

    @field_validator("root")
    @classmethod
    def _root_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"data root {value} does not exist or is not a folder")
        return str(Path(value).expanduser()) if value is not None else None

    @model_validator(mode="after")
    def _stats_match_channels(self) -> DataConfig:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) not in (1, 3, self.in_chans):
                raise ValueError(f"{key} has {len(values)} values for in_chans={self.in_chans}")
        return self


class ModelConfig(Strict):
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = {}
    norm: str | None = None  # None: the backbone family's default (layernorm for ViTs, ...)
    placement: str = "pre"
    weights: LocalFile = None
    # per catalog norm, options over its defaults, used wherever that norm is built (e.g.
    # {prepbn: {decay_fraction: 0.8}, powernorm: {grad_scale: paper}})
    norm_options: dict[str, dict[str, Any]] = {}

    @field_validator("norm_options")
    @classmethod
    def _known_norm_options(cls, value: dict) -> dict:
        from visionbench.norms import KINDS, check_norm_options, list_norms

        for name, options in value.items():
            kinds = [k for k in KINDS if name in list_norms(k)]
            if not kinds:
                raise ValueError(f"unknown norm {name!r}; allowed: {', '.join(list_norms())}")
            problems = []
            for kind in kinds:  # batchnorm is a token and a conv norm: either may take them
                try:
                    check_norm_options(name, options, kind)
                    break
                except ConfigError as err:
                    problems.append(str(err))
            else:
                raise ValueError(problems[0])
        return value

    @field_validator("placement")
    @classmethod
    def _known_placement(cls, value: str) -> str:
        from visionbench.backbones.vit import PLACEMENTS

        if value not in PLACEMENTS:
            raise ValueError(f"unknown placement {value!r}; allowed: {', '.join(PLACEMENTS)}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from visionbench.backbones import backbone_family

        backbone_family(value)
        return value

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, value: str | None) -> str | None:
        from visionbench.norms import list_norms

        if value is not None and value not in list_norms():
            raise ValueError(f"unknown norm {value!r}; allowed: {', '.join(list_norms())}")
        return value

    @model_validator(mode="after")
    def _norm_fits_backbone(self) -> ModelConfig:
        from visionbench.backbones import family_of
        from visionbench.norms import list_norms

        family = family_of(self.backbone)
        if self.norm is None:  # the family's own
            self.__dict__["norm"] = family.default_norm
        if self.norm not in list_norms(family.norm_kind):
            raise ValueError(f"norm {self.norm!r} does not fit {self.backbone}, which takes "
                             f"{family.norm_kind} norms: "
                             f"{', '.join(list_norms(family.norm_kind))}")
        return self


class TrainerConfig(Strict):
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, gt=0)
    # every stage on two batches (Lightning's fast_dev_run across the recipe): a dry run that
    # checks a run's wiring and writes no leaderboard rows
    fast_dev_run: bool = False
    # how long DDP ranks wait at a barrier while rank 0 runs an evaluation stage alone (the
    # process group's timeout; Lightning's default is 30 minutes, an ImageNet probe is longer)
    barrier_timeout_hours: float = Field(24.0, gt=0)
    precision: Literal["bf16-mixed", "16-mixed", "32-true", "32", "bf16-true", "64-true"] | None = (
        None
    )


class ProbeConfig(Strict):
    lrs: list[float] = [0.1, 0.3, 1.0, 3.0]
    weight_decays: list[float] = [0.0, 1e-4]
    epochs: int = Field(90, gt=0)
    warmup_epochs: float = Field(10, ge=0)
    batch_size: int = Field(16384, gt=0)
    # when the best (lr, weight decay) is on the grid's edge, extend past it this many times
    max_extensions: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _grid_size(self) -> ProbeConfig:
        if len(self.lrs) * len(self.weight_decays) < 8:
            raise ValueError("the probe grid needs at least 8 (lr, weight decay) points")
        return self


class KNNConfig(Strict):
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)
    majority_k: int = Field(5, gt=0)


class LogisticConfig(Strict):
    """The logistic-regression probe (``evals/logistic.py``: CLIP's linear-probe protocol),
    off unless ``enabled``."""

    enabled: bool = False
    cs: list[float] = [10.0 ** e for e in range(-4, 5)]  # inverse regularization, swept on val
    max_iter: int = Field(1000, gt=0)

    @field_validator("cs")
    @classmethod
    def _cs(cls, value: list[float]) -> list[float]:
        if not value or any(c <= 0 for c in value):
            raise ValueError("expected one or more positive values")
        return value


def label_percent(fraction: float) -> str:
    """A label fraction as it names results and variants: 0.05 -> ``"5%"``."""
    return f"{round(fraction * 100, 6):g}%"


class FinetuneConfig(Strict):
    enabled: bool = True
    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(5, ge=0)
    base_lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(0.65, gt=0, le=1)
    min_lr: float = Field(1e-6, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    global_pool: bool = True
    batch_size: int = Field(1024, gt=0)
    effective_batch_size: int | None = Field(None, gt=0)  # the paper's 1024, by accumulation
    # main_finetune.py / util/datasets.py: RandAugment, random erasing; 0.875 eval crop
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = Field(0.25, ge=0, le=1)
    # the low-label protocol: one fine-tune per fraction of the training labels (class-
    # stratified, drawn with the run's seed), each a leaderboard variant labels=<pct>%
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = [1.0]

    @field_validator("label_fractions")
    @classmethod
    def _distinct_fractions(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one fraction")
        names = [label_percent(f) for f in value]
        if len(set(names)) != len(names):
            raise ValueError(f"fractions repeat (as percentages {names}): {value}")
        return value




class AblationEntry(Strict):
    """One ViT entry of the norm ablation: a catalog token norm in a placement."""

    norm: str
    placement: Literal["pre", "post", "peri", "mix", "lns"] = "pre"
    pretrain: dict[str, Any] = {}  # overrides of the pretrain section for this entry only

    @field_validator("norm")
    @classmethod
    def _token_norm(cls, value: str) -> str:
        from visionbench.norms import list_norms

        if value not in list_norms("token"):
            raise ValueError(f"unknown token norm {value!r}; allowed: "
                             f"{', '.join(list_norms('token'))}")
        return value

    @property
    def label(self) -> str:
        return f"{self.norm}/{self.placement}"


class SupervisedConfig(Strict):
    """Supervised training from scratch (torchvision's ResNet recipe: SGD, lr 0.1 x batch / 256,
    weight decay 1e-4, warmup then cosine, RandomResizedCrop(crop_scale) + flip)."""

    epochs: int = Field(90, gt=0)
    warmup_epochs: float = Field(5, ge=0)
    lr: float = Field(0.1, gt=0)  # for batch 256; scaled linearly with the batch size
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(256, gt=0)
    crop_scale: tuple[float, float] = (0.08, 1.0)

    def protocol(self) -> dict:
        """The keyword arguments of ``run_supervised``'s protocol."""
        return {"lr": self.lr * self.batch_size / 256, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                "epochs": self.epochs}


class ConvAblationConfig(SupervisedConfig):
    """Supervised ResNets from scratch, one per conv norm (the conv-norm papers' protocol)."""

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = {}
    norms: list[str] = ["batchnorm", "groupnorm", "bcn_ws", "evonorm_b0", "evonorm_s0", "selu"]
    # norms also trained in the pre-activation ResNetV2 the EvoNorms need (BN-ReLU there):
    # the like-for-like baseline of the EvoNorm entries
    preact: list[Literal["batchnorm", "groupnorm"]] = []

    @field_validator("norms")
    @classmethod
    def _conv_norms(cls, value: list[str]) -> list[str]:
        from visionbench.norms import list_norms

        unknown = [n for n in value if n not in list_norms("conv")]
        if unknown:
            raise ValueError(f"unknown conv norm(s) {unknown}; allowed: "
                             f"{', '.join(list_norms('conv'))}")
        return value


class ThroughputConfig(Strict):
    norms: list[str] = ["layernorm", "batchnorm", "prepbn"]  # batchnorm, prepbn: folded
    batch_size: int = Field(64, gt=0)
    iterations: int = Field(20, gt=0)
    warmup: int = Field(3, ge=0)


class AblationConfig(Strict):
    entries: list[AblationEntry] = []
    stats_steps: list[int] = [0, 100, 1000]  # steps at which per-block statistics are taken
    conv: ConvAblationConfig | None = ConvAblationConfig()
    throughput: ThroughputConfig = ThroughputConfig()

    @model_validator(mode="after")
    def _unique_entries(self) -> AblationConfig:
        labels = [e.label for e in self.entries]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"entries listed twice: {twice}")
        if not self.entries and not (self.conv and (self.conv.norms or self.conv.preact)):
            raise ValueError("the ablation lists no entry")
        return self


class SegProtocolConfig(Strict):
    """One segmentation protocol (casiatao/UNIP UNIP_segmentation configs)."""

    epochs: int | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(8, gt=1)  # the pooling branch's BatchNorm needs 2 or more
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float | None = Field(0.85, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    head: Literal["upernet", "fpn"] = "upernet"
    channels: int | None = Field(None, gt=0)
    aux_weight: float = Field(0.4, ge=0)
    inference: Literal["whole", "slide"] = "slide"
    stride: int = Field(341, gt=0)
    # LayerScale init of the backbone's blocks (official fine-tune backbone: init_values=1.0;
    # the linear-probe backbone has none); a trained student loads into it, gammas from 1
    layer_scale: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _length(self) -> SegProtocolConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")
        return self


class SegScheduleConfig(Strict):
    """One data set's iterations and lr warmup (both protocols), as its official config."""

    max_steps: int = Field(gt=0)
    warmup_steps: int = Field(ge=0)


SEGMENTATION_DATASETS = ("thermal", "soda", "mfnet", "scut-seg")


class SegmentationConfig(Strict):
    datasets: list[Literal["thermal", "soda", "mfnet", "scut-seg"]] = ["soda", "mfnet",
                                                                       "scut-seg"]
    crop_size: int = Field(512, gt=0)  # training crops and sliding windows
    finetune: SegProtocolConfig = SegProtocolConfig(max_steps=14400, layer_scale=1.0)
    linear: SegProtocolConfig = SegProtocolConfig(max_steps=14400, layer_decay=None)
    # per data set, over the protocols' own length (UNIP_segmentation/configs: SODA 14400 /
    # 1500, MFNet 9800 / 1000, SCUT-Seg 16800 / 1700)
    schedules: dict[str, SegScheduleConfig] = {}
    cat_max_ratio: float = Field(0.75, gt=0, le=1)  # RandomCrop: largest class share of a crop
    photometric: bool = True  # mmseg PhotoMetricDistortion on training crops
    figure_images: int = Field(4, gt=0)

    @field_validator("schedules")
    @classmethod
    def _known_datasets(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(SEGMENTATION_DATASETS))
        if unknown:
            raise ValueError(f"unknown data set(s) {unknown}; allowed: "
                             f"{', '.join(SEGMENTATION_DATASETS)}")
        return value


class ScenesConfig(Strict):
    """The embedded multi-object scenes (``data/images/scenes.py``), written as VOC."""

    image_size: int = Field(128, ge=16)
    n_trainval: int = Field(400, gt=0)
    n_test: int = Field(200, gt=0)


class DetectionConfig(Strict):
    """Faster R-CNN transfer (``evals/detection.py``; PixPro's detectron2 configs). Data: the
    VOC folder ``root``; without it ``<--data-root>/voc`` when the run has a data root, else
    the embedded scenes. Defaults: ``Pascal_VOC_R_50_C4_24k``."""

    enabled: bool = True
    root: str | None = None
    dataset: str = "voc07+12"  # the rows' data-set name for a VOC folder ("scenes" embedded)
    classes: list[str] | None = None  # None: VOC's 20 (the scenes' own when embedded)
    train_split: str = "trainval"
    test_split: str = "test"
    arch: Literal["c4", "fpn"] = "c4"
    norm: Literal["syncbn", "frozen"] = "syncbn"
    image_size: int = Field(800, gt=0)  # the test min side
    train_sizes: list[int] | None = None  # None: VOC's 480..800 scaled by image_size / 800
    max_size: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(24000, gt=0)
    batch_size: int = Field(16, gt=0)  # images a step over all devices (IMS_PER_BATCH)
    lr: float | None = Field(None, gt=0)  # None: 0.02 x batch / 16
    precise_bn_iters: int = Field(200, ge=0)
    # detectron2's widths and sampled anchors / RoIs an image (smaller for CPU demos)
    fpn_channels: int = Field(256, gt=0)
    box_fc_dim: int = Field(1024, gt=0)
    rpn_batch_size: int = Field(256, gt=0)
    roi_batch_size: int = Field(512, gt=0)
    bootstrap_resamples: int = Field(1000, gt=0)
    scenes: ScenesConfig = ScenesConfig()

    @model_validator(mode="after")
    def _one_length(self) -> DetectionConfig:
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of epochs and max_steps (set the other to null)")
        return self


class EvalConfig(Strict):
    inits: list[Literal["pretrained", "random"]] = ["pretrained", "random"]
    pooling: Literal["cls", "mean", "lastk"] = "cls"
    last_k: int = Field(4, gt=0)
    linear_probe: ProbeConfig = ProbeConfig()
    knn: KNNConfig = KNNConfig()
    logistic: LogisticConfig = LogisticConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    segmentation: SegmentationConfig | None = None
    detection: DetectionConfig | None = None


class AlphaBNConfig(Strict):
    """alpha-BN under ImageNet-C style covariate shift (arXiv 2110.04065)."""

    # alpha weights the source statistics; alpha = 1 (the source model) is always evaluated
    alphas: list[float] = [round(0.1 * i, 1) for i in range(10)]
    batch_size: int = Field(64, gt=1)  # the test batch whose statistics are mixed in
    corruptions: list[str] = ["gaussian_noise", "shot_noise", "defocus_blur", "motion_blur",
                              "contrast", "fog", "jpeg_compression", "pixelate"]
    severities: list[int] = [1, 2, 3, 4, 5]
    train: SupervisedConfig = SupervisedConfig()  # the source model, when trained in the run
    clean_root: str | None = None  # the clean test set (ImageFolder) beside an ImageNet-C root

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= a < 1.0 for a in value) or len(set(value)) < len(value):
            raise ValueError("expected distinct values in [0, 1) (alpha = 1, the source "
                             "statistics, is always evaluated)")
        return sorted(value)

    @field_validator("corruptions")
    @classmethod
    def _corruptions(cls, value: list[str]) -> list[str]:
        from visionbench.data.images.corruptions import CORRUPTIONS

        unknown = [c for c in value if c not in CORRUPTIONS]
        if unknown or not value:
            raise ValueError(f"unknown corruption(s) {unknown}; allowed: {', '.join(CORRUPTIONS)}")
        return value

    @field_validator("severities")
    @classmethod
    def _severities(cls, value: list[int]) -> list[int]:
        if not value or any(s not in (1, 2, 3, 4, 5) for s in value):
            raise ValueError("expected severities among 1-5")
        return sorted(set(value))

    @field_validator("clean_root")
    @classmethod
    def _clean_exists(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError(f"clean test folder {value} does not exist")
        return value


class LNRemovalConfig(Strict):
    """FakeLN removal during a fine-tune (submarat/removing-layer-norm ``config.py``, gpt2: the
    schedule starts as the lr warmup ends; ln_2 every 2 steps, the ln_1 q/k phase 2, ln_1
    every 3, then ln_f at once; the std's running average has momentum 0.9)."""

    gap_norm2: int = Field(2, ge=0)
    gap_norm1_qk: int = Field(2, ge=0)
    gap_norm1: int = Field(3, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    # the std each norm freezes at when it is removed without fine-tuning
    calibration_images: int = Field(512, gt=0)


class RSProtocolConfig(Strict):
    """The resize-and-normalization protocol (isaaccorley/resize-is-all-you-need): frozen
    features of each data set at each size (``sizes``; None: the native size and
    ``data.image_size``, the pretraining size) under each normalization, kNN-``k`` and a
    logistic-regression probe. ``pretrain_scale`` / ``pretrain_mean`` / ``pretrain_std``:
    the encoder's pretraining normalization, ``(x * scale - mean) / std`` of digital
    numbers (None: ``data.mean`` / ``data.std``, scale 1, what this run pretrains with)."""

    datasets: list[Literal["eurosat-ms", "bigearthnet", "so2sat"]] = ["eurosat-ms",
                                                                        "bigearthnet"]
    bands: Literal["msi", "rgb"] = "msi"  # the 13 Sentinel-2 bands, or B04 / B03 / B02
    sizes: list[Annotated[int, Field(gt=0)]] | None = None
    normalizations: list[Literal["pretrain", "standardize", "divide"]] = [
        "pretrain", "standardize", "divide"]
    k: int = Field(5, gt=0)
    linear_probe: bool = True
    # the inits whose features are StandardScaler-ed before kNN / the probe: the official
    # scales random-init (and image-statistics, MOSAIKS) features, not pretrained ones
    standard_scale: list[Literal["pretrained", "random"]] = ["random"]
    pretrain_scale: float = Field(1.0, gt=0)
    pretrain_mean: list[float] | None = None
    pretrain_std: list[float] | None = None
    batch_size: int = Field(64, gt=0)
    # a SoftCon-pretrained encoder beside the run's own (init ``softcon``): its method
    # section; its scenes and label space come from the experiment's ``softcon`` section
    softcon: SoftConConfig | None = None


class SoftConLinearConfig(Strict):
    """SSL4EO-S12's linear protocol (``linear_BE_moco.py`` / ``linear_EU_moco.py``): SGD
    momentum 0.9, lr 0.05, batch 256, 100 epochs, lr x 0.1 at 60 and 80; the crop's scale
    (0.8, 1) for BigEarthNet, (0.08, 1) for EuroSAT; the train subset's seed 42."""

    epochs: int = Field(100, gt=0)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(256, gt=0)
    milestones: list[Annotated[int, Field(gt=0)]] = [60, 80]
    bigearthnet_crop_scale: CropScale = (0.8, 1.0)
    eurosat_crop_scale: CropScale = (0.08, 1.0)
    seed: int = 42

    @model_validator(mode="after")
    def _milestones_in_range(self):
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            raise ValueError(f"milestones {late} are not before epoch {self.epochs}: the lr "
                             "would never step")
        return self


class SoftConExperimentConfig(Strict):
    """The ``softcon`` experiment: the pretraining scenes (``pretrain_dataset``: the
    embedded BigEarthNet-layout patches, or under ``--data-root/ssl4eo-s12-ml/`` a GeoTIFF
    folder whose CSV lists each scene's land-cover labels), their label space
    (``dynamic-world``: BigEarthNet's 19 classes collapsed to Dynamic World's 9), then the
    BigEarthNet linear protocol on ``bigearthnet_fraction`` of its train split and EuroSAT's
    linear protocol and kNN-``k``."""

    pretrain_dataset: Literal["bigearthnet", "geotiff"] = "geotiff"
    pretrain_samples: int = Field(1000, gt=0)  # embedded scenes for pretraining
    label_space: Literal["dataset", "dynamic-world"] = "dynamic-world"
    bigearthnet_fraction: float = Field(0.1, gt=0, le=1)
    bigearthnet_train: int = Field(1000, gt=0)  # embedded BigEarthNet train patches
    linear: SoftConLinearConfig = SoftConLinearConfig()
    eurosat: bool = True
    k: int = Field(5, gt=0)
    batch_size: int = Field(64, gt=0)  # feature extraction
    in_memory: bool = False  # decode every sample once and keep it (small sets)


class ExperimentConfig(Strict):
    experiment: str
    profile: Literal["demo", "paper"] = "demo"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    # the method that pretrains, one of the registered method configs keyed by ``method``;
    # None for transfer-only experiments
    pretrain: PretrainConfig | None = None
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    ablation: AblationConfig | None = None
    alpha_bn: AlphaBNConfig | None = None
    ln_removal: LNRemovalConfig | None = None
    rs_protocol: RSProtocolConfig | None = None
    softcon: SoftConExperimentConfig | None = None

    @model_validator(mode="after")
    def _paper_needs_data(self, info: ValidationInfo) -> ExperimentConfig:
        require = (info.context or {}).get("require_data", True)
        if require and self.profile == "paper" and self.data.root is None:
            raise ValueError("the paper profile runs on real data: pass --data-root")
        if require and hasattr(self.pretrain, "check_ready"):
            self.pretrain.check_ready()
        return self

    @model_validator(mode="after")
    def _method_fits_backbone(self) -> ExperimentConfig:
        from visionbench.backbones import backbone_family
        from visionbench.methods import method_class

        if self.pretrain is None:
            return self
        families = method_class(self.pretrain.method).families
        family = backbone_family(self.model.backbone)
        if families and family not in families:
            raise ValueError(f"pretrain.method: {self.pretrain.method} pretrains "
                             f"{' or '.join(families)} backbones, not {self.model.backbone} "
                             f"({family})")
        return self

    @model_validator(mode="after")
    def _entry_overrides(self) -> ExperimentConfig:
        """Every ablation entry's ``pretrain`` overrides make a valid pretrain section."""
        if self.ablation is None:
            return self
        for i, entry in enumerate(self.ablation.entries):
            if entry.pretrain:
                where = f"ablation.entries.{i}.pretrain"
                if self.pretrain is None:
                    raise ValueError(f"{where}: the experiment pretrains nothing to override")
                self.entry_pretrain(entry, where)
        return self

    def entry_pretrain(self, entry, where: str = "ablation entry"):
        """The pretrain section with one ablation entry's overrides."""
        tree = deep_merge(self.pretrain.model_dump(), entry.pretrain)
        try:
            return PRETRAIN_ADAPTER.validate_python(tree)
        except ValidationError as err:
            raise ValueError(f"{where}: {describe_error(err, PRETRAIN_ADAPTER)}") from None


# -- loading ---------------------------------------------------------------------------------


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{path}:{where} not valid YAML ({problem})") from None
    if not isinstance(raw, dict) or "defaults" not in raw:
        raise ConfigError(f"{path}: expected a mapping with 'defaults' and 'profiles'")
    unknown = set(raw) - {"experiment", "extends", "defaults", "profiles"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: "
                          "experiment, extends, defaults, profiles")
    if raw.get("extends"):
        raw = extend(path, raw, seen or (path.resolve(),))
    return raw


def extend(path: Path, raw: dict, seen: tuple[Path, ...]) -> dict:
    """``extends: other.yaml`` (next to this file): its defaults and profiles, overridden by
    this file's (deep merge)."""
    base_path = (path.parent / str(raw["extends"])).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle through {base_path.name}")
    base = read_yaml(base_path, seen + (base_path,))
    profiles = dict(base.get("profiles") or {})
    for name, override in (raw.get("profiles") or {}).items():
        profiles[name] = deep_merge(profiles.get(name) or {}, override or {})
    return {
        "experiment": raw.get("experiment"),
        "defaults": deep_merge(base["defaults"], raw["defaults"] or {}),
        "profiles": profiles,
    }


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve_config(
    name: str,
    profile: str = "demo",
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    path: Path | None = None,
    require_data: bool = True,
) -> ExperimentConfig:
    """Build the validated config of experiment ``name``.

    ``flags`` maps dotted keys to values from the named CLI options (``None`` = not given).
    """
    path = path or config_path(name)
    raw = read_yaml(path)
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    profiles = raw.get("profiles") or {}
    tree = deep_merge(raw["defaults"], profiles.get(profile) or {})
    tree["experiment"] = raw.get("experiment") or name
    tree["profile"] = profile
    for item in sets or []:
        key, value = parse_set(item)
        set_path(tree, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            set_path(tree, key, value)
    return validate(tree, path, require_data)


def validate(tree: dict, source: Path | str, require_data: bool = True) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree, context={"require_data": require_data})
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_error(err)}") from None
    except ConfigError as err:  # raised inside a validator (e.g. unknown backbone)
        raise ConfigError(f"{source}: {err}") from None


def describe_error(err: ValidationError, root: Any = None) -> str:
    """One line for the first error: the dotted key (a union member's tag left out, so
    ``pretrain.mask_ratio`` rather than ``pretrain.mae.mask_ratio``) and what is allowed."""
    first = err.errors()[0]
    parts, model = _walk(first["loc"], ExperimentConfig if root is None else PretrainConfig)
    loc = ".".join(parts)
    kind = first["type"]
    if kind == "extra_forbidden":
        parents, parent = _walk(first["loc"][:-1], ExperimentConfig if root is None
                                else PretrainConfig)
        allowed = sorted(parent.model_fields) if parent is not None else []
        return f"unknown key {loc!r}; allowed here: {', '.join(allowed)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = ".".join([*parts, "method"])
        tags = ", ".join(_tag(m) for m in method_configs())
        given = first.get("ctx", {}).get("tag")
        what = f"unknown method {given!r}" if kind == "union_tag_invalid" else "missing"
        return f"{key}: {what}; allowed: {tags}"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def _tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("method")
    return field.default if field is not None else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation can hold (through Optional, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _walk(loc: tuple, root: Any) -> tuple[list[str], type[BaseModel] | None]:
    """The displayed key parts of a pydantic error location and the model it ends in."""
    parts: list[str] = []
    current: Any = root
    index_next = False
    for part in loc:
        if index_next:  # a list index or dict key: the items' type continues
            parts.append(str(part))
            index_next = False
            continue
        models = _models_in(current)
        tagged = {_tag(m): m for m in models if _tag(m) is not None}
        if len(models) > 1 and part in tagged:  # a union member's tag: not a key
            current = tagged[part]
            continue
        model = models[0] if len(models) == 1 else None
        parts.append(str(part))
        if model is None:
            current = None
            continue
        field = model.model_fields.get(str(part))
        current = field.annotation if field is not None else None
        if field is not None:  # list[X] / dict[str, X]: the items' model
            args = typing.get_args(current)
            origin = typing.get_origin(current)
            if origin in (list, dict) and args:
                current = args[-1]
                index_next = True
    models = _models_in(current)
    return parts, (models[0] if len(models) == 1 else None)


def to_dict(cfg: ExperimentConfig) -> dict:
    return cfg.model_dump(mode="json")

"""The paper registry: one entry per experiment that runs.

Each entry names the paper, its method, backbone, norm layer and placement, the pretraining
data, the downstream task and data set, the protocols and metrics, its config file, and the
numbers the paper reports (mirrored as rows of ``results/reference.csv``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from visionbench.errors import ConfigError


@dataclass(frozen=True)
class Reported:
    backbone: str
    protocol: str
    metric: str
    value: float
    dataset: str
    source: str  # table or figure of the paper


@dataclass(frozen=True)
class Experiment:
    name: str
    paper: str
    arxiv: str
    method: str
    backbone: str
    norm: str
    placement: str
    pretrain_data: str
    task: str
    dataset: str
    protocols: tuple[str, ...]
    metrics: tuple[str, ...]
    config: str
    code: str
    reported: tuple[Reported, ...] = field(default_factory=tuple)
    pipeline: str = "classification"  # the stages that run it (visionbench.runner.PIPELINES)

    def row(self) -> dict:
        d = asdict(self)
        d["protocols"] = ",".join(self.protocols)
        d["metrics"] = ",".join(self.metrics)
        d.pop("reported")
        return d


EXPERIMENTS: dict[str, Experiment] = {}


def register(entry: Experiment) -> Experiment:
    if entry.name in EXPERIMENTS:
        raise ValueError(f"experiment {entry.name!r} registered twice")
    EXPERIMENTS[entry.name] = entry
    return entry


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        known = ", ".join(sorted(EXPERIMENTS))
        raise ConfigError(f"unknown experiment {name!r}; available: {known}")
    return EXPERIMENTS[name]


register(
    Experiment(
        name="mae",
        paper="Masked Autoencoders Are Scalable Vision Learners",
        arxiv="2111.06377",
        method="mae",
        backbone="vit_base_patch16_224",
        norm="layernorm",
        placement="pre",
        pretrain_data="imagenet-1k",
        task="image classification",
        dataset="imagenet-1k",
        protocols=("linear_probe", "knn", "finetune"),
        metrics=("top1", "top5"),
        config="configs/mae.yaml",
        code="facebookresearch/mae",
        reported=(
            Reported("vit_base_patch16_224", "finetune", "top1", 83.6, "imagenet-1k", "Table 3"),
            Reported("vit_large_patch16_224", "finetune", "top1", 85.9, "imagenet-1k", "Table 3"),
            Reported("vit_huge_patch14_224", "finetune", "top1", 86.9, "imagenet-1k", "Table 3"),
            Reported("vit_base_patch16_224", "linear_probe", "top1", 68.0, "imagenet-1k",
                     "official FINETUNE.md (paper TF/TPU)"),
            Reported("vit_large_patch16_224", "linear_probe", "top1", 75.8, "imagenet-1k",
                     "official FINETUNE.md (paper TF/TPU)"),
            Reported("vit_huge_patch14_224", "linear_probe", "top1", 76.6, "imagenet-1k",
                     "official FINETUNE.md (paper TF/TPU)"),
        ),
    )
)


register(
    Experiment(
        name="norm-ablation",
        paper="Normalization ablation: every catalog norm and placement on one footing",
        arxiv="",
        method="mae",
        backbone="vit_base_patch16_224",
        norm="catalog",
        placement="pre,post,peri,mix,lns",
        pretrain_data="imagenet-1k",
        task="image classification",
        dataset="imagenet-1k",
        protocols=("linear_probe", "supervised"),
        metrics=("top1", "top5", "diverged_at_step"),
        config="configs/norm-ablation.yaml",
        code="",
        pipeline="norm_ablation",
    )
)

"""The stages of experiments: ``execute(name, cfg, out)`` runs the pipeline its registry entry
names and records the run (``core``); each pipeline lives in its own module."""

from visionbench.runner.alpha_bn import check_alpha_bn_data, run_alpha_bn
from visionbench.runner.classification import run_classification
from visionbench.runner.core import (
    ENCODER_FILE,
    RUN_DIR_ENV,
    Run,
    backbone_label,
    build_encoder,
    check_trainer_settings,
    create_run,
    dataset_name,
    execute,
    finish,
    open_run,
    resume_checkpoint,
    trainer_kwargs,
)
from visionbench.runner.ln_removal import run_ln_removal
from visionbench.runner.norm_ablation import run_norm_ablation
from visionbench.runner.unip_infrared import check_unip_data, run_unip_infrared

PIPELINES = {
    "classification": run_classification,
    "norm_ablation": run_norm_ablation,
    "unip_infrared": run_unip_infrared,
    "alpha_bn": run_alpha_bn,
    "ln_removal": run_ln_removal,
}
PREFLIGHTS = {"unip_infrared": check_unip_data, "alpha_bn": check_alpha_bn_data}

__all__ = [
    "ENCODER_FILE",
    "PIPELINES",
    "PREFLIGHTS",
    "RUN_DIR_ENV",
    "Run",
    "backbone_label",
    "build_encoder",
    "check_trainer_settings",
    "create_run",
    "dataset_name",
    "execute",
    "finish",
    "open_run",
    "resume_checkpoint",
    "run_classification",
    "trainer_kwargs",
]

"""Running experiments: ``execute(name, cfg, out)`` runs the recipe its registry entry names
(``recipes/``, compositions of ``stages``) and records the run (``core``)."""

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
from visionbench.runner.recipes import PREFLIGHTS, RECIPES

__all__ = [
    "ENCODER_FILE",
    "PREFLIGHTS",
    "RECIPES",
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
    "trainer_kwargs",
]

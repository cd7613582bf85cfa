"""Recipes: each experiment's composition of stages (``visionbench.runner.stages``), named by
its registry entry's ``recipe``; a recipe takes the run and returns ``(results, epochs)``.
Optional preflights check the data before a run folder exists."""

from visionbench.runner.recipes.alpha_bn import check_alpha_bn_data, run_alpha_bn
from visionbench.runner.recipes.classification import (
    check_classification_data,
    run_classification,
)
from visionbench.runner.recipes.ln_removal import run_ln_removal
from visionbench.runner.recipes.norm_ablation import run_norm_ablation
from visionbench.runner.recipes.rs_protocol import check_rs_data, run_rs_protocol
from visionbench.runner.recipes.softcon import check_softcon_data, run_softcon
from visionbench.runner.recipes.unip_infrared import check_unip_data, run_unip_infrared
from visionbench.runner.recipes.video import check_video_data, run_video

RECIPES = {
    "classification": run_classification,
    "norm_ablation": run_norm_ablation,
    "unip_infrared": run_unip_infrared,
    "alpha_bn": run_alpha_bn,
    "ln_removal": run_ln_removal,
    "video": run_video,
    "rs_protocol": run_rs_protocol,
    "softcon": run_softcon,
}
PREFLIGHTS = {"classification": check_classification_data, "unip_infrared": check_unip_data,
              "alpha_bn": check_alpha_bn_data, "video": check_video_data,
              "rs_protocol": check_rs_data, "softcon": check_softcon_data}

__all__ = ["PREFLIGHTS", "RECIPES"]

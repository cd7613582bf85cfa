"""The ``ln-removal`` experiment: fine-tune a pretrained ViT while FakeLN removes its norms.

"Transformers Don't Need LayerNorm at Inference Time" (Baroni et al., arXiv 2507.02559;
submarat/removing-layer-norm). The paper's comparison, on an image classifier: a pretrained
ViT (the run's own MAE, or ``model.weights``) is

1. ``evals/vanilla/``: fine-tuned with its LayerNorms (the MAE recipe, ``eval.finetune``):
   "before removal";
2. ``evals/removed_without_finetune/``: that fine-tuned model with every LayerNorm made fake
   at once, at the per-token std it averages over ``ln_removal.calibration_images`` training
   images, then folded away: "removal without fine-tuning";
3. ``evals/ln_free/``: fine-tuned from the same pretrained weights with the same recipe while
   FakeLN makes the norms fake on the official schedule (``LayerNormRemoval``: after the lr
   warmup, ``norm2`` of each block, then ``norm1``, then the final ``fc_norm``), then folded
   away: "removal with fine-tuning".

A removed norm is folded into the linears that read it (``remove_fake_layernorms``: the block
norms into ``qkv`` / ``fc1``, the classifier's ``fc_norm`` into its head), so the LN-free model
computes exactly what the fake one does (the largest output difference is recorded) with
fewer parameters; each stage reports test top-1 and cross-entropy, and the parameter count
the removal took away.
"""

from __future__ import annotations

import torch

from visionbench.distributed import rank_local
from visionbench.evals.finetune import FineTuneClassifier, test_scores
from visionbench.norms.conversions import (
    FakeLayerNorm,
    FakeLNSchedule,
    attach_fakeln,
    calibrate_fakeln,
    remove_fake_layernorms,
)
from visionbench.norms.schedules import LayerNormRemoval
from visionbench.results.records import atomic_write_json, atomic_write_text, read_json
from visionbench.runner import stages
from visionbench.runner.core import ENCODER_FILE, Run, is_global_zero

STAGES = {"vanilla": "finetune", "removed_without_finetune": "ln_removed_no_finetune",
          "ln_free": "ln_free_finetune"}  # folder -> leaderboard protocol
RESULT_FILE = "result.json"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fold_removed_norms(model: FineTuneClassifier, images: torch.Tensor) -> dict:
    """Remove every (fake) norm of ``model`` in place; the parameters it took away and the
    largest change of the logits on ``images`` (the removal is exact up to rounding)."""
    model.cpu().eval()
    before = parameter_count(model)
    # the head reads the pooled, normed features: fc_norm (global pool) or the final norm's
    # class token; either folds into it
    final = "fc_norm" if model.global_pool else "backbone.norm"
    with torch.no_grad():
        fake = model(images)
        remove_fake_layernorms(model, readers={final: [model.head]})
        folded = model(images)
    if any(isinstance(m, (FakeLayerNorm, torch.nn.LayerNorm)) for m in model.modules()):
        raise RuntimeError("LayerNorm removal left a norm in the model")
    return {"parameters_before": before, "parameters_after": parameter_count(model),
            "params_removed": before - parameter_count(model),
            "max_abs_logit_change": float((folded - fake).abs().max())}


def finetune(run: Run, ft_dm, remove: bool) -> dict:
    """The fine-tune of ``eval.finetune`` from the pretrained weights, with FakeLN when
    ``remove``, fitted on every rank (DDP; the norms' tracked stds are buffers, so rank 0's
    reach the others with every forward, as DDP broadcasts buffers), not tested; the result
    keeps the trained classifier under ``"model"``."""
    r = run.cfg.ln_removal
    callbacks = (LayerNormRemoval(r.gap_norm2, r.gap_norm1_qk, r.gap_norm1, r.momentum,
                                  log=run.log),) if remove else ()
    name = "ln_free" if remove else "vanilla"
    return stages.run_finetune_protocol(run, ft_dm, "pretrained",
                                        run.dir / "evals" / name / "logs",
                                        callbacks=callbacks, keep_model=True,
                                        on_all_ranks=True)


def calibration_images(run: Run, dm) -> list[torch.Tensor]:
    """Training images (eval transform) whose per-token std each norm freezes at."""
    count = run.cfg.ln_removal.calibration_images
    batches, seen = [], 0
    for batch in dm.eval_dataloader("train"):
        images = batch["image"]
        batches.append(images[: count - seen])
        seen += batches[-1].shape[0]
        if seen >= count:
            break
    return batches


def test_result(run: Run, model: FineTuneClassifier, ft_dm) -> dict:
    return test_scores(model, ft_dm.test_dataloader(),
                       {**run.trainer_kwargs(distributed=False), "enable_progress_bar": False},
                       seed=run.cfg.seed)


def probe_images(ft_dm) -> torch.Tensor:
    """Test images the folding is checked on (the largest logit change)."""
    return next(iter(ft_dm.test_dataloader()))["image"][:16]


def run_stages(run: Run, ft_dm, dm) -> dict[str, dict]:
    """The three stages (fine-tunes on every rank, tested on rank 0; the removal without
    fine-tune on rank 0); on rank 0 their records, ``{}`` on the others."""
    out = run.dir / "evals"

    def vanilla() -> None:
        run.log("[vanilla] fine-tune with the LayerNorms")
        fitted = finetune(run, ft_dm, remove=False)
        if not is_global_zero():
            return
        model = fitted["model"].cpu()
        result = stages.finetune_test(run, fitted, ft_dm)
        result["parameters"] = parameter_count(model)
        (out / "vanilla").mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), out / "vanilla" / "classifier.pt")
        atomic_write_json(out / "vanilla" / RESULT_FILE, result)

    def removed_without_finetune() -> None:
        run.log("[removed without fine-tune] every norm fake at once, at its calibrated std")
        model = finetune_classifier(run, ft_dm)
        model.load_state_dict(torch.load(out / "vanilla" / "classifier.pt", weights_only=True))
        attach_fakeln(model.cpu(), momentum=run.cfg.ln_removal.momentum)
        stds = calibrate_fakeln(model, calibration_images(run, dm))
        FakeLNSchedule(model, start=0, gap_norm2=0, gap_norm1_qk=0,
                       gap_norm1=0).step()  # every norm at once
        removal = fold_removed_norms(model, probe_images(ft_dm))
        atomic_write_json(out / "removed_without_finetune" / RESULT_FILE,
                          {**test_result(run, model, ft_dm), **removal, "stds": stds})

    def ln_free() -> None:
        run.log("[LN-free] fine-tune while FakeLN removes the norms on the official schedule")
        fitted = finetune(run, ft_dm, remove=True)
        if not is_global_zero():
            return
        model = fitted.pop("model")
        with rank_local(model):  # its metrics were made during the DDP fit
            fake = test_result(run, model, ft_dm)
            removal = fold_removed_norms(model, probe_images(ft_dm))
            folded = test_result(run, model, ft_dm)
        result = {**fitted, **folded, **removal,
                  "fake_scores": {k: fake[k] for k in ("test_top1", "test_top5", "test_loss")}}
        atomic_write_json(out / "ln_free" / RESULT_FILE, result)

    stages.stage(run, "vanilla", out / "vanilla" / RESULT_FILE, vanilla, train=True)
    stages.stage(run, "removed_without_finetune",
                 out / "removed_without_finetune" / RESULT_FILE, removed_without_finetune)
    stages.stage(run, "ln_free", out / "ln_free" / RESULT_FILE, ln_free, train=True)
    if not is_global_zero():
        return {}
    return {key: read_json(out / key / RESULT_FILE) for key in STAGES}


def finetune_classifier(run: Run, ft_dm) -> FineTuneClassifier:
    """A classifier of the fine-tune's shape, to load the vanilla stage's weights into."""
    ft = run.cfg.eval.finetune
    backbone = stages.evaluation_backbone(run, "random", ft.drop_path_rate, finetune=True)
    return FineTuneClassifier(backbone, ft_dm.num_classes, base_lr=ft.base_lr,
                              global_pool=ft.global_pool)


def summary_table(run: Run, records: dict[str, dict]) -> None:
    lines = ["## LayerNorm removal (test set)", "",
             "| model | top-1 | loss | parameters | removed |", "|---|---:|---:|---:|---:|"]
    names = {"vanilla": "fine-tuned with LayerNorm (before removal)",
             "removed_without_finetune": "LayerNorm removed, no fine-tuning",
             "ln_free": "LayerNorm removed during the fine-tune (LN-free)"}
    for key, label in names.items():
        r = records[key]
        params = r.get("parameters_after", r.get("parameters", ""))
        removed = r.get("params_removed", 0)
        lines.append(f"| {label} | {r['test_top1']:.2f} | {r['test_loss']:.4f} | {params} | "
                     f"{removed} |")
    gap = records["ln_free"]["test_loss"] - records["vanilla"]["test_loss"]
    lines += ["", f"LN-free minus vanilla fine-tune loss: {gap:+.4f} (the paper's bracket). "
              "Folding the fake norms changed the logits by at most "
              f"{records['ln_free']['max_abs_logit_change']:.2e}."]
    atomic_write_text(run.dir / "tables" / "ln_removal.md", "\n".join(lines) + "\n")


def run_ln_removal(run: Run) -> tuple[list[dict], int | None]:
    if not run.cfg.model.weights:
        stages.pretrain(run, run.cfg.pretrain, stages.method_datamodule(run, run.cfg.pretrain),
                        run.dir, encoder_file=run.dir / "checkpoints" / ENCODER_FILE)
    dm = stages.image_datamodule(run)
    ft_dm = stages.finetune_datamodule(run)
    records = run_stages(run, ft_dm, dm)
    if not is_global_zero():
        stages.barrier()
        return [], None
    summary_table(run, records)
    stages.barrier()
    init = stages.init_name(run, "pretrained")
    rows = []
    for key, protocol in STAGES.items():
        rows += [{"init": init, "protocol": protocol, "metric": metric,
                  "value": records[key][f"test_{metric}"]} for metric in ("top1", "loss")]
    rows.append({"init": init, "protocol": STAGES["ln_free"], "metric": "params_removed",
                 "value": records["ln_free"]["params_removed"]})
    return rows, None if run.cfg.model.weights else run.cfg.pretrain.epochs

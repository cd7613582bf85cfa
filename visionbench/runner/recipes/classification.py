"""The pretrain-then-transfer recipe of image-classification experiments (``mae``, and any
method whose config is the experiment's ``pretrain``): the method's pretraining, then for each
init (pretrained, random) frozen features -> linear-probe sweep -> kNN, and fine-tune."""

from __future__ import annotations

import torch

from visionbench.results.figures import save_reconstruction_figure
from visionbench.runner import stages
from visionbench.runner.core import ENCODER_FILE, Run


def reconstruction_figure(run: Run, dm):
    """After MAE-style pretraining: input, masked input and reconstruction of validation
    images spread over the classes (methods with ``reconstruct``)."""
    def draw(module) -> None:
        if not hasattr(module, "reconstruct"):
            return
        dataset = dm.eval_dataloader("val").dataset
        n = min(getattr(run.cfg.pretrain, "figure_images", 8), len(dataset))
        picks = torch.linspace(0, len(dataset) - 1, n).long().tolist()
        imgs = torch.stack([dataset[i]["image"] for i in picks])
        module = module.cpu().eval()
        noise = torch.rand(imgs.shape[0], module.grid[0] * module.grid[1],
                           generator=torch.Generator().manual_seed(run.cfg.seed))
        masked, recon = module.reconstruct(imgs, noise=noise)
        save_reconstruction_figure(run.dir / "figures" / f"{run.cfg.pretrain.method}"
                                   "_reconstruction.png", imgs, masked, recon,
                                   run.cfg.data.mean, run.cfg.data.std)
    return draw


def check_classification_data(cfg) -> None:
    """Before a run folder exists: the detection stage's VOC folder reads."""
    det = cfg.eval.detection
    if det is not None and det.enabled and stages.detection_folder(cfg) is not None:
        stages.read_detection_sets(cfg, stages.detection_folder(cfg))


def run_classification(run: Run) -> tuple[list[dict], int | None]:
    cfg = run.cfg
    pretrains = "pretrained" in cfg.eval.inits and not cfg.model.weights
    if pretrains:
        dm = stages.method_datamodule(run, cfg.pretrain)
        stages.pretrain(run, cfg.pretrain, dm, run.dir, after=reconstruction_figure(run, dm),
                        encoder_file=run.dir / "checkpoints" / ENCODER_FILE)
    dm = stages.image_datamodule(run)
    rows = []
    for init in cfg.eval.inits:
        out = stages.transfer(run, init, dm, run.dir / "checkpoints" / ENCODER_FILE)
        rows += stages.transfer_rows(run, init, out)
    return rows, cfg.pretrain.epochs if pretrains else None

"""Two-process DDP (gloo, CPU) MAE training for a few steps; each rank saves its weights.

Run by tests/methods/test_ddp.py as ``python ddp_worker.py OUT_DIR``; Lightning's DDP launcher
starts rank 1 by running this same script again.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from visionbench.backbones import create_backbone
from visionbench.methods.mae import MAE, MAEConfig


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    encoder = create_backbone(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    model = MAE(
        encoder,
        MAEConfig(blr=1e-2, epochs=2, warmup_epochs=0),
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        batch_size=8,
    )
    data = TensorDataset(
        torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.zeros(64)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "state": state,
            "initial": initial,
            "world_size": trainer.world_size,
            "step": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))

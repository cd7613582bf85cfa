"""A datamodule of unlabelled images for pretraining (MAE, UNIP's distillation, ...).

Batches are dicts from the method's sample transform (``{"image": ...}`` for MAE and UNIP,
whose ``main_pretrain.py`` crop is RandomResizedCrop(size, scale 0.2-1, bicubic), horizontal
flip, ToTensor, Normalize).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from visionbench.data.transforms import ImageSample


def pretrain_transform(size: int, mean: Sequence[float], std: Sequence[float],
                       scale: tuple[float, float] = (0.2, 1.0)) -> ImageSample:
    return ImageSample(T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ]))


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the short side and centre-crop to ``size`` (analyses on whole images)."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


class Samples(Dataset):
    """Images (PIL) as sample dicts through a sample transform."""

    def __init__(self, images: Dataset, transform: Callable[[dict], dict]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return self.transform({"image": self.images[index]})


class UnlabelledDataModule(L.LightningDataModule):
    """Train batches of ``images`` (a dataset of PIL images) through ``train_transform`` (a
    method's sample transform; MAE's pretraining crop by default)."""

    def __init__(self, images: Dataset, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], batch_size: int, num_workers: int = 0,
                 seed: int = 0, train_transform: Callable[[dict], dict] | None = None) -> None:
        super().__init__()
        self.images, self.image_size = images, image_size
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_transform = train_transform or pretrain_transform(image_size, self.mean,
                                                                     self.std)

    def train_dataloader(self) -> DataLoader:
        data = Samples(self.images, self.train_transform)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed),
                          persistent_workers=self.num_workers > 0)

    def eval_images(self, count: int) -> torch.Tensor:
        """The first ``count`` images, resized and centre-cropped, as one batch."""
        transform = eval_transform(self.image_size, self.mean, self.std)
        picks = torch.linspace(0, len(self.images) - 1, min(count, len(self.images))).long()
        return torch.stack([transform(self.images[int(i)]) for i in picks])

"""The shared pieces of every config: ``Strict`` models, local weight files, the training
schedule every pretraining method takes whole, and the base of method configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _existing_file(value: str | None) -> str | None:
    if value is not None and not Path(value).expanduser().is_file():
        raise ValueError(f"weights file {value} not found")
    return value


LocalFile = Annotated[str | None, AfterValidator(_existing_file)]  # weights: local files only


def _crop_scale(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop scale {value}: expected 0 < min <= max <= 1")
    return value


# a RandomResizedCrop's (min, max) area fraction
CropScale = Annotated[tuple[float, float], AfterValidator(_crop_scale)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Schedule(Strict):
    """A training stage's schedule: per-step linear warmup then half-cycle cosine from
    ``blr x batch / 256`` to ``min_lr`` (facebookresearch/mae ``util/lr_sched.py``), weight
    decay, checkpoint and validation cadence, and the effective batch reached by gradient
    accumulation over the per-device batch and the devices (None: no accumulation)."""

    epochs: int = Field(800, gt=0)
    warmup_epochs: float = Field(40, ge=0)
    blr: float = Field(1.5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    min_lr: float = Field(0.0, ge=0)
    checkpoint_every_n_steps: int = Field(50, gt=0)
    val_every_n_epochs: int = Field(1, gt=0)
    effective_batch_size: int | None = Field(None, gt=0)


class MethodConfig(Schedule):
    """The base of a pretraining method's config: its schedule plus, in the subclass, a
    ``method: Literal["name"]`` tag and the paper's values as defaults."""

    method: str

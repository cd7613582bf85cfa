"""Norm layers whose behaviour follows the training schedule, bound to each fit.

Two catalog entries change with the step of the training they are in, as their official code
sets them from the run's own schedule:

- ``prepbn`` (xinghaochen/SLAB ``classification/models/prepbn.py``): lambda decays from 1 to 0
  over ``total_steps`` optimizer steps; with ``decay_fraction`` the length is that fraction of
  the fit's optimizer steps (the official 300000 of 375300 DeiT steps is 0.8).
- ``powernorm`` (sIncerass/powernorm ``fairseq/modules/norm_select.py``): ``warmup_iters`` is
  fairseq's ``args.warmup_updates``, the lr warmup; ``"lr_warmup"`` takes the fit's.

``NormSchedules`` is a Lightning callback that every training stage (pretraining, fine-tune,
supervised training, segmentation) attaches. When the fit starts it sets those lengths on the
layers that have not started their schedule yet (a resumed fit, or a pretrained encoder being
fine-tuned, keeps its own), and it advances PRepBN after each optimizer step.

``LayerNormRemoval`` runs FakeLN's removal schedule (submarat/removing-layer-norm) during a
fine-tune in the same way.
"""

from __future__ import annotations

import lightning as L
from torch import nn

from visionbench.errors import ConfigError
from visionbench.norms.conversions import FakeLayerNorm, FakeLNSchedule, attach_fakeln
from visionbench.norms.token import LR_WARMUP, PowerNorm, attach_prepbn_schedule, prepbn_layers


def lr_warmup_steps(pl_module: L.LightningModule) -> int:
    """The module's lr warmup in optimizer steps (``lr_warmup_steps()``), 0 without one."""
    method = getattr(pl_module, "lr_warmup_steps", None)
    return max(0, int(method())) if callable(method) else 0


def set_fit_lengths(model: nn.Module, optimizer_steps: int, warmup_forwards: int) -> list[str]:
    """Give the not-yet-started schedule norms of ``model`` this fit's lengths; returns what
    was set, one line per kind, for the log."""
    notes = []
    fresh = [m for m in prepbn_layers(model) if int(m.step) == 0 and m.decay_fraction]
    for m in fresh:
        m.total_steps.fill_(max(1, round(m.decay_fraction * optimizer_steps)))
    if fresh:
        notes.append(f"prepbn: lambda reaches 0 after {int(fresh[0].total_steps)} of "
                     f"{optimizer_steps} optimizer steps (decay_fraction "
                     f"{fresh[0].decay_fraction})")
    waiting = [m for m in model.modules()
               if isinstance(m, PowerNorm) and m.warmup_iters == LR_WARMUP]
    for m in waiting:
        m.warmup_iters = warmup_forwards
    if waiting:
        notes.append(f"powernorm: warmup_iters = the lr warmup, {warmup_forwards} forwards")
    return notes


class NormSchedules(L.Callback):
    """Binds PRepBN's decay and PowerNorm's warmup to the fit they train in."""

    def __init__(self, log=None) -> None:
        self._log = log  # not ``log``: Lightning gives callbacks the module's ``log``
        self._handle = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = int(trainer.estimated_stepping_batches)
        forwards = lr_warmup_steps(pl_module) * trainer.accumulate_grad_batches
        for note in set_fit_lengths(pl_module, steps, forwards):
            if self._log is not None:
                self._log(note)
        if prepbn_layers(pl_module):
            self._handle = attach_prepbn_schedule(pl_module, trainer.optimizers[0])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class LayerNormRemoval(L.Callback):
    """FakeLN during a fit: every LayerNorm of the module becomes a ``FakeLayerNorm`` when the
    fit is set up, and ``FakeLNSchedule`` (the official per-norm-type gaps) makes them fake
    one by one from the end of the lr warmup, checked against the optimizer step at each
    training batch (the official ``on_step_begin``). A fit shorter than the schedule is a
    ``ConfigError`` before training starts; every norm is fake when it ends."""

    def __init__(self, gap_norm2: int = 2, gap_norm1_qk: int = 2, gap_norm1: int = 3,
                 momentum: float = 0.9, log=None) -> None:
        self.gaps = {"gap_norm2": gap_norm2, "gap_norm1_qk": gap_norm1_qk,
                     "gap_norm1": gap_norm1}
        self.momentum = momentum
        self._log = log
        self.schedule: FakeLNSchedule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not any(isinstance(m, FakeLayerNorm) for m in pl_module.modules()):
            attach_fakeln(pl_module, momentum=self.momentum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # at least one step measures each std first (the official starts from stds measured
        # on data, ``std_dicts``)
        start = max(1, lr_warmup_steps(pl_module))
        self.schedule = FakeLNSchedule(pl_module, start=start, **self.gaps)
        steps = int(trainer.estimated_stepping_batches)
        if steps <= self.schedule.last_step and not trainer.fast_dev_run:  # a dry run: wiring
            raise ConfigError(
                f"LayerNorm removal: the fine-tune has {steps} optimizer steps but the "
                f"removal schedule ends at step {self.schedule.last_step} (lr warmup {start} + "
                f"{len(self.schedule.order)} norms at the official gaps); train longer")
        if self._log is not None:
            self._log(f"LayerNorm removal: {len(self.schedule.order)} norms fake from step "
                      f"{start} to {self.schedule.last_step} of {steps}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch,
                             batch_idx: int) -> None:
        self.schedule.apply(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a dry run takes every removal at once, so the folding stage after it runs too
        self.schedule.apply(self.schedule.last_step if trainer.fast_dev_run
                            else trainer.global_step)
        if not self.schedule.done:
            raise RuntimeError("LayerNorm removal: the fit ended before every norm was fake")

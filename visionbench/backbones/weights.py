"""Weights from local files only: .pt/.pth/.bin through ``torch.load(weights_only=True)`` and
.safetensors through safetensors. Nothing is ever downloaded and nothing is unpickled.

Layouts understood (the first that applies is used):
- a bare state dict, or one wrapped under ``model`` / ``state_dict`` / ``model_state`` (the
  official MAE checkpoints use ``{"model": ...}``, with ``optimizer``, ``epoch``, ``scaler`` and
  the ``argparse.Namespace`` of the script's ``args`` beside it: that one class is allowed to
  unpickle, nothing else; Lightning checkpoints ``state_dict``);
- prefixes ``module.`` (DDP), ``encoder.`` (visionbench's MAE module) and ``backbone.``;
- official MAE keys: the encoder keys equal timm's ViT keys (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``); the decoder keys (``mask_token``,
  ``decoder_*``) belong to the pretraining model and are set aside for it; ``fc_norm.*`` and
  ``head.*`` of a fine-tuned checkpoint are classifier keys and set aside too.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from visionbench.backbones.pos_embed import resize_pos_embed
from visionbench.errors import WeightsError

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
# "_orig_mod.": a torch.compile'd model's state dict (VideoMAE V2's run_mae_pretraining.py)
PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.", "model.")
DECODER_KEYS = ("mask_token", "decoder_", "decoder.", "encoder_to_decoder.")  # MAE, VideoMAE
CLASSIFIER_KEYS = ("fc_norm.", "head.")


@dataclass
class LoadReport:
    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {self.path}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("set aside", self.set_aside),
            ("resized", self.resized),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a local weights file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            with _official_checkpoint_globals():
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise WeightsError(f"{path}: cannot load with weights_only=True ({reason})") from None
    else:
        raise WeightsError(f"{path}: unknown weights format; expected .pt, .pth or .safetensors")
    state = _unwrap(raw, path)
    return {_strip_prefixes(k): v for k, v in state.items()}


# Classes an official training script pickles next to the weights: facebookresearch/mae
# ``util/misc.py`` ``save_model`` stores ``{"model", "optimizer", "epoch", "scaler", "args"}``
# with ``args`` the script's ``argparse.Namespace``. Exactly these are allowed to unpickle
# (torch's safe globals); any other class still makes ``weights_only=True`` refuse the file.
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)


@contextlib.contextmanager
def _official_checkpoint_globals():
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch 2.4: only the process-wide allow-list exists
        torch.serialization.add_safe_globals(list(CHECKPOINT_SAFE_GLOBALS))
        yield
        return
    with safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
        yield


def _unwrap(raw: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(raw, dict):
        tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(raw) // 2:
            return tensors
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
        if inner is None:
            break
        raw = inner
    raise WeightsError(f"{path}: no state dict of tensors found (looked under {WRAPPER_KEYS})")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def split_mae_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """(encoder keys, decoder keys, classifier keys set aside) of an official/ours MAE state."""
    encoder, decoder, aside = {}, {}, []
    for key, value in state.items():
        if key.startswith(DECODER_KEYS):
            decoder[key] = value
        elif key.startswith(CLASSIFIER_KEYS):
            aside.append(key)
        else:
            encoder[key] = value
    return encoder, decoder, aside


HEAD_PREFIXES = ("fc.", "head.")  # torchvision / timm ResNet classifier, visionbench heads


def load_classifier_weights(backbone: nn.Module, head: nn.Linear, path: str | Path) -> str:
    """A whole classifier from a local file: a torchvision or timm ResNet state dict
    (``conv1.*`` ... ``fc.*``) or visionbench's own (``backbone.*`` + ``head.*``). The
    classifier keys go to ``head``, the rest to ``backbone``; every key must match."""
    state = read_state_dict(path)
    head_state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    body = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    for module, part, name in ((backbone, body, "backbone"), (head, head_state, "head")):
        load_exactly(module, part, path, f"{name} keys", " (another class count?)")
    return f"loaded the classifier {path} ({len(state)} tensors)"


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                 what: str, shape_hint: str = "") -> None:
    """Load ``state`` into ``module`` when its keys and shapes are the module's exactly;
    else a WeightsError naming ``path``, ``what`` did not match and a few of the keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(f"{path}: {what} do not match: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise WeightsError(f"{path}: {key} has shape {tuple(value.shape)}, the model "
                               f"expects {tuple(own[key].shape)}{shape_hint}")
    module.load_state_dict(state, strict=True)


def adapt_rgb_stem(weight: torch.Tensor, in_chans: int, rgb_index) -> torch.Tensor:
    """A 3-channel stem kernel ``(out, 3, kh, kw)`` (R, G, B) for ``in_chans`` bands: R, G
    and B go to the bands ``rgb_index`` names (e.g. B04, B03, B02; empty for inputs with no
    RGB bands, e.g. SAR's VV / VH), every other band starts from the mean of the three, and
    the kernel is scaled by ``3 / in_chans`` so a band-uniform input keeps its response
    (timm's ``adapt_input_conv`` scales its repeats the same way)."""
    rgb_index = list(rgb_index)
    if (weight.ndim != 4 or weight.shape[1] != 3 or len(rgb_index) not in (0, 3)
            or any(not 0 <= i < in_chans for i in rgb_index)):
        raise WeightsError(f"channel adaptation needs a (out, 3, kh, kw) stem and 3 band "
                           f"positions, got {tuple(weight.shape)} and {rgb_index}")
    out = weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1)
    if rgb_index:
        out[:, rgb_index] = weight
    return out * (3.0 / in_chans)


def load_backbone_weights(model: nn.Module, path: str | Path, strict: bool = False,
                          stem: str | None = None, rgb_index=()) -> LoadReport:
    """Load a local checkpoint into a timm backbone and report what did not match.

    With ``strict=True`` any missing or unexpected encoder key is an error (the decoder and
    classifier keys are set aside first and never count as unexpected). ``stem`` handles a
    checkpoint whose stem kernel has other input channels than the model (an RGB checkpoint
    for a multispectral model): ``"random"`` sets it aside and keeps the model's own random
    init of that layer, ``"adapt"`` maps an RGB kernel onto the bands (``adapt_rgb_stem``
    with ``rgb_index``, the positions of R, G, B among the model's inputs); both are named
    in the report. None: a mismatch is an error.
    """
    if stem not in (None, "random", "adapt"):
        raise WeightsError(f"stem handling {stem!r} (expected random or adapt)")
    state = read_state_dict(path)
    encoder, decoder, aside = split_mae_state(state)
    report = LoadReport(str(path), set_aside=sorted(list(decoder) + aside))
    own = model.state_dict()
    kept_init = []
    for key, value in list(encoder.items()) if stem else ():
        want = own.get(key)
        if (want is not None and value.ndim == 4 and want.ndim == 4
                and value.shape[1] != want.shape[1] and want.shape[0] == value.shape[0]
                and want.shape[2:] == value.shape[2:]):
            if stem == "random":
                del encoder[key]
                kept_init.append(key)
                report.set_aside.append(key)
            else:
                encoder[key] = adapt_rgb_stem(value, want.shape[1], rgb_index)
                report.resized.append(key)
    if "pos_embed" in encoder and "pos_embed" in own:
        if encoder["pos_embed"].shape != own["pos_embed"].shape:
            grid = tuple(model.patch_embed.grid_size)
            encoder["pos_embed"] = resize_pos_embed(
                encoder["pos_embed"], grid, getattr(model, "num_prefix_tokens", 1)
            )
            report.resized.append("pos_embed")
    for key, value in list(encoder.items()):
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)}"
            )
    result = model.load_state_dict(encoder, strict=False)
    report.missing = sorted(set(result.missing_keys) - set(kept_init))
    report.unexpected = sorted(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"{path}: keys do not match the model: {report.summary()}")
    return report

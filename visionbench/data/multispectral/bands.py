"""The 13 Sentinel-2 MSI bands: names, centre wavelengths, ground resolutions, and band
selection by name into the 13-band order with missing bands zero-padded.

``S2_BANDS`` is ESA's order (B8A after B08), the order of SSL4EO-S12's 13-band inputs and of
SoftCon's ``in_chans=13`` models. EuroSAT-MS files store B8A last (``EUROSAT_FILE_ORDER``,
torchgeo's ``EuroSAT.all_band_names``); BigEarthNet-S2 has no B10 (the cirrus band is
dropped from L2A); So2Sat's ``sen2`` has 10 bands (no B01, B09, B10).
Wavelengths (nm) and resolutions (m) are ESA's Sentinel-2A values
(Sentinel-2 User Handbook, Table 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from visionbench.errors import ConfigError

S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
            "B11", "B12")
WAVELENGTH_NM = dict(zip(S2_BANDS, (443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375,
                                    1610, 2190), strict=True))
RESOLUTION_M = dict(zip(S2_BANDS, (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20),
                        strict=True))
RGB_BANDS = ("B04", "B03", "B02")
EUROSAT_FILE_ORDER = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10",
                      "B11", "B12", "B8A")
BIGEARTHNET_BANDS = tuple(b for b in S2_BANDS if b != "B10")
REFLECTANCE_SCALE = 10000.0  # L1C / L2A digital numbers: reflectance x 10000


def canonical_band(name: str) -> str:
    """``"B8"`` / ``"b08"`` / ``"B8A"`` / ``"S2_B04"`` -> the ``S2_BANDS`` spelling; an unknown
    name is a ``ConfigError`` naming the allowed ones."""
    raw = name.strip().upper().removeprefix("S2_")
    if raw.startswith("B") and raw[1:].isdigit():
        raw = f"B{int(raw[1:]):02d}"
    elif raw in ("B8A", "B08A"):
        raw = "B8A"
    if raw not in S2_BANDS:
        raise ConfigError(f"band {name!r}: not a Sentinel-2 band (expected one of "
                          f"{', '.join(S2_BANDS)})")
    return raw


def band_indices(names: Sequence[str], available: Sequence[str]) -> list[int | None]:
    """For each wanted band, its index in ``available`` (the bands a file holds, in order),
    or None where the file lacks it."""
    have = {canonical_band(b): i for i, b in enumerate(available)}
    return [have.get(canonical_band(b)) for b in names]


def select_bands(data: np.ndarray, available: Sequence[str],
                 wanted: Sequence[str] = S2_BANDS) -> np.ndarray:
    """``(C, H, W)`` holding ``available`` -> ``(len(wanted), H, W)`` in ``wanted``'s order,
    a band the data lacks as zeros, at its own place (SSL4EO-S12's ``linear_BE_moco.py``
    inserts BigEarthNet's B10 so; resize-is-all-you-need's ``PadMissingBands`` puts it before
    B8A instead, out of line with its own statistics; we keep the band order)."""
    if data.shape[0] != len(available):
        raise ConfigError(f"{data.shape[0]} bands in the data, {len(available)} names given")
    out = np.zeros((len(wanted), *data.shape[1:]), dtype=data.dtype)
    for k, index in enumerate(band_indices(wanted, available)):
        if index is not None:
            out[k] = data[index]
    return out

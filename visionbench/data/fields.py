"""Random fields the embedded generators draw textures, backgrounds and maps from."""

from __future__ import annotations

import numpy as np


def smooth_noise(rng: np.random.Generator, n: int, beta: float = 2.0,
                 cutoff: float = 0.25) -> np.ndarray:
    """Zero-mean unit-variance noise on an ``n x n`` torus with a 1/f**beta amplitude
    spectrum (no DC, no frequencies at or above ``cutoff`` cycles a pixel)."""
    f = np.fft.fftfreq(n)
    freq = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    amplitude = np.where((freq > 0) & (freq < cutoff), 1.0 / np.maximum(freq, 1e-9) ** beta,
                         0.0)
    spectrum = (rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))) * amplitude
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.mean()) / (field.std() + 1e-12)

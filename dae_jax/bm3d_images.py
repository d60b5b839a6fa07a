"""BM3D over a stack of images, importing no JAX: what :mod:`dae_jax.baselines` runs
in its worker processes (started with ``spawn``, so each stays small and fork-free)."""

from __future__ import annotations

import numpy as np


def denoise(images: np.ndarray, sigma_psd: float) -> np.ndarray:
    """BM3D (white-noise mode, both stages, one thread: deterministic) of each
    ``[H, W]`` image of ``images`` ``[B, H, W]``, or each colour image of ``[B, H, W, 3]``
    (bm3d's RGB mode: block matching on luminance, opponent colour space); unclipped,
    float64 (as bm3d returns it)."""
    import bm3d

    profile = bm3d.BM3DProfile()
    profile.num_threads = 1  # bm3d's own threads make the result vary from run to run
    profile.nf = 0  # white noise: the classic thresholds; the correlated-noise mode is ~30x slower
    if not len(images):
        return np.zeros(images.shape)
    if images.ndim == 4:
        return np.stack([bm3d.bm3d_rgb(image, sigma_psd, profile=profile) for image in images])
    return np.stack([bm3d.bm3d(image, sigma_psd, profile=profile) for image in images])

"""Image-quality metrics for reconstructions (pixel values in [0, 1]), and ``IMAGE``,
their one registry: evaluation (``metrics.jsonl``: ``test_<name>_noisy`` and
``test_<name>_denoised``), TensorBoard, sweeps and their classical references all
iterate over it. A new metric is a function ``[B, H, W, C] x 2 -> [B]`` and its entry.

The classical denoisers and the linear probe are in ``dae_jax.baselines``."""

from collections.abc import Callable

import dm_pix
import jax
import jax.numpy as jnp


def psnr(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB for each image of a batch ``[B, H, W, C]``."""
    return dm_pix.psnr(images_a, images_b)


def _gaussian_window(size: int, filter_size: int = 11, sigma: float = 1.5) -> jax.Array:
    """``[size - filter_size + 1, size]``: dm-pix's SSIM window as a banded matrix, so
    the 'valid' blur along one axis is one matrix product."""
    half = filter_size // 2
    shift = (2 * half - filter_size + 1) / 2
    taps = jnp.exp(-0.5 * ((jnp.arange(filter_size) - half + shift) / sigma) ** 2)
    taps = taps / jnp.sum(taps)
    rows = jnp.arange(size - filter_size + 1)[:, None]
    offset = jnp.arange(size)[None, :] - rows
    inside = (offset >= 0) & (offset < filter_size)
    # convolve flips the taps; the Gaussian is symmetric, but flip anyway to match exactly.
    return jnp.where(inside, taps[::-1][jnp.clip(offset, 0, filter_size - 1)], 0.0)


def _ssim_blur(images_BxHxWxC: jax.Array) -> jax.Array:
    along_h = _gaussian_window(images_BxHxWxC.shape[-3])
    along_w = _gaussian_window(images_BxHxWxC.shape[-2])
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ih,...hwc->...iwc", along_h, images_BxHxWxC, precision=hi)
    return jnp.einsum("jw,...iwc->...ijc", along_w, out, precision=hi)


def ssim(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Structural similarity for each image of a batch ``[B, H, W, C]``: dm-pix's SSIM
    with its default 11x11 Gaussian window (sigma 1.5), applied as two matrix products
    (the same numbers to float rounding; ~10x faster on CPU than its 1-D convolutions)."""
    return dm_pix.ssim(images_a, images_b, max_val=1.0, filter_fn=_ssim_blur)


def mse(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Mean squared error for each image of a batch."""
    return jnp.mean(jnp.square(images_a - images_b), axis=(1, 2, 3))


def mae(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Mean absolute error for each image of a batch."""
    return jnp.mean(jnp.abs(images_a - images_b), axis=(1, 2, 3))


# name -> per-image metric.
IMAGE: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "psnr": psnr,
    "ssim": ssim,
    "mse": mse,
    "mae": mae,
}


@jax.jit
def means(images: jax.Array, clean: jax.Array) -> dict[str, jax.Array]:
    """Each registered metric's mean over a batch."""
    return {name: jnp.mean(metric(images, clean)) for name, metric in IMAGE.items()}


def scores(images: jax.Array, clean: jax.Array) -> dict[str, float]:
    """Each registered metric's mean over a batch, as Python floats."""
    return {name: float(value) for name, value in means(jnp.asarray(images), clean).items()}

"""Image-quality metrics for reconstructions (pixel values in [0, 1])."""

import math
from collections.abc import Callable
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


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


# ------------------------------------------------------- classical references


def clip_only(noisy: jax.Array) -> jax.Array:
    """The simplest denoiser: clip to the valid pixel range."""
    return jnp.clip(noisy, 0.0, 1.0)


def _pad_edges(images: jax.Array, width: int) -> jax.Array:
    """Mirror the edges (edge pixel included), so filters do not darken the borders."""
    return jnp.pad(images, ((0, 0), (width, width), (width, width), (0, 0)), "symmetric")


def gaussian_blur(noisy: jax.Array, sigma: float) -> jax.Array:
    """dm-pix's Gaussian blur of the clipped images (``sigma`` in pixels), edges mirrored."""
    half = math.ceil(3 * sigma)
    padded = _pad_edges(clip_only(noisy), half)
    return jax.vmap(
        lambda image: dm_pix.gaussian_blur(image, sigma, 2 * half + 1, padding="VALID")
    )(padded)


def median_filter(noisy: jax.Array, size: int) -> jax.Array:
    """``size x size`` median of the clipped images, edges mirrored (dm-pix has none)."""
    half = size // 2
    padded = _pad_edges(clip_only(noisy), half)
    height, width = noisy.shape[1:3]
    windows = [
        padded[:, dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)
    ]
    return jnp.median(jnp.stack(windows), axis=0)


CLASSICAL: dict[str, tuple[Callable[..., jax.Array], tuple[Any, ...]]] = {
    "clip": (clip_only, (None,)),
    "gaussian_blur": (gaussian_blur, (0.5, 0.75, 1.0, 1.5, 2.0)),
    "median_filter": (median_filter, (3, 5)),
}


def best_classical(noisy: jax.Array, clean: jax.Array) -> dict[str, dict[str, float]]:
    """Each classical reference with its best parameter (by mean PSNR) on these images."""
    best: dict[str, dict[str, float]] = {}
    for name, (denoise, parameters) in CLASSICAL.items():
        for parameter in parameters:
            out = denoise(noisy) if parameter is None else denoise(noisy, parameter)
            score = float(jnp.mean(psnr(out, clean)))
            if name not in best or score > best[name]["psnr"]:
                best[name] = {
                    "parameter": float("nan") if parameter is None else float(parameter),
                    "psnr": score,
                    "ssim": float(jnp.mean(ssim(out, clean))),
                    "mse": float(jnp.mean(mse(out, clean))),
                }
    return best


# ------------------------------------------------------------------- probes


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    num_classes: int = 10,
    steps: int = 500,
    learning_rate: float = 0.05,
    weight_decay: float = 1e-4,
) -> dict[str, float]:
    """Multinomial logistic regression (optax Adam, full batch) on standardised features.

    The question of Vincent et al. (2008, 2010): how linearly separable are the
    classes in a representation? Returns train and test accuracy.
    """
    train_y = jnp.asarray(train_labels, jnp.int32)
    test_y = jnp.asarray(test_labels, jnp.int32)
    train_x = jnp.asarray(train_features, jnp.float32).reshape(len(train_y), -1)
    test_x = jnp.asarray(test_features, jnp.float32).reshape(len(test_y), -1)
    mean, std = jnp.mean(train_x, axis=0), jnp.std(train_x, axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    params = {
        "w": jnp.zeros((train_x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss_of(params: dict[str, jax.Array]) -> jax.Array:
        logits = train_x @ params["w"] + params["b"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, train_y))

    def step(carry: tuple[Any, Any], _: Any) -> tuple[tuple[Any, Any], None]:
        params, opt_state = carry
        grads = jax.grad(loss_of)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)

    def accuracy(x: jax.Array, y: jax.Array) -> float:
        predicted = jnp.argmax(x @ params["w"] + params["b"], axis=1)
        return float(jnp.mean(predicted == y))

    return {
        "train_accuracy": accuracy(train_x, train_y),
        "test_accuracy": accuracy(test_x, test_y),
    }

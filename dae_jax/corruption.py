"""Input corruption for denoising autoencoders.

Every function is pure: ``(key, images, level) -> (noisy_images, corrupted_mask)``.
``images`` are floats in [0, 1] of any shape; ``corrupted_mask`` is a bool array of
the same shape marking the pixels the corruption touched. ``level`` may be a traced
value, so a sweep over levels reuses one compiled program.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Corruption = Callable[..., tuple[jax.Array, jax.Array]]


def gaussian(
    key: jax.Array, images: jax.Array, level: Any, *, clip: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Additive N(0, level^2) noise on every pixel; ``clip`` keeps the result in [0, 1]."""
    noise = jax.random.normal(key, images.shape, images.dtype)
    noisy_images = images + jnp.asarray(level, images.dtype) * noise
    if clip:
        noisy_images = jnp.clip(noisy_images, 0.0, 1.0)
    return noisy_images, jnp.ones(images.shape, bool)


def masking(
    key: jax.Array, images: jax.Array, level: Any, *, clip: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Masking noise (Vincent et al. 2008): each pixel set to 0 with probability ``level``."""
    del clip  # values stay in the input's range
    mask = jax.random.bernoulli(key, jnp.asarray(level, jnp.float32), images.shape)
    return jnp.where(mask, jnp.zeros_like(images), images), mask


def salt_and_pepper(
    key: jax.Array, images: jax.Array, level: Any, *, clip: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Each pixel, with probability ``level``, replaced by 0 or 1 with equal odds."""
    del clip
    mask_key, salt_key = jax.random.split(key)
    mask = jax.random.bernoulli(mask_key, jnp.asarray(level, jnp.float32), images.shape)
    salt = jax.random.bernoulli(salt_key, 0.5, images.shape).astype(images.dtype)
    return jnp.where(mask, salt, images), mask


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian": gaussian,
    "masking": masking,
    "salt_and_pepper": salt_and_pepper,
}
# Each kind's valid levels (the config's check): lowest, highest, and what to say otherwise.
_FRACTION = "corrupts a fraction of the pixels: it must be in [0, 1]"
LEVELS: dict[str, tuple[float, float, str]] = {
    "gaussian": (
        0.0,
        math.inf,
        "the Gaussian noise's standard deviation must be a finite number >= 0",
    ),
    "masking": (0.0, 1.0, f"masking {_FRACTION}"),
    "salt_and_pepper": (0.0, 1.0, f"salt_and_pepper {_FRACTION}"),
}


def corrupt(
    kind: str, key: jax.Array, images: jax.Array, level: Any, *, clip: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Dispatches on ``kind`` (a Python string, static under jit)."""
    return CORRUPTIONS[kind](key, images, level, clip=clip)

"""Image-quality metrics for reconstructions (pixel values in [0, 1])."""

import dm_pix
import jax
import jax.numpy as jnp


def psnr(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Peak signal-to-noise ratio in dB for each image of a batch ``[B, H, W, C]``."""
    return dm_pix.psnr(images_a, images_b)


def ssim(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Structural similarity for each image of a batch ``[B, H, W, C]`` (dm-pix defaults)."""
    return dm_pix.ssim(images_a, images_b, max_val=1.0)


def mse(images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Mean squared error for each image of a batch."""
    return jnp.mean(jnp.square(images_a - images_b), axis=(1, 2, 3))

"""Reconstruction losses, computed from the decoder's logits against the clean images.

Both are per-pixel means, so their values compare with PyTorch's ``MSELoss`` and
``BCELoss`` (reduction="mean") on the same data.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

LossPerExample = Callable[[ArrayLike, ArrayLike], jax.Array]


def _mean_over_pixels(values: jax.Array) -> jax.Array:
    return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def mse_per_example(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Mean squared error of ``sigmoid(logits)`` against ``targets``, one value per example."""
    return _mean_over_pixels(optax.squared_error(jax.nn.sigmoid(logits), jnp.asarray(targets)))


def bce_per_example(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Binary cross-entropy from logits (stable for any logit), one value per example."""
    return _mean_over_pixels(
        optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    )


PER_EXAMPLE: dict[str, LossPerExample] = {"mse": mse_per_example, "bce": bce_per_example}


def per_example(name: str, outputs: ArrayLike, targets: ArrayLike, predicts: str) -> jax.Array:
    """The loss ``name`` of a model's ``outputs``, logits or pixels (``predicts``; see
    ``dae_jax.models``). A model that predicts pixels (DnCNN) takes the MSE on its
    unclipped output; the configs refuse BCE for it."""
    if predicts == "pixels":
        if name != "mse":
            raise ValueError(f"a model that predicts pixels takes the mse loss, not {name}")
        return _mean_over_pixels(optax.squared_error(jnp.asarray(outputs), jnp.asarray(targets)))
    return PER_EXAMPLE[name](outputs, targets)


def mse(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Per-pixel mean squared error of the reconstruction, as ``nn.MSELoss()``."""
    return jnp.mean(mse_per_example(logits, targets))


def bce(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Per-pixel mean binary cross-entropy, as ``nn.BCELoss()`` on ``sigmoid(logits)``."""
    return jnp.mean(bce_per_example(logits, targets))

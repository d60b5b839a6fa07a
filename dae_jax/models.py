"""The MLP denoising autoencoder (the tutorial's 784-512-256-128, mirrored)."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

IMAGE_SHAPE = (28, 28, 1)


class MlpDae(nnx.Module):
    """ReLU MLP encoder and its mirror image as decoder; the last layer returns logits.

    Inputs are images ``[B, 28, 28, 1]`` or flat ``[B, 784]`` with values in [0, 1].
    ``encode`` gives the codes ``[B, hidden[-1]]`` (after ReLU, as in the tutorial);
    ``decode`` gives pixel values in [0, 1] as images ``[B, 28, 28, 1]``; calling the
    model returns the reconstruction in the layout of its input.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (512, 256, 128),
        *,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(image_shape)
        widths = (math.prod(self.image_shape), *hidden)
        self.encoder = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        mirrored = widths[::-1]
        self.decoder = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(mirrored[:-1], mirrored[1:], strict=True)]
        )

    def encode(self, x: ArrayLike) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        h_BxD = x.reshape(x.shape[0], -1)
        for layer in self.encoder:
            h_BxD = nnx.relu(layer(h_BxD))
        return h_BxD

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        """Logits of the reconstruction, flat ``[B, 784]``."""
        h_BxD = jnp.asarray(codes_BxZ, jnp.float32)
        for layer in self.decoder[:-1]:
            h_BxD = nnx.relu(layer(h_BxD))
        return self.decoder[-1](h_BxD)

    def decode(self, codes_BxZ: ArrayLike) -> jax.Array:
        pixels_BxP = jax.nn.sigmoid(self.decode_logits(codes_BxZ))
        return pixels_BxP.reshape(pixels_BxP.shape[0], *self.image_shape)

    def logits(self, x: ArrayLike) -> jax.Array:
        """Reconstruction logits in the layout of ``x``: what the losses take."""
        return self.decode_logits(self.encode(x)).reshape(jnp.shape(x))

    def __call__(self, x: ArrayLike) -> jax.Array:
        return jax.nn.sigmoid(self.logits(x))


def num_params(model: nnx.Module) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create(config, *, key: jax.Array) -> MlpDae:
    """The model a config describes, initialised from ``key``."""
    return MlpDae(tuple(config.model.hidden), rngs=nnx.Rngs(params=key))

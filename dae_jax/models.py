"""Denoising autoencoders: the tutorial's MLP (784-512-256-128, mirrored), the same MLP
with tied weights, and a small convolutional DAE with optional skip connections.

Every model has the same contract: ``encode(x)`` gives flat codes ``[B, Z]``,
``decode(codes)`` images ``[B, 28, 28, 1]`` in [0, 1], ``logits(x)`` the reconstruction's
logits in the layout of ``x`` (what the losses take), and calling it the reconstruction.
``create(config, key=...)`` picks the model from ``config.model.kind``."""

import functools
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
        tied_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(image_shape)
        self.tied_weights = tied_weights
        widths = (math.prod(self.image_shape), *hidden)
        self.encoder = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        mirrored = widths[::-1]
        if tied_weights:
            # Vincent et al.: decoder layer i is the transpose of the mirrored encoder
            # layer's kernel (one parameter, used twice) plus a bias of its own.
            self.decoder_bias = nnx.List([nnx.Param(jnp.zeros((b,))) for b in mirrored[1:]])
        else:
            self.decoder = nnx.List(
                [
                    nnx.Linear(a, b, rngs=rngs)
                    for a, b in zip(mirrored[:-1], mirrored[1:], strict=True)
                ]
            )

    def _decoder_layers(self) -> list:
        if not self.tied_weights:
            return list(self.decoder)
        return [
            functools.partial(_tied, layer.kernel, bias)
            for layer, bias in zip(reversed(self.encoder), self.decoder_bias, strict=True)
        ]

    def encode(self, x: ArrayLike) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        h_BxD = x.reshape(x.shape[0], -1)
        for layer in self.encoder:
            h_BxD = nnx.relu(layer(h_BxD))
        return h_BxD

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        """Logits of the reconstruction, flat ``[B, 784]``."""
        h_BxD = jnp.asarray(codes_BxZ, jnp.float32)
        *hidden, last = self._decoder_layers()
        for layer in hidden:
            h_BxD = nnx.relu(layer(h_BxD))
        return last(h_BxD)

    def decode(self, codes_BxZ: ArrayLike) -> jax.Array:
        pixels_BxP = jax.nn.sigmoid(self.decode_logits(codes_BxZ))
        return pixels_BxP.reshape(pixels_BxP.shape[0], *self.image_shape)

    def logits(self, x: ArrayLike) -> jax.Array:
        """Reconstruction logits in the layout of ``x``: what the losses take."""
        return self.decode_logits(self.encode(x)).reshape(jnp.shape(x))

    def __call__(self, x: ArrayLike) -> jax.Array:
        return jax.nn.sigmoid(self.logits(x))


def _tied(kernel_DxH: nnx.Param, bias_D: nnx.Param, h_BxH: jax.Array) -> jax.Array:
    return h_BxH @ kernel_DxH[...].T + bias_D[...]


class ConvDae(nnx.Module):
    """A small convolutional DAE.

    Encoder: a 3x3 convolution to ``channels[0]`` maps at full resolution, then one
    stride-2 3x3 convolution per further entry of ``channels`` (28 -> 14 -> 7 for three
    entries), ReLU after each; the code is the last feature map, flattened
    (``7 * 7 * channels[-1]`` numbers). Decoder: the mirror image with stride-2
    transposed convolutions, then a 3x3 convolution to logits. ``convs_per_level > 1``
    adds that many minus one 3x3 convolutions after each level's first layer. With
    ``skip=True`` each decoder level adds the encoder's feature map of the same
    resolution (a U-Net with additive skips), so fine detail need not pass through the
    code; ``decode`` then needs those maps too, and only calling the model (or
    ``logits``) reconstructs.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 64),
        *,
        skip: bool = False,
        convs_per_level: int = 1,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(image_shape)
        self.skip = skip
        channels = tuple(channels)
        scale = 2 ** (len(channels) - 1)
        if self.image_shape[0] % scale or self.image_shape[1] % scale:
            raise ValueError(
                f"{len(channels)} conv levels halve a {self.image_shape[0]}x"
                f"{self.image_shape[1]} image {len(channels) - 1} times, which must divide "
                "it evenly; give fewer channels"
            )
        self.code_shape = (
            self.image_shape[0] // scale,
            self.image_shape[1] // scale,
            channels[-1],
        )
        c_in = self.image_shape[-1]
        self.encoder = nnx.List(
            [nnx.Conv(c_in, channels[0], (3, 3), rngs=rngs)]
            + [
                nnx.Conv(a, b, (3, 3), strides=2, rngs=rngs)
                for a, b in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        self.decoder = nnx.List(
            [
                nnx.ConvTranspose(b, a, (3, 3), strides=2, rngs=rngs)
                for a, b in zip(channels[-2::-1], channels[:0:-1], strict=True)
            ]
        )
        # convs_per_level - 1 extra 3x3 convolutions after each level's first layer.
        extra = convs_per_level - 1
        self.encoder_extra = nnx.List(
            [nnx.List([nnx.Conv(c, c, (3, 3), rngs=rngs) for _ in range(extra)]) for c in channels]
        )
        self.decoder_extra = nnx.List(
            [
                nnx.List([nnx.Conv(c, c, (3, 3), rngs=rngs) for _ in range(extra)])
                for c in channels[-2::-1]
            ]
        )
        self.output = nnx.Conv(channels[0], c_in, (3, 3), rngs=rngs)

    def _images(self, x: ArrayLike) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        return x.reshape(x.shape[0], *self.image_shape)

    def features(self, x: ArrayLike) -> list[jax.Array]:
        """The encoder's feature maps, full resolution first; the last is the code."""
        h = self._images(x)
        maps = []
        for layer, extra in zip(self.encoder, self.encoder_extra, strict=True):
            h = nnx.relu(layer(h))
            for conv in extra:
                h = nnx.relu(conv(h))
            maps.append(h)
        return maps

    def encode(self, x: ArrayLike) -> jax.Array:
        code = self.features(x)[-1]
        return code.reshape(code.shape[0], -1)

    def _decode_maps(self, code: jax.Array, skips: Sequence[jax.Array] | None) -> jax.Array:
        h = code.reshape(code.shape[0], *self.code_shape)
        for i, (layer, extra) in enumerate(zip(self.decoder, self.decoder_extra, strict=True)):
            h = nnx.relu(layer(h))
            if skips is not None:
                h = h + skips[-2 - i]
            for conv in extra:
                h = nnx.relu(conv(h))
        return self.output(h)

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        if self.skip:
            raise ValueError(
                "a conv DAE with skip connections decodes from the encoder's feature maps as "
                "well as the code: call the model on the input (or use model.logits) instead"
            )
        logits = self._decode_maps(jnp.asarray(codes_BxZ, jnp.float32), None)
        return logits.reshape(logits.shape[0], -1)

    def decode(self, codes_BxZ: ArrayLike) -> jax.Array:
        pixels = jax.nn.sigmoid(self.decode_logits(codes_BxZ))
        return pixels.reshape(pixels.shape[0], *self.image_shape)

    def logits(self, x: ArrayLike) -> jax.Array:
        maps = self.features(x)
        logits = self._decode_maps(maps[-1], maps if self.skip else None)
        return logits.reshape(jnp.shape(x))

    def __call__(self, x: ArrayLike) -> jax.Array:
        return jax.nn.sigmoid(self.logits(x))


KINDS = ("mlp", "conv")
Dae = MlpDae | ConvDae


def num_params(model: nnx.Module) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def create(config, *, key: jax.Array) -> Dae:
    """The model a config describes, initialised from ``key``. Configs saved before
    ``model.kind`` existed describe the MLP."""
    model = config.model
    rngs = nnx.Rngs(params=key)
    if model.get("kind", "mlp") == "conv":
        return ConvDae(
            tuple(model.channels),
            skip=bool(model.skip),
            convs_per_level=int(model.get("convs_per_level", 1)),
            rngs=rngs,
        )
    return MlpDae(
        tuple(model.hidden), tied_weights=bool(model.get("tied_weights", False)), rngs=rngs
    )

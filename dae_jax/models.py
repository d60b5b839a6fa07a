"""Denoising autoencoders: the tutorial's MLP (784-512-256-128, mirrored), the same MLP
with tied weights, a convolutional DAE with optional skip connections, and DnCNN (the
denoising field's residual network, Zhang et al. 2017).

Every model has the same contract, for images ``[B, H, W, C]`` with values in [0, 1]:
``outputs(x)`` is what the losses take, in the layout of ``x``: logits for the
sigmoid-output autoencoders (``predicts = "logits"``), pixel values for DnCNN
(``predicts = "pixels"``); ``to_pixels(outputs)`` maps them into [0, 1]; calling the model
is ``to_pixels(outputs(x))``. ``encode(x)`` gives flat codes ``[B, Z]`` and ``decode``
images. ``image_shape`` is the ``(H, W, C)`` the model was built for: the MLP takes that
size only; the conv DAE and DnCNN are fully convolutional and take any ``H, W`` with ``C``
channels. ``create(config, key=...)`` picks the model from ``config.model.kind``.

Precision (``config.precision``; Flax's ``dtype`` / ``param_dtype`` convention): a
model's ``dtype`` is what it computes in (``jnp.bfloat16`` for mixed precision, None
for float32); its parameters are float32 always, so its gradients and the optimizer's
state are too; ``outputs``, ``encode`` and ``decode`` return float32 whatever ``dtype``.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import ArrayLike

from dae_jax.errors import UserError
from dae_jax.fast_conv import conv_general_dilated, conv_transpose

IMAGE_SHAPE = (28, 28, 1)  # the tutorial's images, and what configs saved without a shape mean
# config.precision -> the models' compute dtype (None: float32, flax's default).
PRECISIONS: dict[str, jnp.dtype | None] = {"float32": None, "bfloat16": jnp.dtype(jnp.bfloat16)}


class InputError(UserError, ValueError):
    """Images a model cannot take, or a call it does not support: one line, what to do."""


def _as_images(x: ArrayLike, channels: int, what: str) -> jax.Array:
    """``x`` as float32 ``[B, H, W, C]``, refusing a wrong rank, channel count or dtype."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
        raise InputError(
            f"{what} takes float images in [0, 1], not {dtype}; convert uint8 images with "
            "x.astype('float32') / 255"
        )
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != channels:
        raise InputError(
            f"{what} takes images [B, H, W, {channels}], not an array of shape {tuple(x.shape)}"
        )
    return x


class _Dae(nnx.Module):
    """The contract every model keeps (see the module's docstring); a sigmoid-output
    autoencoder defines ``logits`` and ``decode_logits``, and inherits the rest."""

    image_shape: tuple[int, ...]
    predicts: ClassVar[str] = "logits"
    fully_convolutional: ClassVar[bool] = True

    def outputs(self, x: ArrayLike) -> jax.Array:
        return self.logits(x)

    def to_pixels(self, outputs: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(outputs)

    def decode(self, codes_BxZ: ArrayLike) -> jax.Array:
        pixels = jax.nn.sigmoid(self.decode_logits(codes_BxZ))
        return pixels.reshape(pixels.shape[0], *self.image_shape)

    def __call__(self, x: ArrayLike) -> jax.Array:
        return self.to_pixels(self.outputs(x))

    def logits(self, x: ArrayLike) -> jax.Array:
        raise NotImplementedError

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        raise NotImplementedError


class MlpDae(_Dae):
    """ReLU MLP encoder and its mirror image as decoder; the last layer returns logits.

    Inputs are images ``[B, *image_shape]`` (28x28x1 for the tutorial) or flat
    ``[B, H * W * C]`` with values in [0, 1]. ``encode`` gives the codes
    ``[B, hidden[-1]]`` (after ReLU, as in the tutorial); ``decode`` gives pixel values in
    [0, 1] as images ``[B, *image_shape]``; calling the model returns the reconstruction
    in the layout of its input.
    """

    fully_convolutional: ClassVar[bool] = False

    def __init__(
        self,
        hidden: Sequence[int] = (512, 256, 128),
        *,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        tied_weights: bool = False,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.image_shape, self.tied_weights, self.dtype = tuple(image_shape), tied_weights, dtype
        widths = (math.prod(self.image_shape), *hidden)
        linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.encoder = nnx.List(
            [linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
        )
        mirrored = widths[::-1]
        if tied_weights:
            # Vincent et al.: decoder layer i is the transpose of the mirrored encoder
            # layer's kernel (one parameter, used twice) plus a bias of its own.
            self.decoder_bias = nnx.List([nnx.Param(jnp.zeros((b,))) for b in mirrored[1:]])
        else:
            self.decoder = nnx.List(
                [linear(a, b) for a, b in zip(mirrored[:-1], mirrored[1:], strict=True)]
            )

    def _decoder_layers(self) -> list:
        if not self.tied_weights:
            return list(self.decoder)
        return [
            functools.partial(_tied, layer.kernel, bias, self.dtype)
            for layer, bias in zip(reversed(self.encoder), self.decoder_bias, strict=True)
        ]

    def _flat(self, x: ArrayLike) -> jax.Array:
        shape = tuple(jnp.shape(x))
        size = math.prod(self.image_shape)
        if shape[1:] not in (self.image_shape, (size,)):
            raise InputError(
                f"this MLP takes images [B, {', '.join(map(str, self.image_shape))}] (or flat "
                f"[B, {size}]), not an array of shape {shape}; resize the images first"
            )
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise InputError(
                f"the model takes float images in [0, 1], not {jnp.asarray(x).dtype}; convert "
                "uint8 images with x.astype('float32') / 255"
            )
        x = jnp.asarray(x, jnp.float32)
        return x.reshape(x.shape[0], -1)

    def _codes(self, x: ArrayLike) -> jax.Array:
        h_BxD = self._flat(x)
        for layer in self.encoder:
            h_BxD = nnx.relu(layer(h_BxD))
        return h_BxD  # in the compute dtype

    def encode(self, x: ArrayLike) -> jax.Array:
        return self._codes(x).astype(jnp.float32)

    def _decode_logits(self, h_BxD: jax.Array) -> jax.Array:
        *hidden, last = self._decoder_layers()
        for layer in hidden:
            h_BxD = nnx.relu(layer(h_BxD))
        return last(h_BxD).astype(jnp.float32)

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        """Logits of the reconstruction, flat ``[B, 784]``."""
        return self._decode_logits(jnp.asarray(codes_BxZ, jnp.float32))

    def logits(self, x: ArrayLike) -> jax.Array:
        """Reconstruction logits in the layout of ``x``: what the losses take."""
        return self._decode_logits(self._codes(x)).reshape(jnp.shape(x))


def _tied(
    kernel_DxH: nnx.Param, bias_D: nnx.Param, dtype: jnp.dtype | None, h_BxH: jax.Array
) -> jax.Array:
    h_BxH, kernel, bias = nnx.nn.dtypes.promote_dtype(
        (h_BxH, kernel_DxH[...], bias_D[...]), dtype=dtype
    )
    return h_BxH @ kernel.T + bias


class ConvDae(_Dae):
    """A convolutional DAE, fully convolutional.

    Encoder: a 3x3 convolution to ``channels[0]`` maps at full resolution, then one
    stride-2 3x3 convolution per further entry of ``channels`` (28 -> 14 -> 7 for three
    entries), ReLU after each; the code is the last feature map, flattened
    (``7 * 7 * channels[-1]`` numbers at 28x28). Decoder: the mirror image with stride-2
    transposed convolutions, then a 3x3 convolution to logits. ``convs_per_level > 1``
    adds that many minus one 3x3 convolutions after each level's first layer. With
    ``skip=True`` each decoder level adds the encoder's feature map of the same
    resolution (a U-Net with additive skips), so fine detail need not pass through the
    code; ``decode`` then needs those maps too, and only calling the model (or
    ``logits``) reconstructs.

    Any height and width: an image the strides do not divide is padded (edge pixels
    repeated) to the next multiple of ``2 ** (len(channels) - 1)`` and the result cropped
    back. ``decode`` of flat codes assumes ``image_shape``, the size it was built for.

    The layers are ``nnx.Conv`` / ``nnx.ConvTranspose``; with ``fast_convs`` (the
    default) they compute through :mod:`dae_jax.fast_conv`, the same function from the
    same parameters with kernel gradients XLA:CPU runs fast; ``fast_convs=False`` runs
    the layers as flax writes them.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 64),
        *,
        skip: bool = False,
        convs_per_level: int = 1,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        fast_convs: bool = True,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.image_shape, self.skip, self.fast_convs = tuple(image_shape), skip, fast_convs
        conv = _conv_layer(fast_convs, dtype, rngs)
        channels = tuple(channels)
        self.scale = 2 ** (len(channels) - 1)
        self.code_shape = (
            -(-self.image_shape[0] // self.scale),
            -(-self.image_shape[1] // self.scale),
            channels[-1],
        )
        c_in = self.image_shape[-1]
        self.encoder = nnx.List(
            [conv(c_in, channels[0], (3, 3))]
            + [
                conv(a, b, (3, 3), strides=2)
                for a, b in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        self.decoder = nnx.List(
            [
                nnx.ConvTranspose(
                    b, a, (3, 3), strides=2, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
                )
                for a, b in zip(channels[-2::-1], channels[:0:-1], strict=True)
            ]
        )
        # convs_per_level - 1 extra 3x3 convolutions after each level's first layer.
        extra = convs_per_level - 1
        self.encoder_extra = nnx.List(
            [nnx.List([conv(c, c, (3, 3)) for _ in range(extra)]) for c in channels]
        )
        self.decoder_extra = nnx.List(
            [nnx.List([conv(c, c, (3, 3)) for _ in range(extra)]) for c in channels[-2::-1]]
        )
        self.output = conv(channels[0], c_in, (3, 3))

    def _images(self, x: ArrayLike) -> jax.Array:
        """``x`` as images, flat ``[B, H * W * C]`` of the built size included, padded to
        a size the strides divide."""
        if jnp.ndim(x) == 2 and jnp.shape(x)[1] == math.prod(self.image_shape):
            x = jnp.reshape(x, (jnp.shape(x)[0], *self.image_shape))
        images = _as_images(x, self.image_shape[-1], "this conv DAE")
        height, width = images.shape[1:3]
        pad_h, pad_w = -height % self.scale, -width % self.scale
        if pad_h or pad_w:
            images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        return images

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
        return code.reshape(code.shape[0], -1).astype(jnp.float32)

    def _decode_maps(self, code: jax.Array, skips: Sequence[jax.Array] | None) -> jax.Array:
        h = code
        for i, (layer, extra) in enumerate(zip(self.decoder, self.decoder_extra, strict=True)):
            h = nnx.relu(conv_transpose(layer, h) if self.fast_convs else layer(h))
            if skips is not None:
                h = h + skips[-2 - i]
            for conv in extra:
                h = nnx.relu(conv(h))
        return self.output(h).astype(jnp.float32)

    def decode_logits(self, codes_BxZ: ArrayLike) -> jax.Array:
        if self.skip:
            raise InputError(
                "a conv DAE with skip connections decodes from the encoder's feature maps as "
                "well as the code: call the model on the input (or use model.logits) instead"
            )
        codes = jnp.asarray(codes_BxZ, jnp.float32)
        logits = self._decode_maps(codes.reshape(codes.shape[0], *self.code_shape), None)
        logits = logits[:, : self.image_shape[0], : self.image_shape[1]]
        return logits.reshape(logits.shape[0], -1)

    def logits(self, x: ArrayLike) -> jax.Array:
        maps = self.features(x)
        logits = self._decode_maps(maps[-1], maps if self.skip else None)
        if jnp.ndim(x) == 2:
            return logits.reshape(jnp.shape(x))
        return logits[:, : jnp.shape(x)[1], : jnp.shape(x)[2]]


def _conv_layer(fast_convs: bool, dtype: jnp.dtype | None, rngs: nnx.Rngs) -> Callable:
    """``nnx.Conv`` with float32 parameters computing in ``dtype``: through
    :mod:`dae_jax.fast_conv` with ``fast_convs``, else as flax writes it."""
    convolve = conv_general_dilated if fast_convs else jax.lax.conv_general_dilated
    return functools.partial(
        nnx.Conv, conv_general_dilated=convolve, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class DnCnn(_Dae):
    """DnCNN (Zhang et al. 2017): ``depth`` 3x3 convolutions of ``features`` maps with
    ReLU between them predict the noise, which is subtracted from the input (residual
    learning); the output is pixels, not logits, so its loss is the MSE on pixels.
    Without the paper's batch normalisation: each member of a population is a pure
    function of its parameters (no running statistics), and Adam trains it at these
    depths. Fully convolutional, no strides: any ``H, W``.

    ``encode`` gives the last hidden feature map, flattened (what a probe would read);
    there is no decoder from codes.
    """

    predicts: ClassVar[str] = "pixels"

    def __init__(
        self,
        depth: int = 17,
        features: int = 64,
        *,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        fast_convs: bool = True,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(image_shape)
        conv = functools.partial(_conv_layer(fast_convs, dtype, rngs), kernel_size=(3, 3))
        c_in = self.image_shape[-1]
        widths = (c_in, *([features] * (depth - 1)), c_in)
        self.layers = nnx.List([conv(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])

    def _hidden(self, x: jax.Array) -> jax.Array:
        h = x
        for layer in self.layers[:-1]:
            h = nnx.relu(layer(h))
        return h

    def noise(self, x: ArrayLike) -> jax.Array:
        """The predicted noise ``[B, H, W, C]``."""
        images = _as_images(x, self.image_shape[-1], "this DnCNN")
        return self.layers[-1](self._hidden(images)).astype(jnp.float32)

    def outputs(self, x: ArrayLike) -> jax.Array:
        """The denoised images, unclipped: the noisy input minus the predicted noise."""
        return _as_images(x, self.image_shape[-1], "this DnCNN") - self.noise(x)

    def to_pixels(self, outputs: jax.Array) -> jax.Array:
        return jnp.clip(outputs, 0.0, 1.0)

    def encode(self, x: ArrayLike) -> jax.Array:
        h = self._hidden(_as_images(x, self.image_shape[-1], "this DnCNN"))
        return h.reshape(h.shape[0], -1).astype(jnp.float32)

    def decode(self, codes_BxZ: ArrayLike) -> jax.Array:
        raise InputError(
            "DnCNN has no decoder from codes: it predicts the noise of its input; call the "
            "model on the noisy images instead"
        )


@dataclasses.dataclass(frozen=True)
class Kind:
    """A model kind: how a config's ``model`` block builds it and names it. A new kind is
    one entry here (plus its config keys and their checks in ``dae_jax.configs``)."""

    # (config.model, input shape, compute dtype, rngs) -> the model
    build: Callable[
        [ml_collections.ConfigDict, tuple[int, int, int], jnp.dtype | None, nnx.Rngs], nnx.Module
    ]
    describe: Callable[[ml_collections.ConfigDict], str]
    predicts: str = "logits"  # what the model's ``outputs`` are: "logits" or "pixels"
    fully_convolutional: bool = False


_Shape = tuple[int, int, int]


def _mlp(model: ml_collections.ConfigDict, shape: _Shape, dtype: Any, rngs: nnx.Rngs) -> MlpDae:
    return MlpDae(
        tuple(model.hidden),
        image_shape=shape,
        tied_weights=bool(model.get("tied_weights", False)),
        dtype=dtype,
        rngs=rngs,
    )


def _conv(model: ml_collections.ConfigDict, shape: _Shape, dtype: Any, rngs: nnx.Rngs) -> ConvDae:
    return ConvDae(
        tuple(model.channels),
        skip=bool(model.skip),
        convs_per_level=int(model.get("convs_per_level", 1)),
        image_shape=shape,
        dtype=dtype,
        rngs=rngs,
    )


def _dncnn(model: ml_collections.ConfigDict, shape: _Shape, dtype: Any, rngs: nnx.Rngs) -> DnCnn:
    return DnCnn(int(model.depth), int(model.features), image_shape=shape, dtype=dtype, rngs=rngs)


KINDS: dict[str, Kind] = {
    "mlp": Kind(
        _mlp,
        lambda m: f"mlp {tuple(m.hidden)}" + (" tied" if m.get("tied_weights") else ""),
    ),
    "conv": Kind(
        _conv,
        lambda m: (
            f"conv {tuple(m.channels)} x{m.get('convs_per_level', 1)}"
            + (" with skips" if m.skip else "")
        ),
        fully_convolutional=True,
    ),
    "dncnn": Kind(
        _dncnn,
        lambda m: f"dncnn depth {m.depth} x {m.features}",
        predicts="pixels",
        fully_convolutional=True,
    ),
}
Dae = MlpDae | ConvDae | DnCnn


def num_params(model: nnx.Module) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def kind(config: ml_collections.ConfigDict) -> Kind:
    """Configs saved before ``model.kind`` existed describe the MLP."""
    return KINDS[config.model.get("kind", "mlp")]


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images the model trains on: ``data.patch_size`` square patches
    when set, else the data's images (``data.image_shape``; configs saved before it
    existed are 28x28x1). Fully convolutional models take other sizes too."""
    data = config.data
    shape = tuple(int(n) for n in (data.get("image_shape") or IMAGE_SHAPE))
    patch = int(data.get("patch_size", 0) or 0)
    if patch:
        return (patch, patch, shape[-1])
    return shape  # type: ignore[return-value]


def create(config: ml_collections.ConfigDict, *, key: jax.Array) -> Dae:
    """The model a config describes, initialised from ``key``, computing in
    ``config.precision`` (configs saved before it existed: float32)."""
    return kind(config).build(  # type: ignore[return-value]
        config.model, input_shape(config), compute_dtype(config), nnx.Rngs(params=key)
    )


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype | None:
    """``config.precision`` as the models' ``dtype`` (None: float32)."""
    return PRECISIONS[config.get("precision", "float32")]


def describe(config: ml_collections.ConfigDict) -> str:
    """A short description of the config's model, for report headers."""
    return kind(config).describe(config.model)

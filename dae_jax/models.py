"""Denoising autoencoders: the tutorial's MLP (784-512-256-128, mirrored), the same MLP
with tied weights, and a small convolutional DAE with optional skip connections.

Every model has the same contract: ``encode(x)`` gives flat codes ``[B, Z]``,
``decode(codes)`` images ``[B, 28, 28, 1]`` in [0, 1], ``logits(x)`` the reconstruction's
logits in the layout of ``x`` (what the losses take), and calling it the reconstruction.
``create(config, key=...)`` picks the model from ``config.model.kind``."""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
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


# --- Convolutions that XLA:CPU trains fast -------------------------------------------
#
# XLA:CPU computes a convolution's kernel gradient as another convolution whose
# "kernel" is the whole output map, and for a strided or transposed convolution one
# with a dilated operand: 0.1-1.5 s per layer at batch 128 (experiments/PERFORMANCE.md).
# The same gradient is a sum over the kernel's taps of one matrix product each,
# ``shifted input^T @ output gradient``, which XLA:CPU runs as ordinary GEMMs. The
# forward pass and the input gradient stay ``lax.conv_general_dilated`` and its own
# transpose: only the kernel gradient's formulation changes, so the parameters and
# the function are the same as ``nnx.Conv`` / ``nnx.ConvTranspose`` compute.

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a kernel gradient XLA:CPU runs fast.

    A drop-in for ``nnx.Conv(conv_general_dilated=...)``. On CPU, for 2-D NHWC/HWIO
    convolutions without kernel dilation or feature groups, with window stride or
    input dilation (a transposed convolution) but not both, the kernel gradient is
    computed tap by tap as matrix products; everything else, and every other
    backend, is plain ``lax.conv_general_dilated``.
    """
    plain = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    ndim = len(window_strides)
    strides = tuple(window_strides)
    dilation = tuple(lhs_dilation or (1,) * ndim)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (
        jax.default_backend() != "cpu"
        or ndim != 2
        or dn != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        or any(r != 1 for r in (rhs_dilation or ()))
        or feature_group_count != 1
        or batch_group_count != 1
        or preferred_element_type is not None
        or out_sharding is not None
        or any(s > 1 and d > 1 for s, d in zip(strides, dilation, strict=True))
    ):
        return plain(lhs, rhs)
    if isinstance(padding, str):
        dilated = [(n - 1) * d + 1 for n, d in zip(lhs.shape[1:3], dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(dilated, rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_tapwise_grad(lhs, rhs, strides, pads, dilation, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_tapwise_grad(x, kernel, strides, pads, dilation, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, pads, dilation, dimension_numbers=_NHWC, precision=precision
    )


def _conv_tapwise_grad_fwd(x, kernel, strides, pads, dilation, precision):
    return _conv_tapwise_grad(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_tapwise_grad_bwd(strides, pads, dilation, precision, residuals, g):
    x, kernel = residuals
    return (
        _input_grad(g, kernel, x.shape, strides, pads, dilation, precision),
        _kernel_grad(x, g, kernel.shape, strides, pads, dilation, precision),
    )


def _input_grad(g, kernel, x_shape, strides, pads, dilation, precision) -> jax.Array:
    """d(loss)/d(input): ``lax``'s own transpose of the convolution (a convolution of
    ``g`` with the flipped kernel, strides and input dilation swapped), but with the
    flipped kernel laid out as a plain HWIO kernel. lax's version reads it with its
    in/out axes swapped, which XLA:CPU runs ~10x slower inside a ``lax.scan`` loop."""
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    padding = []
    for n_in, k, (lo, _), s, d, n_out in zip(
        x_shape[1:3], kernel.shape[:2], pads, strides, dilation, g.shape[1:3], strict=True
    ):
        before = k - 1 - lo
        after = (d * (n_in - 1) + 1) + k - 1 - (s * (n_out - 1) + 1) - before
        padding.append((before, after))
    return jax.lax.conv_general_dilated(
        g, flipped, dilation, padding, strides, dimension_numbers=_NHWC, precision=precision
    )


_conv_tapwise_grad.defvjp(_conv_tapwise_grad_fwd, _conv_tapwise_grad_bwd)


def _kernel_grad(x, g, kernel_shape, strides, pads, dilation, precision) -> jax.Array:
    """d(loss)/d(kernel) = sum over output positions of input patch x output gradient,
    one ``[B*H*W, C_in]^T @ [B*H*W, C_out]`` product per kernel tap.

    With fewer output than input channels, no stride and a map the size of the input
    (a 3x3 'SAME' convolution to logits), the output gradient is shifted instead of
    the input and the nine shifts are one product ``x^T @ [B*H*W, 9 * C_out]``: a
    matrix-vector product per tap (C_out = 1) runs ~4x slower."""
    kh, kw, c_in, c_out = kernel_shape
    if c_out < c_in and strides == (1, 1) and dilation == (1, 1) and g.shape[1:3] == x.shape[1:3]:
        # dK[i, j] = sum_p x[p] g[p - (i, j) + pad_lo], zero outside g.
        shifted = jnp.concatenate(
            [
                _window(
                    _window(g, 1, pads[0][0] - i, 1, x.shape[1]), 2, pads[1][0] - j, 1, x.shape[2]
                )
                for i in range(kh)
                for j in range(kw)
            ],
            axis=-1,
        )
        dk = jax.lax.dot_general(
            x.reshape(-1, c_in),
            shifted.reshape(-1, kh * kw * c_out),
            (((0,), (0,)), ((), ())),
            precision=precision,
        )
        return dk.reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3)
    taps = []
    for i in range(kernel_shape[0]):
        for j in range(kernel_shape[1]):
            x_t, g_t = x, g
            for axis, tap in ((1, i), (2, j)):
                x_t, g_t = _tap_slices(
                    x_t, g_t, axis, tap, strides[axis - 1], pads[axis - 1][0], dilation[axis - 1]
                )
            # Flattened to [B*H*W, C] first: a dot contracting the three axes at once
            # makes XLA:CPU transpose the operand, ~10x slower.
            taps.append(
                jax.lax.dot_general(
                    x_t.reshape(-1, x_t.shape[-1]),
                    g_t.reshape(-1, g_t.shape[-1]),
                    (((0,), (0,)), ((), ())),
                    precision=precision,
                )
            )
    return jnp.stack(taps).reshape(kernel_shape)


def _tap_slices(x, g, axis, tap, stride, pad_lo, dilation):
    """The parts of ``x`` and ``g`` along ``axis`` that kernel position ``tap`` pairs up.

    Output position ``o`` sees position ``o * stride + tap - pad_lo`` of the input
    dilated by ``dilation`` (zeros between its rows); only those landing on a real
    row contribute, namely input row ``(o * stride + tap - pad_lo) / dilation``."""
    if dilation == 1:
        return _window(x, axis, tap - pad_lo, stride, g.shape[axis]), g
    # stride 1: outputs o = phase, phase + dilation, ... land on input rows offset, offset + 1, ...
    phase = (pad_lo - tap) % dilation
    g = jax.lax.slice_in_dim(g, phase, g.shape[axis], dilation, axis)
    return _window(x, axis, (phase + tap - pad_lo) // dilation, 1, g.shape[axis]), g


def _window(x, axis, offset, stride, count):
    """``y[m] = x[offset + m * stride]`` along ``axis`` for ``m < count``, zero outside ``x``."""
    n = x.shape[axis]
    last = offset + stride * (count - 1)
    lo, hi = max(0, -offset), max(0, last + 1 - n)
    if lo or hi:
        config = [(0, 0, 0)] * x.ndim
        config[axis] = (lo, hi, 0)
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    start = offset + lo
    return jax.lax.slice_in_dim(x, start, start + stride * (count - 1) + 1, stride, axis)


def conv_transpose(layer: nnx.ConvTranspose, x: jax.Array) -> jax.Array:
    """What ``layer(x)`` computes, through ``conv_general_dilated`` above.

    ``lax.conv_transpose`` is a convolution of the input dilated by the strides, with
    ``'SAME'`` padding ``k + s - 2`` split as below. Layers this does not cover (other
    padding, kernel dilation, a mask, ``transpose_kernel``, not 2-D) run as ``layer(x)``.
    """
    kernel = layer.kernel[...]
    strides = layer.strides
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides or (1, 1))
    if (
        kernel.ndim != 4
        or x.ndim != 4
        or layer.padding != "SAME"
        or layer.kernel_dilation not in (None, 1, (1, 1))
        or layer.mask is not None
        or layer.transpose_kernel
    ):
        return layer(x)
    pads = []
    for k, s in zip(kernel.shape[:2], strides, strict=True):
        total = k + s - 2
        before = k - 1 if s > k - 1 else -(-total // 2)
        pads.append((before, total - before))
    x = jnp.asarray(x, kernel.dtype)
    y = conv_general_dilated(
        x,
        kernel,
        (1, 1),
        pads,
        lhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=layer.precision,
    )
    return y + layer.bias[...] if layer.bias is not None else y


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

    The layers are ``nnx.Conv`` / ``nnx.ConvTranspose``; with ``fast_convs`` (the
    default) they compute through ``conv_general_dilated`` / ``conv_transpose`` above,
    the same function from the same parameters with kernel gradients XLA:CPU runs
    fast; ``fast_convs=False`` runs the layers as flax writes them.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 64),
        *,
        skip: bool = False,
        convs_per_level: int = 1,
        image_shape: tuple[int, ...] = IMAGE_SHAPE,
        fast_convs: bool = True,
        rngs: nnx.Rngs,
    ):
        self.image_shape = tuple(image_shape)
        self.skip = skip
        self.fast_convs = fast_convs
        conv = functools.partial(
            nnx.Conv,
            conv_general_dilated=(
                conv_general_dilated if fast_convs else jax.lax.conv_general_dilated
            ),
            rngs=rngs,
        )
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
            [conv(c_in, channels[0], (3, 3))]
            + [
                conv(a, b, (3, 3), strides=2)
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
            [nnx.List([conv(c, c, (3, 3)) for _ in range(extra)]) for c in channels]
        )
        self.decoder_extra = nnx.List(
            [nnx.List([conv(c, c, (3, 3)) for _ in range(extra)]) for c in channels[-2::-1]]
        )
        self.output = conv(channels[0], c_in, (3, 3))

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
            h = nnx.relu(conv_transpose(layer, h) if self.fast_convs else layer(h))
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


@dataclasses.dataclass(frozen=True)
class Kind:
    """A model kind: how a config's ``model`` block builds it and names it. A new kind is
    one entry here (plus its config keys and their checks in ``dae_jax.configs``)."""

    build: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
    describe: Callable[[ml_collections.ConfigDict], str]


def _mlp(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MlpDae:
    return MlpDae(
        tuple(model.hidden), tied_weights=bool(model.get("tied_weights", False)), rngs=rngs
    )


def _conv(model: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ConvDae:
    return ConvDae(
        tuple(model.channels),
        skip=bool(model.skip),
        convs_per_level=int(model.get("convs_per_level", 1)),
        rngs=rngs,
    )


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
    ),
}
Dae = MlpDae | ConvDae


def num_params(model: nnx.Module) -> int:
    return sum(int(jnp.size(p)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _kind(config: ml_collections.ConfigDict) -> Kind:
    """Configs saved before ``model.kind`` existed describe the MLP."""
    return KINDS[config.model.get("kind", "mlp")]


def create(config: ml_collections.ConfigDict, *, key: jax.Array) -> Dae:
    """The model a config describes, initialised from ``key``."""
    return _kind(config).build(config.model, nnx.Rngs(params=key))  # type: ignore[return-value]


def describe(config: ml_collections.ConfigDict) -> str:
    """A short description of the config's model, for report headers."""
    return _kind(config).describe(config.model)

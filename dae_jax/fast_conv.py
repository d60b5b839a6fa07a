"""Convolutions that XLA:CPU trains fast: drop-ins for ``nnx.Conv`` and ``nnx.ConvTranspose``.

XLA:CPU computes a convolution's kernel gradient as another convolution whose
"kernel" is the whole output map, and for a strided or transposed convolution one
with a dilated operand: 0.1-1.5 s per layer at batch 128 (experiments/PERFORMANCE.md).
The same gradient is a sum over the kernel's taps of one matrix product each,
``shifted input^T @ output gradient``, which XLA:CPU runs as ordinary GEMMs. The
forward pass and the input gradient stay ``lax.conv_general_dilated`` and its own
transpose: only the kernel gradient's formulation changes, so the parameters and
the function are the same as ``nnx.Conv`` / ``nnx.ConvTranspose`` compute.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
    bias = layer.bias[...] if layer.bias is not None else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    y = conv_general_dilated(
        x,
        kernel,
        (1, 1),
        pads,
        lhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=layer.precision,
    )
    return y + bias if bias is not None else y

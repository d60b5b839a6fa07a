"""Classical denoisers (clip, blur, median, BM3D) and the linear probe.

The references a DAE is compared with. The classical denoisers are tuned per noise
level on the very images they are scored on (an optimistic baseline); BM3D (Dabov
et al. 2007, through the ``bm3d`` package of its authors' group) runs on the host,
image by image, so it is scored on the first :data:`BM3D_IMAGES` test images only:
score a model on the same slice, ``denoised[:n]`` against ``clean[:n]`` with
``n = best_classical(...)["bm3d"]["images"]``. The linear probe is multinomial
logistic regression fitted to convergence (L-BFGS) with its L2 strength chosen on a
held-out part of the training split, as a published raw-pixel figure is.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import multiprocessing
import multiprocessing.context
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.typing import ArrayLike
from scipy import special

from dae_jax import bm3d_images, metrics
from dae_jax.errors import UserError
from dae_jax.metrics import psnr

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


# name -> (denoise(noisy[, parameter]), the parameters best_classical tries); BM3D,
# whose parameter depends on the noise level, is apart (BM3D_FACTORS).
CLASSICAL: dict[str, tuple[Callable[..., jax.Array], tuple[Any, ...]]] = {
    "clip": (clip_only, (None,)),
    "gaussian_blur": (gaussian_blur, (0.5, 0.75, 1.0, 1.5, 2.0)),
    "median_filter": (median_filter, (3, 5)),
}

# BM3D's sigma_psd is tried at these multiples of the noise level, for clipped noisy
# images (True) or not. Clipped noise is weaker than its nominal sigma: on Fashion-MNIST
# the best multiple is 0.7-0.8 for sigma <= 0.5 and ~0.6 at sigma 1; unclipped, ~1.0
# (0.1-0.3 dB between neighbours).
BM3D_FACTORS: dict[bool, tuple[float, ...]] = {True: (0.6, 0.7, 0.8), False: (0.9, 1.0, 1.1)}
# BM3D takes ~15-25 ms a 28x28 image on one CPU core, so it is scored on the first
# BM3D_IMAGES test images: 3 factors x 500 images x 6 nonzero levels ~ 2-3 CPU minutes,
# spread over the machine's cores (bm3d_pool).
BM3D_IMAGES = 500
# Fewer images than this per worker process are not worth a process (~1 s to start).
BM3D_IMAGES_PER_WORKER = 25
# Every name best_classical may return, in table order.
REFERENCES: tuple[str, ...] = (*CLASSICAL, "bm3d")


def _bm3d_module() -> Any:
    try:
        import bm3d
    except ImportError as error:
        raise UserError(
            "the BM3D reference needs the bm3d package: pip install 'bm3d>=4.0.3,<5'"
        ) from error
    return bm3d


def _clipped_mean(values: np.ndarray, sigma: float) -> np.ndarray:
    """``E[clip(y + sigma n, 0, 1)]`` for n ~ N(0, 1), at each ``y`` of ``values``."""
    below, above = (0.0 - values) / sigma, (1.0 - values) / sigma
    cdf = special.ndtr

    def pdf(t: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)

    return values * (cdf(above) - cdf(below)) + sigma * (pdf(below) - pdf(above)) + 1 - cdf(above)


def undo_clipping_bias(estimate: np.ndarray, sigma: float) -> np.ndarray:
    """Maps a denoiser's estimate of ``E[clip(y + noise)]`` back to ``y`` (Foi 2009,
    "Clipped noisy images"): clipping lifts the dark pixels and darkens the bright ones
    by up to ``0.4 sigma``, and a mean-preserving filter such as BM3D keeps that bias."""
    support = np.linspace(-1.0, 2.0, 6001)
    return np.interp(estimate, _clipped_mean(support, sigma), support)


def bm3d_denoise(
    noisy: ArrayLike,
    sigma_psd: float,
    *,
    clipped_sigma: float = 0.0,
    pool: concurrent.futures.Executor | None = None,
) -> np.ndarray:
    """BM3D (white-noise mode, both stages, one thread per image: deterministic) of each
    image of ``[B, H, W, 1]``, ``[B, H, W]`` or (colour) ``[B, H, W, 3]``, on the host;
    the result is clipped to [0, 1]. With ``pool`` (see :func:`bm3d_pool`) the images are
    split over its worker processes; the result is the same.

    ``clipped_sigma``: the noisy images are clipped Gaussian noise of this standard
    deviation; the clipping bias is undone (:func:`undo_clipping_bias`) before clipping.
    """
    _bm3d_module()
    images = np.asarray(noisy, np.float32)
    flat = images.reshape(images.shape[:3]) if images.ndim == 3 or images.shape[-1] == 1 else images
    if pool is None:
        out = bm3d_images.denoise(flat, sigma_psd)
    else:
        parts = np.array_split(flat, max(1, math.ceil(len(flat) / 8)))  # tasks of <= 8 images
        out = np.concatenate(list(pool.map(bm3d_images.denoise, parts, [sigma_psd] * len(parts))))
    out = out.reshape(images.shape)
    if clipped_sigma > 0:
        out = undo_clipping_bias(out, clipped_sigma)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def bm3d_pool(images: int, workers: int | None = None) -> contextlib.AbstractContextManager[Any]:
    """A process pool for :func:`bm3d_denoise` over ``images`` images: ``workers``
    processes, by default one per usable CPU core and at most one per
    :data:`BM3D_IMAGES_PER_WORKER` images, started with ``spawn`` (no fork of a process
    running JAX); ``None`` (serial) when one would do."""
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), images // BM3D_IMAGES_PER_WORKER)
    if workers < 2:
        return contextlib.nullcontext(None)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=_SpawnWithoutMain())


class _SpawnWithoutMainProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker that does not run the caller's ``__main__`` again.

    ``spawn`` re-imports the parent's main module in each worker (as ``__mp_main__``), so
    a plain script calling ``sweep.run`` without ``if __name__ == "__main__":`` would start
    its own work again in every worker (and the pool breaks). The workers run only
    ``bm3d_images.denoise``, an importable function, so they need no ``__main__``: it is
    hidden from the spawn while the process starts."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            sys.modules["__main__"] = main


class _SpawnWithoutMain(multiprocessing.context.SpawnContext):
    Process = _SpawnWithoutMainProcess


def best_classical(
    noisy: jax.Array,
    clean: jax.Array,
    *,
    noise: str = "",
    level: float = 0.0,
    clipped: bool = True,
    bm3d_images: int = BM3D_IMAGES,
) -> dict[str, dict[str, float]]:
    """Each classical reference with its best parameter (by mean PSNR) on these images.

    Every entry holds ``parameter``, ``psnr``, ``ssim``, ``mse``, ``images`` (how many of
    the images it was scored on) and ``seconds`` (tuning and scoring). With
    ``noise="gaussian"`` and ``level > 0`` there is also ``"bm3d"``, scored on the first
    ``min(bm3d_images, len(noisy))`` images, its parameter the chosen ``sigma_psd``
    (``level`` times one of ``BM3D_FACTORS[clipped]``); ``clipped`` says whether the noisy
    images were clipped to [0, 1] (then BM3D's clipping bias is undone). BM3D assumes
    additive Gaussian noise, so masking and salt-and-pepper get no BM3D entry.
    """
    best: dict[str, dict[str, float]] = {}
    for name, (denoise, parameters) in CLASSICAL.items():
        started = time.perf_counter()
        for parameter in parameters:
            out = denoise(noisy) if parameter is None else denoise(noisy, parameter)
            score = float(jnp.mean(psnr(out, clean)))
            if name not in best or score > best[name]["psnr"]:
                best[name] = {
                    "parameter": float("nan") if parameter is None else float(parameter),
                    **metrics.scores(out, clean),
                    "images": len(noisy),
                }
        best[name]["seconds"] = time.perf_counter() - started
    if noise == "gaussian" and level > 0:
        started = time.perf_counter()
        count = min(bm3d_images, len(noisy))
        subset, subset_clean = np.asarray(noisy[:count]), clean[:count]
        with bm3d_pool(count) as pool:
            for factor in BM3D_FACTORS[clipped]:
                sigma_psd = factor * float(level)
                denoised = jnp.asarray(
                    bm3d_denoise(
                        subset, sigma_psd, clipped_sigma=float(level) if clipped else 0.0, pool=pool
                    )
                )
                score = float(jnp.mean(psnr(denoised, subset_clean)))
                if "bm3d" not in best or score > best["bm3d"]["psnr"]:
                    best["bm3d"] = {
                        "parameter": sigma_psd,
                        **metrics.scores(denoised, subset_clean),
                    }
        best["bm3d"]["images"] = count
        best["bm3d"]["seconds"] = time.perf_counter() - started
    return best


# ------------------------------------------------------------------- probes

# L2 strengths tried, strongest first (ties go to the stronger), for the mean
# cross-entropy of standardised features (1e-4 is about sklearn's C=0.2 on 50,000 rows).
# Fashion-MNIST picks 1e-3 on raw pixels and ~1e-4 on 128-d codes; 1e-5 scored 1.4 and
# 0.1 points lower there and needs the most iterations, so it is left out.
PROBE_L2: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4)
PROBE_HELDOUT = 10_000


def _fit_logistic(
    x: jax.Array,
    y: jax.Array,
    row_weights: jax.Array,
    l2: jax.Array,
    params: dict[str, jax.Array],
    eigen: tuple[jax.Array, jax.Array],
    max_iterations: int,
    tolerance: jax.Array,
) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """L-BFGS on the weighted mean cross-entropy plus ``l2 / 2 * |w|^2`` (the bias is not
    penalised), from ``params`` until the gradient norm is below ``tolerance``.

    Preconditioned: it optimises ``u`` with ``w = V diag((e + l2)^-1/2) u``, where
    ``(e, V) = eigen`` is the eigendecomposition of the features' covariance. The same
    minimiser, but the problem is about as well conditioned in ``u`` as with whitened
    features, so L-BFGS needs tens of iterations instead of hundreds.
    Returns the parameters, the iterations run and the final gradient norm (in ``u``).
    """
    values, vectors = eigen
    targets = jax.nn.one_hot(y, params["b"].shape[0])  # no gather: its gradient is a slow scatter
    scale = jax.lax.rsqrt(jnp.maximum(values, 0.0) + l2)[:, None]

    def to_w(u: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"w": vectors @ (scale * u["w"]), "b": u["b"]}

    def objective(u: dict[str, jax.Array]) -> jax.Array:
        params = to_w(u)
        logits = x @ params["w"] + params["b"]
        losses = optax.softmax_cross_entropy(logits, targets)
        return jnp.sum(row_weights * losses) / jnp.sum(row_weights) + 0.5 * l2 * jnp.sum(
            jnp.square(params["w"])
        )

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry: tuple[Any, Any]) -> tuple[Any, Any]:
        u, state = carry
        value, grad = value_and_grad(u, state=state)
        updates, state = solver.update(grad, state, u, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(u, updates), state

    def running(carry: tuple[Any, Any]) -> jax.Array:
        _, state = carry
        count = otu.tree_get(state, "count")
        gradient_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iterations) & (gradient_norm >= tolerance))

    u = {"w": (vectors.T @ params["w"]) / scale, "b": params["b"]}
    u, state = jax.lax.while_loop(running, step, (u, solver.init(u)))
    return to_w(u), otu.tree_get(state, "count"), otu.tree_norm(otu.tree_get(state, "grad"))


@functools.partial(jax.jit, static_argnames=("num_classes", "heldout", "max_iterations"))
def _probe(
    train_x: jax.Array,
    train_y: jax.Array,
    test_x: jax.Array,
    test_y: jax.Array,
    l2_grid: jax.Array,
    tolerance: jax.Array,
    *,
    num_classes: int,
    heldout: int,
    max_iterations: int,
) -> dict[str, jax.Array]:
    """The whole probe as one program (one compile per feature shape): the L2 path on
    the training rows but the last ``heldout`` (warm-started, strongest first), the
    choice by held-out accuracy, the refit on every training row."""
    mean = jnp.mean(train_x, axis=0)
    std = jnp.std(train_x, axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    n = train_x.shape[0]
    eigen = jnp.linalg.eigh(train_x.T @ train_x / n)
    fitting = (jnp.arange(n) < n - heldout).astype(jnp.float32)
    zeros = {
        "w": jnp.zeros((train_x.shape[1], num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }

    def accuracy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=1) == y)

    def along_path(params: dict[str, jax.Array], l2: jax.Array) -> tuple[Any, Any]:
        params, iterations, _ = _fit_logistic(
            train_x, train_y, fitting, l2, params, eigen, max_iterations, tolerance
        )
        held = accuracy(params, train_x[n - heldout :], train_y[n - heldout :])
        return params, (params, held, iterations)

    _, (path, heldout_accuracy, path_iterations) = jax.lax.scan(along_path, zeros, l2_grid)
    chosen = jnp.argmax(heldout_accuracy)  # the first maximum: the strongest L2 among ties
    start = jax.tree.map(lambda leaf: leaf[chosen], path)
    params, iterations, gradient_norm = _fit_logistic(
        train_x, train_y, jnp.ones(n), l2_grid[chosen], start, eigen, max_iterations, tolerance
    )
    return {
        "test_accuracy": accuracy(params, test_x, test_y),
        "train_accuracy": accuracy(params, train_x, train_y),
        "chosen": chosen,
        "heldout_accuracy": heldout_accuracy[chosen],
        "heldout_accuracies": heldout_accuracy,
        "iterations": iterations,
        "path_iterations": path_iterations,
        "gradient_norm": gradient_norm,
    }


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    *,
    num_classes: int = 10,
    l2_grid: Sequence[float] = PROBE_L2,
    heldout: int = PROBE_HELDOUT,
    max_iterations: int = 200,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS.

    The question of Vincent et al. (2008, 2010): how linearly separable are the
    classes in a representation? The L2 strength is the one of ``l2_grid`` with the
    best accuracy on the last ``min(heldout, N // 5)`` training rows when fitted on the
    others; the model is then refitted on all N training rows and scored on the test
    split. Standardisation uses the mean and std of all training rows (no labels).
    Returns ``test_accuracy``, ``train_accuracy``, ``l2``, ``heldout_accuracy`` (at that
    l2), ``heldout_accuracies`` (one per l2 of the grid), ``iterations`` (of the refit),
    ``path_iterations`` (per l2), ``converged`` (gradient norm below ``tolerance``
    within ``max_iterations``) and ``seconds`` (compile included on a new shape).
    """
    started = time.perf_counter()
    train_y = jnp.asarray(train_labels, jnp.int32)
    test_y = jnp.asarray(test_labels, jnp.int32)
    train_x = jnp.asarray(train_features, jnp.float32).reshape(len(train_y), -1)
    test_x = jnp.asarray(test_features, jnp.float32).reshape(len(test_y), -1)
    grid = sorted(l2_grid, reverse=True)
    result = _probe(
        train_x,
        train_y,
        test_x,
        test_y,
        jnp.asarray(grid, jnp.float32),
        jnp.float32(tolerance),
        num_classes=num_classes,
        heldout=max(1, min(heldout, len(train_y) // 5)),
        max_iterations=max_iterations,
    )
    result = jax.device_get(result)
    return {
        "test_accuracy": float(result["test_accuracy"]),
        "train_accuracy": float(result["train_accuracy"]),
        "l2": float(grid[int(result["chosen"])]),
        "heldout_accuracy": float(result["heldout_accuracy"]),
        "heldout_accuracies": [float(a) for a in result["heldout_accuracies"]],
        "iterations": int(result["iterations"]),
        "path_iterations": [int(i) for i in result["path_iterations"]],
        "converged": bool(result["gradient_norm"] < tolerance),
        "seconds": time.perf_counter() - started,
    }

"""Times variants of the training loop side by side, for experiments/PERFORMANCE.md.

    python experiments/perf_variants.py            # the training loop's variants
    python experiments/perf_variants.py conv_ops [NAME]  # the conv DAE's layers, op by op
    python experiments/perf_variants.py conv_profile DIR  # its whole step, per XLA op

Seed model (784-512-256-128 mirrored), batch 128, Adam, Gaussian noise, random uint8
images resident on the device; median of 5 calls of 100 steps each, after a warm-up.

``conv_ops``: each layer of the default conv DAE (channels (32, 64, 64)) at batch 128,
jitted alone: forward, input gradient and kernel gradient, as ``lax`` computes them
(what ``nnx.Conv`` / ``nnx.ConvTranspose`` run) and as ``fast_conv.conv_general_dilated``
does (kernel gradient tap by tap), plus the sub-pixel form of the transposed
convolutions (a stride-1 2x2 convolution to 4x the channels, then depth-to-space).
The variants run interleaved, ``--repeats`` rounds; min and median ms.

``conv_profile``: the default conv DAE's training chunk (``dae-jax train
--config.model.kind=conv``, batch 128, 4 steps) under ``jax.profiler.trace(DIR)``; the
XLA:CPU thunks' time (summed over its threads) per step, by op kind.
"""

import functools
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dae_jax import fast_conv, step
from dae_jax.configs import seed

STEPS = 100


def main() -> None:
    config = seed.get_config()
    graphdef, _ = step.abstract_state(config)
    setup = step.Setup.from_config(config, graphdef)
    holder = {"state": step.init_state(config, jax.random.key(0))[1]}
    images_u8 = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    )
    images_f32 = jax.device_put(np.asarray(images_u8, np.float32) / 255)
    order = step.epoch_order(jax.random.key(1), 1, num_examples=60000, steps=468, batch_size=128)
    key, level, start = jax.random.key(2), jnp.float32(1.0), jnp.int32(0)

    def float_chunk(state, images, order_SxB, start, noise_key, level):
        indices = jax.lax.dynamic_slice_in_dim(order_SxB, start, STEPS)

        def body(state, indices_B):
            noise = jax.random.fold_in(noise_key, state.step)
            return step.train_step(setup, state, images[indices_B], noise, level)

        return jax.lax.scan(body, state, indices)

    chunk = functools.partial(step.train_chunk, setup, STEPS)
    scan_donated = jax.jit(chunk, donate_argnums=0)
    scan_kept = jax.jit(chunk)
    scan_float = jax.jit(float_chunk, donate_argnums=0)

    def one_step(state, images, indices_B, noise_key, level):
        clean = step.to_float(images[indices_B])
        noise = jax.random.fold_in(noise_key, state.step)
        return step.train_step(setup, state, clean, noise, level)

    one_jit = jax.jit(one_step, donate_argnums=0)

    def scanned(program: Callable, images: jax.Array) -> Callable[[], None]:
        def run() -> None:
            holder["state"], losses = program(holder["state"], images, order, start, key, level)
            losses.block_until_ready()

        return run

    def stepwise(read_each_step: bool) -> Callable[[], None]:
        def run() -> None:
            for i in range(STEPS):
                holder["state"], loss = one_jit(holder["state"], images_u8, order[i], key, level)
                if read_each_step:
                    float(loss)  # what `loss.item()` does in the tutorial
            loss.block_until_ready()

        return run

    variants = [
        ("scan chunk of 100 (uint8, donated)", scanned(scan_donated, images_u8)),
        ("scan, state not donated", scanned(scan_kept, images_u8)),
        ("scan, float32 images resident", scanned(scan_float, images_f32)),
        ("jit per step, host read each step", stepwise(True)),
        ("jit per step, no host read", stepwise(False)),
        ("scan chunk of 100 (again)", scanned(scan_donated, images_u8)),
    ]
    for name, run in variants:
        run()
        seconds = []
        for _ in range(5):
            begin = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - begin)
        print(f"{name:40s} {1e3 * statistics.median(seconds) / STEPS:.3f} ms/step", flush=True)


NHWC = ("NHWC", "HWIO", "NHWC")
# The default ConvDae's layers at batch 128: (name, transposed, stride, size, c_in, c_out).
CONV_LAYERS = (
    ("conv 28x28 1->32", False, 1, 28, 1, 32),
    ("conv s2 28->14 32->64", False, 2, 28, 32, 64),
    ("conv s2 14->7 64->64", False, 2, 14, 64, 64),
    ("convT s2 7->14 64->64", True, 2, 7, 64, 64),
    ("convT s2 14->28 64->32", True, 2, 14, 64, 32),
    ("conv 28x28 32->1", False, 1, 28, 32, 1),
    ("conv 28x28 32->32 (convs_per_level=2)", False, 1, 28, 32, 32),
    ("conv 14x14 64->64 (convs_per_level=2)", False, 1, 14, 64, 64),
)
# A stride-2 'SAME' 3x3 transposed convolution, one axis: even output 2m sees kernel
# rows 0 (input m-1) and 2 (input m), odd output 2m+1 row 1 (input m). [window, k, phase]
SUBPIXEL = np.zeros((2, 3, 2), np.float32)
SUBPIXEL[0, 0, 0] = SUBPIXEL[1, 2, 0] = SUBPIXEL[1, 1, 1] = 1


def subpixel_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    kernel4 = jnp.einsum("akp,blq,klio->abipqo", SUBPIXEL, SUBPIXEL, kernel)
    c_in, c_out = kernel.shape[2:]
    y = jax.lax.conv_general_dilated(
        x, kernel4.reshape(2, 2, c_in, 4 * c_out), (1, 1), ((1, 0), (1, 0)), dimension_numbers=NHWC
    )
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, c_out)


def conv_ops(only: str = "", repeats: int = 7, batch: int = 128) -> None:
    print(f"ms (min / median of {repeats}, interleaved), batch {batch}", flush=True)
    for name, transposed, stride, size, c_in, c_out in CONV_LAYERS:
        if only not in name:
            continue
        x = jax.random.normal(jax.random.key(0), (batch, size, size, c_in))
        kernel = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
        if transposed:
            forms = {
                "lax": lambda x, k: jax.lax.conv_transpose(
                    x, k, (2, 2), "SAME", dimension_numbers=NHWC
                ),
                "tapwise": lambda x, k: fast_conv.conv_general_dilated(
                    x, k, (1, 1), ((2, 1), (2, 1)), lhs_dilation=(2, 2), dimension_numbers=NHWC
                ),
                "sub-pixel": subpixel_conv_transpose,
            }
        else:
            forms = {
                "lax": functools.partial(
                    jax.lax.conv_general_dilated,
                    window_strides=(stride, stride),
                    padding="SAME",
                    dimension_numbers=NHWC,
                ),
                "tapwise": functools.partial(
                    fast_conv.conv_general_dilated,
                    window_strides=(stride, stride),
                    padding="SAME",
                    dimension_numbers=NHWC,
                ),
            }
        y = forms["lax"](x, kernel)
        g = jax.random.normal(jax.random.key(2), y.shape)
        programs = {}
        for form, f in forms.items():
            programs[(form, "forward")] = jax.jit(lambda x, k, g, f=f: f(x, k))
            programs[(form, "input grad")] = jax.jit(
                lambda x, k, g, f=f: jax.vjp(lambda x: f(x, k), x)[1](g)[0]
            )
            programs[(form, "kernel grad")] = jax.jit(
                lambda x, k, g, f=f: jax.vjp(lambda k: f(x, k), k)[1](g)[0]
            )
        seconds: dict = {key: [] for key in programs}
        for program in programs.values():
            jax.block_until_ready(program(x, kernel, g))
        for _ in range(repeats):
            for key, program in programs.items():
                begin = time.perf_counter()
                jax.block_until_ready(program(x, kernel, g))
                seconds[key].append(1e3 * (time.perf_counter() - begin))
        for form in forms:
            cells = [
                f"{min(seconds[(form, part)]):.1f} / {statistics.median(seconds[(form, part)]):.1f}"
                for part in ("forward", "input grad", "kernel grad")
            ]
            print(f"| {name} | {form} | " + " | ".join(cells) + " |", flush=True)


def conv_profile(directory: str, length: int = 4) -> None:
    import collections
    import re

    from dae_jax.bench import conv_config

    config = conv_config()
    graphdef, state = step.init_state(config, jax.random.key(0))
    setup = step.Setup.from_config(config, graphdef)
    pixels = np.random.default_rng(0).integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8)
    order = step.epoch_order(jax.random.key(1), 0, num_examples=4096, steps=32, batch_size=128)
    rest = (jax.device_put(pixels), order, jnp.int32(0), jax.random.key(2))
    hyper = jax.tree.map(lambda x: x[0], step.hyper_of([step.Member.of(config).mapping]))
    chunk = jax.jit(functools.partial(step.train_chunk, setup, length), donate_argnums=0)
    state = chunk(state, jnp.bool_(True), *rest, hyper)[0]  # compile and warm up
    with jax.profiler.trace(directory):
        start = time.perf_counter()
        jax.block_until_ready(chunk(state, jnp.bool_(True), *rest, hyper))
        wall = time.perf_counter() - start
    [path] = list(__import__("pathlib").Path(directory).rglob("*.xplane.pb"))
    kinds: collections.Counter = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads
                for event in line.events:
                    if not event.name.startswith("ThunkExecutor"):
                        kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns
    total = sum(kinds.values())
    print(f"{1e3 * wall / length:.0f} ms a step (wall); ops {total / 1e6 / length:.0f} ms")
    for kind, ns in kinds.most_common(12):
        print(f"| {kind} | {ns / 1e6 / length:.1f} | {100 * ns / total:.0f}% |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["conv_profile"]:
        conv_profile(sys.argv[2])
    elif sys.argv[1:2] == ["conv_ops"]:
        conv_ops(" ".join(sys.argv[2:]))
    else:
        main()

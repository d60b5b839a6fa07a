"""Times variants of the training loop side by side, for experiments/PERFORMANCE.md.

    python experiments/perf_variants.py

Seed model (784-512-256-128 mirrored), batch 128, Adam, Gaussian noise, random uint8
images resident on the device; median of 5 calls of 100 steps each, after a warm-up.
"""

import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dae_jax import train
from dae_jax.configs import seed

STEPS = 100


def main() -> None:
    config = seed.get_config()
    graphdef, _ = train.abstract_state(config)
    setup = train.Setup.from_config(config, graphdef)
    holder = {"state": train.init_state(config, jax.random.key(0))[1]}
    images_u8 = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    )
    images_f32 = jax.device_put(np.asarray(images_u8, np.float32) / 255)
    order = train.epoch_order(jax.random.key(1), 1, num_examples=60000, steps=468, batch_size=128)
    key, level, start = jax.random.key(2), jnp.float32(1.0), jnp.int32(0)

    def float_chunk(state, images, order_SxB, start, noise_key, level):
        indices = jax.lax.dynamic_slice_in_dim(order_SxB, start, STEPS)

        def body(state, indices_B):
            noise = jax.random.fold_in(noise_key, state.step)
            return train.train_step(setup, state, images[indices_B], noise, level)

        return jax.lax.scan(body, state, indices)

    chunk = functools.partial(train.train_chunk, setup, STEPS)
    scan_donated = jax.jit(chunk, donate_argnums=0)
    scan_kept = jax.jit(chunk)
    scan_float = jax.jit(float_chunk, donate_argnums=0)

    def one_step(state, images, indices_B, noise_key, level):
        clean = train.to_float(images[indices_B])
        noise = jax.random.fold_in(noise_key, state.step)
        return train.train_step(setup, state, clean, noise, level)

    step = jax.jit(one_step, donate_argnums=0)

    def scanned(program: Callable, images: jax.Array) -> Callable[[], None]:
        def run() -> None:
            holder["state"], losses = program(holder["state"], images, order, start, key, level)
            losses.block_until_ready()

        return run

    def stepwise(read_each_step: bool) -> Callable[[], None]:
        def run() -> None:
            for i in range(STEPS):
                holder["state"], loss = step(holder["state"], images_u8, order[i], key, level)
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


if __name__ == "__main__":
    main()

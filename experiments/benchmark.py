"""Training-speed benchmark of the real train step, against the device's own matmul peak.

    python experiments/benchmark.py [--widths=512,256,128] [--batch_sizes=32,128,512,2048]
                                    [--models=1,8] [--steps=50] [--repeats=7] [--workdir=W]
                                    [--conv=plain,skip] [--channels=32,64,64]
                                    [--conv_batch_size=128] [--conv_steps=10]
                                    [--patch=natural] [--patch_size=40] [--patch_channels=1]
                                    [--patch_batch_size=64] [--patch_steps=5]
                                    [--torch_python=runs/torch-venv/bin/python]

For each batch size and number K of vmapped models it compiles the same chunk program
``dae-jax train`` runs (``lax.scan`` over ``--steps`` Adam steps, batches gathered from
device-resident uint8 images), and reports compile time, steady-state seconds per step
(median, min and max of ``--repeats`` timed calls), examples per second, FLOPs per step
from XLA's cost analysis of the compiled program, achieved FLOP/s, and that as a
fraction of a float32 matrix-multiply peak measured at the start on the same device.
Then the same for the conv DAE (``--conv``: without and with skip connections; one
model, ``--conv_batch_size``, chunks of ``--conv_steps`` with the config's automatic
scan unroll unless ``--unroll`` is given). With ``--torch_python`` (a Python with
torch, see experiments/baselines/setup_torch.sh) each conv row also times the same
architecture's PyTorch eager step (experiments/baselines/torch_conv.py) right after,
and reports the ratio. ``--patch=natural`` adds the natural-image workload: the
``natural`` config's DnCNN on random ``--patch_size`` patches with ``--patch_channels``
channels, cropped on the device from 128x128 images as training does. Writes a markdown
table to stdout and ``results.json`` (with device, versions, CPU) to ``--workdir``.
Runs unchanged on CPU, GPU and TPU.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dae_jax import train
from dae_jax.configs import default, natural, seed

FLAGS = flags.FLAGS
flags.DEFINE_list("widths", ["512", "256", "128"], "Encoder widths (the decoder mirrors them).")
flags.DEFINE_list("batch_sizes", ["32", "128", "512", "2048"], "Batch sizes to time.")
flags.DEFINE_list("models", ["1", "8"], "Numbers of models trained at once (vmap).")
flags.DEFINE_integer("steps", 50, "Train steps per timed call (one scanned chunk).")
flags.DEFINE_integer(
    "unroll", 0, "lax.scan unroll of the chunk (config train.scan_unroll); 0 = the config's auto."
)
flags.DEFINE_integer("repeats", 7, "Timed calls per setting, after one warm-up call.")
flags.DEFINE_integer("num_images", 60000, "Device-resident training images (random uint8).")
flags.DEFINE_integer("matmul_size", 0, "Peak matmul size n (n x n); 0 = 2048 on CPU, 8192 else.")
flags.DEFINE_string("workdir", "runs/benchmark", "Where results.json goes.")
flags.DEFINE_list("conv", ["plain", "skip"], "Conv DAE rows: plain and/or skip; empty for none.")
flags.DEFINE_list("channels", ["32", "64", "64"], "Conv DAE channels per level.")
flags.DEFINE_integer("conv_batch_size", 128, "Batch size of the conv rows.")
flags.DEFINE_integer("conv_steps", 10, "Train steps per timed call of the conv rows.")
flags.DEFINE_list("patch", ["natural"], "Patch-training rows (natural); empty for none.")
flags.DEFINE_integer("patch_size", 40, "Side of the patch rows' patches.")
flags.DEFINE_integer("patch_channels", 1, "Channels of the patch rows' images (1 or 3).")
flags.DEFINE_integer("patch_batch_size", 64, "Batch size of the patch rows.")
flags.DEFINE_integer("patch_steps", 5, "Train steps per timed call of the patch rows.")
flags.DEFINE_string(
    "torch_python", "", "A Python with torch: adds a PyTorch eager reference to each conv row."
)

TORCH_BASELINE = Path(__file__).parent / "baselines" / "torch_conv.py"


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak(n: int, repeats: int) -> dict[str, float]:
    """Float32 ``n x n @ n x n`` throughput at the default precision, best of ``repeats``."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    inner = max(1, int(2e11 / (2 * n**3)))  # ~0.2 TFLOP per timed call

    def many() -> jax.Array:
        c = a
        for _ in range(inner):
            c = matmul(a, b)
        return c

    best = min(_timed(many, repeats)) / inner
    return {"n": n, "seconds": best, "flops_per_second": 2 * n**3 / best}


def flops_of(compiled: Any) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def mlp_config(widths: Sequence[int]) -> Any:
    config = seed.get_config()
    config.model.hidden = tuple(widths)
    return config


def conv_config(channels: Sequence[int], skip: bool) -> Any:
    """The conv DAE as ``dae-jax train --config.model.kind=conv`` trains it."""
    config = default.get_config()
    config.model.kind = "conv"
    config.model.channels = tuple(channels)
    config.model.skip = skip
    return config


def patch_config(size: int, channels: int) -> Any:
    """The ``natural`` config's DnCNN on ``size x size x channels`` patches."""
    config = natural.get_config()
    config.data.patch_size = size
    config.data.image_shape = (0, 0, channels)
    return config


def model_name(config: Any) -> str:
    if config.model.kind == "dncnn":
        patch = config.data.patch_size
        return (
            f"dncnn {config.model.depth}x{config.model.features}, "
            f"{patch}x{patch}x{config.data.image_shape[-1]} patches"
        )
    if config.model.kind == "conv":
        name = "conv " + "-".join(str(c) for c in config.model.channels)
        return name + (" + skips" if config.model.skip else "")
    return "mlp " + "-".join(str(w) for w in config.model.hidden)


def bench_setting(
    config: Any,
    batch_size: int,
    num_models: int,
    steps: int,
    repeats: int,
    num_images: int,
    unroll: int = 0,
) -> dict[str, Any]:
    config = config.copy_and_resolve_references()
    config.train.scan_unroll = unroll
    config.train.batch_size = batch_size
    graphdef, _ = train.abstract_state(config)
    setup = train.Setup.from_config(config, graphdef)
    keys = jax.random.split(jax.random.key(0), num_models)
    states = jax.vmap(lambda key: train.init_state(config, key)[1])(keys)
    shape = tuple(config.data.image_shape) or (28, 28, 1)
    images: Any
    if setup.patch_size:  # patches cropped from 128x128 images, as training does
        shape = (128, 128, shape[-1])
    pixels = np.random.default_rng(0).integers(0, 256, (num_images, *shape), dtype=np.uint8)
    images = jax.device_put(pixels)
    if setup.patch_size:
        images = (images, jnp.full((num_images, 2), 128, jnp.int32))
    steps_per_epoch = num_images // batch_size
    steps = min(steps, steps_per_epoch)  # one call stays inside one epoch's order
    orders = jax.vmap(
        functools.partial(
            train.epoch_order, num_examples=num_images, steps=steps_per_epoch, batch_size=batch_size
        ),
        in_axes=(0, None),
    )(keys, 1)
    hyper = train.hyper_of([train.Member.of(config).mapping] * num_models)
    alive = jnp.ones((num_models,), bool)
    # Exactly what `dae-jax train` (K = 1) and a sweep (K > 1) run: one population chunk.
    chunk = functools.partial(train.population_chunk, setup)
    args: tuple[Any, ...] = (states, alive, images, orders, jnp.int32(0), keys, hyper)

    start = time.perf_counter()
    compiled = jax.jit(functools.partial(chunk, steps), donate_argnums=0).lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    unroll_used = min(setup.unroll, steps)
    # XLA's cost analysis counts a loop body once, so ask it about a one-step chunk.
    flops_per_step = flops_of(jax.jit(functools.partial(chunk, 1)).lower(*args).compile())

    holder = {"states": states}

    def one_call() -> jax.Array:
        holder["states"], _, losses = compiled(holder["states"], *args[1:])
        return losses

    per_step = [s / steps for s in _timed(one_call, repeats)]
    median = statistics.median(per_step)
    return {
        "model": model_name(config),
        "batch_size": batch_size,
        "models": num_models,
        "steps_per_call": steps,
        "scan_unroll": unroll_used,
        "compile_seconds": compile_seconds,
        "seconds_per_step_median": median,
        "seconds_per_step_min": min(per_step),
        "seconds_per_step_max": max(per_step),
        "examples_per_second": num_models * batch_size / median,
        "flops_per_step": flops_per_step,
        "flops_per_second": flops_per_step / median,
    }


def torch_reference(python: str, skip: bool, batch_size: int, steps: int, repeats: int) -> dict:
    """experiments/baselines/torch_conv.py's JSON line, run with ``python``."""
    command = [python, str(TORCH_BASELINE), f"--batch_size={batch_size}", f"--steps={steps}"]
    command += [f"--repeats={repeats}"] + (["--skip"] if skip else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], peak: float) -> str:
    lines = [
        "| model | batch | models | compile s | ms/step (median [min, max]) | examples/s | "
        "GFLOP/step | GFLOP/s | % of matmul peak |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['models']} | {r['compile_seconds']:.2f} | "
            f"{1e3 * r['seconds_per_step_median']:.3f} [{1e3 * r['seconds_per_step_min']:.3f}, "
            f"{1e3 * r['seconds_per_step_max']:.3f}] | {r['examples_per_second']:,.0f} | "
            f"{r['flops_per_step'] / 1e9:.3f} | {r['flops_per_second'] / 1e9:.1f} | "
            f"{100 * r['fraction_of_peak']:.0f}% |"
        )
    torch_rows = [r for r in rows if "torch" in r]
    if torch_rows:
        lines += [
            "",
            "| model | batch | dae_jax ms/step | PyTorch eager ms/step (median [min, max]) | "
            "PyTorch / dae_jax |",
            "| --- | ---: | ---: | --- | ---: |",
        ]
        for r in torch_rows:
            t = r["torch"]["seconds_per_step"]
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {1e3 * r['seconds_per_step_median']:.1f} | "
                f"{1e3 * statistics.median(t):.1f} [{1e3 * min(t):.1f}, {1e3 * max(t):.1f}] | "
                f"{statistics.median(t) / r['seconds_per_step_median']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected argument {argv[1]!r}")
    widths = [int(w) for w in FLAGS.widths]
    device = jax.devices()[0]
    n = FLAGS.matmul_size or (2048 if device.platform == "cpu" else 8192)
    peak = matmul_peak(n, FLAGS.repeats)
    info = {**train.device_info(), "versions": train.versions()}
    print(
        f"Device: {info['device_kind']} ({info['platform']}, {info['device_count']} device(s)); "
        f"CPU: {info['cpu']} x{info['cpu_count']}"
    )
    print(
        f"float32 matmul peak ({n}x{n}): {peak['flops_per_second'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    rows = []

    def record(row: dict[str, Any]) -> None:
        row["fraction_of_peak"] = row["flops_per_second"] / peak["flops_per_second"]
        rows.append(row)
        print(
            f"  {row['model']}, batch {row['batch_size']:5d}, {row['models']} model(s): "
            f"{1e3 * row['seconds_per_step_median']:.1f} ms/step, "
            f"{row['examples_per_second']:,.0f} examples/s, "
            f"{100 * row['fraction_of_peak']:.0f}% of peak",
            flush=True,
        )

    for num_models in (int(k) for k in FLAGS.models):
        for batch_size in (int(b) for b in FLAGS.batch_sizes):
            record(
                bench_setting(
                    mlp_config(widths),
                    batch_size,
                    num_models,
                    FLAGS.steps,
                    FLAGS.repeats,
                    FLAGS.num_images,
                    FLAGS.unroll,
                )
            )
    channels = [int(c) for c in FLAGS.channels]
    for kind in FLAGS.conv:
        if kind not in ("plain", "skip"):
            raise app.UsageError(f"--conv takes plain and/or skip, not {kind!r}")
        row = bench_setting(
            conv_config(channels, skip=kind == "skip"),
            FLAGS.conv_batch_size,
            1,
            FLAGS.conv_steps,
            FLAGS.repeats,
            FLAGS.num_images,
            FLAGS.unroll,
        )
        if FLAGS.torch_python:  # right after, so both see the same machine load
            row["torch"] = torch_reference(
                FLAGS.torch_python,
                kind == "skip",
                FLAGS.conv_batch_size,
                FLAGS.conv_steps,
                FLAGS.repeats,
            )
        record(row)
    for kind in FLAGS.patch:
        if kind != "natural":
            raise app.UsageError(f"--patch takes natural, not {kind!r}")
        record(
            bench_setting(
                patch_config(FLAGS.patch_size, FLAGS.patch_channels),
                FLAGS.patch_batch_size,
                1,
                FLAGS.patch_steps,
                FLAGS.repeats,
                min(FLAGS.num_images, 64),
                FLAGS.unroll,
            )
        )
    table = markdown(rows, peak["flops_per_second"])
    print()
    print(
        f"MLP widths {widths} (mirrored), {FLAGS.steps} steps per call; conv channels "
        f"{channels}, {FLAGS.conv_steps} steps per call; Adam, MSE, Gaussian noise; "
        f"scan unroll {FLAGS.unroll or 'auto'}."
    )
    print(table)
    workdir = Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {
        "device": info,
        "matmul_peak": peak,
        "flags": {
            "widths": widths,
            "steps": FLAGS.steps,
            "conv": FLAGS.conv,
            "channels": channels,
            "conv_batch_size": FLAGS.conv_batch_size,
            "conv_steps": FLAGS.conv_steps,
            "patch": FLAGS.patch,
            "patch_size": FLAGS.patch_size,
            "patch_channels": FLAGS.patch_channels,
            "patch_batch_size": FLAGS.patch_batch_size,
            "patch_steps": FLAGS.patch_steps,
            "torch_python": FLAGS.torch_python,
            "repeats": FLAGS.repeats,
            "unroll": FLAGS.unroll,
            "num_images": FLAGS.num_images,
        },
        "rows": rows,
        "table": table,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nWritten to {workdir / 'results.json'}")


if __name__ == "__main__":
    app.run(main)

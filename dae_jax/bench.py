"""``dae-jax bench``: training speed and time to quality, against the device's own peak.

    dae-jax bench [--quick] [--workdir=runs/bench] [--workloads=population,conv,patch]
                  [--precisions=float32,bfloat16] [--models=1,8,64,256]
                  [--batch_sizes=128,1024] [--quality=mlp,conv] [...]
    dae-jax bench --compare A.json B.json

Speed: each workload compiles the same chunk program ``dae-jax train`` (K = 1) and a
sweep (K > 1) run (``step.population_chunk``: a ``lax.scan`` over Adam steps, batches
gathered from device-resident uint8 images) and reports compile seconds, seconds per
step (median, min, max of ``--repeats`` timed calls), examples per second, XLA's FLOPs
and bytes accessed per step (cost analysis of a one-step chunk: XLA counts a loop body
once), the FLOP/s achieved as a share of a matmul peak measured first on the same device
in the same precision, XLA's memory estimate of the program and the device's peak memory
in use (``memory_stats()``; null where the backend has none, e.g. the CPU). A timed call
runs as many steps as fit in ``--call_seconds`` (at most ``--steps``), so K = 256 costs
what K = 1 does. A setting whose memory estimate exceeds 80% of the device's memory is
skipped and says so. Workloads: ``population`` (the seed MLP, 784-512-256-128 mirrored,
for every K in ``--models`` and batch in ``--batch_sizes``; K = 1 at batch 128 is the
tutorial's step), ``conv`` (the default conv DAE, batch 128), ``patch`` (the ``natural``
config's DnCNN on 40x40 patches cropped from 128x128 images, batch 64).

Time to quality (the MLPerf way): wall time from the start (initialisation and compiling
included) until the test PSNR at Fashion-MNIST sigma 0.5 reaches a target, evaluating on
the whole test set four times an epoch (``--eval_every``; evaluation time included):
``mlp`` (the seed MLP, 18.5 dB) and
``conv`` (the conv DAE, 18.0 dB: on the 2-core CPU it reached 18.39 dB, not 18.5, in
its first 600 s, 4.75 epochs). Fashion-MNIST comes from ``--data_dir``; without it
the runs use synthetic images and the results say so (their times are not comparable).

Writes ``W/bench.json`` (machine, versions, peaks, rows), ``W/bench.md`` (the tables),
``W/figures/population.png`` (examples/s against K per batch size and precision) and
``W/figures/roofline.png`` (FLOP/s against FLOPs per byte, with the measured peaks).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dae_jax import guard
from dae_jax.errors import UserError

WORKLOADS = ("population", "conv", "patch")
QUALITY = {"mlp": 18.5, "conv": 18.0}  # target test PSNR (dB) at Fashion-MNIST sigma 0.5
PRECISIONS = ("float32", "bfloat16")
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# --quick: every default it changes (what the user gives still wins). Under 3 minutes
# on 2 CPU cores: speed rows for K = 1, 8 at batch 128 and the conv DAE, both
# precisions; time to quality of the seed MLP in float32.
QUICK = {
    "models": ["1", "8"],
    "batch_sizes": ["128"],
    "workloads": ["population", "conv"],
    "quality": ["mlp"],
    "quality_precisions": ["float32"],
    "repeats": 3,
    "call_seconds": 0.5,
}

HELP = """\
usage: dae-jax bench [--quick] [--workdir=W] [--workloads=population,conv,patch]
                     [--precisions=float32,bfloat16] [--models=1,8,64,256]
                     [--batch_sizes=128,1024] [--quality=mlp,conv] [...]
       dae-jax bench --compare A.json B.json

Times training (ms per step, examples/s, XLA FLOPs, share of the matmul peak measured
on the same device, compile seconds, memory) and time to quality (wall seconds to a
test PSNR on Fashion-MNIST at sigma 0.5); writes W/bench.json, W/bench.md and
W/figures/population.png, roofline.png. --compare prints two runs side by side.

flags:
  --workdir=W              where the results go (default: runs/bench)
  --quick                  a smoke run: K=1,8 at batch 128, the conv DAE, the MLP's
                           time to quality in float32 (under 3 minutes on 2 CPU cores)
  --workloads=LIST         population, conv, patch (default: all three)
  --precisions=LIST        float32, bfloat16 (default: both)
  --models=LIST            population sizes K (default: 1,8,64,256)
  --batch_sizes=LIST       the population's batch sizes (default: 128,1024)
  --conv_batch_size=N      the conv DAE's batch (default: 128)
  --patch_batch_size=N     DnCNN's batch of patches (default: 64)
  --steps=N                at most N train steps per timed call (default: 100)
  --call_seconds=S         aim a timed call at S seconds (default: 1.0)
  --repeats=N              timed calls per setting, after a warm-up (default: 5)
  --num_images=N           device-resident random training images (default: 60000)
  --matmul_size=N          the peak's matmul is N x N (default: 2048 on CPU, 8192 else)
  --quality=LIST           time to quality: mlp (to 18.5 dB), conv (18.0 dB); empty: none
  --quality_precisions=L   its precisions (default: both)
  --mlp_target=DB          the MLP's target test PSNR (default: 18.5)
  --conv_target=DB         the conv DAE's (default: 18.0)
  --eval_every=N           steps between evaluations of the whole test set (default: 0,
                           four times an epoch)
  --quality_seconds=S      give up a time-to-quality run after S seconds (default: 900)
  --data_dir=DIR           Fashion-MNIST's IDX files (default: {fashion})
  --compare                print A.json and B.json (two bench.json files) side by side
"""

# The default of every flag: (parse, default, checked range or choices).
_INT_FLAGS = {
    "conv_batch_size": 128,
    "patch_batch_size": 64,
    "steps": 100,
    "repeats": 5,
    "num_images": 60000,
    "matmul_size": 0,
    "eval_every": 0,
}
_FLOAT_FLAGS = {
    "call_seconds": 1.0,
    "mlp_target": QUALITY["mlp"],
    "conv_target": QUALITY["conv"],
    "quality_seconds": 900.0,
}
_LIST_FLAGS = {
    "workloads": list(WORKLOADS),
    "precisions": list(PRECISIONS),
    "models": ["1", "8", "64", "256"],
    "batch_sizes": ["128", "1024"],
    "quality": list(QUALITY),
    "quality_precisions": list(PRECISIONS),
}


def _parse(argv: Sequence[str]) -> tuple[Any, list[str]]:
    """The flags (a fresh ``FlagValues``, never absl's global one) and the positional
    arguments; a flag this command does not take, or a bad value, is one ``UserError``."""
    from absl import flags

    values = flags.FlagValues()
    flags.DEFINE_string("workdir", "runs/bench", "", flag_values=values)
    flags.DEFINE_string("data_dir", FASHION_MNIST, "", flag_values=values)
    flags.DEFINE_bool("quick", False, "", flag_values=values)
    flags.DEFINE_bool("compare", False, "", flag_values=values)
    flags.DEFINE_bool("verbose", False, "", flag_values=values)
    for name, default in _INT_FLAGS.items():
        flags.DEFINE_integer(name, default, "", flag_values=values)
    for name, default_float in _FLOAT_FLAGS.items():
        flags.DEFINE_float(name, default_float, "", flag_values=values)
    for name, default_list in _LIST_FLAGS.items():
        flags.DEFINE_list(name, default_list, "", flag_values=values)
    try:
        rest = values(list(argv))
    except flags.Error as e:
        message = " ".join(str(e).split())
        raise UserError(f"{message} (dae-jax bench --help)", exit_code=2) from None
    if values.quick:
        for name, value in QUICK.items():
            if not values[name].present:
                values[name].value = value
    return values, rest[1:]


def _settings(values: Any) -> dict[str, Any]:
    """The run's settings from the flags, each checked."""

    def choices(name: str, allowed: Sequence[str]) -> list[str]:
        picked = [v.strip() for v in values[name].value if v.strip()]
        for v in picked:
            if v not in allowed:
                raise UserError(f"--{name}: {v!r} is not one of {', '.join(allowed)}", 2)
        return picked

    def positive(name: str, items: Sequence[str]) -> list[int]:
        try:
            numbers = [int(v) for v in items]
        except ValueError:
            numbers = [0]
        if not numbers or min(numbers) < 1:
            raise UserError(f"--{name} takes positive integers, not {','.join(items)!r}", 2)
        return numbers

    settings: dict[str, Any] = {
        "workloads": choices("workloads", WORKLOADS),
        "precisions": choices("precisions", PRECISIONS),
        "quality": choices("quality", tuple(QUALITY)),
        "quality_precisions": choices("quality_precisions", PRECISIONS),
        "models": positive("models", values.models),
        "batch_sizes": positive("batch_sizes", values.batch_sizes),
    }
    for name in _INT_FLAGS:
        settings[name] = values[name].value
        least = 0 if name in ("matmul_size", "eval_every") else 1
        if settings[name] < least:
            raise UserError(f"--{name} must be an integer >= {least}, not {settings[name]}", 2)
    for name in _FLOAT_FLAGS:
        settings[name] = values[name].value
        if not (math.isfinite(settings[name]) and settings[name] > 0):
            raise UserError(f"--{name} must be a number > 0, not {settings[name]}", 2)
    if not settings["precisions"] and settings["workloads"]:
        raise UserError("--precisions is empty: give float32 and/or bfloat16", 2)
    settings["targets"] = {"mlp": values.mlp_target, "conv": values.conv_target}
    settings["quick"] = values.quick
    settings["data_dir"] = values.data_dir
    return settings


# ------------------------------------------------------------------ measuring


def _timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    import jax

    jax.block_until_ready(fn())  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_peak(n: int, precision: str, repeats: int) -> dict[str, Any]:
    """``n x n @ n x n`` throughput in ``precision`` at JAX's default matmul precision
    (TF32 on an NVIDIA GPU for float32), best of ``repeats`` calls of ~0.3 s each."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if precision == "float32" else jnp.bfloat16
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    one = min(_timed(lambda: matmul(a, b), 1))
    inner = max(1, int(0.3 / one))

    def many() -> Any:
        c = a
        for _ in range(inner):
            c = matmul(a, b)
        return c

    best = min(_timed(many, repeats)) / inner
    return {"n": n, "precision": precision, "seconds": best, "flops_per_second": 2 * n**3 / best}


def stream_bandwidth(num_bytes: int, repeats: int) -> dict[str, Any]:
    """Memory bandwidth: ``x * c`` in place (donated) over ``num_bytes`` of float32,
    read and written: the roofline's sloped side."""
    import jax
    import jax.numpy as jnp

    holder = {"x": jnp.ones((num_bytes // 4,), jnp.float32)}
    scale = jax.jit(lambda x: x * 1.0000001, donate_argnums=0)

    def call() -> Any:
        holder["x"] = scale(holder["x"])
        return holder["x"]

    best = min(_timed(call, repeats))
    return {"bytes": num_bytes, "seconds": best, "bytes_per_second": 2 * num_bytes / best}


def _cost(compiled: Any) -> tuple[float, float]:
    """XLA's FLOPs and bytes accessed for ``compiled`` (NaN where it does not say)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0]
    analysis = analysis or {}
    return float(analysis.get("flops", math.nan)), float(analysis.get("bytes accessed", math.nan))


def _step_cost(setup: Any, args: tuple, one_step: Any) -> tuple[float, float]:
    """XLA's FLOPs and bytes of one step. Its cost analysis counts a loop body once: ask
    it about a one-step chunk (``one_step``), with the step's microbatches and a conv
    population's members (on CPU, loops) as one batch, vmapped: the same math."""
    import jax

    from dae_jax import step

    if not (setup.microbatch or setup.members_in_sequence):
        return _cost(one_step)
    whole = dataclasses.replace(setup, microbatch=0, members_in_sequence=False)
    return _cost(jax.jit(functools.partial(step.population_chunk, whole, 1)).lower(*args).compile())


def _memory_estimate(compiled: Any) -> int | None:
    """XLA's memory estimate of ``compiled``: arguments + outputs + temporaries - aliased."""
    try:
        m = compiled.memory_analysis()
        return int(
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
    except Exception:  # a backend without memory analysis
        return None


def device_memory() -> tuple[int | None, int | None]:
    """The device's (memory limit, peak bytes in use so far) from ``memory_stats()``;
    on a backend without it (the CPU) the limit is the host's physical memory and the
    peak is None."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats:
        return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (ValueError, OSError):
        return None, None


def mlp_config() -> Any:
    """The seed MLP (784-512-256-128 mirrored) on Fashion-MNIST at sigma 0.5: the
    default config, whose network is the tutorial's."""
    from dae_jax.configs import default

    return default.get_config()


def conv_config() -> Any:
    """The conv DAE as ``dae-jax train --config.model.kind=conv`` trains it."""
    config = mlp_config()
    config.model.kind = "conv"
    return config


def patch_config() -> Any:
    """The ``natural`` config's DnCNN on 40x40 grayscale patches."""
    from dae_jax.configs import natural

    config = natural.get_config()
    config.data.patch_size = 40
    config.data.image_shape = (0, 0, 1)
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


def _population_inputs(config: Any, num_models: int, batch_size: int, num_images: int) -> tuple:
    """The population chunk's setup and arguments for ``num_models`` models of ``config``
    on random images (64 128x128 images to crop patches from, for a patch model)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dae_jax import step

    graphdef, _ = step.abstract_state(config)
    setup = step.Setup.from_config(config, graphdef)
    keys = jax.random.split(jax.random.key(0), num_models)
    states = jax.vmap(lambda key: step.init_state(config, key)[1])(keys)
    num_images = 64 if setup.patch_size else num_images
    shape = tuple(config.data.image_shape) or (28, 28, 1)
    if setup.patch_size:  # patches cropped from 128x128 images, as training does
        shape = (128, 128, shape[-1])
    pixels = np.random.default_rng(0).integers(0, 256, (num_images, *shape), dtype=np.uint8)
    images: Any = jax.device_put(pixels)
    if setup.patch_size:
        images = (images, jnp.full((num_images, 2), 128, jnp.int32))
    steps = num_images // batch_size
    order = functools.partial(
        step.epoch_order, num_examples=num_images, steps=steps, batch_size=batch_size
    )
    orders = jax.vmap(order, in_axes=(0, None))(keys, 1)
    hyper = step.hyper_of([step.Member.of(config).mapping] * num_models)
    alive = jnp.ones((num_models,), bool)
    return setup, (states, alive, images, orders, jnp.int32(0), keys, hyper)


def bench_setting(
    workload: str,
    config: Any,
    *,
    precision: str,
    batch_size: int,
    num_models: int,
    settings: dict[str, Any],
    memory_limit: int | None,
) -> dict[str, Any]:
    """One row: the population chunk of ``num_models`` models of ``config``."""
    import jax

    from dae_jax import step

    config = config.copy_and_resolve_references()
    config.precision = precision
    config.train.batch_size = batch_size
    row: dict[str, Any] = {"workload": workload, "model": model_name(config)}
    row.update(precision=precision, batch_size=batch_size, models=num_models)
    setup, args = _population_inputs(config, num_models, batch_size, settings["num_images"])
    steps_per_epoch = args[3].shape[1]
    chunk = functools.partial(step.population_chunk, setup)

    def compile_chunk(length: int) -> tuple[Any, float]:
        start = time.perf_counter()
        compiled = (
            jax.jit(functools.partial(chunk, length), donate_argnums=0).lower(*args).compile()
        )
        return compiled, time.perf_counter() - start

    one_step, one_step_compile = compile_chunk(1)
    flops, bytes_accessed = _step_cost(setup, args, one_step)
    estimate = _memory_estimate(one_step)
    row.update(
        flops_per_step=flops,
        bytes_per_step=bytes_accessed,
        arithmetic_intensity=flops / bytes_accessed if bytes_accessed else math.nan,
        memory_estimate_bytes=estimate,
    )
    if memory_limit and estimate and estimate > 0.8 * memory_limit:
        row["skipped"] = (
            f"needs ~{estimate / 2**30:.1f} GiB by XLA's estimate, over 80% of the device's "
            f"{memory_limit / 2**30:.1f} GiB"
        )
        return row
    holder = {"states": args[0]}

    def call(compiled: Any) -> Callable[[], Any]:
        def run() -> Any:
            holder["states"], _, losses = compiled(holder["states"], *args[1:])
            return losses

        return run

    # Steps per timed call: as many as fit in --call_seconds, from one step's time.
    one = statistics.median(_timed(call(one_step), 2))
    steps = max(1, min(settings["steps"], steps_per_epoch, int(settings["call_seconds"] / one)))
    compiled, compile_seconds = (one_step, one_step_compile)
    if steps > 1:
        compiled, compile_seconds = compile_chunk(steps)
    per_step = [s / steps for s in _timed(call(compiled), settings["repeats"])]
    median = statistics.median(per_step)
    row.update(
        steps_per_call=steps,
        scan_unroll=min(setup.unroll, steps),
        compile_seconds=compile_seconds,
        seconds_per_step_median=median,
        seconds_per_step_min=min(per_step),
        seconds_per_step_max=max(per_step),
        examples_per_second=num_models * batch_size / median,
        flops_per_second=flops / median,
        device_peak_bytes=device_memory()[1],
    )
    return row


# ---------------------------------------------------------------- time to quality


def load_fashion_mnist(directory: str) -> tuple[Any, str | None]:
    """Fashion-MNIST from ``directory``, or synthetic images and a note saying so."""
    from dae_jax import data

    try:
        return data.load_idx_dir(Path(directory), "fashion_mnist"), None
    except UserError as e:
        note = (
            f"Fashion-MNIST not found ({e}); time to quality ran on synthetic images, "
            "so its times and PSNRs are not comparable with Fashion-MNIST's"
        )
        return data.synthetic(0, 60000, 10000), note


def _test_psnr(setup: Any, test: Any, weights: Any, level: Any) -> Callable[..., Any]:
    """``(params, key) ->`` the mean PSNR of the denoised test set, as ``dae-jax train``
    reports it (same noise), without the SSIM and loss it also computes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dae_jax import metrics, step

    def test_psnr(params: Any, key: jax.Array) -> jax.Array:
        model = nnx.merge(setup.graphdef, params)

        def one_batch(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
            index, images_u8, batch_weights = args
            clean = step.to_float(images_u8)
            noisy = setup.corrupt(jax.random.fold_in(key, index), clean, level)
            psnr = metrics.psnr(model.to_pixels(setup.outputs(model, noisy)), clean)
            return jnp.sum(jnp.where(batch_weights > 0, psnr, 0.0))

        indices = jnp.arange(test.shape[0])
        return jnp.sum(jax.lax.map(one_batch, (indices, test, weights))) / jnp.sum(weights)

    return test_psnr


def _train_until(
    train: Callable[[int, int, int], bool],
    evaluate: Callable[[], float],
    plan: Iterable[tuple[int, int, int]],
    start: float,
    target: float,
    budget_seconds: float,
) -> tuple[list[list[float]], float, float | None]:
    """Trains chunk after chunk of ``plan`` (epoch, first step, length), evaluating after
    each, until the test PSNR reaches ``target``, the time is up or the model diverged:
    the curve [wall seconds, steps, PSNR], the seconds spent evaluating, and the wall
    seconds when ``target`` was reached (None if it was not)."""
    curve: list[list[float]] = []
    steps, eval_seconds = 0, 0.0
    for epoch, first, length in plan:
        alive = train(epoch, first, length)
        steps += length
        eval_start = time.perf_counter()
        psnr = evaluate()
        elapsed = time.perf_counter() - start
        eval_seconds += elapsed - (eval_start - start)
        curve.append([round(elapsed, 3), steps, round(psnr, 3)])
        if psnr >= target:
            return curve, eval_seconds, elapsed
        if elapsed > budget_seconds or not alive:
            break
    return curve, eval_seconds, None


def time_to_quality(
    name: str,
    config: Any,
    dataset: Any,
    *,
    precision: str,
    target: float,
    eval_every: int,
    budget_seconds: float,
) -> dict[str, Any]:
    """Wall seconds from the start (initialisation, data transfer, compiling and the
    evaluations included) until the denoised test set's PSNR, as ``dae-jax train`` reports
    it, reaches ``target``; trained as ``dae-jax train`` does (same keys, order, noise and
    program), evaluated every ``eval_every`` steps (0: four times an epoch)."""
    import jax
    import jax.numpy as jnp

    from dae_jax import step
    from dae_jax.configs import validate

    config = config.copy_and_resolve_references()
    config.precision = precision
    config.data.image_shape = tuple(int(n) for n in dataset.image_shape)
    config = validate(config)
    start = time.perf_counter()
    keys = step.key_streams(config.seed)
    graphdef, state = step.init_state(config, keys.init)
    setup = step.Setup.from_config(config, graphdef)
    images = jax.device_put(dataset.train_images)
    test, weights = jax.device_put(step.padded_test_batches(dataset, config.eval.batch_size))
    batch = config.train.batch_size
    steps_per_epoch = len(dataset.train_images) // batch
    eval_every = min(eval_every or -(-steps_per_epoch // 4), steps_per_epoch)
    hyper = jax.tree.map(lambda x: x[0], step.hyper_of([step.Member.of(config).mapping]))
    alive: Any = jnp.bool_(True)
    order = functools.partial(step.epoch_order, keys.shuffle, num_examples=len(images))
    orders = functools.cache(lambda epoch: order(epoch, steps=steps_per_epoch, batch_size=batch))

    def compile_chunk(length: int) -> Any:  # an epoch's last chunk may be shorter
        program = jax.jit(functools.partial(step.train_chunk, setup, length), donate_argnums=0)
        return program.lower(state, alive, images, orders(0), jnp.int32(0), keys.noise, hyper)

    def train(epoch: int, first: int, length: int) -> bool:
        nonlocal state, alive
        state, alive, _ = chunk(length)(
            state, alive, images, orders(epoch), jnp.int32(first), keys.noise, hyper
        )
        jax.block_until_ready(state)
        return bool(alive)

    compile_start = time.perf_counter()
    chunk = functools.cache(lambda length: compile_chunk(length).compile())
    chunk(eval_every)
    psnr_program = jax.jit(_test_psnr(setup, test, weights, jnp.float32(config.noise.level)))
    evaluate = psnr_program.lower(state.params, keys.eval).compile()
    compile_seconds = time.perf_counter() - compile_start
    plan = ((e, *c) for e in itertools.count() for c in step.chunks(steps_per_epoch, eval_every))
    curve, eval_seconds, reached = _train_until(
        train, lambda: float(evaluate(state.params, keys.eval)), plan, start, target, budget_seconds
    )
    steps = int(curve[-1][1])  # at the last evaluation
    return {
        "workload": name,
        "model": model_name(config),
        "precision": precision,
        "batch_size": batch,
        "noise": f"{config.noise.kind} {config.noise.level}",
        "target_psnr": target,
        "seconds": reached,
        "steps": steps if reached is not None else None,
        "epochs": round(steps / steps_per_epoch, 3) if reached is not None else None,
        "best_psnr": max(p for _, _, p in curve),
        "compile_seconds": compile_seconds,
        "eval_seconds": eval_seconds,  # of the wall time, spent evaluating
        "eval_every": eval_every,
        "test_images": len(dataset.test_images),
        "budget_seconds": budget_seconds,
        "curve": curve,  # [wall seconds, steps, test PSNR] at each evaluation
    }


# ------------------------------------------------------------------ tables


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["batch_size"], row["models"], row.get("precision", "float32"))


def _markdown(columns: str, rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: ``columns`` are ``|``-separated names (``name:`` right-aligned)."""
    names = columns.split("|")
    head = "| " + " | ".join(name.rstrip(":") for name in names) + " |"
    rule = "|" + "".join(" ---: |" if name.endswith(":") else " --- |" for name in names)
    return "\n".join([head, rule, *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def _speed_cells(r: dict[str, Any]) -> list[Any]:
    memory = r.get("memory_estimate_bytes")
    mib = f"{memory / 2**20:,.0f}" if memory else "n/a"
    head = [r["model"], r["precision"], r["batch_size"], r["models"]]
    if "skipped" in r:
        return [*head, f"skipped: {r['skipped']}", *[""] * 6, mib]
    per_step = [1e3 * r[f"seconds_per_step_{k}"] for k in ("median", "min", "max")]
    return [
        *head, f"{r['compile_seconds']:.2f}",
        "{:.3f} [{:.3f}, {:.3f}]".format(*per_step), f"{r['examples_per_second']:,.0f}",
        f"{r['flops_per_step'] / 1e9:.3f}", f"{r['arithmetic_intensity']:.1f}",
        f"{r['flops_per_second'] / 1e9:.1f}", f"{100 * r['fraction_of_peak']:.0f}%", mib,
    ]  # fmt: skip


def speed_table(rows: Sequence[dict[str, Any]]) -> str:
    return _markdown(
        "model|precision|batch:|K:|compile s:|ms/step (median [min, max])|examples/s:|"
        "GFLOP/step:|FLOP/byte:|GFLOP/s:|% of peak:|XLA memory MiB:",
        map(_speed_cells, rows),
    )


def quality_table(runs: Sequence[dict[str, Any]]) -> str:
    def cells(q: dict[str, Any]) -> list[Any]:
        seconds = q["seconds"]
        reached = (
            f"{seconds:.1f}" if seconds is not None else f"not reached in {q['budget_seconds']:.0f}"
        )
        return [
            q["model"], q["precision"], q["noise"], q["target_psnr"], reached, q["steps"] or "",
            q["epochs"] or "", f"{q['best_psnr']:.2f}", f"{q['compile_seconds']:.1f}",
        ]  # fmt: skip

    return _markdown(
        "model|precision|noise|target dB:|time to target s:|steps:|epochs:|best dB:|compile s:",
        map(cells, runs),
    )


def _machine(results: dict[str, Any]) -> str:
    d = results["device"]
    return f"{d['device_kind']} ({d['platform']}; CPU {d['cpu']} x{d['cpu_count']})"


def compare(a_path: str, b_path: str) -> str:
    """One side-by-side table of two ``bench.json`` files (or the old benchmark's
    ``results.json``): each speed row both share, then time to quality."""
    runs = []
    for path in (a_path, b_path):
        try:
            results = json.loads(Path(path).read_text())
        except OSError as e:
            raise UserError(f"--compare: cannot read {path} ({e.strerror})") from None
        except ValueError:
            raise UserError(f"--compare: {path} is not JSON; give two bench.json files") from None
        if not isinstance(results, dict) or "rows" not in results or "device" not in results:
            raise UserError(f"--compare: {path} is not a bench.json (no rows or device)")
        runs.append(results)
    a, b = runs
    b_rows = {_row_key(r): r for r in b["rows"] if "skipped" not in r}
    lines = [
        f"A: {a_path}: {_machine(a)}",
        f"B: {b_path}: {_machine(b)}",
        "",
        "| model | precision | batch | K | A ms/step | B ms/step | B speed-up | "
        "A % of peak | B % of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in a["rows"]:
        other = b_rows.get(_row_key(r))
        if other is None or "skipped" in r:
            continue
        ms_a, ms_b = 1e3 * r["seconds_per_step_median"], 1e3 * other["seconds_per_step_median"]
        lines.append(
            f"| {r['model']} | {r.get('precision', 'float32')} | {r['batch_size']} | "
            f"{r['models']} | {ms_a:.3f} | {ms_b:.3f} | {ms_a / ms_b:.2f}x | "
            f"{100 * r['fraction_of_peak']:.0f}% | {100 * other['fraction_of_peak']:.0f}% |"
        )
    b_quality = {(q["model"], q["precision"]): q for q in b.get("quality", [])}
    shared = [(q, b_quality.get((q["model"], q["precision"]))) for q in a.get("quality", [])]
    if any(other for _, other in shared):
        lines += [
            "",
            "| model | precision | target dB | A time to target s | B time to target s |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for q, other in shared:
            if other is not None:
                cells = [
                    "not reached" if x["seconds"] is None else f"{x['seconds']:.1f}"
                    for x in (q, other)
                ]
                lines.append(
                    f"| {q['model']} | {q['precision']} | {q['target_psnr']} / "
                    f"{other['target_psnr']} | {cells[0]} | {cells[1]} |"
                )
    return "\n".join(lines)


# ------------------------------------------------------------------ the command


def run(settings: dict[str, Any], workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Measures everything ``settings`` asks for; writes bench.json, bench.md, figures/."""
    import jax

    from dae_jax.runfiles import device_info, versions

    started = time.perf_counter()
    platform = jax.devices()[0].platform
    info = {**device_info(), "versions": versions()}
    memory_limit, _ = device_memory()
    info["memory_bytes"] = memory_limit
    info["memory_stats"] = jax.devices()[0].memory_stats() is not None
    load_start = _load_average()
    log(
        f"Device: {info['device_kind']} ({info['platform']}, {info['device_count']} device(s)); "
        f"CPU: {info['cpu']} x{info['cpu_count']}"
    )
    n = settings["matmul_size"] or (2048 if platform == "cpu" else 8192)
    peaks = {}
    for precision in dict.fromkeys(settings["precisions"]):
        peaks[precision] = matmul_peak(n, precision, settings["repeats"])
        log(
            f"{precision} matmul peak ({n}x{n}): "
            f"{peaks[precision]['flops_per_second'] / 1e9:,.1f} GFLOP/s"
        )
    bandwidth = stream_bandwidth(2**27 if platform == "cpu" else 2**31, settings["repeats"])
    log(f"memory bandwidth (x * c in place): {bandwidth['bytes_per_second'] / 1e9:,.1f} GB/s")
    rows = _speed_rows(settings, peaks, memory_limit, log)
    quality, data_note = _quality_runs(settings, log)
    results = {
        "device": info,
        "matmul_peak": peaks,
        "bandwidth": bandwidth,
        "settings": {k: v for k, v in settings.items()},
        "rows": rows,
        "quality": quality,
        "data_note": data_note,
        "memory_note": (
            "device_peak_bytes: memory_stats()'s peak_bytes_in_use after the row, over the "
            "whole process so far (it never goes down); "
            if info["memory_stats"]
            else "device.memory_stats() is not available on this backend: device_peak_bytes "
            "is null; "
        )
        + "memory_estimate_bytes: XLA's estimate for the row's one-step program "
        "(arguments + outputs + temporaries - aliased)",
        "seconds": time.perf_counter() - started,
        # The host's 1-minute load average at the start and the end: on a shared machine,
        # how much else was running (more than the core count: the times are slowed).
        "load_average": [load_start, _load_average()],
    }
    _write(workdir, results, log)
    return results


def _speed_rows(
    settings: dict[str, Any], peaks: dict[str, Any], memory_limit: int | None, log: Callable
) -> list[dict[str, Any]]:
    """A row per workload x batch size x population size x precision."""
    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, Any, int, int]] = []
    if "population" in settings["workloads"]:
        plan += [
            ("population", mlp_config(), b, k)
            for b in settings["batch_sizes"]
            for k in settings["models"]
        ]
    if "conv" in settings["workloads"]:
        plan.append(("conv", conv_config(), settings["conv_batch_size"], 1))
    if "patch" in settings["workloads"]:
        plan.append(("patch", patch_config(), settings["patch_batch_size"], 1))
    for workload, config, batch, k in plan:
        for precision in settings["precisions"]:
            guard.stage(f"timing {workload} K={k} batch {batch} in {precision}")
            row = bench_setting(
                workload, config, precision=precision, batch_size=batch, num_models=k,
                settings=settings, memory_limit=memory_limit,
            )  # fmt: skip
            rows.append(row)
            if "skipped" in row:
                log(
                    f"  {row['model']}, batch {batch}, K={k}, {precision}: "
                    f"skipped: {row['skipped']}"
                )
                continue
            row["fraction_of_peak"] = row["flops_per_second"] / peaks[precision]["flops_per_second"]
            log(
                f"  {row['model']}, batch {batch}, K={k}, {precision}: "
                f"{1e3 * row['seconds_per_step_median']:.2f} ms/step, "
                f"{row['examples_per_second']:,.0f} examples/s, "
                f"{100 * row['fraction_of_peak']:.0f}% of peak, compiled in "
                f"{row['compile_seconds']:.1f} s"
            )
    return rows


def _quality_runs(settings: dict[str, Any], log: Callable) -> tuple[list[dict], str | None]:
    """Time to quality per model x precision, and a note when the data is synthetic."""
    quality: list[dict[str, Any]] = []
    data_note = None
    if settings["quality"] and settings["quality_precisions"]:
        guard.stage("loading Fashion-MNIST")
        dataset, data_note = load_fashion_mnist(settings["data_dir"])
        if data_note:
            log(f"note: {data_note}")
        for name in settings["quality"]:
            config = mlp_config() if name == "mlp" else conv_config()
            for precision in settings["quality_precisions"]:
                guard.stage(f"training {name} in {precision} to {settings['targets'][name]} dB")
                q = time_to_quality(
                    name, config, dataset, precision=precision, target=settings["targets"][name],
                    eval_every=settings["eval_every"], budget_seconds=settings["quality_seconds"],
                )  # fmt: skip
                quality.append(q)
                reached = (
                    f"{q['seconds']:.1f} s ({q['steps']} steps)"
                    if q["seconds"] is not None
                    else f"not reached in {q['budget_seconds']:.0f} s"
                )
                log(
                    f"  time to {q['target_psnr']} dB, {q['model']}, {precision}: {reached}; "
                    f"best {q['best_psnr']:.2f} dB"
                )
    return quality, data_note


def _write(workdir: Path, results: dict[str, Any], log: Callable) -> None:
    """bench.json, bench.md and the figures; the tables on the log too."""
    from dae_jax import plots

    rows, quality = results["rows"], results["quality"]
    peaks, bandwidth = results["matmul_peak"], results["bandwidth"]
    guard.stage(f"writing the results to {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    tables = speed_table(rows) + ("\n\n" + quality_table(quality) if quality else "")
    (workdir / "bench.md").write_text(f"Machine: {_machine(results)}\n\n{tables}\n")
    text = json.dumps(_finite(results), indent=2, allow_nan=False)
    (workdir / "bench.json").write_text(text + "\n")
    figures = workdir / "figures"
    figures.mkdir(exist_ok=True)
    plots.population_figure(figures / "population.png", rows)
    plots.roofline_figure(figures / "roofline.png", rows, peaks, bandwidth)
    log("")
    log(tables)
    log(
        f"\nWritten to {workdir / 'bench.json'}, bench.md and figures/ "
        f"in {results['seconds']:.0f} s"
    )


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def command(argv: list[str], g: guard.Guard) -> int:
    """``dae-jax bench``; ``argv[0]`` is the command's name."""
    g.stage = "reading the command line"
    if any(a.lstrip("-").split("=")[0] in ("h", "help", "helpshort", "helpfull") for a in argv[1:]
           if a.startswith("-")):  # fmt: skip
        print(HELP.format(fashion=FASHION_MNIST), end="")
        return 0
    values, positional = _parse(argv)
    if values.compare:
        if len(positional) != 2:
            raise UserError(
                f"--compare takes two bench.json files, A and B; got {len(positional)}", 2
            )
        print(compare(*positional))
        return 0
    if positional:
        raise UserError(
            f"unexpected argument {positional[0]!r} (only --compare takes files; "
            "dae-jax bench --help)",
            2,
        )
    settings = _settings(values)
    g.stage = "starting JAX"
    from dae_jax import cli

    cli._check_backend()
    run(settings, Path(values.workdir), lambda line: print(line, flush=True))
    return 0


def main(argv: Sequence[str]) -> int:
    """``dae-jax bench`` with ``argv`` (``argv[0]`` the command's name), guarded: the
    exit code, never a traceback."""
    return guard.run("dae-jax bench", lambda g: command(list(argv), g))

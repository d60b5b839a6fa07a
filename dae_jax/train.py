"""Training: one pure train step, jit-compiled and scanned in chunks over device-resident data.

Key streams: ``jax.random.key(config.seed)`` splits into ``init``, ``shuffle``,
``noise`` and ``eval``. The epoch order is ``permutation(fold_in(shuffle, epoch))``
and a step's noise is ``fold_in(noise, global_step)``, so every random choice is a
function of the seed and the position in training: a run is fixed bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dae_jax import corruption, data, losses, metrics, models, plots
from dae_jax.configs import validate
from dae_jax.errors import UserError


class TrainState(NamedTuple):
    step: jax.Array  # global step, int32 scalar
    params: nnx.State
    opt_state: optax.OptState


class KeyStreams(NamedTuple):
    init: jax.Array
    shuffle: jax.Array
    noise: jax.Array
    eval: jax.Array


def key_streams(seed: int) -> KeyStreams:
    return KeyStreams(*jax.random.split(jax.random.key(seed), 4))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(config.optim.learning_rate)


def init_state(
    config: ml_collections.ConfigDict, key: jax.Array
) -> tuple[nnx.GraphDef, TrainState]:
    model = models.create(config, key=key)
    graphdef, params = nnx.split(model)
    opt_state = make_optimizer(config).init(params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static half of training: what the compiled programs close over."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    loss: str
    noise_kind: str
    clip: bool

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef) -> Setup:
        return cls(
            graphdef=graphdef,
            optimizer=make_optimizer(config),
            loss=config.loss,
            noise_kind=config.noise.kind,
            clip=bool(config.noise.clip),
        )

    def corrupt(self, key: jax.Array, clean: jax.Array, level: jax.Array) -> jax.Array:
        return corruption.corrupt(self.noise_kind, key, clean, level, clip=self.clip)[0]

    def loss_per_example(self, params: nnx.State, noisy: jax.Array, clean: jax.Array):
        model = nnx.merge(self.graphdef, params)
        return losses.PER_EXAMPLE[self.loss](model.logits(noisy), clean)


def train_step(
    setup: Setup, state: TrainState, clean: jax.Array, key: jax.Array, level: jax.Array
) -> tuple[TrainState, jax.Array]:
    """One Adam step on a batch of clean images in [0, 1], corrupted with ``key``."""
    noisy = setup.corrupt(key, clean, level)

    def loss_of(params: nnx.State) -> jax.Array:
        return jnp.mean(setup.loss_per_example(params, noisy, clean))

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), loss


def train_chunk(
    setup: Setup,
    length: int,
    state: TrainState,
    images_u8: jax.Array,
    order_SxB: jax.Array,
    start: jax.Array,
    noise_key: jax.Array,
    level: jax.Array,
) -> tuple[TrainState, jax.Array]:
    """``length`` steps from row ``start`` of the epoch's order, as one ``lax.scan``.

    Batches are gathered by index on the device; nothing returns to the host until
    the chunk's ``length`` losses.
    """
    indices_LxB = jax.lax.dynamic_slice_in_dim(order_SxB, start, length)

    def body(state: TrainState, indices_B: jax.Array) -> tuple[TrainState, jax.Array]:
        clean = to_float(images_u8[indices_B])
        return train_step(setup, state, clean, jax.random.fold_in(noise_key, state.step), level)

    return jax.lax.scan(body, state, indices_LxB)


@functools.partial(jax.jit, static_argnames=("num_examples", "steps", "batch_size"))
def epoch_order(
    shuffle_key: jax.Array, epoch: jax.Array, *, num_examples: int, steps: int, batch_size: int
) -> jax.Array:
    """Example indices ``[steps, batch_size]`` for an epoch; the remainder is dropped."""
    permutation = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


def evaluate(
    setup: Setup,
    params: nnx.State,
    images_u8_NxB: jax.Array,
    weights_NxB: jax.Array,
    key: jax.Array,
    level: jax.Array,
) -> dict[str, jax.Array]:
    """Test loss and PSNRs over batches ``[num_batches, B, ...]``; ``weights`` mask padding.

    The input is corrupted with ``key`` (the same noise every epoch, so epochs compare);
    the loss is against the clean images, as in training.
    """
    model = nnx.merge(setup.graphdef, params)

    def one_batch(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        index, images_u8, weights = args
        clean = to_float(images_u8)
        noisy = setup.corrupt(jax.random.fold_in(key, index), clean, level)
        loss = setup.loss_per_example(params, noisy, clean)
        psnr_noisy = metrics.psnr(noisy, clean)
        psnr_denoised = metrics.psnr(model(noisy), clean)
        per_example = jnp.stack([loss, psnr_noisy, psnr_denoised])
        return jnp.sum(jnp.where(weights > 0, per_example, 0.0), axis=1)

    indices = jnp.arange(images_u8_NxB.shape[0])
    sums = jnp.sum(jax.lax.map(one_batch, (indices, images_u8_NxB, weights_NxB)), axis=0)
    sums = sums / jnp.sum(weights_NxB)
    return {"test_loss": sums[0], "test_psnr_noisy": sums[1], "test_psnr_denoised": sums[2]}


def batched_with_padding(images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, ...] -> [ceil(N / B), B, ...]`` zero-padded, with 1/0 weights marking real rows."""
    num_batches = math.ceil(len(images) / batch_size)
    padding = num_batches * batch_size - len(images)
    padded = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    weights = np.concatenate([np.ones(len(images), np.float32), np.zeros(padding, np.float32)])
    return (
        padded.reshape(num_batches, batch_size, *images.shape[1:]),
        weights.reshape(num_batches, batch_size),
    )


def chunks(steps: int, log_every: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each compiled chunk of an epoch."""
    for start in range(0, steps, log_every):
        yield start, min(log_every, steps - start)


# ------------------------------------------------------------------------ the run


class _Log:
    """Prints the run's lines, through the progress bar when stderr is a terminal."""

    def __init__(self, total_steps: int, show_bar: bool | None = None):
        show_bar = sys.stderr.isatty() if show_bar is None else show_bar
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", leave=False, file=sys.stderr)

    def __call__(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``, flushed as it goes."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")

    def write(self, event: str, **values: Any) -> None:
        self.file.write(json.dumps({"event": event, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def versions() -> dict[str, str]:
    import flax

    from dae_jax import __version__

    return {
        "dae_jax": __version__,
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def prepare_workdir(workdir: Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir={workdir} is a file; give a directory (new or existing)")
    if (workdir / "metrics.jsonl").exists():
        raise UserError(
            f"--workdir={workdir} already holds a run (metrics.jsonl); choose a new --workdir "
            "or remove that one"
        )
    try:
        (workdir / "figures").mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--workdir={workdir} is not writable ({e.strerror}); give another"
        ) from None


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` ends with: the final train state and the run's summary."""

    graphdef: nnx.GraphDef
    state: TrainState
    summary: dict[str, Any]

    @property
    def model(self) -> models.MlpDae:
        return nnx.merge(self.graphdef, self.state.params)


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Trains the DAE that ``config`` describes, writing the run to ``workdir``."""
    validate(config)
    workdir = Path(workdir)
    prepare_workdir(workdir)
    if dataset is None:
        dataset = data.load(config.data, seed=config.seed)
    num_train, batch_size = len(dataset.train_images), config.train.batch_size
    if batch_size > num_train:
        raise UserError(
            f"train.batch_size={batch_size} is larger than the training set ({num_train} images); "
            "use a smaller batch"
        )
    steps_per_epoch = num_train // batch_size
    epochs = config.train.epochs
    progress = _Log(steps_per_epoch * epochs) if log is None else None
    say = log or progress or print

    say(
        f"Data: {dataset.name} from {dataset.source} "
        f"({num_train} train, {len(dataset.test_images)} test images)"
    )
    _write_json(workdir / "config.json", config.to_dict())
    writer = MetricsWriter(workdir / "metrics.jsonl")
    writer.write("start", dataset=dataset.name, data_source=dataset.source, **device_info())

    keys = key_streams(config.seed)
    graphdef, state = init_state(config, keys.init)
    setup = Setup.from_config(config, graphdef)
    level = jnp.float32(config.noise.level)

    train_images = jax.device_put(dataset.train_images)
    test_batches_np, test_weights_np = batched_with_padding(
        dataset.test_images, min(config.eval.batch_size, len(dataset.test_images))
    )
    test_batches, test_weights = jax.device_put((test_batches_np, test_weights_np))

    # Compile ahead of time, so compile time is measured apart from training time.
    compile_start = time.perf_counter()
    order = epoch_order(
        keys.shuffle, 0, num_examples=num_train, steps=steps_per_epoch, batch_size=batch_size
    )
    chunk_programs = {}
    for _, length in chunks(steps_per_epoch, config.train.log_every):
        if length not in chunk_programs:
            program = jax.jit(functools.partial(train_chunk, setup, length), donate_argnums=(0,))
            chunk_programs[length] = program.lower(
                state, train_images, order, jnp.int32(0), keys.noise, level
            ).compile()
    evaluate_program = (
        jax.jit(functools.partial(evaluate, setup))
        .lower(state.params, test_batches, test_weights, keys.eval, level)
        .compile()
    )
    compile_seconds = time.perf_counter() - compile_start
    say(f"Compiled {len(chunk_programs) + 1} programs in {compile_seconds:.1f} s")
    writer.write("compile", seconds=compile_seconds)

    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        order = epoch_order(
            keys.shuffle,
            epoch,
            num_examples=num_train,
            steps=steps_per_epoch,
            batch_size=batch_size,
        )
        loss_sum = 0.0
        pending: tuple[int, int, int, jax.Array] | None = None

        def report(epoch: int, done: int, length: int, chunk_losses: jax.Array) -> float:
            values = np.asarray(chunk_losses)  # the chunk's only host read
            if not np.all(np.isfinite(values)):
                raise UserError(
                    f"the loss became {values[~np.isfinite(values)][0]} in epoch {epoch} "
                    f"before step {done}; lower optim.learning_rate",
                    exit_code=1,
                )
            seen = done * batch_size
            say(
                f"Train Epoch: {epoch} [{seen}/{num_train} ({100.0 * seen / num_train:.0f}%)]"
                f"\tLoss: {values.mean():.6f}"
            )
            if progress is not None:
                progress.advance(length)
            return float(values.sum())

        for start, length in chunks(steps_per_epoch, config.train.log_every):
            state, chunk_losses = chunk_programs[length](
                state, train_images, order, jnp.int32(start), keys.noise, level
            )
            # Dispatch the next chunk before reading this one back.
            if pending is not None:
                loss_sum += report(*pending)
            pending = (epoch, start + length, length, chunk_losses)
        assert pending is not None
        loss_sum += report(*pending)
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds

        eval_start = time.perf_counter()
        test = {
            k: float(v)
            for k, v in evaluate_program(
                state.params, test_batches, test_weights, keys.eval, level
            ).items()
        }
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "train_loss": loss_sum / steps_per_epoch,
            **test,
            "epoch_seconds": epoch_seconds,
            "examples_per_second": steps_per_epoch * batch_size / epoch_seconds,
            "eval_seconds": time.perf_counter() - eval_start,
        }
        history.append(record)
        writer.write("epoch", **record)
        say(
            f"====> Epoch: {epoch} Average loss: {record['train_loss']:.4f}  "
            f"Test loss: {record['test_loss']:.4f}  "
            f"PSNR noisy {record['test_psnr_noisy']:.2f} dB -> "
            f"denoised {record['test_psnr_denoised']:.2f} dB  "
            f"({epoch_seconds:.1f} s, {record['examples_per_second']:,.0f} examples/s)"
        )
    if progress is not None:
        progress.close()

    _write_figures(workdir, config, setup, state.params, dataset, keys.eval, history)
    summary = {
        "dataset": dataset.name,
        "data_source": dataset.source,
        "epochs": epochs,
        "steps": int(state.step),
        "num_params": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
        "final": history[-1],
        "compile_seconds": compile_seconds,
        "train_seconds": train_seconds,
        "versions": versions(),
        "device": device_info(),
    }
    _write_json(workdir / "summary.json", summary)
    final = history[-1]
    say(
        f"Done. Final test PSNR {final['test_psnr_noisy']:.2f} dB (noisy input) -> "
        f"{final['test_psnr_denoised']:.2f} dB (reconstruction). Figures: "
        f"{workdir / 'figures' / 'denoising.png'}, {workdir / 'figures' / 'loss.png'}; "
        f"metrics: {workdir / 'metrics.jsonl'}"
    )
    writer.write("end", **{k: summary[k] for k in ("epochs", "steps", "train_seconds")})
    writer.close()
    return FitResult(graphdef, state, summary)


def _write_figures(
    workdir: Path,
    config: ml_collections.ConfigDict,
    setup: Setup,
    params: nnx.State,
    dataset: data.Dataset,
    eval_key: jax.Array,
    history: list[dict[str, Any]],
) -> None:
    count = min(config.eval.num_figure_images, len(dataset.test_images))
    clean = to_float(jnp.asarray(dataset.test_images[:count]))
    noisy = setup.corrupt(jax.random.fold_in(eval_key, 0), clean, jnp.float32(config.noise.level))
    reconstructed = nnx.merge(setup.graphdef, params)(noisy)
    psnr_noisy = float(jnp.mean(metrics.psnr(noisy, clean)))
    psnr_denoised = float(jnp.mean(metrics.psnr(reconstructed, clean)))
    plots.denoising_figure(
        workdir / "figures" / "denoising.png",
        np.asarray(noisy),
        np.asarray(reconstructed),
        np.asarray(clean),
        [dataset.class_names[int(label)] for label in dataset.test_labels[:count]],
        row_notes=(f"{psnr_noisy:.1f} dB", f"{psnr_denoised:.1f} dB", ""),
    )
    plots.loss_figure(
        workdir / "figures" / "loss.png",
        [h["epoch"] for h in history],
        [h["train_loss"] for h in history],
        [h["test_loss"] for h in history],
    )

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
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import dae_jax
from dae_jax import checkpointing, corruption, data, losses, metrics, models, parallel, plots
from dae_jax.configs import validate
from dae_jax.errors import Interrupted, UserError


class TrainState(NamedTuple):
    step: jax.Array  # global step, int32 scalar
    params: nnx.State
    opt_state: optax.OptState


class KeyStreams(NamedTuple):
    init: jax.Array
    shuffle: jax.Array
    noise: jax.Array
    eval: jax.Array


def key_streams(seed_or_root: int | jax.Array) -> KeyStreams:
    """The run's named key streams, from its seed or its root key."""
    root = jax.random.key(seed_or_root) if isinstance(seed_or_root, int) else seed_or_root
    return KeyStreams(*jax.random.split(root, 4))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return optax.adam(config.optim.learning_rate)


def init_state(
    config: ml_collections.ConfigDict, key: jax.Array
) -> tuple[nnx.GraphDef, TrainState]:
    model = models.create(config, key=key)
    graphdef, params = nnx.split(model)
    opt_state = make_optimizer(config).init(params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def abstract_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, TrainState]:
    """The graph and the shapes of a fresh train state, without computing it."""
    graphdefs = []

    def init() -> TrainState:
        graphdef, state = init_state(config, jax.random.key(0))
        graphdefs.append(graphdef)
        return state

    abstract = jax.eval_shape(init)
    return graphdefs[0], abstract


def to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 255.0


def _scan_unroll(config: ml_collections.ConfigDict) -> int:
    unroll = int(config.train.get("scan_unroll", 0))
    if unroll:
        return unroll
    conv_on_cpu = config.model.get("kind", "mlp") == "conv" and jax.default_backend() == "cpu"
    return 1_000_000 if conv_on_cpu else 1  # lax.scan unrolls at most the whole chunk


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static half of training: what the compiled programs close over."""

    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    loss: str
    noise_kind: str
    clip: bool
    unroll: int = 1  # lax.scan unroll: speed only (fewer loop iterations per chunk)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef) -> Setup:
        return cls(
            graphdef=graphdef,
            optimizer=make_optimizer(config),
            loss=config.loss,
            noise_kind=config.noise.kind,
            clip=bool(config.noise.clip),
            unroll=_scan_unroll(config),
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

    return jax.lax.scan(body, state, indices_LxB, unroll=min(setup.unroll, length))


def train_chunk_many(
    setup: Setup,
    length: int,
    states: TrainState,
    images_u8: jax.Array,
    orders_KxSxB: jax.Array,
    start: jax.Array,
    noise_keys_K: jax.Array,
    levels_K: jax.Array,
) -> tuple[TrainState, jax.Array]:
    """``train_chunk`` for K models at once: ``jax.vmap`` over their states, data orders,
    noise keys and noise levels; the images are shared. Losses come back ``[K, length]``."""
    chunk = functools.partial(train_chunk, setup, length)
    return jax.vmap(chunk, in_axes=(0, None, 0, None, 0, 0))(
        states, images_u8, orders_KxSxB, start, noise_keys_K, levels_K
    )


@functools.partial(jax.jit, static_argnames=("num_examples", "steps", "batch_size"))
def epoch_order(
    shuffle_key: jax.Array, epoch: jax.Array, *, num_examples: int, steps: int, batch_size: int
) -> jax.Array:
    """Example indices ``[steps, batch_size]`` for an epoch; the remainder is dropped."""
    permutation = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


EVAL_METRICS = (
    "test_loss",
    "test_psnr_noisy",
    "test_psnr_denoised",
    "test_ssim_noisy",
    "test_ssim_denoised",
)


def evaluate(
    setup: Setup,
    params: nnx.State,
    images_u8_NxB: jax.Array,
    weights_NxB: jax.Array,
    key: jax.Array,
    level: jax.Array,
) -> dict[str, jax.Array]:
    """Test loss, PSNR and SSIM over batches ``[num_batches, B, ...]``; ``weights`` mask padding.

    The input is corrupted with ``key`` (the same noise every epoch, so epochs compare);
    the loss is against the clean images, as in training. "noisy" scores the corrupted
    input itself, "denoised" the model's reconstruction of it.
    """
    model = nnx.merge(setup.graphdef, params)

    def one_batch(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        index, images_u8, weights = args
        clean = to_float(images_u8)
        noisy = setup.corrupt(jax.random.fold_in(key, index), clean, level)
        logits = model.logits(noisy)
        denoised = jax.nn.sigmoid(logits)
        per_example = jnp.stack(
            [
                losses.PER_EXAMPLE[setup.loss](logits, clean),
                metrics.psnr(noisy, clean),
                metrics.psnr(denoised, clean),
                metrics.ssim(noisy, clean),
                metrics.ssim(denoised, clean),
            ]
        )
        return jnp.sum(jnp.where(weights > 0, per_example, 0.0), axis=1)

    indices = jnp.arange(images_u8_NxB.shape[0])
    sums = jnp.sum(jax.lax.map(one_batch, (indices, images_u8_NxB, weights_NxB)), axis=0)
    means = sums / jnp.sum(weights_NxB)
    return {name: means[i] for i, name in enumerate(EVAL_METRICS)}


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


def padded_test_batches(dataset: data.Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The test images as padded batches with their weights (host arrays; place them once)."""
    return batched_with_padding(dataset.test_images, min(batch_size, len(dataset.test_images)))


def _train_line(epoch: int, seen: int, num_train: int, loss: float, suffix: str = "") -> str:
    """The tutorial's progress line."""
    return (
        f"Train Epoch: {epoch} [{seen}/{num_train} ({100.0 * seen / num_train:.0f}%)]"
        f"\tLoss: {loss:.6f}{suffix}"
    )


def chunks(steps: int, log_every: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """(start, length) of each compiled chunk of an epoch, from step ``first`` on."""
    for start in range(first, steps, log_every):
        yield start, min(log_every, steps - start)


# ------------------------------------------------------------------------ the run


class _Log:
    """Prints the run's lines, through the progress bar when stderr is a terminal."""

    def __init__(self, total_steps: int, done: int = 0, show_bar: bool | None = None):
        show_bar = sys.stderr.isatty() if show_bar is None else show_bar
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=done, unit="step", leave=False, file=sys.stderr
            )

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
        # In a multi-process run only process 0 writes.
        self.file = path.open("a", encoding="utf-8") if parallel.is_primary() else None

    def write(self, event: str, **values: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def rewind_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Cuts ``metrics.jsonl`` back to a checkpoint at global ``step``: drops what came after
    it and any line a kill cut short. Returns the epoch records kept."""
    if not path.exists():
        return []
    kept: list[str] = []
    history: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("step", 0) > step:
            continue
        if record.get("event") == "epoch":
            history.append({k: v for k, v in record.items() if k != "event"})
        kept.append(line)
    if parallel.is_primary():
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return history


def versions() -> dict[str, str]:
    import flax

    from dae_jax import __version__

    return {
        "dae_jax": __version__,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", ""),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax_checkpoint": ocp_version(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def ocp_version() -> str:
    import orbax.checkpoint as ocp

    return str(getattr(ocp, "__version__", ""))


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
    try:
        (workdir / "figures").mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--workdir={workdir} is not writable ({e.strerror}); give another"
        ) from None


def _logger(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """Where the run's lines go: ``log`` or stdout, from process 0 only."""
    if not parallel.is_primary():
        return lambda line: None
    return log or print


def _write_json(path: Path, value: Any) -> None:
    if not parallel.is_primary():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


class _StopSignals:
    """SIGINT and SIGTERM ask training to stop at the next chunk boundary; a second
    SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` ends with: the final train state and the run's summary."""

    graphdef: nnx.GraphDef
    state: TrainState
    summary: dict[str, Any]

    @property
    def model(self) -> models.Dae:
        return nnx.merge(self.graphdef, self.state.params)


def enable_compile_cache(directory: str, warn: Callable[[str], None] = print) -> Path | None:
    """Turns on JAX's persistent compilation cache in ``directory`` ("" = off).

    The thresholds are lowered to zero: our programs compile in about a second each,
    below JAX's defaults, and those seconds are most of a short run's start-up.
    """
    if not directory:
        return None
    path = Path(os.path.expanduser(directory))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn(f"warning: compile cache {path} is not usable ({e.strerror}); compiling afresh")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; the order changes every epoch)."""
    if batch_size > num_train:
        raise UserError(
            f"train.batch_size={batch_size} is larger than the training set ({num_train} images); "
            "use a smaller batch"
        )
    return num_train // batch_size


def _check_resumable(workdir: Path, config: ml_collections.ConfigDict) -> None:
    saved = workdir / "config.json"
    checkpoint_dir = workdir / "checkpoints"
    has_checkpoints = checkpoint_dir.is_dir() and any(
        p.name.isdigit() for p in checkpoint_dir.iterdir()
    )
    if not has_checkpoints or not saved.exists():
        return
    try:
        saved_config = json.loads(saved.read_text())
    except (OSError, json.JSONDecodeError):
        return  # no trustworthy record: the checkpoints' own shapes decide
    changes = checkpointing.science_changes(saved_config, config)
    if changes:
        raise UserError(
            f"--workdir={workdir} holds a run trained with other settings "
            f"({'; '.join(changes)}); resuming would mix two experiments: use a new "
            "--workdir, or the run's own values (only train.epochs and logging, evaluation "
            "and checkpoint settings may change)"
        )


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] | None = None,
) -> FitResult:
    """Trains the DAE that ``config`` describes, writing the run to ``workdir``.

    A workdir with checkpoints is resumed from its latest intact one. SIGINT/SIGTERM
    save a checkpoint at the next chunk boundary and raise ``Interrupted``; a NaN/Inf
    loss raises ``UserError`` and keeps nothing past the last good checkpoint.
    """
    validate(config)
    workdir = Path(workdir)
    prepare_workdir(workdir)
    _check_resumable(workdir, config)
    enable_compile_cache(config.compile_cache, log or print)
    if dataset is None:
        dataset = data.load(config.data, seed=config.seed)
    num_train, batch_size = len(dataset.train_images), config.train.batch_size
    steps_per_epoch = _steps_per_epoch(num_train, batch_size)
    placement = parallel.Placement.for_training(config.train.data_parallel, batch_size)
    say = _logger(log)

    say(
        f"Data: {dataset.name} from {dataset.source} "
        f"({num_train} train, {len(dataset.test_images)} test images)"
    )
    graphdef, abstract = abstract_state(config)
    setup = Setup.from_config(config, graphdef)
    checkpoints = checkpointing.Checkpoints(
        workdir / "checkpoints", keep=config.checkpoint.keep, warn=say
    )
    try:
        return _fit(
            config,
            workdir,
            dataset,
            setup,
            abstract,
            checkpoints,
            placement,
            steps_per_epoch,
            say,
            log,
        )
    finally:
        checkpoints.close()  # every save in flight is finished before we return


def _fit(
    config: ml_collections.ConfigDict,
    workdir: Path,
    dataset: data.Dataset,
    setup: Setup,
    abstract: TrainState,
    checkpoints: checkpointing.Checkpoints,
    placement: parallel.Placement,
    steps_per_epoch: int,
    say: Callable[[str], None],
    log: Callable[[str], None] | None,
) -> FitResult:
    num_train, batch_size, epochs = (
        len(dataset.train_images),
        config.train.batch_size,
        config.train.epochs,
    )
    metrics_path = workdir / "metrics.jsonl"
    restored = checkpoints.restore_latest(abstract) if checkpoints.steps() else None
    if restored is not None:
        state, meta = restored
        root_key = jax.random.wrap_key_data(jnp.asarray(meta["root_key_data"], jnp.uint32))
        epochs_done, step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
        resumed_loss_sum = float(meta["epoch_loss_sum"])
        history = rewind_metrics(metrics_path, int(meta["step"]))
        where = (
            f"after epoch {epochs_done}"
            if step_in_epoch == 0
            else f"epoch {epochs_done + 1}, step {step_in_epoch} of {steps_per_epoch}"
        )
        say(f"Resuming from checkpoint {checkpoints.path(int(meta['step']))} ({where})")
    else:
        if metrics_path.exists() and parallel.is_primary():
            backup = metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            metrics_path.replace(backup)
            say(
                f"No intact checkpoint in {checkpoints.directory}: starting over "
                f"(the earlier metrics are kept in {backup.name})"
            )
        root_key = jax.random.key(config.seed)
        state = init_state(config, key_streams(root_key).init)[1]
        epochs_done, step_in_epoch, resumed_loss_sum, history = 0, 0, 0.0, []
    keys = key_streams(root_key)

    def global_step() -> int:
        return int(parallel.host(state.step))

    root_key_data = np.asarray(jax.random.key_data(root_key)).tolist()

    _write_json(workdir / "config.json", config.to_dict())
    writer = MetricsWriter(metrics_path)
    writer.write(
        "resume" if restored is not None else "start",
        step=global_step(),
        dataset=dataset.name,
        data_source=dataset.source,
        **device_info(),
    )

    say(f"Training on {placement.describe()}")
    state = placement.replicated(state)
    level = placement.replicated(jnp.float32(config.noise.level))
    train_images = placement.replicated(dataset.train_images)
    eval_batches, eval_weights = placement.replicated(
        padded_test_batches(dataset, config.eval.batch_size)
    )
    keys = placement.replicated(keys)

    def order_for(epoch: int) -> jax.Array:
        return placement.split_batches(
            epoch_order(
                keys.shuffle,
                epoch,
                num_examples=num_train,
                steps=steps_per_epoch,
                batch_size=batch_size,
            )
        )

    # Compile ahead of time (every chunk length this run will use), so compile time is
    # measured apart from training time.
    compile_start = time.perf_counter()
    example_args = (state, train_images, order_for(0), jnp.int32(0), keys.noise, level)
    programs: dict[int, Any] = {}
    if epochs_done < epochs:
        first_chunks = chunks(steps_per_epoch, config.train.log_every, step_in_epoch)
        for _, length in (*first_chunks, *chunks(steps_per_epoch, config.train.log_every)):
            if length not in programs:
                program = jax.jit(functools.partial(train_chunk, setup, length), donate_argnums=0)
                programs[length] = program.lower(*example_args).compile()
    evaluate_program = (
        jax.jit(functools.partial(evaluate, setup))
        .lower(state.params, eval_batches, eval_weights, keys.eval, level)
        .compile()
    )
    compile_seconds = time.perf_counter() - compile_start
    say(f"Compiled {len(programs) + 1} programs in {compile_seconds:.1f} s")
    writer.write("compile", seconds=compile_seconds)

    def save_checkpoint(epochs_complete: int, steps_into_next: int, loss_sum: float) -> None:
        checkpoints.save(
            state,
            {
                "step": global_step(),
                "epoch": epochs_complete,
                "step_in_epoch": steps_into_next,
                "epoch_loss_sum": loss_sum,
                "root_key_data": root_key_data,
            },
        )

    def stopped(signum: int, where: str) -> Interrupted:
        return Interrupted(
            f"stopped by {signal.Signals(signum).name} {where}; checkpoint saved in "
            f"{checkpoints.path(global_step())}: run the same command again to resume",
            exit_code=128 + signum,
        )

    def after_nan() -> str:
        steps = checkpoints.steps()
        if not steps:
            return "No checkpoint was saved: start again with a lower --config.optim.learning_rate"
        return (
            f"Nothing after the last good checkpoint ({checkpoints.path(steps[-1])}) is kept: "
            "resume from it with a lower --config.optim.learning_rate, or use a new --workdir"
        )

    progress = (
        None
        if log is not None or not parallel.is_primary()
        else _Log(steps_per_epoch * epochs, global_step())
    )
    if progress is not None:
        say = progress
    train_seconds = 0.0
    first_step_seconds: float | None = None
    try:
        with _StopSignals() as stop:
            for epoch in range(epochs_done + 1, epochs + 1):
                first = step_in_epoch if epoch == epochs_done + 1 else 0
                loss_sum = resumed_loss_sum if epoch == epochs_done + 1 else 0.0
                epoch_start = time.perf_counter()
                order = order_for(epoch)
                pending: list[tuple[int, int, jax.Array]] = []

                def report(
                    done: int, length: int, chunk_losses: jax.Array, epoch: int = epoch
                ) -> float:
                    values = parallel.host(chunk_losses)  # the chunk's only host read
                    bad = np.flatnonzero(~np.isfinite(values))
                    if bad.size:
                        at = done - length + int(bad[0]) + 1
                        raise UserError(
                            f"the loss became {values[bad[0]]} in epoch {epoch} at step {at} of "
                            f"{steps_per_epoch}; stopped. {after_nan()}",
                            exit_code=1,
                        )
                    say(_train_line(epoch, done * batch_size, num_train, values.mean()))
                    if progress is not None:
                        progress.advance(length)
                    return float(values.sum())

                for start, length in chunks(steps_per_epoch, config.train.log_every, first):
                    if first_step_seconds is None:
                        first_step_seconds = time.perf_counter() - dae_jax.PROCESS_START
                        say(f"First training step {first_step_seconds:.1f} s after start-up")
                    state, chunk_losses = programs[length](
                        state, train_images, order, jnp.int32(start), keys.noise, level
                    )
                    # Dispatch the next chunk before reading this one back.
                    while pending:
                        loss_sum += report(*pending.pop())
                    pending.append((start + length, length, chunk_losses))
                    done = start + length
                    if stop.signum is not None and done < steps_per_epoch:
                        loss_sum += report(*pending.pop())
                        save_checkpoint(epoch - 1, done, loss_sum)
                        raise stopped(
                            stop.signum, f"in epoch {epoch} at step {done} of {steps_per_epoch}"
                        )
                while pending:
                    loss_sum += report(*pending.pop())
                epoch_seconds = time.perf_counter() - epoch_start
                train_seconds += epoch_seconds

                eval_start = time.perf_counter()
                test = {
                    k: float(parallel.host(v))
                    for k, v in evaluate_program(
                        state.params, eval_batches, eval_weights, keys.eval, level
                    ).items()
                }
                record = {
                    "epoch": epoch,
                    "step": global_step(),
                    "train_loss": loss_sum / steps_per_epoch,
                    **test,
                    "epoch_seconds": epoch_seconds,
                    "examples_per_second": (steps_per_epoch - first) * batch_size / epoch_seconds,
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
                if epoch % config.checkpoint.every_epochs == 0 or epoch == epochs:
                    save_checkpoint(epoch, 0, 0.0)
                if stop.signum is not None and epoch < epochs:
                    if epoch % config.checkpoint.every_epochs:
                        save_checkpoint(epoch, 0, 0.0)
                    raise stopped(stop.signum, f"after epoch {epoch}")
    except BaseException:
        writer.close()
        raise
    finally:
        if progress is not None:
            progress.close()
        say = _logger(log)

    if epochs_done >= epochs:
        say(
            f"{workdir} is already trained for {epochs_done} epochs; raise "
            "--config.train.epochs to train longer"
        )
    if parallel.is_primary():
        params = jax.tree.map(parallel.host, state.params)
        eval_key = key_streams(root_key).eval  # on this host
        _write_figures(workdir, config, setup, params, dataset, eval_key, history)
    summary = {
        "dataset": dataset.name,
        "data_source": dataset.source,
        "epochs": epochs,
        "steps": global_step(),
        "num_params": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
        "final": history[-1] if history else {},
        "resumed_from_step": int(restored[1]["step"]) if restored is not None else None,
        "compile_seconds": compile_seconds,
        "time_to_first_step_seconds": first_step_seconds,
        "train_seconds": train_seconds,
        "checkpoint": str(checkpoints.path(checkpoints.steps()[-1]))
        if checkpoints.steps()
        else None,
        "versions": versions(),
        "device": device_info(),
    }
    _write_json(workdir / "summary.json", summary)
    writer.write("end", epochs=epochs, step=global_step(), train_seconds=train_seconds)
    writer.close()
    if history:
        final = history[-1]
        say(
            f"Done. Final test PSNR {final['test_psnr_noisy']:.2f} dB (noisy input) -> "
            f"{final['test_psnr_denoised']:.2f} dB (reconstruction). Figures: "
            f"{workdir / 'figures' / 'denoising.png'}, {workdir / 'figures' / 'loss.png'}; "
            f"metrics: {metrics_path}"
        )
    return FitResult(setup.graphdef, state, summary)


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


# ------------------------------------------------------------------- many models


@dataclasses.dataclass(frozen=True)
class ManyResult:
    """K models trained together: states stacked on a leading axis, in input order."""

    graphdef: nnx.GraphDef
    states: TrainState
    seeds: tuple[int, ...]
    levels: tuple[float, ...]
    history: list[dict[str, Any]]  # per epoch: train_loss per model, timing

    def model(self, k: int) -> models.Dae:
        return nnx.merge(self.graphdef, jax.tree.map(lambda x: x[k], self.states.params))


def fit_many(
    config: ml_collections.ConfigDict,
    *,
    seeds: Sequence[int],
    levels: Sequence[float],
    dataset: data.Dataset | None = None,
    train_indices: Sequence[np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
) -> ManyResult:
    """Trains one model per (seed, level) pair in one compiled program (``jax.vmap``).

    Model k is the run ``fit`` makes with ``config.seed = seeds[k]`` and
    ``config.noise.level = levels[k]``: same initialisation, data order and noise.
    The level is a traced value, so any mix of levels shares one program.
    ``train_indices[k]``, if given, are the training images model k sees (the same
    count for every model), e.g. all classes but one for anomaly detection.
    """
    if len(seeds) != len(levels) or not seeds:
        raise UserError(f"fit_many needs one seed per level; got {len(seeds)} and {len(levels)}")
    for seed_k, level_k in zip(seeds, levels, strict=True):
        with config.unlocked():
            single = ml_collections.ConfigDict(config.to_dict())
            single.seed, single.noise.level = int(seed_k), float(level_k)
        validate(single)
    say = _logger(log)
    if dataset is None:
        dataset = data.load(config.data, seed=config.seed)
    num_train, batch_size = len(dataset.train_images), config.train.batch_size
    index_KxN = None
    if train_indices is not None:
        if len(train_indices) != len(seeds) or len({len(i) for i in train_indices}) != 1:
            raise UserError("fit_many needs one index set per model, all of the same size")
        index_KxN = jnp.asarray(np.stack(train_indices), jnp.int32)
        num_train = index_KxN.shape[1]
    steps_per_epoch = _steps_per_epoch(num_train, batch_size)
    streams = [key_streams(int(s)) for s in seeds]
    init_keys, shuffle_keys, noise_keys = (
        jnp.stack([getattr(k, name) for k in streams]) for name in ("init", "shuffle", "noise")
    )
    graphdef, _ = abstract_state(config)
    setup = Setup.from_config(config, graphdef)
    states = jax.vmap(lambda key: init_state(config, key)[1])(init_keys)
    levels_K = jnp.asarray(levels, jnp.float32)
    images = jax.device_put(dataset.train_images)
    positions_for = jax.vmap(
        functools.partial(
            epoch_order, num_examples=num_train, steps=steps_per_epoch, batch_size=batch_size
        ),
        in_axes=(0, None),
    )

    def orders_for(keys: jax.Array, epoch: int) -> jax.Array:
        positions = positions_for(keys, epoch)
        if index_KxN is None:
            return positions
        return jax.vmap(lambda index, order: index[order])(index_KxN, positions)

    # Compile every chunk length before timing anything.
    compile_start = time.perf_counter()
    programs: dict[int, Any] = {}
    example_args = (states, images, orders_for(shuffle_keys, 0), jnp.int32(0), noise_keys, levels_K)
    for _, length in chunks(steps_per_epoch, config.train.log_every):
        if length not in programs:
            program = jax.jit(functools.partial(train_chunk_many, setup, length), donate_argnums=0)
            programs[length] = program.lower(*example_args).compile()
    history: list[dict[str, Any]] = []
    say(
        f"Training {len(seeds)} models at once on {dataset.name} ({num_train} images); "
        f"compiled in {time.perf_counter() - compile_start:.1f} s"
    )
    for epoch in range(1, config.train.epochs + 1):
        begin = time.perf_counter()
        orders = orders_for(shuffle_keys, epoch)
        loss_sums = np.zeros(len(seeds))
        for start, length in chunks(steps_per_epoch, config.train.log_every):
            states, losses_KxL = programs[length](
                states, images, orders, jnp.int32(start), noise_keys, levels_K
            )
            values = np.asarray(losses_KxL)
            bad = [k for k in range(len(seeds)) if not np.all(np.isfinite(values[k]))]
            if bad:
                k = bad[0]
                raise UserError(
                    f"the loss of the model with seed {seeds[k]} and level {levels[k]} became "
                    f"non-finite in epoch {epoch}; lower optim.learning_rate",
                    exit_code=1,
                )
            loss_sums += values.sum(axis=1)
            seen = (start + length) * batch_size
            say(
                _train_line(
                    epoch, seen, num_train, values.mean(), f" (mean of {len(seeds)} models)"
                )
            )
        seconds = time.perf_counter() - begin
        history.append(
            {
                "epoch": epoch,
                "train_loss": (loss_sums / steps_per_epoch).tolist(),
                "epoch_seconds": seconds,
                "examples_per_second": len(seeds) * steps_per_epoch * batch_size / seconds,
            }
        )
        mean_loss = float(np.mean(history[-1]["train_loss"]))
        say(
            f"====> Epoch: {epoch} Average loss over models: {mean_loss:.4f}  "
            f"({seconds:.1f} s, {history[-1]['examples_per_second']:,.0f} examples/s)"
        )
    return ManyResult(
        graphdef,
        states,
        tuple(int(s) for s in seeds),
        tuple(float(v) for v in levels),
        history,
    )

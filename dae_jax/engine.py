"""The one training loop: a population of K >= 1 models, one compiled program.

``dae-jax train`` is a population of one; a sweep is a population of many (one member
per seed x noise level x learning rate). Either way the loop is the same: chunks of
``train.log_every`` steps run as one jitted ``vmap(scan(train_step))`` (a population
of one without the vmap), the chunk's losses come back once, and per epoch the
population is evaluated, logged and checkpointed. Everything a run needs to resume
exactly (the stacked states, each member's root key and settings, the position in
training, which members diverged, the config) lives in its checkpoint.

A member whose loss or parameters turn non-finite in a chunk goes back to its state at
that chunk's start (its last state known finite), stays there, and is recorded as
diverged; the others train on. A population of one stops instead (exit 1), keeping
nothing after its last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dae_jax import checkpointing, data, guard, metrics, models, parallel, plots, runfiles
from dae_jax.errors import Interrupted, UserError
from dae_jax.step import (
    TRACED,
    Member,
    Setup,
    TrainState,
    abstract_state,
    chunks,
    epoch_order,
    evaluate_population,
    hyper_of,
    init_state,
    key_streams,
    padded_test_batches,
    population_chunk,
    test_images,
    to_float,
)

EpochCallback = Callable[[dict[str, Any], models.Dae], None]


@dataclasses.dataclass(frozen=True)
class Result:
    """What a population run ends with: states stacked on a leading axis, in member order."""

    graphdef: nnx.GraphDef
    states: TrainState
    members: tuple[Member, ...]
    history: list[dict[str, Any]]  # per epoch and member: the metrics.jsonl "epoch" records
    diverged: dict[int, dict[str, int]]  # member -> where its loss turned non-finite
    summary: dict[str, Any]

    def model(self, k: int = 0) -> models.Dae:
        return nnx.merge(self.graphdef, _member(self.states.params, k))

    def __repr__(self) -> str:
        return (
            f"Result(models={len(self.members)}, epochs={self.summary.get('epochs')}, "
            f"diverged={sorted(self.diverged)})"
        )

    def final(self, k: int = 0) -> dict[str, Any]:
        """Member k's last epoch record ({} before its first epoch)."""
        records = [r for r in self.history if r.get("model", 0) == k]
        return records[-1] if records else {}


def enable_compile_cache(directory: str, warn: Callable[[str], None] = print) -> Path | None:
    """Turns on JAX's persistent compilation cache in ``directory`` ("" = off).

    This is a process-wide JAX setting: later compilations in the same process (yours
    too) are cached there as well. The minimum compile time to cache is lowered to
    zero: our programs compile in about a second each, below JAX's default, and those
    seconds are most of a short run's start-up.
    """
    if not directory:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warn(f"warning: compile cache {path} is not usable ({e.strerror}); compiling afresh")
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped; the order changes every epoch)."""
    if batch_size > num_train:
        raise UserError(
            f"train.batch_size={batch_size} is larger than the training set ({num_train} images); "
            "use a smaller batch"
        )
    return num_train // batch_size


def train_line(epoch: int, seen: int, num_train: int, loss: float, suffix: str = "") -> str:
    """The tutorial's progress line."""
    return (
        f"Train Epoch: {epoch} [{seen}/{num_train} ({100.0 * seen / num_train:.0f}%)]"
        f"\tLoss: {loss:.6f}{suffix}"
    )


class _Log:
    """Prints the run's lines (process 0 only), through a progress bar when stderr is a
    terminal or a notebook (``tqdm.auto``); a ``log`` callable receives them instead."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log = log
        self.bar: Any = None
        self.primary = parallel.is_primary()

    def start_bar(self, total_steps: int, done: int) -> None:
        """Shows training's progress bar (until ``close``) when there is a terminal."""
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
        if self.log is None and self.primary and interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=done, unit="step", leave=False, file=sys.stderr
            )

    def __call__(self, line: str) -> None:
        if not self.primary:
            return
        if self.log is not None:
            self.log(line)
        elif self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


class _Writers:
    """Where a run's records go, through one ``write``: every record to
    ``metrics.jsonl``; an epoch's also to TensorBoard (``W/tensorboard``, a run per
    member) and to the ``on_epoch`` callback, with its member's model."""

    def __init__(
        self, workdir: Path, members: int, tensorboard: bool, on_epoch: EpochCallback | None
    ):
        self.jsonl = runfiles.MetricsWriter(workdir / "metrics.jsonl")
        self.tensorboard = runfiles.TensorBoard(workdir / "tensorboard", members, tensorboard)
        self.on_epoch = on_epoch

    def write(
        self, event: str, record: dict[str, Any], model: Callable[[], Any] | None = None
    ) -> None:
        """One record; for an epoch's, ``model()`` gives its member's model."""
        self.jsonl.write(event, **record)
        if event == "epoch":
            self.tensorboard.epoch(record.get("model", 0), record)
            if self.on_epoch is not None and model is not None:
                self.on_epoch(record, model())

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


@dataclasses.dataclass
class _Position:
    """Where training stands: what a checkpoint's meta records besides the states."""

    epochs_done: int
    step_in_epoch: int
    loss_sums: list[float]  # per member, the partial epoch's
    diverged: dict[int, dict[str, int]]
    root_keys: jax.Array  # [K] typed keys


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    members: Sequence[Member],
    *,
    dataset: data.Dataset | None = None,
    train_indices: Sequence[np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch: EpochCallback | None = None,
    figures: bool = True,
    freeze_diverged: bool = False,
    hparams: Sequence[dict[str, Any]] | None = None,
) -> Result:
    """Trains ``members`` (K >= 1) of the model ``config`` describes into ``workdir``,
    resuming from its latest intact checkpoint. ``train_indices[k]``, if given, are the
    training images member k sees (the same count for each). SIGINT/SIGTERM save a
    checkpoint at the next chunk boundary and raise ``Interrupted``. A population of one
    stops when its model diverges, unless ``freeze_diverged`` (a sweep's: it is frozen
    and recorded, like a member of a larger population). ``hparams[k]`` (default: member
    k's seed and traced values) labels member k in TensorBoard's hyperparameter view."""
    started = time.perf_counter()
    workdir = Path(workdir)
    runfiles.check_workdir(workdir)  # nothing is written before the inputs are known good
    if len(members) == 1:
        runfiles.refuse_experiment_root(workdir)
    enable_compile_cache(config.compile_cache, log or print)
    guard.stage("loading the data")
    if dataset is None:
        dataset = data.load(config.data, seed=config.seed)
    config = with_image_shape(config, dataset)
    check_memory(config, len(members), dataset)
    runfiles.prepare_workdir(workdir)
    with runfiles.WorkdirLock(workdir):
        guard.stage("training")
        loop = _Loop(
            config, workdir, tuple(members), dataset, train_indices, log, started,
            freeze_diverged=freeze_diverged, hparams=hparams,
        )  # fmt: skip
        try:
            return loop.train(on_epoch, figures)
        finally:
            loop.store.checkpoints.close()  # every save in flight is finished before we return


CGROUP_MEMORY = (  # a job's memory limit and usage: cgroup v2, then v1
    ("/sys/fs/cgroup", "memory.max", "memory.current"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
)


def available_memory() -> tuple[int | None, str]:
    """Bytes one device can still allocate, and what they are: ``memory_stats()`` on an
    accelerator, the host's available memory (``/proc/meminfo``) on the CPU; None where
    neither is known."""
    device = jax.local_devices()[0]
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, f"free on {device.device_kind}"
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, ""
    # A scheduler's memory limit for this job (cgroup v2, else v1), when it is lower.
    for directory, limit, usage in CGROUP_MEMORY:
        try:
            cgroup = Path(directory)
            left = int((cgroup / limit).read_text()) - int((cgroup / usage).read_text())
        except (OSError, ValueError):  # no such file, or "max": no limit
            continue
        if left < free:
            return max(left, 0), "left under this job's memory limit (cgroup)"
        break
    return free, "available on this host"


def check_memory(config: ml_collections.ConfigDict, k: int, dataset: data.Dataset) -> int:
    """Refuses, before anything is written, a run that cannot fit: a lower bound of its
    needs (each model's parameters, gradients and optimizer state, and the data kept on
    the device) against what one device can allocate. The host's out-of-memory killer
    or the allocator would otherwise stop it later, without a checkpoint. Returns the
    bound, in bytes."""
    _, abstract = abstract_state(config, k)
    state = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
    params = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract.params))
    count = sum(leaf.size for leaf in jax.tree.leaves(abstract.params)) // k
    devices = jax.local_devices()  # a population spreads over them; the CPU's share the host's
    spread = 1 if devices[0].platform == "cpu" else max(1, min(k, len(devices)))
    models_bytes = (state + params) // spread
    needed = models_bytes + dataset.train_images.nbytes + dataset.test_images.nbytes
    free, where = available_memory()
    if free is not None and needed > free:
        raise UserError(
            f"this run needs at least {needed / 2**30:.1f} GiB ({k} model(s) of "
            f"{count:,} parameters with their gradients and optimizer state, and the "
            f"data), more than the {free / 2**30:.1f} GiB {where}: use a smaller model "
            "(--config.model.hidden, --config.model.channels) or fewer models at once",
            exit_code=1,
        )
    return needed


def with_image_shape(
    config: ml_collections.ConfigDict, dataset: data.Dataset
) -> ml_collections.ConfigDict:
    """``config`` with ``data.image_shape`` read from ``dataset`` (a copy), after checking
    that the model can train on its images: a shape given in the config must be the
    data's, images of different sizes need patches, and patches must fit in every image."""
    shape = dataset.image_shape
    given = tuple(config.data.get("image_shape", ()) or ())
    if given and given != shape:
        raise UserError(
            f"config data.image_shape={given} but {dataset.name}'s images are "
            f"{'x'.join(map(str, shape))}; leave data.image_shape=() to read it from the data"
        )
    patch = int(config.data.get("patch_size", 0) or 0)
    if shape[0] == 0 and not patch:
        raise UserError(
            f"{dataset.name}'s training images differ in size (the smallest side is "
            f"{dataset.min_train_size}); train on patches cut from them: "
            "--config.data.patch_size=N (e.g. 40)"
        )
    # An MLP is evaluated on patch-sized centres of the test images too.
    limit = dataset.min_train_size
    if not models.kind(config).fully_convolutional:
        limit = min(limit, *dataset.test_images.shape[1:3])
    if patch > limit:
        raise UserError(
            f"data.patch_size={patch} is larger than {dataset.name}'s smallest image side "
            f"({limit}); give a smaller patch size"
        )
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.data.image_shape = tuple(shape)
    return resolved


class _Store:
    """A run's checkpoints: what resuming checks and restores, what each save records
    (the states and where training stands), and what starting over sets aside."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: Path,
        members: tuple[Member, ...],
        abstract: TrainState,
        steps: int,
        schedule: str,
        say: Callable[[str], None],
    ):
        self.config, self.workdir, self.members, self.abstract = config, workdir, members, abstract
        self.steps, self.schedule, self.say = steps, schedule, say
        self.checkpoints = checkpointing.Checkpoints(
            workdir / "checkpoints", keep=config.checkpoint.keep, warn=say
        )
        self.metrics_path = workdir / "metrics.jsonl"

    def check(self, meta: dict[str, Any]) -> None:
        """Refuses to resume a checkpoint trained with other settings or members."""
        saved = meta.get("config")
        if not isinstance(saved, dict) or not saved:  # no trustworthy record: shapes decide
            saved = None
        changes = checkpointing.science_changes(saved, self.config) if saved else []
        if len(self.members) > 1:  # each member's own seed and traced values, not the base's
            own = tuple(f"{key}:" for key in ("seed", *TRACED))
            changes = [c for c in changes if not c.startswith(own)]
            before = tuple(Member.from_record(m, self.config) for m in meta.get("members", []))
            if before != self.members:
                changes.append(
                    f"members: {len(before)} -> {len(self.members)} models, or other seeds or "
                    f"values of {', '.join(TRACED)}"
                )
        if changes:
            raise UserError(
                f"--workdir={self.workdir} holds a run trained with other settings "
                f"({'; '.join(changes)}); resuming would mix two experiments: use a new "
                "--workdir, or the run's own values (only train.epochs, the learning rate and "
                "logging, evaluation and checkpoint settings may change)"
            )
        done, epochs = int(meta["epoch"]), self.config.train.epochs
        saved_epochs = (saved or {}).get("train", {}).get("epochs", epochs)
        if self.schedule != "constant" and saved_epochs != epochs:
            raise UserError(
                f"--workdir={self.workdir} holds a run whose {self.schedule} "
                f"learning-rate schedule spans {saved_epochs} epochs; "
                f"--config.train.epochs={epochs} would change its rates: give "
                f"--config.train.epochs={saved_epochs}, or use a new --workdir"
            )
        needed = done + (1 if int(meta.get("step_in_epoch", 0)) else 0)  # a partial epoch counts
        if epochs < needed:  # refused before config.json or anything else is rewritten
            raise UserError(
                f"--workdir={self.workdir} holds a run trained for {done} epochs"
                + (" and part of the next" if needed > done else "")
                + f"; --config.train.epochs={epochs} would cut it back: give "
                f"--config.train.epochs={needed} or more to resume it, or use a new --workdir"
            )

    def restore(self) -> tuple[TrainState, _Position, dict[str, Any]] | None:
        if not self.checkpoints.steps():
            return None
        found = self.checkpoints.restore_latest(lambda meta: self.abstract, check=self.check)
        if found is None:
            return None
        state, meta = found
        position = _Position(
            int(meta["epoch"]),
            int(meta["step_in_epoch"]),
            [float(v) for v in meta["epoch_loss_sum"]],
            {int(k): v for k, v in meta.get("diverged", {}).items()},
            jax.random.wrap_key_data(jnp.asarray(meta["root_key_data"], jnp.uint32)),
        )
        return state, position, meta

    def fresh(self) -> tuple[TrainState, _Position]:
        if self.metrics_path.exists() and parallel.is_primary():
            backup = self.metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            self.metrics_path.replace(backup)
            self.say(
                f"No intact checkpoint in {self.checkpoints.directory}: starting over "
                f"(the earlier metrics are kept in {backup.name})"
            )
        root_keys = jnp.stack([jax.random.key(m.seed) for m in self.members])
        init_keys = jax.vmap(lambda root: key_streams(root).init)(root_keys)
        states = jax.vmap(lambda key: init_state(self.config, key)[1])(init_keys)
        return states, _Position(0, 0, [0.0] * len(self.members), {}, root_keys)

    def save(self, state: TrainState, position: _Position) -> None:
        self.checkpoints.save(
            state,
            {
                "step": self.global_step(position),
                "epoch": position.epochs_done,
                "step_in_epoch": position.step_in_epoch,
                "epoch_loss_sum": position.loss_sums,
                "root_key_data": np.asarray(jax.random.key_data(position.root_keys)).tolist(),
                "members": [m.record() for m in self.members],
                "diverged": {str(k): v for k, v in position.diverged.items()},
                "config": checkpointing.plain(self.config),
            },
        )

    def global_step(self, position: _Position) -> int:
        return position.epochs_done * self.steps + position.step_in_epoch

    def after_nan(self) -> str:
        steps = self.checkpoints.steps()
        if not steps:
            return "No checkpoint was saved: start again with a lower --config.optim.learning_rate"
        return (
            f"Nothing after the last good checkpoint ({self.checkpoints.path(steps[-1])}) is "
            "kept: resume from it with a lower --config.optim.learning_rate, or use a new "
            "--workdir"
        )

    def stopped(self, signum: int, position: _Position, where: str) -> Interrupted:
        return Interrupted(
            f"stopped by {signal.Signals(signum).name} {where}; checkpoint saved in "
            f"{self.checkpoints.path(self.global_step(position))}: run the same command "
            "again to resume",
            exit_code=128 + signum,
        )


class _Loop:
    """One population run: its static setup, placement and files, and the loop."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: Path,
        members: tuple[Member, ...],
        dataset: data.Dataset,
        train_indices: Sequence[np.ndarray] | None,
        log: Callable[[str], None] | None,
        started: float,
        *,
        freeze_diverged: bool = False,
        hparams: Sequence[dict[str, Any]] | None = None,
    ):
        self.config, self.workdir, self.members, self.dataset = config, workdir, members, dataset
        self.started, self.log = started, log
        self.k = len(members)
        self.index_KxN = None
        num_train = len(dataset.train_images) * int(config.data.get("patches_per_image", 1))
        if train_indices is not None:
            if len(train_indices) != self.k or len({len(i) for i in train_indices}) != 1:
                raise UserError("a population needs one index set per model, all of the same size")
            self.index_KxN = np.stack(train_indices).astype(np.int32)
            num_train = self.index_KxN.shape[1]
        self.num_train, self.batch_size = num_train, config.train.batch_size
        self.steps = steps_per_epoch(num_train, self.batch_size)
        self.placement = parallel.Placement.for_population(
            self.k, config.train.data_parallel, self.batch_size
        )
        self.say = _Log(log)
        self.graphdef, self.abstract = abstract_state(config, self.k)
        self.setup = Setup.from_config(config, self.graphdef, self.steps)
        kinds = {str(m.value("noise.kind")) for m in members}  # the members', not the base's
        kind = kinds.pop() if len(kinds) == 1 else ""  # "": traced, one lax.switch per step
        self.setup = dataclasses.replace(self.setup, noise_kind=kind)
        self.store = _Store(
            config, workdir, members, self.abstract, self.steps, self.setup.optim.schedule, self.say
        )
        self.stop = _StopSignals()
        self.first_step: float | None = None
        # A population's diverging member is frozen; a single run stops (unless asked).
        self.freeze_diverged = freeze_diverged or self.k > 1
        self.hparams = list(hparams) if hparams else [m.record() for m in members]

    # ------------------------------------------------------------------- the loop

    def train(self, on_epoch: EpochCallback | None, figures: bool) -> Result:
        shape = self.config.data.image_shape
        size = f"of various sizes x {shape[2]}" if shape[0] == 0 else "x".join(map(str, shape))
        patches = (
            f", trained on {self.setup.patch_size}x{self.setup.patch_size} patches"
            if self.setup.patch_size
            else ""
        )
        self.say(
            f"Data: {self.dataset.name} from {self.dataset.source} "
            f"({len(self.dataset.train_images)} train, {len(self.dataset.test_images)} test images)"
            f" {size}{patches}"
        )
        for note in self.dataset.notes:
            self.say(f"Data: {note}")
        restored = self.store.restore()
        if restored is not None:
            state, position, meta = restored
            history = runfiles.rewind_metrics(self.store.metrics_path, int(meta["step"]), self.say)
            where = (
                f"after epoch {position.epochs_done}"
                if position.step_in_epoch == 0
                else f"epoch {position.epochs_done + 1}, step {position.step_in_epoch} of "
                f"{self.steps}"
            )
            path = self.store.checkpoints.path(int(meta["step"]))
            self.say(f"Resuming from checkpoint {path} ({where})")
        else:
            state, position = self.store.fresh()
            history = []
        tensorboard = bool(self.config.get("tensorboard", True))
        writers = _Writers(self.workdir, self.k, tensorboard, on_epoch)
        started = {"step": self.store.global_step(position), "dataset": self.dataset.name}
        started.update(data_source=self.dataset.source, models=self.k, **runfiles.device_info())
        writers.write("resume" if restored is not None else "start", started)
        runfiles.write_json(self.workdir / "config.json", checkpointing.plain(self.config))
        if self.k > 1:
            runfiles.write_json(
                self.workdir / "population.json",
                {"members": [m.record() for m in self.members]},
            )
        self.trained_before = position.epochs_done if restored is not None else None
        try:
            with self.stop:  # a stop signal after the last chunk: the run just finishes
                state, first_step, compile_seconds, train_seconds = self._epochs(
                    state, position, history, writers
                )
                return self._finish(
                    state, position, history, restored, first_step, compile_seconds,
                    train_seconds, figures, writers,
                )  # fmt: skip
        finally:
            writers.close()

    def _inputs(self, position: _Position) -> dict[str, Any]:
        """The run's device arrays, placed once."""
        streams = jax.vmap(key_streams)(position.root_keys)
        p = self.placement
        images: Any = self.dataset.train_images
        if self.setup.patch_size:  # patches are cropped inside each image's own size
            sizes = self.dataset.train_sizes
            if sizes is None:
                sizes = np.tile(np.asarray(images.shape[1:3], np.int32), (len(images), 1))
            images = (images, sizes)
        batches, weights = padded_test_batches(
            self.dataset, self.config.eval.batch_size, self.config
        )
        hyper = hyper_of([m.mapping for m in self.members])
        return {
            "images": p.replicated(images),
            "eval": p.replicated((batches, weights)),
            "shuffle": streams.shuffle,
            "noise": p.per_model(streams.noise),
            "eval_keys": p.per_model(streams.eval),
            "hyper": p.per_model(hyper),
        }

    def _orders(self, shuffle_keys: jax.Array, epoch: int) -> jax.Array:
        order = functools.partial(
            epoch_order, num_examples=self.num_train, steps=self.steps, batch_size=self.batch_size
        )
        positions = jax.vmap(order, in_axes=(0, None))(shuffle_keys, epoch)
        if self.index_KxN is not None:
            positions = jax.vmap(lambda index, o: index[o])(jnp.asarray(self.index_KxN), positions)
        return self.placement.orders(positions)

    def _compile(self, state: TrainState, alive: jax.Array, inputs: dict, first: int, done: bool):
        programs: dict[int, Any] = {}
        example = (state, alive, inputs["images"], self._orders(inputs["shuffle"], 0))
        lengths = (
            []
            if done
            else [
                length
                for _, length in (
                    *chunks(self.steps, self.config.train.log_every, first),
                    *chunks(self.steps, self.config.train.log_every),
                )
            ]
        )
        for length in lengths:
            if length not in programs:
                program = jax.jit(
                    functools.partial(population_chunk, self.setup, length), donate_argnums=0
                )
                programs[length] = program.lower(
                    *example, jnp.int32(0), inputs["noise"], inputs["hyper"]
                ).compile()
        evaluate = (
            jax.jit(functools.partial(evaluate_population, self.setup))
            .lower(state.params, *inputs["eval"], inputs["eval_keys"], inputs["hyper"])
            .compile()
        )
        return programs, evaluate

    def _epochs(
        self,
        state: TrainState,
        position: _Position,
        history: list[dict[str, Any]],
        writers: _Writers,
    ) -> tuple[TrainState, float | None, float, float]:
        config, p, epochs = self.config, self.placement, self.config.train.epochs
        models = f": {self.k} models at once" if self.k > 1 else ""
        self.say(f"Training on {p.describe()}{models}")
        inputs = self._inputs(position)
        state = p.per_model(state)
        alive = p.per_model(jnp.asarray([k not in position.diverged for k in range(self.k)]))
        compile_start = time.perf_counter()
        programs, evaluate = self._compile(
            state, alive, inputs, position.step_in_epoch, position.epochs_done >= epochs
        )
        compile_seconds = time.perf_counter() - compile_start
        self.say(f"Compiled {len(programs) + 1} programs in {compile_seconds:.1f} s")
        writers.write("compile", {"seconds": compile_seconds})

        self.say.start_bar(self.steps * epochs, self.store.global_step(position))
        profile_steps = int(config.get("profile_steps", 0))
        profiler = runfiles.Profiler(profile_steps, self.workdir / "profile", self.say)
        train_seconds, self.first_step = 0.0, None
        stop = self.stop
        try:
            for epoch in range(position.epochs_done + 1, epochs + 1):
                first = position.step_in_epoch
                epoch_start = time.perf_counter()
                state, alive = self._train_epoch(
                    epoch, state, alive, programs, inputs, position, profiler
                )
                epoch_seconds = time.perf_counter() - epoch_start
                train_seconds += epoch_seconds
                self._end_epoch(
                    epoch, first, epoch_seconds, state, evaluate, inputs, position, history,
                    writers,
                )  # fmt: skip
                if epoch % config.checkpoint.every_epochs == 0 or epoch == epochs:
                    self.store.save(state, position)
                if stop.signum is not None and epoch < epochs:
                    if epoch % config.checkpoint.every_epochs:
                        self.store.save(state, position)
                    raise self.store.stopped(stop.signum, position, f"after epoch {epoch}")
        finally:
            profiler.stop()
            self.say.close()
        return state, self.first_step, compile_seconds, train_seconds

    def _train_epoch(
        self,
        epoch: int,
        state: TrainState,
        alive: jax.Array,
        programs: dict[int, Any],
        inputs: dict[str, Any],
        position: _Position,
        profiler: runfiles.Profiler,
    ) -> tuple[TrainState, jax.Array]:
        """The epoch's chunks from ``position`` on; a stop signal saves mid-epoch."""
        order = self._orders(inputs["shuffle"], epoch)
        pending: list[tuple[int, int, jax.Array, jax.Array]] = []
        for start, length in chunks(
            self.steps, self.config.train.log_every, position.step_in_epoch
        ):
            if self.first_step is None:
                self.first_step = time.perf_counter() - self.started
                self.say(f"First training step {self.first_step:.1f} s after the start")
            profiler.before_chunk()
            state, alive, chunk_losses = programs[length](
                state, alive, inputs["images"], order, jnp.int32(start), inputs["noise"],
                inputs["hyper"],
            )  # fmt: skip
            profiler.after_chunk(length, chunk_losses)
            while pending:  # dispatch the next chunk before reading this one
                self._report(epoch, position, *pending.pop())
            pending.append((start + length, length, chunk_losses, alive))
            if self.stop.signum is not None and start + length < self.steps:
                self._report(epoch, position, *pending.pop())
                self.store.save(state, position)
                where = f"in epoch {epoch} at step {position.step_in_epoch} of {self.steps}"
                raise self.store.stopped(self.stop.signum, position, where)
        while pending:
            self._report(epoch, position, *pending.pop())
        return state, alive

    def _report(
        self,
        epoch: int,
        position: _Position,
        done: int,
        length: int,
        losses: jax.Array,
        alive: jax.Array,
    ) -> None:
        """Reads a chunk's losses back (its only host read), logs them, and records a
        member that diverged; a population of one stops there."""
        values = parallel.host(losses)  # [K, length]
        alive_now = parallel.host(alive)
        position.step_in_epoch = done
        for k in np.flatnonzero(~alive_now):
            if int(k) in position.diverged:
                continue
            bad = np.flatnonzero(~np.isfinite(values[k]))
            at = done - length + (int(bad[0]) + 1 if bad.size else length)
            position.diverged[int(k)] = {"epoch": epoch, "step": at}
            if not self.freeze_diverged:
                raise UserError(
                    f"the loss became {values[k][bad[0]] if bad.size else 'non-finite'} in epoch "
                    f"{epoch} at step {at} of {self.steps}; stopped. {self.store.after_nan()}",
                    exit_code=1,
                )
            self.say(
                f"warning: model {k} ({self.members[k].describe()}) diverged in epoch {epoch} "
                f"at step {at}: frozen where the chunk began, the others train on"
            )
        live = [k for k in range(self.k) if k not in position.diverged]
        position.loss_sums = [s + float(values[k].sum()) for k, s in enumerate(position.loss_sums)]
        mean = float(values[live].mean()) if live else float("nan")
        suffix = f" (mean of {len(live)} models)" if self.k > 1 else ""
        self.say(train_line(epoch, done * self.batch_size, self.num_train, mean, suffix))
        self.say.advance(length)

    def _end_epoch(
        self,
        epoch: int,
        first: int,
        epoch_seconds: float,
        state: TrainState,
        evaluate: Any,
        inputs: dict,
        position: _Position,
        history: list[dict[str, Any]],
        writers: _Writers,
    ) -> None:
        """Evaluates every member, writes its epoch record, and moves to the next epoch."""
        eval_start = time.perf_counter()
        test = jax.tree.map(
            parallel.host,
            evaluate(state.params, *inputs["eval"], inputs["eval_keys"], inputs["hyper"]),
        )
        eval_seconds = time.perf_counter() - eval_start
        examples = (self.steps - first) * self.batch_size
        for k in range(self.k):
            record = {
                **({"model": k} if self.k > 1 else {}),
                "epoch": epoch,
                "step": epoch * self.steps,
                "train_loss": position.loss_sums[k] / self.steps,
                **{name: float(values[k]) for name, values in test.items()},
                "epoch_seconds": epoch_seconds,
                "examples_per_second": self.k * examples / epoch_seconds,
                "eval_seconds": eval_seconds,
                "learning_rate": self.setup.optim.learning_rate_at(
                    float(self.members[k].value("optim.learning_rate")), epoch * self.steps - 1
                ),
                **({"diverged": True} if k in position.diverged else {}),
            }
            history.append(record)
            writers.write("epoch", record, functools.partial(self._model, state, k))
        position.epochs_done, position.step_in_epoch = epoch, 0
        position.loss_sums = [0.0] * self.k
        last = history[-self.k :]
        live = [r for r in last if not r.get("diverged")] or last
        mean = {
            key: float(np.mean([r[key] for r in live]))
            for key in ("train_loss", "test_loss", "test_psnr_noisy", "test_psnr_denoised")
        }
        label = "Average loss" if self.k == 1 else f"Average loss over {len(live)} models"
        self.say(
            f"====> Epoch: {epoch} {label}: {mean['train_loss']:.4f}  "
            f"Test loss: {mean['test_loss']:.4f}  "
            f"PSNR noisy {mean['test_psnr_noisy']:.2f} dB -> "
            f"denoised {mean['test_psnr_denoised']:.2f} dB  "
            f"({epoch_seconds:.1f} s, {last[0]['examples_per_second']:,.0f} examples/s)"
        )

    def _model(self, state: TrainState, k: int) -> nnx.Module:
        return nnx.merge(self.graphdef, _member(state.params, k))

    def _finish(
        self,
        state: TrainState,
        position: _Position,
        history: list[dict[str, Any]],
        restored: Any,
        first_step: float | None,
        compile_seconds: float,
        train_seconds: float,
        figures: bool,
        writers: _Writers,
    ) -> Result:
        config, workdir, epochs = self.config, self.workdir, self.config.train.epochs
        if self.trained_before is not None and self.trained_before >= epochs:  # before, not now
            self.say(
                f"{workdir} is already trained for {self.trained_before} epochs; raise "
                "--config.train.epochs to train longer"
            )
        if figures and self.k == 1 and parallel.is_primary():
            params = jax.tree.map(lambda x: parallel.host(x)[0], state.params)
            eval_key = key_streams(position.root_keys[0]).eval
            _write_figures(workdir, config, self.setup, params, self.dataset, eval_key, history)
            figure = workdir / "figures" / "denoising.png"
            epoch = position.epochs_done  # the step the scalars are logged at
            writers.tensorboard.image(0, "denoising", figure, epoch)
        finals = [[r for r in history if r.get("model", 0) == k][-1:] for k in range(self.k)]
        for k, last in enumerate(finals):
            writers.tensorboard.hparams(k, self.hparams[k], (last or [{}])[0])
        last_steps = self.store.checkpoints.steps()
        summary = {
            "dataset": self.dataset.name,
            "data_source": self.dataset.source,
            "epochs": epochs,
            "steps": self.store.global_step(position),
            "num_params": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)) // self.k,
            "final": (finals[0] or [{}])[0] if self.k == 1 else [(f or [{}])[0] for f in finals],
            **({"members": [m.record() for m in self.members]} if self.k > 1 else {}),
            "diverged": {str(k): v for k, v in position.diverged.items()},
            "resumed_from_step": int(restored[2]["step"]) if restored is not None else None,
            "compile_seconds": compile_seconds,
            "time_to_first_step_seconds": first_step,
            "train_seconds": train_seconds,
            "checkpoint": str(self.store.checkpoints.path(last_steps[-1])) if last_steps else None,
            "versions": runfiles.versions(),
            "device": runfiles.device_info(),
        }
        runfiles.write_json(workdir / "summary.json", summary)
        end = {"epochs": epochs, "step": self.store.global_step(position)}
        writers.write("end", {**end, "train_seconds": train_seconds})
        if history and self.k == 1:
            final = history[-1]
            self.say(
                f"Done. Final test PSNR {final['test_psnr_noisy']:.2f} dB (noisy input) -> "
                f"{final['test_psnr_denoised']:.2f} dB (reconstruction). Figures: "
                f"{workdir / 'figures' / 'denoising.png'}, {workdir / 'figures' / 'loss.png'}; "
                f"metrics: {self.store.metrics_path}"
            )
        return Result(self.graphdef, state, self.members, history, dict(position.diverged), summary)


def _member(tree: Any, k: int) -> Any:
    """Member k's slice of a population's stacked arrays."""
    return jax.tree.map(lambda x: x[k], tree)


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
    clean = to_float(jnp.asarray(test_images(dataset, config)[:count]))
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

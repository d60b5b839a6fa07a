"""Orbax checkpoints of the whole training state, resuming, and restoring a trained model.

A checkpoint holds the population's stacked ``TrainState`` (parameters, Adam state,
global step) and a JSON ``meta`` with the position in training (epoch, step in epoch,
the partial epoch's loss sums), each member's root PRNG key, seed, noise level and
learning rate, the members that diverged, and the run's config. The data order and
the noise are functions of the root key and the position, so a resumed run retraces
the uninterrupted one bit for bit; and a resume is checked against the settings the
checkpoint was trained with even when ``config.json`` is missing or damaged.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dae_jax import models
from dae_jax.configs import default
from dae_jax.errors import UserError, first_line

# Keys whose change would change what a run computes: refused on resume (a section: each
# of its keys, less RESUMABLE). train.epochs may grow; the learning rate may change;
# logging, evaluation and checkpoint settings may change.
RESUMABLE = ("optim.learning_rate",)
SCIENCE_KEYS = (
    "seed",
    "data.name",
    "data.train_size",
    "data.test_size",
    "data.channels",
    "data.image_shape",
    "data.patch_size",
    "data.patches_per_image",
    "data.augment",
    "data.test_fraction",
    "model",
    "noise",
    "loss",
    "train.batch_size",
    "optim",
)

_TMP_MARK = ".orbax-checkpoint-tmp"
# How a full disk (or quota, or file size limit) shows in orbax's and TensorStore's errors.
_SPACE_MARKS = (
    "No space",
    "ENOSPC",
    "File too large",
    "MiB free",
    "quota",
    "OUT_OF_RANGE: Error writing",
)


def plain(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as JSON values (tuples become lists), so saved and new configs compare."""
    as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(as_dict))


_MISSING = object()


def _lookup(tree: dict, key: str, missing: Any = None) -> Any:
    """``tree``'s value at dotted ``key``; ``missing`` (default ``{}``) where it has none."""
    for part in key.split("."):
        tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
        if tree is _MISSING:
            return {} if missing is None else missing
    return tree


def science_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``key: old -> new`` for each science key that differs from the saved config.

    A key the saved config lacks (it predates the key) counts as its default value; an
    image shape it lacks, as the 28x28x1 every run had before the key existed."""
    new = plain(config)
    defaults = plain(default.get_config())
    defaults["data"]["image_shape"] = list(models.IMAGE_SHAPE)
    changes = []
    for key in SCIENCE_KEYS:
        before = _lookup(saved, key, missing=_lookup(defaults, key))
        after = _lookup(new, key)
        if isinstance(before, dict) and isinstance(after, dict):
            before = {**_lookup(defaults, key), **before}
        if before != after:
            if isinstance(before, dict) and isinstance(after, dict):
                for sub in sorted(set(before) | set(after)):
                    if before.get(sub) != after.get(sub) and f"{key}.{sub}" not in RESUMABLE:
                        changes.append(f"{key}.{sub}: {before.get(sub)} -> {after.get(sub)}")
            else:
                changes.append(f"{key}: {before} -> {after}")
    return changes


def _orbax_leftover(unraisable: Any) -> bool:
    """What orbax (0.11-0.12) leaves behind a damaged checkpoint's failed restore, reported
    when the garbage collector finds it: its sibling read coroutines, and the TensorStore
    callbacks that find their event loop closed."""
    if getattr(unraisable.object, "__qualname__", "").startswith("_read_array_index"):
        return True
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        frames = traceback.extract_tb(unraisable.exc_traceback)
        return any(frame.name == "call_soon_threadsafe" for frame in frames)
    return False


def _not_orbax_leftover(record: logging.LogRecord) -> bool:
    """asyncio's "... exception was never retrieved" for a read that failed with the rest."""
    message = record.getMessage()
    ours = ("array index", "OCDBT", "TensorStore", "tensorstore")
    return not ("exception was never retrieved" in message and any(o in message for o in ours))


def _ignore_orbax_read_coroutines() -> None:
    """After a damaged checkpoint fails to restore, orbax leaves sibling read coroutines
    and callbacks to the garbage collector, which prints each one's traceback (possibly
    much later; measured with orbax 0.12.8: a few per restore). The failure is already
    reported in one line, so those, and only those, are dropped. (Under the command
    line's crash guard everything else that is printed this way goes to W/logs/.)"""
    previous = sys.unraisablehook
    if getattr(previous, "_dae_jax", False):
        return

    def hook(unraisable: Any) -> None:
        if not _orbax_leftover(unraisable):
            previous(unraisable)

    hook._dae_jax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    asyncio_logger = logging.getLogger("asyncio")
    if _not_orbax_leftover not in asyncio_logger.filters:
        asyncio_logger.addFilter(_not_orbax_leftover)


def _on_this_host(abstract: Any) -> Any:
    """Abstract arrays placed on this process's first device: a GPU run restores on a CPU."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )


class Checkpoints:
    """``W/checkpoints/``: an ``ocp.CheckpointManager`` keyed by global step."""

    def __init__(
        self,
        directory: Path,
        *,
        keep: int = 3,
        read_only: bool = False,
        warn: Callable[[str], None] = print,
    ):
        self.directory = directory.absolute()
        self.read_only = read_only
        self.warn = warn
        # A reader (evaluate, denoise) next to a running train sees its save in progress.
        saving = read_only and _in_use(self.directory.parent)
        if self.directory.is_dir() and not saving:
            for leftover in sorted(self.directory.glob(f"*{_TMP_MARK}*")):
                warn(
                    f"warning: skipping unfinished checkpoint {leftover.name} "
                    "(its save was interrupted)" + ("" if read_only else "; removing it")
                )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep,
                save_interval_steps=0 if read_only else 1,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
                enable_async_checkpointing=True,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save; the arrays are copied to the host first, so the
        caller may donate its buffers to the next step at once."""
        # One process: a host copy (donation-safe). Several: the global arrays, whose
        # shards each process writes (orbax copies them to the host before returning).
        host_state = jax.tree.map(np.array, state) if jax.process_count() == 1 else state
        step = int(meta["step"])
        self._check_space(host_state, step)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:  # an earlier asynchronous save's failure surfaces here too
            raise self._save_failed(step, e) from None

    def _check_space(self, state: Any, step: int) -> None:
        """Stops before a save that cannot fit, keeping every checkpoint already written."""
        # .nbytes, not a host copy: a global array of several processes cannot be fetched.
        sizes = [
            x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes
            for x in jax.tree.leaves(state)
        ]
        needed = sum(int(size) for size in sizes) + 2**20
        free = shutil.disk_usage(
            self.directory if self.directory.exists() else self.directory.parent
        ).free
        if free < 2 * needed:  # the new save is written before an old one is removed
            raise self._save_failed(
                step, OSError(f"{free / 2**20:.0f} MiB free, {2 * needed / 2**20:.0f} MiB needed")
            )

    def _save_failed(self, step: int, e: Exception) -> UserError:
        steps = [s for s in self.steps() if s != step]
        kept = f"the last good one is {self.path(steps[-1])}" if steps else "none was saved before"
        text = str(e)
        space = getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
            mark in text for mark in _SPACE_MARKS
        )
        advice = (
            "free disk space (or move the workdir)"
            if space
            else f"check that {self.directory} is a directory you can write to"
        )
        return UserError(
            f"cannot save checkpoint {step} in {self.directory} ({first_line(e)}): {kept}; "
            f"{advice} and run the same command again to resume",
            exit_code=1,
        )

    def restore_latest(
        self,
        abstract_for: Callable[[dict[str, Any]], Any],
        check: Callable[[dict[str, Any]], None] = lambda meta: None,
    ) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that restores, skipping damaged ones with a warning.

        Its meta is read first: ``check(meta)`` may refuse it (its ``UserError`` passes
        through), and ``abstract_for(meta)`` gives the state's shapes. A checkpoint
        written before checkpoints held their population and config is refused in one
        line."""
        for step in reversed(self.steps()):
            try:
                meta = dict(
                    self.manager.restore(
                        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                    )["meta"]
                )
                if int(meta["step"]) != step:
                    raise ValueError(f"its meta says step {meta['step']}")
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                self._damaged(step, e)
                continue
            if "members" not in meta or "config" not in meta:
                raise UserError(
                    f"{self.directory} holds checkpoints of an earlier dae_jax (saved without "
                    "their population or config record, before 0.2); this version cannot "
                    "resume or restore them: train the run again in a new --workdir"
                )
            check(meta)
            abstract = abstract_for(meta)
            try:
                state = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_on_this_host(abstract))
                    ),
                )["state"]
            except Exception as e:
                self._damaged(step, e)
                continue
            return state, meta
        return None

    def _damaged(self, step: int, e: Exception) -> None:
        """Warns in one line and sets the checkpoint aside (in place when read-only)."""
        _ignore_orbax_read_coroutines()
        gc.collect()
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first_line = first_line.split(". See full")[0][:160]
        moved = "" if self.read_only else f"; moved to {self._set_aside(step)}"
        self.warn(f"warning: skipping damaged checkpoint {step} ({first_line}){moved}")

    def _set_aside(self, step: int) -> Path:
        """Moves a damaged checkpoint out of the manager's way (a new save may need its
        step number) without deleting anything."""
        target = self.directory.parent / "damaged_checkpoints" / str(step)
        suffix = 1
        while target.exists():
            target = target.with_name(f"{step}.{suffix}")
            suffix += 1
        target.parent.mkdir(exist_ok=True)
        self.path(step).rename(target)
        self.manager.reload()
        return target

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def close(self) -> None:
        """Waits for every save in flight, then releases the manager; a save that failed
        (a full disk) ends in one line."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            steps = self.steps()
            raise self._save_failed(steps[-1] if steps else -1, e) from None
        finally:
            self.manager.close()


def _in_use(workdir: Path) -> bool:
    """Whether another process holds ``workdir``'s lock (a train is running there)."""
    from dae_jax import runfiles

    try:
        runfiles.WorkdirLock(workdir).probe()
    except UserError:
        return True
    return False


def _config_of_checkpoints(workdir: Path) -> ml_collections.ConfigDict | None:
    """The config the latest readable checkpoint recorded (None: none did)."""
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        return None
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # a read-only manager says so
    try:
        manager = Checkpoints(directory, read_only=True, warn=lambda line: None).manager
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            except Exception:  # damaged: the one before may do
                continue
            if isinstance(meta["meta"].get("config"), dict):
                return ml_collections.ConfigDict(meta["meta"]["config"])
    except Exception:
        return None
    finally:
        absl_logging.set_verbosity(verbosity)
    return None


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    """The run's config: ``W/config.json``, or, when it is missing, the one its latest
    checkpoint recorded (as resume, ``restore`` and ``denoise`` use)."""
    path = workdir / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict) or not value:
            raise ValueError("not a config object")
        return ml_collections.ConfigDict(value)
    except FileNotFoundError:
        recorded = _config_of_checkpoints(workdir)
        if recorded is not None:
            return recorded
        raise UserError(
            f"{workdir} holds no run (no config.json); train one first: "
            f"dae-jax train --workdir={workdir}",
            exit_code=1,
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read {path} ({first_line(e)}); the workdir is damaged: run "
            f"dae-jax train --workdir={workdir} with the run's settings to rewrite it from "
            "its checkpoint",
            exit_code=1,
        ) from None


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model with the config it was trained with and where it stopped."""

    model: models.Dae
    config: ml_collections.ConfigDict
    epoch: int  # epochs completed
    step: int  # global steps completed
    workdir: Path
    member: int = 0  # which model of a population (a sweep); 0 for a single run

    def __repr__(self) -> str:
        return (
            f"Run(workdir={str(self.workdir)!r}, member={self.member}, epoch={self.epoch}, "
            f"step={self.step}, model={type(self.model).__name__})"
        )


def restore(workdir: str | Path, *, model: int = 0, warn: Callable[[str], None] = print) -> Run:
    """Model ``model`` (0 for a single run; any member of a sweep's population) of
    ``workdir``'s latest intact checkpoint, with the config it was trained with (its
    seed, noise level and learning rate set to the member's), on this process's devices."""
    from dae_jax import step as steps  # jax-heavy: imported on use

    workdir = Path(workdir)
    directory = workdir / "checkpoints"
    if not directory.is_dir():
        load_config(workdir)  # says whether the workdir holds a run at all
    config = None

    def abstract_for(meta: dict[str, Any]) -> Any:
        nonlocal config
        config = (
            ml_collections.ConfigDict(meta["config"]) if "config" in meta else load_config(workdir)
        )
        members = meta["members"]
        if not 0 <= model < len(members):
            raise UserError(
                f"{workdir} holds {len(members)} models (0 to {len(members) - 1}); "
                f"--model={model} does not exist",
            )
        config = steps.Member.from_record(members[model], config).config(config)
        return steps.abstract_state(config, len(members))[1]

    found = None
    if directory.is_dir():
        from absl import logging  # orbax warns that a read-only manager is read-only

        verbosity = logging.get_verbosity()
        logging.set_verbosity(logging.ERROR)
        try:
            checkpoints = Checkpoints(directory, read_only=True, warn=warn)
            found = checkpoints.restore_latest(abstract_for)
        finally:
            logging.set_verbosity(verbosity)
    if found is None or config is None:
        raise UserError(
            f"{workdir} has no intact checkpoint; train (or resume) it with "
            f"dae-jax train --workdir={workdir}",
            exit_code=1,
        )
    state, meta = found
    params = jax.tree.map(lambda x: x[model], state.params)
    graphdef = steps.abstract_state(config)[0]
    return Run(
        model=nnx.merge(graphdef, params),
        config=config,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        workdir=workdir,
        member=model,
    )

"""Orbax checkpoints of the whole training state, resuming, and restoring a trained model.

A checkpoint holds the ``TrainState`` (parameters, Adam state, global step) and a JSON
``meta`` with the position in training (epoch, step in epoch, the partial epoch's loss
sum) and the run's root PRNG key. The data order and the noise are functions of the
root key and the position, so a resumed run retraces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
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
from dae_jax.errors import UserError

# Keys whose change would change what a run computes: refused on resume.
# (train.epochs may grow; logging, evaluation and checkpoint settings may change.)
SCIENCE_KEYS = (
    "seed",
    "data.name",
    "data.train_size",
    "data.test_size",
    "model",
    "noise",
    "loss",
    "train.batch_size",
)

_TMP_MARK = ".orbax-checkpoint-tmp"


def _plain(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as JSON values (tuples become lists), so saved and new configs compare."""
    as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(as_dict))


def _lookup(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def science_changes(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``key: old -> new`` for each science key that differs from the saved config.

    A key the saved config lacks (it predates the key) counts as its default value."""
    new = _plain(config)
    defaults = _plain(default.get_config())
    changes = []
    for key in SCIENCE_KEYS:
        before, after = _lookup(saved, key), _lookup(new, key)
        if isinstance(before, dict) and isinstance(after, dict):
            before = {**_lookup(defaults, key), **before}
        if before != after:
            if isinstance(before, dict) and isinstance(after, dict):
                for sub in sorted(set(before) | set(after)):
                    if before.get(sub) != after.get(sub):
                        changes.append(f"{key}.{sub}: {before.get(sub)} -> {after.get(sub)}")
            else:
                changes.append(f"{key}: {before} -> {after}")
    return changes


def _ignore_orbax_read_coroutines() -> None:
    """After a damaged checkpoint fails to restore, orbax leaves sibling read coroutines
    to the garbage collector, which prints each one's traceback (possibly much later).
    The failure is already reported in one line, so those, and only those, are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_dae_jax", False):
        return

    def hook(unraisable: Any) -> None:
        name = getattr(unraisable.object, "__qualname__", "")
        if name.startswith("_read_array_index"):
            return
        previous(unraisable)

    hook._dae_jax = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


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
        if self.directory.is_dir():
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
        self.manager.save(
            int(meta["step"]),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that restores, skipping damaged ones with a warning."""
        target = _on_this_host(abstract_state)
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                    ),
                )
                state, meta = restored["state"], dict(restored["meta"])
                if int(meta["step"]) != step:
                    raise ValueError(f"its meta says step {meta['step']}")
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                _ignore_orbax_read_coroutines()
                gc.collect()
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                first_line = first_line.split(". See full")[0][:160]
                moved = "" if self.read_only else f"; moved to {self._set_aside(step)}"
                self.warn(f"warning: skipping damaged checkpoint {step} ({first_line}){moved}")
                continue
            return state, meta
        return None

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
        """Waits for every save in flight, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def load_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise UserError(
            f"{workdir} holds no run (no config.json); train one first: "
            f"dae-jax train --workdir={workdir}",
            exit_code=1,
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); the workdir is damaged", exit_code=1) from None


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model with the config it was trained with and where it stopped."""

    model: models.Dae
    config: ml_collections.ConfigDict
    epoch: int  # epochs completed
    step: int  # global steps completed
    workdir: Path


def restore(workdir: str | Path, *, warn: Callable[[str], None] = print) -> Run:
    """The model of ``workdir``'s latest intact checkpoint, on this process's devices."""
    from dae_jax import train  # train imports this module

    workdir = Path(workdir)
    config = load_config(workdir)
    graphdef, abstract = train.abstract_state(config)
    directory = workdir / "checkpoints"
    found = None
    if directory.is_dir():
        found = Checkpoints(directory, read_only=True, warn=warn).restore_latest(abstract)
    if found is None:
        raise UserError(
            f"{workdir} has no intact checkpoint; train (or resume) it with "
            f"dae-jax train --workdir={workdir}",
            exit_code=1,
        )
    state, meta = found
    return Run(
        model=nnx.merge(graphdef, state.params),
        config=config,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        workdir=workdir,
    )

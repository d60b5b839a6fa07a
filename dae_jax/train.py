"""Training's Python API: ``fit`` (one model) and ``fit_many`` (a population), both thin
faces of the one loop in ``dae_jax.engine``; the step's building blocks (state, keys,
data order, the compiled chunk, evaluation) are in ``dae_jax.step``.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from dae_jax import data, engine, models
from dae_jax.configs import validate
from dae_jax.engine import EpochCallback, Result
from dae_jax.errors import UserError
from dae_jax.step import TRACED, Member, TrainState

__all__ = ["FitResult", "fit", "fit_many"]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What ``fit`` ends with: the final train state, the run's summary and its history
    (the ``metrics.jsonl`` epoch records)."""

    graphdef: nnx.GraphDef
    state: TrainState
    summary: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def model(self) -> models.Dae:
        return nnx.merge(self.graphdef, self.state.params)

    def __repr__(self) -> str:
        final = self.summary.get("final") or {}
        psnr = final.get("test_psnr_denoised")
        return (
            f"FitResult(epochs={len(self.history)}, steps={self.summary.get('steps')}, "
            f"test_psnr_denoised={psnr})"
        )


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    dataset: data.Dataset | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Trains the DAE that ``config`` describes, writing the run to ``workdir``.

    A workdir with checkpoints is resumed from its latest intact one. SIGINT/SIGTERM
    save a checkpoint at the next chunk boundary and raise ``Interrupted``; a NaN/Inf
    loss raises ``UserError`` and keeps nothing past the last good checkpoint.
    ``on_epoch(record, model)`` is called after each epoch with the epoch's metrics
    (the ``metrics.jsonl`` record) and the model: hook a notebook or a tracker there.
    """
    config = validate(config)
    result = engine.run(
        config, workdir, [Member.of(config)], dataset=dataset, log=log, on_epoch=on_epoch
    )
    state = jax.tree.map(lambda x: x[0], result.states)
    return FitResult(result.graphdef, state, result.summary, result.history)


def fit_many(
    config: ml_collections.ConfigDict,
    *,
    seeds: Sequence[int],
    levels: Sequence[float] | None = None,
    learning_rates: Sequence[float] | None = None,
    values: Sequence[dict[str, Any]] | None = None,
    workdir: str | Path | None = None,
    dataset: data.Dataset | None = None,
    train_indices: Sequence[np.ndarray] | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch: EpochCallback | None = None,
) -> Result:
    """Trains one model per seed in one compiled program.

    Model k is the run ``fit`` makes with ``config.seed = seeds[k]`` and, for each key of
    ``values[k]`` (any of ``TRACED``: ``noise.level``, ``optim.learning_rate``,
    ``optim.weight_decay``), that value; ``levels`` and ``learning_rates`` are shorthands
    for those two keys. Same initialisation, data order and noise as ``fit``. Traced
    values share one program, so any mix of them trains at once. ``train_indices[k]``,
    if given, are the training images model k sees (the same count for every model).
    With a ``workdir`` the population is a resumable run there (checkpoints,
    metrics.jsonl, every model kept for ``dae_jax.restore(W, model=k)``); without one it
    trains in a temporary directory that is removed afterwards.
    """
    config = validate(config)
    count = len(seeds)
    given = {"levels": levels, "learning_rates": learning_rates, "values": values}
    wrong = {name: len(v) for name, v in given.items() if v is not None and len(v) != count}
    if not seeds or wrong:
        raise UserError(
            f"fit_many needs one value per seed in each list; got {count} seeds and "
            + ", ".join(f"{n} {name}" for name, n in wrong.items())
        )
    members = []
    for k, seed in enumerate(seeds):
        own = dict(values[k]) if values is not None else {}
        unknown = sorted(set(own) - set(TRACED))
        if unknown:
            raise UserError(
                f"fit_many: {', '.join(unknown)} cannot differ inside one program (the traced "
                f"keys are {', '.join(TRACED)}); train a population per value instead"
            )
        if levels is not None:
            own["noise.level"] = levels[k]
        if learning_rates is not None:
            own["optim.learning_rate"] = learning_rates[k]
        base = Member.of(config, seed=int(seed)).mapping
        member = Member.from_record({**base, **own, "seed": int(seed)}, config)
        validate(member.config(config))
        members.append(member)
    run = functools.partial(
        engine.run, config, members=members, dataset=dataset, train_indices=train_indices,
        log=log, on_epoch=on_epoch, figures=False,
    )  # fmt: skip
    if workdir is not None:
        return run(workdir=workdir)
    with tempfile.TemporaryDirectory(prefix="dae_jax-population-") as scratch:
        return run(workdir=Path(scratch) / "run")

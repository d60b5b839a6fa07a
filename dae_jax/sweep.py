"""Ablation sweeps: any config key is an axis; many models in one compiled program.

    dae-jax sweep --workdir=W [--grid=NAME|FILE] [--axis=KEY=V1,V2,...]... [--seeds=0,1,2]
                  [--config=NAME|FILE] [--config.KEY=VALUE ...] [--quick]
                  [--nobm3d] [--noprobe] [--nomatrix] [--plot=x:KEY,hue:KEY]

A *member* is the base config with one value per axis, and a seed. Members that differ
only in the traced keys (``step.TRACED``: noise level, learning rate, weight decay) and
the seed train as one population, one ``vmap``-ed program, in ``W/models/<name>/``;
members that differ in anything else (width, model kind, loss, noise kind, batch size)
train as consecutive populations. ``W/sweep.json`` lists the populations, each a
resumable run, and every scoring stage is kept in ``W/stages/``: a killed sweep resumes
to the same ``results.csv``, and the same command with more values extends a finished
sweep, training only the new members.

Scoring: each model at its own corruption (and, ``--matrix``, at every level of its noise
kind in the sweep): PSNR, SSIM, MSE, beside the noisy input and classical references
tuned per level on the same images (``--bm3d``: BM3D for Gaussian noise on the first test
images, the models scored on those too as ``*_subset``); ``--probe``: a linear probe of
each encoder's codes (L-BFGS logistic regression). A reference computed once for a test
condition is reused by every later sweep on that workdir.

Outputs: ``results.csv`` (tidy: one row per member x test condition x metric, a column
per axis and the seed), ``results.json``, ``results.md`` (mean ± std over seeds) and
``figures/``. Hyperparameter search with a sampler (Optuna and the like) would plug in
as a grid: a list of products of one value each, written by the sampler.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import json
import math
import re
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dae_jax import baselines, checkpointing, configs, grids, metrics, report, runfiles
from dae_jax.errors import UserError

SCORING = {  # the scoring stages a sweep may turn off
    "bm3d": "BM3D references",
    "probe": "linear probes of the codes",
    "matrix": "every model at every level of its noise kind",
}
# Keys a sweep's resume may change (speed and logging), left out of its base config.
SPEED_KEYS = ("compile_cache", "train.log_every", "train.scan_unroll", "profile_steps")
FORMAT = 2  # sweep.json's layout
MAX_MODELS = 4096  # a sweep's members (each is trained, kept on disk and scored)


# ------------------------------------------------------------------ grids and members


def check_axis_key(key: str, base: ml_collections.ConfigDict) -> None:
    try:
        value = configs.get_key(base, key)
    except (KeyError, AttributeError):
        raise UserError(
            f"--axis={key}=...: unknown config key {key!r} (dae-jax train --help lists them)"
        ) from None
    if isinstance(value, ml_collections.ConfigDict):
        raise UserError(
            f"--axis={key}=...: {key} is a section; give one of its keys, e.g. "
            f"{key}.{next(iter(value))}"
        )
    if key == "seed":
        raise UserError("--axis=seed=... : the seeds are their own flag: give --seeds=0,1,2")
    if key.startswith("data.") or key in SPEED_KEYS:
        raise UserError(
            f"--axis={key}=...: {key} cannot be a sweep axis (every member shares the data, "
            "its test images and references); run one sweep per value and combine them "
            "with dae-jax table W1 W2"
        )


def coerce(key: str, value: Any, base: ml_collections.ConfigDict) -> Any:
    """``value`` as the type of ``key``'s default (text from ``--axis`` parsed first)."""
    default = configs.get_key(base, key)
    if isinstance(value, str) and not isinstance(default, str):
        text = value.strip()
        if isinstance(default, bool) and text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple | list):
        ok = isinstance(value, tuple | list)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = type(default).__name__
        raise UserError(f"--axis={key}: {value!r} is not a {kind} like its default {default!r}")
    return value


def split_values(text: str) -> list[str]:
    """``a,b,(1,2),c`` -> ``["a", "b", "(1,2)", "c"]``: commas inside brackets stay."""
    out, depth, current = [], 0, ""
    for char in text:
        depth += (char in "([") - (char in ")]")
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return [*out, current]


def parse_axis(text: str, base: ml_collections.ConfigDict) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (key, typed values)."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key or not values.strip():
        raise UserError(f"--axis={text} is not KEY=V1,V2,...; e.g. --axis=noise.level=0.1,0.5")
    check_axis_key(key, base)
    parsed = [coerce(key, v, base) for v in split_values(values)]
    if len(set(map(repr, parsed))) != len(parsed):
        raise UserError(f"--axis={text} repeats a value; give each value once")
    return key, parsed


def load_grid(spec: str) -> tuple[str, dict[str, Any]]:
    """A named grid (``grids.GRIDS``) or a JSON grid file: (its name, its content)."""
    if spec in grids.GRIDS:
        return spec, grids.GRIDS[spec]
    path = Path(spec)
    if not path.is_file():
        raise UserError(
            f"--grid={spec} is neither a grid name ({', '.join(grids.GRIDS)}) nor a JSON file"
        )
    try:
        grid = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--grid={spec} is not readable JSON ({e})") from None
    allowed = {"axes", "union", "config", "score", "plot", "doc"}
    if not isinstance(grid, dict) or set(grid) - allowed or ("axes" in grid) == ("union" in grid):
        raise UserError(
            f'--grid={spec}: a grid is a JSON object with either "axes" (key -> values) or '
            '"union" (a list of those), and optionally config, score, plot, doc'
        )
    return path.stem, grid


def products(grid: dict[str, Any], axes: dict[str, list[Any]], base) -> list[dict[str, list]]:
    """The grid's products, each with the ``--axis`` values in place of (or added to) its own."""
    found = grid.get("union", [grid.get("axes", {})])
    if not isinstance(found, list) or not all(isinstance(p, dict) for p in found):
        raise UserError('a grid\'s "union" must be a list of objects (key -> list of values)')
    out = []
    for product in found or [{}]:
        typed = {}
        for key, values in product.items():
            check_axis_key(key, base)
            if not isinstance(values, list | tuple) or not values:
                raise UserError(f"grid axis {key}: give a non-empty list of values")
            typed[key] = [coerce(key, v, base) for v in values]
        out.append({**typed, **axes})
    return out


@dataclasses.dataclass(frozen=True)
class Spec:
    """One requested model: its axis values (all of the sweep's axes) and seed."""

    values: tuple[tuple[str, Any], ...]
    seed: int

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return configs.with_values(base, {**dict(self.values), "seed": self.seed})

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={report.show(v)}" for k, v in self.values) or "DAE"


def expand(
    prods: list[dict[str, list]], seeds: Sequence[int], base
) -> tuple[list[str], list[Spec]]:
    """Every (product combination, seed), in order, once; and the axes (their union)."""
    axes = list(dict.fromkeys(key for product in prods for key in product))
    specs: dict[Spec, None] = {}
    for product in prods:
        keys = list(product)
        for combo in itertools.product(*(product[k] for k in keys)):
            chosen = dict(zip(keys, combo, strict=True))
            values = tuple((a, chosen.get(a, configs.get_key(base, a))) for a in axes)
            for seed in seeds:
                specs[Spec(values, int(seed))] = None
    return axes, list(specs)


# ------------------------------------------------------------------------ the plan


@dataclasses.dataclass(eq=False)
class Population:
    """Models trained as one program: the base config plus ``static`` overrides (the
    non-traced keys, only those that differ from the base), one member each."""

    name: str
    static: dict[str, Any]
    members: list[Any]  # step.Member

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return configs.with_values(base, self.static)


def _split(spec: Spec, base: ml_collections.ConfigDict) -> tuple[dict[str, Any], Any]:
    """A spec's population overrides (non-traced values that differ from the base) and
    its engine member (seed and every traced value)."""
    from dae_jax.step import TRACED, Member

    static = {k: v for k, v in spec.values if k not in TRACED and v != configs.get_key(base, k)}
    return dict(sorted(static.items())), Member.of(spec.config(base))


def _slug(static: dict[str, Any]) -> str:
    text = "_".join(f"{k}={report.show(v)}" for k, v in static.items()) or "base"
    return re.sub(r"[^A-Za-z0-9.=_,()+-]", "-", text)[:120]


def plan(
    populations: list[Population], specs: list[Spec], base: ml_collections.ConfigDict
) -> tuple[dict[Spec, tuple[Population, int]], list[Population]]:
    """Where each spec trains (population, member index): in a population already
    planned when one holds it, else in a new one per group of static overrides."""
    where: dict[Spec, tuple[Population, int]] = {}
    new: dict[str, Population] = {}
    taken = {p.name for p in populations}
    for spec in specs:
        static, member = _split(spec, base)
        found = next(
            (
                (p, p.members.index(member))
                for p in populations
                if p.static == static and member in p.members
            ),
            None,
        )
        if found is None:
            key = json.dumps(_plain(static), sort_keys=True)
            if key not in new:
                from dae_jax.step import TRACED

                shown = {k: v for k, v in spec.values if k not in TRACED}
                name, n = _slug(shown), 2
                while name in taken:
                    name, n = f"{_slug(shown)}-{n}", n + 1
                taken.add(name)
                new[key] = Population(name, static, [])
            pop = new[key]
            if member not in pop.members:
                pop.members.append(member)
            found = (pop, pop.members.index(member))
        where[spec] = found
    return where, list(new.values())


def _plain(value: Any) -> Any:
    return json.loads(runfiles.dumps(value))


def _base_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    record = checkpointing.plain(config)
    for key in SPEED_KEYS:
        *parents, leaf = key.split(".")
        node = record
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return _plain(record)


def _manifest(workdir: Path, base: ml_collections.ConfigDict) -> list[Population]:
    """The populations ``W/sweep.json`` lists; a sweep on another base config is refused."""
    from dae_jax.step import Member

    saved = runfiles.read_json(workdir / "sweep.json")
    if saved is None:
        return []
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(
            f"--workdir={workdir} holds a sweep written by an older dae_jax (or a damaged "
            "sweep.json); its results stay readable, but it cannot be resumed: use a new --workdir"
        )
    record = _base_record(base)
    if saved["config"] != record:
        changed = checkpointing.science_changes(saved["config"], base) or sorted(
            k for k in record if saved["config"].get(k) != record[k]
        )
        raise UserError(
            f"--workdir={workdir} holds a sweep on another base config ({'; '.join(changed)}); "
            "mixing them would compare unlike models: use a new --workdir, or the same "
            "--config values as before (an axis may gain values, not the base)"
        )
    return [
        Population(
            p["name"],
            {k: coerce(k, v, base) for k, v in p["static"].items()},
            [Member.from_record(m, base) for m in p["members"]],
        )
        for p in saved["populations"]
    ]


def _save_manifest(workdir: Path, base, populations: list[Population]) -> None:
    runfiles.write_json(
        workdir / "sweep.json",
        {
            "format": FORMAT,
            "config": _base_record(base),
            "populations": [
                {
                    "name": p.name,
                    "static": _plain(p.static),
                    "members": [m.record() for m in p.members],
                }
                for p in populations
            ],
        },
    )


# ----------------------------------------------------------------------------- run


class _Stages:
    """Finished scoring as JSON under ``W/stages/``, written atomically; a stage maps
    member indices (or "all") to rows, so a resumed or extended sweep computes only what
    is missing."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def get(
        self, name: str, wanted: Sequence[str], compute: Callable[[list[str]], dict[str, list]]
    ) -> dict[str, list[dict[str, Any]]]:
        path = self.directory / f"{name}.json"
        done = runfiles.read_json(path)
        done = done if isinstance(done, dict) else {}
        missing = [w for w in wanted if w not in done]
        if missing:
            done.update(compute(missing))
            runfiles.write_json(path, done)
        return {w: [_numbers_back(r) for r in done[w]] for w in wanted}

    def rows(self, name: str, compute: Callable[[], list[dict[str, Any]]]) -> list[dict]:
        """A stage of one list of rows."""
        return self.get(name, ["all"], lambda _: {"all": compute()})["all"]


def _numbers_back(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from strict JSON: "NaN"/"Infinity" strings are floats again."""
    out = {**row, "value": float(row["value"])}
    if isinstance(row.get("parameter"), str):
        out["parameter"] = float(row["parameter"])
    return out


@dataclasses.dataclass(frozen=True)
class Condition:
    """A test corruption: the noisy test images every model and reference is scored on."""

    kind: str
    level: float
    clip: bool

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Condition:
        kind = config.noise.kind
        return cls(kind, float(config.noise.level), bool(config.noise.clip) or kind != "gaussian")

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.level:g}" + ("" if self.clip else "-unclipped")

    def columns(self) -> dict[str, Any]:
        return {"test_kind": self.kind, "test_level": self.level, "test_clip": self.clip}


def run(
    experiment: str,
    config: ml_collections.ConfigDict,
    axes: dict[str, Sequence[Any]] | Sequence[dict[str, Any]],
    seeds: Sequence[int],
    workdir: str | Path,
    *,
    score: dict[str, bool] | None = None,
    plot: str = "",
    log: Callable[[str], None] = print,
    command: str = "",
) -> list[dict[str, Any]]:
    """Trains what the sweep needs and is not trained yet, scores every model, and writes
    the results; returns their rows. ``axes``: config key -> values (a product), or a list
    of those (their union); every combination is trained with each seed. ``score``
    turns stages off: ``{"bm3d": False, "probe": False, "matrix": False}``. Resumable and
    extensible on the same workdir."""
    from dae_jax.configs import validate

    score = dict.fromkeys(SCORING, True) | (score or {})
    union = [axes] if isinstance(axes, dict) else list(axes)
    names, specs = expand(products({"union": [dict(p) for p in union]}, {}, config), seeds, config)
    if not specs or len(specs) > MAX_MODELS:
        raise UserError(
            f"this sweep has {len(specs)} models; give at least one seed, and at most "
            f"{MAX_MODELS} models (fewer values per axis, or several sweeps and dae-jax table)"
        )
    for spec in specs:  # every member is valid, before anything runs
        validate(spec.config(config))
    workdir = Path(workdir)
    runfiles.prepare_workdir(workdir)
    with runfiles.WorkdirLock(workdir):
        populations = _manifest(workdir, config)
        where, new = plan(populations, specs, config)
        trained = sum(len(p.members) for p in populations)
        if new:
            log(
                f"{experiment}: {len(specs)} models; {sum(len(p.members) for p in new)} to train "
                f"in {len(new)} new population(s) (one compiled program each)"
                + (f", the other {len(specs) - sum(len(p.members) for p in new)} are in "
                   f"the {trained} trained before" if populations else "")
            )  # fmt: skip
            populations += new
            _save_manifest(workdir, config, populations)
        else:
            log(f"{experiment}: all {len(specs)} models are planned already; resuming")
        return _run(experiment, config, names, specs, where, workdir, score, plot, log, command)


def _run(experiment, config, axes, specs, where, workdir, score, plot, log, command):
    import jax
    import jax.numpy as jnp

    from dae_jax import data, engine, step

    started = time.perf_counter()
    stages = _Stages(workdir / "stages")
    dataset = data.load(config.data, seed=config.seed)
    config = engine.with_image_shape(config, dataset)
    log(f"{experiment}: {dataset.name} from {dataset.source}, {len(dataset.train_images)} train")
    clean = step.to_float(jnp.asarray(step.test_images(dataset, config)))
    own = {spec: Condition.of(spec.config(config)) for spec in specs}
    tested = {spec: [own[spec]] for spec in specs}
    if score["matrix"]:
        for spec in specs:
            tested[spec] = sorted(
                {c for c in own.values() if (c.kind, c.clip) == (own[spec].kind, own[spec].clip)},
                key=lambda c: c.level,
            )
    conditions = sorted(set(own.values()), key=lambda c: (c.kind, c.level, c.clip))
    eval_key = jax.random.key(config.seed + 10_000)  # each condition's noise, by its name
    noisy = {
        c: _corrupt(c, clean, jax.random.fold_in(eval_key, zlib.crc32(c.name.encode())))
        for c in conditions
    }
    rows = [r for c in conditions for r in _references(stages, c, noisy[c], clean, score, log)]
    if score["probe"]:
        rows += stages.rows("probe-pixels", lambda: _pixel_probe(dataset, log))
    subsets = {
        r["test_level"]: r["images"] for r in rows if r["model"] == "bm3d" and r["metric"] == "psnr"
    }
    examples: dict[str, Any] = {}
    for population in dict.fromkeys(p for p, _ in where.values()):
        members = {spec: k for spec, (p, k) in where.items() if p is population}
        labels = {k: {**dict(spec.values), "seed": spec.seed} for spec, k in members.items()}
        result = engine.run(
            population.config(config), workdir / "models" / population.name,
            population.members, dataset=dataset, log=log, figures=False, freeze_diverged=True,
            hparams=[labels.get(k, m.record()) for k, m in enumerate(population.members)],
        )  # fmt: skip
        for spec, k in members.items():
            rows += _train_rows(spec, result, k)
        scored = functools.cache(result.model)  # each member merged once
        for c in conditions:
            at = {str(k): spec for spec, k in members.items() if c in tested[spec]}
            if at:
                rows += _label(
                    stages.get(
                        f"scores-{population.name}-{c.name}", sorted(at, key=int),
                        functools.partial(_scores_of, scored, noisy[c], clean, c, subsets),
                    ),
                    at,
                )  # fmt: skip
        if score["probe"]:
            at = {str(k): spec for spec, k in members.items()}
            rows += _label(
                stages.get(
                    f"probe-{population.name}", sorted(at, key=int),
                    functools.partial(_probes_of, scored, dataset, clean),
                ),
                at,
            )  # fmt: skip
        for spec, k in members.items():
            if spec.seed == specs[0].seed and len(examples) < 8:
                examples[spec.label] = (noisy[own[spec]][:6], scored(k)(noisy[own[spec]][:6]))
        log(f"{population.name}: trained and scored {len(members)} models")
    results = _order(rows, specs, axes)
    at = {spec.values: own[spec].columns() for spec in specs}
    write(workdir, experiment, config, axes, specs, at, results, score, plot, command, started)
    if examples:
        from dae_jax import plots

        plots.reconstructions(workdir / "figures", examples, jax.device_get(clean[:6]))
    return results


def _corrupt(condition: Condition, clean: Any, key: Any) -> Any:
    import jax.numpy as jnp

    from dae_jax import corruption

    level = jnp.float32(condition.level)
    return corruption.corrupt(condition.kind, key, clean, level, clip=condition.clip)[0]


def _references(stages, condition, noisy, clean, score, log) -> list[dict[str, Any]]:
    """The noisy input and the classical denoisers tuned at this condition (BM3D too
    for Gaussian noise with ``score["bm3d"]``, when the bm3d package is installed)."""
    from dae_jax import baselines

    def compute(_: list[str]) -> dict[str, list]:
        at = condition.columns()
        rows = [
            {"model": "noisy input", **at, "metric": m, "value": v}
            for m, v in metrics.scores(noisy, clean).items()
        ]
        kind = condition.kind if score["bm3d"] else ""
        try:
            best = baselines.best_classical(
                noisy, clean, noise=kind, level=condition.level, clipped=condition.clip,
                bm3d_images=bm3d_images(len(noisy)),
            )  # fmt: skip
        except UserError as e:
            log(f"warning: no BM3D reference: {e}")
            best = baselines.best_classical(noisy, clean)
        for name, found in best.items():
            log(
                f"  {name} at {condition.name}: {found['psnr']:.2f} dB on {found['images']} "
                f"images (parameter {found['parameter']:g}), {found['seconds']:.1f} s"
            )
            extra = {"images": found["images"]} if name == "bm3d" else {}
            rows += [
                {
                    "model": name,
                    **at,
                    "metric": m,
                    "value": found[m],
                    "parameter": found["parameter"],
                    **extra,
                }
                for m in metrics.IMAGE
            ]
        return {"all": rows}

    suffix = (
        "-bm3d" if score["bm3d"] and condition.kind == "gaussian" and condition.level > 0 else ""
    )
    return stages.rows(f"references-{condition.name}{suffix}", lambda: compute([])["all"])


def bm3d_images(count: int) -> int:
    """BM3D's share of a test set: 500 of 10,000 images, a sixteenth of a small one."""
    from dae_jax import baselines

    return min(baselines.BM3D_IMAGES, count // 16)


def _pixel_probe(dataset: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from dae_jax import baselines

    pixels = baselines.linear_probe(
        dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
    )
    log(f"linear probe on raw pixels: test accuracy {pixels['test_accuracy']:.4f}")
    return [{"model": "raw pixels", "metric": "probe_accuracy", "value": pixels["test_accuracy"]}]


def _scores_at(model, noisy, clean, condition: Condition, subsets) -> list[dict[str, Any]]:
    """A model's scores at one condition; where BM3D was scored on the first N images
    only, ``*_subset`` scores on the same N."""
    denoised = model(noisy)
    at = condition.columns()
    rows = [{**at, "metric": m, "value": v} for m, v in metrics.scores(denoised, clean).items()]
    n = subsets.get(condition.level) if condition.kind == "gaussian" else None
    if n:
        rows += [
            {**at, "metric": f"{m}_subset", "value": v, "images": n}
            for m, v in metrics.scores(denoised[:n], clean[:n]).items()
        ]
    return rows


def _scores_of(model, noisy, clean, condition, subsets, members: list[str]) -> dict[str, list]:
    return {k: _scores_at(model(int(k)), noisy, clean, condition, subsets) for k in members}


def _probes_of(model, dataset, clean, members: list[str]) -> dict[str, list]:
    return {k: _probe(model(int(k)), dataset, clean) for k in members}


def _probe(model, dataset, clean_test) -> list[dict[str, Any]]:
    import jax.numpy as jnp

    from dae_jax import baselines, step

    clean_train = step.to_float(jnp.asarray(dataset.train_images))
    if clean_train.shape[1:] != clean_test.shape[1:]:  # patches: codes of the centres
        return []
    probe = baselines.linear_probe(
        model.encode(clean_train),
        dataset.train_labels,
        model.encode(clean_test),
        dataset.test_labels,
    )
    return [{"metric": "probe_accuracy", "value": probe["test_accuracy"]}]


def _identity(spec: Spec) -> dict[str, Any]:
    return {"model": spec.label, **dict(spec.values), "seed": spec.seed}


def _label(got: dict[str, list[dict[str, Any]]], at: dict[str, Spec]) -> list[dict]:
    """A stage's rows, each with its member's identity columns."""
    return [{**_identity(at[k]), **row} for k, rows in got.items() for row in rows]


def _train_rows(spec: Spec, result: Any, k: int) -> list[dict[str, Any]]:
    final = result.final(k).get("train_loss", math.nan)
    rows = [{**_identity(spec), "metric": "final_train_loss", "value": final}]
    if k in result.diverged:
        epoch = float(result.diverged[k]["epoch"])
        rows.append({**_identity(spec), "metric": "diverged_in_epoch", "value": epoch})
    return rows


def _order(rows: list[dict[str, Any]], specs: list[Spec], axes: list[str]) -> list[dict[str, Any]]:
    """References first, then each spec's rows in spec order: the same order however the
    sweep was interrupted, resumed or extended."""
    position = {spec.label + f"|{spec.seed}": i for i, spec in enumerate(specs)}
    refs = [r for r in rows if "seed" not in r]
    members = [r for r in rows if "seed" in r]
    members.sort(key=lambda r: position[r["model"] + f"|{r['seed']}"])  # stable: metric order kept
    return refs + members


# ------------------------------------------------------------------------ outputs

FIELDS = (
    "model",
    "seed",
    "test_kind",
    "test_level",
    "test_clip",
    "metric",
    "value",
    "parameter",
    "images",
)


def summary(
    rows: list[dict[str, Any]], specs: list[Spec], own: dict[tuple, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One line per combination of axis values: mean and std over its seeds of the
    reconstruction's PSNR and SSIM at its own corruption, the gain over the best
    classical reference there, the probe accuracy; models that diverged are left out."""
    combos: dict[tuple, list[Spec]] = {}
    for spec in specs:
        combos.setdefault(spec.values, []).append(spec)
    lines = []
    for values, seeds in combos.items():
        label, at = seeds[0].label, own[values]
        diverged = {
            r["seed"] for r in rows if r["model"] == label and r["metric"] == "diverged_in_epoch"
        }
        of_models = functools.partial(_pick, rows, diverged, model=label)
        reference = functools.partial(_first, rows, at)
        psnr = of_models(metric="psnr", **at)
        classical = max((reference(name) for name in baselines.CLASSICAL), default=math.nan)
        lines.append(
            {
                "values": dict(values),
                "label": label,
                "psnr": report.mean_std(psnr),
                "ssim": report.mean_std(of_models(metric="ssim", **at)),
                "noisy_psnr": reference("noisy input"),
                "best_classical_psnr": classical,
                "gain_db": (statistics.fmean(psnr) if psnr else math.nan) - classical,
                "probe": report.mean_std(of_models(metric="probe_accuracy")),
                "diverged": len(diverged),
                "seeds": len(seeds),
                "bm3d_psnr": reference("bm3d"),
                "psnr_subset": report.mean_std(of_models(metric="psnr_subset", **at)),
                "subset_images": next(
                    (r.get("images", 0) for r in rows if r["model"] == "bm3d"
                     and all(r.get(k) == v for k, v in at.items())), 0,
                ),
            }
        )  # fmt: skip
    return lines


def _pick(rows: list[dict[str, Any]], leave_out: set, **want: Any) -> list[float]:
    """The values of the rows that match ``want``, less those of the seeds left out."""
    return [
        r["value"]
        for r in rows
        if r.get("seed") not in leave_out and all(r.get(k) == v for k, v in want.items())
    ]


def _first(rows: list[dict[str, Any]], at: dict[str, Any], model: str) -> float:
    """A reference's PSNR at a test condition (NaN when it has none there)."""
    return (_pick(rows, set(), model=model, metric="psnr", **at) or [math.nan])[0]


def _number(value: float, digits: int) -> str:
    if math.isfinite(value):
        return f"{value:.{digits}f}"
    return "∞" if value > 0 else "—"


def _cell(value: Any, digits: int, best: float | None = None) -> str:
    mean, std = value if isinstance(value, tuple) else (value, None)
    text = _number(mean, digits) + (
        f" ± {std:.{digits}f}" if std is not None and math.isfinite(std) else ""
    )
    return f"**{text}**" if best is not None and mean == best else text


def markdown(lines: list[dict[str, Any]], axes: list[str], rows: list[dict], score: dict) -> str:
    """The tables: one line per combination (its axis values as columns), a pivot of the
    DAE's PSNR over the first axis when there are two or more, and BM3D beside the DAE."""

    def best(key: str) -> float | None:
        means = [ln[key][0] if isinstance(ln[key], tuple) else ln[key] for ln in lines]
        finite = [m for m in means if math.isfinite(m)]
        return max(finite) if finite else None

    probe = score.get("probe", True)
    head = [*axes, "noisy PSNR", "best classical PSNR", "DAE PSNR", "gain (dB)", "DAE SSIM"]
    head += ["linear probe acc."] if probe else []
    out = [
        "| " + " | ".join(head or ["model"]) + " |",
        "|" + " --- |" * len(axes) + " ---: |" * (len(head) - len(axes)),
    ]
    for line in lines:
        cells = [report.show(line["values"][a]) for a in axes]
        if line["diverged"]:
            cells[-1 if cells else 0 :] = [
                (cells[-1] if cells else "")
                + f" ({line['diverged']} of {line['seeds']} diverged, left out)"
            ]
        cells += [
            _number(line["noisy_psnr"], 2), _number(line["best_classical_psnr"], 2),
            _cell(line["psnr"], 2, best("psnr")), _cell(line["gain_db"], 2, best("gain_db")),
            _cell(line["ssim"], 3, best("ssim")),
        ] + ([_cell(line["probe"], 4, best("probe"))] if probe else [])  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    if len(axes) >= 2:
        out += ["", f"DAE PSNR (dB), mean ± std over seeds, by {axes[0]}:", ""] + _pivot(
            lines, axes
        )
    out += _bm3d_table(lines, axes)
    pixels = [r["value"] for r in rows if r["model"] == "raw pixels"]
    if pixels:
        out += ["", f"Linear probe on raw pixels: {pixels[0]:.4f}."]
    out += [
        "",
        "At level 0 the input is the clean image: its PSNR is infinite (∞) and there is no "
        'gain to report (results.json writes it as the string "Infinity").',
    ]
    return "\n".join(out) + "\n"


def _pivot(lines: list[dict[str, Any]], axes: list[str]) -> list[str]:
    columns = list(dict.fromkeys(report.show(ln["values"][axes[0]]) for ln in lines))
    rest = axes[1:]
    table: dict[str, dict[str, str]] = {}
    for line in lines:
        name = ", ".join(f"{a}={report.show(line['values'][a])}" for a in rest)
        table.setdefault(name, {})[report.show(line["values"][axes[0]])] = _cell(line["psnr"], 2)
    out = [f"| {', '.join(rest)} | " + " | ".join(f"{axes[0]}={c}" for c in columns) + " |"]
    out.append("| --- |" + " ---: |" * len(columns))
    for name, cells in table.items():
        out.append(f"| {name} | " + " | ".join(cells.get(c, "—") for c in columns) + " |")
    return out


def _bm3d_table(lines: list[dict[str, Any]], axes: list[str]) -> list[str]:
    """BM3D beside the DAE on the same images (BM3D's subset of the test set)."""
    compared = [ln for ln in lines if ln["subset_images"] and math.isfinite(ln["bm3d_psnr"])]
    if not compared:
        return []
    counts = sorted({ln["subset_images"] for ln in compared})
    out = [
        "",
        f"BM3D (tuned per level like the others) against the DAE on the first "
        f"{', '.join(map(str, counts))} test images, the same noisy images for both:",
        "",
        "| model | BM3D PSNR | DAE PSNR | DAE - BM3D (dB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for line in compared:
        mean, _ = line["psnr_subset"]
        out.append(
            f"| {line['label']} | {_number(line['bm3d_psnr'], 2)} | "
            f"{_cell(line['psnr_subset'], 2)} | "
            f"{_number(mean - line['bm3d_psnr'], 2)} |"
        )
    return out


def write(workdir, experiment, config, axes, specs, own, rows, score, plot, command, started):
    """results.csv (tidy), results.json, results.md (``report.write``) and the figures."""
    lines = summary(rows, specs, own)
    report.write(
        workdir, experiment, config, list(dict.fromkeys(s.seed for s in specs)), rows,
        markdown(lines, axes, rows, score), started, command, fields=["model", *axes, *FIELDS[1:]],
        note=f"{config.train.epochs} epochs, axes {', '.join(axes) or 'none'}. Classical "
        "references are tuned per level on the test images themselves (an optimistic "
        "baseline). Bold: best in the column.",
        axes=axes, score=score, plot=plot, summary=lines,
        members=[{"values": dict(s.values), "seed": s.seed, "test": own[s.values]} for s in specs],
    )  # fmt: skip
    figures(workdir / "figures", rows, lines, axes, score, plot)


def plot_axes(
    plot: str, axes: list[str], lines: list[dict[str, Any]] | None = None
) -> tuple[str, list[str]]:
    """The figures' x axis and hue axes: ``x:KEY,hue:KEY`` or, by default, noise.level
    (else the first numeric axis) on x and the other axes as hues."""
    chosen = dict(part.split(":", 1) for part in plot.split(",") if ":" in part) if plot else {}
    bad = [
        p for p in plot.split(",") if p and (":" not in p or p.split(":")[0] not in ("x", "hue"))
    ]
    unknown = [v for v in chosen.values() if v not in axes]
    if bad or unknown:
        raise UserError(
            f"--plot={plot}: give x:KEY[,hue:KEY] with keys among the axes "
            f"({', '.join(axes) or 'none'})"
        )
    x = chosen.get("x")
    if x is None:
        numeric = [
            a
            for a in axes
            if lines
            and all(
                isinstance(ln["values"][a], int | float) and not isinstance(ln["values"][a], bool)
                for ln in lines
            )
        ]
        x = (
            "noise.level"
            if "noise.level" in axes
            else (numeric[0] if numeric else (axes[0] if axes else ""))
        )
    hue = [chosen["hue"]] if "hue" in chosen else [a for a in axes if a != x]
    return x, hue


def figures(directory: Path, rows, lines, axes, score, plot) -> None:
    from dae_jax import plots

    directory.mkdir(parents=True, exist_ok=True)
    x, hue = plot_axes(plot, axes, lines)
    if not x:
        return
    plots.sweep_quality(directory / "quality.png", rows, lines, x, hue)
    if score.get("probe", True):
        plots.sweep_probe(directory / "probe.png", rows, lines, x, hue)
    if score.get("matrix", True) and "noise.level" in axes:
        plots.sweep_matrix(directory / "train_vs_test_level.png", rows, lines, hue)


def render(workdir: str | Path) -> None:
    """Rewrites ``results.md`` and the figures from ``results.json``, without retraining."""
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    if "axes" not in results:
        raise UserError(f"{workdir}/results.json was written by an older dae_jax sweep; rerun it")
    rows = [_numbers_back(r) for r in results["rows"]]
    specs, own = [], {}
    for m in results["members"]:
        specs.append(
            Spec(
                tuple(
                    (a, (tuple(v) if isinstance(v := m["values"][a], list) else v))
                    for a in results["axes"]
                ),
                m["seed"],
            )
        )
        own[specs[-1].values] = m["test"]
    header = (workdir / "results.md").read_text().split("\n\n|")[0]
    lines = summary(rows, specs, own)
    body = markdown(lines, results["axes"], rows, results["score"])
    (workdir / "results.md").write_text(header + "\n\n" + body)
    figures(workdir / "figures", rows, lines, results["axes"], results["score"], results["plot"])


# ------------------------------------------------------------------- command line


def main(argv: Sequence[str], *, program: bool = False) -> int:
    """``dae-jax sweep`` with ``argv`` (``argv[0]`` the program) under the crash guard;
    returns the exit code. Parses into its own ``FlagValues``: callable in-process."""
    from dae_jax import guard

    return guard.run("dae-jax sweep", lambda g: command(list(argv), g), program=program)


def script(grid: str) -> None:
    """``python experiments/<grid>.py ...``: ``dae-jax sweep --grid=<grid> ...``."""
    import sys

    from dae_jax import guard

    guard.install_excepthook()
    argv = [f"experiments/{grid}.py", f"--grid={grid}", *sys.argv[1:]]
    if any(a.lstrip("-").startswith("grid") for a in sys.argv[1:]):
        print(f"error: --grid does not apply here: this script is the {grid} grid; "
              "run dae-jax sweep --grid=... for another", file=sys.stderr)  # fmt: skip
        guard.exit_quietly(2)
    guard.exit_quietly(main(argv, program=True))


def _define(values: Any) -> None:
    from absl import flags

    kw = {"flag_values": values}
    flags.DEFINE_string(
        "grid", "", f"A named grid ({', '.join(grids.GRIDS)}) or a JSON file.", **kw
    )
    flags.DEFINE_multi_string("axis", [], "KEY=V1,V2,...: an axis (repeatable).", **kw)
    flags.DEFINE_list("levels", [], "Shorthand for --axis=noise.level=...", **kw)
    flags.DEFINE_list("learning_rates", [], "Shorthand for --axis=optim.learning_rate=...", **kw)
    for name in SCORING:
        flags.DEFINE_bool(
            name, None, f"Score {SCORING[name]} (default: the grid's, else on).", **kw
        )
    flags.DEFINE_string("plot", "", "The figures' axes: x:KEY[,hue:KEY].", **kw)


def command(argv: list[str], g: Any) -> int:
    grid_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--grid=")), "")
    doc = "\n\n".join(__doc__.split("\n\n")[:2])
    doc += "\n\ngrids (--grid=NAME):\n" + "\n".join(
        f"  {n}: {grid.get('doc', '')}" for n, grid in grids.GRIDS.items()
    )
    if grid_name in grids.GRIDS:
        doc = f"{grid_name}: {grids.GRIDS[grid_name].get('doc', '')}\n\n{doc}"
    parsed = report.parse(argv, g, doc=doc, quick=_quick, define=_define, repeatable=("axis",))
    if parsed is None:
        return 0
    values, config, argv = parsed.flags, parsed.config, parsed.argv
    name, grid = load_grid(values.grid) if values.grid else ("sweep", {})
    given = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    axes: dict[str, list[Any]] = {}
    for text in values.axis:
        key, axis_values = parse_axis(text, config)
        if key in axes:
            raise UserError(f"--axis={key}=... is given twice; give all its values in one --axis")
        axes[key] = axis_values
    for flag, key in (("levels", "noise.level"), ("learning_rates", "optim.learning_rate")):
        if values[flag].value:
            if key in axes:
                raise UserError(f"--{flag} and --axis={key}=... say the same thing; give one")
            axes[key] = [coerce(key, v, config) for v in values[flag].value]
    for key, value in grid.get("config", {}).items():
        if key in given and key not in axes:
            raise UserError(
                f"--config.{key} does not apply here: the {name} grid sets it ({value!r}); "
                f"vary it with --axis={key}=..."
            )
        configs.set_key(config, key, coerce(key, value, config))
    prods = products(grid, axes, config)
    for key in given:
        if key == "seed" or any(key in p for p in prods):
            raise UserError(
                f"--config.{key} does not apply here: "
                + (
                    "the seeds are --seeds=0,1,2"
                    if key == "seed"
                    else f"{key} is an axis of this sweep; give its values with --axis={key}=V1,V2"
                )  # fmt: skip
            )
    if values.quick:
        for product in prods:
            for key, vals in product.items():
                numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals)
                if key not in axes and numeric and len(vals) > 2:
                    product[key] = vals[:2]
                    print(
                        f"--quick kept {key}={','.join(map(report.show, vals[:2]))} of the grid's"
                    )
    plot = values.plot or grid.get("plot", "")
    plot_axes(plot, expand(prods, parsed.seeds, config)[0])
    score = {
        stage: values[stage].value
        if values[stage].value is not None
        else grid.get("score", {}).get(stage, True)
        for stage in SCORING
    }
    report.start(g, parsed)
    g.stage = "running the sweep"
    command_line = parsed.command  # as typed: a script's own --grid is not shown
    if argv[0].endswith(".py"):
        command_line = command_line.replace(f" --grid={grid_name}", "", 1)
    run(
        name, parsed.config, prods, parsed.seeds, parsed.workdir, score=score, plot=plot,
        command=command_line,
    )  # fmt: skip
    print(f"Results: {parsed.workdir / 'results.md'}")
    return 0


def _quick(config: ml_collections.ConfigDict) -> None:
    config.data.train_size, config.data.test_size = 1024, 256
    config.train.epochs, config.eval.batch_size = 1, 256

"""Ablation sweeps: any config key is an axis; many models in one compiled program.

    dae-jax sweep --workdir=W [--grid=NAME|FILE] [--axis=KEY=V1,V2,...]... [--seeds=0,1,2]
                  [--config=NAME|FILE] [--config.KEY=VALUE ...] [--quick]
                  [--nobm3d] [--noprobe] [--nomatrix] [--plot=x:KEY,hue:KEY]

A member is the base config with one value per axis, and a seed. Members that differ only
in traced keys (``step.TRACED``: noise kind and level, learning rate, weight decay) train
as one vmapped population in ``W/models/<name>/``; the others as consecutive populations,
listed in ``W/sweep.json``. Scores are kept in ``W/stages/``: a killed sweep resumes to
the same ``results.csv``, and the same command with more values trains only the new ones.

Writes ``results.csv`` (a row per member x test condition x metric, a column per axis),
``results.json``, ``results.md`` (mean ± std over seeds) and ``figures/``, beside the noisy
input and classical references (BM3D, ``--bm3d``) tuned on the same images, and a linear
probe of the codes (``--probe``): docs/experiments.md, "How a sweep runs".
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import re
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dae_jax import baselines, checkpointing, configs, grids, metrics, report, runfiles
from dae_jax.configs import is_number
from dae_jax.errors import UserError

SCORING = {  # the scoring stages a sweep may turn off
    "bm3d": "BM3D references",
    "probe": "linear probes of the codes",
    "matrix": "every model at every level of its noise kind",
}
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
    if key.startswith("data.") or key in configs.SPEED_KEYS:
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
            text = text.capitalize()
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(text)
    if configs.type_problem(value, default):
        kind = type(default).__name__
        raise UserError(f"--axis={key}: {value!r} is not a {kind} like its default {default!r}")
    if isinstance(default, tuple | list):
        return tuple(value)
    return float(value) if isinstance(default, float) else value


def parse_axis(text: str, base: ml_collections.ConfigDict) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (key, typed values)."""
    key, sep, values = text.partition("=")
    key = key.strip().removeprefix("config.")
    if not sep or not key or not values.strip():
        raise UserError(f"--axis={text} is not KEY=V1,V2,...; e.g. --axis=noise.level=0.1,0.5")
    check_axis_key(key, base)
    # commas inside brackets stay: a,(1,2),b is three values
    parsed = [coerce(key, v, base) for v in re.split(r",(?![^()\[\]]*[)\]])", values)]
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
        for combo in itertools.product(*product.values()):
            chosen = dict(zip(product, combo, strict=True))
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


def plan(
    populations: list[Population], specs: list[Spec], base: ml_collections.ConfigDict
) -> tuple[dict[Spec, tuple[Population, int]], list[Population]]:
    """Where each spec trains (population, member index): in a population already
    planned when one holds it, else in a new one per group of static overrides (the
    non-traced values that differ from the base)."""
    from dae_jax.step import TRACED, Member

    where: dict[Spec, tuple[Population, int]] = {}
    new: list[Population] = []
    taken = {p.name for p in populations}
    default = configs.flat(base)
    for spec in specs:
        static = {k: v for k, v in sorted(spec.values) if k not in TRACED and v != default[k]}
        member = Member.of(spec.config(base))
        pop = next((p for p in populations if p.static == static and member in p.members), None)
        pop = pop or next((p for p in new if p.static == static), None)
        if pop is None:
            shown = "_".join(f"{k}={report.show(v)}" for k, v in spec.values if k not in TRACED)
            slug = re.sub(r"[^A-Za-z0-9.=_,()+-]", "-", shown or "base")[:120]
            name, n = slug, 2
            while name in taken:
                name, n = f"{slug}-{n}", n + 1
            taken.add(name)
            pop = Population(name, static, [])
            new.append(pop)
        if member not in pop.members:
            pop.members.append(member)
        where[spec] = (pop, pop.members.index(member))
    return where, new


def _plain(value: Any) -> Any:
    return json.loads(runfiles.dumps(value))


def _base_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    record = _plain(config.to_dict())
    for key in configs.SPEED_KEYS:  # a resume may change them: not in the base record
        *parents, leaf = key.split(".")
        functools.reduce(dict.__getitem__, parents, record).pop(leaf, None)
    return record


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
    saved = [
        {"name": p.name, "static": _plain(p.static), "members": [m.record() for m in p.members]}
        for p in populations
    ]
    record = {"format": FORMAT, "config": _base_record(base), "populations": saved}
    runfiles.write_json(workdir / "sweep.json", record)


# ----------------------------------------------------------------------------- run


def _stage(directory: Path, name: str, wanted: Sequence[str], compute: Callable) -> dict:
    """Finished scoring, kept in ``W/stages/<name>.json`` (written atomically): member
    indices (or "all") -> rows. Only the missing ones are computed (``compute(missing)``),
    so a resumed or extended sweep scores only what it has not scored before."""
    path = directory / f"{name}.json"
    done = runfiles.read_json(path)
    done = done if isinstance(done, dict) else {}
    missing = [w for w in wanted if w not in done]
    if missing:
        done.update(compute(missing))
        runfiles.write_json(path, done)
    return {w: [_numbers_back(r) for r in done[w]] for w in wanted}


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
    from dae_jax import data, engine
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
        dataset = data.load(config.data, seed=config.seed)
        for population in new:  # it fits in memory, before sweep.json promises it
            shaped = engine.with_image_shape(population.config(config), dataset)
            engine.check_memory(shaped, len(population.members), dataset)
        if new:
            count, before = (sum(len(p.members) for p in pops) for pops in (new, populations))
            others = f", the other {len(specs) - count} are in the {before} trained before"
            log(
                f"{experiment}: {len(specs)} models; {count} to train in {len(new)} new "
                f"population(s) (one compiled program each){others if populations else ''}"
            )
            populations += new
            _save_manifest(workdir, config, populations)
        else:
            log(f"{experiment}: all {len(specs)} models are planned already; resuming")
        args = (experiment, config, names, specs, where, workdir, score, plot, log, command)
        return _run(*args, dataset)


def _run(experiment, config, axes, specs, where, workdir, score, plot, log, command, dataset):
    import jax
    import jax.numpy as jnp

    from dae_jax import corruption, engine, step

    started = time.perf_counter()
    stages = workdir / "stages"
    stages.mkdir(exist_ok=True)
    config = engine.with_image_shape(config, dataset)
    log(f"{experiment}: {dataset.name} from {dataset.source}, {len(dataset.train_images)} train")
    clean = step.to_float(jnp.asarray(step.test_images(dataset, config)))
    own = {spec: Condition.of(spec.config(config)) for spec in specs}
    conditions = sorted(set(own.values()), key=lambda c: (c.kind, c.level, c.clip))
    eval_key = jax.random.key(config.seed + 10_000)
    noisy: dict[Condition, Any] = {}
    for c in conditions:  # each condition's noise, by its name
        key = jax.random.fold_in(eval_key, zlib.crc32(c.name.encode()))
        noisy[c] = corruption.corrupt(c.kind, key, clean, jnp.float32(c.level), clip=c.clip)[0]

    def tested(spec: Spec, c: Condition) -> bool:  # its own; --matrix: each level of its kind
        mine = own[spec]
        return (c.kind, c.clip) == (mine.kind, mine.clip) and (score["matrix"] or c == mine)

    rows = [r for c in conditions for r in _references(stages, c, noisy[c], clean, score, log)]
    if score["probe"]:
        pixels = functools.partial(_pixel_probe, dataset, log)
        rows += _stage(stages, "probe-pixels", ["all"], pixels)["all"]
    subsets = {
        r["test_level"]: r["images"] for r in rows if r["model"] == "bm3d" and r["metric"] == "psnr"
    }
    examples: dict[str, Any] = {}
    for population in dict.fromkeys(p for p, _ in where.values()):
        members = {k: spec for spec, (p, k) in where.items() if p is population}
        labels = {k: {**dict(spec.values), "seed": spec.seed} for k, spec in members.items()}
        result = engine.run(
            population.config(config), workdir / "models" / population.name,
            population.members, dataset=dataset, log=log, figures=False, freeze_diverged=True,
            hparams=[labels.get(k, m.record()) for k, m in enumerate(population.members)],
        )  # fmt: skip
        for k, spec in members.items():
            rows += _train_rows(spec, result, k)
        model = functools.cache(result.model)  # each member merged once
        for c in conditions:
            rows += _members(
                stages, f"scores-{population.name}-{c.name}", model,
                {k: spec for k, spec in members.items() if tested(spec, c)},
                functools.partial(_scores_at, noisy[c], clean, c, subsets),
            )  # fmt: skip
        if score["probe"]:
            probe = functools.partial(_probe, dataset, clean)
            rows += _members(stages, f"probe-{population.name}", model, members, probe)
        for k, spec in members.items():
            if spec.seed == specs[0].seed and len(examples) < 8:
                examples[spec.label] = (noisy[own[spec]][:6], model(k)(noisy[own[spec]][:6]))
        log(f"{population.name}: trained and scored {len(members)} models")
    results = _order(rows, specs)
    at = {spec.values: own[spec].columns() for spec in specs}
    write(workdir, experiment, config, axes, specs, at, results, score, plot, command, started)
    if examples:
        from dae_jax import plots

        plots.reconstructions(workdir / "figures", examples, jax.device_get(clean[:6]))
    return results


def _members(
    stages: Path, name: str, model: Callable, at: dict[int, Spec], score: Callable
) -> list[dict[str, Any]]:
    """A stage of members' rows (``score(model(k))`` for member k), with their identity."""
    wanted = [str(k) for k in sorted(at)]
    got = _stage(stages, name, wanted, lambda todo: {k: score(model(int(k))) for k in todo})
    return [{**_identity(at[int(k)]), **row} for k, rows in got.items() for row in rows]


def _references(stages, condition, noisy, clean, score, log) -> list[dict[str, Any]]:
    """The noisy input and the classical denoisers tuned at this condition (BM3D too
    for Gaussian noise with ``score["bm3d"]``, when the bm3d package is installed)."""
    at = condition.columns()

    def compute(_: list[str]) -> dict[str, list]:
        rows = [
            {"model": "noisy input", **at, "metric": m, "value": v}
            for m, v in metrics.scores(noisy, clean).items()
        ]
        try:
            best = baselines.best_classical(
                noisy, clean, noise=condition.kind if score["bm3d"] else "",
                level=condition.level, clipped=condition.clip,
                bm3d_images=min(baselines.BM3D_IMAGES, len(noisy) // 16),  # 500 of 10,000
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
            for m in metrics.IMAGE:
                row = {"model": name, **at, "metric": m, "value": found[m]}
                rows.append({**row, "parameter": found["parameter"], **extra})
        return {"all": rows}

    bm3d = score["bm3d"] and condition.kind == "gaussian" and condition.level > 0
    name = f"references-{condition.name}" + ("-bm3d" if bm3d else "")
    return _stage(stages, name, ["all"], compute)["all"]


def _pixel_probe(dataset: Any, log: Callable[[str], None], _: list[str]) -> dict[str, list]:
    pixels = baselines.linear_probe(
        dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
    )
    accuracy = pixels["test_accuracy"]
    log(f"linear probe on raw pixels: test accuracy {accuracy:.4f}")
    return {"all": [{"model": "raw pixels", "metric": "probe_accuracy", "value": accuracy}]}


def _scores_at(noisy, clean, condition: Condition, subsets, model) -> list[dict[str, Any]]:
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


def _probe(dataset, clean_test, model) -> list[dict[str, Any]]:
    import jax.numpy as jnp

    from dae_jax import step

    clean_train = step.to_float(jnp.asarray(dataset.train_images))
    if clean_train.shape[1:] != clean_test.shape[1:]:  # patches: codes of the centres
        return []
    probe = baselines.linear_probe(
        model.encode(clean_train), dataset.train_labels, model.encode(clean_test),
        dataset.test_labels,
    )  # fmt: skip
    return [{"metric": "probe_accuracy", "value": probe["test_accuracy"]}]


def _identity(spec: Spec) -> dict[str, Any]:
    return {"model": spec.label, **dict(spec.values), "seed": spec.seed}


def _train_rows(spec: Spec, result: Any, k: int) -> list[dict[str, Any]]:
    final = result.final(k).get("train_loss", math.nan)
    rows = [{**_identity(spec), "metric": "final_train_loss", "value": final}]
    if k in result.diverged:
        epoch = float(result.diverged[k]["epoch"])
        rows.append({**_identity(spec), "metric": "diverged_in_epoch", "value": epoch})
    return rows


def _order(rows: list[dict[str, Any]], specs: list[Spec]) -> list[dict[str, Any]]:
    """References first, then each spec's rows in spec order (each its own rows' order):
    the same order however the sweep was interrupted, resumed or extended."""
    position = {(spec.label, spec.seed): i for i, spec in enumerate(specs)}
    members = sorted(
        (r for r in rows if "seed" in r), key=lambda r: position[r["model"], r["seed"]]
    )
    return [r for r in rows if "seed" not in r] + members


# ------------------------------------------------------------------------ outputs

FIELDS = "model seed test_kind test_level test_clip metric value parameter images".split()


def summary(
    rows: list[dict[str, Any]], specs: list[Spec], own: dict[tuple, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One line per combination of axis values: mean and std over its seeds of the
    reconstruction's PSNR and SSIM at its own corruption, the gain over the best
    classical reference there, the probe accuracy; models that diverged are left out."""
    seeds = collections.Counter(spec.values for spec in specs)
    return [_line(rows, values, count, own[values]) for values, count in seeds.items()]


def _line(rows: list[dict], values: tuple, seeds: int, at: dict[str, Any]) -> dict[str, Any]:
    label = Spec(values, 0).label
    diverged = {
        r["seed"] for r in rows if r["model"] == label and r["metric"] == "diverged_in_epoch"
    }

    def found(model: str, metric: str, **where: Any) -> list[dict[str, Any]]:
        want = {"model": model, "metric": metric, **where}  # a subset of the row's items
        return [r for r in rows if r.get("seed") not in diverged and want.items() <= r.items()]

    def score(metric: str, **where: Any) -> tuple[float, float]:  # mean and std over seeds
        return report.mean_std([r["value"] for r in found(label, metric, **where)])

    def reference(name: str) -> float:  # its PSNR at this test condition (NaN if none)
        return next((r["value"] for r in found(name, "psnr", **at)), math.nan)

    psnr = score("psnr", **at)
    classical = max((reference(name) for name in baselines.CLASSICAL), default=math.nan)
    return {
        "values": dict(values),
        "label": label,
        "psnr": psnr,
        "ssim": score("ssim", **at),
        "noisy_psnr": reference("noisy input"),
        "best_classical_psnr": classical,
        "gain_db": psnr[0] - classical,
        "probe": score("probe_accuracy"),
        "diverged": len(diverged),
        "seeds": seeds,
        "bm3d_psnr": reference("bm3d"),
        "psnr_subset": score("psnr_subset", **at),
        "subset_images": next((r.get("images", 0) for r in found("bm3d", "psnr", **at)), 0),
    }


# The columns of results.md after the axes: summary key -> (heading, digits, bold where best).
COLUMNS = {"noisy_psnr": ("noisy PSNR", 2, False),
           "best_classical_psnr": ("best classical PSNR", 2, False),
           "psnr": ("DAE PSNR", 2, True), "gain_db": ("gain (dB)", 2, True),
           "ssim": ("DAE SSIM", 3, True), "probe": ("linear probe acc.", 4, True)}  # fmt: skip


def markdown(lines: list[dict[str, Any]], axes: list[str], rows: list[dict], score: dict) -> str:
    """The tables: one line per combination (its axis values as columns), a pivot of the
    DAE's PSNR over the first axis when there are two or more, and BM3D beside the DAE."""
    columns = [key for key in COLUMNS if key != "probe" or score.get("probe", True)]
    means = {key: [ln[key][0] if isinstance(ln[key], tuple) else ln[key] for ln in lines]
             for key in columns if COLUMNS[key][2]}  # fmt: skip
    best = {key: max(filter(math.isfinite, m), default=None) for key, m in means.items()}
    table = []
    for line in lines:
        cells = [report.show(line["values"][a]) for a in axes]
        if line["diverged"]:  # said in the last axis' cell (in a cell of its own with no axes)
            note = f" ({line['diverged']} of {line['seeds']} diverged, left out)"
            cells[-1:] = ["".join(cells[-1:]) + note]
        table.append(cells + [report.cell(line[k], COLUMNS[k][1], best.get(k)) for k in columns])
    out = report.markdown_table([*axes, *(COLUMNS[k][0] for k in columns)], table, len(axes))
    if len(axes) >= 2:
        out += ["", f"DAE PSNR (dB), mean ± std over seeds, by {axes[0]}:", ""]
        out += _pivot(lines, axes)
    out += _bm3d_table(lines)
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
    first, rest = axes[0], axes[1:]
    table: dict[str, dict[str, str]] = {}
    for line in lines:
        name = ", ".join(f"{a}={report.show(line['values'][a])}" for a in rest)
        column = report.show(line["values"][first])
        table.setdefault(name, {})[column] = report.cell(line["psnr"], 2)
    columns = list(dict.fromkeys(report.show(ln["values"][first]) for ln in lines))
    rows = [[name, *(cells.get(c, "—") for c in columns)] for name, cells in table.items()]
    return report.markdown_table([", ".join(rest), *(f"{first}={c}" for c in columns)], rows)


def _bm3d_table(lines: list[dict[str, Any]]) -> list[str]:
    """BM3D beside the DAE on the same images (BM3D's subset of the test set)."""
    compared = [ln for ln in lines if ln["subset_images"] and math.isfinite(ln["bm3d_psnr"])]
    if not compared:
        return []
    counts = ", ".join(map(str, sorted({ln["subset_images"] for ln in compared})))
    rows = []
    for ln in compared:
        bm3d, dae = ln["bm3d_psnr"], ln["psnr_subset"]
        rows.append([ln["label"], *(report.cell(v, 2) for v in (bm3d, dae, dae[0] - bm3d))])
    return [
        "",
        f"BM3D (tuned per level like the others) against the DAE on the first {counts} test "
        "images, the same noisy images for both:",
        "",
        *report.markdown_table(["model", "BM3D PSNR", "DAE PSNR", "DAE - BM3D (dB)"], rows),
    ]


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
    chosen = dict(part.partition(":")[::2] for part in plot.split(",") if part)
    if any(key not in ("x", "hue") or value not in axes for key, value in chosen.items()):
        raise UserError(
            f"--plot={plot}: give x:KEY[,hue:KEY] with keys among the axes "
            f"({', '.join(axes) or 'none'})"
        )
    numeric = [a for a in axes if lines and all(is_number(ln["values"][a]) for ln in lines)]
    preferred = [a for a in axes if a == "noise.level"] + numeric + axes
    x = chosen.get("x", preferred[0] if preferred else "")
    return x, [chosen["hue"]] if "hue" in chosen else [a for a in axes if a != x]


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


# ------------------------------------------------------------------- command line


def main(argv: Sequence[str], *, program: bool = False, script_grid: str = "") -> int:
    """``dae-jax sweep`` with ``argv`` (``argv[0]`` the program; ``script_grid``: the grid
    whose script this is) under the crash guard; returns the exit code. Parses into its
    own ``FlagValues``: callable in-process."""
    from dae_jax import guard

    return guard.run(
        "dae-jax sweep", lambda g: command(list(argv), g, script_grid), program=program
    )


def script(grid: str) -> None:
    """``python experiments/<grid>.py ...``: ``dae-jax sweep --grid=<grid> ...``."""
    import sys

    from dae_jax import guard

    guard.install_excepthook()
    guard.exit_quietly(
        main([f"experiments/{grid}.py", *sys.argv[1:]], program=True, script_grid=grid)
    )


def _define(values: Any) -> None:
    from absl import flags

    kw = {"flag_values": values}
    flags.DEFINE_string(
        "grid", "", f"A named grid ({', '.join(grids.GRIDS)}) or a JSON file.", **kw
    )
    flags.DEFINE_multi_string("axis", [], "KEY=V1,V2,...: an axis (repeatable).", **kw)
    flags.DEFINE_list("levels", [], "Shorthand for --axis=noise.level=...", **kw)
    flags.DEFINE_list("learning_rates", [], "Shorthand for --axis=optim.learning_rate=...", **kw)
    for name, what in SCORING.items():
        flags.DEFINE_bool(name, None, f"Score {what} (default: the grid's, else on).", **kw)
    flags.DEFINE_string("plot", "", "The figures' axes: x:KEY[,hue:KEY].", **kw)


def command(argv: list[str], g: Any, script_grid: str = "") -> int:
    grid_name = script_grid or next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--grid=")), ""
    )
    doc = "\n\n".join(__doc__.split("\n\n")[:2]) + "\n\ngrids (--grid=NAME):\n"
    doc += "\n".join(f"  {n}: {grid.get('doc', '')}" for n, grid in grids.GRIDS.items())
    if grid_name in grids.GRIDS:
        doc = f"{grid_name}: {grids.GRIDS[grid_name].get('doc', '')}\n\n{doc}"
    parsed = report.parse(argv, g, doc=doc, quick=_quick, define=_define, repeatable=("axis",))
    if parsed is None:
        return 0
    values, config, argv = parsed.flags, parsed.config, parsed.argv
    if script_grid and values["grid"].present:
        raise UserError(f"--grid does not apply here: this script is the {script_grid} grid; "
                        "run dae-jax sweep --grid=... for another")  # fmt: skip
    spec = script_grid or values.grid
    name, grid = load_grid(spec) if spec else ("sweep", {})
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
        if key == "seed":
            raise UserError("--config.seed does not apply here: the seeds are --seeds=0,1,2")
        if any(key in product for product in prods):
            raise UserError(
                f"--config.{key} does not apply here: {key} is an axis of this sweep; give its "
                f"values with --axis={key}=V1,V2"
            )
    if values.quick:  # the grid's numeric axes: 2 values each
        for product in prods:
            for key, vals in product.items():
                if key not in axes and len(vals) > 2 and all(map(is_number, vals)):
                    product[key] = vals[:2]
                    print(
                        f"--quick kept {key}={','.join(map(report.show, vals[:2]))} of the grid's"
                    )
    plot = values.plot or grid.get("plot", "")
    plot_axes(plot, expand(prods, parsed.seeds, config)[0])
    chosen = {stage: values[stage].value for stage in SCORING}
    score = {s: grid.get("score", {}).get(s, True) if v is None else v for s, v in chosen.items()}
    report.start(g, parsed)
    g.stage = "running the sweep"
    run(
        name, parsed.config, prods, parsed.seeds, parsed.workdir, score=score, plot=plot,
        command=parsed.command,
    )  # fmt: skip
    print(f"Results: {parsed.workdir / 'results.md'}")
    return 0


def _quick(config: ml_collections.ConfigDict) -> None:
    config.data.train_size, config.data.test_size = 1024, 256
    config.train.epochs, config.eval.batch_size = 1, 256

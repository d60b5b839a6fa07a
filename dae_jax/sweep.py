"""Ablation sweeps: many models trained at once, evaluated the way the literature does.

An experiment is a list of arms (noise kind, loss[, learning rate]) each swept over
levels and seeds. Every (kind, loss) family trains all its levels x seeds (x rates) as
one population of the training engine (``train.fit_many`` in ``W/models/<kind>-<loss>``:
resumable, every model kept); every model is then scored at every test level of its
noise kind (PSNR, SSIM, MSE of the reconstruction), next to classical denoisers tuned
per level on the same noisy images (BM3D for Gaussian noise, on the first test images:
the models are scored on those too), and its encoder's codes get a linear probe
(L-BFGS logistic regression, L2 chosen on held-out training images). Finished stages
are kept in ``W/stages/``, so a killed sweep resumes to the same ``results.csv``.
Outputs: ``results.csv`` (one row per model x test level x metric), ``results.json``,
``results.md`` (mean +- std over seeds, best per column in bold) and figures.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dae_jax import baselines, checkpointing, data, metrics, models, plots, report, runfiles, train
from dae_jax.configs import validate
from dae_jax.errors import UserError

METRICS = ("psnr", "ssim", "mse")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One family of models: a noise kind and a loss (and, when the sweep varies it, a
    learning rate), swept over ``levels``."""

    kind: str
    loss: str
    levels: tuple[float, ...]
    learning_rate: float | None = None  # None: the config's

    @property
    def name(self) -> str:
        lr = "" if self.learning_rate is None else f" lr={self.learning_rate:g}"
        return f"{self.kind}/{self.loss}{lr}"

    @property
    def population(self) -> str:
        """The directory of the population this arm trains in (one per kind and loss)."""
        return f"{self.kind}-{self.loss}"


def _noisy_test_images(
    kind: str, level: float, clean: jax.Array, clip: bool, key: jax.Array
) -> jax.Array:
    from dae_jax import corruption

    return corruption.corrupt(kind, key, clean, jnp.float32(level), clip=clip)[0]


@jax.jit
def _mean_scores(images: jax.Array, clean: jax.Array) -> dict[str, jax.Array]:
    return {
        "psnr": jnp.mean(metrics.psnr(images, clean)),
        "ssim": jnp.mean(metrics.ssim(images, clean)),
        "mse": jnp.mean(metrics.mse(images, clean)),
    }


def _scores(images: jax.Array, clean: jax.Array) -> dict[str, float]:
    return {name: float(value) for name, value in _mean_scores(images, clean).items()}


def _numbers_back(row: dict[str, Any]) -> dict[str, Any]:
    """A row read back from strict JSON: "NaN"/"Infinity" strings are floats again."""
    out = {**row, "value": float(row["value"])}
    if isinstance(row.get("parameter"), str):
        out["parameter"] = float(row["parameter"])
    return out


class _Stages:
    """A sweep's finished stages (references, each population's scores) as JSON rows
    under ``W/stages/``, written atomically: a resumed sweep skips what is done and
    ends with the same ``results.csv`` as an uninterrupted one."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def rows(self, name: str, compute: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        path = self.directory / f"{name}.json"
        done = runfiles.read_json(path)
        if isinstance(done, list):
            return [_numbers_back(r) for r in done]
        rows = compute()
        runfiles.write_json(path, rows)
        return rows


def _row(
    experiment: str,
    model: str,
    arm: Arm | None,
    level: float | None,
    seed: int | None,
    metric: str,
    value: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "model": model,
        "train_kind": arm.kind if arm else "",
        "train_loss": arm.loss if arm else "",
        "train_level": level if level is not None else "",
        "seed": seed if seed is not None else "",
        "metric": metric,
        "value": value,
        **extra,
    }


def _check_settings(workdir: Path, settings: dict[str, Any]) -> None:
    """A sweep's workdir keeps the settings it was started with; others are refused."""
    path = workdir / "sweep.json"
    saved = runfiles.read_json(path)
    if saved is not None and saved != json.loads(runfiles.dumps(settings)):
        changed = sorted(
            k for k in settings if saved.get(k) != json.loads(runfiles.dumps(settings[k]))
        )
        raise UserError(
            f"--workdir={workdir} holds a sweep with other settings ({', '.join(changed)} "
            "differ); resuming would mix two experiments: use a new --workdir, or the same "
            "command as before"
        )
    runfiles.write_json(path, settings)


def run(
    experiment: str,
    config: ml_collections.ConfigDict,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    workdir: str | Path,
    *,
    log: Callable[[str], None] = print,
    command: str = "",
) -> list[dict[str, Any]]:
    """Trains, evaluates and writes one experiment; returns its rows. Run again on the
    same workdir, it resumes: trained populations from their checkpoints (in
    ``W/models/<kind>-<loss>/``, every model kept), finished scoring from ``W/stages/``."""
    workdir = Path(workdir)
    runfiles.prepare_workdir(workdir)
    with runfiles.WorkdirLock(workdir):
        _check_settings(
            workdir,
            {
                "experiment": experiment,
                "config": checkpointing.plain(_without_speed_keys(config)),
                "arms": [dataclasses.asdict(arm) for arm in arms],
                "seeds": list(seeds),
            },
        )
        return _run(experiment, config, arms, seeds, workdir, log, command)


def _without_speed_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config less what may change between a sweep's resumes (speed, logging)."""
    out = ml_collections.ConfigDict(config.to_dict())
    del out["compile_cache"]
    out.train.log_every = out.train.scan_unroll = 0
    return out


def _run(
    experiment: str,
    config: ml_collections.ConfigDict,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    workdir: Path,
    log: Callable[[str], None],
    command: str,
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    stages = _Stages(workdir / "stages")
    dataset = data.load(config.data, seed=config.seed)
    log(f"{experiment}: {dataset.name} from {dataset.source}, {len(dataset.train_images)} train")
    clean_test = train.to_float(jnp.asarray(dataset.test_images))
    eval_key = jax.random.key(config.seed + 10_000)  # the same noisy test set for every model
    test_grid = sorted({(arm.kind, level) for arm in arms for level in arm.levels})
    noisy_by_test = {
        (kind, level): _noisy_test_images(
            kind, level, clean_test, bool(config.noise.clip), jax.random.fold_in(eval_key, i)
        )
        for i, (kind, level) in enumerate(test_grid)
    }
    clipped = bool(config.noise.clip)
    rows = stages.rows(
        "references",
        lambda: _reference_rows(experiment, dataset, noisy_by_test, clean_test, clipped, log),
    )
    subsets = {
        (r["test_kind"], r["test_level"]): int(r["images"])
        for r in rows
        if r["model"] == "bm3d" and r["metric"] == "psnr"
    }
    examples: dict[str, Any] = {}
    for population in dict.fromkeys(arm.population for arm in arms):
        group = [arm for arm in arms if arm.population == population]
        result, members = _train_population(config, group, seeds, workdir, dataset, log)
        rows += stages.rows(
            f"scores-{population}",
            functools.partial(
                _score_population,
                experiment,
                result,
                members,
                dataset,
                noisy_by_test,
                clean_test,
                subsets,
            ),  # fmt: skip
        )
        for k, (arm, level, seed) in enumerate(members):
            if seed == seeds[0]:
                noisy = noisy_by_test[arm.kind, level]
                examples[f"{arm.name} {level:g}"] = (noisy[:6], result.model(k)(noisy[:6]))
        log(f"{population}: trained and evaluated {len(members)} models")
    _write(
        workdir, experiment, config, arms, seeds, rows, examples, clean_test[:6], started, command
    )
    return rows


def _reference_rows(
    experiment: str,
    dataset: data.Dataset,
    noisy_by_test: dict,
    clean_test: jax.Array,
    clipped: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The raw-pixel probe, the noisy input and the classical denoisers at each test level."""
    pixels = baselines.linear_probe(
        dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
    )
    log(f"linear probe on raw pixels: test accuracy {pixels['test_accuracy']:.4f}")
    rows = [
        _row(
            experiment,
            "raw pixels",
            None,
            None,
            None,
            "probe_accuracy",
            pixels["test_accuracy"],
            test_kind="",
            test_level="",
        ),
    ]
    for (kind, level), noisy in sorted(noisy_by_test.items()):
        at = {"test_kind": kind, "test_level": level}
        for metric, value in _scores(noisy, clean_test).items():
            rows.append(_row(experiment, "noisy input", None, None, None, metric, value, **at))
        for name, best in _references(noisy, clean_test, kind, level, clipped, log).items():
            extra = {"images": best["images"]} if name == "bm3d" else {}
            log(
                f"  {name} at {kind} {level:g}: {best['psnr']:.2f} dB on {best['images']} "
                f"images (parameter {best['parameter']:g}), {best['seconds']:.1f} s"
            )
            for metric in METRICS:
                rows.append(
                    _row(
                        experiment, name, None, None, None, metric, best[metric],
                        parameter=best["parameter"], **extra, **at,
                    )
                )  # fmt: skip
    return rows


def _references(
    noisy: jax.Array, clean: jax.Array, kind: str, level: float, clipped: bool, log: Callable
) -> dict[str, dict[str, float]]:
    """The classical denoisers tuned at this level; BM3D too (Gaussian noise) when the
    bm3d package is installed, else a warning and the others."""
    try:
        return baselines.best_classical(
            noisy, clean, noise=kind, level=level, clipped=clipped,
            # 500 of 10,000 test images; a sixteenth of a small test set (--quick: 16)
            bm3d_images=min(baselines.BM3D_IMAGES, len(noisy) // 16),
        )  # fmt: skip
    except UserError as e:
        log(f"warning: no BM3D reference: {e}")
        return baselines.best_classical(noisy, clean)


def _train_population(
    config: ml_collections.ConfigDict,
    arms: list[Arm],
    seeds: Sequence[int],
    workdir: Path,
    dataset: data.Dataset,
    log: Callable[[str], None],
):
    """Every (arm, level, seed) of one kind and loss, trained as one resumable population."""
    arm_config = ml_collections.ConfigDict(config.to_dict())
    arm_config.noise.kind, arm_config.loss = arms[0].kind, arms[0].loss
    members = [(arm, level, seed) for arm in arms for level in arm.levels for seed in seeds]
    result = train.fit_many(
        arm_config,
        seeds=[seed for _, _, seed in members],
        levels=[level for _, level, _ in members],
        learning_rates=[
            config.optim.learning_rate if arm.learning_rate is None else arm.learning_rate
            for arm, _, _ in members
        ],
        workdir=workdir / "models" / arms[0].population,
        dataset=dataset,
        log=log,
    )
    return result, members


def _score_population(
    experiment: str,
    result: train.Result,
    members: list,
    dataset: data.Dataset,
    noisy_by_test: dict,
    clean_test: jax.Array,
    subsets: dict[tuple[str, float], int],
) -> list[dict[str, Any]]:
    """Each model's final train loss, its scores at every test level of its noise kind
    (and, where BM3D was scored on the first N images only, ``*_subset`` scores on the
    same N), and a linear probe of its codes; a diverged model's epoch is recorded too."""
    clean_train = train.to_float(jnp.asarray(dataset.train_images))
    rows = []
    for k, (arm, level, seed) in enumerate(members):
        model = result.model(k)

        def add(
            metric: str,
            value: float,
            test_kind: Any = "",
            test_level: Any = "",
            arm: Arm = arm,
            level: float = level,
            seed: int = seed,
            **extra: Any,
        ) -> None:
            rows.append(
                _row(
                    experiment, arm.name, arm, level, seed, metric, value,
                    test_kind=test_kind, test_level=test_level, **extra,
                )
            )  # fmt: skip

        add("final_train_loss", result.final(k)["train_loss"])
        if k in result.diverged:
            add("diverged_in_epoch", float(result.diverged[k]["epoch"]))
        for test_kind, test_level in sorted(noisy_by_test):
            if test_kind == arm.kind:
                denoised = model(noisy_by_test[test_kind, test_level])
                for metric, value in _scores(denoised, clean_test).items():
                    add(metric, value, test_kind, test_level)
                n = subsets.get((test_kind, test_level))
                if n:
                    for metric, value in _scores(denoised[:n], clean_test[:n]).items():
                        add(f"{metric}_subset", value, test_kind, test_level, images=n)
        probe = baselines.linear_probe(
            model.encode(clean_train),
            dataset.train_labels,
            model.encode(clean_test),
            dataset.test_labels,
        )
        add("probe_accuracy", probe["test_accuracy"])
    return rows


# ---------------------------------------------------------------------- outputs


def summary_table(rows: list[dict[str, Any]], arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """One line per (arm, train level): mean and std over seeds of the reconstruction's
    PSNR and SSIM at its own level, the gain over the best classical reference there,
    and the probe accuracy."""

    def pick(**want: Any) -> list[float]:
        return [r["value"] for r in rows if all(r.get(k) == v for k, v in want.items())]

    def of_models(arm: Arm, level: float, metric: str, **at: Any) -> list[float]:
        """The arm's values at ``level``, less those of models that diverged."""
        return [
            r["value"]
            for r in rows
            if r["model"] == arm.name
            and r["train_level"] == level
            and r["metric"] == metric
            and r["seed"] not in diverged
            and all(r.get(k) == v for k, v in at.items())
        ]

    lines = []
    for arm in arms:
        for level in arm.levels:
            at = {"test_kind": arm.kind, "test_level": level}
            classical = max(
                (pick(model=name, metric="psnr", **at) or [float("-inf")])[0]
                for name in baselines.CLASSICAL
            )
            diverged = set(
                r["seed"]
                for r in rows
                if r["model"] == arm.name
                and r["train_level"] == level
                and r["metric"] == "diverged_in_epoch"
            )
            psnr = of_models(arm, level, "psnr", **at)
            lines.append(
                {
                    "arm": arm.name,
                    "level": level,
                    "psnr": report.mean_std(psnr),
                    "ssim": report.mean_std(of_models(arm, level, "ssim", **at)),
                    "noisy_psnr": pick(model="noisy input", metric="psnr", **at)[0],
                    "best_classical_psnr": classical,
                    "gain_db": (statistics.fmean(psnr) if psnr else math.nan) - classical,
                    "probe": report.mean_std(of_models(arm, level, "probe_accuracy")),
                    "diverged": len(diverged),
                    "bm3d_psnr": (pick(model="bm3d", metric="psnr", **at) or [math.nan])[0],
                    "psnr_subset": report.mean_std(of_models(arm, level, "psnr_subset", **at)),
                    "subset_images": next(
                        (
                            r["images"]
                            for r in rows
                            if r["model"] == "bm3d"
                            and r.get("test_level") == level
                            and r.get("test_kind") == arm.kind
                        ),
                        0,
                    ),
                }
            )
    return lines


def _number(value: float, digits: int) -> str:
    if math.isfinite(value):
        return f"{value:.{digits}f}"
    return "∞" if value > 0 else "—"


def _markdown(lines: list[dict[str, Any]], pixel_probe: float, header: str) -> str:
    def mean_of(value: Any) -> float:
        return value[0] if isinstance(value, tuple) else value

    best = {
        key: max(
            (mean_of(line[key]) for line in lines if math.isfinite(mean_of(line[key]))),
            default=None,
        )
        for key in ("psnr", "ssim", "gain_db", "probe")
    }

    def cell(line: dict[str, Any], key: str, digits: int) -> str:
        value = line[key]
        mean, std = value if isinstance(value, tuple) else (value, None)
        text = _number(mean, digits) + (f" ± {std:.{digits}f}" if std is not None else "")
        return f"**{text}**" if mean == best.get(key) else text

    out = [
        header,
        "",
        "| model | train = test level | noisy PSNR | best classical PSNR | DAE PSNR | "
        "gain (dB) | DAE SSIM | linear probe acc. |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for line in lines:
        total = line.get("diverged", 0)
        arm = line["arm"] + (f" ({total} diverged, left out)" if total else "")
        out.append(
            f"| {arm} | {line['level']:g} | {_number(line['noisy_psnr'], 2)} | "
            f"{_number(line['best_classical_psnr'], 2)} | {cell(line, 'psnr', 2)} | "
            f"{cell(line, 'gain_db', 2)} | {cell(line, 'ssim', 3)} | {cell(line, 'probe', 4)} |"
        )
    out += _bm3d_table(lines)
    out += [
        "",
        f"Linear probe on raw pixels: {pixel_probe:.4f}. At level 0 the input is the clean "
        "image, so its PSNR (and clipping's) is infinite and there is no gain to report "
        '(results.json writes it as the string "Infinity").',
    ]
    return "\n".join(out) + "\n"


def _bm3d_table(lines: list[dict[str, Any]]) -> list[str]:
    """BM3D beside the DAE on the same images (BM3D's subset of the test set)."""
    compared = [line for line in lines if line.get("subset_images")]
    if not compared:
        return []
    counts = sorted({line["subset_images"] for line in compared})
    out = [
        "",
        f"BM3D (tuned per level like the others) against the DAE on the first "
        f"{', '.join(map(str, counts))} test images, the same noisy images for both:",
        "",
        "| model | train = test level | BM3D PSNR | DAE PSNR | DAE - BM3D (dB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for line in compared:
        mean, std = line["psnr_subset"]
        out.append(
            f"| {line['arm']} | {line['level']:g} | {_number(line['bm3d_psnr'], 2)} | "
            f"{_number(mean, 2)} ± {std:.2f} | {_number(mean - line['bm3d_psnr'], 2)} |"
        )
    return out


def render(workdir: str | Path) -> None:
    """Rewrites ``results.md`` and the figures from ``results.json``, without retraining."""
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    arms = [
        Arm(a["kind"], a["loss"], tuple(a["levels"]), a.get("learning_rate"))
        for a in results["arms"]
    ]
    rows = [_numbers_back(r) for r in results["rows"]]  # "Infinity" too
    header = (workdir / "results.md").read_text().split("\n\n| model |")[0]
    lines = summary_table(rows, arms)
    pixel_probe = next(r["value"] for r in rows if r["model"] == "raw pixels")
    (workdir / "results.md").write_text(_markdown(lines, pixel_probe, header))


def _write(
    workdir: Path,
    experiment: str,
    config: ml_collections.ConfigDict,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    rows: list[dict[str, Any]],
    examples: dict[str, Any],
    clean: jax.Array,
    started: float,
    command: str,
) -> None:
    fields = [
        "experiment",
        "model",
        "train_kind",
        "train_loss",
        "train_level",
        "seed",
        "test_kind",
        "test_level",
        "metric",
        "value",
        "parameter",
        "images",
    ]
    with (workdir / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = summary_table(rows, arms)
    pixel_probe = next(r["value"] for r in rows if r["model"] == "raw pixels")
    info = {
        "experiment": experiment,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "seeds": list(seeds),
        "arms": [dataclasses.asdict(arm) for arm in arms],
        "config": config.to_dict(),
        "device": runfiles.device_info(),
        "versions": runfiles.versions(),
    }
    header = (
        f"# {experiment}\n\n"
        + (f"Command: `{command}`\n\n" if command else "")
        + f"{config.data.name}, model {models.describe(config)}, {config.train.epochs} "
        f"epochs, seeds {list(seeds)}, mean ± std over seeds; {info['date']}, "
        f"{report.where(info['device'])} ({info['device']['platform']}), "
        f"jax {info['versions']['jax']}, "
        f"{info['seconds'] / 60:.1f} min. Classical references are tuned per level on the "
        "test images themselves (an optimistic baseline). Bold: best in the column."
    )
    (workdir / "results.md").write_text(_markdown(lines, pixel_probe, header))
    (workdir / "results.json").write_text(
        runfiles.dumps({**info, "summary": lines, "rows": rows}, indent=1, default=float) + "\n"
    )
    plots.sweep_figures(workdir / "figures", rows, arms, lines, examples, np.asarray(clean))


# -------------------------------------------------------------- script entry


def cli(
    experiment: str,
    make_arms: Callable[[ml_collections.ConfigDict], list[Arm]],
    owns: dict[str, str] | None = None,
    doc: str | None = None,
) -> None:
    """The shared command line of the sweep scripts (``report.cli``'s flags)::

    python experiments/NAME.py --workdir=W [--config=FILE] [--config.KEY=VALUE]
                               [--seeds=0,1,2] [--levels=...] [--learning_rates=...] [--quick]

    ``--quick``: 1024 train / 256 test images, 1 epoch, 2 levels per arm, 1 seed.
    ``--levels`` replaces every arm's levels; ``--learning_rates`` trains every arm at
    each rate (in the same compiled program; each rate is an arm of its own in the
    tables). The same command on the same workdir resumes an interrupted sweep.
    """
    from absl import flags

    flags.DEFINE_list("levels", [], "Noise levels of every arm (default: the script's).")
    flags.DEFINE_list("learning_rates", [], "Learning rates, each an arm (default: the config's).")

    def quick(config: ml_collections.ConfigDict) -> None:
        config.data.train_size, config.data.test_size = 1024, 256
        config.train.epochs, config.eval.batch_size = 1, 256

    def run_sweep(
        config: ml_collections.ConfigDict,
        seeds: list[int],
        workdir: Path,
        quick: bool,
        command: str,
    ) -> None:
        arms = make_arms(config)
        levels = report.numbers("levels", flags.FLAGS.levels, float, "0.1,0.5")
        rates = report.numbers("learning_rates", flags.FLAGS.learning_rates, float, "1e-3,3e-3")
        if levels:
            arms = [dataclasses.replace(arm, levels=tuple(levels)) for arm in arms]
        elif quick:
            arms = [dataclasses.replace(arm, levels=arm.levels[:2]) for arm in arms]
            kept = "; ".join(f"{a.name}: {','.join(f'{v:g}' for v in a.levels)}" for a in arms)
            print(f"--quick kept the first 2 levels of each arm ({kept})")
        if rates:
            arms = [dataclasses.replace(arm, learning_rate=r) for arm in arms for r in rates]
        for arm in arms:  # every level and rate is valid for its arm, before anything runs
            for level in arm.levels:
                check = ml_collections.ConfigDict(config.to_dict())
                check.noise.kind, check.noise.level, check.loss = arm.kind, level, arm.loss
                if arm.learning_rate is not None:
                    check.optim.learning_rate = arm.learning_rate
                validate(check)
        run(experiment, config, arms, seeds, workdir, command=command)

    report.cli(
        experiment, run_sweep, quick=quick, owns={**report.SWEPT_KEYS, **(owns or {})}, doc=doc
    )

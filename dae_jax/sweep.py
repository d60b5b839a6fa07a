"""Ablation sweeps: many models trained at once, evaluated the way the literature does.

An experiment is a list of arms (noise kind, loss) each swept over levels and seeds.
Every (kind, loss) arm trains all its levels x seeds in one vmapped program
(``train.fit_many``); every model is then scored at every test level of its noise
kind (PSNR, SSIM, MSE of the reconstruction), next to classical denoisers tuned per
level on the same noisy images, and its encoder's codes get a linear probe.
Outputs: ``results.csv`` (one row per model x test level x metric), ``results.json``,
``results.md`` (mean +- std over seeds, best per column in bold) and figures.
"""

from __future__ import annotations

import csv
import dataclasses
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

from dae_jax import baselines, data, metrics, plots, report, train

METRICS = ("psnr", "ssim", "mse")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One family of models: a noise kind and a loss, swept over ``levels``."""

    kind: str
    loss: str
    levels: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.loss}"


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
    """Trains, evaluates and writes one experiment; returns its rows."""
    workdir = Path(workdir)
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = data.load(config.data, seed=config.seed)
    log(f"{experiment}: {dataset.name} from {dataset.source}, {len(dataset.train_images)} train")
    clean_test = train.to_float(jnp.asarray(dataset.test_images))
    clean_train = train.to_float(jnp.asarray(dataset.train_images))
    eval_key = jax.random.key(config.seed + 10_000)  # the same noisy test set for every model
    rows: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}

    def add(model: str, arm: Arm | None, level: float | None, seed: int | None, **extra: Any):
        for metric, value in extra.pop("values").items():
            rows.append(
                {
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
            )

    pixels = baselines.linear_probe(
        dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
    )
    add(
        "raw pixels",
        None,
        None,
        None,
        test_kind="",
        test_level="",
        values={"probe_accuracy": pixels["test_accuracy"]},
    )
    log(f"linear probe on raw pixels: test accuracy {pixels['test_accuracy']:.4f}")

    test_grid = {(arm.kind, level) for arm in arms for level in arm.levels}
    noisy_by_test = {
        (kind, level): _noisy_test_images(
            kind, level, clean_test, bool(config.noise.clip), jax.random.fold_in(eval_key, i)
        )
        for i, (kind, level) in enumerate(sorted(test_grid))
    }
    for (kind, level), noisy in sorted(noisy_by_test.items()):
        add(
            "noisy input",
            None,
            None,
            None,
            test_kind=kind,
            test_level=level,
            values=_scores(noisy, clean_test),
        )
        for name, best in baselines.best_classical(noisy, clean_test).items():
            add(
                name,
                None,
                None,
                None,
                test_kind=kind,
                test_level=level,
                parameter=best["parameter"],
                values={m: best[m] for m in METRICS},
            )

    for arm in arms:
        arm_config = ml_collections.ConfigDict(config.to_dict())
        arm_config.noise.kind, arm_config.loss = arm.kind, arm.loss
        pairs = [(seed, level) for level in arm.levels for seed in seeds]
        many = train.fit_many(
            arm_config,
            seeds=[s for s, _ in pairs],
            levels=[lv for _, lv in pairs],
            dataset=dataset,
            log=log,
        )
        for k, (seed, level) in enumerate(pairs):
            model = many.model(k)
            add(
                arm.name,
                arm,
                level,
                seed,
                test_kind="",
                test_level="",
                values={"final_train_loss": many.history[-1]["train_loss"][k]},
            )
            for test_kind, test_level in sorted(test_grid):
                if test_kind != arm.kind:
                    continue
                noisy = noisy_by_test[test_kind, test_level]
                denoised = model(noisy)
                add(
                    arm.name,
                    arm,
                    level,
                    seed,
                    test_kind=test_kind,
                    test_level=test_level,
                    values=_scores(denoised, clean_test),
                )
                if seed == seeds[0] and test_level == level:
                    examples[f"{arm.name} {level:g}"] = (noisy[:6], denoised[:6])
            probe = baselines.linear_probe(
                model.encode(clean_train),
                dataset.train_labels,
                model.encode(clean_test),
                dataset.test_labels,
            )
            add(
                arm.name,
                arm,
                level,
                seed,
                test_kind="",
                test_level="",
                values={"probe_accuracy": probe["test_accuracy"]},
            )
        log(f"{arm.name}: trained and evaluated {len(pairs)} models")

    _write(
        workdir, experiment, config, arms, seeds, rows, examples, clean_test[:6], started, command
    )
    return rows


# ---------------------------------------------------------------------- outputs


def summary_table(rows: list[dict[str, Any]], arms: Sequence[Arm]) -> list[dict[str, Any]]:
    """One line per (arm, train level): mean and std over seeds of the reconstruction's
    PSNR and SSIM at its own level, the gain over the best classical reference there,
    and the probe accuracy."""

    def pick(**want: Any) -> list[float]:
        return [r["value"] for r in rows if all(r.get(k) == v for k, v in want.items())]

    lines = []
    for arm in arms:
        for level in arm.levels:
            at = {"test_kind": arm.kind, "test_level": level}
            classical = max(
                (pick(model=name, metric="psnr", **at) or [float("-inf")])[0]
                for name in baselines.CLASSICAL
            )
            psnr = pick(model=arm.name, train_level=level, metric="psnr", **at)
            lines.append(
                {
                    "arm": arm.name,
                    "level": level,
                    "psnr": report.mean_std(psnr),
                    "ssim": report.mean_std(
                        pick(model=arm.name, train_level=level, metric="ssim", **at)
                    ),
                    "noisy_psnr": pick(model="noisy input", metric="psnr", **at)[0],
                    "best_classical_psnr": classical,
                    "gain_db": statistics.fmean(psnr) - classical,
                    "probe": report.mean_std(
                        pick(model=arm.name, train_level=level, metric="probe_accuracy")
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
        out.append(
            f"| {line['arm']} | {line['level']:g} | {_number(line['noisy_psnr'], 2)} | "
            f"{_number(line['best_classical_psnr'], 2)} | {cell(line, 'psnr', 2)} | "
            f"{cell(line, 'gain_db', 2)} | {cell(line, 'ssim', 3)} | {cell(line, 'probe', 4)} |"
        )
    out += [
        "",
        f"Linear probe on raw pixels: {pixel_probe:.4f}. At level 0 the input is the clean "
        "image, so its PSNR (and clipping's) is infinite and there is no gain to report.",
    ]
    return "\n".join(out) + "\n"


def render(workdir: str | Path) -> None:
    """Rewrites ``results.md`` and the figures from ``results.json``, without retraining."""
    workdir = Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    arms = [Arm(a["kind"], a["loss"], tuple(a["levels"])) for a in results["arms"]]
    rows = results["rows"]
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
    ]
    with (workdir / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields, restval="")
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
        "device": train.device_info(),
        "versions": train.versions(),
    }
    header = (
        f"# {experiment}\n\n"
        + (f"Command: `{command}`\n\n" if command else "")
        + f"{config.data.name}, model {report.model_name(config)}, {config.train.epochs} "
        f"epochs, seeds {list(seeds)}, mean ± std over seeds; {info['date']}, "
        f"{report.where(info['device'])} ({info['device']['platform']}), "
        f"jax {info['versions']['jax']}, "
        f"{info['seconds'] / 60:.1f} min. Classical references are tuned per level on the "
        "test images themselves (an optimistic baseline). Bold: best in the column."
    )
    (workdir / "results.md").write_text(_markdown(lines, pixel_probe, header))
    (workdir / "results.json").write_text(
        json.dumps({**info, "summary": lines, "rows": rows}, indent=1, default=float) + "\n"
    )
    plots.sweep_figures(workdir / "figures", rows, arms, lines, examples, np.asarray(clean))


# -------------------------------------------------------------- script entry


def cli(experiment: str, make_arms: Callable[[ml_collections.ConfigDict], list[Arm]]) -> None:
    """The shared command line of the sweep scripts (``report.cli``'s flags)::

    python experiments/NAME.py --workdir=W [--config=FILE] [--config.KEY=VALUE]
                               [--seeds=0,1,2] [--quick]

    ``--quick``: 1024 train / 256 test images, 1 epoch, 2 levels per arm, 1 seed.
    """

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
        if quick:
            arms = [dataclasses.replace(arm, levels=arm.levels[:2]) for arm in arms]
        run(experiment, config, arms, seeds, workdir, command=command)

    report.cli(experiment, run_sweep, quick=quick)

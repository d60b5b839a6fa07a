"""``dae-jax table W1 W2 ...``: one table of trained runs, told apart by their configs.

    dae-jax table W1 [W2 ...] [--csv=FILE] [--metrics=test_psnr_denoised,...]

Every run under the given directories counts: a ``dae-jax train`` workdir, a sweep's
populations (``W/models/*``), any directory holding ``summary.json`` and ``config.json``.
Each model is a row of its own config (a population member's seed and traced values
applied); the config keys whose values differ between the models become the columns, and
the models that differ only in their seed are one line: mean ± std over seeds of each
metric of their last epoch (at their own corruption, as ``metrics.jsonl`` records it).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dae_jax import configs, report, runfiles
from dae_jax.errors import UserError

METRICS = ("test_psnr_denoised", "test_ssim_denoised", "test_loss", "train_loss")
# Keys that say how a run was made, not what it is: never a column.
IGNORED = (*configs.SPEED_KEYS, "tensorboard", "checkpoint.every_epochs", "checkpoint.keep",
           "data.local_dir", "data.tfds_dir", "eval.batch_size", "eval.num_figure_images",
           "seed")  # fmt: skip


def main(argv: Sequence[str], *, program: bool = False) -> int:
    from dae_jax import guard

    return guard.run("dae-jax table", lambda g: command(list(argv), g), program=program)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A run's JSON config as dotted keys, lists as the tuples the config files write."""
    flat = configs.flat(ml_collections.ConfigDict(config))
    return {key: tuple(v) if isinstance(v, list) else v for key, v in flat.items()}


def runs(directory: Path) -> list[Path]:
    """The run directories at or under ``directory`` (sorted)."""
    found = [
        p.parent for p in directory.rglob("summary.json") if (p.parent / "config.json").is_file()
    ]
    return sorted(found)


def models(run: Path) -> list[dict[str, Any]]:
    """One record per model of a run: its flat config, seed and last-epoch metrics."""
    config = runfiles.read_json(run / "config.json")
    summary = runfiles.read_json(run / "summary.json")
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise UserError(
            f"{run} has an unreadable config.json or summary.json; retrain or remove it"
        )
    members = summary.get("members") or [None]
    finals = summary.get("final")
    finals = finals if isinstance(finals, list) else [finals or {}]
    out = []
    for k, member in enumerate(members):
        flat = _flat(config)
        if member is not None:
            flat.update(member)
        final = finals[k] if k < len(finals) else {}
        out.append(
            {
                "run": str(run) + (f" model {k}" if member is not None else ""),
                "config": flat,
                "seed": flat.get("seed"),
                "diverged": str(k) in (summary.get("diverged") or {}),
                "metrics": {m: _number(final.get(m)) for m in METRICS},
            }
        )
    return out


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def tabulate(
    records: list[dict[str, Any]], metrics: Sequence[str] = METRICS
) -> tuple[list[str], list[dict]]:
    """(the differing config keys, one line per group of models alike but for the seed)."""
    keys = sorted({k for r in records for k in r["config"]})
    differ = [
        k for k in keys
        if k not in IGNORED and len({repr(r["config"].get(k)) for r in records}) > 1
    ]  # fmt: skip
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(repr(r["config"].get(k)) for k in differ), []).append(r)
    lines = []
    for members in groups.values():
        live = [r for r in members if not r["diverged"]]
        line = {k: members[0]["config"].get(k) for k in differ}
        line["models"] = len(members)
        line["diverged"] = len(members) - len(live)
        for m in metrics:
            values = [r["metrics"][m] for r in live if math.isfinite(r["metrics"][m])]
            line[m] = (
                statistics.fmean(values) if values else math.nan,
                statistics.stdev(values) if len(values) > 1 else 0.0,
            )
        lines.append(line)
    return differ, lines


def markdown(differ: list[str], lines: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    rows = []
    for line in lines:
        cells = [report.show(line[k]) for k in differ]
        cells.append(
            str(line["models"]) + (f" ({line['diverged']} diverged)" if line["diverged"] else "")
        )
        for m in metrics:
            mean, std = line[m]
            cells.append(f"{mean:.4f} ± {std:.4f}" if math.isfinite(mean) else "—")
        rows.append(cells)
    return "\n".join(report.markdown_table([*differ, "models", *metrics], rows, len(differ))) + "\n"


def command(argv: list[str], g: Any) -> int:
    from absl import flags

    from dae_jax.cli import repeated_flag

    g.stage = "reading the command line"
    problem = repeated_flag(argv)
    if problem:
        raise UserError(problem)
    values = flags.FlagValues()
    flags.DEFINE_string(
        "csv", "", "Also write every model's metrics here (one row per model).", flag_values=values
    )
    flags.DEFINE_list("metrics", list(METRICS), "Last-epoch metrics to show.", flag_values=values)
    flags.DEFINE_bool("verbose", False, "Libraries' warnings on stderr too.", flag_values=values)
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(
            __doc__.strip()
            + "\n\nflags:\n"
            + "\n".join(
                f"  --{f.name}: {f.help}"
                for f in (values["csv"], values["metrics"], values["verbose"])
            )
        )
        return 0
    try:
        directories = values(argv)[1:]
    except flags.Error as e:
        raise UserError(f"{e} (dae-jax table --help lists the flags)") from None
    if not directories:
        raise UserError("give the workdirs to tabulate: dae-jax table W1 [W2 ...]")
    unknown = [m for m in values.metrics if m not in METRICS]
    if unknown:
        raise UserError(
            f"--metrics={','.join(values.metrics)}: {unknown[0]} is not one of {', '.join(METRICS)}"
        )
    records: list[dict[str, Any]] = []
    seen: set[Path] = set()
    g.stage = "reading the runs"
    for name in directories:
        path = Path(name)
        if not path.is_dir():
            raise UserError(f"{name} is not a directory; give workdirs of trained runs or sweeps")
        found = runs(path)
        if not found:
            raise UserError(
                f"{name} holds no trained run (no summary.json with a config.json); train it first"
            )
        for run in found:
            if run.resolve() not in seen:  # a run under two of the given directories: once
                seen.add(run.resolve())
                records += models(run)
    differ, lines = tabulate(records, values.metrics)
    columns = f"({', '.join(differ)})" if differ else "(none: only their seeds differ)"
    print(f"{len(records)} models in {len(directories)} workdir(s); columns: the config keys "
          f"that differ {columns}")  # fmt: skip
    print(markdown(differ, lines, values.metrics), end="")
    if values.csv:
        with Path(values.csv).open("w", newline="") as file:
            writer = csv.DictWriter(
                file, fieldnames=["run", *differ, "seed", "diverged", *values.metrics]
            )
            writer.writeheader()
            for r in records:
                shown = {k: report.show(r["config"].get(k)) for k in differ}
                metrics = {m: r["metrics"][m] for m in values.metrics}
                writer.writerow(
                    {
                        "run": r["run"],
                        **shown,
                        "seed": r["seed"],
                        "diverged": r["diverged"],
                        **metrics,
                    }
                )
        print(f"Rows: {values.csv}")
    return 0

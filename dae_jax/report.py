"""What every experiment script shares: its command line and its output files.

    python experiments/NAME.py --workdir=W [--config=FILE] [--config.KEY=VALUE]
                               [--seeds=0,1,2] [--quick]

Outputs in ``W``: ``results.csv`` (one row per model x measurement, with its seed),
``results.json`` (rows, config, device, versions, date, run time), ``results.md`` (a
header saying how the numbers were made, then the script's table) and ``figures/``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from dae_jax import configs, models, runfiles
from dae_jax.errors import UserError, one_line


def numbers(flag: str, values: Sequence[str], kind: type, example: str) -> list:
    """A list flag's values as ``kind``; a value that is not one ends in a ``UserError``."""
    try:
        return [kind(value) for value in values]
    except ValueError:
        raise UserError(
            f"--{flag}={','.join(values)} is not a list of {kind.__name__}s; "
            f"give e.g. --{flag}={example}"
        ) from None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN, NaN for no values; std 0 for one)."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(
    row_names: Sequence[str],
    columns: Sequence[str],
    cells: Mapping[tuple[str, str], Sequence[float]],
    *,
    first: str,
    digits: int = 4,
    higher_is_better: bool = True,
) -> str:
    """A markdown table of mean ± std per (row, column); the best mean per column bold."""
    stats = {(r, c): mean_std(cells[r, c]) for r in row_names for c in columns if cells.get((r, c))}
    pick = max if higher_is_better else min
    best = {c: pick((m for (_, col), (m, _) in stats.items() if col == c), default=None)
            for c in columns}  # fmt: skip

    def shown(r: str, c: str) -> Any:  # (mean, std) of two or more values, else the value
        values = cells.get((r, c)) or []
        return stats[r, c] if len(values) > 1 else stats[r, c][0] if values else math.nan

    rows = [[name, *(cell(shown(name, c), digits, best[c]) for c in columns)] for name in row_names]
    return "\n".join(markdown_table([first, *columns], rows))


def cell(value: float | tuple[float, float], digits: int, best: float | None = None) -> str:
    """A number or (mean, std) as the tables show it (∞, or — for none); bold if the best."""
    mean, std = value if isinstance(value, tuple) else (value, math.nan)
    text = f"{mean:.{digits}f}" if math.isfinite(mean) else ("∞" if mean > 0 else "—")
    text += f" ± {std:.{digits}f}" if math.isfinite(std) else ""
    return f"**{text}**" if best is not None and math.isclose(mean, best) else text


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> list[str]:
    """A markdown table's lines: ``left`` columns of text, then numbers (right-aligned)."""
    rule = ["---"] * left + ["---:"] * (len(head) - left)
    return ["| " + " | ".join(map(str, line)) + " |" for line in [head, rule, *rows]]


def show(value: Any) -> str:
    """A config value as a table shows it: ``0.25``, ``(512,256,128)``, ``True``."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return "(" + ",".join(map(show, value)) + ")"
    return str(value)


def write(
    workdir: Path,
    experiment: str,
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    rows: list[dict[str, Any]],
    body: str,
    started: float,
    command: str,
    *,
    fields: Sequence[str] = (),
    note: str = "",
    **extra: Any,
) -> None:
    """Writes results.csv (columns ``fields`` first, then any other key of the rows; config
    values shown as tables show them), results.json (the rows, config, device, versions,
    ``extra``) and results.md (a header saying how the numbers were made, ``note``, then
    ``body``) to ``workdir``: every experiment's one writer."""
    columns = list(fields)
    for row in rows:
        columns += [k for k in row if k not in columns]
    with (workdir / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: show(v) if "." in k else v for k, v in row.items()} for row in rows)
    info = {
        "experiment": experiment,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - started,
        "command": command,
        "seeds": list(seeds),
        "config": config.to_dict(),
        "device": runfiles.device_info(),
        "versions": runfiles.versions(),
        **extra,
    }
    device = info["device"]
    name = device["cpu"] if device["platform"] == "cpu" else device["device_kind"]
    header = (
        f"# {experiment}\n\n"
        + (f"Command: `{command}`\n\n" if command else "")
        + f"{config.data.name}, model {models.describe(config)}, seeds {list(seeds)}, mean ± std "
        f"over seeds; {info['date']}, {name} ({device['platform']}), "
        f"jax {info['versions']['jax']}, {info['seconds'] / 60:.1f} min."
        + (f" {note}" if note else "")
    )
    (workdir / "results.md").write_text(header + "\n\n" + body.rstrip() + "\n")
    (workdir / "results.json").write_text(
        runfiles.dumps({**info, "rows": rows}, indent=1, default=float) + "\n"
    )


def _help(doc: str, values: Any) -> str:
    own = [
        f"  --{flag.name}: {flag.help}"
        for module_flags in values.flags_by_module_dict().values()
        for flag in module_flags
        if not flag.name.startswith("config")
    ]
    keys = "\n".join(f"  --config.{k}={v!r}" for k, v in configs.flat(values.config).items())
    return "\n\n".join(
        [doc.strip(), "flags:\n" + "\n".join(own), "config keys (defaults):\n" + keys]
    )


@dataclasses.dataclass
class Command:
    """An experiment's parsed command line (its own ``FlagValues`` in ``flags``)."""

    flags: Any
    config: ml_collections.ConfigDict
    seeds: list[int]
    workdir: Path
    command: str
    argv: list[str]


def parse(
    argv: Sequence[str],
    g: Any,
    *,
    doc: str,
    quick: Callable[[ml_collections.ConfigDict], None],
    define: Callable[[Any], None] | None = None,
    default_config: str | None = None,
    repeatable: Sequence[str] = (),
) -> Command | None:
    """The command line every experiment shares, parsed into its own ``FlagValues`` (so
    a test can run it in process): ``--workdir``, ``--seeds``, ``--quick``,
    ``--verbose``, ``--config`` with its overrides, and the flags ``define(values)``
    adds. ``--quick`` (``quick(config)``) fills only the keys the command line does not
    set. Returns None after printing ``--help``; a mistake raises a ``UserError``."""
    from absl import flags

    from dae_jax.cli import config_error, repeated_flag, swallowed_value
    from dae_jax.configs import DEFAULT_CONFIG, define_config_flag, resolve_argv

    g.stage, g.writes_workdir = "reading the command line", True
    argv = resolve_argv(argv)  # --config=seed: the installed config
    single = [a for a in argv if a.lstrip("-").split("=", 1)[0] not in repeatable]
    problem = repeated_flag(single) or swallowed_value(argv)
    if problem:
        raise UserError(problem)
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Directory of the results (resumable).", values)
    flags.DEFINE_list(
        "seeds", None, "Seeds: one model per seed and setting (default 0,1,2).", values
    )
    flags.DEFINE_bool("quick", False, "A smoke run: tiny data, 1 epoch, 1 seed.", values)
    flags.DEFINE_bool("verbose", False, "Libraries' warnings on stderr too.", values)
    if define is not None:
        define(values)
    g.stage = "reading the config"
    try:  # the config file is loaded, and its overrides applied, as it is defined
        define_config_flag(argv, default_config or str(DEFAULT_CONFIG), values, lock_config=False)
        wants_help = any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv)
        positional = values(argv, known_only=wants_help)[1:]  # --help: the others' values
        config = values.config
        config.to_dict()
    except UserError:
        raise
    except flags.Error as e:
        raise UserError(f"{one_line(e)} (--help lists the flags)") from None
    except Exception as e:  # a config file or an override can raise anything
        raise UserError(config_error(argv, e, keys="--help lists the config keys")) from None
    if wants_help:
        print(_help(doc, values))
        return None
    g.verbose = values.verbose
    if positional:
        raise UserError(f"unexpected argument {positional[0]!r} (--help lists the flags)")
    value = values.workdir
    if not value:
        raise UserError("--workdir is required: the directory the results go to")
    if not value.strip():
        raise UserError(f"--workdir={value!r} is blank; give the directory the results go to")
    g.workdir = Path(value)
    if values["seeds"].present and not values.seeds:
        raise UserError("--seeds is empty; give the seeds, e.g. --seeds=0,1,2")
    seeds = numbers("seeds", values.seeds or ["0", "1", "2"], int, "0,1,2")
    if values.quick:
        seeds = apply_quick(quick, config, argv, seeds, seeds_given=bool(values["seeds"].present))
    shown = ("python " + argv[0]) if argv[0].endswith(".py") else argv[0]
    return Command(values, config, seeds, Path(value), " ".join([shown, *argv[1:]]), argv)


def cli(
    experiment: str,
    run: Callable[..., None],
    *,
    quick: Callable[[ml_collections.ConfigDict], None],
    define: Callable[[Any], None] | None = None,
    doc: str | None = None,
    default_config: str | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    """An experiment script's main: parses its command line (``parse``), validates the
    config, then calls ``run(config=, seeds=, workdir=, quick=, command=, flags=)``. A
    user mistake ends in one line on stderr, anything unexpected in one line naming a
    crash log (``dae_jax.guard``). With ``argv`` it runs in this process and returns the
    exit code; without, it is the program (``sys.argv``) and exits with it."""
    from dae_jax import guard

    name = f"experiments/{experiment}.py"

    def body(g: Any) -> int:
        parsed = parse(
            [name, *(sys.argv[1:] if argv is None else argv)], g, doc=doc or experiment,
            quick=quick, define=define, default_config=default_config,
        )  # fmt: skip
        if parsed is None:
            return 0
        start(g, parsed)
        run(
            config=parsed.config, seeds=parsed.seeds, workdir=parsed.workdir,
            quick=parsed.flags.quick, command=parsed.command, flags=parsed.flags,
        )  # fmt: skip
        print(f"Results: {parsed.workdir / 'results.md'}")
        return 0

    if argv is not None:
        return guard.run(name, body)
    guard.install_excepthook()
    guard.exit_quietly(guard.run(name, body, program=True))
    return 0  # not reached


def start(g: Any, parsed: Command) -> None:
    """Validates the config, loads JAX, prepares the workdir: the work begins."""
    from dae_jax.configs import validate

    g.stage = "checking the config"
    parsed.config = validate(parsed.config)
    g.stage = "loading JAX"
    from dae_jax import engine

    g.begin_work()
    g.stage = f"running {parsed.argv[0]}"
    runfiles.prepare_workdir(parsed.workdir)
    engine.enable_compile_cache(parsed.config.compile_cache)


def quick_or_given(
    values: Any, name: str, quick_value: Any, quick: bool, say: Callable[[str], None] = print
) -> Any:
    """A script flag's value: ``--quick``'s smaller one unless the flag was given (then
    the given value wins); says what it set."""
    holder = values[name]
    if quick and not holder.present:
        shown = ",".join(map(str, quick_value)) if isinstance(quick_value, list) else quick_value
        say(f"--quick set --{name}={shown}")
        return quick_value
    return holder.value


def apply_quick(
    quick: Callable[[ml_collections.ConfigDict], None],
    config: ml_collections.ConfigDict,
    argv: Sequence[str],
    seeds: list[int],
    *,
    seeds_given: bool,
    say: Callable[[str], None] = print,
) -> list[int]:
    """``--quick``: ``quick(config)`` fills the keys the command line did not set (a
    ``--config.KEY`` given wins), one seed unless ``--seeds`` is given; says what it set.
    Returns the seeds."""
    given = {a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")}
    given |= {a[len("-config.") :].split("=", 1)[0] for a in argv if a.startswith("-config.")}
    before = configs.flat(config)
    quick(config)
    changed = {k: v for k, v in configs.flat(config).items() if v != before.get(k)}
    for key in changed.keys() & given:
        configs.set_key(config, key, before[key])
    set_ = [f"{k}={v!r}" for k, v in changed.items() if k not in given]
    kept = [f"{k}={before[k]!r}" for k in changed if k in given]
    if seeds_given:
        kept.append(f"seeds={','.join(map(str, seeds))}")
    elif len(seeds) > 1:
        seeds = seeds[:1]
        set_.append(f"seeds={seeds[0]}")
    say(
        f"--quick set {', '.join(set_) or 'nothing'}"
        + (f" (kept what you gave: {', '.join(kept)})" if kept else "")
    )
    return seeds

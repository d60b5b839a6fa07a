"""The ``dae-jax`` command: ``dae-jax train --workdir=W [--config=NAME|FILE] [--config.key=value]``.

Flags follow the Flax examples' convention (absl flags + ml_collections config files).
Each subcommand takes only the flags that change what it does; any other flag is refused.
A user mistake ends in one line on stderr, ``error: ...``, and exit code 2 (usage)
or 1 (anything else the user must fix); never a traceback: anything unexpected ends in
one line naming a crash log (``dae_jax.guard``). Each flag may be given once: a repeated
flag (``--config.model.hidden`` twice) is refused rather than combined or overridden.

This module imports only the standard library and dae_jax's light modules at import
time: the crash guard is in place before absl, ml_collections and JAX load.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dae_jax
from dae_jax import guard
from dae_jax.errors import UserError, one_line

if TYPE_CHECKING:
    from absl import flags


USAGE = """\
usage: dae-jax train    --workdir=W [--config=NAME|FILE|W0] [--config.KEY=VALUE ...]
       dae-jax evaluate --workdir=W [--noise.kind=KIND] [--noise.level=LEVEL] [--model=K]
       dae-jax denoise  --workdir=W --output=DIR [--invert] [--model=K] IMAGE...
       dae-jax sweep    --workdir=W [--grid=NAME|FILE] [--axis=KEY=V1,V2 ...] [--seeds=0,1,2]
       dae-jax table    W1 [W2 ...] [--csv=FILE]
       dae-jax bench    [--quick] [--workdir=W] [--compare A.json B.json]
       dae-jax COMMAND --help    (that command's flags; train's lists every config key)
       dae-jax --version
       every command takes --verbose (libraries' warnings on stderr, not only in W/logs/);
       each flag may be given once

commands:
  train     train a denoising autoencoder (or resume the workdir's run); writes
            config.json, metrics.jsonl, summary.json, checkpoints/ and figures/
  evaluate  test loss, PSNR and SSIM of the trained model, under its own corruption
            or another; writes W/evaluation/KIND-LEVEL.json
  denoise   denoise image files (PNG/JPEG/TIFF..., any size) into DIR
  sweep     train and score many models: any config key an axis, a product or a named grid
            (noise_sweep, corruption_types, loss_comparison, ...); resumable, extensible
  table     one table of trained runs and sweeps, with the config keys that differ as columns
  bench     training speed (ms/step, share of the measured matmul peak, memory) and
            time to a test PSNR, float32 and bfloat16; --compare A.json B.json

configs by name: --config=default (the default), --config=seed (the tutorial);
or a Python file with get_config(); or a past run's W0/config.json (or W0) to repeat it
example: dae-jax train --workdir=runs/seed --config=seed \\
             --config.data.name=fashion_mnist --config.train.epochs=2
"""

COMMANDS = ("train", "evaluate", "denoise")
# Commands that parse their own flags (each its own ``FlagValues``): the module's
# ``command(argv, guard) -> int`` runs them; its ``main(argv) -> int`` is the same,
# guarded, for tests and scripts.
OWN_FLAGS: dict[str, str] = {
    "sweep": "dae_jax.sweep",
    "table": "dae_jax.table",
    "bench": "dae_jax.bench",
}
# The flags each command takes (besides train's --config.KEY=VALUE overrides).
COMMAND_FLAGS = {
    "train": ("workdir", "config", "verbose"),
    "evaluate": ("workdir", "noise.kind", "noise.level", "model", "verbose"),
    "denoise": ("workdir", "output", "invert", "model", "verbose"),
}
BOOL_FLAGS = ("invert", "verbose", "quick")
# Flags that take a value; given as ``--flag VALUE``, a VALUE that is a flag is refused.
VALUE_FLAGS = ("workdir", "output", "config", "noise.kind", "noise.level", "model", "seeds")
HELP_FLAGS = ("h", "help", "helpshort", "helpfull", "?")


def _config_keys() -> list[tuple[str, str]]:
    """Every key of the default config with its default value, flattened."""

    def walk(node: dict, prefix: str) -> list[tuple[str, str]]:
        rows = []
        for key, value in node.items():
            if isinstance(value, dict):
                rows += walk(value, f"{prefix}{key}.")
            else:
                rows.append((f"{prefix}{key}", repr(value)))
        return rows

    from dae_jax.configs import default

    return walk(default.get_config().to_dict(), "")


def command_help(command: str) -> str:
    """What ``dae-jax COMMAND --help`` prints."""
    from dae_jax import configs

    if command == "train":
        rows = "\n".join(f"  --config.{key}={value}" for key, value in _config_keys())
        return f"""\
usage: dae-jax train --workdir=W [--config=NAME|FILE] [--config.KEY=VALUE ...]

Trains a denoising autoencoder and writes the run to W; run it again on the same W
to resume. Stop with Ctrl-C: a checkpoint is saved first.

flags:
  --workdir=W          the directory the run writes to (required)
  --config=NAME|FILE   a config by name: {", ".join(configs.names())} (default: default);
                       or a Python file with get_config(); or a past run's config.json
                       (or its workdir): repeat it, or vary it with --config.KEY=VALUE
  --config.KEY=VALUE   override one config key (each key once)
  --verbose            libraries' warnings (absl, orbax) on stderr too, not only in W/logs/

config keys, with the default config's values (meanings: dae_jax/configs/default.py):
{rows}
"""
    if command == "evaluate":
        return f"""\
usage: dae-jax evaluate --workdir=W [--noise.kind=KIND] [--noise.level=LEVEL] [--model=K]

Test loss, PSNR and SSIM of W's latest checkpoint, with the run's own config
(W/config.json) and evaluation key; writes W/evaluation/KIND-LEVEL.json.

flags:
  --workdir=W          a trained run (required)
  --noise.kind=KIND    {", ".join(configs.NOISE_KINDS)} (default: the run's)
  --noise.level=LEVEL  Gaussian: standard deviation; the others: fraction of pixels
                       (default: the run's)
  --model=K            a sweep's population (W/models/<kind>-<loss>/): its model K
                       (see W/population.json; default 0)
  --verbose            libraries' warnings on stderr too, not only in W/logs/
"""
    return """\
usage: dae-jax denoise --workdir=W --output=DIR [--invert] [--model=K] IMAGE...

Denoises each image with W's model: converts it to 28x28 grayscale (16-bit and
float images scaled by their range, transparency composited onto black, the aspect
ratio kept by padding with the image's border colour) and writes DIR/NAME.png and
DIR/NAME_comparison.png. Never writes over an input or over a file it did not write.

flags:
  --workdir=W   a trained run (required)
  --output=DIR  where the outputs go (created if missing; required)
  --invert      invert the images first: the model knows light objects on a dark
                background (Fashion-MNIST); use it for dark-on-light images
  --model=K     a sweep's population (W/models/<kind>-<loss>/): its model K (default 0)
  --verbose     libraries' warnings on stderr too, not only in W/logs/
"""


def _define_flags(command: str, argv: list[str]) -> flags.FlagValues:
    """A fresh set of ``command``'s flags; config_flags reads ``argv`` for ``--config.*``.
    A past run's config (``--config=W/config.json``) is taken out of ``argv``: the
    config is defined from it."""
    from absl import flags

    from dae_jax import configs

    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Directory of the run.", flag_values=values)
    flags.DEFINE_bool("verbose", False, "Libraries' warnings on stderr.", flag_values=values)
    if command == "train":
        configs.define_config_flag(argv, str(configs.DEFAULT_CONFIG), values, lock_config=True)
    elif command == "evaluate":
        flags.DEFINE_string(
            "noise.kind", None, "Corruption kind (default: the run's).", flag_values=values
        )
        flags.DEFINE_float(
            "noise.level", None, "Corruption level (default: the run's).", flag_values=values
        )
    else:
        flags.DEFINE_string("output", None, "Directory for the outputs.", flag_values=values)
        flags.DEFINE_bool("invert", False, "Invert the images first.", flag_values=values)
    if command != "train":
        flags.DEFINE_integer(
            "model", 0, "Which model of a sweep's population.", lower_bound=0, flag_values=values
        )
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _flag_names(args: Sequence[str]) -> list[str]:
    """The names of the flags in ``args`` (``--x=1``, ``-x 1``, ``--nox``), up to ``--``."""
    found = []
    for arg in args[1:]:
        if arg == "--":
            break
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            found.append(arg.lstrip("-").split("=", 1)[0])
    return found


def repeated_flag(args: Sequence[str], bools: Sequence[str] = BOOL_FLAGS) -> str | None:
    """Why ``args`` may not run when a flag is given more than once (``--nox`` counts as
    ``--x``): absl would combine a list's values (``--config.model.hidden`` twice trains
    both) or keep the last; neither is what the user meant for sure. None when none is."""
    names = [name[2:] if name[2:] in bools else name for name in _flag_names(args)]
    for name, count in Counter(names).items():
        if count > 1:
            given = [
                a.lstrip("-")
                for a in args[1:]
                if a.lstrip("-").split("=", 1)[0] in (name, f"no{name}")
            ]
            shown = ", ".join(f"--{g}" for g in given)
            return (
                f"--{name} is given {count} times ({shown}); give each flag once "
                "(a repeated flag is refused, not combined or overridden)"
            )
    return None


def swallowed_value(args: Sequence[str]) -> str | None:
    """``--workdir --config=seed``: absl would take the next flag as the value. Refused,
    as is a value-taking flag at the very end (``--workdir``)."""
    for i, arg in enumerate(args[1:], start=1):
        if arg == "--":
            break
        if not arg.startswith("-") or "=" in arg or _is_number(arg):
            continue
        name = arg.lstrip("-")
        if name not in VALUE_FLAGS:
            continue
        after = args[i + 1] if i + 1 < len(args) else None
        if after is None or (after.startswith("-") and not _is_number(after)):
            took = f"the next argument is the flag {after}" if after else "nothing follows it"
            return f"{arg} needs a value ({took}); give {arg}=VALUE"
    return None


def _workdir_problem(value: str | None, positional: Sequence[str], command: str) -> str | None:
    """Why ``--workdir``'s value is not a directory to use: missing, blank, or the next
    flag swallowed (``--workdir --config=seed``)."""
    if value is None or value == "":
        hint = (
            f" (did you mean --workdir={positional[0]}?)"
            if positional and command != "denoise"
            else ""
        )
        return f"--workdir is required: the directory the run writes to{hint}"
    if not value.strip():
        return f"--workdir={value!r} is blank; give the directory the run writes to"
    if value.startswith("-"):
        return f"--workdir needs a value: it took {value!r}, the flag after it; give --workdir=DIR"
    return None


def _refused(command: str, name: str) -> str | None:
    """Why ``--name`` does not apply to ``command`` and what to use instead; None when it
    is one of the command's flags or no command knows it (absl then says so)."""
    if name in COMMAND_FLAGS[command] or (command == "train" and name.startswith("config.")):
        return None
    if name.startswith("no") and name[2:] in COMMAND_FLAGS[command]:
        return None  # --noinvert, --noverbose
    if name == "config" or name.startswith("config."):
        if command == "evaluate":
            instead = (
                f"for other noise use --{name[len('config.') :]}=VALUE"
                if name in ("config.noise.kind", "config.noise.level")
                else "it takes only --noise.kind and --noise.level"
            )
            return (
                f"--{name} does not apply to evaluate: it evaluates the run as trained, with "
                f"its own config (W/config.json); {instead}"
            )
        return (
            f"--{name} does not apply to denoise: it uses the run's model as trained; "
            "it takes only --workdir, --output and --invert"
        )
    if name in ("noise.kind", "noise.level"):
        if command == "train":
            return (
                f"--{name} is a flag of evaluate, not train; to train with other noise use "
                f"--config.{name}=VALUE"
            )
        return (
            f"--{name} does not apply to denoise: it denoises the images as they are; "
            f"to measure the model under other noise use dae-jax evaluate --{name}=VALUE"
        )
    if name in ("output", "invert", "nooutput", "noinvert"):
        return f"--{name} is a flag of denoise, not {command} (dae-jax {command} --help)"
    if name in ("flagfile", "undefok"):
        return (
            f"--{name} is not supported: put the flags on the command line "
            "(and settings in a config file: --config=FILE)"
        )
    return None


def config_error(
    args: Sequence[str],
    error: Exception,
    keys: str = "the keys are listed in dae_jax/configs/default.py",
) -> str:
    """One line for a config that failed to load: an unknown key, or a broken file."""
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in args if a.startswith("--config.")]
    text = str(error)
    for key in overrides:
        if f"'{key.split('.')[-1]}'" in text:
            return f"unknown config key {key!r} (--config.{key}); {keys}"
    cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
    return f"cannot load the --config file: {type(cause).__name__}: {one_line(cause)}"


def _flag_error(command: str, error: Exception) -> str:
    message = one_line(error)
    unknown = re.search(r"Unknown command line flag '([^']+)'", message)
    refused = unknown and _refused(command, unknown.group(1))
    if refused:
        return refused
    match = re.search(r"Unknown command line flag '(config\.[^']+)'", message)
    if match and command == "train":
        return (
            f"unknown config key {match.group(1)[len('config.') :]!r} (--{match.group(1)}); "
            "the keys are listed in dae_jax/configs/default.py"
        )
    return f"{message} (dae-jax {command} --help)"


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _check_backend() -> None:
    """JAX's devices, or one line when the backend JAX_PLATFORMS names cannot start."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        platforms = os.environ.get("JAX_PLATFORMS", "")
        if isinstance(e, AssertionError):  # jax 0.10: a platform with no plugin installed
            reason = "no plugin for it is installed"
        else:
            reason = re.sub(r"\s*\(set JAX_PLATFORMS=.*\)\s*$", "", one_line(e))
        where = f"JAX_PLATFORMS={platforms}" if platforms else "JAX"
        raise UserError(
            f"{where}: JAX cannot start that backend ({reason}); unset JAX_PLATFORMS to use "
            "what this machine has (the CPU at least), or install the backend's jax package, "
            "e.g. pip install 'jax[cuda12]' for NVIDIA GPUs",
            exit_code=1,
        ) from None


def main(argv: Sequence[str], *, program: bool = False) -> int:
    """Runs ``dae-jax`` with ``argv`` under the crash guard; returns the exit code.
    ``program``: this process is the ``dae-jax`` command (see ``guard.run``)."""
    if len(argv) > 2 and argv[1] == "help" and argv[2] in OWN_FLAGS:
        argv = [argv[0], argv[2], "--help"]
    if len(argv) > 1 and argv[1] in OWN_FLAGS:
        import importlib

        name, args = argv[1], [f"dae-jax {argv[1]}", *argv[2:]]
        return guard.run(
            f"dae-jax {name}",
            lambda g: importlib.import_module(OWN_FLAGS[name]).command(args, g),
            program=program,
        )
    command = argv[1] if len(argv) > 1 and argv[1] in COMMANDS else ""
    return guard.run(f"dae-jax {command}".strip(), lambda g: _main(argv, g), program=program)


def _main(argv: Sequence[str], g: guard.Guard) -> int:
    if len(argv) > 2 and argv[1] == "help" and argv[2] in COMMANDS:
        print(command_help(argv[2]), end="")
        return 0
    if len(argv) < 2 or argv[1] in ("-h", "--help", "-help", "help"):
        print(USAGE, end="")
        return 0 if len(argv) >= 2 else 2
    if argv[1] in ("--version", "-version", "version"):
        print(f"dae-jax {dae_jax.__version__}")
        return 0
    command = argv[1]
    if command not in COMMANDS:
        return _error(
            f"unknown command {command!r}; use one of: {', '.join([*COMMANDS, *OWN_FLAGS])} "
            "(dae-jax --help)",
            2,
        )
    g.stage = "reading the command line"
    g.writes_workdir = command == "train"
    args = [argv[0], *argv[2:]]
    names = _flag_names(args)
    if any(name in HELP_FLAGS for name in names):
        print(command_help(command), end="")
        return 0
    if "version" in names:
        print(f"dae-jax {dae_jax.__version__}")
        return 0
    for name in names:
        refused = _refused(command, name)
        if refused:
            return _error(refused, 2)
    problem = repeated_flag(args) or swallowed_value(args)
    if problem:
        return _error(problem, 2)
    from absl import flags

    from dae_jax import configs

    g.stage = "reading the config"
    try:
        if command == "train":
            args = configs.resolve_argv(args)
        FLAGS = _define_flags(command, args)
        positional = FLAGS(args)[1:]
        if command == "train":
            config = FLAGS.config
            config.to_dict()  # a config file may load lazily: surface its errors here
    except UserError as e:
        return _error(str(e), e.exit_code)
    except flags.Error as e:
        return _error(_flag_error(command, e), 2)
    except Exception as e:  # a user's config file can raise anything
        return _error(config_error(args, e), 2)
    g.verbose = FLAGS.verbose
    problem = _workdir_problem(FLAGS.workdir, positional, command)
    if problem:
        return _error(problem, 2)
    g.workdir = Path(FLAGS.workdir)
    if command != "train" and Path(FLAGS.workdir).exists() and not Path(FLAGS.workdir).is_dir():
        return _error(
            f"--workdir={FLAGS.workdir} is a file; give the directory of a trained run", 2
        )
    if command == "denoise":
        if not FLAGS.output or not FLAGS.output.strip() or FLAGS.output.startswith("-"):
            return _error("denoise needs --output=DIR: where the denoised images go", 2)
        if not positional:
            return _error(
                "denoise needs image files: dae-jax denoise --workdir=W --output=DIR a.png", 2
            )
    elif positional:
        return _error(
            f"unexpected argument {positional[0]!r} for {command} (dae-jax {command} --help)", 2
        )
    return _run(command, FLAGS, positional, config if command == "train" else None, g)


def _run(command: str, FLAGS: Any, positional: list[str], config: Any, g: guard.Guard) -> int:
    """A command whose command line is known to be good: the config is checked, then JAX
    loads and the work begins."""
    from dae_jax import configs

    if command == "train":
        g.stage = "checking the config"
        configs.validate(config)  # before the workdir is touched
    else:
        workdir = Path(FLAGS.workdir)
        _refuse_experiment_root(command, workdir)
        g.attach(workdir)  # evaluate and denoise log beside the run they read

    # Imports the training code: only once the command line is known to be good.
    g.stage = "loading JAX"
    from dae_jax import inference, parallel, train

    g.stage = "starting JAX's backend"
    parallel.initialize_distributed()
    _check_backend()
    g.begin_work()
    if command == "train":
        g.stage = "starting the run"
        train.fit(config, FLAGS.workdir)
    elif command == "evaluate":
        g.stage = "evaluating"
        inference.evaluate_workdir(
            FLAGS.workdir,
            noise_kind=FLAGS["noise.kind"].value,
            noise_level=FLAGS["noise.level"].value,
            model=FLAGS.model,
        )
    else:
        g.stage = "denoising"
        inference.denoise_files(
            FLAGS.workdir, FLAGS.output, positional, invert=FLAGS.invert, model=FLAGS.model
        )
    return 0


def _refuse_experiment_root(command: str, workdir: Path) -> None:
    """``evaluate``/``denoise`` on an experiment's workdir name the runs it holds."""
    from dae_jax import runfiles

    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        return
    models = runfiles.experiment_models(workdir)
    if models:
        shown = ", ".join(str(m) for m in models[:6]) + (" ..." if len(models) > 6 else "")
        raise UserError(
            f"{workdir} is an experiment's workdir: its models are in {shown}; "
            f"{command} one of them: dae-jax {command} --workdir={models[0]}"
            + (" --model=K (K: see its population.json)" if len(models) > 1 else "")
            + (" ..." if command == "denoise" else ""),
            exit_code=1,
        )


def run() -> None:
    """Console-script entry point (``dae-jax``, ``python -m dae_jax``)."""
    guard.install_excepthook()
    guard.exit_quietly(main(sys.argv, program=True))

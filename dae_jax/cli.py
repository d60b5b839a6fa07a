"""The ``dae-jax`` command: ``dae-jax train --workdir=W [--config=FILE] [--config.key=value]``.

Flags follow the Flax examples' convention (absl flags + ml_collections config files).
A user mistake ends in one line on stderr, ``error: ...``, and exit code 2 (usage)
or 1 (anything else the user must fix); never a traceback.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dae_jax.errors import Interrupted, UserError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.py"

USAGE = """\
usage: dae-jax train    --workdir=W [--config=FILE] [--config.KEY=VALUE ...]
       dae-jax evaluate --workdir=W [--noise.kind=KIND] [--noise.level=LEVEL]
       dae-jax denoise  --workdir=W --output=DIR IMAGE...

commands:
  train     train a denoising autoencoder (or resume the workdir's run); writes
            config.json, metrics.jsonl, summary.json, checkpoints/ and figures/
  evaluate  test loss, PSNR and SSIM of the trained model, under its own corruption
            or another; writes W/evaluation/KIND-LEVEL.json
  denoise   denoise image files (PNG/JPEG, any size) into DIR

config files: dae_jax/configs/default.py (default), dae_jax/configs/seed.py (the tutorial)
example: dae-jax train --workdir=runs/seed --config=dae_jax/configs/seed.py \\
             --config.data.name=fashion_mnist --config.train.epochs=2
"""

COMMANDS = ("train", "evaluate", "denoise")


def _define_flags(argv: Sequence[str]) -> flags.FlagValues:
    """A fresh set of flags; config_flags reads ``argv`` to know the ``--config.*`` overrides."""
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Directory the run writes to.", flag_values=values)
    config_flags.DEFINE_config_file(
        "config",
        default=str(DEFAULT_CONFIG),
        help_string="A config file with get_config(); override keys with --config.KEY=VALUE.",
        flag_values=values,
        lock_config=True,
        sys_argv=list(argv),
    )
    flags.DEFINE_string("output", None, "denoise: directory for the outputs.", flag_values=values)
    flags.DEFINE_string(
        "noise.kind", None, "evaluate: corruption kind (default: the run's).", flag_values=values
    )
    flags.DEFINE_float(
        "noise.level", None, "evaluate: corruption level (default: the run's).", flag_values=values
    )
    return values


def _config_file_problem(argv: Sequence[str]) -> str | None:
    """What is wrong with the ``--config`` file argument, if anything."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        file = Path(path)
        if not file.is_file():
            return (
                f"--config={path}: no such file; give a Python file with get_config(), "
                "e.g. dae_jax/configs/seed.py"
            )
        try:
            file.read_bytes()
        except OSError as e:
            return f"--config={path} cannot be read ({e.strerror}); check its permissions"
    return None


def _config_error(args: Sequence[str], error: Exception) -> str:
    """One line for a config that failed to load: an unknown key, or a broken file."""
    overrides = [a[len("--config.") :].split("=", 1)[0] for a in args if a.startswith("--config.")]
    text = str(error)
    for key in overrides:
        if f"'{key.split('.')[-1]}'" in text:
            return (
                f"unknown config key {key!r} (--config.{key}); "
                "the keys are listed in dae_jax/configs/default.py"
            )
    cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
    return f"cannot load the --config file: {type(cause).__name__}: {_one_line(cause)}"


def _flag_error(error: Exception) -> str:
    message = _one_line(error)
    match = re.search(r"Unknown command line flag '(config\.[^']+)'", message)
    if match:
        return (
            f"unknown config key {match.group(1)[len('config.') :]!r} (--{match.group(1)}); "
            "the keys are listed in dae_jax/configs/default.py"
        )
    return f"{message} (dae-jax --help)"


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if len(argv) >= 2 else 2
    command = argv[1]
    if command not in COMMANDS:
        return _error(
            f"unknown command {command!r}; use one of: {', '.join(COMMANDS)} (dae-jax --help)", 2
        )
    args = [argv[0], *argv[2:]]
    problem = _config_file_problem(args)
    if problem:
        return _error(problem, 2)
    try:
        FLAGS = _define_flags(args)
        positional = FLAGS(args)[1:]
        config = FLAGS.config
        config.to_dict()  # a config file may load lazily: surface its errors here
    except flags.Error as e:
        return _error(_flag_error(e), 2)
    except Exception as e:  # a user's config file can raise anything
        return _error(_config_error(args, e), 2)
    if not FLAGS.workdir:
        return _error("--workdir is required: the directory the run writes to", 2)
    if command == "denoise":
        if not FLAGS.output:
            return _error("denoise needs --output=DIR: where the denoised images go", 2)
        if not positional:
            return _error(
                "denoise needs image files: dae-jax denoise --workdir=W --output=DIR a.png", 2
            )
    elif positional:
        return _error(f"unexpected argument {positional[0]!r} for {command} (dae-jax --help)", 2)

    # Imports jax: only once the command line is known to be good.
    from absl import logging

    from dae_jax import inference, parallel, train

    logging.set_verbosity(logging.ERROR)  # orbax/tfds chatter is not for the user

    try:
        parallel.initialize_distributed()
        if command == "train":
            train.fit(config, FLAGS.workdir)
        elif command == "evaluate":
            inference.evaluate_workdir(
                FLAGS.workdir,
                noise_kind=FLAGS["noise.kind"].value,
                noise_level=FLAGS["noise.level"].value,
            )
        else:
            inference.denoise_files(FLAGS.workdir, FLAGS.output, positional)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except UserError as e:
        return _error(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _error(
            "interrupted before a checkpoint could be saved; run the same command again to "
            "resume from the last one",
            130,
        )
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))

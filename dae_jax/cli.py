"""The ``dae-jax`` command: ``dae-jax train --workdir=W [--config=FILE] [--config.key=value]``.

Flags follow the Flax examples' convention (absl flags + ml_collections config files).
A user mistake ends in one line on stderr, ``error: ...``, and exit code 2 (usage)
or 1 (anything else the user must fix); never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dae_jax.errors import UserError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.py"

USAGE = """\
usage: dae-jax COMMAND --workdir=W [--config=FILE] [--config.KEY=VALUE ...]

commands:
  train     train a denoising autoencoder; writes config.json, metrics.jsonl,
            summary.json and figures/ to the workdir

config files: dae_jax/configs/default.py (default), dae_jax/configs/seed.py (the tutorial)
example: dae-jax train --workdir=runs/seed --config=dae_jax/configs/seed.py \\
             --config.data.name=fashion_mnist --config.train.epochs=2
"""

COMMANDS = ("train",)

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Directory the run writes to.", flag_values=FLAGS)
config_flags.DEFINE_config_file(
    "config",
    default=str(DEFAULT_CONFIG),
    help_string="A config file with get_config(); override keys with --config.KEY=VALUE.",
    flag_values=FLAGS,
    lock_config=True,
)


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
    try:
        FLAGS.unparse_flags()
        FLAGS([argv[0], *argv[2:]])
        config = FLAGS.config
    except (flags.Error, OSError, ImportError, AttributeError, KeyError, ValueError) as e:
        return _error(f"{_one_line(e)} (dae-jax --help)", 2)
    if not FLAGS.workdir:
        return _error("--workdir is required: the directory the run writes to", 2)

    from dae_jax import train  # imports jax: after the flags are known good

    try:
        train.fit(config, FLAGS.workdir)
    except UserError as e:
        return _error(str(e), e.exit_code)
    except KeyboardInterrupt:
        return _error("interrupted; the workdir keeps what was written so far", 130)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main(sys.argv))

"""dae_jax: denoising autoencoders in JAX/Flax NNX.

``dae_jax.restore(workdir)`` gives a trained run's model, config and epoch
(``model=k`` picks member k of a sweep's population). Importing dae_jax does not
import JAX; ``restore`` does, on first use.
"""

import os
import signal
import sys
from typing import Any

__version__ = "0.1.0"

__all__ = ["Run", "restore", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Run", "restore"):
        from dae_jax import checkpointing

        return getattr(checkpointing, name)
    raise AttributeError(f"module 'dae_jax' has no attribute {name!r}")


def interrupted_while_starting(signum: int, frame: Any) -> None:
    """SIGINT (or SIGTERM) while a dae_jax program loads its libraries: one line and exit
    128 + signum at once. Nothing is written yet, and a KeyboardInterrupt raised inside a
    C extension's import can crash the interpreter. ``dae_jax.guard`` names the stage once
    it runs."""
    guard = sys.modules.get("dae_jax.guard")
    active = getattr(guard, "_active", None)
    if active is not None:
        active.signum = signum
        line = active.interrupted()
    else:
        line = "interrupted while starting (loading its libraries); nothing was written"
    try:
        os.write(2, f"error: {line}\n".encode(errors="backslashreplace"))
    finally:
        os._exit(128 + signum)


def _started_as_program() -> bool:
    """Whether this process is a dae_jax program (``dae-jax``, ``python -m dae_jax...``,
    an ``experiments/*.py`` script), not another program that imports the library."""
    original = list(getattr(sys, "orig_argv", []))
    if "-m" in original[:-1] and original[original.index("-m") + 1].startswith("dae_jax"):
        return True
    program = sys.argv[0] if sys.argv else ""
    if os.path.basename(program) == "dae-jax":
        return True
    return program.endswith(".py") and os.path.basename(os.path.dirname(program)) == "experiments"


# The first code of a dae_jax program that runs: from here on a Ctrl-C is one line, and
# so is an exception nobody catches (an experiment's imports run before its guard does).
if _started_as_program():
    for _signum, _default in ((signal.SIGINT, signal.default_int_handler),
                              (signal.SIGTERM, signal.SIG_DFL)):  # fmt: skip
        if signal.getsignal(_signum) is _default:
            try:
                signal.signal(_signum, interrupted_while_starting)
            except ValueError:  # not the main thread
                pass
    from dae_jax import guard as _guard

    _guard.install_excepthook()

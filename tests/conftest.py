"""Shared fixtures: tiny configs derived from the real default."""

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from dae_jax.configs import default

REPO = Path(__file__).resolve().parents[1]
DAE_JAX = [sys.executable, "-m", "dae_jax"]

# One persistent compilation cache for the whole test session, subprocesses included
# (never the user's): the tests compile the same small programs again and again, and a
# warm cache halves a subprocess's run (a quick sweep: 61 s cold, 35 s warm).
# Subprocesses that import this module (tests.multihost_worker) find it in the environment.
if "DAE_JAX_TESTS_COMPILE_CACHE" not in os.environ:
    os.environ["DAE_JAX_TESTS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="dae_jax_tests_cache_")
    atexit.register(shutil.rmtree, os.environ["DAE_JAX_TESTS_COMPILE_CACHE"], True)
COMPILE_CACHE = os.environ["DAE_JAX_TESTS_COMPILE_CACHE"]


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """A config that trains in about a second: synthetic data, a small MLP."""
    config = default.get_config()
    config.compile_cache = COMPILE_CACHE  # the session's, never the user's
    config.data.name = "synthetic"
    config.data.train_size = 512
    config.data.test_size = 96
    config.model.hidden = (64, 32, 16)
    config.train.epochs = 2
    config.train.batch_size = 64
    config.train.log_every = 3
    config.eval.batch_size = 64
    config.eval.num_figure_images = 5
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


TINY_FLAGS = [
    f"--config.compile_cache={COMPILE_CACHE}",
    "--config.data.name=synthetic",
    "--config.data.train_size=512",
    "--config.data.test_size=96",
    "--config.model.hidden=(64,32,16)",
    "--config.train.epochs=2",
    "--config.train.batch_size=64",
    "--config.train.log_every=3",
    "--config.eval.batch_size=64",
    "--config.eval.num_figure_images=5",
]


def run_python(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``python ARGS`` from the repository root in a fresh process; ``env`` is added
    to this process's environment."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        timeout=timeout,
        check=False,
    )


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Runs ``python -m dae_jax ARGS`` in a fresh process, as a user would."""
    return run_python(*DAE_JAX[1:], *args, timeout=timeout, env=env)


@pytest.fixture
def tiny():
    return tiny_config


@contextlib.contextmanager
def captured() -> Iterator[dict[str, str]]:
    """What this process writes to stdout and stderr meanwhile, Python's and the file
    descriptors' (C++ logs, handlers that kept an old stream) alike, as a subprocess's
    pipes would hold it: ``{"stdout": ..., "stderr": ...}`` once the block ends."""
    out: dict[str, str] = {}
    python = {"stdout": io.StringIO(), "stderr": io.StringIO()}
    with contextlib.ExitStack() as stack:
        files = {}
        for name, fd in (("stdout", 1), ("stderr", 2)):
            getattr(sys, name).flush()
            files[name] = stack.enter_context(tempfile.TemporaryFile(mode="w+b"))
            saved = os.dup(fd)
            os.dup2(files[name].fileno(), fd)
            stack.callback(os.close, saved)
            stack.callback(os.dup2, saved, fd)
        with (
            contextlib.redirect_stdout(python["stdout"]),
            contextlib.redirect_stderr(python["stderr"]),
        ):
            try:
                yield out
            finally:
                for name, file in files.items():
                    file.seek(0)
                    text = file.read().decode(errors="replace")
                    out[name] = python[name].getvalue() + text


def cli_here(*args: str) -> subprocess.CompletedProcess:
    """Runs ``dae-jax ARGS`` in this process: ``cli.main``, what the console script calls
    (its return value is the exit code), with what it printed; as ``run_cli`` gives
    them from a fresh process, without the start-up."""
    from dae_jax import cli

    with captured() as out:
        code = cli.main(["dae-jax", *args])
    return subprocess.CompletedProcess(["dae-jax", *args], code, out["stdout"], out["stderr"])


@dataclass(frozen=True)
class TrainedRun:
    """The session's tiny run: ``dae-jax train --workdir=W`` with ``TINY_FLAGS``."""

    workdir: Path
    result: Any  # what train.fit returned to the command (a train.FitResult)
    cli: subprocess.CompletedProcess  # the command's exit code and output


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TrainedRun:
    """One tiny run trained end to end by the real command, in this process, shared by
    the tests that only read it (they may add evaluation/ files and nothing else)."""
    from dae_jax import train

    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    results = []
    fit = train.fit

    def keep_result(*args, **kwargs):
        results.append(fit(*args, **kwargs))
        return results[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "fit", keep_result)
        result = cli_here("train", f"--workdir={workdir}", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr
    (fitted,) = results
    return TrainedRun(workdir, fitted, result)

"""Shared fixtures: tiny configs derived from the real default."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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

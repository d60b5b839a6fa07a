"""The package as a user gets it: the wheel built from this tree, installed into a fresh
virtual environment, used from a directory outside the repository.

No network: the wheel is built with the running environment's setuptools and installed
with --no-deps --no-index; its dependencies are the running environment's packages, put
on the new environment's path after its own site-packages (a plain path in a .pth file,
so the editable install of dae_jax there is not picked up: the tests check that the
dae_jax they run is the wheel's).
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests.conftest import REPO, TINY_FLAGS


def run(*args: str | Path, cwd: Path | None = None, timeout: float = 180):
    """Runs a command, asserting it succeeds; with ``cwd``, a run of the installed package,
    without PYTHONPATH so nothing from the checkout leaks in."""
    env = dict(os.environ)
    if cwd is not None:
        env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1"},
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("install")
    # Build from a copy, so the build leaves no build/ or *.egg-info in the work tree.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "dae_jax", source / "dae_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    wheels = root / "wheels"
    run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--no-index", "--wheel-dir", wheels, source,
    )  # fmt: skip
    (wheel,) = wheels.glob("dae_jax-0.1.0-py3-none-any.whl")

    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    (Path(purelib.stdout.strip()) / "reuse_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in site.getsitepackages())
    )
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
        "--no-index", wheel,
    )  # fmt: skip
    return venv


@pytest.mark.slow  # the wheel built and installed in a new environment
def test_import_uses_the_wheel_and_not_tensorflow(venv, tmp_path):
    # Every module of the package, not just its __init__: none may pull in TensorFlow.
    probe = (
        "import json, pkgutil, sys, dae_jax\n"
        "for m in pkgutil.walk_packages(dae_jax.__path__, 'dae_jax.'):\n"
        "    if m.name != 'dae_jax.__main__': __import__(m.name)\n"
        "from importlib.metadata import requires\n"
        "print(json.dumps({'file': dae_jax.__file__, 'modules': sorted(sys.modules),\n"
        "                  'requires': requires('dae-jax')}))\n"
    )
    out = json.loads(run(venv / "bin" / "python", "-c", probe, cwd=tmp_path).stdout)
    assert Path(out["file"]).is_relative_to(venv), out["file"]
    assert "dae_jax.train" in out["modules"] and "jax" in out["modules"]
    assert [m for m in out["modules"] if m.split(".")[0] == "tensorflow"] == []
    # The wheel's metadata: TensorFlow only in the tfds-prepare extra.
    names = {r: re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0] for r in out["requires"]}
    tensorflow = [r for r, name in names.items() if name in ("tensorflow", "tensorflow-cpu")]
    assert tensorflow and all('extra == "tfds-prepare"' in r for r in tensorflow), tensorflow


@pytest.mark.slow  # the wheel built and installed in a new environment
def test_console_script_trains_from_another_directory(venv, tmp_path):
    flags = [f for f in TINY_FLAGS if not f.startswith("--config.train.epochs=")]
    run(
        venv / "bin" / "dae-jax", "train", "--workdir=run", "--config=seed", *flags,
        "--config.train.epochs=1", cwd=tmp_path,
    )  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["noise"]["level"] == 1.0  # the tutorial's, from the wheel's seed.py
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_source"] == "synthetic"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("epoch") == 1 and events[-1] == "end"
    assert (tmp_path / "run" / "figures" / "denoising.png").stat().st_size > 0


@pytest.mark.slow  # the wheel built and installed in a new environment
def test_experiments_run_from_the_installed_package(venv, tmp_path):
    """``python -m dae_jax.experiments.NAME`` needs no checkout."""
    script = run(
        venv / "bin" / "python", "-m", "dae_jax.experiments.noise_sweep", "--help", cwd=tmp_path
    )
    assert "--levels" in script.stdout and "--learning_rates" in script.stdout


def test_preparing_without_tensorflow_names_the_extra(tmp_path):
    # What the lean install says when tfds needs TensorFlow to prepare a dataset online.
    import tensorflow_datasets as tfds

    from dae_jax import data
    from dae_jax.errors import UserError

    missing = ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    with (
        mock.patch.object(data, "_reachable", return_value=True),
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", side_effect=missing),
        pytest.raises(UserError) as error,
    ):
        data.load_tfds("mnist", str(tmp_path))
    message = str(error.value)
    assert "needs the module tensorflow" in message
    assert "pip install 'dae-jax[tfds-prepare]'" in message and "make tfds-prepare" in message

"""The compilation cache, the old benchmark script and data-parallel training, run for real."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY_FLAGS, cli_here, run_cli, run_python


def _cache_entries(directory):
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow  # three fresh processes: the cache is read from disk
def test_compile_cache_is_on_by_default_off_on_request_and_reused_by_a_second_run(tmp_path):
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    default_flags = [
        f
        for f in TINY_FLAGS
        if not f.startswith(("--config.compile_cache", "--config.train.epochs"))
    ]
    cache = home / ".cache" / "dae_jax" / "jax_compile_cache"

    def train(name: str, *extra: str) -> subprocess.CompletedProcess:
        result = run_cli(
            "train", f"--workdir={tmp_path / name}", *default_flags, "--config.train.epochs=1",
            *extra, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    train("off", "--config.compile_cache=")
    assert not cache.exists()
    train("on")
    entries = _cache_entries(cache)
    assert entries, "the first run wrote nothing to the compilation cache"
    second = train("again")
    # Every program of the second run came from the cache: nothing new was written.
    assert _cache_entries(cache) == entries
    assert "First training step " in second.stdout
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["time_to_first_step_seconds"] > 0


def test_the_old_benchmark_script_is_dae_jax_bench():
    """experiments/benchmark.py (what `make bench` ran before) runs ``dae-jax bench``;
    its flags are bench's, and one it no longer has is one line."""
    result = run_python("experiments/benchmark.py", "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: dae-jax bench [--quick]")
    result = run_python("experiments/benchmark.py", "--torch_python=python", timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: Unknown command line flag 'torch_python' (dae-jax bench --help)"
    ]


def _train_on(devices: int, workdir, *extra: str) -> subprocess.CompletedProcess:
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    given = {flag.split("=")[0] for flag in extra}  # each flag once: extra wins
    tiny = [flag for flag in TINY_FLAGS if flag.split("=")[0] not in given]
    return run_cli("train", f"--workdir={workdir}", *tiny, *extra, env=env)


@pytest.mark.slow  # a process with 8 simulated devices
def test_data_parallel_over_8_devices_follows_the_single_device_run(tmp_path):
    """The one-device run is ``dae-jax train`` in this process (one CPU device); the
    other a ``dae-jax train`` process started with 8."""
    import jax
    import numpy as np

    import dae_jax

    assert jax.device_count() == 1
    one = cli_here("train", f"--workdir={tmp_path / 'one'}", *TINY_FLAGS)
    eight = _train_on(8, tmp_path / "eight")
    assert one.returncode == 0, one.stderr
    assert eight.returncode == 0, eight.stderr
    assert "Training on one device" in one.stdout
    assert "Training on data-parallel over 8 devices" in eight.stdout

    def epochs(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == "epoch"]

    # Same math, other summation order: equal within float32 round-off (stated: 1e-5).
    for a, b in zip(epochs(tmp_path / "one"), epochs(tmp_path / "eight"), strict=True):
        for key in ("train_loss", "test_loss", "test_psnr_denoised"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    for a, b in zip(
        jax.tree.leaves(dae_jax.restore(tmp_path / "one").model),
        jax.tree.leaves(dae_jax.restore(tmp_path / "eight").model),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a process with 8 simulated devices
def test_batch_must_split_over_the_devices(tmp_path):
    result = _train_on(8, tmp_path / "w", "--config.train.batch_size=60")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.batch_size=60 does not split evenly over 8 devices; use a multiple of 8"
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes that join as one run
@pytest.mark.parametrize("models", [0, 2], ids=["one-model", "sweep"])
def test_two_processes_train_as_one_run(tmp_path, models):
    """A run (or a sweep's population: one model per process) over two processes ends
    with the parameters of the same run in one process (this one: the worker's main,
    which joins nothing without the launcher's variables)."""
    import jax
    import numpy as np

    from tests import multihost_worker

    worker = [sys.executable, "-m", "tests.multihost_worker"]
    extra = [str(models)] if models else []
    assert jax.process_count() == 1 and jax.device_count() == 1
    multihost_worker.main(str(tmp_path / "alone"), str(tmp_path / "alone_{}.npz"), models)

    port = _free_port()
    processes = [
        subprocess.Popen(
            [*worker, str(tmp_path / "together"), str(tmp_path / "together_{}.npz"), *extra],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(rank),
            },
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    layout = (
        "2 devices, 2 model groups x 1 data-parallel" if models else "data-parallel over 2 devices"
    )
    assert f"{layout} (cpu, 2 process(es))" in outputs[0][0]
    assert "Train Epoch" in outputs[0][0]
    assert "Train Epoch" not in outputs[1][0]  # only process 0 speaks and writes

    alone_params = np.load(tmp_path / "alone_0.npz")
    rank0, rank1 = np.load(tmp_path / "together_0.npz"), np.load(tmp_path / "together_1.npz")
    for name in alone_params.files:
        np.testing.assert_array_equal(rank0[name], rank1[name])
        np.testing.assert_allclose(rank0[name], alone_params[name], rtol=1e-4, atol=1e-6)
    # The checkpoint both processes wrote restores to the same parameters.
    import dae_jax

    restored = jax.tree.leaves(
        dae_jax.restore(tmp_path / "together", model=max(models - 1, 0)).model
    )
    for name, leaf in zip(rank0.files, restored, strict=True):
        np.testing.assert_array_equal(rank0[name][-1] if models else rank0[name], leaf)
    events = (tmp_path / "together" / "metrics.jsonl").read_text().splitlines()
    epochs = ["epoch"] * max(models, 1)
    assert [json.loads(e)["event"] for e in events] == ["start", "compile", *epochs, "end"]


def test_incomplete_launcher_environment_is_one_clear_error():
    import pytest

    from dae_jax import parallel
    from dae_jax.errors import UserError

    assert parallel.initialize_distributed({}) is False  # a plain run joins nothing
    with pytest.raises(UserError) as error:
        parallel.initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    assert str(error.value) == (
        "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES and JAX_PROCESS_ID are not: "
        "set all three for a multi-process run, or none"
    )

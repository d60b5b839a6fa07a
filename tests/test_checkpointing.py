"""Checkpoints, exact resume after kill -9 / SIGINT / SIGTERM, damaged checkpoints, NaN."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import dae_jax
from dae_jax import runfiles, train
from tests.conftest import DAE_JAX, REPO, TINY_FLAGS, cli_here, run_cli, tiny_config

EPOCHS = 16  # long enough that a signal lands mid-run, short enough for a test
# Each flag once (a repeated one is refused): TINY_FLAGS less the epochs set here.
ONE_EPOCH_LESS = [f for f in TINY_FLAGS if not f.startswith("--config.train.epochs=")]
RESUME_FLAGS = [*ONE_EPOCH_LESS, f"--config.train.epochs={EPOCHS}"]


def leaves(workdir: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(dae_jax.restore(workdir).model)]


def assert_bit_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def events(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _trained(tmp_path_factory, name: str, flags: list[str]) -> Path:
    """A workdir trained through the CLI with ``flags`` (in this process)."""
    workdir = tmp_path_factory.mktemp(name) / "run"
    result = cli_here("train", f"--workdir={workdir}", *flags)
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the config the resume tests interrupt."""
    return _trained(tmp_path_factory, "reference", RESUME_FLAGS)


@pytest.mark.slow  # two processes of 16 epochs each
def test_two_processes_same_seed_bit_identical(reference, tmp_path):
    result = run_cli("train", f"--workdir={tmp_path / 'again'}", *RESUME_FLAGS)
    assert result.returncode == 0, result.stderr
    assert_bit_identical(leaves(reference), leaves(tmp_path / "again"))


def _start(workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*DAE_JAX, "train", f"--workdir={workdir}", *RESUME_FLAGS],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for_checkpoint(workdir: Path, process: subprocess.Popen) -> None:
    """Until the run has a finished checkpoint (saves are asynchronous) and trains on."""
    deadline = time.monotonic() + 120
    checkpoints = workdir / "checkpoints"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            return
        time.sleep(0.002)
    raise AssertionError("training never saved a checkpoint")


@pytest.mark.slow  # a process stopped by a signal, then resumed by another
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_stopped_run_resumes_bit_identical(reference, tmp_path, signum):
    workdir = tmp_path / "run"
    process = _start(workdir)
    _wait_for_checkpoint(workdir, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert "end" not in [e["event"] for e in events(workdir)], "the run finished before the signal"
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        # A clean stop: a checkpoint at the next chunk boundary and how to go on.
        assert process.returncode == 128 + signum
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(f"stopped by {signal.Signals(signum).name} ")
        assert last.endswith("run the same command again to resume")
        assert "Traceback" not in stderr

    result = run_cli("train", f"--workdir={workdir}", *RESUME_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "Resuming from checkpoint " in result.stdout
    assert_bit_identical(leaves(reference), leaves(workdir))

    # metrics.jsonl parses, and each epoch appears once, as in the uninterrupted run.
    epochs = [e for e in events(workdir) if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    reference_epochs = [e for e in events(reference) if e["event"] == "epoch"]
    assert epochs[-1]["train_loss"] == reference_epochs[-1]["train_loss"]
    assert epochs[-1]["test_loss"] == reference_epochs[-1]["test_loss"]


def test_resume_trains_longer_and_refuses_science_changes(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(**{"train.epochs": 1})
    train.fit(config, run, log=lambda line: None)
    longer = train.fit(tiny_config(**{"train.epochs": 3}), run, log=lambda line: None)
    straight = train.fit(tiny_config(**{"train.epochs": 3}), tmp_path / "x", log=print)
    assert_bit_identical(jax.tree.leaves(longer.state), jax.tree.leaves(straight.state))
    assert longer.summary["resumed_from_step"] == 8

    result = cli_here("train", f"--workdir={run}", *TINY_FLAGS, "--config.noise.level=0.3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir={run} holds a run trained with other settings "
        "(noise.level: 0.5 -> 0.3); resuming would mix two experiments: use a new --workdir, "
        "or the run's own values (only train.epochs, the learning rate and logging, "
        "evaluation and checkpoint settings may change)"
    ]
    # The settings live in the checkpoints: without config.json the change is refused too.
    (run / "config.json").unlink()
    result = cli_here("train", f"--workdir={run}", *TINY_FLAGS, "--config.noise.level=0.3")
    assert result.returncode == 2 and "(noise.level: 0.5 -> 0.3)" in result.stderr


def test_completed_run_is_not_retrained(tmp_path):
    train.fit(tiny_config(**{"train.epochs": 1}), tmp_path, log=lambda line: None)
    lines: list[str] = []
    result = train.fit(tiny_config(**{"train.epochs": 1}), tmp_path, log=lines.append)
    assert result.summary["steps"] == 8
    assert f"{tmp_path} is already trained for 1 epochs; raise --config.train.epochs" in "\n".join(
        lines
    )


def _damage(checkpoint: Path) -> None:
    for path in checkpoint.rglob("*"):
        if path.is_file() and path.parent.name == "d" and "ocdbt.process_0" in str(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# orbax leaves the sibling reads of a failed restore to the garbage collector; dae_jax
# drops their tracebacks for users, but pytest's own hook may see them first.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_and_unfinished_checkpoints_are_skipped(tmp_path):
    workdir = tmp_path / "run"
    train.fit(tiny_config(**{"train.epochs": 3}), workdir, log=lambda line: None)
    checkpoints = workdir / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [8, 16, 24]
    _damage(checkpoints / "24")
    (checkpoints / "32.orbax-checkpoint-tmp-1234").mkdir()  # a save killed half-way

    lines: list[str] = []
    result = train.fit(tiny_config(**{"train.epochs": 4}), workdir, log=lines.append)
    text = "\n".join(lines)
    assert "warning: skipping unfinished checkpoint 32.orbax-checkpoint-tmp-1234" in text
    assert "warning: skipping damaged checkpoint 24 (" in text
    assert f"moved to {workdir / 'damaged_checkpoints' / '24'}" in text
    assert f"Resuming from checkpoint {checkpoints / '16'} (after epoch 2)" in text
    assert (workdir / "damaged_checkpoints" / "24").is_dir()  # set aside, not deleted
    straight = train.fit(tiny_config(**{"train.epochs": 4}), tmp_path / "x", log=print)
    assert_bit_identical(jax.tree.leaves(result.state), jax.tree.leaves(straight.state))


# orbax leaves the sibling reads of a failed restore to the garbage collector; dae_jax
# drops their tracebacks for users, but pytest's own hook may see them first.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_intact_checkpoint_starts_over_after_saying_so(tmp_path):
    train.fit(tiny_config(**{"train.epochs": 1}), tmp_path, log=lambda line: None)
    _damage(tmp_path / "checkpoints" / "8")
    lines: list[str] = []
    train.fit(tiny_config(**{"train.epochs": 1}), tmp_path, log=lines.append)
    text = "\n".join(lines)
    assert f"No intact checkpoint in {tmp_path / 'checkpoints'}: starting over" in text
    backups = list(tmp_path.glob("metrics.*.jsonl"))
    assert len(backups) == 1 and "epoch" in backups[0].read_text()  # the old metrics kept


def test_metrics_rewind_drops_cut_lines_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"event": "start", "step": 0}\n'
        '{"event": "epoch", "epoch": 1, "step": 8}\n'
        '{"event": "epoch", "epoch": 2, "step": 16}\n'
        '{"event": "epo'
    )
    history = runfiles.rewind_metrics(path, 8)
    assert history == [{"epoch": 1, "step": 8}]
    assert (
        path.read_text()
        == '{"event": "start", "step": 0}\n{"event": "epoch", "epoch": 1, "step": 8}\n'
    )


def test_nan_stops_with_one_line_and_keeps_nothing_after_the_last_checkpoint(tmp_path):
    result = cli_here("train", f"--workdir={tmp_path}", *ONE_EPOCH_LESS, "--config.train.epochs=1")
    assert result.returncode == 0, result.stderr
    summary_before = (tmp_path / "summary.json").read_text()

    # Resuming with an absurd learning rate (allowed: it is how one recovers) blows up.
    result = cli_here(
        "train",
        f"--workdir={tmp_path}",
        *ONE_EPOCH_LESS,
        "--config.train.epochs=3",
        "--config.optim.learning_rate=1e30",
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: the loss became nan in epoch 2 at step ")
    assert line.endswith(
        f"Nothing after the last good checkpoint ({tmp_path / 'checkpoints' / '8'}) is kept: "
        "resume from it with a lower --config.optim.learning_rate, or use a new --workdir"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["8"]
    assert [e["epoch"] for e in events(tmp_path) if e["event"] == "epoch"] == [1]
    assert (tmp_path / "summary.json").read_text() == summary_before


def test_nan_before_any_checkpoint(tmp_path):
    result = cli_here(
        "train", f"--workdir={tmp_path}", *TINY_FLAGS, "--config.optim.learning_rate=1e30"
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: the loss became nan in epoch 1 at step ")
    assert line.endswith(
        "No checkpoint was saved: start again with a lower --config.optim.learning_rate"
    )
    assert not (tmp_path / "summary.json").exists()


def test_a_run_saved_before_a_model_key_existed_still_resumes():
    from dae_jax import checkpointing
    from dae_jax.configs import default

    config = default.get_config()
    saved = json.loads(json.dumps(config.to_dict()))
    for key in ("kind", "tied_weights", "channels", "skip", "convs_per_level"):
        del saved["model"][key]  # as written by dae_jax before model kinds existed
    assert checkpointing.science_changes(saved, config) == []
    config.model.kind = "conv"
    assert checkpointing.science_changes(saved, config) == ["model.kind: mlp -> conv"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    return _trained(tmp_path_factory, "two", TINY_FLAGS)


@pytest.mark.slow  # fresh processes: asyncio's tracebacks of a failed read show there
@pytest.mark.parametrize(
    "damaged", ["state/_METADATA", "meta/metadata", "state/ocdbt.process_0/d/*"]
)
def test_a_damaged_file_of_the_newest_checkpoint_costs_one_warning_line(
    two_epochs, tmp_path, damaged
):
    """Half of one file of the newest checkpoint cut off: the run says so in one line,
    resumes from the one before and finishes; no traceback (asyncio's included)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    for path in sorted((workdir / "checkpoints" / "16").glob(damaged)):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli("train", f"--workdir={workdir}", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Task exception" not in result.stderr + result.stdout
    assert "warning: skipping damaged checkpoint 16 (" in result.stdout
    assert f"Resuming from checkpoint {workdir / 'checkpoints' / '8'}" in result.stdout


@pytest.mark.parametrize("record", ["members", "config"])
def test_checkpoints_of_an_earlier_dae_jax_are_refused_in_one_line(tiny_run, tmp_path, record):
    """A checkpoint whose meta has no population or config record (dae_jax before 0.2
    saved one model unstacked, without its config) is refused, naming what to do."""
    import json
    import shutil

    from dae_jax import checkpointing
    from dae_jax.errors import UserError

    workdir = tmp_path / "old"
    shutil.copytree(tiny_run.workdir, workdir)
    for meta_file in (workdir / "checkpoints").glob("*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        del meta[record]
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="checkpoints of an earlier dae_jax .* train the run again"):
        checkpointing.restore(workdir, warn=print)

"""The ``dae-jax`` command as a user runs it: a real tiny training run and its errors."""

import json

import pytest
from PIL import Image

from dae_jax import plots
from tests.conftest import run_cli


def test_tiny_train_run_writes_every_workdir_file(tiny_run):
    """The session's tiny run (conftest.tiny_run: ``dae-jax train`` with TINY_FLAGS, in
    this process); evaluate and denoise use it in test_inference.py."""
    workdir, result = tiny_run.workdir, tiny_run.cli
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Train Epoch: 2 [512/512 (100%)]\tLoss: " in result.stdout

    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["name"] == "synthetic" and config["model"]["hidden"] == [64, 32, 16]

    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "compile", "epoch", "epoch", "end"]
    epochs = [e for e in events if e["event"] == "epoch"]
    for key in (
        "epoch",
        "train_loss",
        "test_loss",
        "test_psnr_noisy",
        "test_psnr_denoised",
        "epoch_seconds",
        "examples_per_second",
    ):
        assert all(key in e for e in epochs), key
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["data_source"] == "synthetic"
    assert summary["final"] == {k: v for k, v in epochs[-1].items() if k != "event"}
    assert summary["steps"] == 16
    assert {"jax", "flax", "optax"} <= set(summary["versions"])
    assert summary["device"]["platform"] == "cpu"

    with Image.open(workdir / "figures" / "denoising.png") as figure:
        assert figure.size == plots.denoising_figure_size(5) == (850, 520)
    with Image.open(workdir / "figures" / "loss.png") as figure:
        assert figure.size == (600, 400)


@pytest.mark.slow  # a fresh process each, which imports JAX to check the config
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (
            "--config.data.name=imagenet",
            "error: config data.name='imagenet' is invalid: must be one of "
            "mnist, fashion_mnist, kmnist, cifar10, svhn_cropped, stl10, celeb_a, folder, "
            "skimage, synthetic",
        ),
        (
            "--config.noise.kind=pink",
            "error: config noise.kind='pink' is invalid: must be one of "
            "gaussian, masking, salt_and_pepper",
        ),
    ],
)
def test_unknown_dataset_or_noise_is_one_line_exit_2(tmp_path, flag, message):
    result = run_cli("train", f"--workdir={tmp_path / 'w'}", flag)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_unknown_command_and_missing_workdir():
    """The real ``python -m dae_jax`` process (no JAX imported: well under a second)."""
    result = run_cli("fly")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown command 'fly'; use one of: train, evaluate, denoise, sweep, table, bench "
        "(dae-jax --help)"
    )
    result = run_cli("train")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --workdir is required: the directory the run writes to"

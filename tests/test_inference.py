"""A trained run used as users do: dae_jax.restore, dae-jax evaluate, dae-jax denoise."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import dae_jax
from dae_jax import data, inference, train
from dae_jax.errors import UserError
from tests.conftest import run_cli, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = train.fit(tiny_config(), workdir, log=lambda line: None)
    return workdir, result


def test_restore_gives_the_trained_model(trained):
    workdir, result = trained
    run = dae_jax.restore(workdir)
    assert (run.epoch, run.step) == (2, 16)
    assert run.config.model.hidden == [64, 32, 16]
    for restored, trained_leaf in zip(
        jax.tree.leaves(run.model), jax.tree.leaves(result.model), strict=True
    ):
        np.testing.assert_array_equal(restored, trained_leaf)
    x = data.load(run.config.data).test_images[:3] / 255.0
    assert run.model.encode(x).shape == (3, 16)
    assert run.model.decode(run.model.encode(x)).shape == (3, 28, 28, 1)
    assert run.model(x.reshape(3, 784)).shape == (3, 784)


def test_evaluate_reproduces_the_last_epoch_and_takes_other_noise(trained):
    workdir, result = trained
    lines: list[str] = []
    record = inference.evaluate_workdir(workdir, say=lines.append)
    final = result.summary["final"]
    for key in ("test_loss", "test_psnr_noisy", "test_psnr_denoised", "test_ssim_denoised"):
        assert record[key] == pytest.approx(final[key], rel=1e-6), key
    written = json.loads((workdir / "evaluation" / "gaussian-0.5.json").read_text())
    assert written == record
    assert "SSIM" in lines[1] and "PSNR" in lines[1]

    masked = inference.evaluate_workdir(
        workdir, noise_kind="masking", noise_level=0.25, say=lambda line: None
    )
    assert masked["noise_kind"] == "masking" and masked["noise_level"] == 0.25
    assert 0 < masked["test_ssim_noisy"] < 1 and np.isfinite(masked["test_psnr_noisy"])
    assert (workdir / "evaluation" / "masking-0.25.json").exists()


def test_evaluate_command_line(trained):
    workdir, _ = trained
    result = run_cli(
        "evaluate", f"--workdir={workdir}", "--noise.kind=salt_and_pepper", "--noise.level=0.1"
    )
    assert result.returncode == 0, result.stderr
    assert "salt_and_pepper noise at level 0.1" in result.stdout
    assert (workdir / "evaluation" / "salt_and_pepper-0.1.json").exists()
    bad = run_cli("evaluate", f"--workdir={workdir}", "--noise.kind=masking", "--noise.level=2")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: config noise.level=2.0 is invalid: masking corrupts a fraction of the pixels: "
        "it must be in [0, 1]"
    ]


def test_denoise_converts_reports_and_goes_on(trained, tmp_path):
    workdir, _ = trained
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "digit.png")
    (tmp_path / "broken.png").write_text("not an image")
    inputs = [tmp_path / "photo.jpg", tmp_path / "broken.png", tmp_path / "digit.png"]
    out = tmp_path / "out"
    warnings: list[str] = []
    with pytest.raises(UserError, match=r"1 of 3 images could not be read \(see above\)"):
        inference.denoise_files(workdir, out, inputs, say=lambda line: None, warn=warnings.append)
    assert warnings[0] == (
        f"warning: {tmp_path / 'photo.jpg'}: converted (mode RGB -> grayscale, size 40x60 -> 28x28)"
    )
    assert warnings[1].startswith(f"error: cannot read image {tmp_path / 'broken.png'}: ")
    assert len(warnings) == 2  # digit.png needed no conversion
    for stem in ("photo", "digit"):
        with Image.open(out / f"{stem}.png") as image:
            assert (image.size, image.mode) == ((28, 28), "L")
        with Image.open(out / f"{stem}_comparison.png") as image:
            assert image.size == (58 * 8, 28 * 8)
    assert not (out / "broken.png").exists()


def test_denoise_command_line_exit_code(trained, tmp_path):
    workdir, _ = trained
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    result = run_cli(
        "denoise",
        f"--workdir={workdir}",
        f"--output={tmp_path / 'o'}",
        str(tmp_path / "a.png"),
        str(tmp_path / "missing.png"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: 1 of 2 images could not be read (see above); the others are in {tmp_path / 'o'}"
    )
    assert (tmp_path / "o" / "a.png").exists()


@pytest.mark.parametrize(
    "model",
    [
        {"tied_weights": True},
        {"kind": "conv", "channels": (4, 8)},
        {"kind": "conv", "channels": (4, 8, 8), "skip": True, "convs_per_level": 2},
    ],
    ids=["mlp-tied", "conv", "conv-skip"],
)
def test_every_model_kind_trains_checkpoints_and_restores(tmp_path, model):
    config = tiny_config(**{f"model.{k}": v for k, v in model.items()})
    config.train.epochs = 1
    result = train.fit(config, tmp_path / "run", log=lambda line: None)
    run = dae_jax.restore(tmp_path / "run")
    assert type(run.model) is type(result.model)
    assert run.config.model.to_dict() == {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.model.to_dict().items()
    }
    for restored, trained_leaf in zip(
        jax.tree.leaves(run.model), jax.tree.leaves(result.model), strict=True
    ):
        np.testing.assert_array_equal(restored, trained_leaf)
    x = data.load(run.config.data).test_images[:3] / 255.0
    assert run.model(x).shape == (3, 28, 28, 1)
    record = inference.evaluate_workdir(tmp_path / "run", say=lambda line: None)
    assert record["test_psnr_denoised"] == pytest.approx(
        result.summary["final"]["test_psnr_denoised"], rel=1e-6
    )

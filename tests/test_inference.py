"""A trained run used as users do: dae_jax.restore, dae-jax evaluate, dae-jax denoise."""

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import dae_jax
from dae_jax import data, inference, train
from dae_jax.errors import UserError
from tests.conftest import cli_here, tiny_config
from tests.test_trust_images import _png_header_only


@pytest.fixture
def trained(tiny_run):
    """The session's tiny run (conftest.tiny_run), trained by ``dae-jax train`` in this
    process: its workdir, and what train.fit returned."""
    return tiny_run.workdir, tiny_run.result


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
    result = cli_here(
        "evaluate", f"--workdir={workdir}", "--noise.kind=salt_and_pepper", "--noise.level=0.1"
    )
    assert result.returncode == 0, result.stderr
    assert "salt_and_pepper noise at level 0.1" in result.stdout
    assert (workdir / "evaluation" / "salt_and_pepper-0.1.json").exists()
    bad = cli_here("evaluate", f"--workdir={workdir}", "--noise.kind=masking", "--noise.level=2")
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
        f"warning: {tmp_path / 'photo.jpg'}: converted (mode RGB -> grayscale, "
        "size 40x60 -> 28x28 (padded to 60x60 first))"
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
    result = cli_here(
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


SLOW = pytest.mark.slow  # in this process, but a conv model trains for ~20 s on 2 CPU cores


@pytest.mark.parametrize(
    "model",
    [
        {"tied_weights": True},
        pytest.param({"kind": "conv", "channels": (4, 8)}, marks=SLOW),
        pytest.param(
            {"kind": "conv", "channels": (4, 8, 8), "skip": True, "convs_per_level": 2}, marks=SLOW
        ),
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


# Issue 11 (trust): denoise never writes over an input, another output or a file it did
# not write; evaluate never loses the metrics it computed.


def _image(path, value: int = 200):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((28, 28), np.uint8)
    pixels[7:21, 7:21] = value
    Image.fromarray(pixels).save(path)
    return path


def test_denoise_never_writes_over_an_input_or_another_output(trained, tmp_path):
    workdir, _ = trained
    p = tmp_path / "p"
    inputs = [
        _image(p / "photo.png", 10),
        _image(tmp_path / "a" / "x.png", 20),
        _image(tmp_path / "b" / "x.png", 30),
        _image(tmp_path / "x.tif", 40),
        _image(p / "foo_comparison.png", 50),
        _image(tmp_path / "foo.png", 60),
    ]
    before = {path: path.read_bytes() for path in inputs}
    lines: list[str] = []
    written = inference.denoise_files(workdir, p, inputs, say=lines.append, warn=lambda line: None)
    assert {path: path.read_bytes() for path in inputs} == before  # no input touched
    assert len(written) == len(set(written)) == 12  # two outputs per input, none shared
    assert lines == [
        f"{p / 'photo.png'} -> {p / 'photo-2.png'}, {p / 'photo-2_comparison.png'} "
        f"({p / 'photo.png'} is an input)",
        f"{inputs[1]} -> {p / 'x.png'}, {p / 'x_comparison.png'}",
        f"{inputs[2]} -> {p / 'x-2.png'}, {p / 'x-2_comparison.png'} "
        f"({p / 'x.png'} is another output)",
        f"{inputs[3]} -> {p / 'x-3.png'}, {p / 'x-3_comparison.png'} "
        f"({p / 'x.png'} is another output)",
        f"{inputs[4]} -> {p / 'foo_comparison-2.png'}, "
        f"{p / 'foo_comparison-2_comparison.png'} ({p / 'foo_comparison.png'} is an input)",
        f"{inputs[5]} -> {p / 'foo-2.png'}, {p / 'foo-2_comparison.png'} "
        f"({p / 'foo_comparison.png'} is an input)",
    ]
    # Each output is its own input's reconstruction: three x inputs, three different outputs.
    outputs = [np.asarray(Image.open(p / f"{n}.png")) for n in ("x", "x-2", "x-3")]
    assert not np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[1], outputs[2])


def test_denoise_again_replaces_its_own_outputs_but_no_other_file(trained, tmp_path):
    workdir, _ = trained
    out = tmp_path / "out"
    image = _image(tmp_path / "shirt.png")
    inference.denoise_files(workdir, out, [image], say=lambda line: None, warn=lambda line: None)
    lines: list[str] = []
    inference.denoise_files(workdir, out, [image], say=lines.append, warn=lambda line: None)
    assert lines == [f"{image} -> {out / 'shirt.png'}, {out / 'shirt_comparison.png'}"]
    (out / "shirt.png").unlink()
    (out / "shirt.png").write_text("the user's own file")
    lines = []
    inference.denoise_files(workdir, out, [image], say=lines.append, warn=lambda line: None)
    assert (out / "shirt.png").read_text() == "the user's own file"
    assert lines == [
        f"{image} -> {out / 'shirt-2.png'}, {out / 'shirt-2_comparison.png'} "
        f"({out / 'shirt.png'} is a file dae-jax denoise did not write)"
    ]


def test_denoise_refuses_a_bad_file_and_goes_on_and_a_bad_output_in_one_line(trained, tmp_path):
    workdir, _ = trained
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)
    good = _image(tmp_path / "good.png")
    warnings: list[str] = []
    with pytest.raises(UserError) as error:
        inference.denoise_files(
            workdir, tmp_path / "o", [bomb, good], say=lambda line: None, warn=warnings.append
        )
    assert warnings == [
        f"error: cannot read image {bomb}: 400,000,000 pixels is more than the 89,478,485 it "
        "reads (a guard against decompression bombs); shrink it first"
    ]
    assert (tmp_path / "o" / "good.png").exists()  # the next file was still processed
    assert str(error.value) == (
        f"1 of 2 images could not be read (see above); the others are in {tmp_path / 'o'}"
    )
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(UserError) as error:
        inference.denoise_files(workdir, afile / "sub", [good], say=lambda line: None)
    assert str(error.value) == (
        f"--output={afile / 'sub'} cannot be created (Not a directory); give a directory you "
        "can write to"
    )
    with pytest.raises(UserError) as error:
        inference.denoise_files(workdir, afile, [good], say=lambda line: None)
    assert str(error.value) == f"--output={afile} is a file; give a directory"
    assert afile.read_text() == "keep me"


def test_denoise_command_line_invert_and_odd_inputs(trained, tmp_path):
    workdir, _ = trained
    ink = np.full((28, 28), 255, np.uint8)
    ink[7:21, 7:21] = 0
    Image.fromarray(ink).save(tmp_path / "ink.png")
    (tmp_path / "empty.png").write_bytes(b"")
    result = cli_here(
        "denoise",
        f"--workdir={workdir}",
        f"--output={tmp_path}",  # the inputs' own directory
        "--invert",
        str(tmp_path / "ink.png"),
        str(tmp_path / "empty.png"),
        str(tmp_path),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"warning: {tmp_path / 'ink.png'}: converted (inverted)",
        f"error: cannot read image {tmp_path / 'empty.png'}: the file is empty",
        f"error: cannot read image {tmp_path}: it is a directory; give image files",
        f"error: 2 of 3 images could not be read (see above); the others are in {tmp_path}",
    ]
    assert result.stdout.strip() == (
        f"{tmp_path / 'ink.png'} -> {tmp_path / 'ink-2.png'}, "
        f"{tmp_path / 'ink-2_comparison.png'} ({tmp_path / 'ink.png'} is an input)"
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ink.png")), ink)
    with Image.open(tmp_path / "ink-2_comparison.png") as comparison:
        left = np.asarray(comparison)[:, : 28 * 8]
    assert left[0, 0] == 0 and left[14 * 8, 14 * 8] == 255  # the input, inverted


def test_evaluate_prints_the_metrics_it_cannot_save(trained, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("evaluation"))
    (copy / "evaluation").write_text("not a directory")  # as a read-only workdir would be
    lines: list[str] = []
    with pytest.raises(UserError) as error:
        inference.evaluate_workdir(copy, say=lines.append)
    assert str(error.value) == (
        f"the metrics above could not be saved to {copy / 'evaluation' / 'gaussian-0.5.json'} "
        "(File exists); they are only printed: make the workdir writable and run evaluate "
        "again to keep them"
    )
    assert error.value.exit_code == 1
    assert "PSNR" in lines[1] and "SSIM" in lines[1]
    assert (copy / "evaluation").read_text() == "not a directory"

"""Images of any size and colour: datasets, patches, fully convolutional models, denoise."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx
from PIL import Image

import dae_jax
from dae_jax import data, engine, inference, models, step, train
from dae_jax.configs import default, validate
from dae_jax.errors import UserError
from tests.conftest import tiny_config


def _data_config(**values) -> ml_collections.ConfigDict:
    config = default.get_config().data
    for key, value in values.items():
        config[key] = value
    return config


def _write(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze() if pixels.shape[-1] == 1 else pixels).save(path)


def _photo(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    return rng.integers(0, 250, (height, width, channels), dtype=np.uint8)


# ------------------------------------------------------------------- datasets


def test_a_folder_with_a_test_subfolder_keeps_sizes_colour_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "train" / "cat" / "a.png", _photo(rng, 40, 60, 3))
    _write(tmp_path / "train" / "cat" / "b.jpg", _photo(rng, 50, 30, 3))
    _write(tmp_path / "train" / "dog" / "c.png", _photo(rng, 40, 60, 1))  # gray -> RGB
    _write(tmp_path / "test" / "cat" / "d.png", _photo(rng, 36, 48, 3))
    _write(tmp_path / "test" / "dog" / "e.png", _photo(rng, 40, 44, 3))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = data.load(_data_config(name="folder", local_dir=str(tmp_path)))
    assert dataset.class_names == ("cat", "dog")
    assert dataset.train_images.shape == (3, 50, 60, 3)  # padded to the largest
    assert dataset.train_sizes is not None
    assert dataset.train_sizes.tolist() == [[40, 60], [50, 30], [40, 60]]
    assert dataset.train_labels.tolist() == [0, 0, 1]
    assert dataset.image_shape == (0, 0, 3)
    assert dataset.min_train_size == 30
    # the gray photo is repeated into three equal channels, padding is zero
    gray = dataset.train_images[2]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (dataset.train_images[1, :, 30:] == 0).all()
    # test photos of different sizes: their common 36x44 centres, said in a note
    assert dataset.test_images.shape == (2, 36, 44, 3)
    assert any("36x44" in note for note in dataset.notes)
    gray_data = data.load(_data_config(name="folder", local_dir=str(tmp_path), channels=1))
    assert gray_data.train_images.shape[-1] == 1 and gray_data.test_images.shape[-1] == 1


def test_a_folder_without_test_subfolder_splits_by_a_stable_hash(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(40):
        _write(tmp_path / f"img{k:02d}.png", _photo(rng, 16, 16, 1))
    config = _data_config(name="folder", local_dir=str(tmp_path), test_fraction=0.25)
    first, again = data.load(config), data.load(config)
    assert len(first.train_images) + len(first.test_images) == 40
    assert 0 < len(first.test_images) < 40
    np.testing.assert_array_equal(first.test_images, again.test_images)
    assert first.train_sizes is None and first.image_shape == (16, 16, 1)
    # adding a file moves none of the others
    _write(tmp_path / "img99.png", _photo(rng, 16, 16, 1))
    more = data.load(config)
    kept = {img.tobytes() for img in first.test_images}
    assert kept <= {img.tobytes() for img in more.test_images}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "has no train images"),
        (["test/a.png"], "has no train images"),
        (["train/a.png"], "has no test images"),
    ],
)
def test_a_folder_without_images_for_a_split_is_refused(tmp_path, files, message):
    (tmp_path / "test").mkdir()
    for name in files:
        _write(tmp_path / name, np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(UserError, match=message):
        data.load(_data_config(name="folder", local_dir=str(tmp_path)))


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="--config.data.local_dir=DIR"):
        data.load(_data_config(name="folder"))
    with pytest.raises(UserError, match="is not a directory"):
        data.load(_data_config(name="folder", local_dir=str(tmp_path / "nope")))
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x.png").write_bytes(b"not a png")
    _write(tmp_path / "a.png", np.zeros((8, 8, 1), np.uint8))
    with pytest.raises(UserError, match=r"cannot read image .*x\.png"):
        data.load(_data_config(name="folder", local_dir=str(tmp_path)))


def test_local_idx_files_are_refused_for_a_colour_tfds_set(tmp_path):
    with pytest.raises(UserError, match="tfds_dir"):
        data.load(_data_config(name="cifar10", local_dir=str(tmp_path)))


def test_skimage_photos_load_offline_in_gray_and_colour():
    gray = data.load(_data_config(name="skimage", channels=1))
    assert len(gray.train_images) == len(data.SKIMAGE_TRAIN)
    assert len(gray.test_images) == len(data.SKIMAGE_TEST)
    assert gray.train_images.shape[-1] == 1 and gray.image_shape == (0, 0, 1)
    assert gray.test_images.shape == (3, 300, 451, 1)  # chelsea is 300x451, the smallest
    colour = data.load(_data_config(name="skimage"))  # astronaut & co are colour: RGB
    assert colour.train_images.shape[-1] == 3
    camera = data.read_photo(data.skimage_photo_dir() / "camera.png")
    assert camera.shape == (512, 512, 1)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("cifar10", (32, 32, 3)), ("svhn_cropped", (32, 32, 3)), ("stl10", (96, 96, 3))],
)
def test_tfds_colour_sets_load_through_the_mock(name, shape):
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load(_data_config(name=name, train_size=10, test_size=4))
    assert dataset.train_images.shape == (10, *shape)
    assert dataset.test_images.shape == (4, *shape)
    assert dataset.train_images.dtype == np.uint8
    assert len(dataset.class_names) == 10


def test_celeb_a_reads_only_the_images_asked_for_and_refuses_a_split_too_large(monkeypatch):
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load(_data_config(name="celeb_a", train_size=3, test_size=2))
        assert dataset.train_images.shape == (3, 218, 178, 3)
        assert dataset.train_labels.tolist() == [0, 0, 0]  # attributes only: one class
        monkeypatch.setattr(data, "MAX_SPLIT_BYTES", 3 * 218 * 178 * 3)
        with pytest.raises(UserError, match=r"--config.data.train_size=N"):
            data.load(_data_config(name="celeb_a", test_size=2))


# -------------------------------------------------------------------- patches


def test_patches_are_slices_inside_each_images_own_size():
    rng = np.random.default_rng(2)
    pixels = np.full((3, 30, 40, 2), 255, np.uint8)  # 255 marks the padding
    sizes = np.asarray([[30, 40], [12, 20], [16, 12]], np.int32)
    for k, (h, w) in enumerate(sizes):
        pixels[k, :h, :w] = rng.integers(0, 250, (h, w, 2))
    images = (jnp.asarray(pixels), jnp.asarray(sizes))
    indices = jnp.asarray([0, 1, 2, 4, 5, 3] * 20)  # beyond 3: the same images again
    patches = np.asarray(step.crop_patches(jax.random.key(0), images, indices, 10, False))
    assert patches.shape == (120, 10, 10, 2) and patches.max() < 255
    for patch, index in zip(patches, np.asarray(indices) % 3, strict=True):
        image = pixels[index]
        found = [
            (y, x)
            for y in range(image.shape[0] - 9)
            for x in range(image.shape[1] - 9)
            if (image[y : y + 10, x : x + 10] == patch).all()
        ]
        assert found, "a patch is not a slice of its image"
    again = np.asarray(step.crop_patches(jax.random.key(0), images, indices, 10, False))
    np.testing.assert_array_equal(patches, again)
    other = np.asarray(step.crop_patches(jax.random.key(1), images, indices, 10, False))
    assert not (patches == other).all()


def test_augmented_patches_are_the_eight_symmetries_of_the_plain_ones():
    pixels = jnp.arange(2 * 8 * 8, dtype=jnp.uint8).reshape(2, 8, 8, 1)
    images = (pixels, jnp.asarray([[8, 8], [8, 8]], jnp.int32))
    indices = jnp.zeros((64,), jnp.int32)  # one image, whole: only the symmetry varies
    patches = np.asarray(step.crop_patches(jax.random.key(3), images, indices, 8, True))
    square = np.asarray(pixels[0, :, :, 0])
    symmetries = [np.rot90(m, k) for m in (square, square.T) for k in range(4)]
    seen = set()
    for patch in patches[..., 0]:
        match = [k for k, s in enumerate(symmetries) if (s == patch).all()]
        assert match
        seen.add(match[0])
    assert len(seen) == 8


@pytest.mark.slow  # a resume test (the slow tier's kind): 15-17 s on 2 cores
def test_patch_training_resumes_bit_exactly(tmp_path):
    config = tiny_config(
        **{
            "model.kind": "dncnn",
            "model.depth": 3,
            "model.features": 8,
            "data.patch_size": 12,
            "data.patches_per_image": 2,
            "data.augment": True,
        }
    )
    straight = train.fit(config, tmp_path / "straight", log=lambda _: None)
    config.train.epochs = 1
    train.fit(config, tmp_path / "resumed", log=lambda _: None)
    config.train.epochs = 2
    resumed = train.fit(config, tmp_path / "resumed", log=lambda _: None)
    for a, b in zip(
        jax.tree.leaves(nnx.state(straight.model)),
        jax.tree.leaves(nnx.state(resumed.model)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    saved = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert saved["data"]["image_shape"] == [28, 28, 1]


def test_an_mlp_on_patches_is_evaluated_on_the_test_images_centres(tmp_path):
    config = tiny_config(**{"data.patch_size": 20})
    result = train.fit(config, tmp_path, log=lambda _: None)
    assert result.model.image_shape == (20, 20, 1)
    assert np.isfinite(result.history[-1]["test_psnr_denoised"])
    dataset = data.synthetic(0, 8, 4)
    resolved = engine.with_image_shape(config, dataset)
    assert step.test_images(dataset, resolved).shape == (4, 20, 20, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.image_shape": (32, 32, 3)}, r"leave data.image_shape=\(\)"),
        ({"data.patch_size": 29}, r"data.patch_size=29 is larger"),
    ],
)
def test_shapes_the_data_cannot_give_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        engine.with_image_shape(tiny_config(**overrides), data.synthetic(0, 8, 4))


def test_images_of_different_sizes_need_patches(tmp_path):
    rng = np.random.default_rng(4)
    _write(tmp_path / "a.png", _photo(rng, 20, 30, 1))
    _write(tmp_path / "b.png", _photo(rng, 24, 20, 1))
    _write(tmp_path / "test" / "c.png", _photo(rng, 20, 20, 1))
    config = tiny_config(**{"data.name": "folder", "data.local_dir": str(tmp_path)})
    dataset = data.load(config.data)
    with pytest.raises(UserError, match=r"differ in size .*--config.data.patch_size=N"):
        engine.with_image_shape(config, dataset)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.channels", 2, "must be 0"),
        ("data.patches_per_image", 4, "1 unless data.patch_size"),
        ("data.augment", True, "False unless data.patch_size"),
        ("data.image_shape", (28, 28, 2), "C 1 or 3"),
        ("data.test_fraction", 1.0, "between 0 and 1"),
        ("model.depth", 1, "from 2 to 100"),
    ],
)
def test_image_config_keys_are_checked(key, value, message):
    with pytest.raises(UserError, match=message):
        validate(tiny_config(**{key: value}))


def test_dncnn_trains_on_mse_only():
    with pytest.raises(UserError, match="dncnn predicts pixels"):
        validate(tiny_config(**{"model.kind": "dncnn", "loss": "bce"}))


# --------------------------------------------------------------------- models


def test_dncnn_subtracts_the_noise_it_predicts_at_any_size():
    model = models.DnCnn(4, 8, image_shape=(40, 40, 3), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 33, 57, 3))
    np.testing.assert_allclose(model.outputs(x), x - model.noise(x), rtol=0, atol=1e-6)
    y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(models.InputError, match="DnCNN has no decoder"):
        model.decode(model.encode(x))


def test_models_refuse_images_they_cannot_take_in_one_line():
    mlp = models.MlpDae((16, 8), rngs=nnx.Rngs(0))
    with pytest.raises(models.InputError, match=r"takes images \[B, 28, 28, 1\]"):
        mlp(jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(models.InputError, match="uint8"):
        mlp(jnp.zeros((1, 28, 28, 1), jnp.uint8))
    conv = models.ConvDae((8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(models.InputError, match=r"\[B, H, W, 1\]"):
        conv(jnp.zeros((1, 32, 32, 3)))
    assert conv(jnp.zeros((2, 45, 61, 1))).shape == (2, 45, 61, 1)


# ----------------------------------------------- colour end to end (the mock)


# A small conv DAE for one epoch on mock CIFAR-10 (colour, 32x32).
CIFAR = {
    "data.name": "cifar10",
    "data.test_size": 16,
    "model.kind": "conv",
    "model.channels": (8, 8),
    "train.epochs": 1,
}


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """A conv DAE trained for one epoch on mock CIFAR-10 (colour, 32x32)."""
    workdir = tmp_path_factory.mktemp("cifar") / "run"
    config = tiny_config(**{**CIFAR, "data.train_size": 128, "train.log_every": 2})
    with tfds.testing.mock_data(num_examples=128):
        result = train.fit(config, workdir, log=lambda _: None)
    return workdir, result


def test_a_colour_tfds_set_trains_end_to_end_with_colour_figures(cifar_run):
    workdir, result = cifar_run
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["image_shape"] == [32, 32, 3]
    assert result.model.image_shape == (32, 32, 3)
    assert np.isfinite(result.history[-1]["test_psnr_denoised"])
    with Image.open(workdir / "figures" / "denoising.png") as figure:
        pixels = np.asarray(figure.convert("RGB"), np.int16)
    # colour images in the figure: some pixels whose channels differ
    assert (np.abs(pixels[..., 0] - pixels[..., 1]) > 30).any()
    restored = dae_jax.restore(workdir)
    x = jax.random.uniform(jax.random.key(0), (1, 70, 90, 3))
    assert restored.model(x).shape == (1, 70, 90, 3)


def test_denoise_keeps_a_large_colour_photos_size_and_colour(cifar_run, tmp_path):
    workdir, _ = cifar_run
    rng = np.random.default_rng(5)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(photo)
    small = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8)).save(small)  # gray
    warnings: list[str] = []
    written = inference.denoise_files(
        workdir, tmp_path / "out", [photo, small], say=lambda _: None, warn=warnings.append
    )
    with Image.open(written[0]) as out:
        assert out.size == (512, 512) and out.mode == "RGB"
    with Image.open(written[2]) as out:
        assert out.size == (50, 30) and out.mode == "RGB"
    assert any("grayscale -> RGB" in w for w in warnings)
    assert not any("dark-on-light" in w for w in warnings)  # no MNIST advice for photos


# ------------------------------------------------------- the natural config and experiment


def test_the_natural_config_is_dncnn_on_skimage_patches_at_sigma_25():
    from dae_jax.configs import names, natural

    assert "natural" in names()
    config = validate(natural.get_config())
    assert (config.model.kind, config.data.name, config.data.patch_size) == ("dncnn", "skimage", 40)
    assert config.noise.level == pytest.approx(25 / 255) and not config.noise.clip


def test_the_natural_images_table_tunes_bm3d_and_averages_seeds():
    from dae_jax.experiments import natural_images

    def row(method, seed, photo, psnr):
        return {
            "level": 25,
            "photo": photo,
            "method": method,
            "seed": seed,
            "psnr": psnr,
            "ssim": 0.5,
        }

    rows = []
    for photo, shift in (("a", 0.0), ("b", 2.0)):
        rows += [
            row("noisy", "", photo, 20 + shift),
            row("median", "", photo, 25 + shift),
            row("bm3d x0.9", "", photo, 28 + shift),
            row("bm3d x1", "", photo, 29 + shift),
            row("bm3d x1.1", "", photo, 28.5 + shift),
            row("dncnn", 0, photo, 28 + shift),
            row("dncnn", 1, photo, 29 + shift),
        ]
    (line,) = natural_images.table(rows)
    assert line["bm3d"]["factor"] == 1.0 and line["bm3d"]["psnr"] == pytest.approx(30.0)
    assert line["dncnn"]["psnr"] == pytest.approx(29.5)
    assert line["dncnn"]["psnr_std"] == pytest.approx(0.5)
    assert line["gap"] == pytest.approx(-0.5) and line["seeds"] == 2
    text = natural_images.markdown([line], "# header")
    assert "| 25 | 21.00 / 0.500 | 26.00 / 0.500 | 30.00 / 0.500 (x1) |" in text
    assert "-0.50 dB" in text


@pytest.mark.slow
def test_natural_images_quick_runs_scores_whole_photos_and_resumes(tmp_path):
    from tests.conftest import COMPILE_CACHE, run_python

    args = (
        "experiments/natural_images.py",
        f"--workdir={tmp_path}",
        "--quick",
        f"--config.compile_cache={COMPILE_CACHE}",
    )
    first = run_python(*args, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "scored camera at sigma 25/255" in first.stdout
    rows = list(csv_rows(tmp_path / "results.csv"))
    photos = {(r["photo"], r["height"], r["width"]) for r in rows}
    assert photos == {("camera", "512", "512"), ("coffee", "400", "600"), ("chelsea", "300", "451")}
    assert {r["method"] for r in rows} == {"noisy", "median", "bm3d x1", "dncnn"}
    assert "| 25 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "figures" / "crops.png").stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    again = run_python(*args, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "scored" not in again.stdout  # the scores were kept
    assert (tmp_path / "results.md").read_text() == table


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def test_a_conv_population_on_cpu_trains_its_members_one_after_another_as_single_runs(tmp_path):
    config = tiny_config(
        **{
            "model.kind": "dncnn",
            "model.depth": 3,
            "model.features": 4,
            "data.train_size": 128,
            "train.epochs": 1,
        }
    )
    setup = step.Setup.from_config(config, step.abstract_state(config)[0])
    assert setup.members_in_sequence  # vmap would make grouped convolutions, slow on CPU
    # One seed: synthetic data is drawn from the config's seed, so another would change it.
    many = train.fit_many(config, seeds=[0, 0], levels=[0.5, 0.2], log=lambda _: None)
    for k, (seed, level) in enumerate([(0, 0.5), (0, 0.2)]):
        config.seed, config.noise.level = seed, level
        single = train.fit(config, tmp_path / str(k), log=lambda _: None)
        assert many.final(k)["train_loss"] == single.history[-1]["train_loss"]
        for a, b in zip(
            jax.tree.leaves(nnx.state(many.model(k))),
            jax.tree.leaves(nnx.state(single.model)),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_sweep_runs_on_colour_images_with_bm3d_in_colour(tmp_path):
    from dae_jax import sweep

    config = tiny_config(**{**CIFAR, "data.train_size": 64, "model.channels": (4, 8)})
    with tfds.testing.mock_data(num_examples=64):
        rows = sweep.run(
            "noise_sweep", config, {"noise.level": [0.2]}, [0], tmp_path, log=lambda _: None
        )
    bm3d = [r for r in rows if r["model"] == "bm3d" and r["metric"] == "psnr"]
    assert bm3d and all(np.isfinite(r["value"]) for r in bm3d)
    assert any(r["model"] == "noise.level=0.2" and r["metric"] == "psnr" for r in rows)
    with Image.open(tmp_path / "figures" / "reconstructions.png") as figure:
        pixels = np.asarray(figure.convert("RGB"), np.int16)
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 30).any()  # colour, not gray

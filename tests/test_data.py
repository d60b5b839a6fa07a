import gzip
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dae_jax import data
from dae_jax.configs import default
from dae_jax.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, *, gz: bool, n_train=20, n_test=7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        payload = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / stem).write_bytes(payload)
    return arrays


def data_config(**values):
    config = default.get_config().data
    config.update(values)
    return config


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    arrays = write_idx_dir(tmp_path, gz=gz)
    dataset = data.load(data_config(name="mnist", local_dir=str(tmp_path)))
    assert dataset.source == f"idx:{tmp_path}"
    assert dataset.train_images.shape == (20, 28, 28, 1)
    assert dataset.train_images.dtype == np.uint8
    np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.test_labels.dtype == np.int32
    assert dataset.class_names[3] == "3"


def test_idx_files_of_another_dataset_are_refused(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    labels = np.array([9, 0, 0, 3, 0, 2, 7, 2, 5, 5] + [1] * 10, np.uint8)  # Fashion-MNIST's
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UserError, match="holds fashion_mnist's IDX files .* not mnist's: give "):
        data.load(data_config(name="mnist", local_dir=str(tmp_path)))
    assert data.load(data_config(name="fashion_mnist", local_dir=str(tmp_path))).name == (
        "fashion_mnist"
    )


def test_subset_sizes(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    dataset = data.load(
        data_config(name="mnist", local_dir=str(tmp_path), train_size=5, test_size=2)
    )
    assert (len(dataset.train_images), len(dataset.test_labels)) == (5, 2)


def test_missing_file_is_named(tmp_path):
    write_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="has no t10k-labels-idx1-ubyte"):
        data.load(data_config(name="mnist", local_dir=str(tmp_path)))


def test_wrong_magic_and_truncation_and_count_mismatch(tmp_path):
    write_idx_dir(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])
    with pytest.raises(UserError, match=r"not an IDX images file: magic number 0x00000801"):
        data.load(data_config(name="mnist", local_dir=str(tmp_path)))
    images.write_bytes(good[:-100])
    with pytest.raises(UserError, match=r"truncated or padded: 15580 bytes of data"):
        data.load(data_config(name="mnist", local_dir=str(tmp_path)))
    images.write_bytes(good)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(UserError, match="7 test images but 3 labels"):
        data.load(data_config(name="mnist", local_dir=str(tmp_path)))


def test_local_dir_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        data.load(data_config(name="mnist", local_dir=str(tmp_path / "nope")))


def test_synthetic_is_deterministic_and_seeded():
    a = data.load(data_config(name="synthetic", train_size=64, test_size=16), seed=0)
    b = data.load(data_config(name="synthetic", train_size=64, test_size=16), seed=0)
    c = data.load(data_config(name="synthetic", train_size=64, test_size=16), seed=1)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (64, 28, 28, 1) and a.train_images.dtype == np.uint8
    assert set(np.unique(a.train_labels)) <= set(range(10))
    assert a.train_images.max() > 100  # real contrast, not an empty image


def test_tfds_path_under_mock_data(tmp_path):
    with (
        tfds.testing.mock_data(num_examples=9),
        mock.patch.object(data, "_reachable", return_value=True),
    ):
        dataset = data.load(data_config(name="kmnist", tfds_dir=str(tmp_path)))
    assert dataset.source.startswith("tfds:")
    assert dataset.train_images.shape == (9, 28, 28, 1) and dataset.train_images.dtype == np.uint8
    assert dataset.test_labels.shape == (9,)
    assert dataset.class_names[0] == "o"


def test_offline_without_prepared_copy_fails_fast_with_both_remedies(tmp_path):
    with mock.patch.object(data, "_reachable", return_value=False):
        with pytest.raises(UserError) as error:
            data.load(data_config(name="mnist", tfds_dir=str(tmp_path)))
    message = str(error.value)
    assert "dataset 'mnist' is not available offline" in message
    assert "--config.data.local_dir=DIR" in message and "--config.data.tfds_dir=DIR" in message
    assert "\n" not in message


def test_unknown_dataset():
    with pytest.raises(UserError, match="data.name='cifar' is not a known dataset"):
        data.load(data_config(name="cifar"))

"""Datasets of 28x28 grayscale images as uint8 arrays with labels.

Sources, first that works: the four standard IDX files in ``data.local_dir``
(or, for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` directory); a prepared
tensorflow-datasets copy (downloaded and prepared when the machine is online);
else one clear error saying how to provide the data. ``synthetic`` is generated.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import socket
import urllib.parse
from pathlib import Path

import numpy as np

from dae_jax.errors import UserError

TFDS_NAMES = ("mnist", "fashion_mnist", "kmnist")
NAMES = (*TFDS_NAMES, "synthetic")

# Where Debian's dataset packages put the IDX files, found without any flag.
SYSTEM_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}

CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    "synthetic": tuple(f"pattern {k}" for k in range(10)),
}

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}

SYNTHETIC_TRAIN_SIZE = 4096
SYNTHETIC_TEST_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits; images uint8 ``[N, 28, 28, 1]``, labels int32 ``[N]``."""

    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------- IDX


def read_idx(path: Path, kind: str) -> np.ndarray:
    """Reads one IDX file (gzip or raw) of unsigned bytes, checking magic and length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read IDX file {path}: {e}; replace the file") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != _IDX_MAGIC[kind]:
        found = "none (file too short)" if magic is None else f"0x{magic:08x}"
        raise UserError(
            f"{path} is not an IDX {kind} file: magic number {found}, expected "
            f"0x{_IDX_MAGIC[kind]:08x}; replace the file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise UserError(
            f"{path} is truncated or padded: {len(raw) - header} bytes of data, the header "
            f"promises {expected} ({'x'.join(map(str, dims))}); replace the file"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_path(directory: Path, stem: str) -> Path | None:
    # Mirrors spell the files with '-' or '.' before 'idx'; some ship them unzipped.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            path = directory / (name + suffix)
            if path.is_file():
                return path
    return None


def load_idx_dir(directory: Path, name: str) -> Dataset:
    """The dataset in ``directory``: the four standard IDX files, ``.gz`` or raw."""
    if not directory.is_dir():
        raise UserError(
            f"data.local_dir={directory} is not a directory; give the directory that holds "
            f"{IDX_FILES[('train', 'images')]}[.gz] and the three other IDX files"
        )
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for (split, kind), stem in IDX_FILES.items():
        path = _idx_path(directory, stem)
        if path is None:
            raise UserError(
                f"{directory} has no {stem} (nor {stem}.gz); it needs the four IDX files "
                f"{', '.join(IDX_FILES.values())}"
            )
        arrays[split, kind] = read_idx(path, kind)
    for split in ("train", "test"):
        images, labels = arrays[split, "images"], arrays[split, "labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise UserError(
                f"{directory}: {split} images have shape {images.shape}, expected [N, 28, 28]"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{directory}: {len(images)} {split} images but {len(labels)} labels; "
                "the files belong to different datasets"
            )
    return Dataset(
        name=name,
        source=f"idx:{directory}",
        train_images=arrays["train", "images"][..., None],
        train_labels=arrays["train", "labels"].astype(np.int32),
        test_images=arrays["test", "images"][..., None],
        test_labels=arrays["test", "labels"].astype(np.int32),
        class_names=CLASS_NAMES.get(name, tuple(str(k) for k in range(10))),
    )


# -------------------------------------------------------------------------- tfds


def _offline_error(name: str, why: str) -> UserError:
    return UserError(
        f"dataset '{name}' is not available offline ({why}): put its four IDX files in a "
        f"directory and pass --config.data.local_dir=DIR, or prepare it with tensorflow-datasets "
        f"on a machine with internet and pass --config.data.tfds_dir=DIR",
        exit_code=1,
    )


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the download host answers, so an offline machine fails in seconds, not minutes."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.hostname:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_tfds_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        labels = np.asarray([int(r["label"]) for r in records], np.int32)
    except NotImplementedError:
        # Prepared in TFRecord format (as `tfds.load` does by default): TensorFlow reads it.
        import tensorflow_datasets as tfds

        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = batch["image"].astype(np.uint8), batch["label"].astype(np.int32)
    return images.reshape(-1, 28, 28, 1), labels


def load_tfds(name: str, data_dir: str | None) -> Dataset:
    """Reads a prepared tfds dataset; downloads and prepares it first when online.

    Prepares in ArrayRecord format, which ``tfds.data_source`` reads without TensorFlow;
    preparing itself needs TensorFlow: the ``tfds-prepare`` extra (``make tfds-prepare``).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        if not _reachable(getattr(type(builder), "URL", "")):
            raise _offline_error(name, f"no prepared copy in {builder.data_dir} and no network")
        try:
            builder.download_and_prepare()
        except ImportError as e:
            raise UserError(
                f"preparing '{name}' with tensorflow-datasets needs the module {e.name} "
                "(an optional extra): pip install 'dae-jax[tfds-prepare]' "
                "(or `make tfds-prepare` in the repository)",
                exit_code=1,
            ) from None
        except OSError as e:
            raise _offline_error(name, f"download failed: {_first_line(e)}") from None
    train_images, train_labels = _read_tfds_split(builder, "train")
    test_images, test_labels = _read_tfds_split(builder, "test")
    return Dataset(
        name=name,
        source=f"tfds:{builder.data_dir}",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=CLASS_NAMES[name],
    )


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------- synthetic


def synthetic(seed: int, train_size: int, test_size: int) -> Dataset:
    """Ten classes of blurry three-blob patterns with random shifts and contrast.

    Small, learnable and linearly separable enough for tests and smoke runs. The
    class prototypes are fixed; ``seed`` draws the examples.
    """
    prototype_rng = np.random.default_rng(12345)
    grid = np.stack(np.meshgrid(np.arange(28), np.arange(28), indexing="ij"), axis=-1)
    prototypes = []
    for _ in range(10):
        centres = prototype_rng.uniform(6, 22, size=(3, 2))
        widths = prototype_rng.uniform(1.5, 3.5, size=3)
        d2 = ((grid[None] - centres[:, None, None]) ** 2).sum(-1)
        prototypes.append(np.exp(-d2 / (2 * widths[:, None, None] ** 2)).max(0))
    prototype_stack = np.stack(prototypes)

    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, size=n).astype(np.int32)
        shifts = rng.integers(-2, 3, size=(n, 2))
        contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1))
        images = np.stack(
            [
                np.roll(prototype_stack[label], tuple(shift), axis=(0, 1))
                for label, shift in zip(labels, shifts, strict=True)
            ]
        )
        images = np.clip(images * contrast * 255.0, 0, 255).astype(np.uint8)
        return images[..., None], labels

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    return Dataset(
        name="synthetic",
        source="synthetic",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=CLASS_NAMES["synthetic"],
    )


# -------------------------------------------------------------------------- load


def _subset(dataset: Dataset, train_size: int, test_size: int) -> Dataset:
    train = slice(None, train_size or None)
    test = slice(None, test_size or None)
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[train],
        train_labels=dataset.train_labels[train],
        test_images=dataset.test_images[test],
        test_labels=dataset.test_labels[test],
    )


def load(data_config, seed: int = 0) -> Dataset:
    """The dataset ``data_config`` names, from the first source that has it."""
    name = data_config.name
    if name not in NAMES:
        raise UserError(f"data.name={name!r} is not a known dataset; use one of {', '.join(NAMES)}")
    if name == "synthetic":
        return synthetic(
            seed,
            data_config.train_size or SYNTHETIC_TRAIN_SIZE,
            data_config.test_size or SYNTHETIC_TEST_SIZE,
        )
    if data_config.local_dir:
        dataset = load_idx_dir(Path(os.path.expanduser(data_config.local_dir)), name)
    elif name in SYSTEM_DIRS and _idx_path(SYSTEM_DIRS[name], IDX_FILES["train", "images"]):
        dataset = load_idx_dir(SYSTEM_DIRS[name], name)
    else:
        dataset = load_tfds(name, data_config.tfds_dir or None)
    return _subset(dataset, data_config.train_size, data_config.test_size)

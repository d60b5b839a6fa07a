"""Datasets of images ``[N, H, W, C]`` (C = 1 or 3) as uint8 arrays with labels.

Sources, first that works: for the MNIST family, the four standard IDX files in
``data.local_dir`` (or, for Fashion-MNIST, Debian's ``dataset-fashion-mnist``
directory); for every tfds name, a prepared tensorflow-datasets copy (downloaded and
prepared when the machine is online); else one clear error saying how to provide the
data. ``folder`` reads the PNG/JPEG files of ``data.local_dir``, ``skimage`` the natural
photos scikit-image's wheel ships, ``synthetic`` is generated.

Images of different sizes (photos) are kept whole: the training images padded into one
array with their sizes beside them (``Dataset.train_sizes``; training crops patches
inside each image's own size), the test images cut to their common centre.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import os
import socket
import urllib.parse
import zlib
from pathlib import Path

import numpy as np

from dae_jax.errors import UserError, first_line

IDX_NAMES = ("mnist", "fashion_mnist", "kmnist")  # also readable from local IDX files
TFDS_NAMES = (*IDX_NAMES, "cifar10", "svhn_cropped", "stl10", "celeb_a")
NAMES = (*TFDS_NAMES, "folder", "skimage", "synthetic")
# A tfds split held in memory as uint8 beyond this is refused (celeb_a's train split is
# ~19 GB): data.train_size / data.test_size read the first N images only.
MAX_SPLIT_BYTES = 8 * 2**30

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
    """Train and test splits; images uint8 ``[N, H, W, C]``, labels int32 ``[N]``.

    ``train_sizes`` (int32 ``[N, 2]``: height, width) is set when the training images
    differ in size: each is then padded with zeros at its bottom and right into the
    array, and only patches inside its own size are trained on. ``notes`` says what
    loading changed (colour, crops), for the log."""

    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    train_sizes: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images; ``H = W = 0`` when the training images vary."""
        height, width, channels = self.train_images.shape[1:]
        return (0, 0, channels) if self.train_sizes is not None else (height, width, channels)

    @property
    def min_train_size(self) -> int:
        """The shortest side among the training images."""
        if self.train_sizes is not None:
            return int(self.train_sizes.min())
        return int(min(self.train_images.shape[1:3]))


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


# The first ten training labels of the real files: IDX files of one dataset given under
# another's name are refused (they would train and be reported as the wrong dataset).
FINGERPRINTS = {
    "mnist": (5, 0, 4, 1, 9, 2, 1, 3, 1, 4),
    "fashion_mnist": (9, 0, 0, 3, 0, 2, 7, 2, 5, 5),
}


def _check_fingerprint(directory: Path, name: str, labels: np.ndarray) -> None:
    first = tuple(int(v) for v in labels[:10])
    for other, fingerprint in FINGERPRINTS.items():
        if other != name and first == fingerprint:
            raise UserError(
                f"data.local_dir={directory} holds {other}'s IDX files (its first training "
                f"labels), not {name}'s: give --config.data.name={other}, or the directory "
                f"of {name}'s files"
            )


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
        if images.ndim != 3 or 0 in images.shape[1:]:
            raise UserError(
                f"{directory}: {split} images have shape {images.shape}, expected [N, H, W]"
            )
        if len(images) != len(labels):
            raise UserError(
                f"{directory}: {len(images)} {split} images but {len(labels)} labels; "
                "the files belong to different datasets"
            )
    _check_fingerprint(directory, name, arrays["train", "labels"])
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
    local = (
        "put its four IDX files in a directory and pass --config.data.local_dir=DIR, or "
        if name in IDX_NAMES
        else ""
    )
    return UserError(
        f"dataset '{name}' is not available offline ({why}): {local}prepare it with "
        f"tensorflow-datasets on a machine with internet and pass --config.data.tfds_dir=DIR",
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


def _label(record: dict) -> int:
    return int(record["label"]) if "label" in record else 0  # celeb_a: attributes only


def _read_tfds_split(builder, split: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` (0 = all) images and labels of ``split``, as uint8 ``[N, H, W, C]``."""
    name = builder.info.name
    shape = builder.info.features["image"].shape
    try:
        source = builder.as_data_source(split=split)
        count = min(limit, len(source)) if limit else len(source)
        _check_split_size(name, split, count, shape)
        records = [source[i] for i in range(count)]
        images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
        labels = np.asarray([_label(r) for r in records], np.int32)
    except NotImplementedError:
        # Prepared in TFRecord format (as `tfds.load` does by default): TensorFlow reads it.
        import tensorflow_datasets as tfds

        part = f"{split}[:{limit}]" if limit else split
        batch = tfds.as_numpy(builder.as_dataset(split=part, batch_size=-1))
        images = batch["image"].astype(np.uint8)
        labels = (
            batch["label"].astype(np.int32) if "label" in batch else np.zeros(len(images), np.int32)
        )
    if images.ndim == 3:
        images = images[..., None]
    return images, labels


def _check_split_size(name: str, split: str, count: int, shape: tuple) -> None:
    size = count * math.prod(int(n or 1) for n in shape)
    if size > MAX_SPLIT_BYTES:
        key = "train_size" if split == "train" else "test_size"
        raise UserError(
            f"the {split} split of {name} is {size / 2**30:.1f} GiB as uint8 ({count} images "
            f"of {'x'.join(map(str, shape))}), more than the {MAX_SPLIT_BYTES / 2**30:.0f} GiB "
            f"this loads into memory; read its first images only: --config.data.{key}=N"
        )


def _class_names(builder) -> tuple[str, ...]:
    features = builder.info.features
    names = getattr(features["label"], "names", None) if "label" in features.keys() else None
    return tuple(names) if names else ("image",)


def load_tfds(name: str, data_dir: str | None, train_size: int = 0, test_size: int = 0) -> Dataset:
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
            raise _offline_error(name, f"download failed: {first_line(e)}") from None
    train_images, train_labels = _read_tfds_split(builder, "train", train_size)
    test_images, test_labels = _read_tfds_split(builder, "test", test_size)
    return Dataset(
        name=name,
        source=f"tfds:{builder.data_dir}",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=CLASS_NAMES.get(name) or _class_names(builder),
    )


# ------------------------------------------------------------------------ photos

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# scikit-image's wheel ships these photos in skimage/data/ (no download). Test: three
# photos of different content and size, the cameraman among them (as in Set12); train:
# the other natural photos and textures (motorcycle_right, the stereo twin of
# motorcycle_left, the drawings, charts, synthetic images and the large, mostly black
# retina photo are left out).
SKIMAGE_TEST = ("camera.png", "coffee.png", "chelsea.png")
SKIMAGE_TRAIN = (
    "astronaut.png",
    "brick.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "moon.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "page.png",
)


def read_photo(path: Path) -> np.ndarray:
    """One image file as uint8 ``[H, W, C]`` (C = 1 or 3), upright by its EXIF
    orientation; 16-bit images scaled to 8 bits, alpha dropped, palettes expanded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I;16") or image.mode == "I":
                pixels = np.asarray(image, np.float64)
                scale = 255.0 if pixels.max() <= 255 else 65535.0
                return np.round(pixels / scale * 255).astype(np.uint8)[..., None]
            if image.mode in ("1", "L", "LA", "F"):
                pixels = np.asarray(image.convert("L"), np.uint8)
            else:  # a gray image stored as colour (or a gray palette) stays gray
                pixels = np.asarray(image.convert("RGB"), np.uint8)
                if (pixels == pixels[..., :1]).all():
                    pixels = pixels[..., 0]
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(
            f"cannot read image {path} ({first_line(e)}); remove or replace it"
        ) from None
    return pixels[..., None] if pixels.ndim == 2 else pixels


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[..., C]`` images with ``channels`` channels: gray -> RGB repeats the
    channel, RGB -> gray is ITU-R 601 luma (as Pillow's ``L``); 0 keeps them."""
    have = images.shape[-1]
    if channels in (0, have):
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = images.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def _stack_photos(photos: list[np.ndarray], channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Photos as one uint8 array: stacked when of one size, else padded with zeros at the
    bottom and right, with their ``[N, 2]`` sizes."""
    photos = [to_channels(p, channels) for p in photos]
    sizes = np.asarray([p.shape[:2] for p in photos], np.int32)
    if (sizes == sizes[0]).all():
        return np.stack(photos), None
    height, width = sizes.max(axis=0)
    out = np.zeros((len(photos), height, width, channels), np.uint8)
    for k, photo in enumerate(photos):
        out[k, : photo.shape[0], : photo.shape[1]] = photo
    return out, sizes


def centre_crop(photos: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """The ``height x width`` centre of each photo, stacked."""
    out = []
    for photo in photos:
        top, left = (photo.shape[0] - height) // 2, (photo.shape[1] - width) // 2
        out.append(photo[top : top + height, left : left + width])
    return np.stack(out)


def _photo_dataset(
    name: str,
    source: str,
    train: list[tuple[np.ndarray, str]],
    test: list[tuple[np.ndarray, str]],
    channels: int,
) -> Dataset:
    """A dataset from photos with class names: the training photos kept whole (padded,
    with their sizes), the test photos cut to their common centre when sizes differ."""
    if not channels:  # colour when any photo is
        channels = 3 if any(p.shape[-1] == 3 for p, _ in (*train, *test)) else 1
    classes = sorted({c for _, c in (*train, *test)})
    notes = []
    test_photos = [to_channels(p, channels) for p, _ in test]
    sizes = {p.shape[:2] for p in test_photos}
    if len(sizes) > 1:
        height, width = min(h for h, _ in sizes), min(w for _, w in sizes)
        notes.append(
            f"the {len(test_photos)} test images differ in size: evaluated on their "
            f"{height}x{width} centres"
        )
        test_images = centre_crop(test_photos, height, width)
    else:
        test_images = np.stack(test_photos)
    train_images, train_sizes = _stack_photos([p for p, _ in train], channels)
    return Dataset(
        name=name,
        source=source,
        train_images=train_images,
        train_labels=np.asarray([classes.index(c) for _, c in train], np.int32),
        test_images=test_images,
        test_labels=np.asarray([classes.index(c) for _, c in test], np.int32),
        class_names=tuple(c or "image" for c in classes),
        train_sizes=train_sizes,
        notes=tuple(notes),
    )


def _in_test_split(relative: str, fraction: float) -> bool:
    """A file's place in a folder without ``test/``: a hash of its relative path, so the
    split is the same on every machine and adding files moves none of the others."""
    return zlib.crc32(relative.encode()) % 10_000 < fraction * 10_000


def load_folder(directory: Path, channels: int, test_fraction: float) -> Dataset:
    """The images under ``directory`` (PNG, JPEG, ..., any size; searched recursively).

    Split: ``directory/test/`` holds the test images when it exists, and
    ``directory/train/`` (or, without it, every other image) the training ones; else a
    file is a test image when the CRC-32 of its path relative to ``directory`` falls in
    the first ``test_fraction`` of its range. Labels: the first folder under the split's
    root (``train/cat/x.png`` is class ``cat``, as torchvision's ImageFolder); images
    directly in the root are one class.
    """
    if not directory.is_dir():
        raise UserError(
            f"data.local_dir={directory} is not a directory; data.name=folder needs a "
            "directory of images (PNG, JPEG, ...), with a test/ subfolder or not"
        )
    files = sorted(
        p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    test_root = directory / "test"
    train_root = directory / "train" if (directory / "train").is_dir() else directory
    split: dict[str, list[tuple[Path, Path]]] = {"train": [], "test": []}
    for path in files:
        if test_root.is_dir():
            if path.is_relative_to(test_root):
                split["test"].append((path, test_root))
            elif path.is_relative_to(train_root):
                split["train"].append((path, train_root))
        else:
            relative = path.relative_to(directory).as_posix()
            split["test" if _in_test_split(relative, test_fraction) else "train"].append(
                (path, directory)
            )
    for name, members in split.items():
        if not members:
            raise UserError(
                f"{directory} has no {name} images ({len(files)} image files in all); "
                "put test images in a test/ subfolder, or more images in the folder"
                + ("" if test_root.is_dir() else f" (data.test_fraction={test_fraction:g})")
            )

    def read(members: list[tuple[Path, Path]]) -> list[tuple[np.ndarray, str]]:
        out = []
        for path, root in members:
            parts = path.relative_to(root).parts
            out.append((read_photo(path), parts[0] if len(parts) > 1 else ""))
        return out

    return _photo_dataset(
        "folder", f"folder:{directory}", read(split["train"]), read(split["test"]), channels
    )


def skimage_photo_dir() -> Path:
    """scikit-image's ``skimage/data/`` (found without importing scikit-image)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data.name=skimage reads the photos scikit-image ships; install it: "
            "pip install 'dae-jax[natural]' (or pip install scikit-image)",
            exit_code=1,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_skimage(channels: int) -> Dataset:
    """scikit-image's natural photos: :data:`SKIMAGE_TRAIN` to train, :data:`SKIMAGE_TEST`
    to test, one class."""
    directory = skimage_photo_dir()
    missing = [n for n in (*SKIMAGE_TRAIN, *SKIMAGE_TEST) if not (directory / n).is_file()]
    if missing:
        raise UserError(
            f"{directory} lacks {', '.join(missing)}; reinstall scikit-image "
            "(pip install --force-reinstall scikit-image)",
            exit_code=1,
        )
    train = [(read_photo(directory / n), "") for n in SKIMAGE_TRAIN]
    test = [(read_photo(directory / n), "") for n in SKIMAGE_TEST]
    return _photo_dataset("skimage", f"skimage:{directory}", train, test, channels)


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
        train_sizes=None if dataset.train_sizes is None else dataset.train_sizes[train],
    )


def _with_channels(dataset: Dataset, channels: int) -> Dataset:
    have = dataset.train_images.shape[-1]
    if channels in (0, have):
        return dataset
    return dataclasses.replace(
        dataset,
        train_images=to_channels(dataset.train_images, channels),
        test_images=to_channels(dataset.test_images, channels),
        notes=(*dataset.notes, f"{'gray -> RGB' if channels == 3 else 'RGB -> gray'}"),
    )


def load(data_config, seed: int = 0) -> Dataset:
    """The dataset ``data_config`` names, from the first source that has it."""
    name = data_config.name
    channels = int(data_config.get("channels", 0) or 0)
    train_size, test_size = data_config.train_size, data_config.test_size
    if name not in NAMES:
        raise UserError(f"data.name={name!r} is not a known dataset; use one of {', '.join(NAMES)}")
    local_dir = Path(os.path.expanduser(data_config.local_dir)) if data_config.local_dir else None
    if name == "synthetic":
        dataset = synthetic(
            seed, train_size or SYNTHETIC_TRAIN_SIZE, test_size or SYNTHETIC_TEST_SIZE
        )
    elif name == "folder":
        if local_dir is None:
            raise UserError(
                "data.name=folder reads the images of a directory: give it with "
                "--config.data.local_dir=DIR"
            )
        dataset = load_folder(local_dir, channels, float(data_config.get("test_fraction", 0.1)))
    elif name == "skimage":
        dataset = load_skimage(channels)
    elif local_dir is not None:
        if name not in IDX_NAMES:
            raise UserError(
                f"data.local_dir holds IDX files, which only {', '.join(IDX_NAMES)} come as; "
                f"for {name} give a prepared tensorflow-datasets copy with "
                "--config.data.tfds_dir=DIR (or data.name=folder for a directory of images)"
            )
        dataset = load_idx_dir(local_dir, name)
    elif name in SYSTEM_DIRS and _idx_path(SYSTEM_DIRS[name], IDX_FILES["train", "images"]):
        dataset = load_idx_dir(SYSTEM_DIRS[name], name)
    else:
        dataset = load_tfds(name, data_config.tfds_dir or None, train_size, test_size)
    return _with_channels(_subset(dataset, train_size, test_size), channels)

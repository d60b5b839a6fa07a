"""Using a trained run: test metrics under any corruption, and denoising user images."""

from __future__ import annotations

import itertools
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from dae_jax import checkpointing, data, runfiles, step
from dae_jax.configs import validate
from dae_jax.errors import UserError, first_line


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evaluate_workdir(
    workdir: str | Path,
    *,
    noise_kind: str | None = None,
    noise_level: float | None = None,
    model: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Test metrics of ``workdir``'s latest checkpoint, under its own corruption or another.

    ``model`` picks a member of a sweep's population (its seed and noise level are the
    defaults then). Writes ``W/evaluation/<kind>-<level>.json`` (``...-model<k>.json``
    for a population) and returns the same record.
    """
    workdir = Path(workdir)
    config = checkpointing.load_config(workdir)
    if noise_kind is not None:
        config.noise.kind = noise_kind
    if noise_level is not None:
        config.noise.level = noise_level
    validate(config)  # before anything is restored or compiled
    run = checkpointing.restore(workdir, model=model, warn=say)
    config.seed = run.config.seed  # a population member's own seed, noise kind and level
    if noise_kind is None:
        config.noise.kind = run.config.noise.kind
    if noise_level is None:
        config.noise.level = run.config.noise.level
    # The level as applied (float32), in its shortest spelling: the file name and record.
    level = str(np.float32(config.noise.level))
    config.noise.level = float(level)
    members = len((runfiles.read_json(workdir / "population.json") or {}).get("members", []))
    dataset = data.load(config.data, seed=config.seed)
    graphdef, params = nnx.split(run.model)
    setup = step.Setup.from_config(config, graphdef)
    batches, weights = jax.device_put(
        step.padded_test_batches(dataset, config.eval.batch_size, config)
    )
    eval_key = step.key_streams(config.seed).eval
    values = jax.jit(step.evaluate, static_argnums=0)(
        setup, params, batches, weights, eval_key, jnp.float32(config.noise.level)
    )
    record = {
        "workdir": str(workdir),
        "model": model,
        "epoch": run.epoch,
        "step": run.step,
        "noise_kind": config.noise.kind,
        "noise_level": float(config.noise.level),
        "noise_clip": bool(config.noise.clip),
        "loss_name": config.loss,
        "num_test_images": len(dataset.test_images),
        **{name: float(value) for name, value in values.items()},
    }
    member = f"-model{model}" if members > 1 else ""
    out = workdir / "evaluation" / f"{config.noise.kind}-{level}{member}.json"
    say(
        f"{workdir}{f' model {model}' if member else ''} (epoch {run.epoch}) on "
        f"{len(dataset.test_images)} {dataset.name} test images, {config.noise.kind} noise "
        f"at level {level}:"
    )
    say(
        f"  {config.loss} loss {record['test_loss']:.5f}  "
        f"PSNR {record['test_psnr_noisy']:.2f} -> {record['test_psnr_denoised']:.2f} dB  "
        f"SSIM {record['test_ssim_noisy']:.3f} -> {record['test_ssim_denoised']:.3f}  "
        "(noisy input -> reconstruction)"
    )
    try:
        out.parent.mkdir(exist_ok=True)
        out.write_text(runfiles.dumps(record, indent=2) + "\n")
    except OSError as e:
        raise UserError(
            f"the metrics above could not be saved to {out} ({e.strerror or e}); they are "
            "only printed: make the workdir writable and run evaluate again to keep them",
            exit_code=1,
        ) from None
    say(f"Written to {out}")
    return record


SIDE = 28
DARK_ON_LIGHT = 0.6  # border median above this: most likely a dark object on a light ground
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _gray(image: Image.Image, changes: list[str]) -> np.ndarray:
    """Any Pillow image as float32 grayscale in [0, 1]: 8-bit modes by 255, 16-bit ones by
    65535, float ones as they are when in [0, 1] (else by their min and max), and
    transparency composited onto black, the model's background."""
    mode = image.mode
    if mode.startswith("I;16"):
        changes.append("16-bit grayscale scaled by 1/65535")
        return np.asarray(image, np.float32) / 65535.0
    if mode in ("I", "F"):
        pixels = np.asarray(image, np.float64)
        if not np.isfinite(pixels).all():
            raise ValueError("it holds NaN or infinite pixel values")
        low, high = float(pixels.min()), float(pixels.max())
        if mode == "F" and low >= 0 and high <= 1:
            return pixels.astype(np.float32)
        if mode == "I" and low >= 0 and high <= 65535:
            scale = 255.0 if high <= 255 else 65535.0
            changes.append(f"{'8' if scale == 255 else '16'}-bit values scaled by 1/{scale:g}")
            return (pixels / scale).astype(np.float32)
        changes.append(f"values {low:g}..{high:g} scaled to [0, 1]")
        span = high - low
        return ((pixels - low) / span if span > 0 else pixels * 0).astype(np.float32)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
        transparent = bool((rgba[..., 3] < 1).any())
        changes.append(
            f"mode {mode} -> grayscale" + (", transparency composited onto black" * transparent)
        )
        gray = rgba[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as L
        return gray * rgba[..., 3]
    if mode != "L":
        changes.append(f"mode {mode} -> grayscale")
        image = image.convert("L")
    return np.asarray(image, np.float32) / 255.0


def _rgb(image: Image.Image, changes: list[str]) -> np.ndarray:
    """Any Pillow image as float32 RGB ``[H, W, 3]`` in [0, 1]: gray, 16-bit and float
    images through :func:`_gray` and repeated, transparency composited onto black."""
    mode = image.mode
    if mode.startswith("I") or mode in ("F", "1", "L", "LA", "La"):
        gray = _gray(image, changes)
        changes.append("grayscale -> RGB")
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), np.float32) / 255.0
        if (rgba[..., 3] < 1).any():
            changes.append("transparency composited onto black")
        return rgba[..., :3] * rgba[..., 3:]
    if mode != "RGB":
        changes.append(f"mode {mode} -> RGB")
        image = image.convert("RGB")
    return np.asarray(image, np.float32) / 255.0


def _border(pixels: np.ndarray) -> float:
    """The median of the outermost pixels: the image's background, most likely."""
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(np.median(edges))


def _open_error(path: Path, error: Exception) -> str:
    if isinstance(error, IsADirectoryError) or path.is_dir():
        return "it is a directory; give image files"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, Image.DecompressionBombError | Image.DecompressionBombWarning):
        match = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
        return (
            f"{size} is more than the {Image.MAX_IMAGE_PIXELS:,} it reads (a guard against "
            "decompression bombs); shrink it first"
        )
    if isinstance(error, UnidentifiedImageError):
        if path.is_file() and path.stat().st_size == 0:
            return "the file is empty"
        return "not an image file Pillow can read (PNG, JPEG, TIFF, GIF, BMP, WebP, ...)"
    if isinstance(error, OSError):
        if error.strerror:
            return error.strerror
        return f"the file is damaged, truncated or of an unsupported kind ({first_line(error)})"
    return first_line(error)


def load_image(
    path: Path,
    warn: Callable[[str], None],
    *,
    invert: bool = False,
    size: tuple[int, int] | None = (SIDE, SIDE),
    channels: int = 1,
    note_background: bool = True,
) -> np.ndarray:
    """A user's image as float32 ``[H, W, channels]`` in [0, 1], converted if it must be.

    16-bit and float images are scaled by their range, transparency is composited onto
    black, and an animated image gives its first frame. ``size=None`` keeps the image's
    own size (a fully convolutional model); otherwise a non-square image is padded with
    its border colour (the aspect ratio is kept) before it is resized to ``size``.
    ``invert`` turns dark-on-light images into the light-on-dark ones the model knows;
    without it, with ``note_background``, an image that looks dark-on-light gets a note.
    """
    changes: list[str] = []
    convert = _gray if channels == 1 else _rgb
    pixels = _read(path, convert, changes)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or 0 in pixels.shape:
        raise UserError(f"cannot read image {path}: it holds no 2-D image", exit_code=1)
    background = _border(pixels)
    height, width = pixels.shape[:2]
    if size is not None and (height, width) != size:
        pixels = _resized(pixels, size, background, changes)
    if invert:
        pixels = 1.0 - pixels
        changes.append("inverted")
        if note_background and background < 1 - DARK_ON_LIGHT:
            warn(
                f"note: {path} already looks light-on-dark (its border is dark); "
                "--invert made it dark-on-light"
            )
    elif note_background and background > DARK_ON_LIGHT:
        warn(
            f"note: {path} looks dark-on-light (its border is light); the model knows light "
            "objects on a dark background, like Fashion-MNIST: add --invert"
        )
    if changes:
        warn(f"warning: {path}: converted ({', '.join(changes)})")
    return pixels


def _read(path: Path, convert: Callable, changes: list[str]) -> np.ndarray:
    """The image's pixels (its first frame, turned upright), or a ``UserError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    changes.append(f"first of {frames} frames")
                opened.load()
                upright: Image.Image = opened
                if opened.getexif().get(0x0112, 1) in range(2, 9):  # phone photos: EXIF rotation
                    upright = ImageOps.exif_transpose(opened)
                    changes.append("turned upright by its EXIF orientation")
                return convert(upright, changes)
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise UserError(f"cannot read image {path}: {_open_error(path, e)}", exit_code=1) from None


def _resized(
    pixels: np.ndarray, size: tuple[int, int], background: float, changes: list[str]
) -> np.ndarray:
    """``pixels`` at ``size``: a non-square image is padded with ``background`` first."""
    height, width = pixels.shape[:2]
    if height != width:
        side = max(height, width)
        padded = np.full((side, side, pixels.shape[2]), background, np.float32)
        top, left = (side - height) // 2, (side - width) // 2
        padded[top : top + height, left : left + width] = pixels
        pixels = padded
    padding = f" (padded to {len(pixels)}x{len(pixels)} first)" if height != width else ""
    changes.append(f"size {width}x{height} -> {size[1]}x{size[0]}{padding}")
    pixels = np.stack(
        [
            np.asarray(
                Image.fromarray(pixels[..., c]).resize(
                    (size[1], size[0]), Image.Resampling.LANCZOS
                ),
                np.float32,
            )
            for c in range(pixels.shape[2])
        ],
        axis=-1,
    )
    return np.clip(pixels, 0.0, 1.0)


def _to_pil(pixels: np.ndarray) -> Image.Image:
    """float ``[H, W, 1 or 3]`` in [0, 1] as an 8-bit L or RGB image."""
    values = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(values[..., 0] if values.shape[-1] == 1 else values)


def _comparison(noisy: np.ndarray, denoised: np.ndarray) -> Image.Image:
    """Input | reconstruction side by side; small images enlarged for viewing (28x28: 8x)."""
    height = noisy.shape[0]
    scale = max(1, 224 // max(noisy.shape[:2]))
    gap = np.ones((height, 2, noisy.shape[2]), np.float32)
    row = np.concatenate([noisy, gap, denoised], axis=1)
    image = _to_pil(row)
    if scale == 1:
        return image
    return image.resize((row.shape[1] * scale, height * scale), Image.Resampling.NEAREST)


SOFTWARE = "dae-jax denoise"  # the PNG tag that marks a file denoise wrote


def _written_by_denoise(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.info.get("Software") == SOFTWARE
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


class _Names:
    """Output names, none shared by two outputs, none on an input or on a file that
    ``denoise`` did not write: a taken ``x.png`` becomes ``x-2.png``, ``x-3.png``, ..."""

    def __init__(self, output: Path, inputs: Sequence[Path]):
        self.output = output
        self.claimed: set[str] = set()
        self.inputs = set()
        for path in inputs:
            try:
                stat = path.stat()
                self.inputs.add((stat.st_dev, stat.st_ino))
            except OSError:
                pass

    def _taken(self, path: Path) -> str | None:
        if path.name.casefold() in self.claimed:
            return "another output"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        except OSError as e:
            return e.strerror or "unusable"
        if (stat.st_dev, stat.st_ino) in self.inputs:
            return "an input"
        if not path.is_file() or not _written_by_denoise(path):
            return "a file dae-jax denoise did not write"
        return None

    def claim(self, stem: str) -> tuple[Path, Path, str]:
        """``(image, comparison, why the plain name was not used or "")``."""
        why = ""
        for k in itertools.count(1):
            name = stem if k == 1 else f"{stem}-{k}"
            pair = (self.output / f"{name}.png", self.output / f"{name}_comparison.png")
            reasons = [(p, r) for p in pair if (r := self._taken(p))]
            if not reasons:
                self.claimed.update(p.name.casefold() for p in pair)
                return pair[0], pair[1], why
            if not why:
                why = f"{reasons[0][0]} is {reasons[0][1]}"
        raise AssertionError("unreachable")


def _save(image: Image.Image, path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    try:
        image.save(path, format="PNG", pnginfo=info)
    except OSError as e:
        raise UserError(
            f"cannot write {path} ({e.strerror or e}); give another --output", exit_code=1
        ) from None


def denoise_files(
    workdir: str | Path,
    output: str | Path,
    images: Sequence[str | Path],
    *,
    invert: bool = False,
    model: int = 0,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = _stderr,
) -> list[Path]:
    """Denoises each image with ``workdir``'s model into ``output``; returns what it wrote.

    Each input gives ``<stem>.png`` (the reconstruction: at the image's own size and in the
    model's colours for a fully convolutional model, at the model's size for the MLP) and
    ``<stem>_comparison.png`` (input and reconstruction side by side). A name that is
    taken (an input, another output of this call, a file denoise did not write) becomes
    ``<stem>-2.png`` and so on: nothing is written over. An unreadable input is reported
    in one line and skipped; a ``UserError`` at the end says how many.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output={output} is a file; give a directory")
    run = checkpointing.restore(Path(workdir), model=model, warn=warn)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"--output={output} cannot be created ({e.strerror or e}); give a directory you "
            "can write to",
            exit_code=1,
        ) from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise UserError(
            f"--output={output} is not writable; give a directory you can write to", exit_code=1
        )
    paths = [Path(name) for name in images]
    names = _Names(output, paths)
    written: list[Path] = []
    failed = 0
    shape = tuple(run.model.image_shape)
    whole = bool(getattr(run.model, "fully_convolutional", False))
    graphdef, params = nnx.split(run.model)
    denoiser = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))  # compiled once per image size
    for path in paths:
        try:
            noisy = load_image(
                path,
                warn,
                invert=invert,
                size=None if whole else (shape[0], shape[1]),
                channels=shape[2],
                note_background=run.config.data.name in (*data.IDX_NAMES, "synthetic"),
            )
        except UserError as e:
            warn(f"error: {e}")
            failed += 1
            continue
        denoised = np.asarray(denoiser(params, jnp.asarray(noisy[None])))[0]
        target, comparison, why = names.claim(path.stem)
        _save(_to_pil(denoised), target)
        _save(_comparison(noisy, denoised), comparison)
        written += [target, comparison]
        say(f"{path} -> {target}, {comparison}" + (f" ({why})" if why else ""))
    if failed:
        raise UserError(
            f"{failed} of {len(images)} images could not be read (see above); "
            f"the others are in {output}",
            exit_code=1,
        )
    return written

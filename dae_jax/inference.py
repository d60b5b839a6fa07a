"""Using a trained run: test metrics under any corruption, and denoising user images."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from dae_jax import checkpointing, data, train
from dae_jax.configs import validate
from dae_jax.errors import UserError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evaluate_workdir(
    workdir: str | Path,
    *,
    noise_kind: str | None = None,
    noise_level: float | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Test metrics of ``workdir``'s latest checkpoint, under its own corruption or another.

    Writes ``W/evaluation/<kind>-<level>.json`` and returns the same record.
    """
    workdir = Path(workdir)
    config = checkpointing.load_config(workdir)
    if noise_kind is not None:
        config.noise.kind = noise_kind
    if noise_level is not None:
        config.noise.level = noise_level
    validate(config)  # before anything is restored or compiled
    run = checkpointing.restore(workdir, warn=say)
    dataset = data.load(config.data, seed=config.seed)
    graphdef, params = train.nnx.split(run.model)
    setup = train.Setup.from_config(config, graphdef)
    batches, weights = jax.device_put(train.padded_test_batches(dataset, config.eval.batch_size))
    eval_key = train.key_streams(config.seed).eval
    values = jax.jit(train.evaluate, static_argnums=0)(
        setup, params, batches, weights, eval_key, jnp.float32(config.noise.level)
    )
    record = {
        "workdir": str(workdir),
        "epoch": run.epoch,
        "step": run.step,
        "noise_kind": config.noise.kind,
        "noise_level": float(config.noise.level),
        "noise_clip": bool(config.noise.clip),
        "loss_name": config.loss,
        "num_test_images": len(dataset.test_images),
        **{name: float(value) for name, value in values.items()},
    }
    out = workdir / "evaluation" / f"{config.noise.kind}-{float(config.noise.level):g}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    say(
        f"{workdir} (epoch {run.epoch}) on {len(dataset.test_images)} {dataset.name} test "
        f"images, {config.noise.kind} noise at level {float(config.noise.level):g}:"
    )
    say(
        f"  {config.loss} loss {record['test_loss']:.5f}  "
        f"PSNR {record['test_psnr_noisy']:.2f} -> {record['test_psnr_denoised']:.2f} dB  "
        f"SSIM {record['test_ssim_noisy']:.3f} -> {record['test_ssim_denoised']:.3f}  "
        "(noisy input -> reconstruction)"
    )
    say(f"Written to {out}")
    return record


def load_image(path: Path, warn: Callable[[str], None]) -> np.ndarray:
    """A user's image as float32 ``[28, 28, 1]`` in [0, 1], converted if it must be."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image: Image.Image = opened
            changes = []
            if image.mode != "L":
                changes.append(f"mode {image.mode} -> grayscale")
                image = image.convert("L")
            if image.size != (28, 28):
                changes.append(f"size {image.size[0]}x{image.size[1]} -> 28x28")
                image = image.resize((28, 28), Image.Resampling.LANCZOS)
            pixels = np.asarray(image, np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read image {path}: {reason}", exit_code=1) from None
    if changes:
        warn(f"warning: {path}: converted ({', '.join(changes)})")
    return pixels[..., None]


def _comparison(noisy: np.ndarray, denoised: np.ndarray, scale: int = 8) -> Image.Image:
    """Input | reconstruction side by side, enlarged for viewing."""
    gap = np.ones((28, 2), np.float32)
    row = np.concatenate([noisy[..., 0], gap, denoised[..., 0]], axis=1)
    image = Image.fromarray(np.round(np.clip(row, 0, 1) * 255).astype(np.uint8))
    return image.resize((row.shape[1] * scale, 28 * scale), Image.Resampling.NEAREST)


def denoise_files(
    workdir: str | Path,
    output: str | Path,
    images: Sequence[str | Path],
    *,
    say: Callable[[str], None] = print,
    warn: Callable[[str], None] = _stderr,
) -> list[Path]:
    """Denoises each image with ``workdir``'s model into ``output``; returns what it wrote.

    Each input gives ``<stem>.png`` (the 28x28 reconstruction) and
    ``<stem>_comparison.png`` (input and reconstruction side by side). An unreadable
    input is reported in one line and skipped; a ``UserError`` at the end says how many.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output={output} is a file; give a directory")
    run = checkpointing.restore(Path(workdir), warn=warn)
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed = 0
    for name in images:
        path = Path(name)
        try:
            noisy = load_image(path, warn)
        except UserError as e:
            warn(f"error: {e}")
            failed += 1
            continue
        denoised = np.asarray(run.model(jnp.asarray(noisy[None])))[0]
        target = output / f"{path.stem}.png"
        Image.fromarray(np.round(denoised[..., 0] * 255).astype(np.uint8)).save(target)
        comparison = output / f"{path.stem}_comparison.png"
        _comparison(noisy, denoised).save(comparison)
        written += [target, comparison]
        say(f"{path} -> {target}, {comparison}")
    if failed:
        raise UserError(
            f"{failed} of {len(images)} images could not be read (see above); "
            f"the others are in {output}",
            exit_code=1,
        )
    return written

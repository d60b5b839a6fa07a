"""Issue 11 (trust), denoise's inputs: whatever image a user gives is read by its real
range, or refused in one line naming the file (no model needed here)."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dae_jax.errors import UserError
from dae_jax.inference import load_image


def read(path: Path, **kw) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    pixels = load_image(path, notes.append, **kw)
    assert pixels.shape == (28, 28, 1) and pixels.dtype == np.float32
    assert 0 <= pixels.min() and pixels.max() <= 1
    return pixels[..., 0], notes


def square(value: float, background: float = 0.0, size: int = 28) -> np.ndarray:
    """A ``size`` image: a centred square of ``value`` on ``background``."""
    image = np.full((size, size), background)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = value
    return image


def test_16_bit_png_is_scaled_by_its_range_not_saturated(tmp_path):
    Image.fromarray((square(0.5) * 65535).astype(np.uint16)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "I;16"
    pixels, notes = read(tmp_path / "a.png")
    assert pixels[14, 14] == pytest.approx(0.5, abs=1e-4) and pixels[0, 0] == 0
    assert notes == [
        f"warning: {tmp_path / 'a.png'}: converted (16-bit grayscale scaled by 1/65535)"
    ]


def test_float_tiff_in_0_1_is_used_as_is_and_other_ranges_are_scaled(tmp_path):
    Image.fromarray(square(0.8).astype(np.float32)).save(tmp_path / "unit.tif")
    pixels, notes = read(tmp_path / "unit.tif")
    assert pixels[14, 14] == pytest.approx(0.8) and notes == []
    Image.fromarray((square(700.0, -100.0)).astype(np.float32)).save(tmp_path / "wide.tif")
    pixels, notes = read(tmp_path / "wide.tif")
    assert (pixels[14, 14], pixels[0, 0]) == (pytest.approx(1.0), 0)
    assert notes == [
        f"warning: {tmp_path / 'wide.tif'}: converted (values -100..700 scaled to [0, 1])"
    ]
    Image.fromarray(np.full((28, 28), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(UserError) as error:
        read(tmp_path / "nan.tif")
    assert str(error.value) == (
        f"cannot read image {tmp_path / 'nan.tif'}: it holds NaN or infinite pixel values"
    )


def test_transparency_is_composited_onto_black(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only in the square
    rgba[..., 3] = (square(1.0) * 255).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    pixels, notes = read(tmp_path / "logo.png")
    assert (pixels[14, 14], pixels[0, 0]) == (1.0, 0.0)
    assert notes == [
        f"warning: {tmp_path / 'logo.png'}: converted (mode RGBA -> grayscale, transparency "
        "composited onto black)"
    ]
    # A palette image with a transparent colour, too.
    palette = Image.fromarray((square(1.0) * 255).astype(np.uint8)).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    pixels, _ = read(tmp_path / "p.png")
    assert (pixels[14, 14], pixels[0, 0]) == (1.0, 0.0)


def test_aspect_ratio_is_kept_by_padding_with_the_border_colour(tmp_path):
    tall = np.full((56, 28), 1.0)  # all white, twice as tall as wide, black border
    tall[0, :] = tall[-1, :] = tall[:, 0] = tall[:, -1] = 0
    Image.fromarray((tall * 255).astype(np.uint8)).save(tmp_path / "tall.png")
    pixels, notes = read(tmp_path / "tall.png")
    assert pixels[:, :5].max() < 0.05 and pixels[:, -5:].max() < 0.05  # padded, not squashed
    assert pixels[5:23, 10:18].min() > 0.9
    assert notes == [
        f"warning: {tmp_path / 'tall.png'}: converted (size 28x56 -> 28x28 (padded to 56x56 first))"
    ]


def test_dark_on_light_gets_a_note_and_invert_fixes_it(tmp_path):
    Image.fromarray((square(0.0, 1.0) * 255).astype(np.uint8)).save(tmp_path / "ink.png")
    pixels, notes = read(tmp_path / "ink.png")
    assert notes == [
        f"note: {tmp_path / 'ink.png'} looks dark-on-light (its border is light); the model "
        "knows light objects on a dark background, like Fashion-MNIST: add --invert"
    ]
    inverted, notes = read(tmp_path / "ink.png", invert=True)
    np.testing.assert_allclose(inverted, 1 - pixels)
    assert notes == [f"warning: {tmp_path / 'ink.png'}: converted (inverted)"]
    Image.fromarray((square(1.0) * 255).astype(np.uint8)).save(tmp_path / "fine.png")
    _, notes = read(tmp_path / "fine.png", invert=True)
    assert notes[0] == (
        f"note: {tmp_path / 'fine.png'} already looks light-on-dark (its border is dark); "
        "--invert made it dark-on-light"
    )


@pytest.mark.parametrize(
    ("mode", "suffix", "change"),
    [
        ("P", "png", "mode P -> grayscale"),
        ("CMYK", "jpg", "mode CMYK -> grayscale"),
        ("1", "png", "mode 1 -> grayscale"),
        ("LA", "png", "mode LA -> grayscale"),
        ("RGB", "bmp", "mode RGB -> grayscale"),
        ("RGB", "webp", "mode RGB -> grayscale"),
    ],
)
def test_other_modes_are_converted(tmp_path, mode, suffix, change):
    path = tmp_path / f"x.{suffix}"
    Image.fromarray((square(1.0) * 255).astype(np.uint8)).convert(mode).save(path)
    pixels, notes = read(path)
    assert pixels[14, 14] > 0.9 and pixels[0, 0] < 0.1
    assert notes == [f"warning: {path}: converted ({change})"]


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    first = Image.fromarray((square(1.0) * 255).astype(np.uint8))
    second = Image.fromarray(np.full((28, 28), 255, np.uint8))
    first.save(tmp_path / "a.gif", save_all=True, append_images=[second])
    pixels, notes = read(tmp_path / "a.gif")
    assert pixels[0, 0] < 0.1 and pixels[14, 14] > 0.9
    assert notes == [
        f"warning: {tmp_path / 'a.gif'}: converted (first of 2 frames, mode P -> grayscale)"
    ]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims ``width`` x ``height`` pixels (no pixel data: it is never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (64, 64), "white").save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:200])


BOMB = "is more than the 89,478,485 it reads (a guard against decompression bombs); shrink it first"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (
            lambda p: p.write_text("hello"),
            "not an image file Pillow can read (PNG, JPEG, TIFF, GIF, BMP, WebP, ...)",
        ),
        (lambda p: p.mkdir(), "it is a directory; give image files"),
        (lambda p: None, "no such file"),
        (lambda p: _png_header_only(p, 20000, 20000), f"400,000,000 pixels {BOMB}"),
        (lambda p: _png_header_only(p, 10000, 10000), f"100,000,000 pixels {BOMB}"),
        (
            _truncated_jpeg,
            "the file is damaged, truncated or of an unsupported kind (Truncated File Read)",
        ),
        (
            lambda p: Image.new("LAB", (28, 28)).save(p, "TIFF"),
            "conversion from LAB to RGB not supported",
        ),
    ],
    ids=["empty", "text", "directory", "missing", "bomb", "big", "truncated", "lab"],
)
def test_unreadable_inputs_are_one_line_naming_the_file(tmp_path, make, reason):
    path = tmp_path / "input.png"
    make(path)
    with pytest.raises(UserError) as error:
        read(path)
    assert str(error.value) == f"cannot read image {path}: {reason}"
    assert error.value.exit_code == 1


def test_a_phone_photo_is_turned_upright_by_its_exif_orientation(tmp_path):
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, :4] = 255  # a white stripe on the left as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image.save(tmp_path / "phone.jpg", exif=exif)
    upright, notes = read(tmp_path / "phone.jpg")
    assert upright[:3].mean() > 0.8 and upright[:, :3].mean() < 0.3  # the stripe is on top
    assert notes == [
        f"warning: {tmp_path / 'phone.jpg'}: converted (turned upright by its EXIF orientation)"
    ]

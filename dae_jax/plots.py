"""Matplotlib figures of a run. Fixed sizes and no tight bbox, so pixel sizes are known."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100


def denoising_figure_size(num_images: int) -> tuple[int, int]:
    """(width, height) in pixels of ``denoising_figure`` for ``num_images`` columns."""
    return 150 * num_images + 100, 520


def denoising_figure(
    path: Path,
    noisy: np.ndarray,
    reconstructed: np.ndarray,
    clean: np.ndarray,
    titles: Sequence[str],
    row_notes: Sequence[str] = ("", "", ""),
) -> None:
    """The tutorial's figure: rows noisy / reconstruction / clean, one column per image."""
    num_images = len(clean)
    width, height = denoising_figure_size(num_images)
    fig, axes = plt.subplots(3, num_images, figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = np.asarray(axes).reshape(3, num_images)
    rows = (("noisy", noisy), ("reconstruction", reconstructed), ("clean", clean))
    for r, (row_name, images) in enumerate(rows):
        for c in range(num_images):
            ax = axes[r, c]
            ax.imshow(np.clip(images[c].squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        label = row_name + (f"\n{row_notes[r]}" if row_notes[r] else "")
        axes[r, 0].set_ylabel(label, fontsize=10)
    fig.subplots_adjust(left=0.9 / (width / DPI), right=0.99, top=0.92, bottom=0.02)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def loss_figure(
    path: Path, epochs: Sequence[int], train_loss: Sequence[float], test_loss: Sequence[float]
) -> None:
    """Train and test loss per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=DPI)
    ax.plot(epochs, train_loss, "o-", label="train (noisy input)")
    ax.plot(epochs, test_loss, "s-", label="test (noisy input)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_xticks(list(epochs))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)

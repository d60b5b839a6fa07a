"""Matplotlib figures of a run. Fixed sizes and no tight bbox, so pixel sizes are known."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _mean_std_by(
    rows, by: str = "train_level", **want
) -> tuple[list[float], list[float], list[float]]:
    """(values of ``by``, means, stds) of the rows matching ``want``, grouped by ``by``."""
    groups: dict[float, list[float]] = {}
    for r in rows:
        if all(r.get(k) == v for k, v in want.items()):
            groups.setdefault(r[by], []).append(r["value"])
    levels = sorted(groups)
    return (
        levels,
        [float(np.mean(groups[x])) for x in levels],
        [float(np.std(groups[x])) for x in levels],
    )


def _series(lines, x: str, hue: Sequence[str], key: str):
    """{hue label: (x values, means, stds)} of the sweep summary ``lines``' ``key``."""
    out: dict[str, tuple[list, list, list]] = {}
    for line in lines:
        label = ", ".join(f"{h}={_text(line['values'][h])}" for h in hue)
        mean, std = line[key]
        if mean == mean:  # not NaN
            xs, means, stds = out.setdefault(label, ([], [], []))
            xs.append(line["values"][x])
            means.append(mean)
            stds.append(std)
    return out


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plot_series(ax, series, prefix: str = "") -> None:
    for label, (xs, means, stds) in series.items():
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs)
        positions = xs if numeric else [_text(v) for v in xs]
        shown = prefix + label if label else prefix.strip(", ")
        ax.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=shown)


def sweep_quality(path: Path, rows, lines, x: str, hue: Sequence[str]) -> None:
    """The DAE's PSNR and SSIM at its own corruption against the ``x`` axis, one line per
    hue; with the noise level on x, one row of panels per noise kind, with the noisy input
    and the classical references at each level."""
    kinds: list = [None]
    if x == "noise.level":
        kinds = sorted({r["test_kind"] for r in rows if r.get("test_kind")}) or [None]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.5 * len(kinds)), dpi=DPI, squeeze=False)
    for row, kind in enumerate(kinds):
        mine = [ln for ln in lines if kind is None or ln["values"].get("noise.kind", kind) == kind]
        own_hue = [h for h in hue if h != "noise.kind"] if len(kinds) > 1 else hue
        for ax, metric in zip(axes[row], ("psnr", "ssim"), strict=True):
            _plot_series(ax, _series(mine, x, own_hue, metric), "DAE ")
            for reference, style in (
                ("noisy input", "k:"), ("clip", "--"), ("gaussian_blur", "--"),
                ("median_filter", "--"), ("bm3d", "-."),
            ):  # fmt: skip
                points = sorted(
                    (r["test_level"], r["value"]) for r in rows
                    if kind is not None and r["model"] == reference and r["metric"] == metric
                    and r.get("test_kind") == kind
                )  # fmt: skip
                if points:
                    ax.plot(*zip(*points, strict=True), style, label=reference, alpha=0.7)
            _finish_axes(ax, f"{x} ({kind})" if kind else x, metric.upper())
    _save(fig, path)


def sweep_probe(path: Path, rows, lines, x: str, hue: Sequence[str]) -> None:
    """Linear-probe accuracy of the codes against the ``x`` axis, and of raw pixels."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=DPI)
    _plot_series(ax, _series(lines, x, hue, "probe"), "DAE codes, ")
    pixels = [r["value"] for r in rows if r["model"] == "raw pixels"]
    if pixels:
        ax.axhline(pixels[0], color="k", linestyle=":", label="raw pixels")
    _finish_axes(ax, x, "linear probe test accuracy")
    _save(fig, path)


def _finish_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def sweep_matrix(path: Path, rows, lines, hue: Sequence[str]) -> None:
    """Train level x test level PSNR, one panel per hue (mean over seeds)."""
    panels: dict[str, dict[tuple[float, float], list[float]]] = {}
    labels = {line["label"]: ", ".join(f"{h}={_text(line['values'][h])}" for h in hue) or "DAE"
              for line in lines}  # fmt: skip
    train_level = {line["label"]: line["values"]["noise.level"] for line in lines}
    for r in rows:
        if r["metric"] == "psnr" and r["model"] in labels:
            cell = (train_level[r["model"]], r["test_level"])
            panels.setdefault(labels[r["model"]], {}).setdefault(cell, []).append(r["value"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), dpi=DPI, squeeze=False)
    for ax, (name, cells) in zip(axes[0], panels.items(), strict=True):
        levels = sorted({a for a, _ in cells} | {b for _, b in cells})
        matrix = np.full((len(levels), len(levels)), np.nan)
        for (a, b), values in cells.items():
            matrix[levels.index(a), levels.index(b)] = np.mean(values)
        image = ax.imshow(matrix, cmap="viridis")
        ticks = [f"{v:g}" for v in levels]
        ax.set_xticks(range(len(levels)), ticks)
        ax.set_yticks(range(len(levels)), ticks)
        ax.set_xlabel("test level")
        ax.set_ylabel("train level")
        ax.set_title(f"PSNR (dB), {name}", fontsize=9)
        for i in range(len(levels)):
            for j in range(len(levels)):
                ax.text(
                    j, i, f"{matrix[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w"
                )
        fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def reconstructions(directory: Path, examples, clean: np.ndarray) -> None:
    """Reconstructions: clean on top, then noisy and reconstructed rows per model."""
    names = list(examples)
    count = len(clean)
    fig, axes = plt.subplots(
        1 + 2 * len(names),
        count,
        figsize=(1.3 * count + 1.5, 1.3 * (1 + 2 * len(names))),
        dpi=DPI,
        squeeze=False,
    )
    panels = [("clean", clean)]
    for name in names:
        noisy, denoised = examples[name]
        panels += [(f"{name}\nnoisy", np.asarray(noisy)), (f"{name}\nDAE", np.asarray(denoised))]
    for r, (label, images) in enumerate(panels):
        for c in range(count):
            axes[r, c].imshow(np.clip(images[c].squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, hspace=0.05, wspace=0.05)
    fig.savefig(directory / "reconstructions.png", dpi=DPI)
    plt.close(fig)


def accuracy_vs_labels(path: Path, rows, variants: Sequence[str]) -> None:
    """Test accuracy (mean and std over seeds) against the fraction of labels used."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for variant in variants:
        fractions, means, stds = _mean_std_by(
            rows, by="label_fraction", variant=variant, metric="test_accuracy"
        )
        ax.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=variant)
    ax.set_xscale("log")
    _finish(fig, ax, path, "fraction of training labels used in fine-tuning", "test accuracy")


def _finish(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, legend: int = 8) -> None:
    """Labels, grid and legend, then the file."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)
    _save(fig, path)


def curves_figure(path: Path, curves: dict, *, xlabel: str, ylabel: str) -> None:
    """One line per named sequence (e.g. validation accuracy per epoch)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name, linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def roc_figure(path: Path, curves: dict) -> None:
    """ROC curves, one per held-out class: name -> (false-positive, true-positive rates)."""
    fig, ax = plt.subplots(figsize=(6, 6), dpi=DPI)
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, linewidth=1.2, label=name)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1, label="chance")
    ax.set_title("held-out class vs the rest, by reconstruction error")
    _finish(fig, ax, path, "false-positive rate", "true-positive rate")


def image_grid(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    *,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
) -> None:
    """Images ``[H, W, 1 or 3]`` in [0, 1] in a grid, labelled by row and column."""
    num_rows, num_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(
        num_rows, num_cols, figsize=(2 * num_cols + 0.8, 2 * num_rows + 0.4), dpi=DPI,
        squeeze=False,
    )  # fmt: skip
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(np.clip(image.squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_labels[c], fontsize=10)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.99, top=0.92, bottom=0.02, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def population_figure(path: Path, rows: Sequence[dict]) -> None:
    """``dae-jax bench``: examples/s against the population size K, one line per batch
    size and precision (log-log: a flat line is no gain from training K models at once)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    lines: dict[tuple, list] = {}
    for r in rows:
        if r.get("workload") == "population" and "skipped" not in r:
            lines.setdefault((r["batch_size"], r["precision"]), []).append(r)
    for (batch, precision), points in sorted(lines.items()):
        points = sorted(points, key=lambda r: r["models"])
        ax.plot(
            [r["models"] for r in points],
            [r["examples_per_second"] for r in points],
            marker="o",
            linestyle="-" if precision == "float32" else "--",
            label=f"batch {batch}, {precision}",
        )
    if lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_title("Population scaling: the seed MLP, K models trained at once", fontsize=9)
    _finish(fig, ax, path, "models trained at once (K)", "examples per second (all models)")


def roofline_figure(path: Path, rows: Sequence[dict], peaks: dict, bandwidth: dict) -> None:
    """``dae-jax bench``: achieved FLOP/s against arithmetic intensity (XLA's FLOPs per
    byte accessed) for every row, under the measured matmul peaks and memory bandwidth."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI)
    timed = [r for r in rows if "skipped" not in r and r.get("arithmetic_intensity")]
    intensities = [r["arithmetic_intensity"] for r in timed] or [1.0]
    x = np.geomspace(min(intensities) / 4, max(intensities) * 4, 100)
    for precision, peak in peaks.items():
        flops = peak["flops_per_second"]
        roof = np.minimum(flops, bandwidth["bytes_per_second"] * x)
        ax.plot(x, roof, color="black", linestyle="-" if precision == "float32" else "--",
                label=f"{precision} matmul peak {flops / 1e9:,.0f} GFLOP/s, "
                f"{bandwidth['bytes_per_second'] / 1e9:,.0f} GB/s")  # fmt: skip
    markers = {"population": "o", "conv": "s", "patch": "^"}
    for r in timed:
        label = f"{r['workload']} B={r['batch_size']} K={r['models']} {r['precision']}"
        ax.scatter(r["arithmetic_intensity"], r["flops_per_second"], s=18,
                   marker=markers.get(r["workload"], "o"), label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("Roofline: the training step, XLA's counts", fontsize=9)
    _finish(fig, ax, path, "arithmetic intensity (FLOPs per byte accessed)", "FLOP/s", legend=5)

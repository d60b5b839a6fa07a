"""DnCNN on natural photos against BM3D, at sigma 15, 25 and 50 (/255).

    python experiments/natural_images.py --workdir=runs/natural_images [--quick]
        [--seeds=0,1,2] [--levels=15,25,50] [--config=natural] [--config.KEY=VALUE]

One model per level and seed (the ``natural`` config: DnCNN on random patches of
scikit-image's training photos), all trained in one vmapped program. Then the held-out
photos (camera, coffee, chelsea), whole and at their own sizes, get unclipped Gaussian
noise (one fixed draw per photo and level) and are denoised by every model, by BM3D
(its sigma tuned among 0.9, 1.0 and 1.1 times the true one, on the same noisy photos)
and by the median filter (3x3 or 5x5, the better). Writes ``results.csv`` (one row per
method, level, seed and photo), ``results.md`` (mean PSNR/SSIM over photos; mean ± std
over seeds) and ``figures/crops.png`` (noisy / BM3D / model / clean). Resumable: the
same command trains on from the last checkpoint and skips the scores already written.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dae_jax import baselines, data, metrics, plots, report, runfiles, train


def define(values) -> None:
    from absl import flags

    flags.DEFINE_list(
        "levels", ["15", "25", "50"], "Noise sigmas, in 1/255 units.", flag_values=values
    )


NATURAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "natural.py")
BM3D_FACTORS = (0.9, 1.0, 1.1)
CROP = 96  # the figure's crop of each photo's centre


def quick(config: ml_collections.ConfigDict) -> None:
    """A smoke run: a tiny DnCNN for one short epoch at sigma 25; BM3D at the true sigma only."""
    config.data.patches_per_image = 16
    config.model.depth, config.model.features = 4, 8
    config.train.epochs, config.train.log_every = 1, 11


def _noisy(clean: np.ndarray, sigma: float, photo: int, level: int) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(20171), level), photo)
    noise = np.asarray(jax.random.normal(key, clean.shape), np.float32)
    return clean + np.float32(sigma) * noise


def _score(out: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    a, b = jnp.asarray(out[None]), jnp.asarray(clean[None])
    return {"psnr": float(metrics.psnr(a, b)[0]), "ssim": float(metrics.ssim(a, b)[0])}


def _photos(channels: int) -> list[tuple[str, np.ndarray]]:
    directory = data.skimage_photo_dir()
    return [
        (Path(name).stem, data.to_channels(data.read_photo(directory / name), channels) / 255.0)
        for name in data.SKIMAGE_TEST
    ]


def score(
    result: Any,
    config: ml_collections.ConfigDict,
    members: list[tuple[int, int]],
    log: Any,
    factors: tuple[float, ...] = BM3D_FACTORS,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Rows for every method on every whole test photo, and the figure's crops."""
    photos = _photos(int(config.data.image_shape[-1]))
    graphdef = result.graphdef
    model_fn = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
    rows: list[dict[str, Any]] = []
    crops: dict[str, dict[str, np.ndarray]] = {}
    for level in sorted({lv for lv, _ in members}):
        sigma = level / 255.0
        for p, (name, clean) in enumerate(photos):
            noisy = _noisy(clean.astype(np.float32), sigma, p, level)
            row = {"level": level, "photo": name, "height": clean.shape[0], "width": clean.shape[1]}
            outs = {"noisy": np.clip(noisy, 0, 1)}
            rows.append({**row, "method": "noisy", "seed": "", **_score(noisy, clean)})
            medians = [baselines.median_filter(jnp.asarray(noisy[None]), s)[0] for s in (3, 5)]
            best = max(medians, key=lambda m: _score(np.asarray(m), clean)["psnr"])
            rows.append({**row, "method": "median", "seed": "", **_score(np.asarray(best), clean)})
            for factor in factors:
                out = baselines.bm3d_denoise(noisy[None], sigma * factor)[0]
                rows.append(
                    {**row, "method": f"bm3d x{factor:g}", "seed": "", **_score(out, clean)}
                )
                if factor == 1.0:
                    outs["BM3D"] = out
            for k, (member_level, seed) in enumerate(members):
                if member_level != level:
                    continue
                params = jax.tree.map(lambda x, k=k: x[k], result.states.params)
                out = np.asarray(model_fn(params, jnp.asarray(noisy[None], jnp.float32)))[0]
                rows.append({**row, "method": "dncnn", "seed": seed, **_score(out, clean)})
                outs.setdefault("DnCNN", out)
            log(f"scored {name} at sigma {level}/255")
            if p == 0:
                crops[f"sigma {level}"] = {**outs, "clean": clean}
    return rows, crops


def _mean(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level: mean PSNR/SSIM over photos for each method; BM3D at its best factor
    (picked on mean PSNR, as tuned on these photos); the model's mean ± std over seeds."""
    lines = []
    for level in sorted({r["level"] for r in rows}):
        at = [r for r in rows if r["level"] == level]

        def over_photos(method: str, seed: Any = "", at: list = at) -> dict[str, float]:
            chosen = [r for r in at if r["method"] == method and r["seed"] == seed]
            return {m: float(np.mean([r[m] for r in chosen])) for m in ("psnr", "ssim")}

        factors = sorted({float(r["method"][6:]) for r in at if r["method"].startswith("bm3d x")})
        bm3d = max(
            (over_photos(f"bm3d x{f:g}") | {"factor": f} for f in factors),
            key=lambda v: v["psnr"],
        )
        seeds = sorted({r["seed"] for r in at if r["method"] == "dncnn"})
        per_seed = [over_photos("dncnn", s) for s in seeds]
        psnr, psnr_std = _mean([v["psnr"] for v in per_seed])
        ssim, ssim_std = _mean([v["ssim"] for v in per_seed])
        lines.append(
            {
                "level": level,
                "noisy": over_photos("noisy"),
                "median": over_photos("median"),
                "bm3d": bm3d,
                "dncnn": {"psnr": psnr, "psnr_std": psnr_std, "ssim": ssim, "ssim_std": ssim_std},
                "seeds": len(seeds),
                "gap": psnr - bm3d["psnr"],
            }
        )
    return lines


def markdown(lines: list[dict[str, Any]], header: str) -> str:
    out = [
        header,
        "",
        "| sigma (/255) | noisy | median | BM3D (sigma factor) | DnCNN (mean ± std over seeds) "
        "| DnCNN - BM3D |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for line in lines:
        d = line["dncnn"]
        out.append(
            f"| {line['level']} | {line['noisy']['psnr']:.2f} / {line['noisy']['ssim']:.3f} "
            f"| {line['median']['psnr']:.2f} / {line['median']['ssim']:.3f} "
            f"| {line['bm3d']['psnr']:.2f} / {line['bm3d']['ssim']:.3f} "
            f"(x{line['bm3d']['factor']:g}) "
            f"| {d['psnr']:.2f} ± {d['psnr_std']:.2f} / {d['ssim']:.3f} ± {d['ssim_std']:.3f} "
            f"| {line['gap']:+.2f} dB |"
        )
    out += ["", "Cells: PSNR (dB) / SSIM, mean over the whole held-out photos."]
    return "\n".join(out) + "\n"


def _figure(path: Path, crops: dict[str, dict[str, np.ndarray]]) -> None:
    names = ["noisy", "BM3D", "DnCNN", "clean"]
    rows, cols = [], list(crops)
    for column in cols:
        images = crops[column]
        height, width = images["clean"].shape[:2]
        top, left = (height - CROP) // 2, (width - CROP) // 2
        rows.append([images[n][top : top + CROP, left : left + CROP] for n in names])
    plots.image_grid(path, rows, row_labels=cols, column_labels=names)


def run(config, seeds, workdir: Path, quick: bool, command: str, flags) -> None:
    levels = report.numbers("levels", flags.levels, int, "15,25,50") or [15, 25, 50]
    if quick:
        levels = levels[1:2] if len(levels) > 1 else levels
    members = [(level, seed) for level in levels for seed in seeds]
    result = train.fit_many(
        config,
        seeds=[s for _, s in members],
        levels=[lv / 255.0 for lv, _ in members],
        workdir=workdir / "models",
    )
    config = ml_collections.ConfigDict(runfiles.read_json(workdir / "models" / "config.json"))
    scores = workdir / "stages" / "scores.json"
    scores.parent.mkdir(exist_ok=True)
    saved = runfiles.read_json(scores)
    key = {"members": [list(m) for m in members], "epochs": config.train.epochs}
    if isinstance(saved, dict) and saved.get("key") == key:
        rows = saved["rows"]
        crops = None
    else:
        rows, crops = score(result, config, members, print, (1.0,) if quick else BM3D_FACTORS)
        runfiles.write_json(scores, {"key": key, "rows": rows})
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"# Natural photos: DnCNN vs BM3D\n\n`{command}`\n\n"
        f"{config.data.name} photos, DnCNN depth {config.model.depth} x "
        f"{config.model.features}, {config.train.epochs} epochs of "
        f"{config.data.patch_size}x{config.data.patch_size} patches, seeds {list(seeds)}; "
        f"test: {', '.join(Path(n).stem for n in data.SKIMAGE_TEST)} (whole)."
    )
    lines = table(rows)
    (workdir / "results.md").write_text(markdown(lines, header))
    runfiles.write_json(workdir / "results.json", lines)
    if crops is not None:
        (workdir / "figures").mkdir(exist_ok=True)
        _figure(workdir / "figures" / "crops.png", crops)
    print(markdown(lines, header))
    if not math.isfinite(lines[0]["gap"]):
        print("warning: a model diverged (see models/summary.json)")


def main(argv=None) -> int:
    """The script (``argv`` None), or its run in this process with ``argv``: the exit code."""
    return report.cli(
        "natural_images", run, quick=quick, define=define, doc=__doc__,
        default_config=NATURAL_CONFIG, argv=argv,
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""Anomaly detection by reconstruction: train on every class but one, flag the one.

For each held-out class c, one DAE (per seed) trains on the training images of the
other classes (all of these models in one vmapped program). Every test image gets two
scores, higher meaning more anomalous: the reconstruction error of the clean image,
``mean((f(x) - x)^2)``, and the clean-vs-denoised distance ``mean((f(x~) - x)^2)``
for a corrupted copy ``x~`` (the config's noise). AUROC (held-out class = positive)
is the Mann-Whitney statistic, from scipy's ranks, ties counted half.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats

from dae_jax import corruption, data, metrics, plots, report, step, train
from dae_jax.errors import UserError

SCORES = {
    "reconstruction": "reconstruction error of the clean image",
    "denoised": "clean-vs-denoised distance",
}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative example")
    ranks = stats.rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    hits = np.asarray(positive, bool)[order]
    tpr = np.concatenate([[0.0], np.cumsum(hits) / hits.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / (~hits).sum()])
    return fpr, tpr


def run_experiment(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    workdir: Path,
    *,
    classes: Sequence[int] | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    dataset = data.load(config.data, seed=config.seed)
    num_classes = len(dataset.class_names)
    classes = list(range(num_classes)) if classes is None else list(classes)
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(
            f"--classes={bad[0]} is not a class of {dataset.name} (0..{num_classes - 1})"
        )
    labels = np.asarray(dataset.train_labels)
    normal = [np.flatnonzero(labels != c) for c in classes]
    size = min(len(i) for i in normal)  # one size for every model, so they vmap
    pairs = [(c, s) for c in classes for s in seeds]
    indices = [normal[classes.index(c)][:size] for c, _ in pairs]
    log(
        f"anomaly: {dataset.name}; {len(pairs)} models ({len(classes)} held-out classes x "
        f"{len(seeds)} seeds), each on {size} training images of the other classes"
    )
    many = train.fit_many(
        config,
        seeds=[s for _, s in pairs],
        levels=[float(config.noise.level)] * len(pairs),
        dataset=dataset,
        train_indices=indices,
        log=log,
    )
    clean = step.to_float(jnp.asarray(dataset.test_images))
    noisy = corruption.corrupt(
        config.noise.kind,
        jax.random.key(config.seed + 10_000),
        clean,
        jnp.float32(config.noise.level),
        clip=bool(config.noise.clip),
    )[0]
    rows, roc = _auroc_rows(many, pairs, dataset, clean, noisy, first_seed=seeds[0])
    body = _body(rows, classes, seeds, dataset, config)
    report.write(workdir, "anomaly", config, seeds, rows, body, started, command, classes=classes)
    plots.roc_figure(workdir / "figures" / "roc.png", roc)
    return rows


def _auroc_rows(
    many: Any, pairs: list, dataset: Any, clean: Any, noisy: Any, *, first_seed: int
) -> tuple[list[dict[str, Any]], dict]:
    """Each model's AUROC by each score, and the ROC curves of the first seed's models."""
    test_labels = np.asarray(dataset.test_labels)
    rows: list[dict[str, Any]] = []
    roc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, (c, seed) in enumerate(pairs):
        model = many.model(k)
        positive = test_labels == c
        scores = {
            "reconstruction": np.asarray(metrics.mse(model(clean), clean)),
            "denoised": np.asarray(metrics.mse(model(noisy), clean)),
        }
        for score, values in scores.items():
            rows.append(
                {
                    "experiment": "anomaly",
                    "held_out_class": c,
                    "class_name": dataset.class_names[c],
                    "seed": seed,
                    "score": score,
                    "metric": "auroc",
                    "value": auroc(values, positive),
                }
            )
        if seed == first_seed:
            roc[dataset.class_names[c]] = roc_curve(scores["reconstruction"], positive)
    return rows, roc


def _body(
    rows: list[dict[str, Any]], classes: list[int], seeds: Sequence[int], dataset: Any, config: Any
) -> str:
    """results.md's table: AUROC per held-out class and score, and the mean over classes."""
    names = [f"{c} {dataset.class_names[c]}" for c in classes]
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        cells.setdefault((f"{r['held_out_class']} {r['class_name']}", r["score"]), []).append(
            r["value"]
        )
    for score in SCORES:  # the mean over classes, per seed, so its std is over seeds
        per_seed = [
            float(np.mean([r["value"] for r in rows if r["score"] == score and r["seed"] == s]))
            for s in seeds
        ]
        cells["mean over classes", score] = per_seed
    class_auroc = {
        c: float(np.mean(cells[names[i], "reconstruction"])) for i, c in enumerate(classes)
    }
    hardest = sorted(classes, key=class_auroc.__getitem__)
    body = (
        f"AUROC of flagging the held-out class among all {len(dataset.test_labels)} test "
        f"images, by each score ({', '.join(f'{k}: {v}' for k, v in SCORES.items())}; noise "
        f"{config.noise.kind} {config.noise.level:g}); {config.train.epochs} epochs. "
        "0.5 is chance. Bold: best in the column.\n\n"
        + report.table([*names, "mean over classes"], list(SCORES), cells, first="held-out class")
        + "\n\nHardest classes (lowest reconstruction-error AUROC): "
        + ", ".join(f"{dataset.class_names[c]} ({class_auroc[c]:.3f})" for c in hardest[:3])
        + ".\n"
    )
    return body

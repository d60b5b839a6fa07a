"""Greedy layer-wise DAE pre-training (Vincent et al. 2010) and supervised fine-tuning.

Stacked pre-training: layer 1 is a one-hidden-layer DAE on the corrupted pixels
(sigmoid output, the config's loss); layer l > 1 is a DAE on the *clean* codes of the
layers below, corrupted the same way (Gaussian noise scaled by the codes' standard
deviation, or masking), with a linear output and squared error, since ReLU codes are
not in [0, 1]. The encoders stack into the network that fine-tuning starts from.

Fine-tuning: the encoder plus a softmax head, trained with labels by Adam on
minibatches, the epoch with the best validation accuracy kept. All training here is
a pure function of (parameters, key, data), so seeds run side by side under
``jax.vmap`` in one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dae_jax import corruption, data, losses, models, plots, report, step, train
from dae_jax.errors import UserError

STACK_NOISE = ("gaussian", "masking")


# ------------------------------------------------------------------ pre-training


class LayerDae(nnx.Module):
    """One layer of a stacked DAE: ``relu(x W + b)`` and its reconstruction."""

    def __init__(self, inputs: int, width: int, *, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(inputs, width, rngs=rngs)
        self.decoder = nnx.Linear(width, inputs, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decoder(nnx.relu(self.encoder(x)))


def pretrain_stack(
    key: jax.Array,
    pixels_NxP: jax.Array,
    widths: Sequence[int],
    *,
    noise_kind: str,
    level: float,
    loss: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> list[nnx.State]:
    """Greedy layer-wise pre-training; returns each layer's encoder ``nnx.Linear`` state.

    ``noise_kind`` is ``gaussian`` (sigma ``level`` on pixels, clipped to [0, 1];
    ``level`` times the codes' standard deviation on codes) or ``masking``; level 0
    trains plain autoencoders. Pure in ``key`` and the data, so it can be vmapped.
    """
    if noise_kind not in STACK_NOISE:
        raise ValueError(f"stacked pre-training supports {STACK_NOISE}, not {noise_kind!r}")
    encoders = []
    inputs_NxD = pixels_NxP
    for depth, width in enumerate(widths):
        layer_key, key = jax.random.split(key)
        init_key, train_key = jax.random.split(layer_key)
        graphdef, params = nnx.split(LayerDae(inputs_NxD.shape[1], width, rngs=nnx.Rngs(init_key)))
        first = depth == 0
        # Codes are rescaled to unit standard deviation for training, and the scale
        # folded back into the encoder afterwards, so the stack sees raw codes.
        scale = jnp.float32(1.0) if first else jnp.std(inputs_NxD) + 1e-6
        loss_of = _layer_loss(graphdef, scale, first, noise_kind, level, loss)
        params, _, _ = step.minibatch_epochs(
            loss_of,
            params,
            train_key,
            (inputs_NxD,),
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
        )
        layer = nnx.merge(graphdef, params).encoder
        layer.kernel[...] = layer.kernel[...] / scale
        encoders.append(nnx.state(layer))
        inputs_NxD = nnx.relu(layer(inputs_NxD))
    return encoders


def _layer_loss(
    graphdef: nnx.GraphDef, scale: jax.Array, first: bool, noise_kind: str, level: float, loss: str
) -> Callable[[nnx.State, tuple[jax.Array, ...], jax.Array], jax.Array]:
    def loss_of(params: nnx.State, batch: tuple[jax.Array, ...], key: jax.Array) -> jax.Array:
        clean = batch[0] / scale
        noisy = corruption.corrupt(noise_kind, key, clean, level, clip=first)[0]
        out = nnx.merge(graphdef, params)(noisy)
        if first:  # pixels: sigmoid output and the config's loss
            return jnp.mean(losses.PER_EXAMPLE[loss](out, clean))
        return jnp.mean(optax.squared_error(out, clean))

    return loss_of


# ------------------------------------------------------------------ fine-tuning


class Classifier(nnx.Module):
    """A DAE's encoder (``model.encode``, whatever the model kind) and a linear softmax
    head. The decoder's parameters ride along unused: their gradients are zero, so Adam
    leaves them as they are."""

    def __init__(self, dae: models.Dae, code_size: int, *, rngs: nnx.Rngs):
        self.dae = dae
        self.head = nnx.Linear(code_size, 10, rngs=rngs)

    def codes(self, x: jax.Array) -> jax.Array:
        if x.dtype == jnp.uint8:  # device-resident training images
            x = x.astype(jnp.float32) / 255.0
        return self.dae.encode(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.codes(x))


def classifier_from(model: models.Dae, key: jax.Array) -> Classifier:
    """A classifier on ``model``'s encoder (its current weights) with a fresh head."""
    code_size = int(model.encode(jnp.zeros((1, *model.image_shape))).shape[1])
    return Classifier(model, code_size, rngs=nnx.Rngs(key))


def accuracy(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), axis=1) == y)


def finetune(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    val_images: jax.Array,
    val_labels: jax.Array,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
) -> tuple[nnx.State, jax.Array, jax.Array]:
    """Cross-entropy fine-tuning of the whole classifier; keeps the best validation epoch.

    Returns its parameters, the per-epoch training losses and validation accuracies."""

    def loss_of(params: nnx.State, batch: tuple[jax.Array, ...], key: jax.Array) -> jax.Array:
        del key
        x, y = batch
        logits = nnx.merge(graphdef, params)(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return step.minibatch_epochs(
        loss_of,
        params,
        key,
        (images, labels),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        score_fn=functools.partial(accuracy, graphdef, x=val_images, y=val_labels),
    )


def labelled_subset(
    key: jax.Array, labels: np.ndarray, fraction: float, num_classes: int = 10
) -> np.ndarray:
    """Indices of a class-balanced random ``fraction`` of the examples (at least one per
    class, at most the rarest class's count): the same count for every key, so subsets
    of several seeds stack. ``fraction >= 1`` is every example."""
    labels = np.asarray(labels)
    if fraction >= 1:
        return np.arange(len(labels))
    rarest = min(int(np.sum(labels == c)) for c in range(num_classes))
    per_class = min(rarest, max(1, round(fraction * len(labels) / num_classes)))
    picks = []
    for c, class_key in enumerate(jax.random.split(key, num_classes)):
        members = np.flatnonzero(labels == c)
        picks.append(np.asarray(jax.random.permutation(class_key, members))[:per_class])
    return np.concatenate(picks)


# ------------------------------------------------------------------ the experiment


def _stacked_variants() -> dict[str, tuple[str, float]]:
    """Stacked pre-training variants: name -> (noise kind, level)."""
    return {
        "AE, stacked (level 0)": ("gaussian", 0.0),
        "DAE masking 0.25, stacked": ("masking", 0.25),
        "DAE Gaussian 0.3, stacked": ("gaussian", 0.3),
    }


def _check_flags(
    fractions: Sequence[float], pretrain_epochs: int, finetune_epochs: int, rate: float
) -> None:
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise UserError(
            f"--label_fractions: {bad[0]:g} is not a fraction of the labels in (0, 1]; "
            "give e.g. --label_fractions=0.01,0.1,1"
        )
    for flag, epochs in (
        ("pretrain_epochs", pretrain_epochs),
        ("finetune_epochs", finetune_epochs),
    ):
        if epochs < 1:
            raise UserError(f"--{flag}={epochs} must be at least 1")
    if rate < 0:
        raise UserError(
            f"--finetune_learning_rate={rate:g} must be > 0 "
            "(or 0 for the config's optim.learning_rate)"
        )


@dataclasses.dataclass(frozen=True)
class _Split:
    """The training split less a validation set (``pool``), and the test set."""

    pool: np.ndarray
    images: jax.Array  # uint8, the pool's
    labels: jax.Array
    val_x: jax.Array
    val_y: jax.Array
    test_x: jax.Array
    test_y: jax.Array

    @classmethod
    def of(cls, dataset: data.Dataset, val_size: int, seed: int) -> _Split:
        num_train = len(dataset.train_images)
        if not 0 < val_size < num_train // 2:
            raise UserError(f"--val_size={val_size} must be between 1 and half the training set")
        split = np.asarray(jax.random.permutation(jax.random.key(seed), num_train))
        pool, val = split[val_size:], split[:val_size]
        return cls(
            pool,
            jnp.asarray(dataset.train_images[pool]),
            jnp.asarray(dataset.train_labels[pool]),
            step.to_float(jnp.asarray(dataset.train_images[val])),
            jnp.asarray(dataset.train_labels[val]),
            step.to_float(jnp.asarray(dataset.test_images)),
            jnp.asarray(dataset.test_labels),
        )


def run_experiment(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    workdir: Path,
    *,
    fractions: Sequence[float],
    pretrain_epochs: int,
    finetune_epochs: int,
    val_size: int,
    finetune_learning_rate: float = 0.0,
    command: str = "",
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Pre-trains every variant for every seed, fine-tunes each with every label fraction,
    and writes results (test accuracy of the best validation epoch) and a figure.
    ``finetune_learning_rate`` 0 means the config's ``optim.learning_rate``."""
    _check_flags(fractions, pretrain_epochs, finetune_epochs, finetune_learning_rate)
    started = time.perf_counter()
    rate = finetune_learning_rate or config.optim.learning_rate
    (workdir / "figures").mkdir(parents=True, exist_ok=True)
    dataset = data.load(config.data, seed=config.seed)
    split = _Split.of(dataset, val_size, config.seed)
    log(
        f"pretrain_finetune: {dataset.name}, {len(split.pool)} train images (labels used only "
        f"in fine-tuning), {val_size} validation, {len(split.test_y)} test; model "
        f"{config.model.kind}"
    )
    seed_keys = jnp.stack([jax.random.key(s) for s in seeds])
    pretrain_keys, head_keys, tune_keys, subset_keys = (
        jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(seed_keys) for i in range(4)
    )
    starts = _pretrained_starts(config, dataset, split, seeds, pretrain_keys, pretrain_epochs, log)
    graphdef = nnx.split(models.create(config, key=jax.random.key(0)))[0]
    first = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], starts["random init"]))
    head_graphdef = nnx.split(classifier_from(first, head_keys[0]))[0]
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for name, start_params in starts.items():
        classifiers = jax.vmap(
            lambda p, k: nnx.split(classifier_from(nnx.merge(graphdef, p), k))[1]
        )(start_params, head_keys)
        for fraction in fractions:
            found, curves[f"{name} @ {fraction:g}"] = _finetune_fraction(
                name, fraction, head_graphdef, classifiers, split, subset_keys, tune_keys,
                seeds, epochs=finetune_epochs, batch_size=config.train.batch_size,
                learning_rate=rate, log=log,
            )  # fmt: skip
            rows += found
    _write_report(
        workdir,
        config,
        seeds,
        rows,
        curves,
        list(starts),
        fractions,
        started,
        command,
        f"of the {len(split.pool)} training labels (Adam, learning rate {rate:g}; the epoch "
        f"with the best accuracy on {val_size} held-out training images kept); pre-training "
        f"{pretrain_epochs} epochs per layer / end-to-end on all {len(split.pool)} images "
        "without labels.",
    )
    return rows


def _finetune_fraction(
    name: str,
    fraction: float,
    head_graphdef: Any,
    classifiers: Any,
    split: Any,
    subset_keys: jax.Array,
    tune_keys: jax.Array,
    seeds: Sequence[int],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Fine-tunes one start's classifiers (one per seed) on ``fraction`` of the labels:
    the rows (test accuracy at the best validation epoch) and the mean validation curve."""
    begin = time.perf_counter()
    keys = jax.vmap(lambda k, f=fraction: jax.random.fold_in(k, int(f * 1e6)))(subset_keys)
    subsets = np.stack([labelled_subset(k, np.asarray(split.labels), fraction) for k in keys])
    epochs = epochs * max(1, min(10, round(1 / fraction)))
    tuned, _, val_SxE = _finetune_many(
        head_graphdef,
        classifiers,
        tune_keys,
        jnp.asarray(subsets),
        split.images,
        split.labels,
        split.val_x,
        split.val_y,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    test_acc = jax.vmap(lambda p: accuracy(head_graphdef, p, split.test_x, split.test_y))(tuned)
    rows = _finetune_rows(name, fraction, subsets.shape[1], epochs, seeds, test_acc, val_SxE)
    log(
        f"  {name}, {fraction:g} of the labels ({subsets.shape[1]}): test accuracy "
        f"{float(jnp.mean(test_acc)):.4f} ({time.perf_counter() - begin:.1f} s)"
    )
    return rows, np.asarray(val_SxE).mean(axis=0)


def _pretrained_starts(
    config: ml_collections.ConfigDict,
    dataset: data.Dataset,
    split: _Split,
    seeds: Sequence[int],
    keys: jax.Array,
    epochs: int,
    log: Callable[[str], None],
) -> dict[str, nnx.State]:
    """Each variant's DAE-model parameters (stacked over seeds) that fine-tuning starts
    from: random, stacked layer-wise (MLP), and end-to-end AE and DAE."""
    fresh = jax.vmap(lambda key: nnx.split(models.create(config, key=key))[1])(keys)
    graphdef = nnx.split(models.create(config, key=jax.random.key(0)))[0]
    starts: dict[str, nnx.State] = {"random init": fresh}
    if config.model.kind == "mlp":
        pixels = step.to_float(split.images).reshape(len(split.pool), -1)
        for name, (kind, level) in _stacked_variants().items():
            begin = time.perf_counter()
            stack = jax.jit(
                jax.vmap(
                    functools.partial(
                        pretrain_stack,
                        widths=tuple(config.model.hidden),
                        noise_kind=kind,
                        level=level,
                        loss=config.loss,
                        epochs=epochs,
                        batch_size=config.train.batch_size,
                        learning_rate=config.optim.learning_rate,
                    ),
                    in_axes=(0, None),
                )
            )(keys, pixels)
            starts[name] = _with_encoder(graphdef, fresh, stack)
            log(f"  pre-trained {name} in {time.perf_counter() - begin:.1f} s")
    unlabeled = dataclasses.replace(
        dataset,
        train_images=dataset.train_images[split.pool],
        train_labels=dataset.train_labels[split.pool],
    )
    end_to_end = {
        "AE, end-to-end (level 0)": 0.0,
        f"DAE {config.noise.kind} {config.noise.level:g}, end-to-end": float(config.noise.level),
    }
    for name, level in end_to_end.items():
        begin = time.perf_counter()
        e2e = ml_collections.ConfigDict(config.to_dict())
        e2e.train.epochs = epochs
        many = train.fit_many(
            e2e, seeds=list(seeds), levels=[level] * len(seeds), dataset=unlabeled, log=_silent
        )
        starts[name] = many.states.params
        log(f"  pre-trained {name} in {time.perf_counter() - begin:.1f} s")
    return starts


def _silent(line: str) -> None:
    pass


def _finetune_rows(
    name: str,
    fraction: float,
    labels: int,
    epochs: int,
    seeds: Sequence[int],
    test_acc: jax.Array,
    val_SxE: jax.Array,
) -> list[dict[str, Any]]:
    rows = []
    for s, seed in enumerate(seeds):
        for metric, value in (
            ("test_accuracy", float(test_acc[s])),
            ("val_accuracy", float(jnp.max(val_SxE[s]))),
            ("best_epoch", int(jnp.argmax(val_SxE[s])) + 1),
        ):
            rows.append(
                {
                    "experiment": "pretrain_finetune",
                    "variant": name,
                    "label_fraction": fraction,
                    "labels": labels,
                    "finetune_epochs": epochs,
                    "seed": seed,
                    "metric": metric,
                    "value": value,
                }
            )
    return rows


def _write_report(
    workdir: Path,
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    rows: list[dict[str, Any]],
    curves: dict[str, Any],
    variants: list[str],
    fractions: Sequence[float],
    started: float,
    command: str,
    how: str,
) -> None:
    columns = [f"{f:g} of labels" for f in fractions]
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["metric"] == "test_accuracy":
            column = f"{r['label_fraction']:g} of labels"
            cells.setdefault((r["variant"], column), []).append(r["value"])
    body = (
        "Test accuracy of the encoder + softmax head fine-tuned on a class-balanced fraction "
        f"{how} Bold: best in the column.\n\n"
        + report.table(variants, columns, cells, first="pre-training")
    )
    report.write(
        workdir,
        "pretrain_finetune",
        config,
        seeds,
        rows,
        body,
        started,
        command,
        fractions=list(fractions),
    )
    plots.accuracy_vs_labels(workdir / "figures" / "accuracy_vs_labels.png", rows, variants)
    plots.curves_figure(
        workdir / "figures" / "validation_curves.png",
        curves,
        xlabel="fine-tuning epoch",
        ylabel="validation accuracy (mean over seeds)",
    )


def _with_encoder(graphdef: nnx.GraphDef, fresh: nnx.State, encoders: list[nnx.State]):
    """``fresh`` DAE parameters (stacked over seeds) with the encoder layers replaced."""

    def one(params: nnx.State, layers: list[nnx.State]) -> nnx.State:
        model = nnx.merge(graphdef, params)
        for module, state in zip(model.encoder, layers, strict=True):
            nnx.update(module, state)
        return nnx.split(model)[1]

    return jax.vmap(one)(fresh, encoders)


@functools.partial(jax.jit, static_argnames=("graphdef", "epochs", "batch_size", "learning_rate"))
def _finetune_many(
    graphdef,
    params_S,
    keys_S,
    subsets_SxN,
    images,
    labels,
    val_x,
    val_y,
    *,
    epochs,
    batch_size,
    learning_rate,
):
    def one(params, key, subset):
        return finetune(
            graphdef,
            params,
            key,
            images[subset],
            labels[subset],
            val_x,
            val_y,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
        )

    return jax.vmap(one)(params_S, keys_S, subsets_SxN)

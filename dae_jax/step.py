"""The pure half of training: state, the train step, the scanned chunk, evaluation. No I/O.

Key streams: ``jax.random.key(seed)`` splits into ``init``, ``shuffle``, ``noise`` and
``eval``. The epoch order is ``permutation(fold_in(shuffle, epoch))`` and a step's noise
is ``fold_in(noise, global_step)``, so every random choice is a function of the seed
and the position in training: a run is fixed bit for bit.

A *population* is K models trained together: their states are stacked on a leading
axis and ``population_chunk`` is ``jax.vmap`` of ``train_chunk`` over them. Each model
has its own keys, data order and traced hyperparameters (``Hyper``: the values of the
``TRACED`` config keys), so any mix of their values shares one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dae_jax import configs, corruption, data, losses, metrics, models


class TrainState(NamedTuple):
    step: jax.Array  # global step, int32 scalar
    params: nnx.State
    opt_state: optax.OptState


class KeyStreams(NamedTuple):
    init: jax.Array
    shuffle: jax.Array
    noise: jax.Array
    eval: jax.Array


# The config keys whose values may differ between the models of one compiled program:
# each is a traced scalar (``[K]`` in a population; float32, or for a name in ``NAMED``
# its int32 index), read where it is used
# (``train_step``, ``make_optimizer``). A new one is a line here, its use and its default.
TRACED = ("noise.kind", "noise.level", "optim.learning_rate", "optim.weight_decay")
# Traced keys whose values are names: traced as their index here.
NAMED = {"noise.kind": tuple(corruption.CORRUPTIONS)}
# A model's traced hyperparameters, by config key.
Hyper = dict[str, jax.Array]


def hyper_of(values: Sequence[dict[str, Any]]) -> Hyper:
    """``[K]`` arrays of the traced keys' values of K members."""
    return {
        key: jnp.asarray([NAMED[key].index(v[key]) for v in values], jnp.int32)
        if key in NAMED
        else jnp.asarray([v[key] for v in values], jnp.float32)
        for key in TRACED
    }


def _value(key: str, value: Any) -> float | str:
    return str(value) if key in NAMED else float(value)


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of a population: its seed (keys) and its values of the ``TRACED`` keys."""

    seed: int
    values: tuple[float | str, ...]  # in TRACED order

    @classmethod
    def of(cls, config: ml_collections.ConfigDict, seed: int | None = None) -> Member:
        """The member ``config`` describes (with another seed, if given)."""
        return cls(
            int(config.seed if seed is None else seed),
            tuple(_value(key, configs.get_key(config, key)) for key in TRACED),
        )

    @classmethod
    def from_record(cls, record: dict[str, Any], base: ml_collections.ConfigDict) -> Member:
        """A member from its JSON record; a key it lacks has ``base``'s value."""
        values = []
        for key in TRACED:
            value = record.get(key)
            values.append(_value(key, configs.get_key(base, key) if value is None else value))
        return cls(int(record["seed"]), tuple(values))

    @property
    def mapping(self) -> dict[str, float | str]:
        return dict(zip(TRACED, self.values, strict=True))

    def record(self) -> dict[str, Any]:
        """What checkpoints and ``population.json`` hold: the seed and each traced value."""
        return {"seed": self.seed, **self.mapping}

    def value(self, key: str) -> float | str:
        return self.values[TRACED.index(key)]

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """``base`` with this member's seed and traced values."""
        return configs.with_values(base, self.record())

    def describe(self) -> str:
        shown = (
            f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}" for k, v in self.mapping.items()
        )
        return ", ".join([f"seed {self.seed}", *shown])


def key_streams(seed_or_root: int | jax.Array) -> KeyStreams:
    """The run's named key streams, from its seed or its root key."""
    root = jax.random.key(seed_or_root) if isinstance(seed_or_root, int) else seed_or_root
    return KeyStreams(*jax.random.split(root, 4))


@dataclasses.dataclass(frozen=True)
class Optim:
    """The optimizer's static settings (``optim.*`` less the traced ones)."""

    schedule: str = "constant"  # constant | cosine (linear warmup, then cosine decay to 0)
    warmup_steps: int = 0
    total_steps: int = 1  # the cosine's length: train.epochs x steps per epoch
    grad_clip: float = 0.0  # global-norm clipping; 0 = off

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> Optim:
        optim = config.optim
        return cls(
            schedule=optim.get("schedule", "constant"),
            warmup_steps=int(optim.get("warmup_steps", 0)),
            total_steps=max(1, int(config.train.epochs) * steps_per_epoch),
            grad_clip=float(optim.get("grad_clip", 0.0)),
        )

    def learning_rate(self, peak: float | jax.Array) -> optax.ScalarOrSchedule:
        if self.schedule == "constant":
            return peak
        # The shape with peak 1, scaled: optax compares the peak with 0 in Python, and a
        # population's peak is a traced value.
        unit = optax.warmup_cosine_decay_schedule(
            0.0, 1.0, min(self.warmup_steps, self.total_steps - 1), self.total_steps
        )
        return lambda step: peak * unit(step)

    def learning_rate_at(self, peak: float, step: int) -> float:
        """The rate the optimizer applies at ``step`` (for the logs)."""
        rate = self.learning_rate(peak)
        return float(rate(step) if callable(rate) else rate)


def make_optimizer(optim: Optim, hyper: Hyper) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, 0 = Adam) at the member's traced learning rate and
    weight decay, on ``optim``'s schedule, after global-norm clipping if set. The state
    holds neither traced value, so members with any values share one program."""
    adamw = optax.adamw(
        optim.learning_rate(hyper["optim.learning_rate"]),
        weight_decay=hyper["optim.weight_decay"],
    )
    if optim.grad_clip:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw


def init_state(
    config: ml_collections.ConfigDict, key: jax.Array
) -> tuple[nnx.GraphDef, TrainState]:
    model = models.create(config, key=key)
    graphdef, params = nnx.split(model)
    hyper = jax.tree.map(lambda x: x[0], hyper_of([Member.of(config).mapping]))
    opt_state = make_optimizer(Optim.from_config(config), hyper).init(params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state)


def abstract_state(
    config: ml_collections.ConfigDict, num_models: int | None = None
) -> tuple[nnx.GraphDef, TrainState]:
    """The graph and the shapes of a fresh train state (stacked ``[num_models, ...]``
    when given), without computing it."""
    graphdefs = []

    def init() -> TrainState:
        graphdef, state = init_state(config, jax.random.key(0))
        graphdefs.append(graphdef)
        return state

    abstract = jax.eval_shape(init)
    if num_models is not None:
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct((num_models, *leaf.shape), leaf.dtype), abstract
        )
    return graphdefs[0], abstract


def to_float(images_u8: jax.Array) -> jax.Array:
    return images_u8.astype(jnp.float32) / 255.0


CPU_CONV_MICROBATCH = 16  # Setup.microbatch of the conv DAE on CPU


def scan_unroll(config: ml_collections.ConfigDict) -> int:
    """``train.scan_unroll``, 0 meaning 1: a scanned chunk is as fast as an unrolled one
    for every model kind (conv too, since its CPU gradients avoid XLA's slow path) and
    compiles once whatever its length."""
    return int(config.train.get("scan_unroll", 0)) or 1


@dataclasses.dataclass(frozen=True)
class Setup:
    """The static half of training: what the compiled programs close over."""

    graphdef: nnx.GraphDef
    loss: str
    noise_kind: str
    clip: bool
    unroll: int = 1  # lax.scan unroll: speed only (fewer loop iterations per chunk)
    optim: Optim = Optim()
    patch_size: int = 0  # > 0: train on random patches of this side (images come with sizes)
    augment: bool = False  # patches: random flips and transposes
    # A population's members one after another (lax.map) instead of vmapped: XLA:CPU ran
    # the grouped convolutions vmap makes of 3 DnCNNs 11x slower than one (24.0 vs 2.2 s a
    # step; experiments/PERFORMANCE.md).
    members_in_sequence: bool = False
    # > 0: a step's gradient summed over microbatches of at most this many examples, each
    # one's forward and backward pass in turn (the same mean, summed in another order), and
    # the evaluation's forward pass in such parts. XLA:CPU runs the conv DAE's step at batch
    # 128 ~20% faster as 8 x 16 and its evaluation 2.4x faster (the activations stay in
    # cache; experiments/PERFORMANCE.md). DnCNN gained nothing: 0 there and elsewhere.
    microbatch: int = 0

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, steps_per_epoch: int = 1
    ) -> Setup:
        cpu = jax.default_backend() == "cpu"
        return cls(
            graphdef=graphdef,
            loss=config.loss,
            noise_kind=config.noise.kind,
            clip=bool(config.noise.clip),
            unroll=scan_unroll(config),
            optim=Optim.from_config(config, steps_per_epoch),
            patch_size=int(config.data.get("patch_size", 0) or 0),
            augment=bool(config.data.get("augment", False)),
            members_in_sequence=cpu and models.kind(config).fully_convolutional,
            microbatch=CPU_CONV_MICROBATCH if cpu and config.model.kind == "conv" else 0,
        )

    def corrupt(
        self, key: jax.Array, clean: jax.Array, level: jax.Array, kind: jax.Array | None = None
    ) -> jax.Array:
        """``clean`` corrupted at ``level``: by the setup's noise kind, or, in a population
        whose members differ in it (``noise_kind=""``), by the traced ``kind`` index."""
        if self.noise_kind:
            return _corrupt_as(self.noise_kind, self.clip, key, clean, level)
        branches = [functools.partial(_corrupt_as, name, self.clip) for name in NAMED["noise.kind"]]
        return jax.lax.switch(kind, branches, key, clean, level)

    def loss_per_example(self, params: nnx.State, noisy: jax.Array, clean: jax.Array):
        model = nnx.merge(self.graphdef, params)
        return losses.per_example(self.loss, model.outputs(noisy), clean, model.predicts)

    def loss_and_grad(
        self, params: nnx.State, noisy: jax.Array, clean: jax.Array
    ) -> tuple[jax.Array, nnx.State]:
        """The batch's mean loss and its gradient, in ``microbatch``-sized parts when set."""
        size, parts = len(clean), self._parts(len(clean))
        if parts == 1:
            mean = lambda p: jnp.mean(self.loss_per_example(p, noisy, clean))  # noqa: E731
            return jax.value_and_grad(mean)(params)
        part = jax.value_and_grad(lambda p, x, y: jnp.sum(self.loss_per_example(p, x, y)) / size)

        def add(total: Any, xy: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            return jax.tree.map(jnp.add, total, part(params, *xy)), None

        split = lambda x: x.reshape(parts, size // parts, *x.shape[1:])  # noqa: E731
        zero = jax.tree.map(jnp.zeros_like, (jnp.zeros((), jnp.float32), params))
        return jax.lax.scan(add, zero, (split(noisy), split(clean)))[0]

    def outputs(self, model: Any, noisy: jax.Array) -> jax.Array:
        """``model.outputs(noisy)``, in ``microbatch``-sized parts when set."""
        size, parts = len(noisy), self._parts(len(noisy))
        if parts == 1:
            return model.outputs(noisy)
        out = jax.lax.map(model.outputs, noisy.reshape(parts, size // parts, *noisy.shape[1:]))
        return out.reshape(size, *out.shape[2:])

    def _parts(self, size: int) -> int:
        """Into how many equal parts of ``microbatch / 2`` to ``microbatch`` examples a
        batch of ``size`` splits (1: none, or it does not split so)."""
        largest = self.microbatch
        if not largest:
            return 1
        fewest, most = -(-size // largest), size // max(largest // 2, 1)
        return next((n for n in range(fewest, most + 1) if size % n == 0), 1)


def _corrupt_as(kind: str, clip: bool, key: jax.Array, clean: jax.Array, level: jax.Array):
    return corruption.corrupt(kind, key, clean, level, clip=clip)[0]


def _all_finite(tree: object) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def optimizer_step(
    optimizer: optax.GradientTransformation,
    loss_and_grad: Callable[[Any], tuple[jax.Array, Any]],
    params: Any,
    opt_state: optax.OptState,
) -> tuple[Any, optax.OptState, jax.Array]:
    """One gradient step, ``loss_and_grad(params)`` giving the loss and its gradient
    (``jax.value_and_grad`` of a loss, or ``Setup.loss_and_grad``): the building block
    of every loop here (training, pre-training, fine-tuning)."""
    loss, grads = loss_and_grad(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_step(
    setup: Setup, state: TrainState, clean: jax.Array, key: jax.Array, hyper: Hyper
) -> tuple[TrainState, jax.Array]:
    """One optimizer step on a batch of clean images in [0, 1], corrupted with ``key``."""
    noisy = setup.corrupt(key, clean, hyper["noise.level"], hyper["noise.kind"])
    params, opt_state, loss = optimizer_step(
        make_optimizer(setup.optim, hyper),
        lambda params: setup.loss_and_grad(params, noisy, clean),
        state.params,
        state.opt_state,
    )
    return TrainState(state.step + 1, params, opt_state), loss


def minibatch_epochs(
    loss_fn: Callable[[Any, tuple[jax.Array, ...], jax.Array], jax.Array],
    params: Any,
    key: jax.Array,
    data: tuple[jax.Array, ...],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    score_fn: Callable[[Any], jax.Array] | None = None,
) -> tuple[Any, jax.Array, jax.Array]:
    """Adam on minibatches of ``data`` (arrays sharing axis 0), reshuffled every epoch,
    as one ``lax.scan`` of ``optimizer_step`` per epoch (pre-training, fine-tuning).

    ``loss_fn(params, batch, key)`` gets a fresh key per step. Returns the final
    parameters, or with ``score_fn`` (higher is better, e.g. validation accuracy) those
    of the best-scoring epoch; and the per-epoch mean losses and scores.
    """
    n = data[0].shape[0]
    batch = min(batch_size, n)
    steps = n // batch
    optimizer = optax.adam(learning_rate)

    def epoch(carry: tuple, epoch_key: jax.Array) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
        params, opt_state, best, best_score = carry
        order_key, step_key = jax.random.split(epoch_key)
        order = jax.random.permutation(order_key, n)[: steps * batch].reshape(steps, batch)

        def step(carry: tuple, xs: tuple[jax.Array, jax.Array]) -> tuple[tuple, jax.Array]:
            indices, i = xs
            batch_data = tuple(a[indices] for a in data)

            def loss_of(params: Any) -> jax.Array:
                return loss_fn(params, batch_data, jax.random.fold_in(step_key, i))

            params, opt_state, loss = optimizer_step(optimizer, jax.value_and_grad(loss_of), *carry)
            return (params, opt_state), loss

        (params, opt_state), batch_losses = jax.lax.scan(
            step, (params, opt_state), (order, jnp.arange(steps))
        )
        mean_loss = jnp.mean(batch_losses)
        if score_fn is None:  # no selection: the last epoch's parameters are returned
            return (params, opt_state, best, best_score), (mean_loss, -mean_loss)
        score = score_fn(params)
        better = score > best_score
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
        return (params, opt_state, best, jnp.maximum(score, best_score)), (mean_loss, score)

    init = (params, optimizer.init(params), params, jnp.float32(-jnp.inf))
    (last, _, best, _), (epoch_losses, scores) = jax.lax.scan(
        epoch, init, jax.random.split(key, epochs)
    )
    return (best if score_fn is not None else last), epoch_losses, scores


def crop_patches(
    key: jax.Array,
    images: tuple[jax.Array, jax.Array],
    indices_B: jax.Array,
    size: int,
    augment: bool,
) -> jax.Array:
    """A random ``size x size`` patch of each image ``indices_B`` picks (modulo the image
    count: an epoch of several patches per image), inside its own height and width, as
    uint8 ``[B, size, size, C]``; with ``augment``, each flipped and transposed at random
    (the eight symmetries of the square). ``images`` is ``(pixels [N, H, W, C], sizes [N, 2])``.
    One gather from the device-resident images: nothing but the patches is copied."""
    pixels_NxHxWxC, sizes_Nx2 = images
    image_B = indices_B % pixels_NxHxWxC.shape[0]
    sizes_Bx2 = sizes_Nx2[image_B]
    offset_key, symmetry_key = jax.random.split(key)
    room_Bx2 = sizes_Bx2 - size + 1
    offsets_Bx2 = jnp.minimum(
        jnp.floor(jax.random.uniform(offset_key, sizes_Bx2.shape) * room_Bx2).astype(jnp.int32),
        room_Bx2 - 1,
    )
    channels = pixels_NxHxWxC.shape[-1]

    def one(image: jax.Array, offset: jax.Array) -> jax.Array:
        start = (image, offset[0], offset[1], 0)
        return jax.lax.dynamic_slice(pixels_NxHxWxC, start, (1, size, size, channels))[0]

    patches = jax.vmap(one)(image_B, offsets_Bx2)
    if augment:
        flips = jax.random.bernoulli(symmetry_key, 0.5, (3, image_B.shape[0], 1, 1, 1))
        patches = jnp.where(flips[0], patches[:, ::-1], patches)
        patches = jnp.where(flips[1], patches[:, :, ::-1], patches)
        patches = jnp.where(flips[2], patches.transpose(0, 2, 1, 3), patches)
    return patches


def train_batch(
    setup: Setup, images: Any, indices_B: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The clean training batch in [0, 1] and the key for its noise: the images by index,
    or (``setup.patch_size``) random patches of them, cropped with a key split from ``key``."""
    if not setup.patch_size:
        return to_float(images[indices_B]), key
    crop_key, key = jax.random.split(key)
    return to_float(crop_patches(crop_key, images, indices_B, setup.patch_size, setup.augment)), key


def train_chunk(
    setup: Setup,
    length: int,
    state: TrainState,
    alive: jax.Array,
    images_u8: jax.Array,
    order_SxB: jax.Array,
    start: jax.Array,
    noise_key: jax.Array,
    hyper: Hyper,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """``length`` steps from row ``start`` of the epoch's order, as one ``lax.scan``.

    Batches are gathered by index on the device; nothing returns to the host until the
    chunk's ``length`` losses. A model whose losses or parameters turn non-finite during
    the chunk goes back to its state at the chunk's start, its last finite one, and stays
    there (``alive`` becomes False; its later chunks' losses are NaN); its step counter
    runs on, so its neighbours' noise is unaffected. The check is made once a chunk, not
    once a step: a per-step check and select over the whole state cost 30-50% of a step
    on a GPU.
    """
    indices_LxB = jax.lax.dynamic_slice_in_dim(order_SxB, start, length)

    def body(state: TrainState, indices_B: jax.Array) -> tuple[TrainState, jax.Array]:
        clean, key = train_batch(
            setup, images_u8, indices_B, jax.random.fold_in(noise_key, state.step)
        )
        return train_step(setup, state, clean, key, hyper)

    new, losses_L = jax.lax.scan(body, state, indices_LxB, unroll=min(setup.unroll, length))
    still = alive & jnp.all(jnp.isfinite(losses_L)) & _all_finite(new.params)
    keep = functools.partial(jnp.where, still)
    state = TrainState(
        new.step,
        jax.tree.map(keep, new.params, state.params),
        jax.tree.map(keep, new.opt_state, state.opt_state),
    )
    # A model that diverges in this chunk keeps its losses (the first non-finite one says
    # where); one that diverged before has none.
    return state, still, jnp.where(alive, losses_L, jnp.nan)


def population_chunk(
    setup: Setup,
    length: int,
    states: TrainState,
    alive_K: jax.Array,
    images_u8: jax.Array,
    orders_KxSxB: jax.Array,
    start: jax.Array,
    noise_keys_K: jax.Array,
    hypers_K: Hyper,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """``train_chunk`` for K models at once (``jax.vmap`` over everything but the shared
    images and start); losses come back ``[K, length]``. A population of one runs
    ``train_chunk`` itself, without the vmap (``dae-jax train``'s program as before)."""
    chunk = functools.partial(train_chunk, setup, length)
    per_model = (states, alive_K, orders_KxSxB, noise_keys_K, hypers_K)
    if alive_K.shape[0] == 1:
        state, alive, order, key, hyper = jax.tree.map(lambda x: x[0], per_model)
        out = chunk(state, alive, images_u8, order, start, key, hyper)
        return jax.tree.map(lambda x: x[None], out)
    if setup.members_in_sequence:
        return jax.lax.map(
            lambda m: chunk(m[0], m[1], images_u8, m[2], start, m[3], m[4]), per_model
        )
    return jax.vmap(chunk, in_axes=(0, 0, None, 0, None, 0, 0))(
        states, alive_K, images_u8, orders_KxSxB, start, noise_keys_K, hypers_K
    )


@functools.partial(jax.jit, static_argnames=("num_examples", "steps", "batch_size"))
def epoch_order(
    shuffle_key: jax.Array, epoch: jax.Array, *, num_examples: int, steps: int, batch_size: int
) -> jax.Array:
    """Example indices ``[steps, batch_size]`` for an epoch; the remainder is dropped."""
    permutation = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size)


# What evaluation reports: the loss, and each registered image metric of the noisy input
# and of the reconstruction.
EVAL_METRICS = (
    "test_loss",
    *(f"test_{name}_{of}" for name in metrics.IMAGE for of in ("noisy", "denoised")),
)


def evaluate(
    setup: Setup,
    params: nnx.State,
    images_u8_NxB: jax.Array,
    weights_NxB: jax.Array,
    key: jax.Array,
    level: jax.Array,
    kind: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Test loss, PSNR and SSIM over batches ``[num_batches, B, ...]``; ``weights`` mask padding.

    The input is corrupted with ``key`` (the same noise every epoch, so epochs compare);
    the loss is against the clean images, as in training. "noisy" scores the corrupted
    input itself, "denoised" the model's reconstruction of it.
    """
    model = nnx.merge(setup.graphdef, params)

    def one_batch(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        index, images_u8, weights = args
        clean = to_float(images_u8)
        noisy = setup.corrupt(jax.random.fold_in(key, index), clean, level, kind)
        outputs = setup.outputs(model, noisy)
        denoised = model.to_pixels(outputs)
        per_example = jnp.stack(
            [
                losses.per_example(setup.loss, outputs, clean, model.predicts),
                *(
                    metric(images, clean)
                    for metric in metrics.IMAGE.values()
                    for images in (noisy, denoised)
                ),
            ]
        )
        return jnp.sum(jnp.where(weights > 0, per_example, 0.0), axis=1)

    indices = jnp.arange(images_u8_NxB.shape[0])
    sums = jnp.sum(jax.lax.map(one_batch, (indices, images_u8_NxB, weights_NxB)), axis=0)
    means = sums / jnp.sum(weights_NxB)
    return {name: means[i] for i, name in enumerate(EVAL_METRICS)}


def evaluate_population(
    setup: Setup,
    params_K: nnx.State,
    images_u8_NxB: jax.Array,
    weights_NxB: jax.Array,
    eval_keys_K: jax.Array,
    hypers_K: Hyper,
) -> dict[str, jax.Array]:
    """``evaluate`` for K models, each at its own corruption; each metric comes back ``[K]``."""

    def one(params: nnx.State, key: jax.Array, hyper: Hyper) -> dict[str, jax.Array]:
        level, kind = hyper["noise.level"], hyper["noise.kind"]
        return evaluate(setup, params, images_u8_NxB, weights_NxB, key, level, kind)

    if setup.members_in_sequence:
        return jax.lax.map(lambda m: one(*m), (params_K, eval_keys_K, hypers_K))
    return jax.vmap(one)(params_K, eval_keys_K, hypers_K)


def batched_with_padding(images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, ...] -> [ceil(N / B), B, ...]`` zero-padded, with 1/0 weights marking real rows."""
    num_batches = math.ceil(len(images) / batch_size)
    padding = num_batches * batch_size - len(images)
    padded = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    weights = np.concatenate([np.ones(len(images), np.float32), np.zeros(padding, np.float32)])
    return (
        padded.reshape(num_batches, batch_size, *images.shape[1:]),
        weights.reshape(num_batches, batch_size),
    )


def test_images(dataset: data.Dataset, config: ml_collections.ConfigDict) -> np.ndarray:
    """The test images a run is evaluated on: the dataset's, or their centres when the model
    takes one size only (an MLP trained on patches) and they are of another."""
    images = dataset.test_images
    if models.kind(config).fully_convolutional:
        return images
    height, width = models.input_shape(config)[:2]
    if images.shape[1:3] == (height, width):
        return images
    return data.centre_crop(list(images), height, width)


def padded_test_batches(
    dataset: data.Dataset, batch_size: int, config: ml_collections.ConfigDict | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The test images as padded batches with their weights (host arrays; place them once)."""
    images = dataset.test_images if config is None else test_images(dataset, config)
    return batched_with_padding(images, min(batch_size, len(images)))


def chunks(steps: int, log_every: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """(start, length) of each compiled chunk of an epoch, from step ``first`` on."""
    for start in range(first, steps, log_every):
        yield start, min(log_every, steps - start)

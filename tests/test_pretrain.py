"""Stacked pre-training, fine-tuning and anomaly scoring, on tiny synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dae_jax import anomaly, data, models, pretrain, step, train
from tests.conftest import tiny_config


def _separable(n: int, key: int = 0):
    """Images whose class is written in which 4 of 40 pixel blocks are bright."""
    rng = np.random.default_rng(key)
    labels = rng.integers(0, 10, n)
    images = rng.uniform(0, 0.3, (n, 28, 28, 1)).astype(np.float32)
    for i, c in enumerate(labels):
        images[i, 2 * c : 2 * c + 4, :, 0] += 0.7
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def test_labelled_subset_is_balanced_random_and_whole_at_one():
    labels = np.repeat(np.arange(10), [50] + [60] * 9)
    a = pretrain.labelled_subset(jax.random.key(0), labels, 0.5)
    b = pretrain.labelled_subset(jax.random.key(1), labels, 0.5)
    assert len(a) == len(b) == 10 * 30  # round(0.5 * 590 / 10) per class
    assert np.bincount(labels[a], minlength=10).tolist() == [30] * 10
    capped = pretrain.labelled_subset(jax.random.key(0), labels, 0.9)  # 53 wanted, 50 exist
    assert np.bincount(labels[capped], minlength=10).tolist() == [50] * 10
    assert set(a.tolist()) != set(b.tolist())
    assert len(set(a.tolist())) == len(a)
    np.testing.assert_array_equal(
        pretrain.labelled_subset(jax.random.key(0), labels, 1.0), np.arange(590)
    )
    # Tiny fractions still give one example per class.
    assert len(pretrain.labelled_subset(jax.random.key(0), labels, 1e-6)) == 10


def test_fine_tuning_beats_chance_and_keeps_the_best_validation_epoch():
    x, y = _separable(600)
    model = models.create(tiny_config(), key=jax.random.key(0))
    graphdef, params = nnx.split(pretrain.classifier_from(model, jax.random.key(1)))
    before = float(pretrain.accuracy(graphdef, params, x[500:], y[500:]))
    tuned, losses, val = pretrain.finetune(
        graphdef,
        params,
        jax.random.key(2),
        x[:400],
        y[:400],
        x[400:500],
        y[400:500],
        epochs=8,
        batch_size=50,
        learning_rate=1e-3,
    )
    after = float(pretrain.accuracy(graphdef, tuned, x[500:], y[500:]))
    assert before < 0.3 and after > 0.8, (before, after)
    assert losses.shape == val.shape == (8,)
    assert float(losses[-1]) < float(losses[0])
    # The returned parameters are those of the best validation epoch.
    best_val = float(pretrain.accuracy(graphdef, tuned, x[400:500], y[400:500]))
    assert best_val == pytest.approx(float(jnp.max(val)))


@pytest.mark.slow  # in this process, but ~11 s on 2 CPU cores: three stacks pre-trained
def test_stacked_pretraining_gives_one_encoder_per_layer_and_lowers_each_loss():
    x, _ = _separable(256)
    pixels = x.reshape(256, -1)
    for kind, level in (("masking", 0.25), ("gaussian", 0.3), ("gaussian", 0.0)):
        encoders = pretrain.pretrain_stack(
            jax.random.key(0),
            pixels,
            (32, 16),
            noise_kind=kind,
            level=level,
            loss="mse",
            epochs=3,
            batch_size=64,
            learning_rate=1e-3,
        )
        assert [e["kernel"][...].shape for e in encoders] == [(784, 32), (32, 16)]
    with pytest.raises(ValueError, match="supports"):
        pretrain.pretrain_stack(
            jax.random.key(0),
            pixels,
            (8,),
            noise_kind="salt_and_pepper",
            level=0.1,
            loss="mse",
            epochs=1,
            batch_size=64,
            learning_rate=1e-3,
        )


def test_minibatch_epochs_is_deterministic_and_vmaps_over_seeds():
    x, _ = _separable(128)
    data_ = (x.reshape(128, -1),)

    def loss_fn(params, batch, key):
        del key
        return jnp.mean((batch[0] @ params["w"]) ** 2)

    params = {"w": jnp.ones((784, 2)) * 0.01}

    def run(key):
        return step.minibatch_epochs(
            loss_fn, params, key, data_, epochs=2, batch_size=32, learning_rate=1e-2
        )[0]["w"]

    keys = jax.random.split(jax.random.key(0), 3)
    many = jax.vmap(run)(keys)
    np.testing.assert_array_equal(many[1], run(keys[1]))
    np.testing.assert_array_equal(run(keys[0]), run(keys[0]))


def test_auroc_and_roc_against_hand_computed_values():
    assert anomaly.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert anomaly.auroc(np.array([1.0, 1.0, 1.0]), np.array([1, 0, 0])) == 0.5  # ties: half
    assert anomaly.auroc(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 0])) == 1.0
    fpr, tpr = anomaly.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    with pytest.raises(ValueError, match="at least one positive"):
        anomaly.auroc(np.array([1.0, 2.0]), np.array([0, 0]))


@pytest.mark.slow  # in this process, but ~11 s on 2 CPU cores: four populations trained
def test_fit_many_trains_each_model_on_its_own_images():
    config = tiny_config()
    config.train.epochs = 1
    dataset = data.load(config.data, seed=0)
    n = len(dataset.train_images)
    everything = train.fit_many(config, seeds=[0], levels=[0.5], dataset=dataset)
    identity = train.fit_many(
        config, seeds=[0], levels=[0.5], dataset=dataset, train_indices=[np.arange(n)]
    )
    jax.tree.map(np.testing.assert_array_equal, everything.states, identity.states)
    labels = np.asarray(dataset.train_labels)
    subsets = [np.flatnonzero(labels != c)[:300] for c in (0, 1)]
    two = train.fit_many(
        config, seeds=[0, 0], levels=[0.5, 0.5], dataset=dataset, train_indices=subsets
    )
    assert not np.allclose(two.final(0)["train_loss"], two.final(1)["train_loss"])
    with pytest.raises(Exception, match="same size"):
        train.fit_many(
            config,
            seeds=[0, 1],
            levels=[0.5, 0.5],
            dataset=dataset,
            train_indices=[np.arange(10), np.arange(11)],
        )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.tied_weights": True},
        {"model.kind": "conv", "model.channels": (4, 8)},
        {"model.kind": "conv", "model.channels": (4, 8), "model.convs_per_level": 2},
        {
            "model.kind": "conv",
            "model.channels": (4, 8, 8),
            "model.skip": True,
            "model.convs_per_level": 2,
        },
    ],
    ids=["mlp", "mlp-tied", "conv", "conv-x2", "conv-skip-x2"],
)
def test_fine_tuning_classifier_uses_the_models_own_encoder(overrides):
    """The classifier's codes are ``model.encode`` for every model kind (an earlier copy
    of the conv encoder skipped ``convs_per_level``'s extra layers)."""
    model = models.create(tiny_config(**overrides), key=jax.random.key(0))
    x, _ = _separable(8)
    classifier = pretrain.classifier_from(model, jax.random.key(1))
    np.testing.assert_array_equal(classifier.codes(x), model.encode(x))
    uint8 = (np.asarray(x) * 255).astype(np.uint8)
    np.testing.assert_allclose(
        classifier.codes(jnp.asarray(uint8)), model.encode(uint8 / 255.0), rtol=1e-6, atol=1e-6
    )

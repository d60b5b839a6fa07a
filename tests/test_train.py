import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dae_jax import data, step, train
from dae_jax.errors import UserError


def fit_quiet(config, workdir):
    lines: list[str] = []
    result = train.fit(config, workdir, log=lines.append)
    return result.summary, lines


def final_params(config, workdir):
    return jax.tree.leaves(train.fit(config, workdir, log=lambda line: None).state.params)


def test_same_seed_same_parameters_other_seed_other(tiny, tmp_path):
    a = final_params(tiny(), tmp_path / "a")
    b = final_params(tiny(), tmp_path / "b")
    c = final_params(tiny(seed=1), tmp_path / "c")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


def test_training_reduces_the_loss_and_denoises(tiny, tmp_path):
    summary, lines = fit_quiet(tiny(**{"train.epochs": 3, "optim.learning_rate": 3e-3}), tmp_path)
    assert summary["steps"] == 3 * (512 // 64)
    final = summary["final"]
    assert final["test_psnr_denoised"] > final["test_psnr_noisy"] + 3
    assert lines[0].startswith("Data: synthetic from synthetic (512 train, 96 test images)")
    assert any(line.startswith("Train Epoch: 1 [192/512 (38%)]\tLoss: ") for line in lines)
    assert sum(line.startswith("====> Epoch:") for line in lines) == 3


def test_chunks_cover_the_epoch():
    assert list(step.chunks(10, 4)) == [(0, 4), (4, 4), (8, 2)]
    assert list(step.chunks(8, 100)) == [(0, 8)]


def test_epoch_order_is_a_permutation_per_epoch():
    key = jax.random.key(0)
    a = np.asarray(step.epoch_order(key, 1, num_examples=10, steps=3, batch_size=3))
    b = np.asarray(step.epoch_order(key, 2, num_examples=10, steps=3, batch_size=3))
    assert a.shape == (3, 3) and len(set(a.ravel())) == 9
    assert not np.array_equal(a, b)


def test_padding_weights():
    padded, weights = step.batched_with_padding(np.ones((5, 2), np.uint8), 2)
    assert padded.shape == (3, 2, 2) and weights.tolist() == [[1, 1], [1, 1], [1, 0]]


def test_batch_larger_than_the_training_set(tiny, tmp_path):
    with pytest.raises(UserError, match="train.batch_size=1024 is larger than the training set"):
        fit_quiet(tiny(**{"train.batch_size": 1024}), tmp_path)


def test_evaluate_matches_a_direct_computation(tiny):
    config = tiny()
    dataset = data.load(config.data, seed=config.seed)
    keys = step.key_streams(0)
    graphdef, state = step.init_state(config, keys.init)
    setup = step.Setup.from_config(config, graphdef)
    batches, weights = step.batched_with_padding(dataset.test_images, 40)  # 96 = 40+40+16
    result = step.evaluate(
        setup, state.params, jnp.asarray(batches), jnp.asarray(weights), keys.eval, jnp.float32(0)
    )
    # With no noise the input PSNR is infinite; the loss is the model's plain MSE.
    assert np.isinf(float(result["test_psnr_noisy"]))
    clean = dataset.test_images.astype(np.float32) / 255.0
    reconstructed = np.asarray(nnx.merge(graphdef, state.params)(clean))
    expected_mse = np.mean((reconstructed - clean) ** 2)
    assert float(result["test_loss"]) == pytest.approx(expected_mse, rel=1e-5)


def test_fit_many_matches_single_runs(tiny, tmp_path):
    """Model k of a vmapped sweep is the single run with its seed and level: the same
    init, data order and noise; float32 round-off from batched matmuls only (measured
    <= 1.2e-7 after 16 steps; the test allows 1e-6)."""
    dataset = data.load(tiny().data, seed=0)
    seeds, levels = [0, 1, 0], [0.5, 0.2, 0.0]
    many = train.fit_many(
        tiny(), seeds=seeds, levels=levels, dataset=dataset, log=lambda line: None
    )
    assert len(many.history) == 2 * 3 and [r["model"] for r in many.history[-3:]] == [0, 1, 2]
    for k, (seed, level) in enumerate(zip(seeds, levels, strict=True)):
        config = tiny(seed=seed, **{"noise.level": level})
        single = train.fit(config, tmp_path / str(k), dataset=dataset, log=lambda line: None)
        for a, b in zip(
            jax.tree.leaves(single.state.params), jax.tree.leaves(many.model(k)), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert many.final(k)["train_loss"] == pytest.approx(
            single.summary["final"]["train_loss"], rel=1e-5
        )


def test_fit_many_checks_its_levels(tiny):
    with pytest.raises(UserError, match="config noise.level=1.5 is invalid"):
        train.fit_many(tiny(**{"noise.kind": "masking"}), seeds=[0], levels=[1.5])
    with pytest.raises(
        UserError, match="one value per seed in each list; got 2 seeds and 1 levels"
    ):
        train.fit_many(tiny(), seeds=[0, 1], levels=[0.5])


def test_microbatches_give_the_whole_batchs_loss_gradient_and_outputs(tiny):
    """A conv DAE on CPU takes its step in microbatches (``Setup.microbatch``): the same
    mean loss and gradient, summed in another order, and the same reconstructions."""
    config = tiny(**{"model.kind": "conv", "model.channels": (2, 4)})
    graphdef, _ = step.abstract_state(config)
    state = jax.jit(lambda key: step.init_state(config, key)[1])(jax.random.key(0))
    setup = step.Setup.from_config(config, graphdef)
    assert setup.microbatch == step.CPU_CONV_MICROBATCH  # the tests run on the CPU
    whole = dataclasses.replace(setup, microbatch=0)
    clean = jax.random.uniform(jax.random.key(1), (32, 8, 8, 1))
    noisy = jnp.clip(clean + 0.3 * jax.random.normal(jax.random.key(2), clean.shape), 0, 1)
    (loss, grads), (loss_1, grads_1) = (
        jax.jit(s.loss_and_grad)(state.params, noisy, clean) for s in (setup, whole)
    )
    assert float(loss) == pytest.approx(float(loss_1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    parts, at_once = (
        jax.jit(lambda p, x, s=s: s.outputs(nnx.merge(graphdef, p), x))(state.params, noisy)
        for s in (setup, whole)
    )
    np.testing.assert_allclose(parts, at_once, rtol=1e-5, atol=1e-6)
    # parts of microbatch / 2 to microbatch examples, or the whole batch
    assert [setup._parts(n) for n in (128, 1000, 64, 32, 127, 8)] == [8, 100, 4, 2, 1, 1]
    assert whole._parts(128) == 1

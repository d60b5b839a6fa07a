import jax.numpy as jnp
import numpy as np
import pytest

from dae_jax import losses


def test_zero_logits_give_hand_computed_values():
    logits = jnp.zeros((2, 4))
    targets = jnp.array([[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert float(losses.mse(logits, targets)) == pytest.approx(0.25)
    assert float(losses.bce(logits, targets)) == pytest.approx(np.log(2.0))


def test_match_pytorch_style_per_pixel_means():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 28, 28, 1)).astype(np.float32)
    targets = rng.uniform(size=(8, 28, 28, 1)).astype(np.float32)
    pixels = 1.0 / (1.0 + np.exp(-logits))
    expected_mse = np.mean((pixels - targets) ** 2)
    expected_bce = -np.mean(targets * np.log(pixels) + (1 - targets) * np.log(1 - pixels))
    assert float(losses.mse(logits, targets)) == pytest.approx(expected_mse, rel=1e-5)
    assert float(losses.bce(logits, targets)) == pytest.approx(expected_bce, rel=1e-5)


def test_per_example_values_average_to_the_batch_loss():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 784)).astype(np.float32)
    targets = rng.uniform(size=(5, 784)).astype(np.float32)
    for name, per_example in losses.PER_EXAMPLE.items():
        values = per_example(logits, targets)
        assert values.shape == (5,)
        batch = getattr(losses, name)(logits, targets)
        assert float(values.mean()) == pytest.approx(float(batch), rel=1e-6)


def test_bce_is_finite_for_extreme_logits():
    logits = jnp.array([[-200.0, 200.0, -50.0, 50.0]])
    targets = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    value = float(losses.bce(logits, targets))
    assert np.isfinite(value)
    assert value == pytest.approx((200.0 + 200.0) / 4, rel=1e-4)

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dae_jax import metrics


def test_psnr_of_known_images():
    clean = jnp.full((2, 4, 4, 1), 0.5)
    noisy = clean + jnp.array([0.1, 0.01])[:, None, None, None]  # MSE 1e-2 and 1e-4
    np.testing.assert_allclose(metrics.psnr(noisy, clean), [20.0, 40.0], rtol=1e-4)
    np.testing.assert_allclose(metrics.mse(noisy, clean), [1e-2, 1e-4], rtol=1e-4)


def test_ssim_of_identical_images_is_one_and_drops_with_noise():
    images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    np.testing.assert_allclose(metrics.ssim(images, images), 1.0, rtol=1e-5)
    noisy = images + 0.3 * jax.random.normal(jax.random.key(1), images.shape)
    assert float(jnp.max(metrics.ssim(noisy, images))) < 0.9


def test_median_filter_removes_isolated_salt():
    clean = jnp.full((1, 9, 9, 1), 0.25)
    noisy = clean.at[0, 4, 4, 0].set(1.0)
    np.testing.assert_allclose(metrics.median_filter(noisy, 3), clean)
    # a 3x3 median of a ramp is the ramp (edges mirrored)
    ramp = jnp.broadcast_to(jnp.linspace(0, 1, 9)[None, None, :, None], (1, 9, 9, 1))
    np.testing.assert_allclose(metrics.median_filter(ramp, 3), ramp, atol=1e-6)


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = jnp.full((1, 28, 28, 1), 0.4)
    np.testing.assert_allclose(metrics.gaussian_blur(constant, 1.0), 0.4, rtol=1e-5)  # edges too
    clean = jnp.full((4, 28, 28, 1), 0.5)
    noisy = clean + 0.2 * jax.random.normal(jax.random.key(0), clean.shape)
    best = metrics.best_classical(noisy, clean)
    assert set(best) == {"clip", "gaussian_blur", "median_filter"}
    assert best["gaussian_blur"]["psnr"] > best["clip"]["psnr"] + 5
    assert best["gaussian_blur"]["parameter"] == 2.0  # flat images: the widest blur wins


def test_linear_probe_separates_a_separable_set_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 20)) * 3
    labels = rng.integers(0, 10, 2000)
    features = centres[labels] + rng.normal(size=(2000, 20))
    result = metrics.linear_probe(features[:1500], labels[:1500], features[1500:], labels[1500:])
    assert result["test_accuracy"] > 0.95
    shuffled = metrics.linear_probe(
        rng.normal(size=(1500, 20)), labels[:1500], rng.normal(size=(500, 20)), labels[1500:]
    )
    assert shuffled["test_accuracy"] == pytest.approx(0.1, abs=0.06)  # chance


def test_ssim_matches_dm_pix_default_window():
    import dm_pix

    clean = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
    noisy = jnp.clip(clean + 0.3 * jax.random.normal(jax.random.key(1), clean.shape), 0, 1)
    np.testing.assert_allclose(
        metrics.ssim(noisy, clean), dm_pix.ssim(noisy, clean, max_val=1.0), atol=1e-6
    )

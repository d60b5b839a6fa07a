import jax
import jax.numpy as jnp
import numpy as np

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


def test_ssim_matches_dm_pix_default_window():
    import dm_pix

    clean = jax.random.uniform(jax.random.key(0), (16, 28, 28, 1))
    noisy = jnp.clip(clean + 0.3 * jax.random.normal(jax.random.key(1), clean.shape), 0, 1)
    np.testing.assert_allclose(
        metrics.ssim(noisy, clean), dm_pix.ssim(noisy, clean, max_val=1.0), atol=1e-6
    )


def test_a_registered_metric_reaches_evaluation_and_sweeps(tiny):
    """The registry is the one list: MAE is a function and an entry in metrics.py, and
    evaluation reports it for the noisy input and the reconstruction."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dae_jax import data, metrics, step

    a = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
    b = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1))
    np.testing.assert_allclose(
        metrics.mae(a, b), np.abs(np.asarray(a) - np.asarray(b)).mean(axis=(1, 2, 3)), rtol=1e-6
    )
    assert set(metrics.scores(a, b)) == set(metrics.IMAGE) >= {"psnr", "ssim", "mse", "mae"}
    config = tiny()
    dataset = data.load(config.data, seed=0)
    graphdef, state = step.init_state(config, step.key_streams(0).init)
    setup = step.Setup.from_config(config, graphdef)
    batches, weights = step.batched_with_padding(dataset.test_images, 48)
    values = step.evaluate(
        setup, state.params, jnp.asarray(batches), jnp.asarray(weights), step.key_streams(0).eval,
        jnp.float32(0.5),
    )  # fmt: skip
    assert set(values) == set(step.EVAL_METRICS)
    assert {"test_mae_noisy", "test_mae_denoised"} <= set(values)
    assert 0 < float(values["test_mae_noisy"]) < 1

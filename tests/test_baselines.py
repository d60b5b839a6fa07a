import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dae_jax import baselines, metrics


def test_median_filter_removes_isolated_salt():
    clean = jnp.full((1, 9, 9, 1), 0.25)
    noisy = clean.at[0, 4, 4, 0].set(1.0)
    np.testing.assert_allclose(baselines.median_filter(noisy, 3), clean)
    # a 3x3 median of a ramp is the ramp (edges mirrored)
    ramp = jnp.broadcast_to(jnp.linspace(0, 1, 9)[None, None, :, None], (1, 9, 9, 1))
    np.testing.assert_allclose(baselines.median_filter(ramp, 3), ramp, atol=1e-6)


def test_gaussian_blur_keeps_constants_and_smooths_noise():
    constant = jnp.full((1, 28, 28, 1), 0.4)
    np.testing.assert_allclose(baselines.gaussian_blur(constant, 1.0), 0.4, rtol=1e-5)  # edges too
    clean = jnp.full((4, 28, 28, 1), 0.5)
    noisy = clean + 0.2 * jax.random.normal(jax.random.key(0), clean.shape)
    best = baselines.best_classical(noisy, clean)
    assert set(best) == {"clip", "gaussian_blur", "median_filter"}  # no noise kind: no BM3D
    assert best["gaussian_blur"]["psnr"] > best["clip"]["psnr"] + 5
    assert best["gaussian_blur"]["parameter"] == 2.0  # flat images: the widest blur wins
    assert all(entry["images"] == 4 for entry in best.values())


def _shapes(count: int = 4) -> jax.Array:
    """Bright squares and bars on black, as Fashion-MNIST's dark backgrounds: ``[B, 28, 28, 1]``."""
    images = np.zeros((count, 28, 28, 1), np.float32)
    for i in range(count):
        images[i, 4 + 2 * i : 14 + 2 * i, 6:20] = 0.9
        images[i, 18:24, 3 + 2 * i : 7 + 2 * i] = 0.6
    return jnp.asarray(images)


@pytest.mark.parametrize("clip", [True, False])
def test_bm3d_improves_psnr_tuned_per_level_on_a_subset(clip):
    pytest.importorskip("bm3d")
    clean = _shapes()
    results = {}
    for level in (0.1, 0.3):
        noisy = clean + level * jax.random.normal(jax.random.key(1), clean.shape)
        noisy = jnp.clip(noisy, 0, 1) if clip else noisy
        best = baselines.best_classical(
            noisy, clean, noise="gaussian", level=level, clipped=clip, bm3d_images=4
        )
        assert set(best) == set(baselines.REFERENCES)
        bm3d = best["bm3d"]
        assert bm3d["images"] == 4 and bm3d["seconds"] > 0
        subset_noisy_psnr = float(jnp.mean(metrics.psnr(jnp.clip(noisy[:4], 0, 1), clean[:4])))
        assert bm3d["psnr"] > subset_noisy_psnr + 5
        assert bm3d["psnr"] > best["gaussian_blur"]["psnr"]  # sharp edges: BM3D beats a blur
        factors = baselines.BM3D_FACTORS[clip]
        assert bm3d["parameter"] in [pytest.approx(f * level) for f in factors]
        results[level] = bm3d["parameter"]
        scores = [  # the chosen sigma_psd is the best of the grid on these images
            float(jnp.mean(metrics.psnr(jnp.asarray(out), clean[:4])))
            for out in (
                baselines.bm3d_denoise(noisy[:4], f * level, clipped_sigma=level if clip else 0)
                for f in factors
            )
        ]
        assert bm3d["psnr"] == pytest.approx(max(scores), abs=1e-4)
        assert bm3d["parameter"] == pytest.approx(factors[int(np.argmax(scores))] * level)
    assert results[0.3] > results[0.1]  # tuned per level


def test_bm3d_is_deterministic_keeps_shapes_and_undoes_the_clipping_bias():
    pytest.importorskip("bm3d")
    clean = _shapes()
    noisy = jnp.clip(clean + 0.3 * jax.random.normal(jax.random.key(2), clean.shape), 0, 1)
    first = baselines.bm3d_denoise(noisy, 0.2, clipped_sigma=0.3)
    assert first.shape == (4, 28, 28, 1) and first.dtype == np.float32
    np.testing.assert_array_equal(first, baselines.bm3d_denoise(noisy, 0.2, clipped_sigma=0.3))
    assert baselines.bm3d_denoise(noisy[..., 0], 0.2).shape == (4, 28, 28)
    # clipped noise lifts the black background by ~0.4 sigma; undoing the bias removes it
    biased = baselines.bm3d_denoise(noisy, 0.2)
    background = np.asarray(clean) == 0
    assert np.median(biased[background]) > 0.08
    assert np.median(first[background]) < 0.01
    psnr = {
        name: float(metrics.psnr(jnp.asarray(out), clean).mean())
        for name, out in [("first", first), ("biased", biased)]
    }
    assert psnr["first"] > psnr["biased"]


def test_bm3d_worker_processes_give_the_serial_result():
    pytest.importorskip("bm3d")
    clean = jnp.tile(_shapes(), (3, 1, 1, 1))  # 12 images: 2 tasks of 6 on 2 workers
    noisy = jnp.clip(clean + 0.2 * jax.random.normal(jax.random.key(3), clean.shape), 0, 1)
    serial = baselines.bm3d_denoise(noisy, 0.2, clipped_sigma=0.2)
    with baselines.bm3d_pool(len(noisy), workers=2) as pool:
        assert pool is not None
        parallel = baselines.bm3d_denoise(noisy, 0.2, clipped_sigma=0.2, pool=pool)
    np.testing.assert_array_equal(parallel, serial)
    with baselines.bm3d_pool(baselines.BM3D_IMAGES_PER_WORKER) as pool:  # one worker's worth
        assert pool is None


def test_undo_clipping_bias_inverts_the_clipped_mean():
    values = np.linspace(0.0, 1.0, 11)
    lifted = baselines._clipped_mean(values, 0.3)
    assert lifted[0] == pytest.approx(0.3 / np.sqrt(2 * np.pi), rel=1e-3)  # E[max(0, n)]
    np.testing.assert_allclose(baselines.undo_clipping_bias(lifted, 0.3), values, atol=1e-3)


def test_masking_and_salt_and_pepper_get_no_bm3d():
    clean = _shapes()  # the shape the other tests use: JAX's compiled ops are reused
    noisy = clean.at[:, ::2].set(0.0)
    for noise in ("masking", "salt_and_pepper"):
        assert "bm3d" not in baselines.best_classical(noisy, clean, noise=noise, level=0.5)
    assert "bm3d" not in baselines.best_classical(clean, clean, noise="gaussian", level=0.0)


def _blobs(rng: np.random.Generator, count: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(0).normal(size=(10, 20)) * 3
    labels = rng.integers(0, 10, count)
    return centres[labels] + spread * rng.normal(size=(count, 20)), labels


def test_linear_probe_separates_a_separable_set_and_not_noise():
    rng = np.random.default_rng(0)
    features, labels = _blobs(rng, 2000, 1.0)
    result = baselines.linear_probe(features[:1500], labels[:1500], features[1500:], labels[1500:])
    assert result["test_accuracy"] > 0.95
    assert result["converged"] and result["iterations"] >= 1
    assert set(result) >= {"test_accuracy", "l2", "heldout_accuracy", "iterations", "seconds"}
    assert len(result["heldout_accuracies"]) == len(baselines.PROBE_L2)
    shuffled = baselines.linear_probe(
        rng.normal(size=(1500, 20)), labels[:1500], rng.normal(size=(500, 20)), labels[1500:]
    )
    assert shuffled["test_accuracy"] == pytest.approx(0.1, abs=0.06)  # chance


def test_linear_probe_chooses_more_l2_for_few_noisy_examples_and_is_deterministic():
    rng = np.random.default_rng(1)
    test, test_labels = _blobs(rng, 500, 2.0)
    many, many_labels = _blobs(rng, 4000, 3.0)
    few, few_labels = _blobs(rng, 100, 5.0)  # 100 examples of 20 features, mostly noise
    plenty = baselines.linear_probe(many, many_labels, test, test_labels)
    scarce = baselines.linear_probe(few, few_labels, test, test_labels)
    assert scarce["l2"] == max(baselines.PROBE_L2) > plenty["l2"]
    assert plenty["converged"] and scarce["converged"]
    again = baselines.linear_probe(few, few_labels, test, test_labels)
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in scarce.items() if k != "seconds"
    }

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dae_jax import corruption

KEY = jax.random.key(0)
IMAGES = jnp.full((64, 28, 28, 1), 0.5, jnp.float32)


def test_gaussian_has_requested_mean_and_std():
    noisy, mask = corruption.gaussian(KEY, IMAGES, 0.3)
    noise = np.asarray(noisy - IMAGES)
    assert noisy.shape == IMAGES.shape and noisy.dtype == jnp.float32
    assert abs(noise.mean()) < 0.003
    assert noise.std() == pytest.approx(0.3, rel=0.01)
    assert bool(mask.all())


def test_gaussian_clip_keeps_values_in_unit_interval():
    noisy, _ = corruption.gaussian(KEY, IMAGES, 1.0, clip=True)
    assert float(noisy.min()) == 0.0 and float(noisy.max()) == 1.0
    unclipped, _ = corruption.gaussian(KEY, IMAGES, 1.0)
    assert float(unclipped.min()) < 0.0 < 1.0 < float(unclipped.max())


def test_level_zero_is_identity():
    for kind in corruption.CORRUPTIONS:
        noisy, _ = corruption.corrupt(kind, KEY, IMAGES, 0.0)
        np.testing.assert_array_equal(noisy, IMAGES)


def test_masking_zeroes_the_requested_fraction_and_only_those():
    images = jax.random.uniform(jax.random.key(1), (64, 28, 28, 1), minval=0.1, maxval=1.0)
    noisy, mask = corruption.masking(KEY, images, 0.25)
    mask_np, noisy_np, images_np = map(np.asarray, (mask, noisy, images))
    assert mask_np.mean() == pytest.approx(0.25, abs=0.01)
    assert np.all(noisy_np[mask_np] == 0.0)
    np.testing.assert_array_equal(noisy_np[~mask_np], images_np[~mask_np])


def test_salt_and_pepper_values_fraction_and_balance():
    noisy, mask = corruption.salt_and_pepper(KEY, IMAGES, 0.4)
    mask_np, noisy_np = np.asarray(mask), np.asarray(noisy)
    assert mask_np.mean() == pytest.approx(0.4, abs=0.01)
    corrupted = noisy_np[mask_np]
    assert set(np.unique(corrupted)) == {0.0, 1.0}
    assert corrupted.mean() == pytest.approx(0.5, abs=0.02)
    assert np.all(noisy_np[~mask_np] == 0.5)


def test_same_key_same_noise_other_key_other_noise():
    a, _ = corruption.gaussian(KEY, IMAGES, 0.5)
    b, _ = corruption.gaussian(KEY, IMAGES, 0.5)
    c, _ = corruption.gaussian(jax.random.key(1), IMAGES, 0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", sorted(corruption.CORRUPTIONS))
def test_level_is_traced_so_changing_it_never_recompiles(kind):
    traces = []

    @jax.jit
    def corrupt(key, images, level):
        traces.append(1)
        return corruption.corrupt(kind, key, images, level)[0]

    outputs = [corrupt(KEY, IMAGES, jnp.float32(level)) for level in (0.1, 0.2, 0.3)]
    assert len(traces) == 1
    assert not np.array_equal(outputs[0], outputs[2])


def test_every_noise_kind_declares_its_levels_and_the_config_checks_them():
    from dae_jax import configs, corruption
    from dae_jax.errors import UserError

    assert set(corruption.LEVELS) == set(corruption.CORRUPTIONS)
    for kind, (low, high, problem) in corruption.LEVELS.items():
        config = configs.default_config()
        config.noise.kind, config.noise.level = kind, high if high < 1e9 else 1e6
        configs.validate(config)  # the top of its range is valid
        config.noise.level = low - 0.5
        with pytest.raises(UserError, match=r"noise\.level=-0\.5 is invalid: " + problem[:30]):
            configs.validate(config)

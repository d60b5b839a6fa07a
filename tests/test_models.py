import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dae_jax import models
from dae_jax.configs import default, seed


def _model(hidden=(512, 256, 128)):
    return models.MlpDae(hidden, rngs=nnx.Rngs(params=jax.random.key(0)))


def test_seed_shape_has_the_tutorials_parameter_count():
    # 784-512-256-128 and mirrored, with biases: the PyTorch tutorial's DAE.
    expected = sum(a * b + b for a, b in zip((784, 512, 256), (512, 256, 128), strict=True))
    expected += sum(a * b + b for a, b in zip((128, 256, 512), (256, 512, 784), strict=True))
    assert models.num_params(_model()) == expected == 1_132_944


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (3, 784)])
def test_shapes_for_both_input_layouts(shape):
    model = _model()
    x = jax.random.uniform(jax.random.key(1), shape)
    codes = model.encode(x)
    assert codes.shape == (3, 128)
    assert bool(jnp.all(codes >= 0))  # ReLU on the code, as in the tutorial
    decoded = model.decode(codes)
    assert decoded.shape == (3, 28, 28, 1)
    assert bool(jnp.all((decoded >= 0) & (decoded <= 1)))
    y = model(x)
    assert y.shape == shape
    np.testing.assert_allclose(y.reshape(3, -1), decoded.reshape(3, -1), rtol=1e-6)
    np.testing.assert_allclose(jax.nn.sigmoid(model.logits(x)), y, rtol=1e-6)


def test_widths_come_from_the_config():
    config = default.get_config()
    config.model.hidden = (100, 10)
    model = models.create(config, key=jax.random.key(0))
    assert [layer.kernel.shape for layer in model.encoder] == [(784, 100), (100, 10)]
    assert [layer.kernel.shape for layer in model.decoder] == [(10, 100), (100, 784)]
    assert model.encode(jnp.zeros((2, 784))).shape == (2, 10)


def test_seed_config_is_the_tutorial():
    config = seed.get_config()
    assert config.data.name == "mnist"
    assert tuple(config.model.hidden) == (512, 256, 128)
    assert (config.noise.kind, config.noise.level, config.noise.clip) == ("gaussian", 1.0, False)
    assert (config.loss, config.optim.learning_rate) == ("mse", 1e-2)
    assert (config.train.batch_size, config.train.epochs, config.train.log_every) == (128, 10, 100)

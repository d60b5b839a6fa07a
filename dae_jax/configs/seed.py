"""The tutorial, exactly: MNIST, Gaussian sigma 1.0 unclipped, Adam 1e-2, MSE, batch 128.

Ten epochs, a log line every 100 steps, widths 784-512-256-128 mirrored.
"""

import ml_collections

from dae_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "mnist"
    config.noise.kind = "gaussian"
    config.noise.level = 1.0
    config.noise.clip = False
    config.loss = "mse"
    config.optim.learning_rate = 1e-2
    config.train.epochs = 10
    config.train.batch_size = 128
    config.train.log_every = 100
    return config

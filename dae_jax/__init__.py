"""dae_jax: denoising autoencoders in JAX/Flax NNX.

``dae_jax.restore(workdir)`` gives a trained run's model, config and epoch.
"""

__version__ = "0.1.0"

from dae_jax.checkpointing import Run, restore  # noqa: E402

__all__ = ["Run", "restore", "__version__"]

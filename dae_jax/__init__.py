"""dae_jax: denoising autoencoders in JAX/Flax NNX."""

__version__ = "0.1.0"

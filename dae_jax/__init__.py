"""dae_jax: denoising autoencoders in JAX/Flax NNX.

``dae_jax.restore(workdir)`` gives a trained run's model, config and epoch
(``model=k`` picks member k of a sweep's population). Importing dae_jax does not
import JAX; ``restore`` does, on first use.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Run", "restore", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Run", "restore"):
        from dae_jax import checkpointing

        return getattr(checkpointing, name)
    raise AttributeError(f"module 'dae_jax' has no attribute {name!r}")

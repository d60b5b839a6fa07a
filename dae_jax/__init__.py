"""dae_jax: denoising autoencoders in JAX/Flax NNX.

``dae_jax.restore(workdir)`` gives a trained run's model, config and epoch.
"""

import time as _time

# When dae_jax was first imported: the start of "time to first training step".
PROCESS_START = _time.perf_counter()

__version__ = "0.1.0"

from dae_jax.checkpointing import Run, restore  # noqa: E402

__all__ = ["Run", "restore", "__version__"]

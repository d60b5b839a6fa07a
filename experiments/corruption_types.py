"""Gaussian vs masking vs salt-and-pepper corruption, each over its levels.

The same as ``dae-jax sweep --grid=corruption_types`` (from an installed package:
``python -m dae_jax.experiments.corruption_types``); ``--help`` shows its flags.
"""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("corruption_types")

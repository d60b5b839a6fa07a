"""Gaussian vs masking vs salt-and-pepper corruption, each over its own levels.

A thin main: the script is ``dae_jax/experiments/corruption_types.py`` (from an installed package:
``python -m dae_jax.experiments.corruption_types``); ``--help`` shows its flags.
"""

from dae_jax.experiments.corruption_types import main

if __name__ == "__main__":
    main()
